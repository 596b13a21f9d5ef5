// kd family, CUDA: fastkd::kd_fwd for CUDA tensors. The math, symbols and gradient table are those
// of fastkd/reference/divergences.py (its docstring is the contract); the per-entry formulas and
// the pass structure follow the Triton kernel (fastkd/triton/divergences.py) line for line, so the
// two GPU backends agree in what they round and where. This file only says how.
//
// Layout of the work: the N = B*R rows are independent. A row of V entries is split into `nsplit`
// contiguous slices of `slice` entries (a multiple of 8); one CTA of up to 256 threads owns one
// slice, each thread a fixed set of octets (8 entries: one 16-byte load of bf16/fp16), and the
// nsplit CTAs of a row form one thread-block cluster (sm_90+) that combines its per-CTA partial
// sums through distributed shared memory. nsplit = 1 (a plain launch, one CTA per row) wherever
// the row fits one CTA's shared-memory budget, and always below sm_90.
//
// Why this design for large V (the target: N = 8192, V = 128256, bf16, on H100):
//   * The softmax needs the row's log-sum-exps before any probability, so every entry is read at
//     least twice (statistics, then loss terms / gradient). Counted traffic is one read of each
//     input and one write of the gradient (6 bytes/entry in bf16), so the second read must not
//     come from HBM: at 10 bytes/entry the target of 2.4 TB/s effective would need 4 TB/s of HBM.
//   * One row is 2 x 250 KB (student + teacher), more than an SM's 227 KB of shared memory, and
//     132 rows in flight (one per SM) are 66 MB, more than H100's 50 MB L2, so "one CTA per row,
//     second pass re-read from L2" loses a large part of its re-reads to HBM (Triton's design).
//   * So: a cluster of 8 CTAs per row; each CTA holds its 16032 entries of both inputs (62.6 KB of
//     bf16) in shared memory, copied with cp.async (no register staging; a thread's whole share
//     is in flight at once, consumed in 4 groups as it lands). Every pass then reads shared
//     memory: HBM sees exactly one read of each input and one (streaming) write of the gradient.
//     Three such CTAs fit an SM (80 registers x 256 threads x 3, 3 x 62.6 KB), so one CTA's copy
//     overlaps another's arithmetic and stores. The split is the smallest power of two whose
//     slices fit a third of the SM's shared memory (else a half, else all of it); fp32 at this V
//     takes 16-CTA clusters where the device allows them (H100 does; non-portable size).
//   * The cluster combines partials deterministically: every CTA writes its block-reduced partial
//     to its own shared memory, the cluster barrier publishes it, and every CTA reads the nsplit
//     partials in rank order 0..nsplit-1, so all CTAs of a row hold bitwise the same statistics and
//     the result never depends on scheduling. No atomics anywhere.
//   * Where no split fits (below sm_90 beyond ~40K bf16 entries per row on A100, or rows of
//     millions of entries) the slices stay in global memory: every pass reads them again, alternating
//     direction so that a re-read starts with the entries read last (most likely still in L2);
//     nsplit = 8 where clusters exist keeps the L2 footprint of the rows in flight at 1/8.
// Passes per CTA: (1) online max / sum-exp of a = cap(s)/T, b = cap(t)/T (and of cap(s) for the
// hard label when T != 1), one exp per entry and stream; (2) jsd, skew_*, tvd, reverse_kl, and
// forward_kl with a teacher gradient: sum ell, sum h, sum k; (3) gradients, plus sum ell where
// pass 2 was skipped (forward_kl without a teacher gradient: two passes in all). Each pass ends in
// a block (+ cluster) reduction. Every entry is read (into the cache or registers) before the
// gradient computed from it is written, by the thread that owns its octet, and the label's logit
// before the first barrier, so grad_student may alias student (inplace).
//
// Arithmetic is float32 for float32/float16/bfloat16 inputs (any mix) and float64 when an input is
// float64, as in the CPU kernel; the loss buffer is float64 exactly then. Same-dtype float32 /
// float16 / bfloat16 inputs get kernels specialised on their dtype; mixed dtypes and float64 go
// through one kernel per divergence that switches on the dtype per octet (a uniform branch).

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kd_checks.h"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>

namespace fastkd {
namespace kd_cuda {
namespace {

// Divergence codes: fastkd.reference.divergences.DIVERGENCES.
constexpr int kForwardKL = 0, kReverseKL = 1, kJSD = 2, kSkewForwardKL = 3, kSkewReverseKL = 4, kTVD = 5;
constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kMaxSplit = 16;  // 8 is the portable maximum cluster size; 16 where the device allows it
constexpr int kSlots = 6;     // values per reduction slot: 3 (max, sum-exp) pairs in pass 1

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// Scalar coefficients, filled on the host in both float and double so that the kernel reads them
// as constant-bank operands instead of converting them into registers it then holds throughout.
template <typename A>
struct Coefs {
  A inv_t, cap, soft_coef, grad_coef, hw;
  A w_p, w_q, log_wp, log_wq;  // the mixture r = w_p p + w_q q of jsd and the skew divergences
};

struct Params {
  const char* s;  // row 0 of student / teacher / gradients; strides in bytes
  const char* t;
  char* gs;
  char* gt;
  int64_t s_sb, s_sr, t_sb, t_sr, gs_sb, gs_sr, gt_sb, gt_sr;
  const int64_t* labels;  // strides in elements
  int64_t l_sb, l_sr;
  char* loss;  // float32, or float64 when loss_f64; strides in bytes
  int64_t o_sb, o_sr;
  int64_t R, V, slice, row0, ignore_index;
  int nsplit;  // CTAs per row (the cluster size)
  int ds, dt;  // DType of student / teacher (and of their gradients)
  int es, et;  // their element sizes
  bool loss_f64;
  bool vs, vt, vgs, vgt;  // every row of the tensor starts 16-byte aligned: vector loads/stores
  bool cache;             // keep the CTA's slice of both inputs in shared memory after pass 1
  bool has_labels, hard, capped, unit_t, has_gs, has_gt, fused_d;
  Coefs<float> cf32;
  Coefs<double> cf64;
};

template <typename A>
__device__ __forceinline__ const Coefs<A>& coefs(const Params& P) {
  if constexpr (std::is_same<A, float>::value) return P.cf32;
  else return P.cf64;
}

// ---------------------------------------------------------------------------------------------
// math in the accumulation type A (float, or double for float64 inputs)
__device__ __forceinline__ float d_exp(float x) { return expf(x); }
__device__ __forceinline__ double d_exp(double x) { return exp(x); }
__device__ __forceinline__ float d_log(float x) { return logf(x); }
__device__ __forceinline__ double d_log(double x) { return log(x); }
__device__ __forceinline__ float d_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double d_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float d_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double d_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float d_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double d_abs(double x) { return fabs(x); }

template <typename A>
__device__ __forceinline__ A ninf() {
  return static_cast<A>(-INFINITY);
}

// Adds x to a running (max m, sum z of exp(. - m)) with one exp: e = exp(-|x - m|) is the
// factor that rescales the old sum when x is the new max, else the weight of x. -inf entries add
// nothing (also when m is still -inf); NaN propagates into z.
template <typename A>
__device__ __forceinline__ void lse_add(A& m, A& z, A x) {
  const bool up = x > m;
  const A d = x - m;
  A e = d_exp(up ? -d : d);
  e = x == ninf<A>() ? A(0) : e;
  z = up ? z * e + A(1) : z + e;
  m = up ? x : m;
}

// (m, z) <- (m, z) + (m2, z2); the empty pair (-inf, 0) is the identity.
template <typename A>
__device__ __forceinline__ void lse_merge(A& m, A& z, A m2, A z2) {
  const A mm = m2 > m ? m2 : m;
  if (mm == ninf<A>()) return;  // both empty
  z = z * d_exp(m - mm) + z2 * d_exp(m2 - mm);
  m = mm;
}

template <typename A>
__device__ __forceinline__ A logaddexp(A x, A y) {
  const A mx = x > y ? x : y, mn = x > y ? y : x;
  return mx + d_log1p(d_exp(mn - (mx == ninf<A>() ? A(0) : mx)));  // both -inf: -inf, not NaN
}

// q, p and the per-entry loss ell and gradients h = dD/dlq, k = dD/dlp of the contract's table.
// a, b are shifted by their row maxima and lsa, lsb are the logs of the shifted sums, so that
// log q = (a - max a) - lsa: an exact subtraction, then a small one.
template <int DIV, typename A>
__device__ __forceinline__ void terms(A a, A b, A lsa, A lsb, const Coefs<A>& c, A& q, A& p, A& ell, A& h,
                                      A& k) {
  const A lq = a - lsa, lp = b - lsb;
  q = d_exp(lq);
  p = d_exp(lp);
  if constexpr (DIV == kForwardKL) {
    ell = p > A(0) ? p * (lp - lq) : A(0);
    h = -p;
    k = ell + p;
  } else if constexpr (DIV == kReverseKL) {
    ell = q > A(0) ? q * (lq - lp) : A(0);
    h = ell + q;
    k = -q;
  } else if constexpr (DIV == kTVD) {
    const A d = q - p;
    const A sg = d > A(0) ? A(1) : (d < A(0) ? A(-1) : A(0));
    ell = A(0.5) * d_abs(d);
    h = A(0.5) * q * sg;
    k = A(-0.5) * p * sg;
  } else {
    // rho_x = w_x x / r lies in [0, 1], so no ratio overflows; x / r with r = 0 is 0
    const A lr = logaddexp(lp + c.log_wp, lq + c.log_wq);
    const bool lr_ok = lr > ninf<A>();
    const A lr_safe = lr_ok ? lr : A(0);
    if constexpr (DIV == kJSD) {  // w_p = beta, w_q = 1 - beta, r = m
      const A tp = p > A(0) ? p * (lp - lr) : A(0);
      const A tq = q > A(0) ? q * (lq - lr) : A(0);
      ell = c.w_p * tp + c.w_q * tq;
      h = c.w_q * tq;
      k = c.w_p * tp;
    } else if constexpr (DIV == kSkewForwardKL) {  // KL(p || r), w_p = skew
      ell = p > A(0) ? p * (lp - lr) : A(0);
      const A rho_q = lr_ok ? d_exp(c.log_wq + lq - lr_safe) : A(0);
      h = -p * rho_q;
      k = ell + p * rho_q;
    } else {  // kSkewReverseKL: KL(q || r), w_q = skew
      ell = q > A(0) ? q * (lq - lr) : A(0);
      const A rho_p = lr_ok ? d_exp(c.log_wp + lp - lr_safe) : A(0);
      h = ell + q * rho_p;
      k = -q * rho_p;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// element types: raw bits <-> the accumulation type
struct Dyn {};  // the dtype is a runtime value (mixed dtypes, float64)

// CTAs of kMaxThreads per SM the register allocation must allow: three (80 registers) for the
// float32-math kernels of one dtype, the hot path; two (128) for the mixed-dtype ones; one for the
// float64-math ones (gradcheck and debugging), which need more registers than 128.
template <typename A, typename TS>
constexpr int kMinBlocks = !std::is_same<A, float>::value ? 1 : std::is_same<TS, Dyn>::value ? 2 : 3;

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using Bits = unsigned int;
  template <typename A>
  static __device__ __forceinline__ A to(Bits b) { return static_cast<A>(__uint_as_float(b)); }
  static __device__ __forceinline__ Bits from(float x) { return __float_as_uint(x); }
  static __device__ __forceinline__ Bits from(double x) { return __float_as_uint(static_cast<float>(x)); }
};
template <>
struct Elem<__half> {
  using Bits = unsigned short;
  template <typename A>
  static __device__ __forceinline__ A to(Bits b) { return static_cast<A>(__half2float(__ushort_as_half(b))); }
  static __device__ __forceinline__ Bits from(float x) { return __half_as_ushort(__float2half_rn(x)); }
  static __device__ __forceinline__ Bits from(double x) { return __half_as_ushort(__double2half(x)); }
};
template <>
struct Elem<__nv_bfloat16> {
  using Bits = unsigned short;
  template <typename A>
  static __device__ __forceinline__ A to(Bits b) { return static_cast<A>(__uint_as_float(static_cast<unsigned>(b) << 16)); }
  static __device__ __forceinline__ Bits from(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
  static __device__ __forceinline__ Bits from(double x) { return __bfloat16_as_ushort(__double2bfloat16(x)); }
};
template <>
struct Elem<double> {
  using Bits = unsigned long long;
  template <typename A>
  static __device__ __forceinline__ A to(Bits b) { return static_cast<A>(__longlong_as_double(static_cast<long long>(b))); }
  static __device__ __forceinline__ Bits from(double x) { return static_cast<Bits>(__double_as_longlong(x)); }
  static __device__ __forceinline__ Bits from(float x) { return from(static_cast<double>(x)); }
};

__device__ __forceinline__ unsigned word(const uint4& v, int c) { return c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w; }
__device__ __forceinline__ void set_word(uint4& v, int c, unsigned w) {
  if (c == 0) v.x = w; else if (c == 1) v.y = w; else if (c == 2) v.z = w; else v.w = w;
}

// Entry i (0..7) of an octet held as sizeof(T)/2 16-byte words, and the reverse.
template <typename T>
__device__ __forceinline__ typename Elem<T>::Bits get_bits(const uint4* r, int i) {
  if constexpr (sizeof(T) == 2) {
    const unsigned w = word(r[0], i >> 1);
    return static_cast<unsigned short>((i & 1) ? (w >> 16) : (w & 0xffffu));
  } else if constexpr (sizeof(T) == 4) {
    return word(r[i >> 2], i & 3);
  } else {
    const uint4& v = r[i >> 1];
    const int c = (i & 1) * 2;
    return (static_cast<unsigned long long>(word(v, c + 1)) << 32) | word(v, c);
  }
}
template <typename T>
__device__ __forceinline__ void put_bits(uint4* r, int i, typename Elem<T>::Bits b) {
  if constexpr (sizeof(T) == 2) {
    const unsigned w = word(r[0], i >> 1);
    set_word(r[0], i >> 1, (i & 1) ? ((w & 0xffffu) | (static_cast<unsigned>(b) << 16)) : ((w & 0xffff0000u) | b));
  } else if constexpr (sizeof(T) == 4) {
    set_word(r[i >> 2], i & 3, b);
  } else {
    const int c = (i & 1) * 2;
    set_word(r[i >> 1], c, static_cast<unsigned>(b & 0xffffffffull));
    set_word(r[i >> 1], c + 1, static_cast<unsigned>(b >> 32));
  }
}

// Loads the octet of entries [0, cnt) at src (cnt <= 8, global or shared memory) into out (-inf
// past cnt). Full octets of 16-byte aligned rows take sizeof(T)/2 vector loads. (The runtime-dtype
// path; fixed dtypes keep raw bits, below.) Loads are plain C++ loads on purpose: CUDA's cache-hint
// intrinsics (__ldg, __ldcs) are `asm volatile`, which pins them in program order; in this kernel
// that cost 30+ registers of spills.
template <typename T, typename A>
__device__ __forceinline__ void load_octet(const char* src, int cnt, bool vec, A (&out)[8]) {
  using B = typename Elem<T>::Bits;
  constexpr int NV = sizeof(T) / 2;
  if (vec && cnt == 8) {
    uint4 r[NV];
#pragma unroll
    for (int v = 0; v < NV; ++v) r[v] = reinterpret_cast<const uint4*>(src)[v];
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = Elem<T>::template to<A>(get_bits<T>(r, i));
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (i < cnt) {
        out[i] = Elem<T>::template to<A>(reinterpret_cast<const B*>(src)[i]);
      } else {
        out[i] = ninf<A>();
      }
    }
  }
}

// Stores entries [0, cnt) of g at dst with streaming (evict-first) stores.
template <typename T, typename A>
__device__ __forceinline__ void store_octet(char* dst, int cnt, bool vec, const A (&g)[8]) {
  using B = typename Elem<T>::Bits;
  constexpr int NV = sizeof(T) / 2;
  if (vec && cnt == 8) {
    uint4 r[NV];
#pragma unroll
    for (int v = 0; v < NV; ++v) r[v] = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int i = 0; i < 8; ++i) put_bits<T>(r, i, Elem<T>::from(g[i]));
#pragma unroll
    for (int v = 0; v < NV; ++v) __stcs(reinterpret_cast<uint4*>(dst) + v, r[v]);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < cnt) __stcs(reinterpret_cast<B*>(dst) + i, Elem<T>::from(g[i]));
  }
}

// Eight entries on their way between memory and the math. A fixed dtype keeps the raw bits (four
// registers for eight bf16) and converts an entry when it is read, so that an octet of student
// and teacher, and one of each gradient, hold 16 registers instead of 32; Dyn (mixed dtypes,
// float64) converts at load time. Entries at or past cnt are never read.
template <typename T, typename A>
struct Octet {
  uint4 r[sizeof(T) / 2];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int v = 0; v < int(sizeof(T) / 2); ++v) r[v] = make_uint4(0u, 0u, 0u, 0u);
  }
  __device__ __forceinline__ A get(int i) const { return Elem<T>::template to<A>(get_bits<T>(r, i)); }
  __device__ __forceinline__ void set(int i, A x) { put_bits<T>(r, i, Elem<T>::from(x)); }

  __device__ __forceinline__ void load(int, const char* src, int cnt, bool vec) {
    using B = typename Elem<T>::Bits;
    constexpr int NV = sizeof(T) / 2;
    if (vec && cnt == 8) {
#pragma unroll
      for (int v = 0; v < NV; ++v) r[v] = reinterpret_cast<const uint4*>(src)[v];
    } else {
#pragma unroll
      for (int v = 0; v < NV; ++v) r[v] = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (i < cnt) {
          put_bits<T>(r, i, reinterpret_cast<const B*>(src)[i]);
        }
      }
    }
  }

  // Streaming (evict-first) stores of entries [0, cnt).
  __device__ __forceinline__ void store(int, char* dst, int cnt, bool vec) const {
    using B = typename Elem<T>::Bits;
    constexpr int NV = sizeof(T) / 2;
    if (vec && cnt == 8) {
#pragma unroll
      for (int v = 0; v < NV; ++v) __stcs(reinterpret_cast<uint4*>(dst) + v, r[v]);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (i < cnt) __stcs(reinterpret_cast<B*>(dst) + i, get_bits<T>(r, i));
    }
  }
};

template <typename A>
struct Octet<Dyn, A> {
  A v[8];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = A(0);
  }
  __device__ __forceinline__ A get(int i) const { return v[i]; }
  __device__ __forceinline__ void set(int i, A x) { v[i] = x; }

  __device__ __forceinline__ void load(int code, const char* src, int cnt, bool vec) {
    switch (code) {
      case kF32: load_octet<float, A>(src, cnt, vec, v); break;
      case kF16: load_octet<__half, A>(src, cnt, vec, v); break;
      case kBF16: load_octet<__nv_bfloat16, A>(src, cnt, vec, v); break;
      default: load_octet<double, A>(src, cnt, vec, v); break;
    }
  }

  __device__ __forceinline__ void store(int code, char* dst, int cnt, bool vec) const {
    switch (code) {
      case kF32: store_octet<float, A>(dst, cnt, vec, v); break;
      case kF16: store_octet<__half, A>(dst, cnt, vec, v); break;
      case kBF16: store_octet<__nv_bfloat16, A>(dst, cnt, vec, v); break;
      default: store_octet<double, A>(dst, cnt, vec, v); break;
    }
  }
};

template <typename T>
__device__ __forceinline__ int esize(int runtime_size) {
  if constexpr (std::is_same<T, Dyn>::value) return runtime_size;
  else return static_cast<int>(sizeof(T));
}

// ---------------------------------------------------------------------------------------------
// reductions: warp butterfly -> warps in order (thread 0) -> cluster ranks in order (thread 0)
struct SumOp {
  template <typename A, int K>
  __device__ __forceinline__ void operator()(A (&a)[K], const A (&b)[K]) const {
#pragma unroll
    for (int i = 0; i < K; ++i) a[i] += b[i];
  }
};
struct LseOp {  // K/2 (max, sum-exp) pairs
  template <typename A, int K>
  __device__ __forceinline__ void operator()(A (&a)[K], const A (&b)[K]) const {
#pragma unroll
    for (int i = 0; i < K; i += 2) lse_merge(a[i], a[i + 1], b[i], b[i + 1]);
  }
};

// Every thread of every CTA of the row's cluster ends with the same bits in v. All threads must
// call it (blockDim.x is a multiple of 32). `slot` is this phase's cluster exchange area; each
// phase uses its own, so a fast CTA never overwrites a slot a peer is still reading.
template <typename A, int K, class Op>
__device__ __forceinline__ void allreduce(A (&v)[K], Op op, A* red, A* bc, A* slot, int nsplit) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    A o[K];
#pragma unroll
    for (int i = 0; i < K; ++i) o[i] = __shfl_xor_sync(0xffffffffu, v[i], off);
    op(v, o);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < K; ++i) red[warp * K + i] = v[i];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    A acc[K];
#pragma unroll
    for (int i = 0; i < K; ++i) acc[i] = red[i];
    for (int w = 1; w < nw; ++w) {
      A o[K];
#pragma unroll
      for (int i = 0; i < K; ++i) o[i] = red[w * K + i];
      op(acc, o);
    }
#pragma unroll
    for (int i = 0; i < K; ++i) (nsplit > 1 ? slot : bc)[i] = acc[i];
  }
  if (nsplit > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // release/acquire: every CTA's slot is visible to its peers
    if (threadIdx.x == 0) {
      A acc[K];
      const A* r0 = cluster.map_shared_rank(slot, 0u);
#pragma unroll
      for (int i = 0; i < K; ++i) acc[i] = r0[i];
      for (int r = 1; r < nsplit; ++r) {
        const A* rr = cluster.map_shared_rank(slot, static_cast<unsigned>(r));
        A o[K];
#pragma unroll
        for (int i = 0; i < K; ++i) o[i] = rr[i];
        op(acc, o);
      }
#pragma unroll
      for (int i = 0; i < K; ++i) bc[i] = acc[i];
    }
#else
    __trap();  // the launcher never asks for clusters from code compiled for < sm_90
#endif
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < K; ++i) v[i] = bc[i];
}

__device__ __forceinline__ void cluster_barrier(int nsplit) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (nsplit > 1) cooperative_groups::this_cluster().sync();
#endif
}

// Calls body(xs, xt, offset, count) for each octet of this thread (octets tid, tid + nt, ...
// of the n entries at s and t), forwards or backwards. The same octets belong to the same thread in
// every pass, whatever the direction.
template <typename A, typename TS, typename TT, class F>
__device__ __forceinline__ void sweep(const Params& P, const char* s, const char* t, bool vs, bool vt, int64_t n,
                                      bool reverse, F&& body) {
  const int es = esize<TS>(P.es), et = esize<TT>(P.et);
  const int64_t n_oct = (n + 7) >> 3;
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  if (tid >= n_oct) return;
  const int64_t m = (n_oct - 1 - tid) / nt + 1;  // octets of this thread
  for (int64_t i = 0; i < m; ++i) {
    const int64_t off = (tid + (reverse ? m - 1 - i : i) * nt) * 8;
    const int cnt = static_cast<int>(n - off < 8 ? n - off : 8);
    Octet<TS, A> xs;
    Octet<TT, A> xt;
    xs.load(P.ds, s + off * es, cnt, vs);
    xt.load(P.dt, t + off * et, cnt, vt);
    body(xs, xt, off, cnt);
  }
}

// ---------------------------------------------------------------------------------------------
// the shared-memory copy of a slice: cp.async (sm_80+) straight from global to shared memory, no
// register staging, so a thread can have its whole part of the slice in flight at once
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
#else
  *reinterpret_cast<uint4*>(smem) = __ldcs(reinterpret_cast<const uint4*>(gmem));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most `pending` (0..3) of this thread's committed groups are still in flight.
__device__ __forceinline__ void cp_async_wait(int pending) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  switch (pending) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
  }
#endif
}

// Copies entries [0, cnt) of one octet (es bytes each) from global src to shared dst: 16-byte
// async copies for full octets of aligned rows, else element by element (synchronously).
__device__ __forceinline__ void copy_octet(char* dst, const char* src, int cnt, bool vec, int es) {
  if (vec && cnt == 8) {
    for (int o = 0; o < 8 * es; o += 16) cp_async16(dst + o, src + o);
  } else if (es == 2) {
    for (int i = 0; i < cnt; ++i)
      reinterpret_cast<unsigned short*>(dst)[i] = __ldcs(reinterpret_cast<const unsigned short*>(src) + i);
  } else if (es == 4) {
    for (int i = 0; i < cnt; ++i)
      reinterpret_cast<unsigned*>(dst)[i] = __ldcs(reinterpret_cast<const unsigned*>(src) + i);
  } else {
    for (int i = 0; i < cnt; ++i)
      reinterpret_cast<unsigned long long*>(dst)[i] =
          __ldcs(reinterpret_cast<const unsigned long long*>(src) + i);
  }
}

template <typename A>
__device__ __forceinline__ void write_loss(const Params& P, int64_t bi, int64_t ri, A x) {
  char* dst = P.loss + bi * P.o_sb + ri * P.o_sr;
  if (P.loss_f64) *reinterpret_cast<double*>(dst) = static_cast<double>(x);
  else *reinterpret_cast<float*>(dst) = static_cast<float>(x);
}

// ---------------------------------------------------------------------------------------------
template <int DIV, typename A, typename TS, typename TT>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks<A, TS>) kd_fwd_kernel(const Params P) {
  extern __shared__ __align__(16) unsigned char cache[];
  __shared__ A red[kMaxWarps * kSlots];
  __shared__ A bc[kSlots];
  __shared__ A slots[3 * kSlots];

  const Coefs<A>& c = coefs<A>(P);
  const int rank = static_cast<int>(blockIdx.x % static_cast<unsigned>(P.nsplit));
  const int64_t row = P.row0 + blockIdx.x / static_cast<unsigned>(P.nsplit);
  const int64_t bi = row / P.R, ri = row % P.R;
  const int64_t v0 = rank * P.slice;
  const int64_t n = v0 >= P.V ? 0 : (P.V - v0 < P.slice ? P.V - v0 : P.slice);  // entries of this CTA
  const int es = esize<TS>(P.es), et = esize<TT>(P.et);
  const int tid = threadIdx.x, nt = blockDim.x;
  const char* s_row = P.s + bi * P.s_sb + ri * P.s_sr;
  const char* s_sl = s_row + v0 * es;
  const char* t_sl = P.t + bi * P.t_sb + ri * P.t_sr + v0 * et;
  char* gs_sl = P.has_gs ? P.gs + bi * P.gs_sb + ri * P.gs_sr + v0 * es : nullptr;
  char* gt_sl = P.has_gt ? P.gt + bi * P.gt_sb + ri * P.gt_sr + v0 * et : nullptr;

  int64_t label = -1;
  bool bad = false;  // a label outside [0, V) that is not ignore_index: NaN loss and gradient
  if (P.has_labels) {
    label = P.labels[bi * P.l_sb + ri * P.l_sr];
    if (label == P.ignore_index) {  // loss 0, gradient 0; the logits are never read
      Octet<TS, A> zs;
      Octet<TT, A> zt;
      zs.zero();  // +0.0 is all-zero bits in every dtype
      zt.zero();
      for (int64_t o = int64_t(tid) * 8; o < n; o += int64_t(nt) * 8) {
        const int cnt = static_cast<int>(n - o < 8 ? n - o : 8);
        if (P.has_gs) zs.store(P.ds, gs_sl + o * es, cnt, P.vgs);
        if (P.has_gt) zt.store(P.dt, gt_sl + o * et, cnt, P.vgt);
      }
      if (rank == 0 && tid == 0) write_loss<A>(P, bi, ri, A(0));
      return;  // the whole cluster returns here (same row), before any cluster barrier
    }
    bad = label < 0 || label >= P.V;
  }

  const bool capped = P.capped, sep1 = P.hard && !P.unit_t;
  auto capz = [&](A z, A& dz) {  // cap(z) and cap'(z)
    if (capped) {
      const A th = d_tanh(z / c.cap);
      dz = A(1) - th * th;
      return c.cap * th;
    }
    dz = A(1);
    return z;
  };

  // the label's logit, for the hard loss: read before the first barrier, hence before any CTA of
  // the row writes a gradient (inplace)
  A s_lab = A(0);
  if (P.hard && !bad && rank == 0 && tid == 0) {
    Octet<TS, A> x;
    x.load(P.ds, s_row + label * es, 1, false);
    A unused;
    s_lab = capz(x.get(0), unused);
  }

  // The shared-memory copy of this CTA's slice: student bits, then teacher bits (slice * es is a
  // multiple of 16, so both start 16-byte aligned). Each thread copies exactly the octets it
  // later reads (the same octets in every pass, whatever the direction), so waiting for its own
  // copies is enough: no barrier.
  char* cache_s = reinterpret_cast<char*>(cache);
  char* cache_t = reinterpret_cast<char*>(cache) + P.slice * es;
  const int64_t n_oct = (n + 7) >> 3;
  const int64_t m = tid < n_oct ? (n_oct - 1 - tid) / nt + 1 : 0;  // octets of this thread
  constexpr int kGroups = 4;  // copies complete (and are consumed) in up to 4 groups
  const int64_t per_group = (m + kGroups - 1) / kGroups;

  // ---- pass 1: per-thread online max / sum-exp --------------------------------------------
  A st[6] = {ninf<A>(), A(0), ninf<A>(), A(0), ninf<A>(), A(0)};
  auto stats = [&](const Octet<TS, A>& xs, const Octet<TT, A>& xt, int64_t, int cnt) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (i < cnt) {
        A d;
        const A cs = capz(xs.get(i), d), ct = capz(xt.get(i), d);
        lse_add(st[0], st[1], cs * c.inv_t);
        lse_add(st[2], st[3], ct * c.inv_t);
        if (sep1) lse_add(st[4], st[5], cs);
      }
    }
  };
  if (P.cache) {
    for (int g = 0; g < kGroups; ++g) {
      for (int64_t i = g * per_group; i < m && i < (g + 1) * per_group; ++i) {
        const int64_t off = (tid + i * nt) * 8;
        const int cnt = static_cast<int>(n - off < 8 ? n - off : 8);
        copy_octet(cache_s + off * es, s_sl + off * es, cnt, P.vs, es);
        copy_octet(cache_t + off * et, t_sl + off * et, cnt, P.vt, et);
      }
      cp_async_commit();
    }
    for (int g = 0; g < kGroups; ++g) {
      cp_async_wait(kGroups - 1 - g);
      for (int64_t i = g * per_group; i < m && i < (g + 1) * per_group; ++i) {
        const int64_t off = (tid + i * nt) * 8;
        const int cnt = static_cast<int>(n - off < 8 ? n - off : 8);
        Octet<TS, A> xs;
        Octet<TT, A> xt;
        xs.load(P.ds, cache_s + off * es, cnt, true);
        xt.load(P.dt, cache_t + off * et, cnt, true);
        stats(xs, xt, off, cnt);
      }
    }
  } else {  // too large for shared memory: later passes re-read global memory (L2 if still there)
    sweep<A, TS, TT>(P, s_sl, t_sl, P.vs, P.vt, n, false, stats);
  }
  allreduce<A, 6>(st, LseOp{}, red, bc, slots, P.nsplit);
  const A sha = st[0] == ninf<A>() ? A(0) : st[0], lsa = d_log(st[1]);
  const A shb = st[2] == ninf<A>() ? A(0) : st[2], lsb = d_log(st[3]);
  const A sh1 = sep1 ? (st[4] == ninf<A>() ? A(0) : st[4]) : sha;
  const A ls1 = sep1 ? d_log(st[5]) : lsa;

  // later passes read the shared-memory copy (aligned), else global memory again (from L2 if the
  // entries are still there)
  const char* src_s = P.cache ? cache_s : s_sl;
  const char* src_t = P.cache ? cache_t : t_sl;
  const bool vs2 = P.cache || P.vs, vt2 = P.cache || P.vt;

  // ---- pass 2 (backwards): sum ell, sum h, sum k ------------------------------------------
  A D = A(0), H = A(-1), K = A(0);  // fused_d: h = -p sums to -1, K unused
  if (!P.fused_d) {
    A sums[3] = {A(0), A(0), A(0)};
    auto sum_terms = [&](const Octet<TS, A>& xs, const Octet<TT, A>& xt, int64_t, int cnt) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (i < cnt) {
          A d, q, p, ell, h, k;
          const A a = capz(xs.get(i), d) * c.inv_t, b = capz(xt.get(i), d) * c.inv_t;
          terms<DIV, A>(a - sha, b - shb, lsa, lsb, c, q, p, ell, h, k);
          sums[0] += ell;
          sums[1] += h;
          sums[2] += k;
        }
      }
    };
    sweep<A, TS, TT>(P, src_s, src_t, vs2, vt2, n, true, sum_terms);
    allreduce<A, 3>(sums, SumOp{}, red, bc, slots + kSlots, P.nsplit);
    D = sums[0];
    H = sums[1];
    K = sums[2];
  }

  // ---- pass 3: gradients (the opposite direction of the previous pass) ----------------------
  if (P.has_gs || P.has_gt || P.fused_d) {
    A acc_d = A(0);
    auto gradients = [&](const Octet<TS, A>& xs, const Octet<TT, A>& xt, int64_t off, int cnt) {
      Octet<TS, A> g_s;
      Octet<TT, A> g_t;
      g_s.zero();  // entries are packed into 32-bit words one at a time
      g_t.zero();
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (i < cnt) {
          A dcs, dct, q, p, ell, h, k;
          const A cs = capz(xs.get(i), dcs), ct = capz(xt.get(i), dct);
          terms<DIV, A>(cs * c.inv_t - sha, ct * c.inv_t - shb, lsa, lsb, c, q, p, ell, h, k);
          acc_d += ell;
          if (P.has_gs) {
            A g = c.grad_coef * (h - q * H);
            if (P.hard) {
              const A q1 = P.unit_t ? q : d_exp((cs - sh1) - ls1);
              g += c.hw * (q1 - (v0 + off + i == label ? A(1) : A(0)));
            }
            if (capped) g *= dcs;
            g_s.set(i, bad ? static_cast<A>(NAN) : g);
          }
          if (P.has_gt) {
            A g = c.grad_coef * (k - p * K);
            if (capped) g *= dct;
            g_t.set(i, bad ? static_cast<A>(NAN) : g);
          }
        }
      }
      if (P.has_gs) g_s.store(P.ds, gs_sl + off * es, cnt, P.vgs);
      if (P.has_gt) g_t.store(P.dt, gt_sl + off * et, cnt, P.vgt);
    };
    sweep<A, TS, TT>(P, src_s, src_t, vs2, vt2, n, P.fused_d, gradients);
    if (P.fused_d) {
      A d1[1] = {acc_d};
      allreduce<A, 1>(d1, SumOp{}, red, bc, slots + 2 * kSlots, P.nsplit);
      D = d1[0];
    }
  }

  if (rank == 0 && tid == 0) {
    A loss = c.soft_coef * D;
    if (P.hard) loss += c.hw * ((sh1 - s_lab) + ls1);
    write_loss<A>(P, bi, ri, bad ? static_cast<A>(NAN) : loss);
  }
  cluster_barrier(P.nsplit);  // no CTA leaves while a peer may still read its slots
}

// ---------------------------------------------------------------------------------------------
// host side
using KernelFn = void (*)(Params);

template <int DIV, typename A>
KernelFn pick_dtypes(int ds, int dt) {
  if constexpr (std::is_same<A, float>::value) {
    if (ds == dt && ds == kF32) return kd_fwd_kernel<DIV, float, float, float>;
    if (ds == dt && ds == kF16) return kd_fwd_kernel<DIV, float, __half, __half>;
    if (ds == dt && ds == kBF16) return kd_fwd_kernel<DIV, float, __nv_bfloat16, __nv_bfloat16>;
  }
  return kd_fwd_kernel<DIV, A, Dyn, Dyn>;
}

template <typename A>
KernelFn pick_div(int64_t div, int ds, int dt) {
  switch (div) {
    case kForwardKL: return pick_dtypes<kForwardKL, A>(ds, dt);
    case kReverseKL: return pick_dtypes<kReverseKL, A>(ds, dt);
    case kJSD: return pick_dtypes<kJSD, A>(ds, dt);
    case kSkewForwardKL: return pick_dtypes<kSkewForwardKL, A>(ds, dt);
    case kSkewReverseKL: return pick_dtypes<kSkewReverseKL, A>(ds, dt);
    default: return pick_dtypes<kTVD, A>(ds, dt);
  }
}

struct KernelInfo {
  int max_split = 1;         // largest cluster to try: 1 below sm_90 (or for code compiled for it)
  int64_t max_dyn_smem = 0;  // dynamic shared memory one CTA may use (opted in)
  int64_t smem_per_sm = 0;
  int64_t static_smem = 0;
};

KernelInfo kernel_info(KernelFn fn, int device) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, KernelInfo> known;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(reinterpret_cast<const void*>(fn), device);
  auto it = known.find(key);
  if (it != known.end()) return it->second;
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, fn));
  int major = 0, optin = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  KernelInfo info;
  // ptxVersion: the virtual architecture the running code was compiled from (PTX JIT-compiled
  // from compute_80 on an H100 reports 80 and has no cluster code)
  if (major >= 9 && attr.ptxVersion >= 90) {
    info.max_split = 8;
    // 16-CTA clusters (H100 has them) let fp32 rows of ~128K entries stay on chip; whether a given
    // shape is schedulable is asked of cudaOccupancyMaxActiveClusters before each first use
    if (cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess)
      info.max_split = kMaxSplit;
    else
      (void)cudaGetLastError();
  }
  // FASTKD_CUDA_KD_MAX_SPLIT=n caps the cluster size (tests: n = 1 runs sm_80's layouts on sm_90)
  if (const char* cap = std::getenv("FASTKD_CUDA_KD_MAX_SPLIT")) {
    const int n = std::atoi(cap);
    while (n >= 1 && info.max_split > n) info.max_split /= 2;
  }
  info.static_smem = static_cast<int64_t>(attr.sharedSizeBytes);
  info.max_dyn_smem = std::max<int64_t>(0, optin - info.static_smem);
  info.smem_per_sm = per_sm;
  if (info.max_dyn_smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(info.max_dyn_smem)));
  known.emplace(key, info);
  return info;
}

struct Plan {
  int nsplit = 1;
  int64_t slice = 0;
  bool cache = false;
  int threads = 64;
  size_t smem = 0;
};

void fill_cluster_config(cudaLaunchConfig_t& cfg, cudaLaunchAttribute* attr, const Plan& p, unsigned grid,
                         cudaStream_t stream) {
  cfg = cudaLaunchConfig_t{};
  cfg.gridDim = dim3(grid, 1, 1);
  cfg.blockDim = dim3(static_cast<unsigned>(p.threads), 1, 1);
  cfg.dynamicSmemBytes = p.smem;
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(p.nsplit);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
}

// Whether at least one cluster of this shape can be resident (cached per kernel and shape).
bool cluster_fits(KernelFn fn, int device, const Plan& p, cudaStream_t stream) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, int, size_t>, bool> known;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(reinterpret_cast<const void*>(fn), device, p.nsplit, p.threads, p.smem);
  auto it = known.find(key);
  if (it != known.end()) return it->second;
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr[1];
  fill_cluster_config(cfg, attr, p, static_cast<unsigned>(p.nsplit), stream);
  int clusters = 0;
  const cudaError_t err = cudaOccupancyMaxActiveClusters(&clusters, fn, &cfg);
  if (err != cudaSuccess) (void)cudaGetLastError();  // not fatal: fall back to one CTA per row
  const bool ok = err == cudaSuccess && clusters >= 1;
  known.emplace(key, ok);
  return ok;
}

int threads_for(int64_t slice) {
  const int64_t oct = (slice + 7) / 8;
  return static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(64, (oct + 31) / 32 * 32)));
}

// The split of a row and whether its slices live in shared memory (see the top of the file): the
// fewest CTAs per row whose slices fit a shared-memory budget that lets three CTAs share an SM,
// else two, else one; else no cache (the global re-read path, split 8 ways where clusters exist).
Plan make_plan(KernelFn fn, int device, int64_t V, int es, int et, cudaStream_t stream) {
  const KernelInfo ki = kernel_info(fn, device);
  auto slice_of = [&](int c) { return ((V + c - 1) / c + 7) / 8 * 8; };
  auto per_sm = [&](int k) {  // 1 KB per CTA is reserved by the hardware
    return std::min<int64_t>(ki.max_dyn_smem, ki.smem_per_sm / k - 1024 - ki.static_smem);
  };
  const int64_t budgets[3] = {per_sm(3), per_sm(2), ki.max_dyn_smem};
  for (int64_t budget : budgets) {
    for (int c = 1; c <= ki.max_split; c *= 2) {
      Plan p;
      p.nsplit = c;
      p.slice = slice_of(c);
      p.cache = true;
      p.threads = threads_for(p.slice);
      p.smem = static_cast<size_t>(p.slice) * static_cast<size_t>(es + et);
      if (static_cast<int64_t>(p.smem) > budget) continue;
      if (c == 1 || cluster_fits(fn, device, p, stream)) return p;
    }
  }
  Plan p;
  int c = std::min(ki.max_split, 8);
  while (c > 1 && slice_of(c) < 8192) c /= 2;  // slices of at least 8K entries
  p.nsplit = c;
  p.slice = slice_of(c);
  p.threads = threads_for(p.slice);
  if (c > 1 && !cluster_fits(fn, device, p, stream)) {
    p.nsplit = 1;
    p.slice = slice_of(1);
    p.threads = threads_for(p.slice);
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// host side: dtype codes and row alignment (the argument checks are ../kd_checks.h, shared with
// the CPU kernel)
int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: return kF64;
  }
}


// Every row of x ([B, R, V], last dim contiguous) starts 16-byte aligned.
bool rows_aligned(const at::Tensor& x) {
  const int64_t e = x.element_size();
  return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && (x.size(0) <= 1 || (x.stride(0) * e) % 16 == 0) &&
         (x.size(1) <= 1 || (x.stride(1) * e) % 16 == 0);
}

double log_or_ninf(double w) { return w > 0.0 ? std::log(w) : -INFINITY; }

void kd_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                 const at::Tensor& loss, const std::optional<at::Tensor>& grad_student,
                 const std::optional<at::Tensor>& grad_teacher, int64_t divergence, double temperature, double beta,
                 double skew, int64_t ignore_index, double soft_weight, double hard_weight, bool scale_temperature,
                 double softcap) {
  // The CPU kernel also rejects labels outside [0, V) that are not ignore_index; here that would
  // be a device-to-host sync, so the kernel gives such a row a NaN loss and gradient.
  const checks::KdShape shape =
      checks::check_kd_args(student, teacher, labels, loss, grad_student, grad_teacher, divergence, temperature, beta,
                            skew, hard_weight, softcap, c10::DeviceType::CUDA);
  const int64_t B = shape.B, R = shape.R, V = shape.V, N = shape.N;
  const bool wide = shape.wide;
  const at::ScalarType ts = student.scalar_type(), tt = teacher.scalar_type();
  if (N == 0) return;

  const c10::cuda::CUDAGuard guard(student.device());
  const int device = student.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();

  Params P{};
  P.s = static_cast<const char*>(student.data_ptr());
  P.t = static_cast<const char*>(teacher.data_ptr());
  P.es = static_cast<int>(student.element_size());
  P.et = static_cast<int>(teacher.element_size());
  P.s_sb = student.stride(0) * P.es;
  P.s_sr = student.stride(1) * P.es;
  P.t_sb = teacher.stride(0) * P.et;
  P.t_sr = teacher.stride(1) * P.et;
  P.ds = dtype_code(ts);
  P.dt = dtype_code(tt);
  P.vs = rows_aligned(student);
  P.vt = rows_aligned(teacher);
  if (grad_student.has_value()) {
    const at::Tensor& g = *grad_student;
    P.gs = static_cast<char*>(g.data_ptr());
    P.gs_sb = g.stride(0) * P.es;
    P.gs_sr = g.stride(1) * P.es;
    P.vgs = rows_aligned(g);
    P.has_gs = true;
  }
  if (grad_teacher.has_value()) {
    const at::Tensor& g = *grad_teacher;
    P.gt = static_cast<char*>(g.data_ptr());
    P.gt_sb = g.stride(0) * P.et;
    P.gt_sr = g.stride(1) * P.et;
    P.vgt = rows_aligned(g);
    P.has_gt = true;
  }
  if (labels.has_value()) {
    P.labels = labels->data_ptr<int64_t>();
    P.l_sb = labels->stride(0);
    P.l_sr = labels->stride(1);
    P.has_labels = true;
  }
  P.loss = static_cast<char*>(loss.data_ptr());
  P.loss_f64 = wide;
  P.o_sb = loss.stride(0) * loss.element_size();
  P.o_sr = loss.stride(1) * loss.element_size();
  P.R = R;
  P.V = V;
  P.ignore_index = ignore_index;
  P.hard = hard_weight != 0.0;
  P.capped = softcap != 0.0;
  P.unit_t = temperature == 1.0;
  // forward_kl needs no sum before its student gradient (h = -p): D is summed in the gradient pass
  P.fused_d = divergence == kForwardKL && !P.has_gt;
  const double scale = scale_temperature ? temperature * temperature : 1.0;
  Coefs<double> cf;
  cf.inv_t = 1.0 / temperature;
  cf.cap = softcap;
  cf.soft_coef = soft_weight * scale;
  cf.grad_coef = soft_weight * scale / temperature;
  cf.hw = hard_weight;
  if (divergence == kJSD) {
    cf.w_p = beta;
    cf.w_q = 1.0 - beta;
  } else if (divergence == kSkewForwardKL) {
    cf.w_p = skew;
    cf.w_q = 1.0 - skew;
  } else if (divergence == kSkewReverseKL) {
    cf.w_p = 1.0 - skew;
    cf.w_q = skew;
  } else {
    cf.w_p = cf.w_q = 0.5;  // unused
  }
  cf.log_wp = log_or_ninf(cf.w_p);
  cf.log_wq = log_or_ninf(cf.w_q);
  P.cf64 = cf;
  P.cf32 = Coefs<float>{static_cast<float>(cf.inv_t),     static_cast<float>(cf.cap),
                        static_cast<float>(cf.soft_coef), static_cast<float>(cf.grad_coef),
                        static_cast<float>(cf.hw),        static_cast<float>(cf.w_p),
                        static_cast<float>(cf.w_q),       static_cast<float>(cf.log_wp),
                        static_cast<float>(cf.log_wq)};

  const KernelFn fn = wide ? pick_div<double>(divergence, P.ds, P.dt) : pick_div<float>(divergence, P.ds, P.dt);
  const Plan plan = make_plan(fn, device, V, P.es, P.et, stream);
  P.nsplit = plan.nsplit;
  P.slice = plan.slice;
  P.cache = plan.cache;

  const int64_t max_rows = INT_MAX / plan.nsplit;  // gridDim.x < 2^31
  for (int64_t r0 = 0; r0 < N; r0 += max_rows) {
    P.row0 = r0;
    const unsigned grid = static_cast<unsigned>(std::min(max_rows, N - r0) * plan.nsplit);
    if (plan.nsplit > 1) {
      cudaLaunchConfig_t cfg;
      cudaLaunchAttribute attr[1];
      fill_cluster_config(cfg, attr, plan, grid, stream);
      C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, fn, P));
    } else {
      fn<<<grid, plan.threads, plan.smem, stream>>>(P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

}  // namespace
}  // namespace kd_cuda
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("kd_fwd", &fastkd::kd_cuda::kd_fwd_cuda); }
