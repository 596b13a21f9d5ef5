// relational families, CUDA: fastkd::rkd_distance_fwd for CUDA tensors (the distance loss only;
// angle and similarity-preserving have no CUDA kernel yet). The math, symbols and edge cases are
// those of fastkd/reference/relational.py (its docstring is the contract); the per-pair formulas
// follow the Triton kernel (fastkd/triton/relational.py) and the argument checks the CPU kernel
// (csrc/cpu/relational.cpp). This file only says how.
//
// Extra memory is O(N D + N), never N x N: the centred working-precision copies of both sides
// (rows padded to a multiple of 4 with zeros, so every tile load is one 16-byte vector), their
// squared row norms, the gradient accumulator [S, N, Ds] (S = 1 from N > 8192 on, up to 8 for
// small N, so that small batches still give ~256 CTAs), O(N) row sums and at most 2048 partial
// sums. Gram tiles of 64 x 64 are recomputed from the embeddings whenever a
// pass needs them: a register-tiled FMA GEMM (256 threads, 4 x 4 entries each, K in chunks of 16
// staged in shared memory), IEEE float32 (float64 for float64 inputs) like the Triton kernel:
// distances come from |x_i|^2 + |x_j|^2 - 2 x_i.x_j and TF32 would lose their digits.
//
// Passes (each a kernel on the current stream; no host sync, no atomics, fixed reduction orders):
//   1. sums of d^s and d^t over the pairs i < j (the upper-triangle tiles, split evenly over at
//      most 1024 CTAs, one double partial per CTA); a one-CTA kernel adds them in order -> 1/mu.
//   2. the same tiles again: sum of h(y - z) and of h'(y - z) y -> the loss and c.
//   3. (with a gradient) each CTA owns a 64-row block and one of S contiguous ranges of column
//      blocks; per tile it forms w_ij = [live] (h'/N^2 - c) / d^s_ij into shared memory and adds
//      W X_J to its rows of the accumulator (read-modify-write of rows no other CTA touches), and
//      keeps rowsum(w) in registers; a last elementwise kernel forms
//      (2 / mu_s) (rowsum_i x_i - (W X)_i) in the student's dtype.
// Why not the Triton kernel's two sweeps (B = sum [live]/d (x_i - x_j) in pass 1, A = sum g/d
// (x_i - x_j) in pass 2): both of its sweeps need a full N x N Gram sweep plus a W X product;
// here the two scalar sweeps use the symmetry of d (half the tiles each), so the whole op costs
// two Gram sweeps and one product, and one N x D accumulator instead of two.
// Squared distances within rounding of 0 (r <= kRefine (|x_i|^2 + |x_j|^2)) are recomputed from
// differences, so duplicated rows give exactly 0 (d = sqrt(eps), no gradient between them).
// Arithmetic is float32 for float32/float16/bfloat16 inputs (any mix) and float64 when an input
// is float64, with sums of tiles carried in float64; the loss buffer is float64 exactly then.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../relational_checks.h"
#include "common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

namespace fastkd {
namespace relational_cuda {
namespace {

using cuda_common::allreduce;
using cuda_common::d_abs;
using cuda_common::Elem;
using cuda_common::SumOp;

constexpr int kTile = 64;            // rows and columns of a Gram tile
constexpr int kChunk = 16;           // K (embedding columns, or rows j of W X) per shared-memory stage
constexpr int kLd = kTile + 4;       // shared-memory row length: 16-byte aligned rows, fewer bank conflicts
constexpr int kThreads = 256;        // 16 x 16 threads, 4 x 4 entries of a tile each
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxScalarCtas = 1024;  // CTAs of the scalar sweeps (one partial each)
constexpr int64_t kGradCtas = 256;        // pass 3 splits columns until about this many CTAs
constexpr int64_t kMaxSplit = 8;
constexpr double kRefine = 1.0 / 64;  // relative threshold below which r_ij is recomputed exactly

// float kernels: two CTAs per SM (<= 128 registers); double ones may use more registers
template <typename A>
constexpr int kMinBlocks = sizeof(A) == 4 ? 2 : 1;

template <typename A>
struct Stage {  // one K chunk of both GEMM operands, k-major: a[k][row], b[k][col]
  A a[kChunk][kLd];
  A b[kChunk][kLd];
};
template <typename A>
struct GradSmem {
  Stage<A> st;
  A wt[kTile][kLd];  // W^T of the current tile: wt[j][i]
};

template <typename A>
struct Args {
  const A* xs;   // centred student [N, lds], zero-padded rows
  const A* sqs;  // |x_i|^2 [N]
  const A* xt;   // centred teacher [N, ldt]
  const A* sqt;
  int64_t N, lds, ldt, nb;  // nb = row (and column) blocks of kTile
  int64_t tiles;            // upper-triangle tiles nb (nb + 1) / 2
  A eps, delta, inv_delta, inv_n2;
  bool l1;
  const double* scal;  // 1/mu_s, 1/mu_t, c (written by the finish kernel)
  double* part;        // passes 1, 2: two partial sums per CTA
  A* acc;              // pass 3: [S, N, lds], split s's W X
  A* rows;             // pass 3: [S, N], split s's rowsum(w)
};

__device__ __forceinline__ float d_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double d_fma(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float d_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double d_sqrt(double x) { return sqrt(x); }

// Four consecutive entries, 16-byte aligned (two 16-byte accesses for double).
template <typename A>
__device__ __forceinline__ void load4(const A* p, A (&v)[4]) {
  if constexpr (sizeof(A) == 4) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
  } else {
    const double2 t0 = reinterpret_cast<const double2*>(p)[0], t1 = reinterpret_cast<const double2*>(p)[1];
    v[0] = t0.x, v[1] = t0.y, v[2] = t1.x, v[3] = t1.y;
  }
}
template <typename A>
__device__ __forceinline__ void store4(A* p, const A (&v)[4]) {
  if constexpr (sizeof(A) == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    reinterpret_cast<double2*>(p)[0] = make_double2(v[0], v[1]);
    reinterpret_cast<double2*>(p)[1] = make_double2(v[2], v[3]);
  }
}

// acc[a][b] += sum_k a[k][r0 + a] b[k][c0 + b] over one chunk (r0 = 4 ty, c0 = 4 tx). Unrolled
// by 4, not 16: a full unroll lets the compiler hoist the shared-memory loads of many steps ahead,
// which costs ~20 registers and made the gradient kernel spill at its 128-register bound.
template <typename A>
__device__ __forceinline__ void fma_chunk(const A (*a)[kLd], const A (*b)[kLd], int r0, int c0, A (&acc)[4][4]) {
#pragma unroll 4
  for (int k = 0; k < kChunk; ++k) {
    A ra[4], rb[4];
    load4(&a[k][r0], ra);
    load4(&b[k][c0], rb);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = d_fma(ra[i], rb[j], acc[i][j]);
  }
}

// g[a][b] = x_i . x_j for i = i0 + 4 ty + a, j = j0 + 4 tx + b (0 outside [0, N)). x is [N, ld]
// with ld a multiple of 4, so each thread stages one 4-entry quad of each operand per chunk: row
// tid / 4, entries 4 (tid % 4) .. + 3 of the chunk. The next chunk's quads are loaded while this
// one is multiplied. Starts and ends with every thread past its last shared-memory access of the
// previous user of `st` (the first barrier) and leaves `st` in use (callers sync before reuse).
template <typename A>
__device__ __forceinline__ void gram_tile(Stage<A>& st, const A* __restrict__ x, int64_t ld, int64_t N, int64_t i0,
                                          int64_t j0, A (&g)[4][4]) {
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int r = tid >> 2, q = (tid & 3) * 4;
  const bool vi = i0 + r < N, vj = j0 + r < N;
  const A* pi = x + (vi ? i0 + r : 0) * ld + q;
  const A* pj = x + (vj ? j0 + r : 0) * ld + q;
  A na[4], nb[4];
  auto fetch = [&](int64_t k0) {
    const bool in = k0 + q < ld;  // whole quads: ld is a multiple of 4
#pragma unroll
    for (int e = 0; e < 4; ++e) na[e] = nb[e] = A(0);
    if (in && vi) load4(pi + k0, na);
    if (in && vj) load4(pj + k0, nb);
  };
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) g[a][b] = A(0);
  fetch(0);
  for (int64_t k0 = 0; k0 < ld; k0 += kChunk) {
    __syncthreads();  // every thread is done reading the previous chunk
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      st.a[q + e][r] = na[e];
      st.b[q + e][r] = nb[e];
    }
    __syncthreads();
    if (k0 + kChunk < ld) fetch(k0 + kChunk);
    fma_chunk(st.a, st.b, 4 * ty, 4 * tx, g);
  }
}

template <typename A>
__device__ __noinline__ A exact_sq(const A* __restrict__ xi, const A* __restrict__ xj, int64_t ld) {
  A s = A(0);
  for (int64_t k = 0; k < ld; ++k) {
    const A d = xi[k] - xj[k];
    s = d_fma(d, d, s);
  }
  return s;
}

// Turns the Gram entries g of the thread's pairs into squared distances r_ij; a pair i != j within
// rounding of 0 is recomputed from the difference of the rows (exactly 0 for equal rows).
template <typename A>
__device__ __forceinline__ void sq_dists(A (&g)[4][4], const A* __restrict__ x, const A* __restrict__ sq,
                                         int64_t ld, int64_t N, int64_t i0, int64_t j0) {
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  A si[4], sj[4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int64_t i = i0 + 4 * ty + a, j = j0 + 4 * tx + a;
    si[a] = i < N ? sq[i] : A(0);
    sj[a] = j < N ? sq[j] : A(0);
  }
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int64_t i = i0 + 4 * ty + a, j = j0 + 4 * tx + b;
      const A s = si[a] + sj[b];
      A r = s - A(2) * g[a][b];
      if (i < N && j < N && i != j && r <= A(kRefine) * s) r = exact_sq(x + i * ld, x + j * ld, ld);
      g[a][b] = r;
    }
}

template <typename A>
__device__ __forceinline__ A huber(A z, const Args<A>& p) {
  const A az = d_abs(z);
  if (p.l1) return az;
  return az < p.delta ? A(0.5) * p.inv_delta * z * z : az - A(0.5) * p.delta;
}
// max(r, eps) that keeps a NaN (fmax would return eps): a NaN input gives a NaN loss
template <typename A>
__device__ __forceinline__ A clamp_eps(A r, A eps) {
  return r < eps ? eps : r;
}
template <typename A>
__device__ __forceinline__ A huber_grad(A z, const Args<A>& p) {
  if (p.l1) return z > A(0) ? A(1) : (z < A(0) ? A(-1) : A(0));
  return fmin(fmax(z * p.inv_delta, A(-1)), A(1));
}

// Upper-triangle tile t (row-major: row block I holds J = I .. nb-1) -> (I, J).
__device__ __forceinline__ void tile_of(int64_t t, int64_t nb, int64_t& I, int64_t& J) {
  auto start = [nb](int64_t i) { return i * nb - i * (i - 1) / 2; };
  const double b = 2.0 * static_cast<double>(nb) + 1.0;
  int64_t i = static_cast<int64_t>((b - sqrt(fmax(b * b - 8.0 * static_cast<double>(t), 0.0))) / 2.0);
  i = i < 0 ? 0 : (i > nb - 1 ? nb - 1 : i);
  while (i > 0 && start(i) > t) --i;
  while (i + 1 < nb && start(i + 1) <= t) ++i;
  I = i;
  J = i + (t - start(i));
}

// ---------------------------------------------------------------------------------------------
// kernels

// x[i, :] = in[i, :] - mean (converted to A), zero past D up to ld; sq[i] = |x_i|^2. One warp per
// row, lanes over columns, a fixed butterfly for the norm.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) rkd_dist_prep_kernel(const T* __restrict__ in, int64_t s0, int64_t s1,
                                                                 const A* __restrict__ mean, A* __restrict__ x,
                                                                 A* __restrict__ sq, int64_t N, int64_t D,
                                                                 int64_t ld) {
  using B = typename Elem<T>::Bits;
  const B* src = reinterpret_cast<const B*>(in);
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); i < N; i += warps) {
    A s = A(0);
    for (int64_t k = lane; k < ld; k += 32) {
      const A v = k < D ? Elem<T>::template to<A>(src[i * s0 + k * s1]) - mean[k] : A(0);
      x[i * ld + k] = v;
      s = d_fma(v, v, s);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) sq[i] = s;
  }
}

// Passes 1 and 2 over the upper-triangle tiles [t0, t1) of this CTA: pass 1 sums d^s and d^t,
// pass 2 h(z) and h'(z) y, over the pairs i < j.
template <typename A, int PASS>
__global__ void __launch_bounds__(kThreads, kMinBlocks<A>) rkd_dist_sums_kernel(const Args<A> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Stage<A>& st = *reinterpret_cast<Stage<A>*>(smem_raw);
  __shared__ double red[kWarps * 2], bc[2];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t G = gridDim.x;
  const int64_t t0 = p.tiles * blockIdx.x / G, t1 = p.tiles * (blockIdx.x + 1) / G;
  A ims = A(0), imt = A(0);
  if (PASS == 2) {
    ims = static_cast<A>(p.scal[0]);
    imt = static_cast<A>(p.scal[1]);
  }
  double sum[2] = {0.0, 0.0};
  int64_t I = 0, J = 0;
  if (t0 < t1) tile_of(t0, p.nb, I, J);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t i0 = I * kTile, j0 = J * kTile;
    A rs[4][4], rt[4][4];
    gram_tile(st, p.xs, p.lds, p.N, i0, j0, rs);
    sq_dists(rs, p.xs, p.sqs, p.lds, p.N, i0, j0);
    gram_tile(st, p.xt, p.ldt, p.N, i0, j0, rt);
    sq_dists(rt, p.xt, p.sqt, p.ldt, p.N, i0, j0);
    A a1 = A(0), a2 = A(0);
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int64_t i = i0 + 4 * ty + a, j = j0 + 4 * tx + b;
        if (j < p.N && j > i) {  // i < j < N; off-diagonal tiles have j > i throughout
          const A ds = d_sqrt(clamp_eps(rs[a][b], p.eps)), dt = d_sqrt(clamp_eps(rt[a][b], p.eps));
          if (PASS == 1) {
            a1 += ds;
            a2 += dt;
          } else {
            const A y = ds * ims, z = y - dt * imt;
            a1 += huber(z, p);
            a2 += huber_grad(z, p) * y;
          }
        }
      }
    sum[0] += static_cast<double>(a1);
    sum[1] += static_cast<double>(a2);
    if (++J == p.nb) J = ++I;
  }
  allreduce<double, 2>(sum, SumOp{}, red, bc, nullptr, 1);
  if (threadIdx.x == 0) {
    p.part[2 * blockIdx.x] = sum[0];
    p.part[2 * blockIdx.x + 1] = sum[1];
  }
}

// Adds the G partials in order. Stage 1: scal = (1/mu_s, 1/mu_t) (the sums are over i < j, so
// each is half of the N (N - 1) off-diagonal entries). Stage 2: the loss and c.
__global__ void __launch_bounds__(kThreads) rkd_dist_finish_kernel(const double* __restrict__ part, int64_t G,
                                                                  int stage, double pairs, double n2,
                                                                  double* __restrict__ scal, void* loss,
                                                                  bool loss_f64) {
  __shared__ double red[kWarps * 2], bc[2];
  double sum[2] = {0.0, 0.0};
  for (int64_t g = threadIdx.x; g < G; g += blockDim.x) {
    sum[0] += part[2 * g];
    sum[1] += part[2 * g + 1];
  }
  allreduce<double, 2>(sum, SumOp{}, red, bc, nullptr, 1);
  if (threadIdx.x != 0) return;
  if (stage == 1) {
    scal[0] = pairs / (2.0 * sum[0]);
    scal[1] = pairs / (2.0 * sum[1]);
  } else {
    const double l = 2.0 * sum[0] / n2;
    if (loss_f64) *static_cast<double*>(loss) = l;
    else *static_cast<float*>(loss) = static_cast<float>(l);
    scal[2] = 2.0 * sum[1] / (n2 * pairs);  // c, with g = h' / N^2
  }
}

// Pass 3: CTA (I, s) owns rows [64 I, 64 I + 64) of split s and the column blocks
// [nb s / S, nb (s + 1) / S), in order.
template <typename A>
__global__ void __launch_bounds__(kThreads, kMinBlocks<A>) rkd_dist_grad_kernel(const Args<A> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  GradSmem<A>& sm = *reinterpret_cast<GradSmem<A>*>(smem_raw);
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t I = blockIdx.x, s = blockIdx.y, S = gridDim.y, N = p.N, ld = p.lds;
  const int64_t J0 = p.nb * s / S, J1 = p.nb * (s + 1) / S;
  const int64_t i0 = I * kTile;
  const A ims = static_cast<A>(p.scal[0]), imt = static_cast<A>(p.scal[1]), c = static_cast<A>(p.scal[2]);
  A* acc = p.acc + s * N * ld;
  A rsum[4] = {A(0), A(0), A(0), A(0)};
  // the thread's quad of the staged X_J chunk: row jj of 16, columns 4 (tid % 16) .. + 3
  const int jj = tid >> 4, dq = (tid & 15) * 4;
  for (int64_t J = J0; J < J1; ++J) {
    const int64_t j0 = J * kTile;
    A w[4][4];
    // r^s waits in the thread's own slots of wt (free: the previous tile's last reads of wt came
    // before the barriers inside gram_tile) while the teacher's Gram tile is computed
    gram_tile(sm.st, p.xs, ld, N, i0, j0, w);
    sq_dists(w, p.xs, p.sqs, ld, N, i0, j0);
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) sm.wt[4 * tx + b][4 * ty + a] = w[a][b];
    gram_tile(sm.st, p.xt, p.ldt, N, i0, j0, w);
    sq_dists(w, p.xt, p.sqt, p.ldt, N, i0, j0);
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int64_t i = i0 + 4 * ty + a, j = j0 + 4 * tx + b;
        const A r = sm.wt[4 * tx + b][4 * ty + a];
        const A ds = d_sqrt(clamp_eps(r, p.eps)), dt = d_sqrt(clamp_eps(w[a][b], p.eps));
        const A y = ds * ims, z = y - dt * imt;
        const bool live = i < N && j < N && i != j && r >= p.eps;
        w[a][b] = live ? (huber_grad(z, p) * p.inv_n2 - c) / ds : A(0);
        rsum[a] += w[a][b];
      }
    // W^T into shared memory: wt[4 tx + b][4 ty .. 4 ty + 3], the slots that held r^s
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const A col[4] = {w[0][b], w[1][b], w[2][b], w[3][b]};
      store4(&sm.wt[4 * tx + b][4 * ty], col);
    }
    // acc[i0 .., d0 .. d0 + 63] (+)= W X_J[:, d0 .. d0 + 63], 64 columns of the embedding at a time
    for (int64_t d0 = 0; d0 < ld; d0 += kTile) {
      A o[4][4];
      const bool cols = d0 + 4 * tx < ld;  // whole quads: ld is a multiple of 4
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        const int64_t i = i0 + 4 * ty + a;
        if (J > J0 && cols && i < N) {
          load4(acc + i * ld + d0 + 4 * tx, o[a]);
        } else {
#pragma unroll
          for (int b = 0; b < 4; ++b) o[a][b] = A(0);
        }
      }
      for (int jb = 0; jb < kTile; jb += kChunk) {
        const int64_t row = j0 + jb + jj, col = d0 + dq;
        A v[4] = {A(0), A(0), A(0), A(0)};
        if (row < N && col < ld) load4(p.xs + row * ld + col, v);
        __syncthreads();  // wt is complete; every thread is done with the previous chunk
        store4(&sm.st.b[jj][dq], v);
        __syncthreads();
        fma_chunk(&sm.wt[jb], sm.st.b, 4 * ty, 4 * tx, o);
      }
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        const int64_t i = i0 + 4 * ty + a;
        if (cols && i < N) store4(acc + i * ld + d0 + 4 * tx, o[a]);
      }
    }
  }
  // rowsum(w): the 16 threads of a row group are lanes 0-15 or 16-31 of one warp
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) rsum[a] += __shfl_xor_sync(0xffffffffu, rsum[a], off);
  if (tx == 0) {
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int64_t i = i0 + 4 * ty + a;
      if (i < N) p.rows[s * N + i] = rsum[a];
    }
  }
}

// grad[i, d] = (2 / mu_s) (rowsum_i x_i - (W X)_i), splits added in order, in the student's dtype.
template <typename A, typename T>
__global__ void __launch_bounds__(kThreads) rkd_dist_grad_out_kernel(const A* __restrict__ x,
                                                                    const A* __restrict__ acc,
                                                                    const A* __restrict__ rows,
                                                                    const double* __restrict__ scal, T* out,
                                                                    int64_t o0, int64_t o1, int64_t N, int64_t D,
                                                                    int64_t ld, int64_t S) {
  using B = typename Elem<T>::Bits;
  const A coef = static_cast<A>(2.0 * scal[0]);
  const int64_t total = N * D, step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const int64_t i = e / D, d = e - i * D;
    A rs = rows[i], wx = acc[i * ld + d];
    for (int64_t s = 1; s < S; ++s) {
      rs += rows[s * N + i];
      wx += acc[(s * N + i) * ld + d];
    }
    reinterpret_cast<B*>(out)[i * o0 + d * o1] = Elem<T>::from(coef * (rs * x[i * ld + d] - wx));
  }
}

// ---------------------------------------------------------------------------------------------
// host side
int64_t round4(int64_t v) { return (v + 3) / 4 * 4; }

unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((items + per_block - 1) / per_block, 65535)));
}

// The centred, zero-padded working copy [N, ld] of one side and its squared row norms.
template <typename A>
void prepare(const at::Tensor& in, at::ScalarType acc, int64_t ld, at::Tensor& x, at::Tensor& sq, cudaStream_t stream) {
  const int64_t N = in.size(0), D = in.size(1);
  const at::Tensor mean = at::mean(in, {0}, /*keepdim=*/false, acc).contiguous();
  x = at::empty({N, ld}, in.options().dtype(acc));
  sq = at::empty({N}, in.options().dtype(acc));
  const unsigned grid = blocks_for(N, kWarps);
  const A* m = mean.data_ptr<A>();
  A* px = x.data_ptr<A>();
  A* psq = sq.data_ptr<A>();
  const int64_t s0 = in.stride(0), s1 = in.stride(1);
  switch (in.scalar_type()) {
    case at::kFloat:
      rkd_dist_prep_kernel<float, A><<<grid, kThreads, 0, stream>>>(
          static_cast<const float*>(in.data_ptr()), s0, s1, m, px, psq, N, D, ld);
      break;
    case at::kHalf:
      rkd_dist_prep_kernel<__half, A><<<grid, kThreads, 0, stream>>>(
          static_cast<const __half*>(in.data_ptr()), s0, s1, m, px, psq, N, D, ld);
      break;
    case at::kBFloat16:
      rkd_dist_prep_kernel<__nv_bfloat16, A><<<grid, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(in.data_ptr()), s0, s1, m, px, psq, N, D, ld);
      break;
    default:
      rkd_dist_prep_kernel<double, A><<<grid, kThreads, 0, stream>>>(
          static_cast<const double*>(in.data_ptr()), s0, s1, m, px, psq, N, D, ld);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename A, typename K>
void launch(K kernel, dim3 grid, size_t smem, cudaStream_t stream, const Args<A>& p) {
  if (smem > 48 * 1024)  // above the default limit (the float64 gradient kernel): opt in
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename A>
void rkd_distance_impl(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& loss,
                       const std::optional<at::Tensor>& grad, double eps, double delta, cudaStream_t stream) {
  const at::ScalarType acc = std::is_same<A, double>::value ? at::kDouble : at::kFloat;
  const int64_t N = student.size(0), Ds = student.size(1), Dt = teacher.size(1);
  Args<A> p{};
  p.N = N;
  p.lds = round4(Ds);
  p.ldt = round4(Dt);
  at::Tensor xs, sqs, xt, sqt;
  prepare<A>(student, acc, p.lds, xs, sqs, stream);
  prepare<A>(teacher, acc, p.ldt, xt, sqt, stream);
  p.xs = xs.data_ptr<A>();
  p.sqs = sqs.data_ptr<A>();
  p.xt = xt.data_ptr<A>();
  p.sqt = sqt.data_ptr<A>();
  p.nb = (N + kTile - 1) / kTile;
  p.tiles = p.nb * (p.nb + 1) / 2;
  p.eps = static_cast<A>(eps);
  p.delta = static_cast<A>(delta);
  p.inv_delta = static_cast<A>(delta > 0 ? 1.0 / delta : 0.0);
  p.l1 = delta == 0.0;
  const double n2 = static_cast<double>(N) * static_cast<double>(N), pairs = static_cast<double>(N) * (N - 1);
  p.inv_n2 = static_cast<A>(1.0 / n2);

  const auto dopt = student.options().dtype(at::kDouble);
  const int64_t G = std::min(p.tiles, kMaxScalarCtas);
  const at::Tensor part = at::empty({2 * G}, dopt), scal = at::empty({4}, dopt);
  p.part = part.data_ptr<double>();
  p.scal = scal.data_ptr<double>();
  double* pscal = scal.data_ptr<double>();
  const dim3 sgrid(static_cast<unsigned>(G));
  launch(rkd_dist_sums_kernel<A, 1>, sgrid, sizeof(Stage<A>), stream, p);
  rkd_dist_finish_kernel<<<1, kThreads, 0, stream>>>(p.part, G, 1, pairs, n2, pscal, loss.data_ptr(),
                                                      acc == at::kDouble);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch(rkd_dist_sums_kernel<A, 2>, sgrid, sizeof(Stage<A>), stream, p);
  rkd_dist_finish_kernel<<<1, kThreads, 0, stream>>>(p.part, G, 2, pairs, n2, pscal, loss.data_ptr(),
                                                      acc == at::kDouble);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!grad.has_value()) return;

  const int64_t S = std::max<int64_t>(1, std::min({kGradCtas / p.nb, kMaxSplit, p.nb}));
  const at::Tensor accbuf = at::empty({S, N, p.lds}, xs.options());
  const at::Tensor rows = at::empty({S, N}, xs.options());
  p.acc = accbuf.data_ptr<A>();
  p.rows = rows.data_ptr<A>();
  launch(rkd_dist_grad_kernel<A>, dim3(static_cast<unsigned>(p.nb), static_cast<unsigned>(S)), sizeof(GradSmem<A>),
         stream, p);

  const at::Tensor& g = *grad;
  const unsigned ogrid = blocks_for(N * Ds, kThreads);
  const int64_t o0 = g.stride(0), o1 = g.stride(1);
  switch (g.scalar_type()) {
    case at::kFloat:
      rkd_dist_grad_out_kernel<A, float><<<ogrid, kThreads, 0, stream>>>(
          p.xs, p.acc, p.rows, p.scal, static_cast<float*>(g.data_ptr()), o0, o1, N, Ds, p.lds, S);
      break;
    case at::kHalf:
      rkd_dist_grad_out_kernel<A, __half><<<ogrid, kThreads, 0, stream>>>(
          p.xs, p.acc, p.rows, p.scal, static_cast<__half*>(g.data_ptr()), o0, o1, N, Ds, p.lds, S);
      break;
    case at::kBFloat16:
      rkd_dist_grad_out_kernel<A, __nv_bfloat16><<<ogrid, kThreads, 0, stream>>>(
          p.xs, p.acc, p.rows, p.scal, static_cast<__nv_bfloat16*>(g.data_ptr()), o0, o1, N, Ds, p.lds, S);
      break;
    default:
      rkd_dist_grad_out_kernel<A, double><<<ogrid, kThreads, 0, stream>>>(
          p.xs, p.acc, p.rows, p.scal, static_cast<double*>(g.data_ptr()), o0, o1, N, Ds, p.lds, S);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void rkd_distance_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& loss,
                           const std::optional<at::Tensor>& grad_student, double eps, double huber_delta) {
  const bool wide = checks::check_rkd_distance_args(student, teacher, loss, grad_student, eps, huber_delta,
                                                    c10::DeviceType::CUDA).wide;
  const c10::cuda::CUDAGuard guard(student.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.get_device()).stream();
  if (wide) rkd_distance_impl<double>(student, teacher, loss, grad_student, eps, huber_delta, stream);
  else rkd_distance_impl<float>(student, teacher, loss, grad_student, eps, huber_delta, stream);
}

}  // namespace
}  // namespace relational_cuda
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("rkd_distance_fwd", &fastkd::relational_cuda::rkd_distance_fwd_cuda); }
