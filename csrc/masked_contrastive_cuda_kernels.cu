// fastipirm CUDA kernels of masked_contrastive_loss (kernel set "cuda").
//
// The four kernels of the contract in fastipirm/ops/masked_glue.py, computing what the blocked
// torch kernel set (fastipirm/ops/masked_torch.py) computes; read the glue's docstring for the
// math. No torch headers: `nvcc -c` compiles this file alone; the torch bindings are in
// masked_contrastive_cuda.cpp.
//
// Structure
// ---------
// * Every kernel is one of two templates over an *own* side (a block of kB = 64 rows whose
//   results the block writes) and a *stream* side (tiles of kB rows the block loops over):
//   - masked_reduce_kernel: rowstats and rowsum (own = queries, stream = keys) and colsum
//     (own = keys, stream = queries): one float per own row;
//   - masked_grad_kernel: dq (own = queries) and dk (own = keys): a window of kDW = 128 feature
//     columns per launch; the similarity is symmetric (dot, distances), so both passes share the
//     tile code and the gradient formula: dot: sum_s G_os f_s; squared distance:
//     2 (sum_s G_os f_s - (sum_s G_os) f_o); l1 / lp: -sum_s G_os slope(f_o - f_s) with slope the
//     derivative of |.|^p. G (the glue's G_ij, times 1 / T) is formed in place of the logits.
//   No atomics: a block owns its output rows. When the own side has few blocks the stream side is
//   split over `splits` blocks per own block (aiming at target_blocks in all; a contiguous range
//   of tiles each), which write partial results to the workspace, merged by a second kernel in
//   split order (rowstats: an online-max merge). Deterministic for a given target_blocks.
// * 256 threads. The similarity tile St[s * kLds + o] = s(own_o, stream_s) (fp32, own index
//   contiguous) is computed over chunks of kKC = 32 feature columns staged in shared memory
//   transposed (At[k][o], Bt[k][s]) by sim_tile (cuda_common.cuh, shared with the env kernels):
//   - float16 / bfloat16 features (dot, squared distance): nvcuda::wmma m16n16k16 tensor-core
//     tiles, fp32 accumulation; float32 with allow_tf32: m16n16k8 precision::tf32 (operands
//     rounded with __float_to_tf32); the squared distance as |a|^2 + |b|^2 - 2 a.b clamped at 0,
//     the norms summed in fp32 from the staged chunks;
//   - float32 otherwise: exact fp32 FMAs, thread (ty, tx) = (tid / 16, tid % 16) owning
//     St[tx + 16 j][ty + 16 i]; the distances elementwise (d = a - b: d*d, |d|, |d|^p as
//     exp2f(p log2f|d|)), no cancellation.
// * epilogues (masks, shifts, exponentials): thread (o, part) = (tid % 64, tid / 64) visits the
//   16 stream rows part * 16 .. part * 16 + 15 of own row o (conflict-free reads of St), keeps
//   its partial sum in a register across tiles; the four parts are added in a fixed order at the
//   end. The gradient product (fp32 FMAs from shared memory: G times the stream features window
//   or, for l1 / lp, the slope of each feature difference) uses thread (ty, tx) owning own rows
//   ty + 16 i and feature columns tx + 16 j, visiting only the 16-column groups that hold
//   columns of the window (D = 10: one group, not eight).
// * masks: the exclusion bits of a tile (one 64-bit row per query of the tile; set for the
//   excluded columns, the keys past nk and every column of a query past nq) and the groups of
//   its queries and keys are loaded once per tile. A tile whose query and key group ranges
//   [min, max] cannot meet is skipped before its similarity is computed: the ranges per 64-row
//   chunk of queries and keys are computed once per launch by a small kernel (block-uniform
//   test).
// * exponentials: e^{x - m} = exp2f(s * (log2 e / T) - m log2 e) (one FMA on pre-scaled
//   arguments, m pre-scaled once per row and tile); the logits x = s / T are formed only where
//   needed (row max, x factors). With m at least every logit of the row the arguments are <= 0
//   up to rounding: finite for any temperature (tau = 0.005 and distances of order one give
//   arguments of a few hundred, which underflow cleanly to 0).
//
// Shared memory per block (bytes): stage 17408 (fp32) / 9216 (16-bit) / gradient stream window
// 32768 (aliased with the stage), St 17408, vectors and masks 4352 -> reduce 39168 (fp32) /
// 30976 (16-bit), grad 54528: below the 99 KB opt-in limit of sm_86/89, sm_80's 163 KB and
// sm_90's 227 KB (grad needs the opt-in above 48 KB: allow_smem).
#include "masked_contrastive_cuda.h"

#include "cuda_common.cuh"

namespace fastipirm_cuda {
namespace {

using namespace kernel_common;  // kThreads (256), kKC (32), Feat, Carve, sim_tile, dispatch_feat

static_assert(kMaskedF32 == kCodeF32 && kMaskedF16 == kCodeF16 && kMaskedBF16 == kCodeBF16,
              "MaskedFeat codes are the kCode* of dispatch_feat");

constexpr int kB = 64;                 // rows of an own block = rows of a stream tile
constexpr int kLds = kB + 4;           // row stride of St (floats; a multiple of 4 for wmma)
constexpr int kParts = kThreads / kB;  // threads per own row in the epilogues
constexpr int kSeg = kB / kParts;      // stream rows per thread in the epilogues
constexpr int kDW = 128;               // gradient feature columns per launch
constexpr int kRM = kB / 16;           // own rows per thread in the micro tiles
constexpr int kRD = kDW / 16;          // gradient columns per thread
constexpr int kMaxSplits = 64;         // splits of the stream side per own block
constexpr float kLog2e = 1.4426950408889634f;

enum Mode : int { kRowstatsMode = 0, kRowsumMode = 1, kColsumMode = 2 };

struct Smem { size_t stage, st, an, bn, red, qm, qa, qb, kw, kgm, gq, gk, xb, total; };
template <typename T>
__host__ __device__ Smem smem_layout(bool grad) {
  Carve c;
  Smem s;
  s.stage = c.take(max_size(stage_bytes<T, kB, kB>(), grad ? sizeof(float) * kB * kDW : 0));
  s.st = c.take(tile_bytes(kB, kB));
  s.an = c.take(sizeof(float) * kB);
  s.bn = c.take(sizeof(float) * kB);
  s.red = c.take(sizeof(float) * kParts * kB);
  s.qm = c.take(sizeof(float) * kB);
  s.qa = c.take(sizeof(float) * kB);
  s.qb = c.take(sizeof(float) * kB);
  s.kw = c.take(sizeof(float) * kB);
  s.kgm = c.take(sizeof(float) * kB);
  s.gq = c.take(sizeof(int64_t) * kB);
  s.gk = c.take(sizeof(int64_t) * kB);
  s.xb = c.take(sizeof(uint32_t) * 2 * kB);
  s.total = c.off;
  return s;
}

// One launch's view. own / str: the features of the own side (rows of the block) and of the
// streamed side; the query-side vectors (qm, qa, qb; query groups gq) and the key-side ones
// (kw, kgam; key groups gk) are indexed by query / key whatever the orientation.
struct Params {
  const void* own;
  const void* str;
  int n_own, n_str, d;
  int code;
  float p, inv_t, sc;               // sc = inv_t * log2(e)
  const int64_t* gq;                // query groups (null: none)
  const int64_t* gk;                // key groups
  const int64_t* rng_own;           // (min, max) group per 64-row chunk of the own side
  const int64_t* rng_str;           // ... of the streamed side
  const int64_t* excl;              // (nq, ne) excluded key columns
  int ne;
  const float* qm;                  // query shifts m (rowstats: m0)
  const float* qa;                  // colsum: rho; grad: alpha
  const float* qb;                  // colsum: sigma; grad: beta (null without gamma)
  const float* kw;                  // key weights (rowstats, rowsum, grad)
  const float* kgam;                // key gamma (rowsum, grad; null: none)
  float* out;                       // the result (rowstats: m), or the split partials
  float* out2;                      // rowstats: z
  size_t out_split;                 // elements between the partials of consecutive splits
  int n_own_blocks, split_tiles;
  int d_lo, d_cnt;                  // grad: the feature columns of this launch
};

struct TileSmem {
  float* qm;
  float* qa;
  float* qb;
  float* kw;
  float* kgm;
  int64_t* gq;
  int64_t* gk;
  uint32_t* xb;
};

__device__ __forceinline__ TileSmem tile_smem(unsigned char* smem, const Smem& L) {
  TileSmem S;
  S.qm = reinterpret_cast<float*>(smem + L.qm);
  S.qa = reinterpret_cast<float*>(smem + L.qa);
  S.qb = reinterpret_cast<float*>(smem + L.qb);
  S.kw = reinterpret_cast<float*>(smem + L.kw);
  S.kgm = reinterpret_cast<float*>(smem + L.kgm);
  S.gq = reinterpret_cast<int64_t*>(smem + L.gq);
  S.gk = reinterpret_cast<int64_t*>(smem + L.gk);
  S.xb = reinterpret_cast<uint32_t*>(smem + L.xb);
  return S;
}

// ------------------------------------------------------------------------------------------------
// device helpers
// ------------------------------------------------------------------------------------------------

// The per-tile vectors of the queries q0 .. q0 + kB - 1 and keys k0 .. k0 + kB - 1 into shared
// memory (threads 0 .. 2 kB - 1; the caller synchronises): query shifts pre-scaled by log2(e)
// (load_m), qa / qb, key weights (times gamma: kw_gamma) and gamma, the groups, and the
// exclusion bits xb[r], xb[kB + r] of query r (bit c of word c / 32: column k0 + c is not a
// negative of it: excluded, past nk, or r itself past nq; word-major, so that the 32 queries of a
// warp read 32 banks).
__device__ __forceinline__ void load_tile(const Params& P, const TileSmem& S, int q0, int k0,
                                          int nq, int nk, bool load_m, bool kw_gamma) {
  const int tid = threadIdx.x;
  if (tid < kB) {
    const int i = q0 + tid;
    const bool ok = i < nq;
    if (load_m) S.qm[tid] = ok ? P.qm[i] * kLog2e : 0.f;
    if (P.qa) S.qa[tid] = ok ? P.qa[i] : 0.f;
    if (P.qb) S.qb[tid] = ok ? P.qb[i] : 0.f;
    if (P.gq) S.gq[tid] = ok ? P.gq[i] : 0;
    uint32_t w0 = ~0u, w1 = ~0u;
    if (ok) {
      const int valid = nk - k0;  // >= 1 columns of the tile exist
      w0 = valid >= 32 ? 0u : (~0u << valid);
      w1 = valid >= 64 ? 0u : (valid <= 32 ? ~0u : (~0u << (valid - 32)));
      if (P.excl) {
        const int64_t* ex = P.excl + (size_t)i * P.ne;
        for (int e = 0; e < P.ne; ++e) {
          const int64_t c = ex[e] - (int64_t)k0;
          if (c >= 0 && c < 32) {
            w0 |= 1u << (int)c;
          } else if (c >= 32 && c < kB) {
            w1 |= 1u << (int)(c - 32);
          }
        }
      }
    }
    S.xb[tid] = w0;
    S.xb[kB + tid] = w1;
  } else if (tid < 2 * kB) {
    const int c = tid - kB, j = k0 + c;
    const bool ok = j < nk;
    if (P.kw) S.kw[c] = ok ? (kw_gamma ? P.kw[j] * P.kgam[j] : P.kw[j]) : 0.f;
    if (P.kgam && !kw_gamma) S.kgm[c] = ok ? P.kgam[j] : 0.f;
    if (P.gk) S.gk[c] = ok ? P.gk[j] : 0;
  }
}

// (query qi, key kj) of the tile is a negative pair
__device__ __forceinline__ bool is_neg(const TileSmem& S, bool grouped, int qi, int kj) {
  return !((S.xb[(kj >> 5) * kB + qi] >> (kj & 31)) & 1u) && (!grouped || S.gq[qi] == S.gk[kj]);
}

// the group ranges of own block ob and stream tile t cannot meet (block-uniform)
__device__ __forceinline__ bool tile_skipped(const Params& P, int ob, int t) {
  if (!P.gq) return false;
  const int64_t olo = P.rng_own[2 * ob], ohi = P.rng_own[2 * ob + 1];
  const int64_t slo = P.rng_str[2 * t], shi = P.rng_str[2 * t + 1];
  return ohi < slo || shi < olo;
}

// ------------------------------------------------------------------------------------------------
// kernels
// ------------------------------------------------------------------------------------------------

// One float per own row. rowstats (own = queries): online max m (started at m0) over the
// negatives of non-zero weight and z = sum_j w_j e^{x - m}, rescaled at each tile; out = m,
// out2 = z. rowsum (own = queries): sum_j (w_j gamma_j) e^{x - m} x. colsum (own = keys):
// sum_i e^{x - m_i} (rho_i x + sigma_i). Split s of own block ob: stream tiles s * split_tiles
// onwards.
template <typename T, bool TF32, int MODE>
__global__ void __launch_bounds__(kThreads, 2)
masked_reduce_kernel(const Params P) {
  constexpr bool TRANS = MODE == kColsumMode;
  extern __shared__ __align__(128) unsigned char smem[];
  const Smem L = smem_layout<T>(false);
  float* St = reinterpret_cast<float*>(smem + L.st);
  float* an = reinterpret_cast<float*>(smem + L.an);
  float* bn = reinterpret_cast<float*>(smem + L.bn);
  float* red = reinterpret_cast<float*>(smem + L.red);
  const TileSmem S = tile_smem(smem, L);
  const int tid = threadIdx.x, o = tid % kB, part = tid / kB;
  const int ob = blockIdx.x % P.n_own_blocks, split = blockIdx.x / P.n_own_blocks;
  const int o0 = ob * kB;
  const int n_tiles = cdiv(P.n_str, kB);
  const int t_lo = split * P.split_tiles, t_hi = imin(n_tiles, t_lo + P.split_tiles);
  const int nq = TRANS ? P.n_str : P.n_own, nk = TRANS ? P.n_own : P.n_str;
  const bool grouped = P.gq != nullptr;
  float m_run = -INFINITY;  // rowstats: the running row max (the same in the row's 4 threads)
  if (MODE == kRowstatsMode && o0 + o < P.n_own) m_run = P.qm[o0 + o];
  float acc = 0.f;
  for (int t = t_lo; t < t_hi; ++t) {
    if (tile_skipped(P, ob, t)) continue;
    const int s0 = t * kB;
    sim_tile<T, TF32, kB, kB, true>(static_cast<const T*>(P.own), P.n_own,
                                    static_cast<const T*>(P.str), P.n_str, P.d, o0, s0, P.code,
                                    P.p, smem + L.stage, St, an, bn);
    load_tile(P, S, TRANS ? s0 : o0, TRANS ? o0 : s0, nq, nk, MODE != kRowstatsMode,
              MODE == kRowsumMode);
    __syncthreads();
    if constexpr (MODE == kRowstatsMode) {
      float mx = -INFINITY;
#pragma unroll 4
      for (int ss = 0; ss < kSeg; ++ss) {
        const int s = part * kSeg + ss;
        if (is_neg(S, grouped, o, s) && S.kw[s] > 0.f)  // zero weight: no shift
          mx = fmaxf(mx, St[s * kLds + o] * P.inv_t);
      }
      red[part * kB + o] = mx;
      __syncthreads();
      const float m_new = fmaxf(fmaxf(m_run, fmaxf(red[o], red[kB + o])),
                                fmaxf(red[2 * kB + o], red[3 * kB + o]));
      if (m_new > m_run) {
        acc *= exp2f((m_run - m_new) * kLog2e);
        m_run = m_new;
      }
      const float ms = m_run * kLog2e;
#pragma unroll 4
      for (int ss = 0; ss < kSeg; ++ss) {
        const int s = part * kSeg + ss;
        if (is_neg(S, grouped, o, s) && S.kw[s] > 0.f)  // (its exponential may overflow)
          acc = fmaf(S.kw[s], exp2f(fmaf(St[s * kLds + o], P.sc, -ms)), acc);
      }
    } else if constexpr (MODE == kRowsumMode) {
      const float ms = S.qm[o];
#pragma unroll 4
      for (int ss = 0; ss < kSeg; ++ss) {
        const int s = part * kSeg + ss;
        if (is_neg(S, grouped, o, s) && S.kw[s] != 0.f) {  // (S.kw = w gamma here)
          const float v = St[s * kLds + o];
          acc = fmaf(S.kw[s] * exp2f(fmaf(v, P.sc, -ms)), v * P.inv_t, acc);
        }
      }
    } else {
#pragma unroll 4
      for (int ss = 0; ss < kSeg; ++ss) {
        const int s = part * kSeg + ss;
        if (is_neg(S, grouped, s, o)) {
          const float v = St[s * kLds + o];
          const float e = exp2f(fmaf(v, P.sc, -S.qm[s]));
          acc = fmaf(e, fmaf(S.qa[s], v * P.inv_t, S.qb[s]), acc);
        }
      }
    }
  }
  __syncthreads();  // every reader of red is done
  red[part * kB + o] = acc;
  __syncthreads();
  if (tid < kB && o0 + tid < P.n_own) {
    const float tot = ((red[tid] + red[kB + tid]) + red[2 * kB + tid]) + red[3 * kB + tid];
    const size_t at = (size_t)split * P.out_split + o0 + tid;
    if (MODE == kRowstatsMode) {
      P.out[at] = m_run;
      P.out2[at] = tot;
    } else {
      P.out[at] = tot;
    }
  }
}

// gradient products for the column groups j < jn: acc[i][j] += sum_s G[s][ty + 16 i] h, with
// h = SF[s][tx + 16 j] (C = 0: dot / squared distance) or the slope of |.|^p at of[i][j] -
// SF[s][tx + 16 j] (C = 2: l1, sign; C = 3: lp)
template <int C>
__device__ __forceinline__ void grad_acc(float (&acc)[kRM][kRD], const float (&of)[kRM][kRD],
                                         const float* __restrict__ G,
                                         const float* __restrict__ SF, int ns, int jn, int ty,
                                         int tx, float p) {
  for (int s = 0; s < ns; ++s) {
    float g[kRM];
#pragma unroll
    for (int i = 0; i < kRM; ++i) g[i] = G[s * kLds + ty + 16 * i];
#pragma unroll
    for (int j = 0; j < kRD; ++j) {
      if (j >= jn) break;  // block-uniform: the window's 16-column groups
      const float b = SF[s * kDW + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kRM; ++i) {
        if constexpr (C == 0) {
          acc[i][j] = fmaf(g[i], b, acc[i][j]);
        } else {
          const float dl = of[i][j] - b;
          if constexpr (C == 2) {
            acc[i][j] += dl > 0.f ? g[i] : (dl < 0.f ? -g[i] : 0.f);
          } else {
            const float sl = dl != 0.f ? p * exp2f((p - 1.f) * log2f(fabsf(dl))) : 0.f;
            acc[i][j] = fmaf(g[i], copysignf(sl, dl), acc[i][j]);
          }
        }
      }
    }
  }
}

// Gradient pass: dq (own = queries, TRANS false) or dk (own = keys, TRANS true), feature columns
// d_lo .. d_lo + d_cnt - 1. G_os = w e^{x - m} (alpha + beta gamma (1 + x)) / T on the
// negatives (0 elsewhere), formed in place of the tile's similarity; then (stream window SF:
// the stream features' columns in fp32)
//   dot:  out_o = sum_s G_os f_s
//   sq:   out_o = 2 (sum_s G_os f_s - (sum_s G_os) f_o)
//   l1/lp: out_o = -sum_s G_os slope(f_o - f_s)
template <typename T, bool TF32, bool TRANS>
__global__ void __launch_bounds__(kThreads, 1)
masked_grad_kernel(const Params P) {
  constexpr bool kFma = !(Feat<T>::half || TF32);
  extern __shared__ __align__(128) unsigned char smem[];
  const Smem L = smem_layout<T>(true);
  float* St = reinterpret_cast<float*>(smem + L.st);
  float* an = reinterpret_cast<float*>(smem + L.an);
  float* bn = reinterpret_cast<float*>(smem + L.bn);
  float* red = reinterpret_cast<float*>(smem + L.red);
  float* SF = reinterpret_cast<float*>(smem + L.stage);  // aliases the staging area
  const TileSmem S = tile_smem(smem, L);
  const int tid = threadIdx.x, o = tid % kB, part = tid / kB, ty = tid / 16, tx = tid % 16;
  const int ob = blockIdx.x % P.n_own_blocks, split = blockIdx.x / P.n_own_blocks;
  const int o0 = ob * kB;
  const int n_tiles = cdiv(P.n_str, kB);
  const int t_lo = split * P.split_tiles, t_hi = imin(n_tiles, t_lo + P.split_tiles);
  const int nq = TRANS ? P.n_str : P.n_own, nk = TRANS ? P.n_own : P.n_str;
  const bool grouped = P.gq != nullptr, has_gamma = P.kgam != nullptr;
  const int code = P.code, D = P.d, jn = cdiv(P.d_cnt, 16);
  const T* own = static_cast<const T*>(P.own);
  const T* str = static_cast<const T*>(P.str);
  float acc[kRM][kRD];
#pragma unroll
  for (int i = 0; i < kRM; ++i) {
#pragma unroll
    for (int j = 0; j < kRD; ++j) acc[i][j] = 0.f;
  }
  float of[kRM][kRD];  // l1 / lp: the own features of the thread's outputs
#pragma unroll
  for (int i = 0; i < kRM; ++i) {
#pragma unroll
    for (int j = 0; j < kRD; ++j) {
      const int r = o0 + ty + 16 * i, dd = tx + 16 * j;
      of[i][j] = (kFma && code >= 2 && r < P.n_own && dd < P.d_cnt)
                     ? Feat<T>::to_float(own[(size_t)r * D + P.d_lo + dd]) : 0.f;
    }
  }
  float gs = 0.f;  // sum of G over the thread's (o, part) elements
  for (int t = t_lo; t < t_hi; ++t) {
    if (tile_skipped(P, ob, t)) continue;
    const int s0 = t * kB;
    sim_tile<T, TF32, kB, kB, true>(own, P.n_own, str, P.n_str, D, o0, s0, code, P.p,
                                    smem + L.stage, St, an, bn);
    load_tile(P, S, TRANS ? s0 : o0, TRANS ? o0 : s0, nq, nk, true, false);
    __syncthreads();
#pragma unroll 4
    for (int ss = 0; ss < kSeg; ++ss) {  // G in place (one thread reads and writes an element)
      const int s = part * kSeg + ss;
      const int qi = TRANS ? s : o, kj = TRANS ? o : s;
      float g = 0.f;
      if (is_neg(S, grouped, qi, kj) && S.kw[kj] > 0.f) {  // zero weight: G = 0 (no 0 * inf)
        const float v = St[s * kLds + o];
        const float e = exp2f(fmaf(v, P.sc, -S.qm[qi]));
        float coef = S.qa[qi];
        if (has_gamma) coef = fmaf(S.qb[qi] * S.kgm[kj], fmaf(v, P.inv_t, 1.f), coef);
        g = S.kw[kj] * e * coef * P.inv_t;
      }
      St[s * kLds + o] = g;
      gs += g;
    }
    // the stream window in fp32 (the staging area is free: s_tile ended with a barrier), its
    // 16-column groups that hold the window's columns
    for (int e = tid; e < kB * 16 * jn; e += kThreads) {
      const int s = e / (16 * jn), dd = e - s * (16 * jn), r = s0 + s;
      SF[s * kDW + dd] = (r < P.n_str && dd < P.d_cnt)
                             ? Feat<T>::to_float(str[(size_t)r * D + P.d_lo + dd]) : 0.f;
    }
    __syncthreads();
    const int ns = imin(kB, P.n_str - s0);
    if (code <= 1) {
      grad_acc<0>(acc, of, St, SF, ns, jn, ty, tx, P.p);
    } else if constexpr (kFma) {
      if (code == 2) {
        grad_acc<2>(acc, of, St, SF, ns, jn, ty, tx, P.p);
      } else {
        grad_acc<3>(acc, of, St, SF, ns, jn, ty, tx, P.p);
      }
    }
  }
  if (code == 1) {  // the row sums of G
    __syncthreads();
    red[part * kB + o] = gs;
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kRM; ++i) {
    const int r = ty + 16 * i;
    float tot = 0.f;
    if (code == 1) tot = ((red[r] + red[kB + r]) + red[2 * kB + r]) + red[3 * kB + r];
#pragma unroll
    for (int j = 0; j < kRD; ++j) {
      const int dd = tx + 16 * j;
      if (o0 + r < P.n_own && dd < P.d_cnt) {
        const size_t idx = (size_t)(o0 + r) * D + P.d_lo + dd;
        float v = acc[i][j];
        if (code == 1) {
          v = 2.f * (v - tot * Feat<T>::to_float(own[idx]));
        } else if (code >= 2) {
          v = -v;
        }
        P.out[(size_t)split * P.out_split + idx] = v;
      }
    }
  }
}

// (min, max) group id of each 64-row chunk of the queries (rq) and of the keys (rk)
__global__ void __launch_bounds__(kThreads)
masked_group_ranges_kernel(const int64_t* __restrict__ qg, int nq, const int64_t* __restrict__ kg,
                           int nk, int64_t* __restrict__ rq, int64_t* __restrict__ rk) {
  const int c = blockIdx.x * kThreads + threadIdx.x;
  const int nqc = cdiv(nq, kB), nkc = cdiv(nk, kB);
  if (c < nqc + nkc) {
    const bool isq = c < nqc;
    const int64_t* g = isq ? qg : kg;
    const int n = isq ? nq : nk, cc = isq ? c : c - nqc;
    int64_t lo = g[cc * kB], hi = lo;
    for (int i = cc * kB + 1; i < imin(n, cc * kB + kB); ++i) {
      const int64_t v = g[i];
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    int64_t* r = isq ? rq : rk;
    r[2 * cc] = lo;
    r[2 * cc + 1] = hi;
  }
}

// out[i] = sum over the splits (in order) of parts[s * n + i]
__global__ void __launch_bounds__(kThreads)
masked_combine_sum_kernel(const float* __restrict__ parts, int splits, size_t n, size_t stride,
                          float* __restrict__ out) {
  for (size_t i = (size_t)blockIdx.x * kThreads + threadIdx.x; i < n; i += stride) {
    float t = parts[i];
    for (int s = 1; s < splits; ++s) t += parts[(size_t)s * n + i];
    out[i] = t;
  }
}

// rowstats over the splits: m = max_s m_s, z = sum_s z_s e^{m_s - m}
__global__ void __launch_bounds__(kThreads)
masked_combine_rowstats_kernel(const float* __restrict__ pm, const float* __restrict__ pz,
                               int splits, int n, float* __restrict__ m, float* __restrict__ z) {
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i < n) {
    float mx = pm[i];
    for (int s = 1; s < splits; ++s) mx = fmaxf(mx, pm[(size_t)s * n + i]);
    float tot = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float ms = pm[(size_t)s * n + i];
      if (ms > -INFINITY) tot = fmaf(pz[(size_t)s * n + i], exp2f((ms - mx) * kLog2e), tot);
    }
    m[i] = mx;
    z[i] = tot;
  }
}

// ------------------------------------------------------------------------------------------------
// launchers
// ------------------------------------------------------------------------------------------------

// the kernel variant of a problem: float16 / bfloat16 (tensor cores), float32 with TF32 tensor
// cores, float32 FMAs (every similarity; the only variant of l1 / lp)
template <typename Fn>
cudaError_t dispatch(const MaskedProblem& pr, Fn&& fn) {
  if (pr.code >= 2) return pr.feat_type == kMaskedF32 ? fn(Tag<float, false>())
                                                      : cudaErrorInvalidValue;
  return dispatch_feat(pr.feat_type, pr.allow_tf32, cudaErrorInvalidValue, fn);
}

// own blocks x splits of the stream tiles (contiguous ranges of split_tiles tiles)
struct Plan { int own_blocks, tiles, split_tiles, splits; };
Plan make_plan(int n_own, int n_str, int target_blocks) {
  Plan p;
  p.own_blocks = cdiv(n_own, kB);
  p.tiles = cdiv(n_str, kB);
  const int want = imin(imin(cdiv(imax(target_blocks, 1), p.own_blocks), p.tiles), kMaxSplits);
  p.split_tiles = cdiv(p.tiles, imax(want, 1));
  p.splits = cdiv(p.tiles, p.split_tiles);
  return p;
}

size_t align256(size_t x) { return (x + 255) / 256 * 256; }

size_t range_bytes(const MaskedProblem& pr) {
  return pr.qg ? align256(sizeof(int64_t) * 2 * ((size_t)cdiv(pr.nq, kB) + cdiv(pr.nk, kB))) : 0;
}

size_t partial_floats(const MaskedProblem& pr, int op) {
  const Plan rows = make_plan(pr.nq, pr.nk, pr.target_blocks);
  const Plan cols = make_plan(pr.nk, pr.nq, pr.target_blocks);
  const size_t nq = (size_t)pr.nq, nk = (size_t)pr.nk, d = (size_t)pr.d;
  switch (op) {
    case kMaskedRowstats: return rows.splits > 1 ? 2 * rows.splits * nq : 0;
    case kMaskedRowsum: return rows.splits > 1 ? rows.splits * nq : 0;
    case kMaskedColsum: return cols.splits > 1 ? cols.splits * nk : 0;
    case kMaskedGrad: {
      const size_t a = rows.splits > 1 ? rows.splits * nq * d : 0;
      const size_t b = cols.splits > 1 ? cols.splits * nk * d : 0;
      return a > b ? a : b;
    }
    default: return 0;
  }
}

bool problem_ok(const MaskedProblem& pr) {
  return pr.q && pr.k && pr.nq >= 1 && pr.nk >= 1 && pr.d >= 1 && pr.code >= 0 && pr.code <= 3 &&
         (pr.code < 2 || pr.feat_type == kMaskedF32) && (pr.code != 3 || pr.p >= 1.f) &&
         pr.inv_t > 0.f && pr.inv_t < INFINITY && (pr.qg == nullptr) == (pr.kg == nullptr) &&
         pr.ne >= 0 && (pr.ne == 0 || pr.exclude) && pr.target_blocks >= 1;
}

// the split of P's stream side into P (own blocks x splits)
Plan plan_launch(const MaskedProblem& pr, Params& P) {
  const Plan plan = make_plan(P.n_own, P.n_str, pr.target_blocks);
  P.n_own_blocks = plan.own_blocks;
  P.split_tiles = plan.split_tiles;
  return plan;
}

// out[i] = the sum of the `splits` partials parts[s * n + i], in split order
cudaError_t combine_sum(const float* parts, int splits, size_t n, float* out,
                        cudaStream_t stream) {
  const size_t blocks = (n + kThreads - 1) / kThreads;
  const int grid = (int)(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
  masked_combine_sum_kernel<<<grid, kThreads, 0, stream>>>(parts, splits, n,
                                                             (size_t)grid * kThreads, out);
  return cudaGetLastError();
}

template <int MODE>
cudaError_t run_reduce(const MaskedProblem& pr, Params P, float* out, float* out2,
                       float* partial, cudaStream_t stream) {
  const Plan plan = plan_launch(pr, P);
  const size_t n = (size_t)P.n_own;
  const bool split = plan.splits > 1;
  P.out = split ? partial : out;
  P.out2 = split ? partial + plan.splits * n : out2;
  P.out_split = split ? n : 0;
  return dispatch(pr, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr bool TF = decltype(tag)::tf32;
    auto kernel = masked_reduce_kernel<T, TF, MODE>;
    const size_t smem = smem_layout<T>(false).total;
    cudaError_t err = allow_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    kernel<<<plan.own_blocks * plan.splits, kThreads, smem, stream>>>(P);
    err = cudaGetLastError();
    if (err != cudaSuccess || !split) return err;
    if (MODE != kRowstatsMode) return combine_sum(partial, plan.splits, n, out, stream);
    masked_combine_rowstats_kernel<<<cdiv((int)n, kThreads), kThreads, 0, stream>>>(
        partial, partial + plan.splits * n, plan.splits, (int)n, out, out2);
    return cudaGetLastError();
  });
}

template <bool TRANS>
cudaError_t run_grad(const MaskedProblem& pr, Params P, float* out, float* partial,
                     cudaStream_t stream) {
  const Plan plan = plan_launch(pr, P);
  const size_t n = (size_t)P.n_own * pr.d;
  P.out = plan.splits > 1 ? partial : out;
  P.out_split = plan.splits > 1 ? n : 0;
  return dispatch(pr, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr bool TF = decltype(tag)::tf32;
    auto kernel = masked_grad_kernel<T, TF, TRANS>;
    const size_t smem = smem_layout<T>(true).total;
    cudaError_t err = allow_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    for (int d0 = 0; d0 < pr.d; d0 += kDW) {  // one launch per window of kDW feature columns
      P.d_lo = d0;
      P.d_cnt = imin(kDW, pr.d - d0);
      kernel<<<plan.own_blocks * plan.splits, kThreads, smem, stream>>>(P);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    return plan.splits == 1 ? cudaSuccess : combine_sum(partial, plan.splits, n, out, stream);
  });
}

// the vectors of a launcher (Params' qm, qa, qb, kw, kgam)
struct Vectors { const float *qm, *qa, *qb, *kw, *kgam; };

// A launcher: the problem, the launcher's pointers (`ok`) and the workspace of `op` checked; the
// Params of the problem and the vectors v; the group ranges computed into the workspace (the
// partials follow them); then the passes of `op`: rowstats (out = m, out2 = z), rowsum (out = r),
// colsum (out = a; own = keys), grad (out = dq with own = queries, then out2 = dk with own =
// keys).
cudaError_t run_op(const MaskedProblem& pr, int op, bool ok, const Vectors& v, float* out,
                   float* out2, void* work, cudaStream_t stream) {
  if (!problem_ok(pr) || !ok || (masked_workspace_bytes(pr, op) > 0 && !work))
    return cudaErrorInvalidValue;
  Params P{};
  P.qm = v.qm;
  P.qa = v.qa;
  P.qb = v.qb;
  P.kw = v.kw;
  P.kgam = v.kgam;
  P.d = pr.d;
  P.code = pr.code;
  P.p = pr.p;
  P.inv_t = pr.inv_t;
  P.sc = pr.inv_t * kLog2e;
  P.gq = pr.qg;
  P.gk = pr.kg;
  P.excl = pr.ne > 0 ? pr.exclude : nullptr;
  P.ne = pr.ne;
  int64_t* rq = nullptr;
  int64_t* rk = nullptr;
  float* partial = reinterpret_cast<float*>(static_cast<unsigned char*>(work) + range_bytes(pr));
  if (pr.qg) {
    rq = static_cast<int64_t*>(work);
    rk = rq + 2 * (size_t)cdiv(pr.nq, kB);
    const int chunks = cdiv(pr.nq, kB) + cdiv(pr.nk, kB);
    masked_group_ranges_kernel<<<cdiv(chunks, kThreads), kThreads, 0, stream>>>(
        pr.qg, pr.nq, pr.kg, pr.nk, rq, rk);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  auto orient = [&](bool trans) {  // own = queries (rows) or keys (trans: cols)
    P.own = trans ? pr.k : pr.q;
    P.str = trans ? pr.q : pr.k;
    P.n_own = trans ? pr.nk : pr.nq;
    P.n_str = trans ? pr.nq : pr.nk;
    P.rng_own = trans ? rk : rq;
    P.rng_str = trans ? rq : rk;
  };
  switch (op) {
    case kMaskedRowstats:
      orient(false);
      return run_reduce<kRowstatsMode>(pr, P, out, out2, partial, stream);
    case kMaskedRowsum:
      orient(false);
      return run_reduce<kRowsumMode>(pr, P, out, nullptr, partial, stream);
    case kMaskedColsum:
      orient(true);
      return run_reduce<kColsumMode>(pr, P, out, nullptr, partial, stream);
    default: {
      orient(false);
      const cudaError_t err = run_grad<false>(pr, P, out, partial, stream);
      if (err != cudaSuccess) return err;
      orient(true);
      return run_grad<true>(pr, P, out2, partial, stream);
    }
  }
}

}  // namespace

size_t masked_workspace_bytes(const MaskedProblem& pr, int op) {
  if (!problem_ok(pr)) return 0;
  return range_bytes(pr) + sizeof(float) * partial_floats(pr, op);
}

cudaError_t launch_masked_rowstats(const MaskedProblem& pr, const float* w, const float* m0,
                                   float* m, float* z, void* work, cudaStream_t stream) {
  return run_op(pr, kMaskedRowstats, w && m0 && m && z, {m0, nullptr, nullptr, w, nullptr}, m, z,
                work, stream);
}

cudaError_t launch_masked_colsum(const MaskedProblem& pr, const float* m, const float* rho,
                                 const float* sigma, float* a, void* work, cudaStream_t stream) {
  return run_op(pr, kMaskedColsum, m && rho && sigma && a, {m, rho, sigma, nullptr, nullptr}, a,
                nullptr, work, stream);
}

cudaError_t launch_masked_rowsum(const MaskedProblem& pr, const float* w, const float* m,
                                 const float* gamma, float* r, void* work, cudaStream_t stream) {
  return run_op(pr, kMaskedRowsum, w && m && gamma && r, {m, nullptr, nullptr, w, gamma}, r,
                nullptr, work, stream);
}

cudaError_t launch_masked_grad(const MaskedProblem& pr, const float* w, const float* m,
                               const float* alpha, const float* beta, const float* gamma,
                               float* dq, float* dk, void* work, cudaStream_t stream) {
  return run_op(pr, kMaskedGrad, w && m && alpha && (beta || !gamma) && dq && dk,
                {m, alpha, gamma ? beta : nullptr, w, gamma}, dq, dk, work, stream);
}

int masked_smem_bytes(int feat_type, bool allow_tf32, int op) {
  const bool grad = op == kMaskedGrad;  // (the TF32 tiles stage float32 like the FMA tiles)
  return dispatch_feat(feat_type, allow_tf32, -1, [&](auto tag) {
    return (int)smem_layout<typename decltype(tag)::type>(grad).total;
  });
}

}  // namespace fastipirm_cuda
