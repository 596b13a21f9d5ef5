// sparse_kd family, CUDA: fastkd::sparse_kd_fwd for CUDA tensors, distillation from a sparse top-k
// teacher. The math, tails and gradient g_j = q_j * gamma + [j = idx_i] e_i are those of
// fastkd/reference/sparse.py (its docstring is the contract); the passes follow the Triton kernel
// (fastkd/triton/sparse.py), so the two GPU backends round alike. This file only says how.
//
// Layout: the student row is read from HBM once. As in divergences.cu (whose header explains the
// sizes), a row of V entries is split into nsplit slices, one CTA of up to 256 threads per slice,
// the nsplit CTAs of a row forming one thread-block cluster (sm_90) that combines its statistics
// through distributed shared memory; each CTA copies its slice of the student into shared memory
// with cp.async (only the student: 2 bytes/entry in bf16, so V = 128256 takes 4 CTAs of 62.6 KB,
// three per SM). The launch planning is common.cuh's make_plan.
// Per CTA:
//   1  (when the dense part needs the student's full softmax: bucket tail or forward_kl with
//      renormalize, or hard labels) online max / sum-exp of a = z/T (and of z for the hard label
//      when T != 1) over the slice, reduced over the block and the cluster;
//   k  the k teacher entries, one per thread (strided for k > blockDim): their student logits are
//      gathered from global memory (a few sectors per row), then the normalizers over k (renormalize)
//      or the tail masses 1 - sum (bucket; floored at 2^-20, the student's taken against pass 1's max
//      and sum-exp), then D = sum ell and H = sum h over the buckets, each a
//      block reduction. Every CTA of a cluster does this redundantly, in the same order, so all
//      hold bitwise the same D, H, gamma: no cluster exchange;
//   2  (grad_student) the dense part C q_j gamma + hw (softmax(z)_j - [j = label]) over the slice,
//      from the shared-memory copy, streamed out; a __syncthreads; then the teacher entries inside
//      this CTA's slice are overwritten with their full value (C (h_i - q_i H) + the hard part). Indices are
//      distinct (the caller validates them): duplicates would race in that scatter.
// Row loss: rank 0 writes soft_coef * D + hw * (logsumexp(z) - z[label]). No atomics, a fixed
// reduction order: the same inputs give bitwise the same outputs.
//
// The gather reads the student after the gradient may have been written, so grad_student must not
// overlap student (as for the CPU kernel; the op schema says so). Unlike the CPU kernel, an index
// outside [0, V), or a hard label outside [0, V) that is not ignore_index, gives its row a NaN loss
// and gradient instead of an error: refusing it would need a device-to-host sync (Triton does the
// same). Ignored rows get loss 0 and gradient 0 and are never read.
// A NaN the row reads (fastkd/reference/sparse.py's NaN rule) makes the online maxima and sums NaN
// (lse_add), hence D and H; the tail floors are written x < floor ? floor : x so that they keep NaN,
// and the dense part known to be 0 (renormalize, not forward_kl) is filled with NaN when H is.
//
// Arithmetic is float32 for float32/float16/bfloat16 inputs (any mix) and float64 when student or
// values is float64 (the loss buffer is float64 exactly then), as in the CPU kernel. The divergence
// and the tail are runtime values: they only change the k-entry math, not the hot loops, so one
// kernel per student dtype (float32, float16, bfloat16) plus one float64 kernel cover every case.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../sparse_checks.h"
#include "common.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

namespace fastkd {
namespace sparse_cuda {
namespace {

using namespace cuda_common;

constexpr int kRenormalize = 0, kBucket = 1;  // fastkd.reference.sparse.TAILS
constexpr int kSlots = 4;                     // values per reduction: 2 (max, sum-exp) pairs at most
// The tail buckets' floor, fastkd.reference.sparse.TAIL_FLOOR (its docstring says why): a tail mass
// below 2^-20 reads as 2^-20 on either side.
constexpr double kTailFloor = 0x1p-20;

struct SParams {
  const char* s;  // row 0 of student / grad_student; strides in bytes
  char* gs;
  int64_t s_sb, s_sr, gs_sb, gs_sr;
  const int64_t* idx;  // [N, K] contiguous
  const char* vals;    // [N, K] contiguous, dtype dv (element size ev)
  const int64_t* labels;  // strides in elements
  int64_t l_sb, l_sr;
  char* loss;  // float32, or float64 when loss_f64; strides in bytes
  int64_t o_sb, o_sr;
  int64_t R, V, K, slice, row0, ignore_index;
  int nsplit;  // CTAs per row (the cluster size)
  int div, tail;
  int ds, es, dv, ev;  // DType and element size of student (and grad_student) / values
  bool loss_f64;
  bool vs, vgs;  // every row of student / grad_student starts 16-byte aligned
  bool cache;    // the CTA's slice of the student lives in shared memory after pass 1
  bool has_labels, hard, has_gs;
  bool dense;  // the soft gradient has a dense part (bucket, or forward_kl with renormalize)
  bool pass1;  // dense || hard: the row's statistics are needed
  bool sep1;   // hard && !(dense && T == 1): the hard label needs its own temperature-1 statistics
  Coefs<float> cf32;
  Coefs<double> cf64;
};

template <typename A>
__device__ __forceinline__ const Coefs<A>& coefs(const SParams& P) {
  if constexpr (std::is_same<A, float>::value) return P.cf32;
  else return P.cf64;
}

// Registers for three CTAs of kMaxThreads per SM (80) in the float32 kernels, the hot path; the
// float64 kernel (gradcheck, debugging) gets one.
template <typename A>
constexpr int kMinBlocks = std::is_same<A, float>::value ? 3 : 1;

// One element of a runtime dtype, as A.
template <typename A>
__device__ __forceinline__ A load_any(const char* p, int code) {
  switch (code) {
    case kF32: return Elem<float>::template to<A>(*reinterpret_cast<const unsigned*>(p));
    case kF16: return Elem<__half>::template to<A>(*reinterpret_cast<const unsigned short*>(p));
    case kBF16: return Elem<__nv_bfloat16>::template to<A>(*reinterpret_cast<const unsigned short*>(p));
    default: return Elem<double>::template to<A>(*reinterpret_cast<const unsigned long long*>(p));
  }
}

template <typename TS, typename A>
__device__ __forceinline__ A load_one(const char* p, int code) {
  if constexpr (std::is_same<TS, Dyn>::value) return load_any<A>(p, code);
  else return Elem<TS>::template to<A>(*reinterpret_cast<const typename Elem<TS>::Bits*>(p));
}

template <typename T, typename A>
__device__ __forceinline__ void store_bits(char* p, A x) {
  *reinterpret_cast<typename Elem<T>::Bits*>(p) = Elem<T>::from(x);
}

template <typename TS, typename A>
__device__ __forceinline__ void store_one(char* p, int code, A x) {
  if constexpr (std::is_same<TS, Dyn>::value) {
    switch (code) {
      case kF32: store_bits<float>(p, x); break;
      case kF16: store_bits<__half>(p, x); break;
      case kBF16: store_bits<__nv_bfloat16>(p, x); break;
      default: store_bits<double>(p, x); break;
    }
  } else {
    store_bits<TS>(p, x);
  }
}

// The divergence terms of common.cuh for a runtime divergence code, fed log-probabilities.
template <typename A>
__device__ __forceinline__ void terms_rt(int div, A lq, A lp, const Coefs<A>& c, A& q, A& p, A& ell, A& h) {
  A k;
  switch (div) {
    case kForwardKL: terms<kForwardKL, A>(lq, lp, A(0), A(0), c, q, p, ell, h, k); break;
    case kReverseKL: terms<kReverseKL, A>(lq, lp, A(0), A(0), c, q, p, ell, h, k); break;
    case kJSD: terms<kJSD, A>(lq, lp, A(0), A(0), c, q, p, ell, h, k); break;
    case kSkewForwardKL: terms<kSkewForwardKL, A>(lq, lp, A(0), A(0), c, q, p, ell, h, k); break;
    case kSkewReverseKL: terms<kSkewReverseKL, A>(lq, lp, A(0), A(0), c, q, p, ell, h, k); break;
    default: terms<kTVD, A>(lq, lp, A(0), A(0), c, q, p, ell, h, k); break;
  }
}

template <typename A>
__device__ __forceinline__ void write_loss(const SParams& P, int64_t bi, int64_t ri, A x) {
  char* dst = P.loss + bi * P.o_sb + ri * P.o_sr;
  if (P.loss_f64) *reinterpret_cast<double*>(dst) = static_cast<double>(x);
  else *reinterpret_cast<float*>(dst) = static_cast<float>(x);
}

// ---------------------------------------------------------------------------------------------
template <typename A, typename TS>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks<A>) sparse_kd_fwd_kernel(const SParams P) {
  extern __shared__ __align__(16) unsigned char cache[];
  __shared__ A red[kMaxWarps * kSlots];
  __shared__ A bc[kSlots];
  __shared__ A slot[kSlots];

  const Coefs<A>& c = coefs<A>(P);
  const int rank = static_cast<int>(blockIdx.x % static_cast<unsigned>(P.nsplit));
  const int64_t row = P.row0 + blockIdx.x / static_cast<unsigned>(P.nsplit);
  const int64_t bi = row / P.R, ri = row % P.R;
  const int64_t v0 = rank * P.slice;
  const int64_t n = v0 >= P.V ? 0 : (P.V - v0 < P.slice ? P.V - v0 : P.slice);  // entries of this CTA
  const int es = esize<TS>(P.es);
  const int tid = threadIdx.x, nt = blockDim.x;
  const char* s_row = P.s + bi * P.s_sb + ri * P.s_sr;
  const char* s_sl = s_row + v0 * es;
  char* g_row = P.has_gs ? P.gs + bi * P.gs_sb + ri * P.gs_sr : nullptr;
  char* g_sl = P.has_gs ? g_row + v0 * es : nullptr;

  int64_t label = -1;
  if (P.has_labels) {
    label = P.labels[bi * P.l_sb + ri * P.l_sr];
    if (label == P.ignore_index) {  // loss 0, gradient 0; nothing is read
      if (P.has_gs) {
        Octet<TS, A> z;
        z.zero();  // +0.0 is all-zero bits in every dtype
        for (int64_t o = int64_t(tid) * 8; o < n; o += int64_t(nt) * 8)
          z.store(P.ds, g_sl + o * es, static_cast<int>(n - o < 8 ? n - o : 8), P.vgs);
      }
      if (rank == 0 && tid == 0) write_loss<A>(P, bi, ri, A(0));
      return;  // the whole cluster returns here (same row), before any cluster barrier
    }
  }
  // a hard label outside [0, V): NaN loss and gradient, never an out-of-bounds read
  const bool bad_label = P.hard && (label < 0 || label >= P.V);

  // Entry tid of the teacher (k <= blockDim, the usual case: all of them) is fetched once, before
  // pass 1 hides the latency of its dependent loads, and held in registers.
  int64_t j_own = 0;
  A z_own = A(0), v_own = A(0);
  bool ok_own = true;
  if (tid < P.K) {
    const int64_t j = P.idx[row * P.K + tid];
    ok_own = j >= 0 && j < P.V;
    j_own = j;
    z_own = ok_own ? load_one<TS, A>(s_row + j * es, P.ds) : ninf<A>();
    v_own = load_any<A>(P.vals + (row * P.K + tid) * P.ev, P.dv);
  }

  // ---- pass 1: online max / sum-exp of z/T (dense) and of z (hard label, T != 1) --------------
  char* cache_s = reinterpret_cast<char*>(cache);
  const int64_t n_oct = (n + 7) >> 3;
  const int64_t m = tid < n_oct ? (n_oct - 1 - tid) / nt + 1 : 0;  // octets of this thread
  A st[4] = {ninf<A>(), A(0), ninf<A>(), A(0)};
  if (P.pass1) {
    auto stats = [&](const Octet<TS, A>& x, int cnt) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (i < cnt) {
          const A z = x.get(i);
          if (P.dense) lse_add(st[0], st[1], z * c.inv_t);
          if (P.sep1) lse_add(st[2], st[3], z);
        }
      }
    };
    if (P.cache) {
      // each thread copies exactly the octets it later reads (in both passes), so waiting for
      // its own copies is enough: no barrier
      constexpr int kGroups = 4;  // copies complete (and are consumed) in up to 4 groups
      const int64_t per_group = (m + kGroups - 1) / kGroups;
      for (int g = 0; g < kGroups; ++g) {
        for (int64_t i = g * per_group; i < m && i < (g + 1) * per_group; ++i) {
          const int64_t off = (tid + i * nt) * 8;
          copy_octet(cache_s + off * es, s_sl + off * es, static_cast<int>(n - off < 8 ? n - off : 8), P.vs, es);
        }
        cp_async_commit();
      }
      for (int g = 0; g < kGroups; ++g) {
        cp_async_wait(kGroups - 1 - g);
        for (int64_t i = g * per_group; i < m && i < (g + 1) * per_group; ++i) {
          const int64_t off = (tid + i * nt) * 8;
          const int cnt = static_cast<int>(n - off < 8 ? n - off : 8);
          Octet<TS, A> x;
          x.load(P.ds, cache_s + off * es, cnt, true);
          stats(x, cnt);
        }
      }
    } else {  // too large for shared memory: pass 2 re-reads global memory (L2 if still there)
      for (int64_t i = 0; i < m; ++i) {
        const int64_t off = (tid + i * nt) * 8;
        const int cnt = static_cast<int>(n - off < 8 ? n - off : 8);
        Octet<TS, A> x;
        x.load(P.ds, s_sl + off * es, cnt, P.vs);
        stats(x, cnt);
      }
    }
    allreduce<A, 4>(st, LseOp{}, red, bc, slot, P.nsplit);
  }
  // log-normalizers, shifted by the row maximum: log q = (z/T - sha) - lsa
  const A sha = st[0] == ninf<A>() ? A(0) : st[0], lsa = d_log(st[1]);
  const A sh1 = P.sep1 ? (st[2] == ninf<A>() ? A(0) : st[2]) : sha;
  const A ls1 = P.sep1 ? d_log(st[3]) : lsa;

  // ---- the k teacher entries --------------------------------------------------------------------
  const bool renorm = P.tail == kRenormalize;
  const int64_t* ix = P.idx + row * P.K;
  const char* v_row = P.vals + row * P.K * P.ev;
  auto fetch = [&](int64_t i, int64_t& j, A& z, A& v) {  // false: the index is outside [0, V)
    j = ix[i];
    const bool ok = j >= 0 && j < P.V;
    z = ok ? load_one<TS, A>(s_row + j * es, P.ds) : ninf<A>();
    v = load_any<A>(v_row + i * P.ev, P.dv);
    return ok;
  };
  auto gather = [&](int64_t i, int64_t& j, A& z, A& v) {
    if (i == tid) {
      j = j_own;
      z = z_own;
      v = v_own;
      return ok_own;
    }
    return fetch(i, j, z, v);
  };
  // renormalize: log-normalizers of v/T and (not forward_kl) of z/T over the k entries;
  // bucket: the tail buckets' log-masses and the student's tail mass
  A shb = A(0), lsb = A(0), shk = A(0), lsk = A(0), lp_t = A(0), lq_t = A(0), q_t = A(0), q_f = A(1);
  int badk = 0;
  if (renorm) {
    A kv[4] = {ninf<A>(), A(0), ninf<A>(), A(0)};
    for (int64_t i = tid; i < P.K; i += nt) {
      int64_t j;
      A z, v;
      badk |= !gather(i, j, z, v);
      lse_add(kv[0], kv[1], v * c.inv_t);
      if (!P.dense) lse_add(kv[2], kv[3], z * c.inv_t);
    }
    allreduce<A, 4>(kv, LseOp{}, red, bc, slot, 1);
    shb = kv[0] == ninf<A>() ? A(0) : kv[0];
    lsb = d_log(kv[1]);
    shk = kv[2] == ninf<A>() ? A(0) : kv[2];
    lsk = d_log(kv[3]);
  } else {
    // the student's mass at the k entries against the row's max and sum-exp (st), so that its tail
    // (st[1] - sum) / st[1] holds no rounded log-sum-exp; both tails floored at kTailFloor
    A kv[2] = {A(0), A(0)};
    for (int64_t i = tid; i < P.K; i += nt) {
      int64_t j;
      A z, v;
      badk |= !gather(i, j, z, v);
      kv[0] += d_exp(v);
      kv[1] += d_exp(z * c.inv_t - sha);
    }
    allreduce<A, 2>(kv, SumOp{}, red, bc, slot, 1);
    // (x < floor ? floor : x: a NaN mass stays NaN, as the reference's clamps)
    const A floor_t = static_cast<A>(kTailFloor);
    const A p_t = A(1) - kv[0] < floor_t ? floor_t : A(1) - kv[0];
    q_t = (st[1] - kv[1]) / st[1];
    q_t = q_t < A(0) ? A(0) : q_t;
    q_f = q_t < floor_t ? floor_t : q_t;
    lp_t = d_log(p_t);
    lq_t = d_log(q_f);
  }
  const bool bad = __syncthreads_or(badk) != 0;

  // the bucket log-probabilities of entry (z, v)
  auto bucket_lp = [&](A z, A v, A& lq, A& lp) {
    const A a = z * c.inv_t;
    if (renorm) {
      lp = (v * c.inv_t - shb) - lsb;
      lq = P.dense ? (a - sha) - lsa : (a - shk) - lsk;
    } else {
      lp = v;
      lq = (a - sha) - lsa;
    }
  };

  A D, H, ratio = A(0);
  {
    A dh[2] = {A(0), A(0)};
    for (int64_t i = tid; i < P.K; i += nt) {
      int64_t j;
      A z, v, lq, lp, q, p, ell, h;
      gather(i, j, z, v);
      bucket_lp(z, v, lq, lp);
      terms_rt<A>(P.div, lq, lp, c, q, p, ell, h);
      dh[0] += ell;
      dh[1] += h;
    }
    allreduce<A, 2>(dh, SumOp{}, red, bc, slot, 1);
    D = dh[0];
    H = dh[1];
    if (!renorm) {  // the contract's r = dD/dq~ of the floored tail, which moves with q_t
      A q, p, ell, h;
      terms_rt<A>(P.div, lq_t, lp_t, c, q, p, ell, h);
      D += ell;
      ratio = h / q_f;
      H += ratio * q_t;
    }
    if (bad) D = H = static_cast<A>(NAN);
  }

  if (rank == 0 && tid == 0) {
    A loss = c.soft_coef * D;
    if (P.hard && !bad_label) {
      const A z_lab = load_one<TS, A>(s_row + label * es, P.ds);
      loss += c.hw * ((sh1 - z_lab) + ls1);
    }
    write_loss<A>(P, bi, ri, bad_label ? static_cast<A>(NAN) : loss);
  }

  // ---- pass 2: the dense gradient over the slice, then the teacher entries ----------------------
  if (P.has_gs) {
    const A c_gamma = c.grad_coef * (renorm ? (P.div == kForwardKL ? -H : A(0)) : ratio - H);
    // where the soft dense part is 0 (not P.dense): 0, or NaN for a NaN row (H is NaN then)
    const A fill = H != H ? H : A(0);
    // cg q_j + hw (softmax(z)_j - [j = label]) at logit z, column j (cg: C gamma, or 0)
    auto dense_g = [&](A z, int64_t j, A cg) {
      A g = fill, q = A(0);
      if (P.dense) {
        q = d_exp((z * c.inv_t - sha) - lsa);
        g = cg * q;
      }
      if (P.hard) {
        const A q1 = P.sep1 ? d_exp((z - sh1) - ls1) : q;
        g += c.hw * (q1 - (j == label ? A(1) : A(0)));
      }
      return g;
    };
    const char* src = P.cache ? cache_s : s_sl;
    const bool vsrc = P.cache || P.vs;
    for (int64_t i = 0; i < m; ++i) {  // this thread's octets, as in pass 1
      const int64_t off = (tid + i * nt) * 8;
      const int cnt = static_cast<int>(n - off < 8 ? n - off : 8);
      Octet<TS, A> x, g;
      g.zero();
      if (P.pass1) x.load(P.ds, src + off * es, cnt, vsrc);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (e < cnt) {
          const A ge = P.pass1 ? dense_g(x.get(e), v0 + off + e, c_gamma) : fill;
          g.set(e, bad_label ? static_cast<A>(NAN) : ge);
        }
      }
      g.store(P.ds, g_sl + off * es, cnt, P.vgs);
    }
    __syncthreads();  // the scatter overwrites entries other threads of this CTA just stored
    for (int64_t i = tid; i < P.K; i += nt) {
      int64_t j;
      A z, v;
      if (!gather(i, j, z, v) || j < v0 || j >= v0 + n) continue;
      A lq, lp, q, p, ell, h;
      bucket_lp(z, v, lq, lp);
      terms_rt<A>(P.div, lq, lp, c, q, p, ell, h);
      // q_i gamma + e_i of the contract is h_i - q_i H for every tail (q: the bucket's student
      // probability, renormalized over k for renormalize with divergences other than forward_kl),
      // computed so: gamma and e_i each hold r, which reaches 1 / kTailFloor
      const A g = dense_g(z, j, A(0)) + c.grad_coef * (h - q * H);
      store_one<TS, A>(g_row + j * es, P.ds, bad_label ? static_cast<A>(NAN) : g);
    }
  }
  cluster_barrier(P.nsplit);  // no CTA leaves while a peer may still read its slot
}

// ---------------------------------------------------------------------------------------------
// host side
using KernelFn = void (*)(SParams);

KernelFn pick_kernel(bool wide, int ds) {
  if (wide) return sparse_kd_fwd_kernel<double, Dyn>;
  switch (ds) {
    case kF32: return sparse_kd_fwd_kernel<float, float>;
    case kF16: return sparse_kd_fwd_kernel<float, __half>;
    default: return sparse_kd_fwd_kernel<float, __nv_bfloat16>;
  }
}

void sparse_kd_fwd_cuda(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& values,
                        const std::optional<at::Tensor>& labels, const at::Tensor& loss,
                        const std::optional<at::Tensor>& grad_student, int64_t divergence, double temperature,
                        double beta, double skew, int64_t tail, int64_t ignore_index, double soft_weight,
                        double hard_weight, bool scale_temperature) {
  // The checks shared with the CPU kernel (../sparse_checks.h). Index and label ranges are not checked
  // here (that would be a device-to-host sync): the kernel gives such rows a NaN loss and gradient.
  const checks::SparseShape sh =
      checks::check_sparse_kd_args(student, indices, values, labels, loss, grad_student, divergence, temperature,
                                   beta, skew, tail, ignore_index, hard_weight, c10::DeviceType::CUDA);
  const int64_t R = sh.R, V = sh.V, K = sh.K, N = sh.N;
  const bool wide = sh.wide;
  const at::ScalarType ts = student.scalar_type(), tv = values.scalar_type();
  if (N == 0) return;

  const c10::cuda::CUDAGuard guard(student.device());
  const int device = student.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();

  SParams P{};
  P.s = static_cast<const char*>(student.data_ptr());
  P.es = static_cast<int>(student.element_size());
  P.s_sb = student.stride(0) * P.es;
  P.s_sr = student.stride(1) * P.es;
  P.ds = dtype_code(ts);
  P.vs = rows_aligned(student);
  P.idx = indices.data_ptr<int64_t>();
  P.vals = static_cast<const char*>(values.data_ptr());
  P.dv = dtype_code(tv);
  P.ev = static_cast<int>(values.element_size());
  set_row_io(P, grad_student, labels, loss, wide);
  P.R = R;
  P.V = V;
  P.K = K;
  P.ignore_index = ignore_index;
  P.div = static_cast<int>(divergence);
  P.tail = static_cast<int>(tail);
  P.hard = hard_weight != 0.0;
  P.dense = tail == kBucket || divergence == kForwardKL;
  P.pass1 = P.dense || P.hard;
  P.sep1 = P.hard && !(P.dense && temperature == 1.0);

  const Coefs<double> cf =
      make_coefs(temperature, /*softcap=*/0.0, soft_weight, hard_weight, scale_temperature, divergence, beta, skew);
  P.cf64 = cf;
  P.cf32 = narrow(cf);

  const KernelFn fn = pick_kernel(wide, P.ds);
  Plan plan;
  if (P.pass1) {
    // FASTKD_CUDA_SPARSE_MAX_SPLIT=n caps the cluster size (tests: n = 1 runs sm_80's layouts)
    plan = make_plan(reinterpret_cast<const void*>(fn), device, V, P.es, stream, "FASTKD_CUDA_SPARSE_MAX_SPLIT");
  } else {  // nothing but the k entries is read: one CTA per row writes the dense zeros
    plan.slice = (V + 7) / 8 * 8;
    plan.threads = threads_for(plan.slice);
  }
  launch_rows(fn, plan, N, P, stream);
}

}  // namespace
}  // namespace sparse_cuda
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("sparse_kd_fwd", &fastkd::sparse_cuda::sparse_kd_fwd_cuda); }
