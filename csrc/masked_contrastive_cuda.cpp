// Torch bindings of the masked_contrastive_loss CUDA kernels (extension module fastipirm._cuda).
//
// Registers torch.ops.fastipirm_cuda.{masked_rowstats, masked_colsum, masked_rowsum, masked_grad}
// for the CUDA dispatch key: the four kernels of the contract in fastipirm/ops/masked_glue.py,
// called by the kernel set of fastipirm/ops/masked_cuda.py. The kernels themselves are in
// masked_contrastive_cuda_kernels.cu. Arguments: the features q (Q, D) and k (K, D) (float32,
// float16 or bfloat16, one dtype; for the l1 / lp similarities 16-bit features are read as
// float32), float32 vectors, the optional int64 groups qg (Q,) / kg (K,) and exclusions (Q, E),
// the similarity code, p, 1 / temperature, `allow_tf32` (float32 dot / squared distance on TF32
// tensor cores; the Python side passes `torch.get_float32_matmul_precision() != "highest"`) and
// `target_blocks` (0: twice the device's multiprocessors; the split of the streamed side aims at
// that many blocks, and the summation order depends on it). Outputs are float32. No PYBIND11
// module here: env_contrastive_cuda.cpp defines the extension's module.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <vector>

#include "masked_contrastive_cuda.h"

namespace {

using OptTensor = std::optional<at::Tensor>;

int masked_feat_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return fastipirm_cuda::kMaskedF32;
    case at::kHalf: return fastipirm_cuda::kMaskedF16;
    case at::kBFloat16: return fastipirm_cuda::kMaskedBF16;
    default:
      TORCH_CHECK(false, "fastipirm_cuda masked kernels: features must be float32, float16 or "
                  "bfloat16, got ", t.scalar_type(), " (float64 inputs are computed in float32 "
                  "by the caller)");
  }
  return -1;
}

int sm_count(int device) {
  static std::atomic<int> cache[64];
  if (device >= 0 && device < 64) {
    const int c = cache[device].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n < 1)
    n = 108;
  if (device >= 0 && device < 64) cache[device].store(n, std::memory_order_relaxed);
  return n;
}

// a float32 vector argument of an op: its name, tensor, and whether it has an entry per key (nk)
// or per query (nq)
struct Vec {
  const char* name;
  const at::Tensor& t;
  bool per_key;
};

// One call of an op: the features (made float32 for the l1 / lp similarities), groups and
// exclusions, checked, and the kernels' view of them; the device guard of the features' device
// (from the end of the checks of the features on); its vector arguments (vec), outputs (f32),
// workspace and launch (launched).
struct Call {
  const char* op;
  at::Tensor q, k;
  OptTensor qg, kg, exclude;
  fastipirm_cuda::MaskedProblem pr{};
  std::optional<c10::cuda::CUDAGuard> guard;
  at::Tensor work;

  Call(const char* op_name, const at::Tensor& q_in, const at::Tensor& k_in,
       const OptTensor& qg_in, const OptTensor& kg_in, const OptTensor& exclude_in,
       int64_t code, double p, double inv_t, bool allow_tf32, int64_t target_blocks)
      : op(op_name) {
    TORCH_CHECK(q_in.is_cuda() && k_in.is_cuda(), "fastipirm_cuda::", op,
                ": q and k must be CUDA tensors, got ", q_in.device(), " and ", k_in.device());
    TORCH_CHECK(q_in.device() == k_in.device(), "fastipirm_cuda::", op,
                ": q and k must be on one device, got ", q_in.device(), " and ", k_in.device());
    TORCH_CHECK(q_in.dim() == 2 && k_in.dim() == 2 && q_in.size(1) == k_in.size(1),
                "fastipirm_cuda::", op, ": q and k must be (Q, D) and (K, D), got shapes ",
                q_in.sizes(), " and ", k_in.sizes());
    TORCH_CHECK(q_in.size(0) >= 1 && k_in.size(0) >= 1 && q_in.size(1) >= 1,
                "fastipirm_cuda::", op, ": empty q or k: ", q_in.sizes(), ", ", k_in.sizes());
    TORCH_CHECK(q_in.size(0) < ((int64_t)1 << 30) && k_in.size(0) < ((int64_t)1 << 30) &&
                q_in.size(1) < ((int64_t)1 << 30), "fastipirm_cuda::", op,
                ": q or k too large for 32-bit row indices");
    TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type(), "fastipirm_cuda::", op,
                ": q and k must have one dtype, got ", q_in.scalar_type(), " and ",
                k_in.scalar_type());
    TORCH_CHECK(q_in.is_contiguous() && k_in.is_contiguous(), "fastipirm_cuda::", op,
                ": q and k must be contiguous");
    TORCH_CHECK(code >= 0 && code <= 3, "fastipirm_cuda::", op,
                ": code must be 0 (dot), 1 (sqeuclidean), 2 (l1) or 3 (lp), got ", code);
    TORCH_CHECK(code != 3 || (std::isfinite(p) && p >= 1.0), "fastipirm_cuda::", op,
                ": lp needs a finite p >= 1, got ", p);
    TORCH_CHECK(std::isfinite(inv_t) && inv_t > 0.0, "fastipirm_cuda::", op,
                ": inv_t (1 / temperature) must be positive and finite, got ", inv_t);
    TORCH_CHECK(target_blocks >= 0, "fastipirm_cuda::", op, ": target_blocks must be >= 0");
    masked_feat_type(q_in);
    q = code >= 2 ? q_in.to(at::kFloat) : q_in;
    k = code >= 2 ? k_in.to(at::kFloat) : k_in;
    const int64_t nq = q.size(0), nk = k.size(0);
    TORCH_CHECK(qg_in.has_value() == kg_in.has_value(), "fastipirm_cuda::", op,
                ": give both qg and kg, or neither");
    if (qg_in.has_value()) {
      check_index("qg", *qg_in, 1, nq);
      check_index("kg", *kg_in, 1, nk);
      qg = qg_in;
      kg = kg_in;
    }
    if (exclude_in.has_value() && exclude_in->numel() > 0) {
      check_index("exclude", *exclude_in, 2, nq);
      exclude = exclude_in;
    }
    pr.q = q.data_ptr();
    pr.k = k.data_ptr();
    pr.feat_type = masked_feat_type(q);
    pr.allow_tf32 = allow_tf32;
    pr.nq = (int)nq;
    pr.nk = (int)nk;
    pr.d = (int)q.size(1);
    pr.code = (int)code;
    pr.p = (float)p;
    pr.inv_t = (float)inv_t;
    pr.qg = qg ? qg->data_ptr<int64_t>() : nullptr;
    pr.kg = kg ? kg->data_ptr<int64_t>() : nullptr;
    pr.exclude = exclude ? exclude->data_ptr<int64_t>() : nullptr;
    pr.ne = exclude ? (int)exclude->size(1) : 0;
    pr.target_blocks = target_blocks > 0 ? (int)std::min<int64_t>(target_blocks, 1 << 20)
                                         : 2 * sm_count(q.get_device());
    guard.emplace(q.device());
  }

  void check_index(const char* name, const at::Tensor& t, int64_t dims, int64_t rows) const {
    TORCH_CHECK(t.device() == q.device(), "fastipirm_cuda::", op, ": ", name,
                " must be on the features' device ", q.device(), ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kLong, "fastipirm_cuda::", op, ": ", name,
                " must be int64, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == dims && t.size(0) == rows, "fastipirm_cuda::", op, ": ", name,
                " must have ", dims, " dimension(s) and ", rows, " rows, got shape ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), "fastipirm_cuda::", op, ": ", name, " must be contiguous");
  }

  // the data of v, checked: float32, (nk or nq entries), on the features' device, contiguous
  const float* vec(const Vec& v) const {
    const int64_t n = v.per_key ? pr.nk : pr.nq;
    TORCH_CHECK(v.t.device() == q.device(), "fastipirm_cuda::", op, ": ", v.name,
                " must be on the features' device ", q.device(), ", got ", v.t.device());
    TORCH_CHECK(v.t.scalar_type() == at::kFloat, "fastipirm_cuda::", op, ": ", v.name,
                " must be float32, got ", v.t.scalar_type());
    TORCH_CHECK(v.t.dim() == 1 && v.t.size(0) == n, "fastipirm_cuda::", op, ": ", v.name,
                " must have shape (", n, ",), got ", v.t.sizes());
    TORCH_CHECK(v.t.is_contiguous(), "fastipirm_cuda::", op, ": ", v.name,
                " must be contiguous");
    return v.t.data_ptr<float>();
  }

  at::Tensor f32(at::IntArrayRef shape) const {
    return at::empty(shape, q.options().dtype(at::kFloat));
  }

  // the launch of `kind` by `launch(pr, args..., workspace, stream)` (a workspace of the size
  // the kernels ask for, kept until the call ends), checked
  template <typename Launch, typename... Args>
  void launched(int kind, Launch launch, Args... args) {
    const size_t bytes = fastipirm_cuda::masked_workspace_bytes(pr, kind);
    work = at::empty({(int64_t)(bytes > 0 ? bytes : 1)}, q.options().dtype(at::kByte));
    const cudaError_t err = launch(pr, args..., work.data_ptr(),
                                   c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "fastipirm_cuda::", op, ": kernel launch failed: ",
                cudaGetErrorString(err));
  }
};

float* f32_ptr(at::Tensor& t) { return t.data_ptr<float>(); }

std::vector<at::Tensor> masked_rowstats(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& w, const at::Tensor& m0,
                                        const OptTensor& qg, const OptTensor& kg,
                                        const OptTensor& exclude, int64_t code, double p,
                                        double inv_t, bool allow_tf32, int64_t target_blocks) {
  Call c("masked_rowstats", q, k, qg, kg, exclude, code, p, inv_t, allow_tf32, target_blocks);
  const float* wp = c.vec({"w", w, true});
  const float* m0p = c.vec({"m0", m0, false});
  at::Tensor m = c.f32({c.pr.nq}), z = c.f32({c.pr.nq});
  c.launched(fastipirm_cuda::kMaskedRowstats, fastipirm_cuda::launch_masked_rowstats, wp, m0p,
             f32_ptr(m), f32_ptr(z));
  return {m, z};
}

// colsum and rowsum: three float32 vectors in, one out (of nk entries with out_per_key, else nq)
using VectorsLaunch = cudaError_t (*)(const fastipirm_cuda::MaskedProblem&, const float*,
                                      const float*, const float*, float*, void*, cudaStream_t);
at::Tensor vectors_op(Call& c, int kind, VectorsLaunch launch, const Vec& a, const Vec& b,
                      const Vec& d, bool out_per_key) {
  const float* pa = c.vec(a);
  const float* pb = c.vec(b);
  const float* pd = c.vec(d);
  at::Tensor out = c.f32({out_per_key ? c.pr.nk : c.pr.nq});
  c.launched(kind, launch, pa, pb, pd, f32_ptr(out));
  return out;
}

at::Tensor masked_colsum(const at::Tensor& q, const at::Tensor& k, const at::Tensor& m,
                         const at::Tensor& rho, const at::Tensor& sigma, const OptTensor& qg,
                         const OptTensor& kg, const OptTensor& exclude, int64_t code, double p,
                         double inv_t, bool allow_tf32, int64_t target_blocks) {
  Call c("masked_colsum", q, k, qg, kg, exclude, code, p, inv_t, allow_tf32, target_blocks);
  return vectors_op(c, fastipirm_cuda::kMaskedColsum, fastipirm_cuda::launch_masked_colsum,
                    {"m", m, false}, {"rho", rho, false}, {"sigma", sigma, false}, true);
}

at::Tensor masked_rowsum(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                         const at::Tensor& m, const at::Tensor& gamma, const OptTensor& qg,
                         const OptTensor& kg, const OptTensor& exclude, int64_t code, double p,
                         double inv_t, bool allow_tf32, int64_t target_blocks) {
  Call c("masked_rowsum", q, k, qg, kg, exclude, code, p, inv_t, allow_tf32, target_blocks);
  return vectors_op(c, fastipirm_cuda::kMaskedRowsum, fastipirm_cuda::launch_masked_rowsum,
                    {"w", w, true}, {"m", m, false}, {"gamma", gamma, true}, false);
}

std::vector<at::Tensor> masked_grad(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                                    const at::Tensor& m, const at::Tensor& alpha,
                                    const OptTensor& beta, const OptTensor& gamma,
                                    const OptTensor& qg, const OptTensor& kg,
                                    const OptTensor& exclude, int64_t code, double p,
                                    double inv_t, bool allow_tf32, int64_t target_blocks) {
  Call c("masked_grad", q, k, qg, kg, exclude, code, p, inv_t, allow_tf32, target_blocks);
  const float* wp = c.vec({"w", w, true});
  const float* mp = c.vec({"m", m, false});
  const float* alphap = c.vec({"alpha", alpha, false});
  TORCH_CHECK(beta.has_value() == gamma.has_value(), "fastipirm_cuda::masked_grad: give both "
              "beta and gamma (the key penalty's second term), or neither");
  const float* betap = gamma ? c.vec({"beta", *beta, false}) : nullptr;
  const float* gammap = gamma ? c.vec({"gamma", *gamma, true}) : nullptr;
  at::Tensor dq = c.f32({c.pr.nq, c.pr.d}), dk = c.f32({c.pr.nk, c.pr.d});
  c.launched(fastipirm_cuda::kMaskedGrad, fastipirm_cuda::launch_masked_grad, wp, mp, alphap,
             betap, gammap, f32_ptr(dq), f32_ptr(dk));
  return {dq, dk};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastipirm_cuda, m) {
  m.def("masked_rowstats(Tensor q, Tensor k, Tensor w, Tensor m0, Tensor? qg, Tensor? kg, "
        "Tensor? exclude, int code, float p, float inv_t, bool allow_tf32=False, "
        "int target_blocks=0) -> Tensor[]");
  m.def("masked_colsum(Tensor q, Tensor k, Tensor m, Tensor rho, Tensor sigma, Tensor? qg, "
        "Tensor? kg, Tensor? exclude, int code, float p, float inv_t, bool allow_tf32=False, "
        "int target_blocks=0) -> Tensor");
  m.def("masked_rowsum(Tensor q, Tensor k, Tensor w, Tensor m, Tensor gamma, Tensor? qg, "
        "Tensor? kg, Tensor? exclude, int code, float p, float inv_t, bool allow_tf32=False, "
        "int target_blocks=0) -> Tensor");
  m.def("masked_grad(Tensor q, Tensor k, Tensor w, Tensor m, Tensor alpha, Tensor? beta, "
        "Tensor? gamma, Tensor? qg, Tensor? kg, Tensor? exclude, int code, float p, "
        "float inv_t, bool allow_tf32=False, int target_blocks=0) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastipirm_cuda, CUDA, m) {
  m.impl("masked_rowstats", &masked_rowstats);
  m.impl("masked_colsum", &masked_colsum);
  m.impl("masked_rowsum", &masked_rowsum);
  m.impl("masked_grad", &masked_grad);
}
