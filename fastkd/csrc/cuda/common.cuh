// Device and host helpers shared by the CUDA kernels of every family (fastkd/csrc/cuda/*.cu):
// the accumulation-type math (d_exp, ...), online log-sum-exp (lse_add / lse_merge), the
// per-entry divergence terms of fastkd/reference/divergences.py, element types and octet
// (8-entry, 16-byte) loads and stores, block + cluster reductions, cp.async copies, and the
// host-side launch planning (one CTA or one thread-block cluster per row, slices cached in shared
// memory). Family-independent: nothing here knows a family's Params. divergences.cu's header
// comment explains why these pieces look the way they do.
//
// Other kernels include this file; new helpers are appended at the end (keep what is here stable:
// the hot kernels' register counts depend on it, see tests/test_cuda_compile.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

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
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace fastkd {
namespace cuda_common {

// Divergence codes: fastkd.reference.divergences.DIVERGENCES.
constexpr int kForwardKL = 0, kReverseKL = 1, kJSD = 2, kSkewForwardKL = 3, kSkewReverseKL = 4, kTVD = 5;
constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kMaxSplit = 16;  // 8 is the portable maximum cluster size; 16 where the device allows it

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// Scalar coefficients, filled on the host in both float and double so that the kernel reads them
// as constant-bank operands instead of converting them into registers it then holds throughout.
template <typename A>
struct Coefs {
  A inv_t, cap, soft_coef, grad_coef, hw;
  A w_p, w_q, log_wp, log_wq;  // the mixture r = w_p p + w_q q of jsd and the skew divergences
};

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

// (m, z) <- (m, z) + (m2, z2); the empty pair (-inf, 0) is the identity. A NaN entry leaves
// its m alone and makes its z NaN (lse_add), so a partial may be (-inf, NaN): z + z2 keeps it.
template <typename A>
__device__ __forceinline__ void lse_merge(A& m, A& z, A m2, A z2) {
  const A mm = m2 > m ? m2 : m;
  if (mm == ninf<A>()) {  // both without a finite entry
    z += z2;
    return;
  }
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
// log q = (a - max a) - lsa: an exact subtraction, then a small one. A NaN logit makes its row's
// sum-exp NaN (lse_add), hence every q or p of the row; the masks test == 0 / == -inf (not > 0)
// so that NaN passes through them and the row's loss and gradients come out NaN.
template <int DIV, typename A>
__device__ __forceinline__ void terms(A a, A b, A lsa, A lsb, const Coefs<A>& c, A& q, A& p, A& ell, A& h,
                                      A& k) {
  const A lq = a - lsa, lp = b - lsb;
  q = d_exp(lq);
  p = d_exp(lp);
  if constexpr (DIV == kForwardKL) {
    ell = p == A(0) ? A(0) : p * (lp - lq);
    h = -p;
    k = ell + p;
  } else if constexpr (DIV == kReverseKL) {
    ell = q == A(0) ? A(0) : q * (lq - lp);
    h = ell + q;
    k = -q;
  } else if constexpr (DIV == kTVD) {
    const A d = q - p;
    const A sg = d > A(0) ? A(1) : (d < A(0) ? A(-1) : d - d);  // d - d: 0, or NaN for NaN d
    ell = A(0.5) * d_abs(d);
    h = A(0.5) * q * sg;
    k = A(-0.5) * p * sg;
  } else {
    // rho_x = w_x x / r lies in [0, 1], so no ratio overflows; x / r with r = 0 is 0
    const A lr = logaddexp(lp + c.log_wp, lq + c.log_wq);
    const bool lr_dead = lr == ninf<A>();
    const A lr_safe = lr_dead ? A(0) : lr;
    if constexpr (DIV == kJSD) {  // w_p = beta, w_q = 1 - beta, r = m
      const A tp = p == A(0) ? A(0) : p * (lp - lr);
      const A tq = q == A(0) ? A(0) : q * (lq - lr);
      ell = c.w_p * tp + c.w_q * tq;
      h = c.w_q * tq;
      k = c.w_p * tp;
    } else if constexpr (DIV == kSkewForwardKL) {  // KL(p || r), w_p = skew
      ell = p == A(0) ? A(0) : p * (lp - lr);
      const A rho_q = lr_dead ? A(0) : d_exp(c.log_wq + lq - lr_safe);
      h = -p * rho_q;
      k = ell + p * rho_q;
    } else {  // kSkewReverseKL: KL(q || r), w_q = skew
      ell = q == A(0) ? A(0) : q * (lq - lr);
      const A rho_p = lr_dead ? A(0) : d_exp(c.log_wp + lp - lr_safe);
      h = ell + q * rho_p;
      k = -q * rho_p;
    }
  }
}
// ---------------------------------------------------------------------------------------------
// element types: raw bits <-> the accumulation type
struct Dyn {};  // the dtype is a runtime value (mixed dtypes, float64)

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


// ---------------------------------------------------------------------------------------------
// host side: launch planning (one CTA or one cluster per row)
struct KernelInfo {
  int max_split = 1;         // largest cluster to try: 1 below sm_90 (or for code compiled for it)
  int64_t max_dyn_smem = 0;  // dynamic shared memory one CTA may use (opted in)
  int64_t smem_per_sm = 0;
  int64_t static_smem = 0;
};

// Per kernel and device: cluster and shared-memory limits, opted in once. max_split_env names an
// environment variable that caps the cluster size (tests: n = 1 runs sm_80's layouts on sm_90).
inline KernelInfo kernel_info(const void* fn, int device, const char* max_split_env) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, KernelInfo> known;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(fn, device);
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
  if (const char* cap = max_split_env ? std::getenv(max_split_env) : nullptr) {
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

inline void fill_cluster_config(cudaLaunchConfig_t& cfg, cudaLaunchAttribute* attr, const Plan& p, unsigned grid,
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
inline bool cluster_fits(const void* fn, int device, const Plan& p, cudaStream_t stream) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, int, size_t>, bool> known;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(fn, device, p.nsplit, p.threads, p.smem);
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

inline int threads_for(int64_t slice) {
  const int64_t oct = (slice + 7) / 8;
  return static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(64, (oct + 31) / 32 * 32)));
}

// The split of a row and whether its slices live in shared memory (see divergences.cu's header):
// the fewest CTAs per row whose slices (bytes_per_entry bytes of cache per entry) fit a
// shared-memory budget that lets three CTAs share an SM, else two, else one; else no cache (the
// global re-read path, split 8 ways where clusters exist).
inline Plan make_plan(const void* fn, int device, int64_t V, int64_t bytes_per_entry, cudaStream_t stream,
                      const char* max_split_env) {
  const KernelInfo ki = kernel_info(fn, device, max_split_env);
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
      p.smem = static_cast<size_t>(p.slice) * static_cast<size_t>(bytes_per_entry);
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
// host side: dtype codes and row alignment
inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: return kF64;
  }
}

// Every row of x ([B, R, V], last dim contiguous) starts 16-byte aligned.
inline bool rows_aligned(const at::Tensor& x) {
  const int64_t e = x.element_size();
  return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && (x.size(0) <= 1 || (x.stride(0) * e) % 16 == 0) &&
         (x.size(1) <= 1 || (x.stride(1) * e) % 16 == 0);
}

inline double log_or_ninf(double w) { return w > 0.0 ? std::log(w) : -INFINITY; }

// ---------------------------------------------------------------------------------------------
// host side: the coefficients and the launch of the one-row-per-CTA-or-cluster kernels (kd_fwd,
// sparse_kd_fwd), whose Params carry cf64 / cf32 and a first row, row0

// The mixture r = w_p p + w_q q of jsd (w_p = beta) and the skew divergences (skew_forward_kl:
// w_p = skew; skew_reverse_kl: w_q = skew), and the logs of its weights (-inf for a weight 0);
// the other divergences do not read them.
inline void fill_divergence_weights(Coefs<double>& cf, int64_t divergence, double beta, double skew) {
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
}

// The float copy of the coefficients, for the kernels that accumulate in float.
inline Coefs<float> narrow(const Coefs<double>& c) {
  return Coefs<float>{static_cast<float>(c.inv_t),     static_cast<float>(c.cap),
                      static_cast<float>(c.soft_coef), static_cast<float>(c.grad_coef),
                      static_cast<float>(c.hw),        static_cast<float>(c.w_p),
                      static_cast<float>(c.w_q),       static_cast<float>(c.log_wp),
                      static_cast<float>(c.log_wq)};
}

// The coefficients of a row kernel: 1 / temperature, the softcap (0: none), the soft loss's
// factor and its gradient's, the hard loss's weight and the divergence's mixture weights.
inline Coefs<double> make_coefs(double temperature, double softcap, double soft_weight, double hard_weight,
                                bool scale_temperature, int64_t divergence, double beta, double skew) {
  const double scale = scale_temperature ? temperature * temperature : 1.0;
  Coefs<double> cf{};
  cf.inv_t = 1.0 / temperature;
  cf.cap = softcap;
  cf.soft_coef = soft_weight * scale;
  cf.grad_coef = soft_weight * scale / temperature;
  cf.hw = hard_weight;
  fill_divergence_weights(cf, divergence, beta, skew);
  return cf;
}

// The Params fields the row kernels share for the student's gradient buffer (its entries
// params.es bytes, as the student's), the labels and the loss ([B, R], float64 when wide).
template <class P>
void set_row_io(P& params, const std::optional<at::Tensor>& grad_student, const std::optional<at::Tensor>& labels,
                const at::Tensor& loss, bool wide) {
  if (grad_student.has_value()) {
    const at::Tensor& g = *grad_student;
    params.gs = static_cast<char*>(g.data_ptr());
    params.gs_sb = g.stride(0) * params.es;
    params.gs_sr = g.stride(1) * params.es;
    params.vgs = rows_aligned(g);
    params.has_gs = true;
  }
  if (labels.has_value()) {
    params.labels = labels->data_ptr<int64_t>();
    params.l_sb = labels->stride(0);
    params.l_sr = labels->stride(1);
    params.has_labels = true;
  }
  params.loss = static_cast<char*>(loss.data_ptr());
  params.loss_f64 = wide;
  params.o_sb = loss.stride(0) * loss.element_size();
  params.o_sr = loss.stride(1) * loss.element_size();
}

// Launches fn over rows [0, N) as planned: plan.nsplit CTAs per row (a thread-block cluster when
// more than one), in chunks of rows that keep gridDim.x below 2^31; the plan's split, slice and
// cache flag go into params, and params.row0 is set to each chunk's first row.
template <class P>
void launch_rows(void (*fn)(P), const Plan& plan, int64_t N, P& params, cudaStream_t stream) {
  params.nsplit = plan.nsplit;
  params.slice = plan.slice;
  params.cache = plan.cache;
  const int64_t max_rows = INT_MAX / plan.nsplit;  // gridDim.x < 2^31
  for (int64_t r0 = 0; r0 < N; r0 += max_rows) {
    params.row0 = r0;
    const unsigned grid = static_cast<unsigned>(std::min(max_rows, N - r0) * plan.nsplit);
    if (plan.nsplit > 1) {
      cudaLaunchConfig_t cfg;
      cudaLaunchAttribute attr[1];
      fill_cluster_config(cfg, attr, plan, grid, stream);
      C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, fn, params));
    } else {
      fn<<<grid, plan.threads, plan.smem, stream>>>(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}


}  // namespace cuda_common
}  // namespace fastkd
