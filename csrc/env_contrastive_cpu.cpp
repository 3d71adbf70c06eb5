// fastipirm C++ CPU kernels of env_contrastive_loss: the three kernels of fastipirm/ops/fused.py.
//
// The O(N M) glue (kappa, norms, slots, penalty variants, its vjp) is the shared torch code of
// fastipirm/ops/fused.py, which states each kernel's contract; the Triton and CUDA backends
// implement the same three kernels. Here:
//
//   rowstats  zn = E W2, znt = E~ W2 with a row shift m (E = exp((S - m_a)/T) on negatives);
//   band      the penalty's band column reductions (forward) or row reduction (backward);
//   grad      dF = (dS + dS^T) F from the closed-form dS, and the weight gradient of the row sums.
//
// S = F F^T (N = 2B rows, both views) is never stored. Every kernel walks the unordered pairs of
// kTile x kTile tiles (I <= J): one similarity tile S_IJ = F_I F_J^T serves the anchors of I
// against the columns of J and, transposed, the anchors of J against the columns of I, so each
// kernel computes half of the similarity. Inner loops are register-blocked GEMM micro-kernels on
// GCC vector types (AVX-512/AVX2/NEON alike) and a vectorised exponential (csrc/cpu_simd_gemm.h,
// shared with the masked kernels); tile-local elementwise work (exponentials, masks, the three
// diagonal bands of the per-slot penalty) is done once per tile. Pairs are split over threads
// with at::parallel_for (OpenMP); every output is accumulated per thread and the thread copies
// are summed in thread order, so results are deterministic for a given thread count.
//
// Row shift: the row max of S over the negatives and the positive, found online in rowstats (as in
// the other backends), so every exponential is <= 1 for any temperature and feature norm.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_simd_gemm.h"

namespace {

using namespace fastipirm::cpu;  // Vec, loadu, storeu, vexp, gemm_acc, padded_rows

constexpr int64_t kTile = 64;

// ------------------------------------------------------------------------------------------------
// tiles: padded features, the similarity tile, masks and bands
// ------------------------------------------------------------------------------------------------

constexpr int64_t kTT = kTile * kTile;

// Tile products (kTile x kTile tile x, row-major) with a (kTile x g) factor: o += x f (NN: the
// output rows are the tile's rows) or o += x^T f (TN: the output rows are the tile's columns).
template <typename T>
inline void tile_mul(const T* x, bool transpose, const T* f, int64_t g, T* o) {
  if (transpose)
    gemm_acc<T>(kTile, g, kTile, x, 1, kTile, f, g, o, g);
  else
    gemm_acc<T>(kTile, g, kTile, x, kTile, 1, f, g, o, g);
}

// The (cols, npad) transpose of padded_rows(x, npad) (cpu_simd_gemm.h).
inline at::Tensor padded_t(const at::Tensor& x, int64_t npad) {
  return padded_rows(x, npad).t().contiguous();
}

template <typename T>
struct Tiles {
  int64_t n, npad, d, batch, nt;
  at::Tensor f_t, ft_t;
  const T* f;   // (npad, d), zero rows beyond n
  const T* ft;  // (d, npad)
  std::vector<std::pair<int64_t, int64_t>> pairs;
  std::vector<int64_t> sample;  // a mod B for every row a < npad (no division in the tile loops)
  std::vector<T> sample_v;      // the same as T (exact: npad < 2^24), read by the vector band masks

  Tiles(const at::Tensor& feats, int64_t batch_) : batch(batch_) {
    n = feats.size(0);
    d = feats.size(1);
    nt = (n + kTile - 1) / kTile;
    npad = nt * kTile;
    f_t = padded_rows(feats, npad);
    ft_t = f_t.t().contiguous();
    f = f_t.data_ptr<T>();
    ft = ft_t.data_ptr<T>();
    for (int64_t i = 0; i < nt; ++i)
      for (int64_t j = i; j < nt; ++j) pairs.emplace_back(i * kTile, j * kTile);
    sample.resize(npad);
    sample_v.resize(npad);
    for (int64_t a = 0; a < npad; ++a) {
      sample[a] = a % batch;
      sample_v[a] = T(sample[a]);
    }
  }

  // s[r * kTile + c] = <F[i0 + r], F[j0 + c]>
  void sim(int64_t i0, int64_t j0, T* s) const {
    std::fill(s, s + kTT, T(0));
    gemm_acc<T>(kTile, kTile, d, f + i0 * d, d, 1, ft + j0, npad, s, kTile);
  }

  // Band of column `col` for anchor `anchor`: 0 (col < i), 1 (i <= col <= i + B), 2 (above); the
  // columns i and i + B themselves are not negatives, so their band never matters.
  int band(int64_t anchor, int64_t col) const {
    const int64_t i = sample[anchor];
    return col < i ? 0 : (col > i + batch ? 2 : 1);
  }

  // dst[r][c] = src[r][c] where the tile element (r, c) of tile (i0, j0) is in band b (anchors are
  // the rows when anchor_rows, else the columns), else dst[r][c] (keep) or 0. Vectorised: per
  // element, band = col < i ? 0 : (col > i + B ? 2 : 1) with i the anchor's sample index. Padding
  // rows and columns are zero in every tile this is applied to, so their band does not matter.
  void band_part(int64_t i0, int64_t j0, bool anchor_rows, int b, const T* src, T* dst,
                 bool keep) const {
    using V = typename Vec<T>::type;
    constexpr int L = Vec<T>::kLanes;
    V iota;
    for (int l = 0; l < L; ++l) iota[l] = T(l);
    const T bt = T(b), bsz = T(batch);
    for (int64_t r = 0; r < kTile; ++r)
      for (int64_t c = 0; c < kTile; c += L) {
        const V col = anchor_rows ? iota + T(j0 + c) : V{} + T(i0 + r);
        const V i = anchor_rows ? V{} + sample_v[i0 + r] : loadu(sample_v.data() + j0 + c);
        const V bnd = col < i ? V{} : (col > i + bsz ? V{} + T(2) : V{} + T(1));
        const V other = keep ? loadu(dst + r * kTile + c) : V{};
        storeu(dst + r * kTile + c, bnd == bt ? loadu(src + r * kTile + c) : other);
      }
  }

  // The band shared by every valid (anchor, column) of tile (i0, j0), or -1 (bands are monotone
  // in the column, so the two extreme columns decide).
  int uniform_band(int64_t i0, int64_t j0, bool anchor_rows) const {
    const int64_t a0 = anchor_rows ? i0 : j0, o0 = anchor_rows ? j0 : i0;
    const int64_t o1 = std::min(o0 + kTile, n) - 1;
    if (o1 < o0) return -1;
    int found = -1;
    for (int64_t a = a0; a < std::min(a0 + kTile, n); ++a) {
      const int lo = band(a, o0), hi = band(a, o1);
      if (lo != hi || (found >= 0 && lo != found)) return -1;
      found = lo;
    }
    return found;
  }
};

// x[r][c] = exp((s[r][c] - m_anchor) * scale) (times s[r][c] * kscale unless kscale is 0) on the
// negatives, 0 elsewhere; the anchor is the row (row_shift) or the column. The negative mask
// (not self, not partner, not padding) is symmetric, so it does not depend on that choice.
template <typename T>
void exp_tile(const Tiles<T>& t, const T* s, const T* m, int64_t i0, int64_t j0, bool row_shift,
              T scale, T kscale, T* x) {
  if constexpr (std::is_same<T, float>::value) {
    using V = Vec<float>::type;
    constexpr int L = Vec<float>::kLanes;
    for (int64_t r = 0; r < kTile; ++r) {
      const V mr = V{} + m[i0 + r];
      for (int64_t c = 0; c < kTile; c += L) {
        const V sv = loadu(s + r * kTile + c);
        V e = vexp((sv - (row_shift ? mr : loadu(m + j0 + c))) * scale);
        if (kscale != 0.0f) e *= sv * kscale;
        storeu(x + r * kTile + c, e);
      }
    }
  } else {
    for (int64_t r = 0; r < kTile; ++r)
      for (int64_t c = 0; c < kTile; ++c) {
        const T sv = s[r * kTile + c];
        const T e = std::exp((sv - m[row_shift ? i0 + r : j0 + c]) * scale);
        x[r * kTile + c] = kscale != T(0) ? e * sv * kscale : e;
      }
  }
  for (int64_t r = 0; r < kTile; ++r) {
    T* xr = x + r * kTile;
    const int64_t a = i0 + r;
    if (a >= t.n) {
      std::fill(xr, xr + kTile, T(0));
      continue;
    }
    const int64_t i = t.sample[a];
    for (int64_t col : {i, i + t.batch})
      if (col >= j0 && col < j0 + kTile) xr[col - j0] = T(0);
    for (int64_t c = std::max<int64_t>(0, t.n - j0); c < kTile; ++c) xr[c] = T(0);
  }
}

// sum_b op(x restricted to band b) fac[b] accumulated into out[b] (op: transpose or not); a tile
// in one band (or nb == 1: the whole negative mask is band 0) needs one product.
template <typename T>
void band_mul(const Tiles<T>& t, const T* x, int64_t i0, int64_t j0, bool anchor_rows, int64_t nb,
              bool transpose, const T* const fac[3], T* const out[3], int64_t g, T* scratch) {
  const int ub = nb == 1 ? 0 : t.uniform_band(i0, j0, anchor_rows);
  if (ub >= 0) {
    tile_mul(x, transpose, fac[ub], g, out[ub]);
    return;
  }
  for (int b = 0; b < 3; ++b) {
    t.band_part(i0, j0, anchor_rows, b, x, scratch, false);
    tile_mul(scratch, transpose, fac[b], g, out[b]);
  }
}

// x[r][c] = sum_q a_b[r][q] bt_b[q][c] with b the band of (r, c): a_b (kTile x g, ld g), bt_b
// (g x kTile, ld npad).
template <typename T>
void band_select(const Tiles<T>& t, int64_t i0, int64_t j0, bool anchor_rows, int64_t nb,
                 const T* const a[3], const T* const bt[3], int64_t g, T* x, T* scratch) {
  const int ub = nb == 1 ? 0 : t.uniform_band(i0, j0, anchor_rows);
  std::fill(x, x + kTT, T(0));
  if (ub >= 0) {
    gemm_acc<T>(kTile, kTile, g, a[ub], g, 1, bt[ub], t.npad, x, kTile);
    return;
  }
  for (int b = 0; b < 3; ++b) {
    std::fill(scratch, scratch + kTT, T(0));
    gemm_acc<T>(kTile, kTile, g, a[b], g, 1, bt[b], t.npad, scratch, kTile);
    t.band_part(i0, j0, anchor_rows, b, scratch, x, true);
  }
}

// The similarity tiles of a kernel: the first `cache.size(0)` unordered pairs (in Tiles::pairs
// order) live in a caller-owned cache tensor (ncached, kTile, kTile) that rowstats fills
// (ready = false) and band and grad read (ready = true), so one forward and backward compute
// the similarity once. The cache's size is the caller's choice (a fixed budget, see
// fastipirm/ops/cpu_backend.py); pairs beyond it are recomputed, and an empty cache means
// "recompute every tile". Cached and recomputed tiles are bitwise equal.
template <typename T>
struct SimSource {
  const Tiles<T>& t;
  T* cache;
  int64_t ncached;
  bool ready;

  SimSource(const Tiles<T>& t_, const at::Tensor& cache_t, bool ready_)
      : t(t_), cache(nullptr), ncached(0), ready(ready_) {
    if (cache_t.defined() && cache_t.numel() > 0) {
      TORCH_CHECK(cache_t.dim() == 3 && cache_t.size(1) == kTile && cache_t.size(2) == kTile &&
                      cache_t.is_contiguous() &&
                      cache_t.scalar_type() == c10::CppTypeToScalarType<T>::value,
                  "similarity cache must be a contiguous (pairs, ", kTile, ", ", kTile,
                  ") tensor of feats' dtype");
      ncached = std::min<int64_t>(cache_t.size(0), static_cast<int64_t>(t.pairs.size()));
      cache = cache_t.data_ptr<T>();
    }
  }

  // S tile of pair p = (i0, j0): read from the cache, computed into its slot, or into `scratch`
  const T* get(int64_t p, int64_t i0, int64_t j0, T* scratch) const {
    if (p < ncached) {
      T* slot = cache + p * kTT;
      if (!ready) t.sim(i0, j0, slot);
      return slot;
    }
    t.sim(i0, j0, scratch);
    return scratch;
  }
};

// Per-thread accumulators summed in thread order (deterministic for a given thread count).
template <typename T>
struct Accum {
  std::vector<std::vector<T>> parts;
  int64_t size;
  T init;
  explicit Accum(int64_t size_, T init_ = T(0))
      : parts(at::get_num_threads()), size(size_), init(init_) {}
  T* mine(const T* first = nullptr) {  // this thread's copy; `first`: its initial values
    auto& p = parts[at::get_thread_num()];
    if (p.empty()) {
      if (first != nullptr)
        p.assign(first, first + size);
      else
        p.assign(size, init);
    }
    return p.data();
  }
  void sum_into(T* out, int64_t count) const {  // the first `count` entries
    std::fill(out, out + count, T(0));
    for (const auto& p : parts)
      if (!p.empty())
        for (int64_t k = 0; k < count; ++k) out[k] += p[k];
  }
};

// Run body(p, i0, j0, scratch) over the unordered tile pairs p = (i0, j0), split over threads
// round-robin (the cheaper diagonal pairs spread evenly); the split only depends on the thread
// count.
template <typename T, typename Body>
void for_pairs(const Tiles<T>& t, int scratch_tiles, Body body) {
  const int64_t pairs = static_cast<int64_t>(t.pairs.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), pairs));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(scratch_tiles * kTT);
    for (int64_t w = begin; w < end; ++w)
      for (int64_t p = w; p < pairs; p += workers)
        body(p, t.pairs[p].first, t.pairs[p].second, scratch.data());
  });
}

// ------------------------------------------------------------------------------------------------
// kernel 1: row statistics
// ------------------------------------------------------------------------------------------------

// Online row statistics (the flash-attention recurrence): every thread keeps, per anchor, a
// running max m (initialised with the positive logit, a lower bound of the row max, so it is
// finite from the start) and sums rescaled by exp((m_old - m_new) / T) whenever m grows; the
// thread copies are merged the same way, in thread order.
template <typename T>
std::vector<at::Tensor> rowstats_impl(const at::Tensor& feats, const at::Tensor& spos,
                                      const at::Tensor& w2_t, int64_t batch, double t1_,
                                      double t2_, bool two_t, const at::Tensor& cache) {
  const Tiles<T> t(feats, batch);
  const SimSource<T> src(t, cache, false);
  const int64_t npad = t.npad, mm = w2_t.size(1);
  const at::Tensor w2_p = padded_rows(w2_t, npad);
  const T* w2 = w2_p.data_ptr<T>();
  const T t1 = T(t1_), t2 = T(t2_);
  std::vector<T> init(npad, T(0));
  std::copy(spos.data_ptr<T>(), spos.data_ptr<T>() + t.n, init.begin());
  Accum<T> acc_z1(npad * mm), acc_z2(two_t ? npad * mm : 0), acc_m(npad);
  for_pairs(t, 2, [&](int64_t p, int64_t i0, int64_t j0, T* scratch) {
    T* z1 = acc_z1.mine();
    T* z2 = two_t ? acc_z2.mine() : nullptr;
    T* mx = acc_m.mine(init.data());
    const T* s = src.get(p, i0, j0, scratch);
    T* e = scratch + kTT;
    const int64_t rows = std::min(kTile, t.n - i0), cols = std::min(kTile, t.n - j0);
    // dir 0: anchors I (rows of the tile) against columns J; dir 1: anchors J (columns), rows I
    for (int dir = 0; dir < (i0 == j0 ? 1 : 2); ++dir) {
      const bool ra = dir == 0;
      const int64_t a0 = ra ? i0 : j0, c0 = ra ? j0 : i0, na = ra ? rows : cols;
      T tile_max[kTile];
      for (int64_t q = 0; q < kTile; ++q) tile_max[q] = -std::numeric_limits<T>::infinity();
      for (int64_t r = 0; r < rows; ++r) {
        const T* sr = s + r * kTile;
        if (ra) {
          T best = tile_max[r];
          if (i0 == j0) {  // the diagonal tile holds the anchor itself
            for (int64_t c = 0; c < cols; ++c)
              if (c != r) best = std::max(best, sr[c]);
          } else {
#pragma omp simd reduction(max : best)
            for (int64_t c = 0; c < cols; ++c) best = std::max(best, sr[c]);
          }
          tile_max[r] = best;
        } else {
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) tile_max[c] = std::max(tile_max[c], sr[c]);
        }
      }
      for (int64_t q = 0; q < na; ++q) {
        const int64_t a = a0 + q;
        const T m_new = std::max(mx[a], tile_max[q]);
        if (m_new > mx[a]) {
          const T f1 = std::exp((mx[a] - m_new) / t1);
          for (int64_t j = 0; j < mm; ++j) z1[a * mm + j] *= f1;
          if (two_t) {
            const T f2 = std::exp((mx[a] - m_new) / t2);
            for (int64_t j = 0; j < mm; ++j) z2[a * mm + j] *= f2;
          }
          mx[a] = m_new;
        }
      }
      for (int pass = 0; pass < (two_t ? 2 : 1); ++pass) {
        exp_tile(t, s, mx, i0, j0, ra, T(1) / (pass == 0 ? t1 : t2), T(0), e);
        tile_mul(e, !ra, w2 + c0 * mm, mm, (pass == 0 ? z1 : z2) + a0 * mm);
      }
    }
  });
  // merge the thread copies: m = max over threads, sums rescaled to it
  auto opts = feats.options();
  at::Tensor mrow = at::empty({t.n}, opts), zn = at::zeros({t.n, mm}, opts);
  at::Tensor znt = two_t ? at::zeros({t.n, mm}, opts) : zn;
  T *mo = mrow.data_ptr<T>(), *zo1 = zn.data_ptr<T>(), *zo2 = znt.data_ptr<T>();
  for (int64_t a = 0; a < t.n; ++a) {
    T best = init[a];
    for (const auto& part : acc_m.parts)
      if (!part.empty()) best = std::max(best, part[a]);
    mo[a] = best;
    for (size_t th = 0; th < acc_m.parts.size(); ++th) {
      if (acc_m.parts[th].empty()) continue;
      const T m_th = acc_m.parts[th][a];
      const T f1 = std::exp((m_th - best) / t1), f2 = std::exp((m_th - best) / t2);
      for (int64_t j = 0; j < mm; ++j) {
        zo1[a * mm + j] += f1 * acc_z1.parts[th][a * mm + j];
        if (two_t) zo2[a * mm + j] += f2 * acc_z2.parts[th][a * mm + j];
      }
    }
  }
  return {mrow, zn, two_t ? znt : zn.clone()};
}

// ------------------------------------------------------------------------------------------------
// kernel 2: band reductions
// ------------------------------------------------------------------------------------------------

template <typename T>
at::Tensor band_impl(const at::Tensor& feats, const at::Tensor& mrow, const at::Tensor& fac_t,
                     int64_t nb_out, int64_t batch, double t2, bool trans, int64_t nb,
                     const at::Tensor& cache) {
  const Tiles<T> t(feats, batch);
  const SimSource<T> src(t, cache, true);
  const int64_t npad = t.npad, g = fac_t.size(2);
  // (nfac, npad, g), zero rows beyond n
  const at::Tensor fac_p =
      npad == t.n ? fac_t.contiguous()
                  : at::constant_pad_nd(fac_t, {0, 0, 0, npad - t.n}).contiguous();
  const T* fac = fac_p.data_ptr<T>();
  std::vector<T> m(npad, T(0));
  std::copy(mrow.data_ptr<T>(), mrow.data_ptr<T>() + t.n, m.begin());
  const T inv_t = T(1) / T(t2);
  const int64_t out_bands = trans ? nb_out : 1;
  Accum<T> acc(out_bands * npad * g);
  for_pairs(t, 3, [&](int64_t p, int64_t i0, int64_t j0, T* scratch) {
    T* out = acc.mine();
    const T* s = src.get(p, i0, j0, scratch);
    T* k = scratch + kTT;
    // dir 0: anchors I (rows of the tile), columns J; dir 1: anchors J, columns I
    for (int dir = 0; dir < (i0 == j0 ? 1 : 2); ++dir) {
      const bool rows_are_anchors = dir == 0;
      const int64_t a0 = rows_are_anchors ? i0 : j0, c0 = rows_are_anchors ? j0 : i0;
      exp_tile(t, s, m.data(), i0, j0, rows_are_anchors, inv_t, inv_t, k);  // K~ = E~ S / T'
      const T* f[3];
      T* o[3];
      if (trans) {
        // forward: out[b][col] += sum_anchor band_b K~ fac[anchor]: output rows are columns
        for (int b = 0; b < 3; ++b) {
          f[b] = fac + a0 * g;
          o[b] = out + ((nb == 1 ? 0 : b) * npad + c0) * g;
        }
        band_mul(t, k, i0, j0, rows_are_anchors, nb, rows_are_anchors, f, o, g, scratch + 2 * kTT);
      } else {
        // backward: out[anchor] += sum_col sum_b band_b K~ fac[b][col]
        for (int b = 0; b < 3; ++b) {
          f[b] = fac + ((nb == 1 ? 0 : b) * npad + c0) * g;
          o[b] = out + a0 * g;
        }
        band_mul(t, k, i0, j0, rows_are_anchors, nb, !rows_are_anchors, f, o, g, scratch + 2 * kTT);
      }
    }
  });
  at::Tensor result = at::zeros({nb_out, t.n, g}, feats.options());  // bands past out_bands: 0
  std::vector<T> full(out_bands * npad * g);
  acc.sum_into(full.data(), out_bands * npad * g);
  T* r = result.data_ptr<T>();
  for (int64_t b = 0; b < out_bands; ++b)
    std::copy(full.begin() + b * npad * g, full.begin() + b * npad * g + t.n * g, r + b * t.n * g);
  return result;
}

// ------------------------------------------------------------------------------------------------
// kernel 3: feature (and weight) gradients
// ------------------------------------------------------------------------------------------------

template <typename T>
std::vector<at::Tensor> grad_impl(const at::Tensor& feats, const at::Tensor& mrow,
                                  const at::Tensor& w2_t, const at::Tensor& gz1_t,
                                  const at::Tensor& gz2_t, const at::Tensor& rc_t,
                                  const at::Tensor& gacc_t, int64_t batch, double t1, double t2,
                                  bool two_t, bool need_gw, const at::Tensor& cache) {
  const Tiles<T> t(feats, batch);
  const SimSource<T> src(t, cache, true);
  const int64_t npad = t.npad, d = t.d, mm = w2_t.size(1), g = rc_t.size(1);
  const int64_t nb = gacc_t.size(0);
  // padded (npad, *) copies and (*, npad) transposes of the O(N M) inputs
  std::vector<at::Tensor> keep;
  auto rows_of = [&](const at::Tensor& x) {
    keep.push_back(padded_rows(x, npad));
    return keep.back().data_ptr<T>();
  };
  auto cols_of = [&](const at::Tensor& x) {
    keep.push_back(padded_t(x, npad));
    return keep.back().data_ptr<T>();
  };
  const T *w2 = rows_of(w2_t), *w2t = cols_of(w2_t);
  const T *gz1 = rows_of(gz1_t), *gz1t = cols_of(gz1_t);
  const T* gz2 = two_t ? rows_of(gz2_t) : gz1;
  const T* gz2t = two_t ? cols_of(gz2_t) : gz1t;
  const T *rc = rows_of(rc_t), *rct = cols_of(rc_t);
  std::vector<const T*> gacc(nb), gacct(nb);
  for (int64_t b = 0; b < nb; ++b) {
    gacc[b] = rows_of(gacc_t[b]);
    gacct[b] = cols_of(gacc_t[b]);
  }
  std::vector<T> m(npad, T(0));
  std::copy(mrow.data_ptr<T>(), mrow.data_ptr<T>() + t.n, m.begin());
  const T inv1 = T(1) / T(t1), inv2 = T(1) / T(t2);
  Accum<T> acc_df(npad * d), acc_gw(need_gw ? npad * mm : 0);

  for_pairs(t, 8, [&](int64_t pair, int64_t i0, int64_t j0, T* scratch) {
    T* df = acc_df.mine();
    T* gw = need_gw ? acc_gw.mine() : nullptr;
    const T* s = src.get(pair, i0, j0, scratch);
    T *e1 = scratch + kTT, *e2 = scratch + 2 * kTT, *p1 = scratch + 3 * kTT;
    T *p2 = scratch + 4 * kTT, *bd = scratch + 5 * kTT, *ds = scratch + 6 * kTT;
    T* tmp = scratch + 7 * kTT;
    std::fill(ds, ds + kTT, T(0));
    // dir 0: anchors = rows (I), columns J; dir 1: anchors = columns (J), columns I. Both in the
    // (I, J) layout of s, so ds = dS_IJ + (dS_JI)^T.
    for (int dir = 0; dir < 2; ++dir) {
      const bool ra = dir == 0;
      // loss path: E (gZN_anchor . W2_col) / T, and at T' unless the temperatures coincide
      for (int pass = 0; pass < (two_t ? 2 : 1); ++pass) {
        const T* gz = pass == 0 ? gz1 : gz2;
        const T* gzt = pass == 0 ? gz1t : gz2t;
        T* e = pass == 0 ? e1 : e2;
        T* p = pass == 0 ? p1 : p2;
        exp_tile(t, s, m.data(), i0, j0, ra, pass == 0 ? inv1 : inv2, T(0), e);
        std::fill(p, p + kTT, T(0));
        if (ra)
          gemm_acc<T>(kTile, kTile, mm, gz + i0 * mm, mm, 1, w2t + j0, npad, p, kTile);
        else
          gemm_acc<T>(kTile, kTile, mm, w2 + i0 * mm, mm, 1, gzt + j0, npad, p, kTile);
      }
      // penalty path: E~ (1 + S/T') / T' (RC_anchor . gACC_band[col])
      const T* a[3];
      const T* bt[3];
      for (int b = 0; b < 3; ++b) {
        const int64_t bb = nb == 1 ? 0 : b;
        a[b] = ra ? rc + i0 * g : gacc[bb] + i0 * g;
        bt[b] = ra ? gacct[bb] + j0 : rct + j0;
      }
      band_select(t, i0, j0, ra, nb, a, bt, g, bd, tmp);
      const T* ee2 = two_t ? e2 : e1;
      if (two_t) {
        for (int64_t k = 0; k < kTT; ++k)
          ds[k] += e1[k] * p1[k] * inv1 + e2[k] * p2[k] * inv2 +
                   ee2[k] * (T(1) + s[k] * inv2) * inv2 * bd[k];
      } else {
        for (int64_t k = 0; k < kTT; ++k)
          ds[k] += e1[k] * (p1[k] * inv1 + (T(1) + s[k] * inv2) * inv2 * bd[k]);
      }
      // weight gradient of the row sums: gw[col] += E[anchor, col] gZN[anchor] (+ ~); on the
      // diagonal tile dir 0 already covers every (anchor, column) pair
      if (need_gw && (ra || i0 != j0)) {
        for (int pass = 0; pass < (two_t ? 2 : 1); ++pass) {
          const T* gz = pass == 0 ? gz1 : gz2;
          if (ra)  // columns J receive from anchors I
            tile_mul(pass == 0 ? e1 : e2, true, gz + i0 * mm, mm, gw + j0 * mm);
          else     // columns I receive from anchors J
            tile_mul(pass == 0 ? e1 : e2, false, gz + j0 * mm, mm, gw + i0 * mm);
        }
      }
    }
    // dF_I += D F_J, dF_J += D^T F_I (once on the diagonal)
    gemm_acc<T>(kTile, d, kTile, ds, kTile, 1, t.f + j0 * d, d, df + i0 * d, d);
    if (i0 != j0)
      gemm_acc<T>(kTile, d, kTile, ds, 1, kTile, t.f + i0 * d, d, df + j0 * d, d);
  });
  auto opts = feats.options();
  at::Tensor df = at::empty({t.n, d}, opts);
  acc_df.sum_into(df.data_ptr<T>(), t.n * d);
  at::Tensor gw = need_gw ? at::empty({t.n, mm}, opts) : at::zeros({0}, opts);
  if (need_gw) acc_gw.sum_into(gw.data_ptr<T>(), t.n * mm);
  return {df, gw};
}

// ------------------------------------------------------------------------------------------------
// entry points
// ------------------------------------------------------------------------------------------------

void check_cpu(const at::Tensor& feats, const std::vector<at::Tensor>& others) {
  TORCH_CHECK(feats.device().is_cpu(), "fastipirm cpu kernel: tensors must be on the CPU");
  TORCH_CHECK(feats.dim() == 2 && feats.is_contiguous(), "feats must be a contiguous (N, D) tensor");
  TORCH_CHECK(feats.scalar_type() == at::kFloat || feats.scalar_type() == at::kDouble,
              "fastipirm cpu kernel computes in float32 or float64, got ", feats.scalar_type());
  for (const auto& t : others) {
    TORCH_CHECK(t.scalar_type() == feats.scalar_type(), "all inputs must have feats' dtype");
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "inputs must be contiguous CPU tensors");
  }
}

std::vector<at::Tensor> rowstats(const at::Tensor& feats, const at::Tensor& spos,
                                 const at::Tensor& w2, int64_t batch, double t1, double t2,
                                 bool two_t, const at::Tensor& cache) {
  check_cpu(feats, {spos, w2});
  TORCH_CHECK(feats.size(0) == 2 * batch && w2.size(0) == feats.size(0) &&
                  spos.numel() == feats.size(0),
              "rowstats: feats, spos and w2 must have 2 * batch rows");
  return AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "rowstats", [&] {
    return rowstats_impl<scalar_t>(feats, spos, w2, batch, t1, t2, two_t, cache);
  });
}

at::Tensor band(const at::Tensor& feats, const at::Tensor& mrow, const at::Tensor& fac,
                int64_t nb_out, int64_t batch, double t2, bool trans, int64_t nb,
                const at::Tensor& cache) {
  check_cpu(feats, {mrow, fac});
  TORCH_CHECK(feats.size(0) == 2 * batch && fac.dim() == 3 && fac.size(1) == feats.size(0),
              "band: fac must be (bands, 2 * batch, G)");
  TORCH_CHECK(nb == 1 || nb == 3, "band: nb must be 1 or 3");
  TORCH_CHECK(trans ? fac.size(0) == 1 : fac.size(0) == nb, "band: fac has the wrong band count");
  return AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "band", [&] {
    return band_impl<scalar_t>(feats, mrow, fac, trans ? nb_out : 1, batch, t2, trans, nb, cache);
  });
}

std::vector<at::Tensor> grad(const at::Tensor& feats, const at::Tensor& mrow,
                             const at::Tensor& w2, const at::Tensor& gz1, const at::Tensor& gz2,
                             const at::Tensor& rc, const at::Tensor& gacc, int64_t batch,
                             double t1, double t2, bool two_t, bool need_gw,
                             const at::Tensor& cache) {
  check_cpu(feats, {mrow, w2, gz1, gz2, rc, gacc});
  TORCH_CHECK(feats.size(0) == 2 * batch && w2.size(0) == feats.size(0) &&
                  rc.size(0) == feats.size(0) && gacc.dim() == 3,
              "grad: inputs must have 2 * batch rows");
  return AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "grad", [&] {
    return grad_impl<scalar_t>(feats, mrow, w2, gz1, gz2, rc, gacc, batch, t1, t2, two_t,
                               need_gw, cache);
  });
}

}  // namespace

TORCH_LIBRARY(fastipirm_ext, m) {
  // cache: the similarity tile cache (see SimSource), written by rowstats, read by band and
  // grad; empty: no cache
  m.def("rowstats(Tensor feats, Tensor spos, Tensor w2, int batch, float t1, float t2, "
        "bool two_t, Tensor(a!) cache) -> Tensor[]");
  m.def("band(Tensor feats, Tensor mrow, Tensor fac, int nb_out, int batch, float t2, "
        "bool trans, int nb, Tensor cache) -> Tensor");
  m.def("grad(Tensor feats, Tensor mrow, Tensor w2, Tensor gz1, Tensor gz2, Tensor rc, "
        "Tensor gacc, int batch, float t1, float t2, bool two_t, bool need_gw, "
        "Tensor cache) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastipirm_ext, CPU, m) {
  m.impl("rowstats", &rowstats);
  m.impl("band", &band);
  m.impl("grad", &grad);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastipirm C++ CPU kernels (ops registered as torch.ops.fastipirm_ext.*)";
}
