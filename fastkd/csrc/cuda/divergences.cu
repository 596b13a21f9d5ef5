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
//
// The generic helpers (math, online log-sum-exp, divergence terms, octets, reductions, cp.async,
// launch planning) live in common.cuh, shared with the other families' CUDA kernels.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kd_checks.h"
#include "common.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

namespace fastkd {
namespace kd_cuda {
namespace {

using namespace cuda_common;

constexpr int kSlots = 6;     // values per reduction slot: 3 (max, sum-exp) pairs in pass 1

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

// CTAs of kMaxThreads per SM the register allocation must allow: three (80 registers) for the
// float32-math kernels of one dtype, the hot path; two (128) for the mixed-dtype ones; one for the
// float64-math ones (gradcheck and debugging), which need more registers than 128.
template <typename A, typename TS>
constexpr int kMinBlocks = !std::is_same<A, float>::value ? 1 : std::is_same<TS, Dyn>::value ? 2 : 3;

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
  // a label outside [0, V) that is not ignore_index, with the hard loss on: NaN loss and gradient
  // (without the hard loss a label is only the valid-row mask, as on every backend)
  bool bad = false;
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
    bad = P.hard && (label < 0 || label >= P.V);
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

void kd_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                 const at::Tensor& loss, const std::optional<at::Tensor>& grad_student,
                 const std::optional<at::Tensor>& grad_teacher, int64_t divergence, double temperature, double beta,
                 double skew, int64_t ignore_index, double soft_weight, double hard_weight, bool scale_temperature,
                 double softcap) {
  // With the hard loss on, the CPU kernel also rejects labels outside [0, V) that are not
  // ignore_index; here that would be a device-to-host sync, so the kernel gives such a row a NaN
  // loss and gradient.
  const checks::KdShape shape =
      checks::check_kd_args(student, teacher, labels, loss, grad_student, grad_teacher, divergence, temperature, beta,
                            skew, hard_weight, softcap, c10::DeviceType::CUDA);
  const int64_t R = shape.R, V = shape.V, N = shape.N;
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
  set_row_io(P, grad_student, labels, loss, wide);
  if (grad_teacher.has_value()) {
    const at::Tensor& g = *grad_teacher;
    P.gt = static_cast<char*>(g.data_ptr());
    P.gt_sb = g.stride(0) * P.et;
    P.gt_sr = g.stride(1) * P.et;
    P.vgt = rows_aligned(g);
    P.has_gt = true;
  }
  P.R = R;
  P.V = V;
  P.ignore_index = ignore_index;
  P.hard = hard_weight != 0.0;
  P.capped = softcap != 0.0;
  P.unit_t = temperature == 1.0;
  // forward_kl needs no sum before its student gradient (h = -p): D is summed in the gradient pass
  P.fused_d = divergence == kForwardKL && !P.has_gt;
  const Coefs<double> cf =
      make_coefs(temperature, softcap, soft_weight, hard_weight, scale_temperature, divergence, beta, skew);
  P.cf64 = cf;
  P.cf32 = narrow(cf);

  const KernelFn fn = wide ? pick_div<double>(divergence, P.ds, P.dt) : pick_div<float>(divergence, P.ds, P.dt);
  const Plan plan = make_plan(reinterpret_cast<const void*>(fn), device, V, P.es + P.et, stream,
                              "FASTKD_CUDA_KD_MAX_SPLIT");
  launch_rows(fn, plan, N, P, stream);
}

}  // namespace
}  // namespace kd_cuda
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("kd_fwd", &fastkd::kd_cuda::kd_fwd_cuda); }
