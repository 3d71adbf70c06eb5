// fastipirm C++ CPU kernel of env_contrastive_loss: the streamed part of forward and backward.
//
// The N x N similarity (N = 2B, both views) is never stored: rows are processed in tiles of up to
// kTileRows; each tile computes its similarity rows (dot products over D), the per-environment
// row statistics (max-shifted exponentials, Z for every environment column), the loss, and the
// band-wise column reductions of the per-slot IRM penalty. The backward recomputes the tile and
// applies the closed-form gradients. Python (fastipirm/ops/torch_backend.py) does the O(N M)
// prologue and epilogue, so the mathematics is documented there once; variable names follow it.
//
// Parallelism: at::parallel_for (OpenMP) over row tiles. Column accumulators (penalty band sums,
// column-side feature gradients, column weight gradients) are per thread and summed in thread
// order afterwards, so results are deterministic for a given thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kTileRows = 8;

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename T>
inline void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Band of column c for a row whose sample index is i: 0 (c < i), 1 (i < c < i + B), 2 (c > i + B).
inline int band_of(int64_t c, int64_t i, int64_t batch) {
  return c < i ? 0 : (c > i + batch ? 2 : 1);
}

struct Shape {
  int64_t n, d, m, g, batch;
};

// Row statistics of one row at one temperature (see torch_backend._path).
template <typename T>
struct RowStats {
  T shift, x_pos, exp_pos;
  std::vector<T> neg_sum, z;  // (M)
  explicit RowStats(int64_t m) : neg_sum(m), z(m) {}
};

// sim: the row's N similarities; e: out, the row's shifted exponentials (0 at a and a').
template <typename T>
void row_stats(const T* sim, int64_t a, const Shape& s, T temperature, const T* w2, const T* kappa,
               T* e, RowStats<T>& out) {
  const int64_t partner = (a + s.batch) % s.n;
  const T inv_t = T(1) / temperature;
  T shift = -std::numeric_limits<T>::infinity();
  for (int64_t c = 0; c < s.n; ++c)
    if (c != a) shift = std::max(shift, sim[c] * inv_t);
  out.shift = shift;
  out.x_pos = sim[partner] * inv_t;
  out.exp_pos = std::exp(out.x_pos - shift);
  std::fill(out.neg_sum.begin(), out.neg_sum.end(), T(0));
  T* ns = out.neg_sum.data();
  for (int64_t c = 0; c < s.n; ++c) {
    if (c == a || c == partner) {
      e[c] = 0;
      continue;
    }
    const T ec = std::exp(sim[c] * inv_t - shift);
    e[c] = ec;
    axpy(ec, w2 + c * s.m, ns, s.m);
  }
  const T tiny = std::numeric_limits<T>::min();
  for (int64_t j = 0; j < s.m; ++j)
    out.z[j] = std::max(out.exp_pos + kappa[a * s.m + j] * ns[j], tiny);
}

// log Z - x_pos + shift as log1p(kappa * neg_sum / exp_pos): exact for losses near 0; the direct
// form for rows whose ratio overflows (see torch_backend._per_anchor).
template <typename T>
inline T per_anchor(const RowStats<T>& st, T kappa, int64_t j) {
  const T ratio = kappa * st.neg_sum[j] / st.exp_pos;
  return std::isfinite(ratio) ? std::log1p(ratio) : std::log(st.z[j]) + st.shift - st.x_pos;
}

// Similarity rows of a tile: sim[r * N + c] = <F[a0 + r], F[c]>.
template <typename T>
void tile_similarity(const T* feats, int64_t a0, int64_t rows, const Shape& s, T* sim) {
  for (int64_t c = 0; c < s.n; ++c) {
    const T* fc = feats + c * s.d;
    for (int64_t r = 0; r < rows; ++r) sim[r * s.n + c] = dot(feats + (a0 + r) * s.d, fc, s.d);
  }
}

template <typename T>
std::vector<at::Tensor> forward_rows_impl(const at::Tensor& feats_t, const at::Tensor& w2_t,
                                          const at::Tensor& kappa_t, const at::Tensor& gw_t,
                                          const at::Tensor& kappag_t, double t1, double t2,
                                          int64_t batch) {
  const Shape s{feats_t.size(0), feats_t.size(1), w2_t.size(1), gw_t.size(1), batch};
  const T* feats = feats_t.data_ptr<T>();
  const T* w2 = w2_t.data_ptr<T>();
  const T* kappa = kappa_t.data_ptr<T>();
  const T* gw = gw_t.data_ptr<T>();
  const T* kappag = kappag_t.data_ptr<T>();
  const T temp = T(t1), irm_temp = T(t2);
  const bool same_t = t1 == t2;
  const int threads = at::get_num_threads();
  const int64_t tiles = (s.n + kTileRows - 1) / kTileRows;
  std::vector<std::vector<T>> loss_acc(threads, std::vector<T>(s.m, 0));
  std::vector<std::vector<T>> gpos_acc(threads, std::vector<T>(s.g, 0));
  std::vector<std::vector<T>> col_acc(threads);

  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    auto& cols = col_acc[tid];
    if (cols.empty()) cols.assign(3 * s.n * s.g, T(0));
    std::vector<T> sim(kTileRows * s.n), e(s.n), e2(s.n), zg(s.g), rc(s.g);
    RowStats<T> st(s.m), st2(s.m);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t a0 = tile * kTileRows, rows = std::min(kTileRows, s.n - a0);
      tile_similarity(feats, a0, rows, s, sim.data());
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t a = a0 + r, i = a % batch;
        const T* srow = sim.data() + r * s.n;
        row_stats(srow, a, s, temp, w2, kappa, e.data(), st);
        for (int64_t j = 0; j < s.m; ++j)
          loss_acc[tid][j] += w2[a * s.m + j] * per_anchor(st, kappa[a * s.m + j], j);
        const T* ep = e.data();
        RowStats<T>* p = &st;
        if (!same_t) {
          row_stats(srow, a, s, irm_temp, w2, kappa, e2.data(), st2);
          ep = e2.data();
          p = &st2;
        }
        for (int64_t q = 0; q < s.g; ++q) {
          zg[q] = p->z[q % s.m];
          const T w = gw[a * s.g + q];
          gpos_acc[tid][q] += w * (p->exp_pos / zg[q] - T(1)) * p->x_pos;
          rc[q] = w * kappag[a * s.g + q] / zg[q];
        }
        const T inv_t = T(1) / irm_temp;
        for (int64_t c = 0; c < s.n; ++c) {
          const T k = ep[c] * srow[c] * inv_t;
          if (k == T(0)) continue;
          axpy(k, rc.data(), cols.data() + (band_of(c, i, batch) * s.n + c) * s.g, s.g);
        }
      }
    }
  });

  auto opts = feats_t.options();
  at::Tensor loss_sum = at::zeros({s.m}, opts), g_pos = at::zeros({s.g}, opts);
  at::Tensor col_sums = at::zeros({3, s.n, s.g}, opts);
  T* ls = loss_sum.data_ptr<T>();
  T* gp = g_pos.data_ptr<T>();
  T* cs = col_sums.data_ptr<T>();
  for (int t = 0; t < threads; ++t) {
    for (int64_t j = 0; j < s.m; ++j) ls[j] += loss_acc[t][j];
    for (int64_t q = 0; q < s.g; ++q) gp[q] += gpos_acc[t][q];
    if (!col_acc[t].empty())
      for (int64_t x = 0; x < 3 * s.n * s.g; ++x) cs[x] += col_acc[t][x];
  }
  return {loss_sum, g_pos, col_sums};
}

template <typename T>
std::vector<at::Tensor> backward_rows_impl(const at::Tensor& feats_t, const at::Tensor& w2_t,
                                           const at::Tensor& kappa_t, const at::Tensor& gw_t,
                                           const at::Tensor& kappag_t, double t1, double t2,
                                           int64_t batch, const at::Tensor& d_loss_t,
                                           const at::Tensor& normc_t,
                                           const at::Tensor& col_factors_t,
                                           const at::Tensor& gamma0_t, bool soft) {
  const Shape s{feats_t.size(0), feats_t.size(1), w2_t.size(1), gw_t.size(1), batch};
  const int64_t reps = s.g / s.m;
  const T* feats = feats_t.data_ptr<T>();
  const T* w2 = w2_t.data_ptr<T>();
  const T* kappa = kappa_t.data_ptr<T>();
  const T* gw = gw_t.data_ptr<T>();
  const T* kappag = kappag_t.data_ptr<T>();
  const T* d_loss = d_loss_t.data_ptr<T>();
  const T* normc = normc_t.data_ptr<T>();
  const T* colf = col_factors_t.data_ptr<T>();
  const T* gamma0 = gamma0_t.data_ptr<T>();
  const T temp = T(t1), irm_temp = T(t2);
  const bool same_t = t1 == t2;
  auto opts = feats_t.options();
  at::Tensor d_feats = at::zeros({s.n, s.d}, opts);
  at::Tensor d_w2 = at::zeros({s.n, s.m}, opts), d_kappa = at::zeros({s.n, s.m}, opts);
  at::Tensor d_gw = at::zeros({s.n, s.g}, opts);
  T* dfe = d_feats.data_ptr<T>();
  T* dw2 = d_w2.data_ptr<T>();
  T* dka = d_kappa.data_ptr<T>();
  T* dgw = d_gw.data_ptr<T>();
  const int threads = at::get_num_threads();
  const int64_t tiles = (s.n + kTileRows - 1) / kTileRows;
  std::vector<std::vector<T>> dfeat_acc(threads), dw2_acc(threads), col_acc(threads);
  std::vector<std::vector<T>> loss_acc(threads, std::vector<T>(s.m, 0));

  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    auto& dfeat_cols = dfeat_acc[tid];
    if (dfeat_cols.empty()) {
      dfeat_cols.assign(s.n * s.d, T(0));
      if (soft) {
        dw2_acc[tid].assign(s.n * s.m, T(0));
        col_acc[tid].assign(3 * s.n * s.g, T(0));
      }
    }
    std::vector<T> sim(kTileRows * s.n), dsim(kTileRows * s.n), e(s.n), e2(s.n);
    std::vector<T> dns(s.m), dz(s.m), zg(s.g), rc(s.g), drc(s.g), dppos(s.g), ppos(s.g);
    RowStats<T> st(s.m), st2(s.m);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t a0 = tile * kTileRows, rows = std::min(kTileRows, s.n - a0);
      tile_similarity(feats, a0, rows, s, sim.data());
      std::fill(dsim.begin(), dsim.end(), T(0));
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t a = a0 + r, i = a % batch, partner = (a + batch) % s.n;
        const T* srow = sim.data() + r * s.n;
        T* drow = dsim.data() + r * s.n;
        // ---- loss path at `temperature`
        row_stats(srow, a, s, temp, w2, kappa, e.data(), st);
        T sum_dell = 0, sum_dz = 0;
        for (int64_t j = 0; j < s.m; ++j) {
          const T dell = d_loss[j] * w2[a * s.m + j] / normc[j];
          if (soft) {
            const T ell = per_anchor(st, kappa[a * s.m + j], j);
            dw2[a * s.m + j] += d_loss[j] * ell / normc[j];
            loss_acc[tid][j] += w2[a * s.m + j] * ell;
          }
          dz[j] = dell / st.z[j];
          sum_dell += dell;
          sum_dz += dz[j];
          dns[j] = dz[j] * kappa[a * s.m + j];
          if (soft) dka[a * s.m + j] += dz[j] * st.neg_sum[j];
        }
        const T inv_t1 = T(1) / temp;
        for (int64_t c = 0; c < s.n; ++c) {
          const T ec = e[c];
          if (ec == T(0)) continue;
          drow[c] = dot(dns.data(), w2 + c * s.m, s.m) * ec * inv_t1;
          if (soft) axpy(ec, dns.data(), dw2_acc[tid].data() + c * s.m, s.m);
        }
        drow[partner] += (-sum_dell + sum_dz * st.exp_pos) * inv_t1;

        // ---- penalty path at `irm_temperature`
        const T* ep = e.data();
        RowStats<T>* p = &st;
        if (!same_t) {
          row_stats(srow, a, s, irm_temp, w2, kappa, e2.data(), st2);
          ep = e2.data();
          p = &st2;
        }
        const T inv_t2 = T(1) / irm_temp;
        for (int64_t q = 0; q < s.g; ++q) {
          zg[q] = p->z[q % s.m];
          rc[q] = gw[a * s.g + q] * kappag[a * s.g + q] / zg[q];
          drc[q] = 0;
        }
        for (int64_t c = 0; c < s.n; ++c) {  // pass A: d rc (and the column sums for d w2)
          const T k = ep[c] * srow[c] * inv_t2;
          if (k == T(0)) continue;
          const int64_t off = (band_of(c, i, batch) * s.n + c) * s.g;
          axpy(k, colf + off, drc.data(), s.g);
          if (soft) axpy(k, rc.data(), col_acc[tid].data() + off, s.g);
        }
        T dxp2 = 0, dep = 0;
        std::fill(dz.begin(), dz.end(), T(0));
        for (int64_t q = 0; q < s.g; ++q) {
          const T w = gw[a * s.g + q];
          ppos[q] = p->exp_pos / zg[q];
          dgw[a * s.g + q] = gamma0[q] * (ppos[q] - T(1)) * p->x_pos + drc[q] * kappag[a * s.g + q] / zg[q];
          dppos[q] = gamma0[q] * w * p->x_pos;
          dxp2 += gamma0[q] * w * (ppos[q] - T(1));
          dz[q % s.m] += -(drc[q] * rc[q] + dppos[q] * ppos[q]) / zg[q];
          dep += dppos[q] / zg[q];
          if (soft) dka[a * s.m + q % s.m] += drc[q] * w / zg[q];
        }
        for (int64_t j = 0; j < s.m; ++j) {
          dep += dz[j];
          dns[j] = dz[j] * kappa[a * s.m + j];
          if (soft) dka[a * s.m + j] += dz[j] * p->neg_sum[j];
        }
        for (int64_t c = 0; c < s.n; ++c) {  // pass B: d similarity
          const T ec = ep[c];
          if (ec == T(0)) continue;
          const T x = srow[c] * inv_t2;
          const T dk = dot(rc.data(), colf + (band_of(c, i, batch) * s.n + c) * s.g, s.g);
          const T dx = (dk * (T(1) + x) + dot(dns.data(), w2 + c * s.m, s.m)) * ec;
          drow[c] += dx * inv_t2;
          if (soft) axpy(ec, dns.data(), dw2_acc[tid].data() + c * s.m, s.m);
        }
        drow[partner] += (dxp2 + dep * p->exp_pos) * inv_t2;
        (void)reps;
      }
      // ---- features: S = F F^T, rows get dS F, columns get dS^T F
      for (int64_t c = 0; c < s.n; ++c) {
        const T* fc = feats + c * s.d;
        T* dcol = dfeat_cols.data() + c * s.d;
        for (int64_t r = 0; r < rows; ++r) {
          const T ds = dsim[r * s.n + c];
          if (ds == T(0)) continue;
          axpy(ds, fc, dfe + (a0 + r) * s.d, s.d);
          axpy(ds, feats + (a0 + r) * s.d, dcol, s.d);
        }
      }
    }
  });

  at::Tensor col_sums = at::zeros({3, s.n, s.g}, opts), loss_sum = at::zeros({s.m}, opts);
  T* cs = col_sums.data_ptr<T>();
  T* ls = loss_sum.data_ptr<T>();
  for (int t = 0; t < threads; ++t) {
    if (!dfeat_acc[t].empty())
      for (int64_t x = 0; x < s.n * s.d; ++x) dfe[x] += dfeat_acc[t][x];
    if (!dw2_acc[t].empty())
      for (int64_t x = 0; x < s.n * s.m; ++x) dw2[x] += dw2_acc[t][x];
    if (!col_acc[t].empty())
      for (int64_t x = 0; x < 3 * s.n * s.g; ++x) cs[x] += col_acc[t][x];
    for (int64_t j = 0; j < s.m; ++j) ls[j] += loss_acc[t][j];
  }
  return {d_feats, d_w2, d_kappa, d_gw, col_sums, loss_sum};
}

void check_inputs(const at::Tensor& feats, const std::vector<at::Tensor>& others) {
  TORCH_CHECK(feats.device().is_cpu(), "fastipirm cpu kernel: tensors must be on the CPU");
  TORCH_CHECK(feats.dim() == 2 && feats.is_contiguous(), "feats must be a contiguous (N, D) tensor");
  TORCH_CHECK(feats.scalar_type() == at::kFloat || feats.scalar_type() == at::kDouble,
              "fastipirm cpu kernel computes in float32 or float64, got ", feats.scalar_type());
  for (const auto& t : others) {
    TORCH_CHECK(t.scalar_type() == feats.scalar_type(), "all inputs must have feats' dtype");
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "inputs must be contiguous CPU tensors");
  }
}

std::vector<at::Tensor> forward_rows(const at::Tensor& feats, const at::Tensor& w2,
                                     const at::Tensor& kappa, const at::Tensor& gw,
                                     const at::Tensor& kappag, double t1, double t2,
                                     int64_t batch) {
  check_inputs(feats, {w2, kappa, gw, kappag});
  TORCH_CHECK(feats.size(0) == 2 * batch, "feats must hold 2 * batch rows");
  return AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "forward_rows", [&] {
    return forward_rows_impl<scalar_t>(feats, w2, kappa, gw, kappag, t1, t2, batch);
  });
}

std::vector<at::Tensor> backward_rows(const at::Tensor& feats, const at::Tensor& w2,
                                      const at::Tensor& kappa, const at::Tensor& gw,
                                      const at::Tensor& kappag, double t1, double t2,
                                      int64_t batch, const at::Tensor& d_loss,
                                      const at::Tensor& normc, const at::Tensor& col_factors,
                                      const at::Tensor& gamma0, bool soft) {
  check_inputs(feats, {w2, kappa, gw, kappag, d_loss, normc, col_factors, gamma0});
  TORCH_CHECK(feats.size(0) == 2 * batch, "feats must hold 2 * batch rows");
  return AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "backward_rows", [&] {
    return backward_rows_impl<scalar_t>(feats, w2, kappa, gw, kappag, t1, t2, batch, d_loss,
                                        normc, col_factors, gamma0, soft);
  });
}

}  // namespace

TORCH_LIBRARY(fastipirm_ext, m) {
  m.def("forward_rows(Tensor feats, Tensor w2, Tensor kappa, Tensor gw, Tensor kappag, "
        "float t1, float t2, int batch) -> Tensor[]");
  m.def("backward_rows(Tensor feats, Tensor w2, Tensor kappa, Tensor gw, Tensor kappag, "
        "float t1, float t2, int batch, Tensor d_loss, Tensor normc, Tensor col_factors, "
        "Tensor gamma0, bool soft) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastipirm_ext, CPU, m) {
  m.impl("forward_rows", &forward_rows);
  m.impl("backward_rows", &backward_rows);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastipirm C++ CPU kernel (ops registered as torch.ops.fastipirm_ext.*)";
}
