// attention_map family, CUDA: fastkd::attention_map_fwd for CUDA tensors. The math, symbols and
// edge cases are those of fastkd/reference/attention.py (its docstring is the contract); the
// argument checks, neutral values and per-entry formulas follow the CPU kernel
// (csrc/cpu/attention.cpp) and the Triton kernel (fastkd/triton/attention.py). This file only
// says how. (attention_transfer and attention_relation have no CUDA kernel yet.)
//
// Layout: the B*H*L query rows of L entries are independent; a group of threads owns one row, and
// each thread a fixed set of NO octets (8 entries: one 16-byte load of fp16/bf16) per tile of
// group_size * 8 * NO entries, octet k*group_size + lane, so a group reads contiguous memory.
//   * L <= 1024 (512 for float64 math or mixed dtypes): a group of 8, 16 or 32 lanes of a warp
//     (256-thread CTAs hold 32, 16 or 8 rows), NO = 1, 2 or 4 by L; reductions are warp shuffles.
//   * longer rows: one CTA of 64..512 threads (256 for float64 math) per row, the smallest whose
//     tile covers the row (NO = 4, or 2 for float64 math or mixed dtypes); reductions through
//     shared memory.
// When a row fits one tile (up to 16384 entries for one fixed dtype, 8192 for mixed dtypes, 4096
// for float64 math) it is loaded once into registers (raw bits for one fixed dtype) and both
// passes read it there: HBM sees one read of each map and one write of the gradient. Longer rows
// are walked tile by tile, and the second pass re-reads them from global memory (L2). Pass 1 (kl
// with a scores side only): per-thread online (max, sum-exp) of the student and/or teacher
// scores, or the teacher mass P, then a group all-reduce; pass 2: loss terms and the gradient,
// then a group sum. No atomics; reductions in a fixed order, so results are bitwise reproducible
// for a given shape.
//
// Masked keys and out-of-range entries take neutral values (as in the CPU kernel): kl scores -inf,
// kl student probabilities 1, kl teacher probabilities 0, mse 0; their gradient is stored as
// exactly 0. Masked query rows are never read: loss 0, gradient 0. Every entry is read by the
// thread that later writes its gradient, before writing it, so grad_student may alias student.
// Arithmetic is float32 for float32/float16/bfloat16 inputs (any mix) and float64 when an input
// is float64; the loss is float32 or float64 accordingly (as the CPU kernel checks).
// FASTKD_CUDA_MAP_CTA_THREADS=n (a multiple of 32, <= 512) forces the CTA-per-row layout with n
// threads for every L: tests use it to reach multi-tile rows and the CTA path on small shapes.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.cuh"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

namespace fastkd {
namespace attention_cuda {
namespace {

using cuda_common::d_exp;
using cuda_common::d_log;
using cuda_common::Dyn;
using cuda_common::esize;
using cuda_common::lse_add;
using cuda_common::lse_merge;
using cuda_common::ninf;
using cuda_common::Octet;
using cuda_common::SumOp;
using cuda_common::kF32;
using cuda_common::kF16;
using cuda_common::kBF16;
using cuda_common::kF64;

constexpr int kKL = 0, kMSE = 1;  // fastkd.reference.attention.MAP_KINDS
constexpr double kScoreFloor = -100.0;  // SCORE_FLOOR: mse scores <= -1e2 compare as 0
constexpr int kGroupCta = 256;    // threads per CTA in the warp / sub-warp layouts
constexpr int kMaxCta = 512;      // threads per CTA at most in the CTA-per-row layout
constexpr int kMaxCtaWide = 256;  // the same for float64 math (more registers per thread)
constexpr int kMaxCtaWarps = kMaxCta / 32;

template <typename A, int GS>
constexpr int kBlockBound = GS != 0 ? kGroupCta : std::is_same<A, double>::value ? kMaxCtaWide : kMaxCta;

struct MapParams {
  const char* s;  // element [0, 0, 0, 0]; strides in bytes
  const char* t;
  char* g;
  const unsigned char* mask;  // [B, L] bool, contiguous; null without a mask
  void* loss;                 // [B, H, L] contiguous, float32 or float64 (the math's type)
  int64_t s_sb, s_sh, s_sl, t_sb, t_sh, t_sl, g_sb, g_sh, g_sl;
  int64_t H, L, rows;
  int kind;
  bool s_scores, t_scores, has_g;
  int ds, dt, dg;  // dtype codes of student / teacher / grad_student
  int es, et, eg;  // their element sizes
  bool vs, vt, vg;  // every row starts 16-byte aligned: full octets take vector loads / stores
  bool vm;          // mask octets start 8-byte aligned
};

// Lanes of one sub-warp group of GS lanes (GS = 8, 16, 32) for its shuffles.
template <int GS>
__device__ __forceinline__ unsigned group_lanes() {
  if constexpr (GS == 32) return 0xffffffffu;
  else return ((1u << GS) - 1u) << ((threadIdx.x & 31u) & ~unsigned(GS - 1));
}

// Butterfly over the GS lanes of a group: every lane ends with the same bits (the combines are
// commutative, so both partners of an exchange compute the same value).
template <int GS, typename A, int K, class Op>
__device__ __forceinline__ void group_allreduce(A (&v)[K], Op op) {
  const unsigned lanes = group_lanes<GS>();
#pragma unroll
  for (int off = GS / 2; off > 0; off >>= 1) {
    A o[K];
#pragma unroll
    for (int i = 0; i < K; ++i) o[i] = __shfl_xor_sync(lanes, v[i], off);
    op(v, o);
  }
}

// Pass 1 state: (max, sum-exp) of the student scores, of the teacher scores, and the teacher mass.
struct Pass1Op {
  template <typename A, int K>
  __device__ __forceinline__ void operator()(A (&a)[K], const A (&b)[K]) const {
    lse_merge(a[0], a[1], b[0], b[1]);
    lse_merge(a[2], a[3], b[2], b[3]);
    a[4] += b[4];
  }
};

// One reduction over the row's group. GS = 0: the whole CTA (every thread calls it).
template <int GS, typename A, int K, class Op>
__device__ __forceinline__ void row_allreduce(A (&v)[K], Op op, A* red, A* bc) {
  if constexpr (GS == 0) cuda_common::allreduce<A, K>(v, op, red, bc, nullptr, 1);
  else group_allreduce<GS, A, K>(v, op);
}

// Valid-key bits of the octet at key j0 with cnt (<= 8) entries in range.
__device__ __forceinline__ unsigned key_bits(const MapParams& P, const unsigned char* mrow, int64_t j0, int cnt) {
  if (cnt <= 0) return 0u;
  if (mrow == nullptr) return (1u << cnt) - 1u;
  unsigned bits = 0;
  if (P.vm && cnt == 8) {
    const uint2 w = *reinterpret_cast<const uint2*>(mrow + j0);
#pragma unroll
    for (int e = 0; e < 8; ++e) bits |= ((((e < 4 ? w.x : w.y) >> (8 * (e & 3))) & 0xffu) != 0u ? 1u : 0u) << e;
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (e < cnt && mrow[j0 + e] != 0) bits |= 1u << e;
  }
  return bits;
}

// A: the math's type; TS, TT: student / teacher element types (Dyn: runtime codes; the gradient
// has the student's type, or a runtime code with Dyn); GS: lanes per row (0: the whole CTA);
// NO: octets per thread and tile.
template <typename A, typename TS, typename TT, int GS, int NO>
__global__ void __launch_bounds__(kBlockBound<A, GS>) attention_map_kernel(const MapParams P) {
  constexpr bool kCta = GS == 0;
  const int gsize = kCta ? static_cast<int>(blockDim.x) : GS;
  const int lane = kCta ? static_cast<int>(threadIdx.x) : static_cast<int>(threadIdx.x & (GS - 1));
  const int64_t r = kCta ? static_cast<int64_t>(blockIdx.x)
                         : static_cast<int64_t>(blockIdx.x) * (kGroupCta / (GS == 0 ? 1 : GS)) + threadIdx.x / (GS == 0 ? 1 : GS);
  if (r >= P.rows) return;  // a whole group (CTA layout: never)
  const int64_t L = P.L;
  const int64_t i = r % L, bh = r / L, h = bh % P.H, b = bh / P.H;
  const int es = esize<TS>(P.es), et = esize<TT>(P.et), eg = esize<TS>(P.eg);
  const unsigned char* mrow = P.mask ? P.mask + b * L : nullptr;
  char* grow = P.has_g ? P.g + b * P.g_sb + h * P.g_sh + i * P.g_sl : nullptr;
  A* loss = static_cast<A*>(P.loss);

  __shared__ A red[kCta ? kMaxCtaWarps * 5 : 1];
  __shared__ A bc[kCta ? 5 : 1];

  if (mrow != nullptr && mrow[i] == 0) {  // a padded query row: 0, never read
    if (grow != nullptr) {
      Octet<TS, A> z;
      z.zero();
      for (int64_t j0 = static_cast<int64_t>(lane) * 8; j0 < L; j0 += static_cast<int64_t>(gsize) * 8)
        z.store(P.dg, grow + j0 * eg, static_cast<int>(L - j0 < 8 ? L - j0 : 8), P.vg);
    }
    if (lane == 0) loss[r] = A(0);
    return;  // uniform over the group (the whole CTA in the CTA layout)
  }

  const char* srow = P.s + b * P.s_sb + h * P.s_sh + i * P.s_sl;
  const char* trow = P.t + b * P.t_sb + h * P.t_sh + i * P.t_sl;
  const bool kl = P.kind == kKL;
  // neutral values of masked keys and out-of-range entries (see the header)
  const A fill_s = kl ? (P.s_scores ? ninf<A>() : A(1)) : A(0);
  const A fill_t = kl ? (P.t_scores ? ninf<A>() : A(0)) : A(0);

  const int64_t tile_n = static_cast<int64_t>(gsize) * 8 * NO;
  const int64_t ntiles = (L + tile_n - 1) / tile_n;
  const bool resident = ntiles == 1;
  Octet<TS, A> xs[NO];
  Octet<TT, A> xt[NO];
  unsigned km[NO];
  auto load = [&](int64_t tile) {
#pragma unroll
    for (int k = 0; k < NO; ++k) {
      const int64_t j0 = tile * tile_n + (static_cast<int64_t>(k) * gsize + lane) * 8;
      const int cnt = static_cast<int>(L - j0 >= 8 ? 8 : (L - j0 > 0 ? L - j0 : 0));
      km[k] = key_bits(P, mrow, j0, cnt);
      if (km[k] != 0u) {  // octets of padded keys are not read
        xs[k].load(P.ds, srow + j0 * es, cnt, P.vs);
        xt[k].load(P.dt, trow + j0 * et, cnt, P.vt);
      } else {
        xs[k].zero();
        xt[k].zero();
      }
    }
  };
  if (resident) load(0);

  // pass 1 (kl with a scores side): row statistics
  A sh_s = 0, ls_s = 0, sh_t = 0, ls_t = 0, mass = 1;
  if (kl && (P.s_scores || P.t_scores)) {
    A st[5] = {ninf<A>(), A(0), ninf<A>(), A(0), A(0)};
    for (int64_t tile = 0; tile < ntiles; ++tile) {
      if (!resident) load(tile);
#pragma unroll
      for (int k = 0; k < NO; ++k) {
        if (km[k] == 0u) continue;  // neutral entries add nothing
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const bool ok = (km[k] >> e) & 1u;
          if (P.s_scores) lse_add(st[0], st[1], ok ? xs[k].get(e) : fill_s);
          const A tv = ok ? xt[k].get(e) : fill_t;
          if (P.t_scores) lse_add(st[2], st[3], tv);
          else st[4] += tv;
        }
      }
    }
    row_allreduce<GS, A, 5>(st, Pass1Op{}, red, bc);
    // shift = the row max (0 when every entry is -inf), log of the shifted sum: log q = (s - shift) - ls
    sh_s = st[0] == ninf<A>() ? A(0) : st[0];
    ls_s = d_log(st[0] == ninf<A>() ? A(0) : st[1]);
    sh_t = st[2] == ninf<A>() ? A(0) : st[2];
    ls_t = d_log(st[2] == ninf<A>() ? A(0) : st[3]);
    if (!P.t_scores) mass = st[4];
  }

  // pass 2: loss terms and the gradient
  const A floor_ = static_cast<A>(kScoreFloor);
  A acc[1] = {A(0)};
  for (int64_t tile = 0; tile < ntiles; ++tile) {
    if (!resident) load(tile);
#pragma unroll
    for (int k = 0; k < NO; ++k) {
      const int64_t j0 = tile * tile_n + (static_cast<int64_t>(k) * gsize + lane) * 8;
      if (j0 >= L) continue;
      const int cnt = static_cast<int>(L - j0 < 8 ? L - j0 : 8);
      Octet<TS, A> go;
      go.zero();
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const bool ok = (km[k] >> e) & 1u;
        const A sv = ok ? xs[k].get(e) : fill_s;
        const A tv = ok ? xt[k].get(e) : fill_t;
        A ell, g;
        if (kl) {
          A p, lp, lq;
          if (P.t_scores) {
            lp = (tv - sh_t) - ls_t;
            p = d_exp(lp);
          } else {
            p = tv;
            lp = d_log(tv > A(0) ? tv : A(1));
          }
          if (P.s_scores) {
            lq = (sv - sh_s) - ls_s;
            g = d_exp(lq) * mass - p;
          } else {
            lq = d_log(sv);
            g = p > A(0) ? -p / sv : A(0);
          }
          ell = p > A(0) ? p * (lp - lq) : A(0);
        } else {
          bool keep = true;
          A s2 = sv, t2 = tv;
          if (P.s_scores) {
            keep = sv > floor_;
            s2 = keep ? sv : A(0);
          }
          if (P.t_scores) t2 = tv > floor_ ? tv : A(0);
          const A d = s2 - t2;
          ell = d * d;
          g = keep ? A(2) * d : A(0);
        }
        acc[0] += ok ? ell : A(0);
        go.set(e, ok ? g : A(0));
      }
      if (grow != nullptr) go.store(P.dg, grow + j0 * eg, cnt, P.vg);
    }
  }
  row_allreduce<GS, A, 1>(acc, SumOp{}, red, bc);
  if (lane == 0) loss[r] = acc[0];
}

// ---------------------------------------------------------------------------------------------
// host side
using KernelFn = void (*)(MapParams);

struct Layout {
  int gs;       // lanes per row; 0: one CTA per row
  int no;       // octets per thread and tile
  int threads;  // CTA size
};

template <typename A, typename TS, typename TT>
KernelFn pick_layout(const Layout& l) {
  // NO = 4 only where an octet of each map is 8 registers or fewer (one fixed dtype of <= 4
  // bytes, raw bits); float64 math and mixed dtypes (converted at load) hold 2 octets per thread
  constexpr bool kWide = std::is_same<A, double>::value || std::is_same<TS, Dyn>::value;
  switch (l.gs) {
    case 8: return attention_map_kernel<A, TS, TT, 8, 1>;
    case 16: return attention_map_kernel<A, TS, TT, 16, 1>;
    case 32:
      if (l.no == 1) return attention_map_kernel<A, TS, TT, 32, 1>;
      if (kWide || l.no == 2) return attention_map_kernel<A, TS, TT, 32, 2>;
      return attention_map_kernel<A, TS, TT, 32, kWide ? 2 : 4>;
    default: return attention_map_kernel<A, TS, TT, 0, kWide ? 2 : 4>;
  }
}

// wide: float64 math or mixed dtypes (2 octets per thread, see pick_layout); the CTA layout's
// size is capped by its kernel's launch bounds (cta_limit).
Layout choose_layout(int64_t L, bool wide, int cta_limit) {
  const int no_max = wide ? 2 : 4;
  if (const char* env = std::getenv("FASTKD_CUDA_MAP_CTA_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return {0, no_max, std::min(cta_limit, std::max(32, n / 32 * 32))};
  }
  if (L <= 64) return {8, 1, kGroupCta};
  if (L <= 128) return {16, 1, kGroupCta};
  if (L <= 256) return {32, 1, kGroupCta};
  if (L <= 512) return {32, 2, kGroupCta};
  if (L <= 1024 && !wide) return {32, 4, kGroupCta};
  int threads = 64;
  while (threads < cta_limit && static_cast<int64_t>(threads) * 8 * no_max < L) threads *= 2;
  return {0, no_max, threads};
}

// Every row of x ([B, H, L, L], last dim contiguous) starts 16-byte aligned.
bool map_rows_aligned(const at::Tensor& x) {
  const int64_t e = x.element_size();
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d)
    if (x.size(d) > 1 && (x.stride(d) * e) % 16 != 0) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------
// op entry point: the CPU kernel's checks (csrc/cpu/attention.cpp), for CUDA tensors on one device
bool is_float(const at::Tensor& t) {
  auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

void check_input(const char* op, const char* name, const at::Tensor& x, int64_t dim, const at::Device& dev) {
  TORCH_CHECK_VALUE(x.dim() == dim, "fastkd::", op, ": ", name, " must be ", dim, "-D, got shape ", x.sizes());
  TORCH_CHECK_TYPE(is_float(x), "fastkd::", op, ": ", name, " must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cuda() && x.device() == dev, "fastkd::", op, ": ", name,
                    " must be a CUDA tensor on ", dev, ", got ", x.device());
  TORCH_CHECK_VALUE(x.size(-1) <= 1 || x.stride(-1) == 1, "fastkd::", op, ": ", name,
                    " must have a contiguous last dim, got strides ", x.strides());
}

void attention_map_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                            const c10::optional<at::Tensor>& mask, const at::Tensor& loss,
                            const c10::optional<at::Tensor>& grad_student, int64_t kind, bool student_scores,
                            bool teacher_scores) {
  const char* op = "attention_map_fwd";
  const at::Device dev = student.device();
  check_input(op, "student", student, 4, dev);
  check_input(op, "teacher", teacher, 4, dev);
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes() && student.size(2) == student.size(3), "fastkd::", op,
                    ": student ", student.sizes(), " and teacher ", teacher.sizes(), " must be the same [B, H, L, L]");
  TORCH_CHECK_VALUE(kind == kKL || kind == kMSE, "fastkd::", op, ": unknown attention map kind ", kind);
  const int64_t B = student.size(0), H = student.size(1), L = student.size(2);
  const bool wide = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble;
  const at::ScalarType acc = wide ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(loss.sizes() == at::IntArrayRef({B, H, L}), "fastkd::", op, ": loss must have shape ",
                    at::IntArrayRef({B, H, L}), ", got ", loss.sizes());
  TORCH_CHECK_VALUE(loss.scalar_type() == acc && loss.is_contiguous() && loss.device() == dev, "fastkd::", op,
                    ": loss must be a contiguous CUDA ", acc, " tensor on ", dev);
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK_VALUE(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B && m.size(1) == L &&
                          m.is_contiguous() && m.device() == dev,
                      "fastkd::", op, ": mask must be a contiguous bool [B, L] = [", B, ", ", L, "] CUDA tensor on ",
                      dev);
  }
  if (grad_student.has_value()) {
    check_input(op, "grad_student", *grad_student, 4, dev);
    TORCH_CHECK_VALUE(grad_student->sizes() == student.sizes(), "fastkd::", op, ": grad_student must have shape ",
                      student.sizes());
  }
  const int64_t rows = B * H * L;
  if (rows == 0) return;

  const c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();

  MapParams P{};
  P.s = static_cast<const char*>(student.data_ptr());
  P.t = static_cast<const char*>(teacher.data_ptr());
  P.es = static_cast<int>(student.element_size());
  P.et = static_cast<int>(teacher.element_size());
  P.s_sb = student.stride(0) * P.es, P.s_sh = student.stride(1) * P.es, P.s_sl = student.stride(2) * P.es;
  P.t_sb = teacher.stride(0) * P.et, P.t_sh = teacher.stride(1) * P.et, P.t_sl = teacher.stride(2) * P.et;
  P.ds = cuda_common::dtype_code(student.scalar_type());
  P.dt = cuda_common::dtype_code(teacher.scalar_type());
  P.vs = map_rows_aligned(student);
  P.vt = map_rows_aligned(teacher);
  P.dg = P.ds;
  P.eg = P.es;
  if (grad_student.has_value()) {
    const at::Tensor& g = *grad_student;
    P.g = static_cast<char*>(g.data_ptr());
    P.has_g = true;
    P.eg = static_cast<int>(g.element_size());
    P.dg = cuda_common::dtype_code(g.scalar_type());
    P.g_sb = g.stride(0) * P.eg, P.g_sh = g.stride(1) * P.eg, P.g_sl = g.stride(2) * P.eg;
    P.vg = map_rows_aligned(g);
  }
  if (mask.has_value()) {
    P.mask = reinterpret_cast<const unsigned char*>(mask->data_ptr<bool>());
    P.vm = L % 8 == 0 && reinterpret_cast<uintptr_t>(P.mask) % 8 == 0;
  }
  P.loss = loss.data_ptr();
  P.H = H, P.L = L, P.rows = rows;
  P.kind = static_cast<int>(kind);
  P.s_scores = student_scores;
  P.t_scores = teacher_scores;

  const bool fixed = P.ds == P.dt && P.ds == P.dg && P.ds != kF64;
  const Layout lay = choose_layout(L, wide || !fixed, wide ? kMaxCtaWide : kMaxCta);
  KernelFn fn;
  if (wide) {
    fn = pick_layout<double, Dyn, Dyn>(lay);
  } else if (P.ds == P.dt && P.ds == P.dg && P.ds == kF32) {
    fn = pick_layout<float, float, float>(lay);
  } else if (P.ds == P.dt && P.ds == P.dg && P.ds == kF16) {
    fn = pick_layout<float, __half, __half>(lay);
  } else if (P.ds == P.dt && P.ds == P.dg && P.ds == kBF16) {
    fn = pick_layout<float, __nv_bfloat16, __nv_bfloat16>(lay);
  } else {
    fn = pick_layout<float, Dyn, Dyn>(lay);
  }
  const int64_t grid = lay.gs == 0 ? rows : (rows + (kGroupCta / lay.gs) - 1) / (kGroupCta / lay.gs);
  TORCH_CHECK_VALUE(grid <= INT_MAX, "fastkd::", op, ": too many rows (", rows, ")");
  fn<<<static_cast<unsigned>(grid), static_cast<unsigned>(lay.threads), 0, stream>>>(P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace attention_cuda
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("attention_map_fwd", &fastkd::attention_cuda::attention_map_fwd_cuda); }
