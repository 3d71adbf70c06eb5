// fastipirm CUDA kernels of masked_contrastive_loss (kernel set "cuda"): plain C++ launchers.
//
// The four kernels of the contract in fastipirm/ops/masked_glue.py (rowstats, colsum, rowsum,
// grad), over the Q x K pairs of queries and keys. Implemented in
// masked_contrastive_cuda_kernels.cu (no torch headers there: `nvcc -c` compiles it alone); the
// torch bindings are in masked_contrastive_cuda.cpp.
//
// Conventions: `q` (nq, d) and `k` (nk, d) are contiguous, of one feature type (MaskedFeat);
// float16 / bfloat16 only with the dot product and the squared distance (codes 0, 1: tensor-core
// similarity tiles), the l1 / lp similarities (codes 2, 3) read float32 features. Every other
// array is contiguous float32 (vectors) or int64 (groups, exclusions); every output is float32 and
// fully written by the call. Pointers are device pointers; the launches are asynchronous on
// `stream`. Deterministic: no atomics, a fixed summation order (the split of the key / query side
// over blocks, `target_blocks`, is part of that order: same inputs and target, same bits).
//
// Each launcher needs a device workspace of masked_workspace_bytes(problem, op) bytes (0: `work`
// may be null) and returns cudaSuccess or the launch error (cudaErrorInvalidValue for arguments
// it does not support; the bindings check shapes and dtypes first).
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

namespace fastipirm_cuda {

enum MaskedFeat : int { kMaskedF32 = 0, kMaskedF16 = 1, kMaskedBF16 = 2 };
enum MaskedOp : int { kMaskedRowstats = 0, kMaskedColsum = 1, kMaskedRowsum = 2, kMaskedGrad = 3 };

// One call's pairs: the similarity s = dot (code 0), -|q-k|^2 (1), -|q-k|_1 (2),
// -sum_d |q_d-k_d|^p (3), logits x = s * inv_t. Pair (i, j) is a negative iff qg[i] == kg[j]
// (no groups: always) and j is not among exclude[i, 0..ne-1] (-1 or any value outside [0, nk):
// no column). allow_tf32: float32 dot / squared-distance tiles on TF32 tensor cores (torch's
// float32 matmul precision decides), else exact fp32 FMAs.
struct MaskedProblem {
  const void* q;
  const void* k;
  int feat_type;
  bool allow_tf32;
  int nq, nk, d;
  int code;
  float p;
  float inv_t;
  const int64_t* qg;       // (nq) or null (then kg is null too)
  const int64_t* kg;       // (nk)
  const int64_t* exclude;  // (nq, ne) or null
  int ne;
  int target_blocks;       // blocks the split of the streamed side aims at (>= 1)
};

size_t masked_workspace_bytes(const MaskedProblem& pr, int op);

// m (nq) = max(m0, max_{j: w_j > 0} x_ij), z (nq) = sum_j w_j e^{x_ij - m_i}; w (nk), m0 (nq).
cudaError_t launch_masked_rowstats(const MaskedProblem& pr, const float* w, const float* m0,
                                   float* m, float* z, void* work, cudaStream_t stream);
// a (nk): a_j = sum_i e^{x_ij - m_i} (rho_i x_ij + sigma_i); m, rho, sigma (nq).
cudaError_t launch_masked_colsum(const MaskedProblem& pr, const float* m, const float* rho,
                                 const float* sigma, float* a, void* work, cudaStream_t stream);
// r (nq): r_i = sum_j w_j gamma_j e^{x_ij - m_i} x_ij; w, gamma (nk), m (nq).
cudaError_t launch_masked_rowsum(const MaskedProblem& pr, const float* w, const float* m,
                                 const float* gamma, float* r, void* work, cudaStream_t stream);
// G_ij = w_j e^{x_ij - m_i} (alpha_i + beta_i gamma_j (1 + x_ij)) (gamma null: alpha_i only);
// dq (nq, d) = sum_j G_ij dx_ij/dq_i, dk (nk, d) = sum_i G_ij dx_ij/dk_j: two passes.
cudaError_t launch_masked_grad(const MaskedProblem& pr, const float* w, const float* m,
                               const float* alpha, const float* beta, const float* gamma,
                               float* dq, float* dk, void* work, cudaStream_t stream);

// Dynamic shared memory of one block of the main kernel of `op` (bytes), for tests and docs.
int masked_smem_bytes(int feat_type, bool allow_tf32, int op);

}  // namespace fastipirm_cuda
