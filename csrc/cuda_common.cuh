// Device helpers shared by the two CUDA kernel sets of fastipirm._cuda
// (env_contrastive_cuda_kernels.cu and masked_contrastive_cuda_kernels.cu).
//
// * Feat<T>: what the kernels need to know of a feature type (float32, float16, bfloat16);
// * shared-memory carving (Carve: consecutive 128-byte aligned sections), the byte counts of a
//   similarity tile's staging area and of a transposed fp32 tile;
// * the similarity tile sim_tile: St[s * (BM + 4) + o] = sim(A[a0 + o], Bm[b0 + s]) for a block of
//   BM rows of A and BN rows of Bm, over chunks of kKC feature columns staged in shared memory
//   transposed (At[k][o], Bt[k][s]): nvcuda::wmma tensor-core fragments for float16 / bfloat16
//   (m16n16k16) and for float32 with TF32 (m16n16k8, operands rounded with __float_to_tf32), fp32
//   accumulation; exact fp32 FMAs otherwise, thread (ty, tx) = (tid / 16, tid % 16) owning
//   St[tx + 16 j][ty + 16 i] (sim_fma; mm_acc, its dot product, also serves the env kernels'
//   other fp32 micro-tile products);
// * the launchers' kernel variant of a feature type code (dispatch_feat) and their opt-in to more
//   than 48 KB of dynamic shared memory (allow_smem).
//
// No kernels, no launches and no `extern __shared__` declaration here: those stay in the kernel
// files, which the tests' host emulation (tests/cuda_emulation.py) rewrites; this header compiles
// unchanged against its stand-in CUDA headers. No torch headers (`nvcc -c` compiles each kernel
// file alone). Everything is in fastipirm_cuda::kernel_common (each kernel file: `using namespace
// kernel_common;`).
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <type_traits>

namespace fastipirm_cuda {
namespace kernel_common {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;  // threads per block: 8 warps; a 16 x 16 grid for the FMA tiles
constexpr int kKC = 32;        // feature columns staged per step of the similarity tile

// the feature type codes of both kernel sets' launchers (FeatType, MaskedFeat)
constexpr int kCodeF32 = 0, kCodeF16 = 1, kCodeBF16 = 2;

template <typename T> struct Feat;
template <> struct Feat<float> {
  static constexpr int pad = 4;  // staging row padding (elements): ldm multiple of 16 bytes
  static constexpr bool half = false;
  __device__ static float zero() { return 0.f; }
  __device__ static float to_float(float x) { return x; }
};
template <> struct Feat<__half> {
  static constexpr int pad = 8;
  static constexpr bool half = true;
  __device__ static __half zero() { return __float2half(0.f); }
  __device__ static float to_float(__half x) { return __half2float(x); }
};
template <> struct Feat<__nv_bfloat16> {
  static constexpr int pad = 8;
  static constexpr bool half = true;
  __device__ static __nv_bfloat16 zero() { return __float2bfloat16(0.f); }
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
};

__host__ __device__ constexpr size_t align128(size_t x) { return (x + 127) / 128 * 128; }
__host__ __device__ constexpr size_t max_size(size_t a, size_t b) { return a > b ? a : b; }
__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr int imax(int a, int b) { return a > b ? a : b; }

struct Carve {  // consecutive 128-byte aligned sections of the dynamic shared memory
  size_t off = 0;
  __host__ __device__ size_t take(size_t bytes) {
    const size_t o = off;
    off += align128(bytes);
    return o;
  }
};

// the staging area of sim_tile<T, ..., BM, BN> (At, then Bt)
template <typename T, int BM, int BN>
__host__ __device__ constexpr size_t stage_bytes() {
  return align128(sizeof(T) * kKC * (BM + Feat<T>::pad)) +
         align128(sizeof(T) * kKC * (BN + Feat<T>::pad));
}

__host__ __device__ constexpr size_t tile_bytes(int bm, int bn) {
  return sizeof(float) * bn * (bm + 4);  // a transposed (bn x bm) fp32 tile, rows padded by 4
}

// rows row0 .. row0 + R - 1, feature columns k0 .. k0 + kKC - 1 of F (N x D), transposed into
// dst[k * (R + pad) + r], zero outside F
template <typename T, int R>
__device__ __forceinline__ void load_feat_t(const T* __restrict__ F, int N, int D, int row0, int k0,
                                            T* __restrict__ dst) {
  constexpr int ld = R + Feat<T>::pad;
  for (int o = threadIdx.x; o < R * kKC; o += kThreads) {
    const int r = o / kKC, k = o - r * kKC;
    const int gr = row0 + r, gk = k0 + k;
    dst[k * ld + r] = (gr < N && gk < D) ? F[(size_t)gr * D + gk] : Feat<T>::zero();
  }
}

// acc + f_C(a, b), the term of one feature: a b (C = 0), (a - b)^2, |a - b|, |a - b|^p
template <int C>
__device__ __forceinline__ float sim_acc(float acc, float a, float b, float p) {
  if constexpr (C == 0) {
    return fmaf(a, b, acc);
  } else {
    const float d = a - b;
    if constexpr (C == 1) return fmaf(d, d, acc);
    if constexpr (C == 2) return acc + fabsf(d);
    return acc + exp2f(p * log2f(fabsf(d)));  // |d| = 0: exp2f(-inf) = 0 (p >= 1)
  }
}

// acc[i][j] += sum_k f_C(At[k * lda + ty + 16 i], Bt[k * ldb + tx + 16 j]) (p: only for C = 3)
template <int C, int RM, int RN>
__device__ __forceinline__ void sim_fma(float (&acc)[RM][RN], const float* __restrict__ At,
                                        int lda, const float* __restrict__ Bt, int ldb, int K,
                                        int ty, int tx, float p) {
  for (int k = 0; k < K; ++k) {
    float a[RM], b[RN];
#pragma unroll
    for (int i = 0; i < RM; ++i) a[i] = At[k * lda + ty + 16 * i];
#pragma unroll
    for (int j = 0; j < RN; ++j) b[j] = Bt[k * ldb + tx + 16 * j];
#pragma unroll
    for (int i = 0; i < RM; ++i) {
#pragma unroll
      for (int j = 0; j < RN; ++j) acc[i][j] = sim_acc<C>(acc[i][j], a[i], b[j], p);
    }
  }
}

// acc[i][j] += sum_k At[k * lda + ty + 16 i] * Bt[k * ldb + tx + 16 j]
template <int RM, int RN>
__device__ __forceinline__ void mm_acc(float (&acc)[RM][RN], const float* __restrict__ At, int lda,
                                       const float* __restrict__ Bt, int ldb, int K, int ty,
                                       int tx) {
  sim_fma<0, RM, RN>(acc, At, lda, Bt, ldb, K, ty, tx, 0.f);
}

// St[s * (BM + 4) + o] = sim(A[a0 + o], Bm[b0 + s]) for o < BM, s < BN (the similarity itself:
// the dot product or, with DIST, minus the distance of `code`: 1 squared, 2 l1, 3 sum |.|^p; code 0
// the dot product); rows past na / nb read as zeros. `stage` holds stage_bytes<T, BM, BN>(); an
// (BM) / bn (BN): scratch for the norms of the squared distance on tensor cores (|a|^2 + |b|^2 -
// 2 a.b clamped at 0, the norms summed in fp32 from the staged chunks; unused without DIST). On
// the FMA tiles the distances are elementwise (no cancellation). Starts with a barrier (the
// previous readers of the staging area, St, an and bn are done); the caller synchronises before
// reading St.
template <typename T, bool TF32, int BM, int BN, bool DIST>
__device__ __forceinline__ void sim_tile(const T* __restrict__ A, int na, const T* __restrict__ Bm,
                                         int nb, int D, int a0, int b0, int code, float p,
                                         unsigned char* stage, float* __restrict__ St,
                                         float* __restrict__ an, float* __restrict__ bn) {
  constexpr int lda = BM + Feat<T>::pad, ldb = BN + Feat<T>::pad, lds = BM + 4;
  T* At = reinterpret_cast<T*>(stage);
  T* Bt = reinterpret_cast<T*>(stage + align128(sizeof(T) * kKC * lda));
  const int tid = threadIdx.x;
  __syncthreads();
  if constexpr (Feat<T>::half || TF32) {
    constexpr int FM = BM / 16, FN = BN / 16, NW = kThreads / 32;
    static_assert((FM * FN) % NW == 0, "fragments must split evenly over the warps");
    static_assert(!DIST || BM + BN <= kThreads, "a thread per row for the norms");
    constexpr int FPW = FM * FN / NW;
    constexpr int KS = Feat<T>::half ? 16 : 8;
    using Prec = typename std::conditional<Feat<T>::half, T, wmma::precision::tf32>::type;
    const int warp = tid / 32;
    const bool norms = DIST && code == 1;
    float nrm = 0.f;  // threads < BM: |A row|^2, BM .. BM + BN - 1: |Bm row|^2
    wmma::fragment<wmma::accumulator, 16, 16, KS, float> acc[FPW];
#pragma unroll
    for (int t = 0; t < FPW; ++t) wmma::fill_fragment(acc[t], 0.f);
    for (int k0 = 0; k0 < D; k0 += kKC) {
      load_feat_t<T, BM>(A, na, D, a0, k0, At);
      load_feat_t<T, BN>(Bm, nb, D, b0, k0, Bt);
      __syncthreads();
      const int kend = D - k0;  // block-uniform; the staged columns beyond D are zeros
#pragma unroll
      for (int kk = 0; kk < kKC; kk += KS) {
        if (kk < kend) {
#pragma unroll
          for (int t = 0; t < FPW; ++t) {
            const int f = warp * FPW + t, fm = f / FN, fn = f % FN;
            wmma::fragment<wmma::matrix_a, 16, 16, KS, Prec, wmma::col_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, KS, Prec, wmma::row_major> b;
            wmma::load_matrix_sync(a, At + kk * lda + fm * 16, lda);
            wmma::load_matrix_sync(b, Bt + kk * ldb + fn * 16, ldb);
            if constexpr (!Feat<T>::half) {
#pragma unroll
              for (int e = 0; e < a.num_elements; ++e) a.x[e] = wmma::__float_to_tf32(a.x[e]);
#pragma unroll
              for (int e = 0; e < b.num_elements; ++e) b.x[e] = wmma::__float_to_tf32(b.x[e]);
            }
            wmma::mma_sync(acc[t], a, b, acc[t]);
          }
        }
      }
      if (norms && tid < BM + BN) {
        const T* src = tid < BM ? At + tid : Bt + (tid - BM);
        const int ld = tid < BM ? lda : ldb;
        const int kc = imin(kKC, kend);
        for (int k = 0; k < kc; ++k) {
          const float v = Feat<T>::to_float(src[k * ld]);
          nrm = fmaf(v, v, nrm);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int t = 0; t < FPW; ++t) {
      const int f = warp * FPW + t, fm = f / FN, fn = f % FN;
      wmma::store_matrix_sync(St + fn * 16 * lds + fm * 16, acc[t], lds, wmma::mem_col_major);
    }
    if (norms) {
      if (tid < BM) {
        an[tid] = nrm;
      } else if (tid < BM + BN) {
        bn[tid - BM] = nrm;
      }
      __syncthreads();
      for (int e = tid; e < BM * BN; e += kThreads) {
        const int s = e / BM, o = e - s * BM;
        float* v = St + s * lds + o;
        *v = -fmaxf(an[o] + bn[s] - 2.f * *v, 0.f);
      }
    }
  } else {
    static_assert(std::is_same<T, float>::value, "the FMA tiles read float32 features");
    constexpr int RM = BM / 16, RN = BN / 16;
    const int ty = tid / 16, tx = tid % 16;
    float acc[RM][RN];
#pragma unroll
    for (int i = 0; i < RM; ++i) {
#pragma unroll
      for (int j = 0; j < RN; ++j) acc[i][j] = 0.f;
    }
    for (int k0 = 0; k0 < D; k0 += kKC) {
      load_feat_t<T, BM>(A, na, D, a0, k0, At);
      load_feat_t<T, BN>(Bm, nb, D, b0, k0, Bt);
      __syncthreads();
      const int kc = imin(kKC, D - k0);
      if constexpr (DIST) {
        switch (code) {
          case 0: sim_fma<0>(acc, At, lda, Bt, ldb, kc, ty, tx, p); break;
          case 1: sim_fma<1>(acc, At, lda, Bt, ldb, kc, ty, tx, p); break;
          case 2: sim_fma<2>(acc, At, lda, Bt, ldb, kc, ty, tx, p); break;
          default: sim_fma<3>(acc, At, lda, Bt, ldb, kc, ty, tx, p); break;
        }
      } else {
        mm_acc(acc, At, lda, Bt, ldb, kc, ty, tx);
      }
      __syncthreads();
    }
    const float sign = code == 0 ? 1.f : -1.f;
#pragma unroll
    for (int i = 0; i < RM; ++i) {
#pragma unroll
      for (int j = 0; j < RN; ++j)
        St[(tx + 16 * j) * lds + ty + 16 * i] = DIST ? sign * acc[i][j] : acc[i][j];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// launchers
// ------------------------------------------------------------------------------------------------

template <typename T, bool TF32> struct Tag {
  using type = T;
  static constexpr bool tf32 = TF32;
};

// fn(Tag<T, TF32>()) for the kernel variant of a feature type code (kCode*): float16 / bfloat16
// (tensor cores), float32 with TF32 tensor cores (allow_tf32) or with FMAs; `invalid` for any
// other code
template <typename R, typename Fn>
R dispatch_feat(int feat_type, bool allow_tf32, R invalid, Fn&& fn) {
  switch (feat_type) {
    case kCodeF16: return fn(Tag<__half, false>());
    case kCodeBF16: return fn(Tag<__nv_bfloat16, false>());
    case kCodeF32: return allow_tf32 ? fn(Tag<float, true>()) : fn(Tag<float, false>());
    default: return invalid;
  }
}

// more than the default 48 KB of dynamic shared memory for `kernel` where it needs it
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
}

}  // namespace kernel_common
}  // namespace fastipirm_cuda
