// fastipirm C++ CPU kernels of masked_contrastive_loss: the kernel set "cpu" of the contract in
// fastipirm/ops/masked_glue.py (the O((Q + K) D) glue and the closed-form backward are that shared
// torch code; fastipirm/ops/masked_cpu.py wraps these ops):
//
//   masked_rowstats  (m, z):   m_i = max(m0_i, max_{j: w_j > 0} x_ij),
//                              z_i = sum_j w_j e^{x_ij - m_i}
//   masked_colsum    a:        a_j = sum_i e^{x_ij - m_i} (rho_i x_ij + sigma_i)
//   masked_rowsum    r:        r_i = sum_j w_j gamma_j e^{x_ij - m_i} x_ij
//   masked_grad      (dq, dk): G_ij = w_j e^{x_ij - m_i} (alpha_i + beta_i gamma_j (1 + x_ij)),
//                              dq_i = sum_j G_ij dx_ij/dq_i, dk_j = sum_i G_ij dx_ij/dk_j
//
// every sum over the negative pairs (i, j) only: equal groups (or no groups) and j not in row i
// of `exclude`; x_ij = s(q_i, k_j) * inv_t with s the dot product (code 0), -|q - k|^2 (1),
// -|q - k|_1 (2) or -sum_d |q_d - k_d|^p (3).
//
// Tiles. The Q x K pairs are visited in kTR x kTC tiles; the logit tile is computed on the fly
// and never stored beyond the tile (memory linear in Q + K). Dot and squared distance: a
// register-blocked GEMM micro-kernel on GCC vector types (|q|^2 + |k|^2 - 2 q.k, clamped at 0);
// L1 / Lp: the same register blocking with an elementwise |q_d - k_d|^p (p = 1, 2, 3
// special-cased, general p by exp(p log|d|), |d| = 0 -> 0) over the feature dimension, the
// columns of a tile in the vector lanes (any D: 5-10 in CL-ICA, 128 alike). A tile whose query
// and key group ranges cannot meet is skipped; inside a tile the mask (groups, the exclude list,
// padding) is applied only when the tile needs one.
//
// Parallelism and determinism (bitwise, and independent of the thread count up to 16 threads):
// the row-wise kernels (rowstats, rowsum) give each row tile to one thread, the column-wise one
// (colsum) each column tile; every output element is summed in a fixed order. grad computes dq
// and dk in one pass over a fixed grid of row-tile chunks (min(row tiles, max(16, threads))):
// dq is owned by its row tile, dk is accumulated per chunk and the chunk partials are summed in
// chunk order. When those partials would exceed 64 MiB (FASTIPIRM_MASKED_CPU_PARTIAL_MB), grad
// takes two passes instead (dq over row tiles, dk over column tiles), still deterministic.
//
// Numerics: the row shift m keeps every exponential <= 1 (rowstats finds m online, rescaling its
// sum when the max grows), so any temperature is finite; float statistics for float inputs,
// double for double (the glue picks the dtype). The tile loops run with subnormals flushed to
// zero (FlushSubnormals): the far tails of the softmax would otherwise take the slow path.
//
// The vector types, the exponential, the GEMM micro-kernel and the tile padding are those of
// csrc/cpu_simd_gemm.h, shared with csrc/env_contrastive_cpu.cpp.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "cpu_simd_gemm.h"

namespace {

using namespace fastipirm::cpu;  // Vec, loadu, storeu, vexp, gemm_acc, padded_rows

constexpr int64_t kTR = 64;  // rows (queries) per tile
constexpr int64_t kTC = 64;  // columns (keys) per tile
constexpr int64_t kTT = kTR * kTC;
constexpr int64_t kMinChunks = 16;                 // grad's fixed chunk grid (see the header)
// bytes of grad's per-chunk dk partials: 64 MiB, or FASTIPIRM_MASKED_CPU_PARTIAL_MB (0: always
// the two-pass grad)
int64_t partial_budget() {
  const char* env = std::getenv("FASTIPIRM_MASKED_CPU_PARTIAL_MB");
  return env != nullptr && *env != 0 ? int64_t(std::atof(env) * 1048576.0) : int64_t(64) << 20;
}

enum Code : int64_t { kDot = 0, kSqEuclidean = 1, kL1 = 2, kLp = 3 };
// the per-dimension term |d|^p of the elementwise distances
enum Pow : int { kAbs = 0, kSquare = 1, kCube = 2, kGeneral = 3 };
// a row tile (its queries against every column tile) or a column tile (its keys, every row tile)
enum TileLine : int { kRowTile = 0, kColTile = 1 };

// tiles computed by any masked kernel since the extension was loaded (tests: tile skipping)
std::atomic<int64_t> g_tiles{0};

// Subnormal results flushed to zero (and subnormal inputs read as zero) on this thread while the
// guard lives, restored after. Far tails of the softmax (e^{x - m} times a small coefficient) fall
// below the smallest normal number, where every operation takes a slow microcode path (3x the
// whole grad kernel at tau = 0.05); those terms are below 1e-38 against row sums >= 1 (1e-308
// in double), so flushing them changes nothing measurable.
class FlushSubnormals {
 public:
  FlushSubnormals() {
#if defined(__SSE__)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040);  // FTZ | DAZ
#endif
  }
  ~FlushSubnormals() {
#if defined(__SSE__)
    _mm_setcsr(saved_);
#endif
  }
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;

 private:
  unsigned saved_ = 0;
};

// ------------------------------------------------------------------------------------------------
// vector helpers (on the 64-byte vector types of cpu_simd_gemm.h)
// ------------------------------------------------------------------------------------------------

// x in every lane (x - 0 folds to a plain broadcast, unlike 0 + x, which is not x for x = -0)
template <typename T>
inline typename Vec<T>::type splat(T x) {
  return x - typename Vec<T>::type{};
}

// the integer vector of T's width, and T's sign bit
template <typename T>
struct Bits {
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I type __attribute__((vector_size(64)));
  static constexpr I kSign = std::numeric_limits<I>::min();
};

// horizontal sums in a fixed tree order
inline float hsum(Vec<float>::type v) {
  typedef float F8 __attribute__((vector_size(32)));
  typedef float F4 __attribute__((vector_size(16)));
  const F8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const F4 q =
      __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

inline double hsum(Vec<double>::type v) {
  typedef double D4 __attribute__((vector_size(32)));
  const D4 h =
      __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (h[0] + h[2]) + (h[1] + h[3]);
}

template <typename T>
inline typename Vec<T>::type vabs(typename Vec<T>::type v) {
  using VI = typename Bits<T>::type;
  return (typename Vec<T>::type)((VI)v & ~Bits<T>::kSign);
}

// g sign(d): g with d's sign bit flipped in, 0 where d == 0
template <typename T>
inline typename Vec<T>::type sign_times(typename Vec<T>::type d, typename Vec<T>::type g) {
  using VI = typename Bits<T>::type;
  return (typename Vec<T>::type)(((VI)g ^ ((VI)d & Bits<T>::kSign)) & (VI)(d != T(0)));
}

// Transposing reduction: lane t of the result is the sum of the lanes of v[bitrev(t)] (a tree of
// shuffles and adds in a fixed order: L sums for about 2 L operations instead of L hsums).
#define FASTIPIRM_PAIR(a, b, ...) \
  (__builtin_shufflevector(a, b, __VA_ARGS__))
inline Vec<float>::type reduce_lanes(const Vec<float>::type* v) {
  using V = Vec<float>::type;
  V u[8], w[4], x[2];
  for (int i = 0; i < 8; ++i)
    u[i] = FASTIPIRM_PAIR(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21,
                          22, 23) +
           FASTIPIRM_PAIR(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27,
                          28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    w[i] = FASTIPIRM_PAIR(u[2 * i], u[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24,
                          25, 26, 27) +
           FASTIPIRM_PAIR(u[2 * i], u[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28,
                          29, 30, 31);
  for (int i = 0; i < 2; ++i)
    x[i] = FASTIPIRM_PAIR(w[2 * i], w[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12,
                          13, 28, 29) +
           FASTIPIRM_PAIR(w[2 * i], w[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14,
                          15, 30, 31);
  return FASTIPIRM_PAIR(x[0], x[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         FASTIPIRM_PAIR(x[0], x[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

inline Vec<double>::type reduce_lanes(const Vec<double>::type* v) {
  using V = Vec<double>::type;
  V w[4], x[2];
  for (int i = 0; i < 4; ++i)
    w[i] = FASTIPIRM_PAIR(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           FASTIPIRM_PAIR(v[2 * i], v[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; ++i)
    x[i] = FASTIPIRM_PAIR(w[2 * i], w[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           FASTIPIRM_PAIR(w[2 * i], w[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return FASTIPIRM_PAIR(x[0], x[1], 0, 8, 2, 10, 4, 12, 6, 14) +
         FASTIPIRM_PAIR(x[0], x[1], 1, 9, 3, 11, 5, 13, 7, 15);
}
#undef FASTIPIRM_PAIR

// bit reversal of the lane indices (log2 L bits): the input order of reduce_lanes
template <typename T>
struct LaneOrder {
  int rev[Vec<T>::kLanes];
  constexpr LaneOrder() : rev() {
    for (int t = 0; t < Vec<T>::kLanes; ++t)
      for (int b = 1; b < Vec<T>::kLanes; b <<= 1) rev[t] = (rev[t] << 1) | ((t & b) ? 1 : 0);
  }
};

// natural log on one vector of positive normal floats (Cephes logf, ~1 ulp)
inline Vec<float>::type vlog(Vec<float>::type x) {
  using V = Vec<float>::type;
  typedef int32_t VI __attribute__((vector_size(64)));
  VI xi = (VI)x;
  VI e = ((xi >> 23) & 0xff) - 126;                    // x = m 2^e, m in [0.5, 1)
  const V m = (V)((xi & 0x807fffff) | 0x3f000000);
  const VI small = m < 0.707106781186547524f;          // true is -1
  e += small;
  const V f = (small ? m + m : m) - 1.0f;
  const V z = f * f;
  V y = ((((((((7.0376836292e-2f * f - 1.1514610310e-1f) * f + 1.1676998740e-1f) * f -
              1.2420140846e-1f) * f + 1.4249322787e-1f) * f - 1.6668057665e-1f) * f +
           2.0000714765e-1f) * f - 2.4999993993e-1f) * f + 3.3333331174e-1f) * f * z;
  const V fe = __builtin_convertvector(e, V);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return f + y + 0.693359375f * fe;
}

// a^e for a vector of a >= 0 (0 where a == 0)
inline Vec<float>::type vpow(Vec<float>::type a, float e) {
  using V = Vec<float>::type;
  const V safe = a > 0.0f ? a : V{} + 1.0f;
  const V r = vexp(vlog(safe) * e);
  return a > 0.0f ? r : V{};
}

inline Vec<double>::type vpow(Vec<double>::type a, double e) {
  for (int l = 0; l < Vec<double>::kLanes; ++l) a[l] = a[l] > 0 ? std::exp(e * std::log(a[l])) : 0;
  return a;
}

// |d|^p, the per-dimension term of the elementwise distances
template <typename T, int PK>
inline typename Vec<T>::type term(typename Vec<T>::type d, T p) {
  if constexpr (PK == kAbs) return vabs<T>(d);
  if constexpr (PK == kSquare) return d * d;
  if constexpr (PK == kCube) return vabs<T>(d) * d * d;
  if constexpr (PK == kGeneral) return vpow(vabs<T>(d), p);
}

// g * d/dd |d|^p (0 at d = 0)
template <typename T, int PK>
inline typename Vec<T>::type slope_times(typename Vec<T>::type d, typename Vec<T>::type g, T p) {
  if constexpr (PK == kAbs) return sign_times<T>(d, g);
  if constexpr (PK == kSquare) return T(2) * d * g;
  if constexpr (PK == kCube) return T(3) * d * vabs<T>(d) * g;
  if constexpr (PK == kGeneral) {
    return sign_times<T>(d, vpow(vabs<T>(d), p - T(1)) * (p * g));
  }
}

// ------------------------------------------------------------------------------------------------
// elementwise-distance micro-kernels (the GEMM one: cpu_simd_gemm.h)
// ------------------------------------------------------------------------------------------------

// x[RB rows][kTC] = -inv_t sum_d |q[r][d] - kt[d][c]|^p: the columns in the vector lanes, RB
// rows of accumulators in registers; q rows have stride d, kt rows stride ldk.
template <typename T, int PK, int RB>
inline void dist_micro(int64_t d, const T* __restrict q, const T* __restrict kt, int64_t ldk,
                       T p, T neg_inv_t, T* __restrict x) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::kLanes, NV = kTC / L;
  V acc[RB][NV];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t dd = 0; dd < d; ++dd) {
    V kv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      kv[v] = loadu(kt + dd * ldk + v * L);
#if defined(__x86_64__)
      if constexpr (PK != kGeneral) asm("" : "+v"(kv[v]));
#endif
    }
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const V a = splat(q[r * d + dd]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += term<T, PK>(a - kv[v], p);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) storeu(x + r * kTC + v * L, acc[r][v] * neg_inv_t);
}

template <typename T, int PK>
void dist_tile(int64_t d, const T* q, const T* kt, int64_t ldk, T p, T neg_inv_t, T* x) {
  constexpr int RB = PK == kGeneral ? 1 : (sizeof(T) == 4 ? 4 : 2);
  for (int64_t r = 0; r < kTR; r += RB)
    dist_micro<T, PK, RB>(d, q + r * d, kt, ldk, p, neg_inv_t, x + r * kTC);
}

// The L1 / Lp feature gradients of one tile: with slope = G_rc d|q_rd - k_cd|^p / d(q_rd - k_cd),
// dqT[d][r] -= sum_c slope, dkT[d][c] += sum_r slope (either may be null).
template <typename T, int PK>
void lp_grad_tile(int64_t d, const T* __restrict q, const T* __restrict kt, int64_t ldk, T p,
                  const T* __restrict g, T* __restrict dqt, int64_t ldq, T* __restrict dkt,
                  int64_t lddk) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::kLanes, NV = kTC / L;
  static_assert(kTR % L == 0, "row tiles must be whole vectors");
  static constexpr LaneOrder<T> kOrder;
  V rows[kTR];  // the per-row partial sums, in bit-reversed order within each group of L rows
  for (int64_t dd = 0; dd < d; ++dd) {
    V kv[NV], dka[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      kv[v] = loadu(kt + dd * ldk + v * L);
      dka[v] = V{};
    }
    for (int64_t rb = 0; rb < kTR; rb += L)
      for (int t = 0; t < L; ++t) {
        const int64_t r = rb + t;
        const V a = splat(q[r * d + dd]);
        V row = V{};
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) {
          const V s = slope_times<T, PK>(a - kv[v], loadu(g + r * kTC + v * L), p);
          dka[v] += s;
          row += s;
        }
        rows[rb + kOrder.rev[t]] = row;
      }
    if (dqt != nullptr)
      for (int64_t r = 0; r < kTR; r += L)
        storeu(dqt + dd * ldq + r, loadu(dqt + dd * ldq + r) - reduce_lanes(rows + r));
    if (dkt != nullptr)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        storeu(dkt + dd * lddk + v * L, loadu(dkt + dd * lddk + v * L) + dka[v]);
  }
}

// ------------------------------------------------------------------------------------------------
// the problem: padded features, groups, the exclude list, the logit tiles and their masks
// ------------------------------------------------------------------------------------------------

template <typename T>
std::vector<T> padded_vec(const at::Tensor& x, int64_t npad) {
  std::vector<T> out(npad, T(0));
  if (x.defined() && x.numel() > 0)
    std::copy(x.data_ptr<T>(), x.data_ptr<T>() + x.numel(), out.begin());
  return out;
}

// does any of the first n key weights vanish? (a zero-weight column sets no row shift and adds
// nothing; its e^{x - m} may overflow, and 0 * inf must not become NaN)
template <typename T>
bool any_zero(const std::vector<T>& w, int64_t n) {
  return std::find(w.begin(), w.begin() + n, T(0)) != w.begin() + n;
}

// buf[r][c] = fill for every column c of the tile whose weight wc[c] is zero
template <typename T>
void fill_unweighted(T* buf, const T* wc, T fill) {
  for (int64_t c = 0; c < kTC; ++c)
    if (wc[c] == T(0))
      for (int64_t r = 0; r < kTR; ++r) buf[r * kTC + c] = fill;
}

template <typename T>
struct Problem {
  int64_t nq, nk, d, qpad, kpad, nrt, nct;
  int64_t code;
  int pk;
  T p, inv_t;
  at::Tensor qp_t, qt_t, kp_t, kt_t;
  const T *q, *qt, *k, *kt;  // (qpad, d), (d, qpad), (kpad, d), (d, kpad); zero padding
  std::vector<T> qn, kn;     // squared norms (sqeuclidean)
  const int64_t* qg = nullptr;
  const int64_t* kg = nullptr;
  std::vector<int64_t> rlo, rhi, clo, chi;  // each tile's range of group ids
  const int64_t* ex = nullptr;
  int64_t ne = 0;

  Problem(const at::Tensor& qx, const at::Tensor& kx, int64_t code_, double p_, double inv_t_,
          const at::Tensor& qg_t, const at::Tensor& kg_t, const at::Tensor& ex_t)
      : code(code_), p(T(p_)), inv_t(T(inv_t_)) {
    nq = qx.size(0);
    nk = kx.size(0);
    d = qx.size(1);
    nrt = (nq + kTR - 1) / kTR;
    nct = (nk + kTC - 1) / kTC;
    qpad = nrt * kTR;
    kpad = nct * kTC;
    qp_t = padded_rows(qx, qpad);
    qt_t = qp_t.t().contiguous();
    kp_t = padded_rows(kx, kpad);
    kt_t = kp_t.t().contiguous();
    q = qp_t.data_ptr<T>();
    qt = qt_t.data_ptr<T>();
    k = kp_t.data_ptr<T>();
    kt = kt_t.data_ptr<T>();
    pk = kAbs;
    if (code == kSqEuclidean) {
      qn.assign(qpad, T(0));
      kn.assign(kpad, T(0));
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t c = 0; c < d; ++c) qn[i] += q[i * d + c] * q[i * d + c];
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t c = 0; c < d; ++c) kn[j] += k[j * d + c] * k[j * d + c];
    } else if (code == kLp) {
      pk = p == T(1) ? kAbs : p == T(2) ? kSquare : p == T(3) ? kCube : kGeneral;
    }
    if (qg_t.numel() > 0) {
      qg = qg_t.data_ptr<int64_t>();
      kg = kg_t.data_ptr<int64_t>();
      auto ranges = [](const int64_t* g, int64_t n, int64_t tile, std::vector<int64_t>& lo,
                       std::vector<int64_t>& hi) {
        for (int64_t s = 0; s < n; s += tile) {
          const auto mm = std::minmax_element(g + s, g + std::min(n, s + tile));
          lo.push_back(*mm.first);
          hi.push_back(*mm.second);
        }
      };
      ranges(qg, nq, kTR, rlo, rhi);
      ranges(kg, nk, kTC, clo, chi);
    }
    if (ex_t.numel() > 0) {
      ex = ex_t.data_ptr<int64_t>();
      ne = ex_t.size(1);
    }
  }

  // can any pair of tile (bi, bj) be a negative (the groups' ranges meet)?
  bool meets(int64_t bi, int64_t bj) const {
    return qg == nullptr || !(rhi[bi] < clo[bj] || chi[bj] < rlo[bi]);
  }

  // f(o) for the tiles of row tile b (kRowTile: o = the column tiles) or of column tile b
  // (kColTile: o = the row tiles) whose pairs can be negatives (meets), in order; returns how many
  template <typename F>
  int64_t tiles_of(TileLine line, int64_t b, F f) const {
    const bool row = line == kRowTile;
    int64_t tiles = 0;
    for (int64_t o = 0; o < (row ? nct : nrt); ++o)
      if (row ? meets(b, o) : meets(o, b)) {
        ++tiles;
        f(o);
      }
    return tiles;
  }

  // does tile (bi, bj) need its mask (some pair in it is not a negative)?
  bool needs_mask(int64_t bi, int64_t bj) const {
    if (ex != nullptr || (bi + 1) * kTR > nq || (bj + 1) * kTC > nk) return true;
    return qg != nullptr && !(rlo[bi] == rhi[bi] && clo[bj] == chi[bj] && rlo[bi] == clo[bj]);
  }

  // buf[r][c] = fill for every pair (r0 + r, c0 + c) of tile (bi, bj) that is not a negative
  void mask(int64_t bi, int64_t bj, T* buf, T fill) const {
    const int64_t r0 = bi * kTR, c0 = bj * kTC;
    const int64_t nr = std::min(kTR, nq - r0), nc = std::min(kTC, nk - c0);
    const bool group_mask =
        qg != nullptr && !(rlo[bi] == rhi[bi] && clo[bj] == chi[bj] && rlo[bi] == clo[bj]);
    for (int64_t r = 0; r < kTR; ++r) {
      T* br = buf + r * kTC;
      if (r >= nr) {
        std::fill(br, br + kTC, fill);
        continue;
      }
      if (group_mask) {
        const int64_t g = qg[r0 + r];
        const int64_t* kr = kg + c0;
        for (int64_t c = 0; c < nc; ++c) br[c] = kr[c] != g ? fill : br[c];
      }
      std::fill(br + nc, br + kTC, fill);
      for (int64_t e = 0; e < ne; ++e) {
        const int64_t col = ex[(r0 + r) * ne + e] - c0;
        if (col >= 0 && col < nc) br[col] = fill;
      }
    }
  }

  // x[r][c] = s(q_{r0 + r}, k_{c0 + c}) * inv_t for the whole (padded) tile
  void logits(int64_t bi, int64_t bj, T* x) const {
    const int64_t r0 = bi * kTR, c0 = bj * kTC;
    const T* qa = q + r0 * d;
    const T* kb = kt + c0;
    switch (code) {
      case kDot:
      case kSqEuclidean: {
        std::fill(x, x + kTT, T(0));
        gemm_acc<T>(kTR, kTC, d, qa, d, 1, kb, kpad, x, kTC);
        if (code == kDot) {
          for (int64_t i = 0; i < kTT; ++i) x[i] *= inv_t;
        } else {
          for (int64_t r = 0; r < kTR; ++r) {
            const T nr = qn[r0 + r];
            const T* nc = kn.data() + c0;
            T* xr = x + r * kTC;
#pragma omp simd
            for (int64_t c = 0; c < kTC; ++c)
              xr[c] = -std::max(T(0), nr + nc[c] - T(2) * xr[c]) * inv_t;
          }
        }
        break;
      }
      default:
        switch (pk) {
          case kAbs: dist_tile<T, kAbs>(d, qa, kb, kpad, p, -inv_t, x); break;
          case kSquare: dist_tile<T, kSquare>(d, qa, kb, kpad, p, -inv_t, x); break;
          case kCube: dist_tile<T, kCube>(d, qa, kb, kpad, p, -inv_t, x); break;
          default: dist_tile<T, kGeneral>(d, qa, kb, kpad, p, -inv_t, x); break;
        }
    }
  }

  // the logits of tile (bi, bj) and e[r][c] = e^{x - m_r} on its negatives, 0 elsewhere
  void exp_tile(int64_t bi, int64_t bj, const T* m, T* x, T* e) const {
    using V = typename Vec<T>::type;
    constexpr int L = Vec<T>::kLanes;
    logits(bi, bj, x);
    const int64_t r0 = bi * kTR;
    for (int64_t r = 0; r < kTR; ++r) {
      const V mr = splat(m[r0 + r]);
      for (int64_t c = 0; c < kTC; c += L)
        storeu(e + r * kTC + c, vexp(loadu(x + r * kTC + c) - mr));
    }
    if (needs_mask(bi, bj)) mask(bi, bj, e, T(0));
  }

  // feature gradients of tile (bi, bj) from its coefficient tile g: dqT[:, r0:] (d x qpad) and
  // dkT[:, c0:] (d x kpad, either may be null) of the raw products; for the squared distance
  // also the row and column sums of g (see finish_grads)
  void grads(int64_t bi, int64_t bj, const T* g, T* gt, T* dqt, T* grow, T* dkt,
             T* gcol) const {
    const int64_t r0 = bi * kTR, c0 = bj * kTC;
    if (code == kDot || code == kSqEuclidean) {
      if (dqt != nullptr) {  // dqT[d][r] += sum_c kt[d][c] g[r][c]
        for (int64_t r = 0; r < kTR; ++r)
          for (int64_t c = 0; c < kTC; ++c) gt[c * kTR + r] = g[r * kTC + c];
        gemm_acc<T>(d, kTR, kTC, kt + c0, kpad, 1, gt, kTR, dqt + r0, qpad);
        if (code == kSqEuclidean)
          for (int64_t r = 0; r < kTR; ++r) {
            T s = T(0);
            for (int64_t c = 0; c < kTC; ++c) s += g[r * kTC + c];
            grow[r0 + r] += s;
          }
      }
      if (dkt != nullptr) {  // dkT[d][c] += sum_r qt[d][r] g[r][c]
        gemm_acc<T>(d, kTC, kTR, qt + r0, qpad, 1, g, kTC, dkt + c0, kpad);
        if (code == kSqEuclidean)
          for (int64_t r = 0; r < kTR; ++r)
            for (int64_t c = 0; c < kTC; ++c) gcol[c0 + c] += g[r * kTC + c];
      }
      return;
    }
    T* dq = dqt == nullptr ? nullptr : dqt + r0;
    T* dk = dkt == nullptr ? nullptr : dkt + c0;
    const T* qa = q + r0 * d;
    const T* kb = kt + c0;
    switch (pk) {
      case kAbs: lp_grad_tile<T, kAbs>(d, qa, kb, kpad, p, g, dq, qpad, dk, kpad); break;
      case kSquare: lp_grad_tile<T, kSquare>(d, qa, kb, kpad, p, g, dq, qpad, dk, kpad); break;
      case kCube: lp_grad_tile<T, kCube>(d, qa, kb, kpad, p, g, dq, qpad, dk, kpad); break;
      default: lp_grad_tile<T, kGeneral>(d, qa, kb, kpad, p, g, dq, qpad, dk, kpad); break;
    }
  }
};

// ------------------------------------------------------------------------------------------------
// the four kernels
// ------------------------------------------------------------------------------------------------

// body(item, buf) for every item in [0, count) (a row tile, a column tile or a chunk of row
// tiles), at::parallel_for with one item per grain: every thread runs with subnormals flushed and
// its own scratch buffer of `scratch` elements (zeroed once, reused for each of its items). body
// returns the tiles it computed, added to g_tiles.
template <typename T, typename Body>
void parallel_tiles(int64_t count, int64_t scratch, Body body) {
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    const FlushSubnormals flush;
    std::vector<T> buf(scratch);
    int64_t tiles = 0;
    for (int64_t item = begin; item < end; ++item) tiles += body(item, buf.data());
    g_tiles += tiles;
  });
}

template <typename T>
std::vector<at::Tensor> rowstats_impl(const Problem<T>& P, const at::Tensor& w_t,
                                      const at::Tensor& m0_t) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::kLanes;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  auto opts = m0_t.options();
  at::Tensor m_t = at::empty({P.nq}, opts), z_t = at::zeros({P.nq}, opts);
  T* m = m_t.data_ptr<T>();
  T* z = z_t.data_ptr<T>();
  std::copy(m0_t.data_ptr<T>(), m0_t.data_ptr<T>() + P.nq, m);
  const std::vector<T> w = padded_vec<T>(w_t, P.kpad);
  const bool zero_w = any_zero(w, P.nk);
  parallel_tiles<T>(P.nrt, kTT, [&](int64_t bi, T* x) {
    const int64_t r0 = bi * kTR, nr = std::min(kTR, P.nq - r0);
    return P.tiles_of(kRowTile, bi, [&](int64_t bj) {
      P.logits(bi, bj, x);
      if (P.needs_mask(bi, bj)) P.mask(bi, bj, x, kNegInf);
      const T* wc = w.data() + bj * kTC;
      if (zero_w) fill_unweighted(x, wc, kNegInf);
      for (int64_t r = 0; r < nr; ++r) {
        const T* xr = x + r * kTC;
        V vmax = splat(kNegInf);
        for (int64_t c = 0; c < kTC; c += L) {
          const V xv = loadu(xr + c);
          vmax = xv > vmax ? xv : vmax;
        }
        T tmax = kNegInf;
        for (int l = 0; l < L; ++l) tmax = std::max(tmax, vmax[l]);
        if (tmax == kNegInf) continue;  // no negative of this row in the tile
        T& mi = m[r0 + r];
        if (tmax > mi) {  // online shift: every exponential stays <= 1
          z[r0 + r] *= std::exp(mi - tmax);
          mi = tmax;
        }
        const V mv = splat(mi);
        V acc = V{};
        for (int64_t c = 0; c < kTC; c += L) acc += vexp(loadu(xr + c) - mv) * loadu(wc + c);
        z[r0 + r] += hsum(acc);
      }
    });
  });
  return {m_t, z_t};
}

template <typename T>
at::Tensor colsum_impl(const Problem<T>& P, const at::Tensor& m_t, const at::Tensor& rho_t,
                       const at::Tensor& sigma_t) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::kLanes, NV = kTC / L;
  const std::vector<T> m = padded_vec<T>(m_t, P.qpad);
  const std::vector<T> rho = padded_vec<T>(rho_t, P.qpad);
  const std::vector<T> sigma = padded_vec<T>(sigma_t, P.qpad);
  std::vector<T> a(P.kpad, T(0));
  parallel_tiles<T>(P.nct, 2 * kTT, [&](int64_t bj, T* buf) {
    T *x = buf, *e = buf + kTT;
    V acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = V{};
    const int64_t tiles = P.tiles_of(kColTile, bj, [&](int64_t bi) {
      P.exp_tile(bi, bj, m.data(), x, e);
      const int64_t r0 = bi * kTR;
      for (int64_t r = 0; r < kTR; ++r) {
        const V rv = splat(rho[r0 + r]), sv = splat(sigma[r0 + r]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) {
          const int64_t o = r * kTC + v * L;
          acc[v] += loadu(e + o) * (rv * loadu(x + o) + sv);
        }
      }
    });
    for (int v = 0; v < NV; ++v) storeu(a.data() + bj * kTC + v * L, acc[v]);
    return tiles;
  });
  at::Tensor out = at::empty({P.nk}, m_t.options());
  std::copy(a.begin(), a.begin() + P.nk, out.data_ptr<T>());
  return out;
}

template <typename T>
at::Tensor rowsum_impl(const Problem<T>& P, const at::Tensor& w_t, const at::Tensor& m_t,
                       const at::Tensor& gamma_t) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::kLanes;
  const std::vector<T> m = padded_vec<T>(m_t, P.qpad);
  std::vector<T> wg = padded_vec<T>(w_t, P.kpad);
  const bool zero_w = any_zero(wg, P.nk);
  const T* gamma = gamma_t.data_ptr<T>();
  for (int64_t j = 0; j < P.nk; ++j) wg[j] *= gamma[j];
  const std::vector<T> w = zero_w ? padded_vec<T>(w_t, P.kpad) : std::vector<T>();
  std::vector<T> out(P.qpad, T(0));
  parallel_tiles<T>(P.nrt, 2 * kTT, [&](int64_t bi, T* buf) {
    T *x = buf, *e = buf + kTT;
    return P.tiles_of(kRowTile, bi, [&](int64_t bj) {
      P.exp_tile(bi, bj, m.data(), x, e);
      if (zero_w) fill_unweighted(e, w.data() + bj * kTC, T(0));
      const T* wc = wg.data() + bj * kTC;
      for (int64_t r = 0; r < kTR; ++r) {
        V acc = V{};
        for (int64_t c = 0; c < kTC; c += L)
          acc += loadu(e + r * kTC + c) * loadu(x + r * kTC + c) * loadu(wc + c);
        out[bi * kTR + r] += hsum(acc);
      }
    });
  });
  at::Tensor res = at::empty({P.nq}, m_t.options());
  std::copy(out.begin(), out.begin() + P.nq, res.data_ptr<T>());
  return res;
}

// The coefficient tile G of grad (see the header): G = e (alpha_r w_c + beta_r w_c gamma_c (1 + x))
// * inv_t, where e is 0 off the negatives; g holds e on entry.
template <typename T>
void coef_tile(const T* x, T* g, const T* alpha, const T* beta, const T* w, const T* wg, T inv_t) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::kLanes;
  for (int64_t r = 0; r < kTR; ++r) {
    const V av = splat(alpha[r] * inv_t);
    T* gr = g + r * kTC;
    if (beta == nullptr) {
      for (int64_t c = 0; c < kTC; c += L) storeu(gr + c, loadu(gr + c) * (av * loadu(w + c)));
    } else {
      const V bv = splat(beta[r] * inv_t);
      for (int64_t c = 0; c < kTC; c += L) {
        const V coef = av * loadu(w + c) + bv * loadu(wg + c) * (T(1) + loadu(x + r * kTC + c));
        storeu(gr + c, loadu(gr + c) * coef);
      }
    }
  }
}

template <typename T>
std::vector<at::Tensor> grad_impl(const Problem<T>& P, const at::Tensor& w_t, const at::Tensor& m_t,
                                  const at::Tensor& alpha_t, const at::Tensor& beta_t,
                                  const at::Tensor& gamma_t) {
  const bool penalty = gamma_t.numel() > 0;
  const int64_t d = P.d, qpad = P.qpad, kpad = P.kpad;
  const std::vector<T> m = padded_vec<T>(m_t, qpad);
  const std::vector<T> alpha = padded_vec<T>(alpha_t, qpad);
  const std::vector<T> beta = penalty ? padded_vec<T>(beta_t, qpad) : std::vector<T>();
  const std::vector<T> w = padded_vec<T>(w_t, kpad);
  const bool zero_w = any_zero(w, P.nk);
  std::vector<T> wg = w;
  if (penalty) {
    const T* gamma = gamma_t.data_ptr<T>();
    for (int64_t j = 0; j < P.nk; ++j) wg[j] *= gamma[j];
  }
  const bool sq = P.code == kSqEuclidean;
  auto opts = m_t.options();
  at::Tensor dqt_t = at::zeros({d, qpad}, opts), dkt_t = at::zeros({d, kpad}, opts);
  at::Tensor grow_t = at::zeros({qpad}, opts), gcol_t = at::zeros({kpad}, opts);
  T *dqt = dqt_t.data_ptr<T>(), *dkt = dkt_t.data_ptr<T>();
  T *grow = grow_t.data_ptr<T>(), *gcol = gcol_t.data_ptr<T>();

  // one tile: its coefficients, then the products into dq (row tile bi) and/or dk
  auto tile = [&](int64_t bi, int64_t bj, T* buf, T* dq_out, T* dk_out, T* gcol_out) {
    T *x = buf, *g = buf + kTT, *gt = buf + 2 * kTT;
    const int64_t r0 = bi * kTR, c0 = bj * kTC;
    P.exp_tile(bi, bj, m.data(), x, g);
    if (zero_w) fill_unweighted(g, w.data() + c0, T(0));
    coef_tile<T>(x, g, alpha.data() + r0, penalty ? beta.data() + r0 : nullptr, w.data() + c0,
                 wg.data() + c0, P.inv_t);
    P.grads(bi, bj, g, gt, dq_out, grow, dk_out, gcol_out);
  };

  // per chunk: dk^T (d rows) and, for the squared distance, the column sums of G (one row)
  const int64_t rows_per_part = d + (sq ? 1 : 0);
  const int64_t nch =
      std::min<int64_t>(P.nrt, std::max<int64_t>(kMinChunks, at::get_num_threads()));
  const bool one_pass = nch * rows_per_part * kpad * int64_t(sizeof(T)) <= partial_budget();
  if (one_pass) {
    // chunk ch: row tiles [ch nrt / nch, (ch + 1) nrt / nch), its own dk (and column-sum) partial
    at::Tensor parts_t = at::zeros({nch, rows_per_part, kpad}, opts);
    T* parts = parts_t.data_ptr<T>();
    parallel_tiles<T>(nch, 3 * kTT, [&](int64_t ch, T* buf) {
      T* part = parts + ch * rows_per_part * kpad;
      int64_t tiles = 0;
      for (int64_t bi = ch * P.nrt / nch; bi < (ch + 1) * P.nrt / nch; ++bi)
        tiles += P.tiles_of(kRowTile, bi, [&](int64_t bj) {
          tile(bi, bj, buf, dqt, part, sq ? part + d * kpad : nullptr);
        });
      return tiles;
    });
    // the chunk partials, summed in chunk order
    at::parallel_for(0, rows_per_part * kpad, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T s = T(0);
        for (int64_t ch = 0; ch < nch; ++ch) s += parts[ch * rows_per_part * kpad + i];
        if (i < d * kpad)
          dkt[i] = s;
        else
          gcol[i - d * kpad] = s;
      }
    });
  } else {
    parallel_tiles<T>(P.nrt, 3 * kTT, [&](int64_t bi, T* buf) {  // dq: row tiles
      return P.tiles_of(kRowTile, bi,
                        [&](int64_t bj) { tile(bi, bj, buf, dqt, nullptr, nullptr); });
    });
    parallel_tiles<T>(P.nct, 3 * kTT, [&](int64_t bj, T* buf) {  // dk: column tiles
      return P.tiles_of(kColTile, bj, [&](int64_t bi) { tile(bi, bj, buf, nullptr, dkt, gcol); });
    });
  }
  at::Tensor dq = dqt_t.narrow(1, 0, P.nq).t().contiguous();
  at::Tensor dk = dkt_t.narrow(1, 0, P.nk).t().contiguous();
  if (sq) {  // d(-|q - k|^2)/dq = 2 (k - q): 2 (G k - rowsum(G) q), and likewise for k
    dq = 2 * (dq - grow_t.narrow(0, 0, P.nq).unsqueeze(1) * P.qp_t.narrow(0, 0, P.nq));
    dk = 2 * (dk - gcol_t.narrow(0, 0, P.nk).unsqueeze(1) * P.kp_t.narrow(0, 0, P.nk));
  }
  return {dq, dk};
}

// ------------------------------------------------------------------------------------------------
// entry points
// ------------------------------------------------------------------------------------------------

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, int64_t code,
                  double p, const at::Tensor& qg, const at::Tensor& kg, const at::Tensor& ex,
                  const std::vector<std::pair<const char*, const at::Tensor*>>& rows,
                  const std::vector<std::pair<const char*, const at::Tensor*>>& cols) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), op, ": tensors must be on the CPU");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
              ": computes in float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.size(1) == k.size(1) && q.size(0) > 0 &&
                  k.size(0) > 0 && q.size(1) > 0,
              op, ": q (Q, D) and k (K, D) must be non-empty with the same D");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && q.is_contiguous() && k.is_contiguous(), op,
              ": q and k must be contiguous and of one dtype");
  TORCH_CHECK(code >= kDot && code <= kLp, op, ": unknown similarity code ", code);
  TORCH_CHECK(code != kLp || p >= 1.0, op, ": lp needs p >= 1, got ", p);
  TORCH_CHECK((qg.numel() == 0) == (kg.numel() == 0), op, ": give both groups or neither");
  if (qg.numel() > 0)
    TORCH_CHECK(qg.scalar_type() == at::kLong && kg.scalar_type() == at::kLong &&
                    qg.is_contiguous() && kg.is_contiguous() && qg.numel() == q.size(0) &&
                    kg.numel() == k.size(0),
                op, ": groups must be contiguous int64 (Q,) and (K,)");
  if (ex.numel() > 0)
    TORCH_CHECK(ex.scalar_type() == at::kLong && ex.is_contiguous() && ex.dim() == 2 &&
                    ex.size(0) == q.size(0),
                op, ": exclude must be a contiguous int64 (Q, E) tensor");
  for (const auto& [name, t] : rows)
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->is_contiguous() &&
                    t->numel() == q.size(0),
                op, ": ", name, " must be a contiguous (Q,) tensor of q's dtype");
  for (const auto& [name, t] : cols)
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->is_contiguous() &&
                    t->numel() == k.size(0),
                op, ": ", name, " must be a contiguous (K,) tensor of q's dtype");
}

std::vector<at::Tensor> masked_rowstats(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& w, int64_t code, double p,
                                        double inv_t, const at::Tensor& qg, const at::Tensor& kg,
                                        const at::Tensor& ex, const at::Tensor& m0) {
  check_inputs("masked_rowstats", q, k, code, p, qg, kg, ex, {{"m0", &m0}}, {{"w", &w}});
  return AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_rowstats", [&] {
    const Problem<scalar_t> P(q, k, code, p, inv_t, qg, kg, ex);
    return rowstats_impl<scalar_t>(P, w, m0);
  });
}

at::Tensor masked_colsum(const at::Tensor& q, const at::Tensor& k, int64_t code, double p,
                         double inv_t, const at::Tensor& qg, const at::Tensor& kg,
                         const at::Tensor& ex, const at::Tensor& m, const at::Tensor& rho,
                         const at::Tensor& sigma) {
  check_inputs("masked_colsum", q, k, code, p, qg, kg, ex,
               {{"m", &m}, {"rho", &rho}, {"sigma", &sigma}}, {});
  return AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_colsum", [&] {
    const Problem<scalar_t> P(q, k, code, p, inv_t, qg, kg, ex);
    return colsum_impl<scalar_t>(P, m, rho, sigma);
  });
}

at::Tensor masked_rowsum(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                         int64_t code, double p, double inv_t, const at::Tensor& qg,
                         const at::Tensor& kg, const at::Tensor& ex, const at::Tensor& m,
                         const at::Tensor& gamma) {
  check_inputs("masked_rowsum", q, k, code, p, qg, kg, ex, {{"m", &m}},
               {{"w", &w}, {"gamma", &gamma}});
  return AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_rowsum", [&] {
    const Problem<scalar_t> P(q, k, code, p, inv_t, qg, kg, ex);
    return rowsum_impl<scalar_t>(P, w, m, gamma);
  });
}

std::vector<at::Tensor> masked_grad(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                                    int64_t code, double p, double inv_t, const at::Tensor& qg,
                                    const at::Tensor& kg, const at::Tensor& ex,
                                    const at::Tensor& m, const at::Tensor& alpha,
                                    const at::Tensor& beta, const at::Tensor& gamma) {
  const bool penalty = gamma.numel() > 0;
  std::vector<std::pair<const char*, const at::Tensor*>> rows = {{"m", &m}, {"alpha", &alpha}};
  std::vector<std::pair<const char*, const at::Tensor*>> cols = {{"w", &w}};
  if (penalty) {
    rows.push_back({"beta", &beta});
    cols.push_back({"gamma", &gamma});
  }
  check_inputs("masked_grad", q, k, code, p, qg, kg, ex, rows, cols);
  return AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_grad", [&] {
    const Problem<scalar_t> P(q, k, code, p, inv_t, qg, kg, ex);
    return grad_impl<scalar_t>(P, w, m, alpha, beta, gamma);
  });
}

int64_t masked_tiles_computed() { return g_tiles.load(); }

}  // namespace

// Ops of the kernel set "cpu" of masked_contrastive_loss (fastipirm/ops/masked_cpu.py). Empty
// tensors stand for None: qg/kg (no groups), exclude (no excluded column), beta/gamma of
// masked_grad (no penalty term).
TORCH_LIBRARY_FRAGMENT(fastipirm_ext, m) {
  m.def("masked_rowstats(Tensor q, Tensor k, Tensor w, int code, float p, float inv_t, "
        "Tensor qg, Tensor kg, Tensor exclude, Tensor m0) -> Tensor[]");
  m.def("masked_colsum(Tensor q, Tensor k, int code, float p, float inv_t, Tensor qg, "
        "Tensor kg, Tensor exclude, Tensor m, Tensor rho, Tensor sigma) -> Tensor");
  m.def("masked_rowsum(Tensor q, Tensor k, Tensor w, int code, float p, float inv_t, "
        "Tensor qg, Tensor kg, Tensor exclude, Tensor m, Tensor gamma) -> Tensor");
  m.def("masked_grad(Tensor q, Tensor k, Tensor w, int code, float p, float inv_t, Tensor qg, "
        "Tensor kg, Tensor exclude, Tensor m, Tensor alpha, Tensor beta, Tensor gamma) "
        "-> Tensor[]");
  // tiles computed by the masked kernels since load (a counter for tests of tile skipping)
  m.def("masked_tiles_computed() -> int", &masked_tiles_computed);
}

TORCH_LIBRARY_IMPL(fastipirm_ext, CPU, m) {
  m.impl("masked_rowstats", &masked_rowstats);
  m.impl("masked_colsum", &masked_colsum);
  m.impl("masked_rowsum", &masked_rowsum);
  m.impl("masked_grad", &masked_grad);
}
