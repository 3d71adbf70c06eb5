// fastipirm CUDA kernels of the fused env_contrastive op: plain C++ launch functions.
//
// The three kernels of fastipirm/ops/fused.py (row statistics, band reductions, gradients), the
// same computation as the Triton kernels of kernels/env_contrastive.py. Implemented in
// env_contrastive_cuda_kernels.cu (no torch headers there: `nvcc -c` compiles it alone); the torch
// bindings are in env_contrastive_cuda.cpp.
//
// Conventions: `feats` is the contiguous (n, d) matrix F = [z1; z2] (n = 2 * batch) in float32,
// float16 or bfloat16 (FeatType); every other array is contiguous float32; every statistic and
// output is float32 and fully written by the call (no zero-initialisation needed). Pointers are
// device pointers; the launches are asynchronous on `stream`. `allow_tf32` only matters for
// float32 features: the similarity tiles then use TF32 tensor cores (torch's "high" float32
// matmul precision), otherwise exact fp32 FMAs (the Triton backend's "ieee"). float16/bfloat16
// similarity tiles use tensor cores (fp32 accumulation). Deterministic: no atomics, fixed
// summation order.
//
// Each function returns cudaSuccess or the error of the launch (cudaErrorInvalidValue for
// arguments it does not support; the bindings check shapes and dtypes before calling).
#pragma once

#include <cuda_runtime_api.h>

namespace fastipirm_cuda {

enum FeatType : int { kFeatF32 = 0, kFeatF16 = 1, kFeatBF16 = 2 };

// mrow (n): row shift (running max of S over the negatives of each row, started at spos);
// zn (n, m) = E W2 at t1; znt (n, m) = E~ W2 at t2 (written only when two_t; may be null then).
// spos (n), w2 (n, m).
cudaError_t launch_rowstats(const void* feats, int feat_type, bool allow_tf32, const float* spos,
                            const float* w2, float* mrow, float* zn, float* znt, int n, int d,
                            int m, int batch, float t1, float t2, bool two_t,
                            cudaStream_t stream);

// trans: out (nb, n, g)[b, p] = sum_q band_b(q, p) K~_qp fac[0, q]        (fac: (1, n, g))
// else:  out (1, n, g)[0, p]  = sum_q sum_b band_b(p, q) K~_pq fac[b, q]  (fac: (nb, n, g))
// nb = 1: the whole negative mask is the single band. mrow (n).
cudaError_t launch_band(const void* feats, int feat_type, bool allow_tf32, const float* mrow,
                        const float* fac, float* out, int n, int d, int g, int batch, float t2,
                        bool trans, int nb, cudaStream_t stream);

// df (n, d) = sum_q (dS_pq + dS_qp) F_q over negatives; gw (n, m) (written when need_gw, may be
// null otherwise) = sum_a E_ac gz1_a + E~_ac gz2_a. w2, gz1, gz2 (n, m); rc (n, g);
// gacc (nb, n, g). Without two_t gz2 is not read (gz1 holds the merged gradient).
cudaError_t launch_grad(const void* feats, int feat_type, bool allow_tf32, const float* mrow,
                        const float* w2, const float* gz1, const float* gz2, const float* rc,
                        const float* gacc, float* df, float* gw, int n, int d, int m, int g,
                        int batch, float t1, float t2, bool two_t, int nb, bool need_gw,
                        cudaStream_t stream);

// Dynamic shared memory of one block of each kernel (bytes), for tests and the bindings' docs.
int rowstats_smem_bytes(int feat_type, bool allow_tf32, bool two_t);
int band_smem_bytes(int feat_type, bool allow_tf32, bool trans, int nb);
int grad_smem_bytes(int feat_type, bool allow_tf32, bool two_t, bool need_gw);

}  // namespace fastipirm_cuda
