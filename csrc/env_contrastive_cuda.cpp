// Torch bindings of the fastipirm CUDA kernels (extension module fastipirm._cuda).
//
// Registers torch.ops.fastipirm_cuda.{rowstats, band, grad} for the CUDA dispatch key, with the
// schemas of the CPU ops torch.ops.fastipirm_ext.* (csrc/env_contrastive_cpu.cpp) plus a trailing
// `allow_tf32` flag (float32 features: TF32 tensor cores for the similarity tiles; the Python side
// passes `torch.get_float32_matmul_precision() != "highest"`, the Triton backend's rule). The
// kernels themselves are in env_contrastive_cuda_kernels.cu (fastipirm/ops/fused.py states their
// contract). Differences from the CPU ops: features may be float32, float16 or bfloat16 (the
// statistics and outputs are always float32); `rowstats` returns an empty `znt` when `two_t` is
// false (the caller uses `zn`), and `grad` an empty `gw` when `need_gw` is false.
#include <torch/extension.h>
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "env_contrastive_cuda.h"

namespace {

int feat_type(const at::Tensor& feats) {
  switch (feats.scalar_type()) {
    case at::kFloat: return fastipirm_cuda::kFeatF32;
    case at::kHalf: return fastipirm_cuda::kFeatF16;
    case at::kBFloat16: return fastipirm_cuda::kFeatBF16;
    default:
      TORCH_CHECK(false, "fastipirm cuda kernels: feats must be float32, float16 or bfloat16, got ",
                  feats.scalar_type(), " (float64 inputs are computed in float32 by the caller)");
  }
  return -1;
}

void check_feats(const char* op, const at::Tensor& feats, int64_t batch) {
  TORCH_CHECK(feats.is_cuda(), "fastipirm_cuda::", op, ": feats must be a CUDA tensor, got ",
              feats.device());
  TORCH_CHECK(feats.dim() == 2, "fastipirm_cuda::", op, ": feats must be 2-D (N, D), got shape ",
              feats.sizes());
  TORCH_CHECK(feats.is_contiguous(), "fastipirm_cuda::", op, ": feats must be contiguous");
  TORCH_CHECK(batch >= 1 && feats.size(0) == 2 * batch, "fastipirm_cuda::", op,
              ": feats must have 2 * batch rows (batch = ", batch, "), got ", feats.size(0));
  TORCH_CHECK(feats.size(1) >= 1, "fastipirm_cuda::", op, ": feats has no feature column");
  TORCH_CHECK(feats.size(0) <= (int64_t)1 << 30 && feats.size(1) <= (int64_t)1 << 30,
              "fastipirm_cuda::", op, ": feats is too large for 32-bit indices");
  feat_type(feats);
}

// a float32 CUDA tensor on feats' device, contiguous, of the given shape
void check_f32(const char* op, const char* name, const at::Tensor& t, const at::Tensor& feats,
               at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == feats.device(), "fastipirm_cuda::", op, ": ", name,
              " must be on feats' device ", feats.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastipirm_cuda::", op, ": ", name,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fastipirm_cuda::", op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == shape, "fastipirm_cuda::", op, ": ", name, " must have shape ", shape,
              ", got ", t.sizes());
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "fastipirm_cuda::", op, ": kernel launch failed: ",
              cudaGetErrorString(err));
}

float temp(const char* op, const char* name, double t) {
  TORCH_CHECK(t > 0, "fastipirm_cuda::", op, ": ", name, " must be positive, got ", t);
  return (float)t;
}

std::vector<at::Tensor> rowstats(const at::Tensor& feats, const at::Tensor& spos,
                                 const at::Tensor& w2, int64_t batch, double t1, double t2,
                                 bool two_t, bool allow_tf32) {
  const char* op = "rowstats";
  check_feats(op, feats, batch);
  const int64_t n = feats.size(0);
  TORCH_CHECK(w2.dim() == 2, "fastipirm_cuda::rowstats: w2 must be 2-D (N, M), got shape ",
              w2.sizes());
  const int64_t m = w2.size(1);
  check_f32(op, "spos", spos, feats, {n});
  check_f32(op, "w2", w2, feats, {n, m});
  const c10::cuda::CUDAGuard guard(feats.device());
  auto opts = feats.options().dtype(at::kFloat);
  at::Tensor mrow = at::empty({n}, opts);
  at::Tensor zn = at::empty({n, m}, opts);
  at::Tensor znt = two_t ? at::empty({n, m}, opts) : at::empty({0}, opts);
  check_launch(op, fastipirm_cuda::launch_rowstats(
                       feats.data_ptr(), feat_type(feats), allow_tf32, spos.data_ptr<float>(),
                       w2.data_ptr<float>(), mrow.data_ptr<float>(), zn.data_ptr<float>(),
                       two_t ? znt.data_ptr<float>() : nullptr, (int)n, (int)feats.size(1),
                       (int)m, (int)batch, temp(op, "t1", t1), temp(op, "t2", t2), two_t,
                       c10::cuda::getCurrentCUDAStream()));
  return {mrow, zn, znt};
}

at::Tensor band(const at::Tensor& feats, const at::Tensor& mrow, const at::Tensor& fac,
                int64_t nb_out, int64_t batch, double t2, bool trans, int64_t nb,
                bool allow_tf32) {
  const char* op = "band";
  check_feats(op, feats, batch);
  const int64_t n = feats.size(0);
  TORCH_CHECK(nb == 1 || nb == 3, "fastipirm_cuda::band: nb must be 1 or 3, got ", nb);
  TORCH_CHECK(fac.dim() == 3, "fastipirm_cuda::band: fac must be 3-D (bands, N, G), got shape ",
              fac.sizes());
  TORCH_CHECK(fac.size(0) == (trans ? 1 : nb), "fastipirm_cuda::band: fac must have ",
              trans ? 1 : nb, " band(s) (trans = ", trans, ", nb = ", nb, "), got ", fac.size(0));
  TORCH_CHECK(nb_out == (trans ? nb : 1), "fastipirm_cuda::band: nb_out must be ",
              trans ? nb : 1, " (trans = ", trans, ", nb = ", nb, "), got ", nb_out);
  const int64_t g = fac.size(2);
  check_f32(op, "mrow", mrow, feats, {n});
  check_f32(op, "fac", fac, feats, {fac.size(0), n, g});
  const c10::cuda::CUDAGuard guard(feats.device());
  at::Tensor out = at::empty({nb_out, n, g}, feats.options().dtype(at::kFloat));
  check_launch(op, fastipirm_cuda::launch_band(
                       feats.data_ptr(), feat_type(feats), allow_tf32, mrow.data_ptr<float>(),
                       fac.data_ptr<float>(), out.data_ptr<float>(), (int)n, (int)feats.size(1),
                       (int)g, (int)batch, temp(op, "t2", t2), trans, (int)nb,
                       c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::vector<at::Tensor> grad(const at::Tensor& feats, const at::Tensor& mrow,
                             const at::Tensor& w2, const at::Tensor& gz1, const at::Tensor& gz2,
                             const at::Tensor& rc, const at::Tensor& gacc, int64_t batch,
                             double t1, double t2, bool two_t, bool need_gw, bool allow_tf32) {
  const char* op = "grad";
  check_feats(op, feats, batch);
  const int64_t n = feats.size(0), d = feats.size(1);
  TORCH_CHECK(w2.dim() == 2, "fastipirm_cuda::grad: w2 must be 2-D (N, M), got shape ",
              w2.sizes());
  TORCH_CHECK(rc.dim() == 2, "fastipirm_cuda::grad: rc must be 2-D (N, G), got shape ",
              rc.sizes());
  TORCH_CHECK(gacc.dim() == 3 && (gacc.size(0) == 1 || gacc.size(0) == 3),
              "fastipirm_cuda::grad: gacc must be (1 or 3 bands, N, G), got shape ", gacc.sizes());
  const int64_t m = w2.size(1), g = rc.size(1), nb = gacc.size(0);
  check_f32(op, "mrow", mrow, feats, {n});
  check_f32(op, "w2", w2, feats, {n, m});
  check_f32(op, "gz1", gz1, feats, {n, m});
  check_f32(op, "gz2", gz2, feats, {n, m});
  check_f32(op, "rc", rc, feats, {n, g});
  check_f32(op, "gacc", gacc, feats, {nb, n, g});
  const c10::cuda::CUDAGuard guard(feats.device());
  auto opts = feats.options().dtype(at::kFloat);
  at::Tensor df = at::empty({n, d}, opts);
  at::Tensor gw = need_gw ? at::empty({n, m}, opts) : at::empty({0}, opts);
  check_launch(op, fastipirm_cuda::launch_grad(
                       feats.data_ptr(), feat_type(feats), allow_tf32, mrow.data_ptr<float>(),
                       w2.data_ptr<float>(), gz1.data_ptr<float>(), gz2.data_ptr<float>(),
                       rc.data_ptr<float>(), gacc.data_ptr<float>(), df.data_ptr<float>(),
                       need_gw ? gw.data_ptr<float>() : nullptr, (int)n, (int)d, (int)m, (int)g,
                       (int)batch, temp(op, "t1", t1), temp(op, "t2", t2), two_t, (int)nb,
                       need_gw, c10::cuda::getCurrentCUDAStream()));
  return {df, gw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastipirm_cuda, m) {
  m.def("rowstats(Tensor feats, Tensor spos, Tensor w2, int batch, float t1, float t2, "
        "bool two_t, bool allow_tf32=False) -> Tensor[]");
  m.def("band(Tensor feats, Tensor mrow, Tensor fac, int nb_out, int batch, float t2, "
        "bool trans, int nb, bool allow_tf32=False) -> Tensor");
  m.def("grad(Tensor feats, Tensor mrow, Tensor w2, Tensor gz1, Tensor gz2, Tensor rc, "
        "Tensor gacc, int batch, float t1, float t2, bool two_t, bool need_gw, "
        "bool allow_tf32=False) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastipirm_cuda, CUDA, m) {
  m.impl("rowstats", &rowstats);
  m.impl("band", &band);
  m.impl("grad", &grad);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastipirm CUDA kernels (ops registered as torch.ops.fastipirm_cuda.*)";
}
