// fastipirm CUDA kernels of the fused env_contrastive op (backend "cuda").
//
// The three kernels of fastipirm/ops/fused.py, computing exactly what the Triton kernels of
// kernels/env_contrastive.py compute (_rowstats_kernel, _band_kernel, _grad_kernel); read the
// module docstrings there for the math. No torch headers: `nvcc -c` compiles this file alone (the
// CI syntax check); the torch bindings are in env_contrastive_cuda.cpp.
//
// Structure (all three kernels)
// -----------------------------
// * grid over blocks of BM rows, a loop over tiles of BN columns; no atomics, no N x N buffer,
//   each block owns its output rows: deterministic.
// * 256 threads (8 warps). The similarity tile S = F_rows F_cols^T (BM x BN, fp32) is computed
//   over chunks of kKC = 32 feature columns staged in shared memory *transposed* (At[k][row],
//   Bt[k][col]), then stored to shared memory transposed as well: St[col][row] (sim_tile of
//   cuda_common.cuh, shared with the masked kernels). Every epilogue (masks, shifts,
//   exponentials) reads St and writes its result in place.
//   - float16 / bfloat16 features: nvcuda::wmma m16n16k16, fp32 accumulation. A fragment:
//     col_major from At (A[m][k] = At[k * lda + m]); B fragment: row_major from Bt
//     (B[k][n] = Bt[k * ldb + n] = F_col[n][k]); the 16 x 16 accumulators of a BM x BN tile are
//     spread over the 8 warps (warp w owns fragments f = w * FPW + t, t < FPW, at fragment row
//     f / FN, column f % FN) and stored with mem_col_major at St + col0 * lds + row0, which puts
//     S[row][col] at St[col * lds + row]. Masks and shifts are applied on that shared-memory copy.
//   - float32 features, allow_tf32: the same with wmma m16n16k8 precision::tf32 fragments (the
//     operands rounded with __float_to_tf32), only where torch's float32 matmul precision allows
//     TF32 (the Triton backend's rule).
//   - float32 features otherwise: exact fp32 FMAs (the Triton backend's "ieee"): thread
//     (ty, tx) = (tid / 16, tid % 16) owns S[ty + 16 i][tx + 16 j].
// * the narrow environment products (widths M, G, per launch windows of kWin = 64 columns) and
//   the dF product run on fp32 FMAs from shared memory, thread (ty, tx) owning rows ty + 16 i and
//   columns tx + 16 j of its output; accumulators in registers.
// * exponentials: exp2f((s - m) * log2(e) / T) as Triton's exp2 (no --use_fast_math needed).
//
// Masks (anchor a, other c, both < N = 2B): negative iff a mod B != c mod B (symmetric); band of
// the other c for an anchor with sample index i = a mod B: lo (0) c < i, hi (2) c > i + B, mid (1)
// otherwise.
//
// Shared memory per block (bytes, max over the variants; all below the 99 KB opt-in limit of sm_86
// and far below sm_80's 163 KB and sm_90's 227 KB):
//   rowstats (BM = BN = 64): stage 9216 (16-bit) / 17408 (fp32) + St 17408 + P~ 17408 (two
//     temperatures) + W tile 16384 + row/col vectors 2304            -> at most 70912
//   band (BM = BN = 64): stage + St 17408 + factor tiles (1 or 3) x 16384 + vectors 1024
//                                                                     -> at most 84992
//   grad (BM = 32, BN = 64): scratch max(stage, narrow-dot stage 13312, dF chunk 16384) + St 9216
//     + E^T (1 or 2) x 9216 + gZN tiles (1 or 2) x 16384 + vectors 640 -> at most 77440
#include "env_contrastive_cuda.h"

#include "cuda_common.cuh"

namespace fastipirm_cuda {
namespace {

using namespace kernel_common;  // kThreads (256), kKC (32), Feat, Carve, sim_tile, dispatch_feat

static_assert(kFeatF32 == kCodeF32 && kFeatF16 == kCodeF16 && kFeatBF16 == kCodeBF16,
              "FeatType codes are the kCode* of dispatch_feat");

constexpr int kEC = 32;          // environment / group columns staged per step of grad's dots
constexpr int kWin = 64;         // environment / group columns per launch (register accumulators)
constexpr int kNP = kWin / 16;   // 16-wide column passes per window
constexpr int kDC = 64;          // dF columns per step
constexpr int kDWin = 256;       // dF columns per grad launch
constexpr int kNDC = kDWin / kDC;
constexpr double kLog2e = 1.4426950408889634;

constexpr int RS_BM = 64, RS_BN = 64;   // rowstats
constexpr int BD_BM = 64, BD_BN = 64;   // band
constexpr int GR_BM = 32, GR_BN = 64;   // grad (more live tiles: smaller row blocks)

struct RowstatsSmem { size_t stage, st, p2, ws, pmax, mrun, al1, al2, rmod, cmod, total; };
template <typename T>
__host__ __device__ RowstatsSmem rowstats_smem(bool two_t) {
  Carve c;
  RowstatsSmem s;
  s.stage = c.take(stage_bytes<T, RS_BM, RS_BN>());
  s.st = c.take(tile_bytes(RS_BM, RS_BN));
  s.p2 = c.take(two_t ? tile_bytes(RS_BM, RS_BN) : 0);
  s.ws = c.take(sizeof(float) * RS_BN * kWin);
  s.pmax = c.take(sizeof(float) * 4 * RS_BM);
  s.mrun = c.take(sizeof(float) * RS_BM);
  s.al1 = c.take(sizeof(float) * RS_BM);
  s.al2 = c.take(sizeof(float) * RS_BM);
  s.rmod = c.take(sizeof(int) * RS_BM);
  s.cmod = c.take(sizeof(int) * RS_BN);
  s.total = c.off;
  return s;
}

struct BandSmem { size_t stage, st, fs, mr, mcol, rmod, cmod, total; };
template <typename T>
__host__ __device__ BandSmem band_smem(bool trans, int nb) {
  Carve c;
  BandSmem s;
  s.stage = c.take(stage_bytes<T, BD_BM, BD_BN>());
  s.st = c.take(tile_bytes(BD_BM, BD_BN));
  s.fs = c.take(sizeof(float) * (trans ? 1 : nb) * BD_BN * kWin);
  s.mr = c.take(sizeof(float) * BD_BM);
  s.mcol = c.take(sizeof(float) * BD_BN);
  s.rmod = c.take(sizeof(int) * BD_BM);
  s.cmod = c.take(sizeof(int) * BD_BN);
  s.total = c.off;
  return s;
}

struct GradSmem { size_t stage, st, e1, e2, g1, g2, mr, mcol, cmod, total; };
template <typename T>
__host__ __device__ GradSmem grad_smem(bool two_t, bool need_gw) {
  Carve c;
  GradSmem s;
  const size_t dots = align128(sizeof(float) * kEC * (GR_BM + 4)) +
                      align128(sizeof(float) * kEC * (GR_BN + 4));
  const size_t fchunk = sizeof(float) * GR_BN * kDC;
  s.stage = c.take(max_size(stage_bytes<T, GR_BM, GR_BN>(), max_size(dots, fchunk)));
  s.st = c.take(tile_bytes(GR_BM, GR_BN));
  s.e1 = c.take(need_gw ? tile_bytes(GR_BM, GR_BN) : 0);
  s.e2 = c.take(need_gw && two_t ? tile_bytes(GR_BM, GR_BN) : 0);
  s.g1 = c.take(need_gw ? sizeof(float) * GR_BN * kWin : 0);
  s.g2 = c.take(need_gw && two_t ? sizeof(float) * GR_BN * kWin : 0);
  s.mr = c.take(sizeof(float) * GR_BM);
  s.mcol = c.take(sizeof(float) * GR_BN);
  s.cmod = c.take(sizeof(int) * GR_BN);
  s.total = c.off;
  return s;
}

// ------------------------------------------------------------------------------------------------
// device helpers
// ------------------------------------------------------------------------------------------------

// negative pair from the sample indices (mod B) of row and column; invalid rows carry -2 and
// invalid columns -1, so they are never negatives
__device__ __forceinline__ bool negpair(int rmod, int cmod) {
  return rmod >= 0 && cmod >= 0 && rmod != cmod;
}

// band of `other` for an anchor of sample index i: 0 (other < i), 2 (other > i + B), else 1
__device__ __forceinline__ int band_of(int other, int i, int B) {
  return other < i ? 0 : (other > i + B ? 2 : 1);
}

// St[q * (BM + 4) + p] = S[r0 + p][c0 + q] = F[r0 + p] . F[c0 + q] (0 outside F): sim_tile of F
// with itself. Starts with a barrier (previous readers of the staging area and of St are done);
// the caller synchronises before reading St.
template <typename T, bool TF32, int BM, int BN>
__device__ __forceinline__ void s_tile(const T* __restrict__ F, int N, int D, int r0, int c0,
                                       unsigned char* stage, float* __restrict__ St) {
  sim_tile<T, TF32, BM, BN, false>(F, N, F, N, D, r0, c0, 0, 0.f, stage, St, nullptr, nullptr);
}

// X[i][j] = sum_e A[r0 + ty + 16 i][e] * Bm[c0 + tx + 16 j][e] for (N x K) row-major A and Bm
// with row stride ld (0 outside); staged through `stage` in chunks of kEC columns
template <int BM, int BN>
__device__ __forceinline__ void narrow_dot(float (&X)[BM / 16][BN / 16],
                                           const float* __restrict__ A,
                                           const float* __restrict__ Bm, int ld, int K, int r0,
                                           int c0, int N, float* stage, int ty, int tx) {
  constexpr int la = BM + 4, lb = BN + 4;
  float* As = stage;
  float* Bs = stage + align128(sizeof(float) * kEC * la) / sizeof(float);
#pragma unroll
  for (int i = 0; i < BM / 16; ++i) {
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) X[i][j] = 0.f;
  }
  for (int e0 = 0; e0 < K; e0 += kEC) {
    __syncthreads();  // previous readers of the staging area are done
    for (int o = threadIdx.x; o < BM * kEC; o += kThreads) {
      const int r = o / kEC, e = o - r * kEC, gr = r0 + r, ge = e0 + e;
      As[e * la + r] = (gr < N && ge < K) ? A[(size_t)gr * ld + ge] : 0.f;
    }
    for (int o = threadIdx.x; o < BN * kEC; o += kThreads) {
      const int q = o / kEC, e = o - q * kEC, gc = c0 + q, ge = e0 + e;
      Bs[e * lb + q] = (gc < N && ge < K) ? Bm[(size_t)gc * ld + ge] : 0.f;
    }
    __syncthreads();
    mm_acc<BM / 16, BN / 16>(X, As, la, Bs, lb, min(kEC, K - e0), ty, tx);
  }
}

// ------------------------------------------------------------------------------------------------
// kernels
// ------------------------------------------------------------------------------------------------

// Triton's _rowstats_kernel: online row max m (started at spos) over the negatives, running sums
// ZN = E W2 at t1 and ZN~ = E~ W2 at t2 rescaled by exp((m_old - m_new) / T) at each tile.
// One launch handles the E <= kWin environment columns at W, zn, znt (row stride ldw / ldz);
// mrow is the same for every window (recomputed identically).
template <typename T, bool TF32>
__global__ void __launch_bounds__(kThreads)
rowstats_kernel(const T* __restrict__ F, const float* __restrict__ spos,
                const float* __restrict__ W, int ldw, float* __restrict__ mrow,
                float* __restrict__ zn, float* __restrict__ znt, int ldz, int N, int B, int D,
                int E, bool two_t, float sc1, float sc2) {
  constexpr int BM = RS_BM, BN = RS_BN, lds = BM + 4, RM = BM / 16;
  extern __shared__ __align__(128) unsigned char smem[];
  const RowstatsSmem L = rowstats_smem<T>(two_t);
  float* St = reinterpret_cast<float*>(smem + L.st);
  float* P2 = reinterpret_cast<float*>(smem + L.p2);
  float* Ws = reinterpret_cast<float*>(smem + L.ws);
  float* pmax = reinterpret_cast<float*>(smem + L.pmax);
  float* mrun = reinterpret_cast<float*>(smem + L.mrun);
  float* al1 = reinterpret_cast<float*>(smem + L.al1);
  float* al2 = reinterpret_cast<float*>(smem + L.al2);
  int* rmod = reinterpret_cast<int*>(smem + L.rmod);
  int* cmod = reinterpret_cast<int*>(smem + L.cmod);
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int r0 = blockIdx.x * BM;
  if (tid < BM) {
    const int a = r0 + tid;
    mrun[tid] = a < N ? spos[a] : 0.f;  // the positive logit: a lower bound of the row max
    rmod[tid] = a < N ? a % B : -2;
  }
  float acc1[kNP][RM], acc2[kNP][RM];
#pragma unroll
  for (int np = 0; np < kNP; ++np) {
#pragma unroll
    for (int i = 0; i < RM; ++i) acc1[np][i] = acc2[np][i] = 0.f;
  }
  for (int c0 = 0; c0 < N; c0 += BN) {
    s_tile<T, TF32, BM, BN>(F, N, D, r0, c0, smem + L.stage, St);
    for (int o = tid; o < BN * kWin; o += kThreads) {
      const int q = o / kWin, e = o - q * kWin, c = c0 + q;
      Ws[o] = (c < N && e < E) ? W[(size_t)c * ldw + e] : 0.f;
    }
    if (tid < BN) {
      const int c = c0 + tid;
      cmod[tid] = c < N ? c % B : -1;
    }
    __syncthreads();
    {  // max over the tile's negatives: 4 threads per row, 16 columns each
      static_assert(kThreads == 4 * BM && BN % 4 == 0, "row max split");
      const int p = tid % BM, part = tid / BM, rm = rmod[p];
      float mx = -INFINITY;
#pragma unroll
      for (int qq = 0; qq < BN / 4; ++qq) {
        const int q = part * (BN / 4) + qq;
        if (negpair(rm, cmod[q])) mx = fmaxf(mx, St[q * lds + p]);
      }
      pmax[part * BM + p] = mx;
    }
    __syncthreads();
    if (tid < BM) {  // running max (started at spos, so finite), rescaling factors
      const float m_old = mrun[tid];
      const float mx = fmaxf(fmaxf(m_old, fmaxf(pmax[tid], pmax[BM + tid])),
                             fmaxf(pmax[2 * BM + tid], pmax[3 * BM + tid]));
      al1[tid] = exp2f((m_old - mx) * sc1);
      al2[tid] = exp2f((m_old - mx) * sc2);
      mrun[tid] = mx;
    }
    __syncthreads();
    for (int o = tid; o < BM * BN; o += kThreads) {  // E (in place) and E~ on the negatives
      const int p = o % BM, q = o / BM;
      const bool ng = negpair(rmod[p], cmod[q]);
      const float x = St[q * lds + p] - mrun[p];
      St[q * lds + p] = ng ? exp2f(x * sc1) : 0.f;
      if (two_t) P2[q * lds + p] = ng ? exp2f(x * sc2) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int np = 0; np < kNP; ++np) {
      if (np * 16 < E) {
#pragma unroll
        for (int i = 0; i < RM; ++i) {
          acc1[np][i] *= al1[ty + 16 * i];
          acc2[np][i] *= al2[ty + 16 * i];
        }
        for (int q = 0; q < BN; ++q) {
          const float w = Ws[q * kWin + np * 16 + tx];
#pragma unroll
          for (int i = 0; i < RM; ++i)
            acc1[np][i] = fmaf(St[q * lds + ty + 16 * i], w, acc1[np][i]);
          if (two_t) {
#pragma unroll
            for (int i = 0; i < RM; ++i)
              acc2[np][i] = fmaf(P2[q * lds + ty + 16 * i], w, acc2[np][i]);
          }
        }
      }
    }
  }
  if (tid < BM && r0 + tid < N) mrow[r0 + tid] = mrun[tid];
#pragma unroll
  for (int np = 0; np < kNP; ++np) {
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const int r = r0 + ty + 16 * i, e = np * 16 + tx;
      if (r < N && e < E) {
        zn[(size_t)r * ldz + e] = acc1[np][i];
        if (two_t) znt[(size_t)r * ldz + e] = acc2[np][i];
      }
    }
  }
}

// Triton's _band_kernel. K~_pq = E~_pq S_pq / T' on negatives (anchor p, shift mrow[p]).
// TRANS: out[b][p] = sum_q band_b(q, p) K~_qp fac[0][q] (anchor q: shift mrow[q], S symmetric).
// else:  out[0][p] = sum_q sum_b band_b(p, q) K~_pq fac[b][q].
// One launch handles G <= kWin group columns at fac / out (band strides fac_sb / out_sb, row
// strides ldf / ldo).
template <typename T, bool TF32, bool TRANS>
__global__ void __launch_bounds__(kThreads)
band_kernel(const T* __restrict__ F, const float* __restrict__ mrow,
            const float* __restrict__ fac, size_t fac_sb, int ldf, float* __restrict__ out,
            size_t out_sb, int ldo, int N, int B, int D, int G, int nb, float sc2, float it2) {
  constexpr int BM = BD_BM, BN = BD_BN, lds = BM + 4, RM = BM / 16;
  extern __shared__ __align__(128) unsigned char smem[];
  const BandSmem L = band_smem<T>(TRANS, nb);
  float* St = reinterpret_cast<float*>(smem + L.st);
  float* Fs = reinterpret_cast<float*>(smem + L.fs);
  float* mr = reinterpret_cast<float*>(smem + L.mr);
  float* mcol = reinterpret_cast<float*>(smem + L.mcol);
  int* rmod = reinterpret_cast<int*>(smem + L.rmod);
  int* cmod = reinterpret_cast<int*>(smem + L.cmod);
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int r0 = blockIdx.x * BM;
  const int nbf = TRANS ? 1 : nb;
  if (tid < BM) {
    const int a = r0 + tid;
    mr[tid] = a < N ? mrow[a] : 0.f;
    rmod[tid] = a < N ? a % B : -2;
  }
  int arow[RM], amod[RM];
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    arow[i] = r0 + ty + 16 * i;
    amod[i] = arow[i] < N ? arow[i] % B : -2;
  }
  float acc0[kNP][RM], acc1[kNP][RM], acc2[kNP][RM];
#pragma unroll
  for (int np = 0; np < kNP; ++np) {
#pragma unroll
    for (int i = 0; i < RM; ++i) acc0[np][i] = acc1[np][i] = acc2[np][i] = 0.f;
  }
  for (int c0 = 0; c0 < N; c0 += BN) {
    s_tile<T, TF32, BM, BN>(F, N, D, r0, c0, smem + L.stage, St);
    if (tid < BN) {
      const int c = c0 + tid;
      cmod[tid] = c < N ? c % B : -1;
      mcol[tid] = c < N ? mrow[c] : 0.f;
    }
    for (int o = tid; o < nbf * BN * kWin; o += kThreads) {
      const int b = o / (BN * kWin), rem = o - b * (BN * kWin), q = rem / kWin,
                g = rem - q * kWin, c = c0 + q;
      Fs[o] = (c < N && g < G) ? fac[b * fac_sb + (size_t)c * ldf + g] : 0.f;
    }
    __syncthreads();
    for (int o = tid; o < BM * BN; o += kThreads) {  // K~ in place
      const int p = o % BM, q = o / BM;
      const float s = St[q * lds + p];
      const float m = TRANS ? mcol[q] : mr[p];
      St[q * lds + p] = negpair(rmod[p], cmod[q]) ? exp2f((s - m) * sc2) * (s * it2) : 0.f;
    }
    __syncthreads();
    for (int q = 0; q < BN; ++q) {
      const int c = c0 + q;
      float k[RM];
#pragma unroll
      for (int i = 0; i < RM; ++i) k[i] = St[q * lds + ty + 16 * i];
      if (nb == 1) {
#pragma unroll
        for (int np = 0; np < kNP; ++np) {
          if (np * 16 < G) {
            const float f = Fs[q * kWin + np * 16 + tx];
#pragma unroll
            for (int i = 0; i < RM; ++i) acc0[np][i] = fmaf(k[i], f, acc0[np][i]);
          }
        }
      } else if (TRANS) {
        // anchor: the column c (sample index cmod[q]); other: the row
        const int ci = cmod[q];
        float k0[RM], k1[RM], k2[RM];
#pragma unroll
        for (int i = 0; i < RM; ++i) {
          const int bb = band_of(arow[i], ci, B);
          k0[i] = bb == 0 ? k[i] : 0.f;
          k1[i] = bb == 1 ? k[i] : 0.f;
          k2[i] = bb == 2 ? k[i] : 0.f;
        }
#pragma unroll
        for (int np = 0; np < kNP; ++np) {
          if (np * 16 < G) {
            const float f = Fs[q * kWin + np * 16 + tx];
#pragma unroll
            for (int i = 0; i < RM; ++i) {
              acc0[np][i] = fmaf(k0[i], f, acc0[np][i]);
              acc1[np][i] = fmaf(k1[i], f, acc1[np][i]);
              acc2[np][i] = fmaf(k2[i], f, acc2[np][i]);
            }
          }
        }
      } else {
        // anchor: the row (sample index amod[i]); other: the column c
        int bb[RM];
#pragma unroll
        for (int i = 0; i < RM; ++i) bb[i] = band_of(c, amod[i], B);
#pragma unroll
        for (int np = 0; np < kNP; ++np) {
          if (np * 16 < G) {
            const int e = q * kWin + np * 16 + tx;
            const float f0 = Fs[e], f1 = Fs[BN * kWin + e], f2 = Fs[2 * BN * kWin + e];
#pragma unroll
            for (int i = 0; i < RM; ++i) {
              const float f = bb[i] == 0 ? f0 : (bb[i] == 2 ? f2 : f1);
              acc0[np][i] = fmaf(k[i], f, acc0[np][i]);
            }
          }
        }
      }
    }
  }
#pragma unroll
  for (int np = 0; np < kNP; ++np) {
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const int r = arow[i], e = np * 16 + tx;
      if (r < N && e < G) {
        const size_t idx = (size_t)r * ldo + e;
        out[idx] = acc0[np][i];
        if (TRANS && nb == 3) {
          out[out_sb + idx] = acc1[np][i];
          out[2 * out_sb + idx] = acc2[np][i];
        }
      }
    }
  }
}

// Triton's _grad_kernel. For the block rows p and tile columns q (S symmetric; "d": anchor p,
// shift mrow[p]; "t": anchor q, shift mrow[q]):
//   dS_pq + dS_qp = e1d (gz1_p . w_q) / T + e1t (w_p . gz1_q) / T
//                 + [two_t] e2d (gz2_p . w_q) / T' + e2t (w_p . gz2_q) / T'
//                 + (e2d (rc_p . gacc_{band(p,q)},q) + e2t (gacc_{band(q,p)},p . rc_q))
//                   * (1 + S/T') / T'
//   df_p += sum_q (dS_pq + dS_qp) F_q      (columns d_lo .. d_lo + d_cnt - 1, when do_df)
//   gw_p += sum_q e1t gz1_q + e2t gz2_q    (columns e_lo .. e_lo + e_cnt - 1, when need_gw)
// W, GZ1, GZ2: (N, M); RC: (N, G); GACC: (nb, N, G); DF: (N, D); GW: (N, M).
template <typename T, bool TF32>
__global__ void __launch_bounds__(kThreads, 1)
grad_kernel(const T* __restrict__ F, const float* __restrict__ mrow,
            const float* __restrict__ W, const float* __restrict__ GZ1,
            const float* __restrict__ GZ2, int M, const float* __restrict__ RC,
            const float* __restrict__ GACC, int G, int nb, float* __restrict__ DF,
            float* __restrict__ GW, int N, int B, int D, int d_lo, int d_cnt, int e_lo, int e_cnt,
            bool two_t, bool need_gw, bool do_df, float sc1, float sc2, float it1, float it2) {
  constexpr int BM = GR_BM, BN = GR_BN, lds = BM + 4, RM = BM / 16, RN = BN / 16;
  extern __shared__ __align__(128) unsigned char smem[];
  const GradSmem L = grad_smem<T>(two_t, need_gw);
  float* stage = reinterpret_cast<float*>(smem + L.stage);
  float* St = reinterpret_cast<float*>(smem + L.st);
  float* E1 = reinterpret_cast<float*>(smem + L.e1);
  float* E2 = reinterpret_cast<float*>(smem + L.e2);
  float* G1s = reinterpret_cast<float*>(smem + L.g1);
  float* G2s = reinterpret_cast<float*>(smem + L.g2);
  float* mr = reinterpret_cast<float*>(smem + L.mr);
  float* mcol = reinterpret_cast<float*>(smem + L.mcol);
  int* cmod = reinterpret_cast<int*>(smem + L.cmod);
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int r0 = blockIdx.x * BM;
  const size_t band_stride = (size_t)N * G;
  if (tid < BM) {
    const int a = r0 + tid;
    mr[tid] = a < N ? mrow[a] : 0.f;
  }
  int arow[RM], amod[RM];
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    arow[i] = r0 + ty + 16 * i;
    amod[i] = arow[i] < N ? arow[i] % B : -2;
  }
  float dacc[kNDC][RM][RN];
#pragma unroll
  for (int ch = 0; ch < kNDC; ++ch) {
#pragma unroll
    for (int i = 0; i < RM; ++i) {
#pragma unroll
      for (int j = 0; j < RN; ++j) dacc[ch][i][j] = 0.f;
    }
  }
  float gwacc[kNP][RM];
#pragma unroll
  for (int np = 0; np < kNP; ++np) {
#pragma unroll
    for (int i = 0; i < RM; ++i) gwacc[np][i] = 0.f;
  }
  for (int c0 = 0; c0 < N; c0 += BN) {
    s_tile<T, TF32, BM, BN>(F, N, D, r0, c0, smem + L.stage, St);
    if (tid < BN) {
      const int c = c0 + tid;
      cmod[tid] = c < N ? c % B : -1;
      mcol[tid] = c < N ? mrow[c] : 0.f;
    }
    if (need_gw) {
      for (int o = tid; o < BN * kWin; o += kThreads) {
        const int q = o / kWin, e = o - q * kWin, c = c0 + q;
        const bool ok = c < N && e < e_cnt;
        const size_t idx = (size_t)c * M + e_lo + e;
        G1s[o] = ok ? GZ1[idx] : 0.f;
        if (two_t) G2s[o] = ok ? GZ2[idx] : 0.f;
      }
    }
    __syncthreads();
    // the thread's elements (p, q) = (ty + 16 i, tx + 16 j): S and the four exponentials
    int ccol[RN], cmq[RN];
#pragma unroll
    for (int j = 0; j < RN; ++j) {
      ccol[j] = c0 + tx + 16 * j;
      cmq[j] = cmod[tx + 16 * j];
    }
    float sv[RM][RN], e1d[RM][RN], e1t[RM][RN], e2d[RM][RN], e2t[RM][RN];
#pragma unroll
    for (int i = 0; i < RM; ++i) {
#pragma unroll
      for (int j = 0; j < RN; ++j) {
        const int p = ty + 16 * i, q = tx + 16 * j;
        const float s = St[q * lds + p];
        const bool ng = negpair(amod[i], cmq[j]);
        sv[i][j] = s;
        e1d[i][j] = ng ? exp2f((s - mr[p]) * sc1) : 0.f;
        e1t[i][j] = ng ? exp2f((s - mcol[q]) * sc1) : 0.f;
        if (two_t) {
          e2d[i][j] = ng ? exp2f((s - mr[p]) * sc2) : 0.f;
          e2t[i][j] = ng ? exp2f((s - mcol[q]) * sc2) : 0.f;
        } else {
          e2d[i][j] = e1d[i][j];
          e2t[i][j] = e1t[i][j];
        }
        if (need_gw) {
          E1[q * lds + p] = e1t[i][j];
          if (two_t) E2[q * lds + p] = e2t[i][j];
        }
      }
    }
    if (do_df) {
      float ds[RM][RN], X[RM][RN];
#pragma unroll
      for (int i = 0; i < RM; ++i) {
#pragma unroll
        for (int j = 0; j < RN; ++j) ds[i][j] = 0.f;
      }
      // environment terms at t1 (and t2)
      narrow_dot<BM, BN>(X, GZ1, W, M, M, r0, c0, N, stage, ty, tx);
#pragma unroll
      for (int i = 0; i < RM; ++i) {
#pragma unroll
        for (int j = 0; j < RN; ++j) ds[i][j] = fmaf(e1d[i][j] * it1, X[i][j], ds[i][j]);
      }
      narrow_dot<BM, BN>(X, W, GZ1, M, M, r0, c0, N, stage, ty, tx);
#pragma unroll
      for (int i = 0; i < RM; ++i) {
#pragma unroll
        for (int j = 0; j < RN; ++j) ds[i][j] = fmaf(e1t[i][j] * it1, X[i][j], ds[i][j]);
      }
      if (two_t) {
        narrow_dot<BM, BN>(X, GZ2, W, M, M, r0, c0, N, stage, ty, tx);
#pragma unroll
        for (int i = 0; i < RM; ++i) {
#pragma unroll
          for (int j = 0; j < RN; ++j) ds[i][j] = fmaf(e2d[i][j] * it2, X[i][j], ds[i][j]);
        }
        narrow_dot<BM, BN>(X, W, GZ2, M, M, r0, c0, N, stage, ty, tx);
#pragma unroll
        for (int i = 0; i < RM; ++i) {
#pragma unroll
          for (int j = 0; j < RN; ++j) ds[i][j] = fmaf(e2t[i][j] * it2, X[i][j], ds[i][j]);
        }
      }
      // penalty terms: band b of (anchor p, other q) pairs rc_p with gacc_b,q; band b of
      // (anchor q, other p) pairs gacc_b,p with rc_q
      for (int b = 0; b < nb; ++b) {
        const float* Ab = GACC + b * band_stride;
        narrow_dot<BM, BN>(X, RC, Ab, G, G, r0, c0, N, stage, ty, tx);
#pragma unroll
        for (int i = 0; i < RM; ++i) {
#pragma unroll
          for (int j = 0; j < RN; ++j) {
            if (nb == 1 || band_of(ccol[j], amod[i], B) == b)
              ds[i][j] = fmaf(e2d[i][j] * ((1.f + sv[i][j] * it2) * it2), X[i][j], ds[i][j]);
          }
        }
        narrow_dot<BM, BN>(X, Ab, RC, G, G, r0, c0, N, stage, ty, tx);
#pragma unroll
        for (int i = 0; i < RM; ++i) {
#pragma unroll
          for (int j = 0; j < RN; ++j) {
            if (nb == 1 || band_of(arow[i], cmq[j], B) == b)
              ds[i][j] = fmaf(e2t[i][j] * ((1.f + sv[i][j] * it2) * it2), X[i][j], ds[i][j]);
          }
        }
      }
      // dS (+ transpose) in place of S: only this thread reads / writes these elements
#pragma unroll
      for (int i = 0; i < RM; ++i) {
#pragma unroll
        for (int j = 0; j < RN; ++j) St[(tx + 16 * j) * lds + ty + 16 * i] = ds[i][j];
      }
    }
    __syncthreads();
    if (need_gw) {
#pragma unroll
      for (int np = 0; np < kNP; ++np) {
        if (np * 16 < e_cnt) {
          for (int q = 0; q < BN; ++q) {
            const float g1 = G1s[q * kWin + np * 16 + tx];
#pragma unroll
            for (int i = 0; i < RM; ++i)
              gwacc[np][i] = fmaf(E1[q * lds + ty + 16 * i], g1, gwacc[np][i]);
            if (two_t) {
              const float g2 = G2s[q * kWin + np * 16 + tx];
#pragma unroll
              for (int i = 0; i < RM; ++i)
                gwacc[np][i] = fmaf(E2[q * lds + ty + 16 * i], g2, gwacc[np][i]);
            }
          }
        }
      }
    }
    if (do_df) {
#pragma unroll
      for (int ch = 0; ch < kNDC; ++ch) {
        if (ch * kDC < d_cnt) {
          __syncthreads();  // previous readers of the staging area are done
          for (int o = tid; o < BN * kDC; o += kThreads) {
            const int q = o / kDC, dd = o - q * kDC, c = c0 + q, d = ch * kDC + dd;
            stage[o] = (c < N && d < d_cnt) ? Feat<T>::to_float(F[(size_t)c * D + d_lo + d]) : 0.f;
          }
          __syncthreads();
          mm_acc<RM, RN>(dacc[ch], St, lds, stage, kDC, BN, ty, tx);
        }
      }
    }
  }
  if (do_df) {
#pragma unroll
    for (int ch = 0; ch < kNDC; ++ch) {
#pragma unroll
      for (int i = 0; i < RM; ++i) {
#pragma unroll
        for (int j = 0; j < RN; ++j) {
          const int r = arow[i], d = ch * kDC + tx + 16 * j;
          if (r < N && d < d_cnt) DF[(size_t)r * D + d_lo + d] = dacc[ch][i][j];
        }
      }
    }
  }
  if (need_gw) {
#pragma unroll
    for (int np = 0; np < kNP; ++np) {
#pragma unroll
      for (int i = 0; i < RM; ++i) {
        const int r = arow[i], e = np * 16 + tx;
        if (r < N && e < e_cnt) GW[(size_t)r * M + e_lo + e] = gwacc[np][i];
      }
    }
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// launchers
// ------------------------------------------------------------------------------------------------

cudaError_t launch_rowstats(const void* feats, int feat_type, bool allow_tf32, const float* spos,
                            const float* w2, float* mrow, float* zn, float* znt, int n, int d,
                            int m, int batch, float t1, float t2, bool two_t,
                            cudaStream_t stream) {
  if (batch < 1 || n != 2 * batch || d < 1 || m < 0 || !feats || !spos || !mrow ||
      (m > 0 && (!w2 || !zn || (two_t && !znt))))
    return cudaErrorInvalidValue;
  const float sc1 = (float)(kLog2e / t1), sc2 = (float)(kLog2e / t2);
  return dispatch_feat(feat_type, allow_tf32, cudaErrorInvalidValue, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr bool TF = decltype(tag)::tf32;
    auto kernel = rowstats_kernel<T, TF>;
    const size_t smem = rowstats_smem<T>(two_t).total;
    cudaError_t err = allow_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    for (int e0 = 0;; e0 += kWin) {  // one launch per window of kWin environment columns
      const int e = imin(kWin, m - e0);
      kernel<<<cdiv(n, RS_BM), kThreads, smem, stream>>>(
          static_cast<const T*>(feats), spos, m > 0 ? w2 + e0 : w2, m, mrow,
          m > 0 ? zn + e0 : zn, (two_t && m > 0) ? znt + e0 : nullptr, m, n, batch, d, e, two_t,
          sc1, sc2);
      err = cudaGetLastError();
      if (err != cudaSuccess || e0 + kWin >= m) return err;
    }
  });
}

cudaError_t launch_band(const void* feats, int feat_type, bool allow_tf32, const float* mrow,
                        const float* fac, float* out, int n, int d, int g, int batch, float t2,
                        bool trans, int nb, cudaStream_t stream) {
  if (batch < 1 || n != 2 * batch || d < 1 || g < 0 || (nb != 1 && nb != 3) || !feats || !mrow)
    return cudaErrorInvalidValue;
  if (g == 0) return cudaSuccess;
  if (!fac || !out) return cudaErrorInvalidValue;
  const float sc2 = (float)(kLog2e / t2), it2 = (float)(1.0 / t2);
  const size_t sb = (size_t)n * g;
  return dispatch_feat(feat_type, allow_tf32, cudaErrorInvalidValue, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr bool TF = decltype(tag)::tf32;
    auto kernel = trans ? band_kernel<T, TF, true> : band_kernel<T, TF, false>;
    const size_t smem = band_smem<T>(trans, nb).total;
    cudaError_t err = allow_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    for (int g0 = 0; g0 < g; g0 += kWin) {  // one launch per window of kWin group columns
      kernel<<<cdiv(n, BD_BM), kThreads, smem, stream>>>(
          static_cast<const T*>(feats), mrow, fac + g0, sb, g, out + g0, sb, g, n, batch, d,
          imin(kWin, g - g0), nb, sc2, it2);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  });
}

cudaError_t launch_grad(const void* feats, int feat_type, bool allow_tf32, const float* mrow,
                        const float* w2, const float* gz1, const float* gz2, const float* rc,
                        const float* gacc, float* df, float* gw, int n, int d, int m, int g,
                        int batch, float t1, float t2, bool two_t, int nb, bool need_gw,
                        cudaStream_t stream) {
  if (batch < 1 || n != 2 * batch || d < 1 || m < 0 || g < 0 || (nb != 1 && nb != 3) ||
      !feats || !mrow || !df || (m > 0 && (!w2 || !gz1 || (two_t && !gz2))) ||
      (g > 0 && (!rc || !gacc)) || (need_gw && m > 0 && !gw))
    return cudaErrorInvalidValue;
  const float sc1 = (float)(kLog2e / t1), sc2 = (float)(kLog2e / t2);
  const float it1 = (float)(1.0 / t1), it2 = (float)(1.0 / t2);
  const bool gw_on = need_gw && m > 0;
  return dispatch_feat(feat_type, allow_tf32, cudaErrorInvalidValue, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr bool TF = decltype(tag)::tf32;
    auto kernel = grad_kernel<T, TF>;
    const size_t smem_gw = grad_smem<T>(two_t, true).total;
    const size_t smem_df = grad_smem<T>(two_t, false).total;
    cudaError_t err = allow_smem(kernel, gw_on ? smem_gw : smem_df);
    if (err != cudaSuccess) return err;
    const int grid = cdiv(n, GR_BM);
    // dF in windows of kDWin feature columns (the first one also does the first gw window),
    // then the remaining gw windows of kWin environment columns without dF
    for (int d0 = 0; d0 < d; d0 += kDWin) {
      const bool gw_here = gw_on && d0 == 0;
      kernel<<<grid, kThreads, gw_here ? smem_gw : smem_df, stream>>>(
          static_cast<const T*>(feats), mrow, w2, gz1, gz2, m, rc, gacc, g, nb, df, gw, n, batch,
          d, d0, imin(kDWin, d - d0), 0, gw_here ? imin(kWin, m) : 0, two_t, gw_here, true, sc1,
          sc2, it1, it2);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    for (int e0 = kWin; gw_on && e0 < m; e0 += kWin) {
      kernel<<<grid, kThreads, smem_gw, stream>>>(
          static_cast<const T*>(feats), mrow, w2, gz1, gz2, m, rc, gacc, g, nb, df, gw, n, batch,
          d, 0, 0, e0, imin(kWin, m - e0), two_t, true, false, sc1, sc2, it1, it2);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  });
}

int rowstats_smem_bytes(int feat_type, bool allow_tf32, bool two_t) {
  return dispatch_feat(feat_type, allow_tf32, -1, [&](auto tag) {
    return (int)rowstats_smem<typename decltype(tag)::type>(two_t).total;
  });
}

int band_smem_bytes(int feat_type, bool allow_tf32, bool trans, int nb) {
  return dispatch_feat(feat_type, allow_tf32, -1, [&](auto tag) {
    return (int)band_smem<typename decltype(tag)::type>(trans, nb).total;
  });
}

int grad_smem_bytes(int feat_type, bool allow_tf32, bool two_t, bool need_gw) {
  return dispatch_feat(feat_type, allow_tf32, -1, [&](auto tag) {
    return (int)grad_smem<typename decltype(tag)::type>(two_t, need_gw).total;
  });
}

}  // namespace fastipirm_cuda
