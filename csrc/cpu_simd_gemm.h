// fastipirm C++ CPU kernels: the helpers both kernel files share (csrc/env_contrastive_cpu.cpp,
// csrc/masked_contrastive_cpu.cpp), header-only:
//
//   Vec, loadu, storeu   64-byte GCC vector types (AVX-512 / AVX2 / NEON alike), unaligned access;
//   vexp                 the vectorised exponential (Cephes expf for float, std::exp per lane for
//                        double);
//   gemm_acc             O += A B with a register-blocked micro-kernel (micro, micro_rows);
//   padded_rows          a contiguous copy of a tensor with zero rows appended (tile padding).
//
// Inline functions and templates only: one definition for both translation units, which the
// extension compiles with the same flags (fastipirm/ops/build.py).
#pragma once

#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastipirm {
namespace cpu {

// ------------------------------------------------------------------------------------------------
// vector types
// ------------------------------------------------------------------------------------------------

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int kLanes = 64 / sizeof(T);
};

template <typename T>
inline typename Vec<T>::type loadu(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void storeu(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// ------------------------------------------------------------------------------------------------
// the exponential
// ------------------------------------------------------------------------------------------------

// exp on one vector (Cephes expf: 2^n * p(r), |r| <= ln2/2, ~1 ulp); inputs above 88 are clamped,
// below -87.3 (and -inf) give 0. Vector-extension code, so it vectorises on any SIMD width.
inline Vec<float>::type vexp(Vec<float>::type v) {
  using V = Vec<float>::type;
  typedef int32_t VI __attribute__((vector_size(64)));
  const VI under = v < -87.3f;
  v = v > 88.0f ? V{} + 88.0f : v;
  v = v < -87.3f ? V{} - 87.3f : v;
  const V t = v * 1.44269504088896341f + 0.5f;
  VI n = __builtin_convertvector(t, VI);               // truncation; make it floor
  n += __builtin_convertvector(n, V) > t;              // true is -1
  const V fx = __builtin_convertvector(n, V);
  const V r = v - fx * 0.693359375f + fx * 2.12194440e-4f;
  V y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
          4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const V scale = (V)((n + 127) << 23);
  return under ? V{} : y * scale;
}

// double: std::exp lane by lane
inline Vec<double>::type vexp(Vec<double>::type v) {
  for (int l = 0; l < Vec<double>::kLanes; ++l) v[l] = std::exp(v[l]);
  return v;
}

// ------------------------------------------------------------------------------------------------
// the GEMM micro-kernel
// ------------------------------------------------------------------------------------------------

// O[RB x NV*L] += A[RB x K] B[K x NV*L]: A[r][k] = a[r * ars + k * aks] (so A may be a transposed
// tile), B and O row-major with leading dimensions ldb, ldo.
template <typename T, int RB, int NV>
inline void micro(int64_t k_dim, const T* __restrict a, int64_t ars, int64_t aks,
                  const T* __restrict b, int64_t ldb, T* __restrict o, int64_t ldo) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::kLanes;
  V acc[RB][NV];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = loadu(o + r * ldo + v * L);
  for (int64_t k = 0; k < k_dim; ++k) {
    V bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      bv[v] = loadu(b + k * ldb + v * L);
#if defined(__x86_64__)
      asm("" : "+v"(bv[v]));  // keep the row of b in a register (GCC re-loads it per FMA)
#endif
    }
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const T s = a[r * ars + k * aks];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += bv[v] * s;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) storeu(o + r * ldo + v * L, acc[r][v]);
}

template <typename T, int RB, int NV>
inline void micro_rows(int64_t rows, int64_t k_dim, const T* a, int64_t ars, int64_t aks,
                       const T* b, int64_t ldb, T* o, int64_t ldo) {
  int64_t r = 0;
  for (; r + RB <= rows; r += RB)
    micro<T, RB, NV>(k_dim, a + r * ars, ars, aks, b, ldb, o + r * ldo, ldo);
  for (; r < rows; ++r) micro<T, 1, NV>(k_dim, a + r * ars, ars, aks, b, ldb, o + r * ldo, ldo);
}

// O[rows x cols] += A[rows x K] B[K x cols], A[r][k] = a[r * ars + k * aks]; every output element
// sums over k in order, whichever block computes it.
template <typename T>
void gemm_acc(int64_t rows, int64_t cols, int64_t k_dim, const T* a, int64_t ars, int64_t aks,
              const T* b, int64_t ldb, T* o, int64_t ldo) {
  constexpr int L = Vec<T>::kLanes;
  int64_t c = 0;
  for (; c + 4 * L <= cols; c += 4 * L)
    micro_rows<T, 4, 4>(rows, k_dim, a, ars, aks, b + c, ldb, o + c, ldo);
  for (; c + 2 * L <= cols; c += 2 * L)
    micro_rows<T, 6, 2>(rows, k_dim, a, ars, aks, b + c, ldb, o + c, ldo);
  for (; c + L <= cols; c += L)
    micro_rows<T, 8, 1>(rows, k_dim, a, ars, aks, b + c, ldb, o + c, ldo);
  if (c < cols) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < k_dim; ++k) {
        const T s = a[r * ars + k * aks];
        for (int64_t cc = c; cc < cols; ++cc) o[r * ldo + cc] += s * b[k * ldb + cc];
      }
  }
}

// ------------------------------------------------------------------------------------------------
// tile padding
// ------------------------------------------------------------------------------------------------

// A (npad, cols) row-major copy of a (rows, cols) tensor with zero rows beyond `rows` (ATen's copy
// kernels: O(N D) preparation, not a hot loop); no copy when rows == npad and x is contiguous.
inline at::Tensor padded_rows(const at::Tensor& x, int64_t npad) {
  if (x.size(0) == npad) return x.contiguous();
  return at::constant_pad_nd(x, {0, 0, 0, npad - x.size(0)}).contiguous();
}

}  // namespace cpu
}  // namespace fastipirm
