// attention families, CPU: fastkd::attention_transfer_fwd, fastkd::attention_map_fwd,
// fastkd::attention_relation_fwd and fastkd::attention_relation_bwd. The math, symbols and edge
// cases are those of fastkd/reference/attention.py (its docstring is the contract); this file only
// says how.
//
// * transfer: tasks of (sample, block of kChunk positions) over at::parallel_for. Pass 1 sums
//   |F|^p over the channels into a [B, N] scratch per side; per sample, the norms, the loss and the
//   per-position gradient coefficient (written over the student's scratch); pass 2 writes the
//   gradient. Extra memory: 2 B N accumulators.
// * maps: rows (b, h, i) spread over threads; a row is converted into per-thread scratch rows
//   (padded to a vector multiple; masked keys and pads hold neutral values, so the loops carry no
//   masks), then at most three vectorized passes: maxima, sums of exp, then loss and gradient.
//   Extra memory: O(L) per thread.
// * relations: one task per (sample, relation head). Its head slices are copied once into
//   contiguous [L, d] accumulation-type buffers; then blocks of kq query rows: a [kq, L] tile of
//   student and of teacher scores from BLAS (at::mm_out into a per-task buffer), and the row
//   softmaxes and KL in two vectorized passes over the tile while it is in cache. The forward keeps
//   the row log-sum-exps; the backward recomputes the tiles, turns S into dS in place, writes
//   grad_m = dS X_n per block and accumulates grad_n += dS^T X_m over the blocks in a buffer owned
//   by the task (no atomics, a fixed order). Extra memory: O(L d + kq L) per thread, never L x L.
// Arithmetic is float32 (float64 when an input is float64); results are deterministic for a given
// thread count (fixed-order reductions; BLAS as configured).

#include "cpu_capability.h"  // first: it selects at::vec's ISA

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "vec_reduce.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace fastkd {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

constexpr double kAtEps = 1e-12;        // F.normalize's eps (attention transfer)
constexpr double kScoreFloor = -100.0;  // TinyBERT: scores <= -1e2 compare as 0 (mse on scores)
constexpr int64_t kChunk = 1024;        // positions per attention-transfer task

template <typename T>
inline int64_t round_up(int64_t n) {
  const int64_t w = Vec<T>::size();
  return (n + w - 1) / w * w;
}

// Conversions between a tensor's dtype and the accumulation type, through function pointers so
// that student and teacher may differ in dtype without a combinatorial dispatch.
template <typename acc_t>
using LoadFn = void (*)(const void*, acc_t*, int64_t);
template <typename acc_t>
using StoreFn = void (*)(const acc_t*, void*, int64_t);

template <typename src_t, typename acc_t>
void load_as(const void* src, acc_t* dst, int64_t n) {
  at::vec::convert(static_cast<const src_t*>(src), dst, n);
}
template <typename dst_t, typename acc_t>
void store_as(const acc_t* src, void* dst, int64_t n) {
  at::vec::convert(src, static_cast<dst_t*>(dst), n);
}

template <typename acc_t>
LoadFn<acc_t> loader(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return &load_as<float, acc_t>;
    case at::kDouble: return &load_as<double, acc_t>;
    case at::kHalf: return &load_as<c10::Half, acc_t>;
    case at::kBFloat16: return &load_as<c10::BFloat16, acc_t>;
    default: TORCH_CHECK_TYPE(false, "fastkd: unsupported dtype ", t);
  }
}

template <typename acc_t>
StoreFn<acc_t> storer(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return &store_as<float, acc_t>;
    case at::kDouble: return &store_as<double, acc_t>;
    case at::kHalf: return &store_as<c10::Half, acc_t>;
    case at::kBFloat16: return &store_as<c10::BFloat16, acc_t>;
    default: TORCH_CHECK_TYPE(false, "fastkd: unsupported dtype ", t);
  }
}

inline char* bytes(const at::Tensor& t) { return static_cast<char*>(t.data_ptr()); }

template <typename T>
inline Vec<T> select(const Vec<T>& mask, const Vec<T>& yes, const Vec<T>& no) {
  return Vec<T>::blendv(no, yes, mask);
}

// ---------------------------------------------------------------------------------------------
// attention transfer
template <typename T>
inline Vec<T> pow_abs(const Vec<T>& x, int mode, T p) {
  if (mode == 2) return x * x;
  if (mode == 1) return x.abs();
  return (x.abs().log() * Vec<T>(p)).exp();  // log 0 = -inf: 0 at x = 0
}

template <typename T>
inline Vec<T> dpow_abs(const Vec<T>& x, int mode, T p) {
  if (mode == 2) return x * Vec<T>(2);
  const Vec<T> zero(0), one(1);
  const Vec<T> sg = select(x > zero, one, zero) - select(x < zero, one, zero);
  if (mode == 1) return sg;
  return (x.abs().log() * Vec<T>(p - 1)).exp() * Vec<T>(p) * sg;  // p > 1: 0 at x = 0
}

// out[0, n) = mean over C channels (row stride cstride bytes) of |x|^p
template <typename acc_t>
void channel_mean(const char* src, int64_t cstride, int64_t C, int64_t n, LoadFn<acc_t> ld, acc_t* buf,
                  acc_t* out, int mode, acc_t p) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  std::fill(out, out + n, acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    ld(src + c * cstride, buf, n);
    int64_t j = 0;
    for (; j + W <= n; j += W) (V::loadu(out + j) + pow_abs(V::loadu(buf + j), mode, p)).store(out + j);
    if (j < n) {
      const int64_t r = n - j;
      (V::loadu(out + j, r) + pow_abs(V::loadu(buf + j, r), mode, p)).store(out + j, r);
    }
  }
  const acc_t inv = acc_t(1) / static_cast<acc_t>(C);
  for (int64_t j = 0; j < n; ++j) out[j] *= inv;
}

template <typename acc_t>
void attention_transfer(const at::Tensor& s, const at::Tensor& t, const at::Tensor& loss,
                        const c10::optional<at::Tensor>& gs, double p_) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t B = s.size(0), Cs = s.size(1), Ct = t.size(1), N = s.size(2);
  const acc_t p = static_cast<acc_t>(p_);
  const int mode = p_ == 2.0 ? 2 : (p_ == 1.0 ? 1 : 0);
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor as = at::empty({B, N}, opts), at_ = at::empty({B, N}, opts);
  acc_t* A_s = as.data_ptr<acc_t>();
  acc_t* A_t = at_.data_ptr<acc_t>();
  const int64_t nch = (N + kChunk - 1) / kChunk;
  const auto ld_s = loader<acc_t>(s.scalar_type()), ld_t = loader<acc_t>(t.scalar_type());
  const int64_t es = s.element_size(), et = t.element_size();

  at::parallel_for(0, B * nch, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> buf(kChunk);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / nch, n0 = (task % nch) * kChunk, n = std::min(kChunk, N - n0);
      channel_mean<acc_t>(bytes(s) + (b * s.stride(0) + n0) * es, s.stride(1) * es, Cs, n, ld_s, buf.data(),
                          A_s + b * N + n0, mode, p);
      channel_mean<acc_t>(bytes(t) + (b * t.stride(0) + n0) * et, t.stride(1) * et, Ct, n, ld_t, buf.data(),
                          A_t + b * N + n0, mode, p);
    }
  });

  const bool want_grad = gs.has_value();
  acc_t* L = loss.data_ptr<acc_t>();
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      acc_t* a = A_s + b * N;
      const acc_t* at = A_t + b * N;
      V ss(0), tt(0);
      for (int64_t j = 0; j < N; j += W) {
        const int64_t r = std::min(W, N - j);
        const V x = V::loadu(a + j, r), y = V::loadu(at + j, r);
        ss = ss + x * x;
        tt = tt + y * y;
      }
      const acc_t ns = std::sqrt(hsum(ss)), nt = std::sqrt(hsum(tt));
      const acc_t ds = std::max(ns, acc_t(kAtEps)), dt = std::max(nt, acc_t(kAtEps));
      const V ids(acc_t(1) / ds), idt(acc_t(1) / dt);
      V l(0), dd(0);
      for (int64_t j = 0; j < N; j += W) {
        const int64_t r = std::min(W, N - j);
        const V x = V::loadu(a + j, r) * ids;
        const V d = x - V::loadu(at + j, r) * idt;
        l = l + d * d;
        dd = dd + x * d;
      }
      L[b] = hsum(l);
      if (!want_grad) continue;
      const V dot(2 * hsum(dd));
      const bool live = ns >= acc_t(kAtEps);
      const V inv(live ? acc_t(1) / ds : acc_t(1) / acc_t(kAtEps));
      for (int64_t j = 0; j < N; j += W) {
        const int64_t r = std::min(W, N - j);
        const V x = V::loadu(a + j, r) * ids;
        const V g = (x - V::loadu(at + j, r) * idt) * V(2);
        ((live ? g - x * dot : g) * inv).store(a + j, r);
      }
    }
  });
  if (!want_grad) return;

  const at::Tensor& g = *gs;
  const auto st_g = storer<acc_t>(g.scalar_type());
  const int64_t eg = g.element_size();
  const V invC(acc_t(1) / static_cast<acc_t>(Cs));
  at::parallel_for(0, B * nch, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> buf(kChunk);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / nch, n0 = (task % nch) * kChunk, n = std::min(kChunk, N - n0);
      const acc_t* coef = A_s + b * N + n0;
      for (int64_t c = 0; c < Cs; ++c) {
        ld_s(bytes(s) + (b * s.stride(0) + c * s.stride(1) + n0) * es, buf.data(), n);
        for (int64_t j = 0; j < n; j += W) {
          const int64_t r = std::min(W, n - j);
          (V::loadu(coef + j, r) * invC * dpow_abs(V::loadu(buf.data() + j, r), mode, p)).store(buf.data() + j, r);
        }
        st_g(buf.data(), bytes(g) + (b * g.stride(0) + c * g.stride(1) + n0) * eg, n);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// attention maps
template <typename acc_t>
struct MapJob {
  const at::Tensor &s, &t;
  const bool* mask;
  acc_t* loss;
  const at::Tensor* gs;
  int64_t kind;
  bool s_scores, t_scores;
};

// (shift, log of the shifted sum of exp) of a padded row; exp values into e when given.
template <typename acc_t>
inline void row_lse(const acc_t* x, int64_t Lp, acc_t* e, acc_t& shift, acc_t& log_sum) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  V vm(ninf);
  for (int64_t j = 0; j < Lp; j += W) vm = at::vec::maximum(vm, V::loadu(x + j));
  const acc_t m = hmax(vm);
  shift = m == ninf ? acc_t(0) : m;
  const V sh(shift);
  V z(0);
  for (int64_t j = 0; j < Lp; j += W) {
    const V ex = (V::loadu(x + j) - sh).exp();
    ex.store(e + j);
    z = z + ex;
  }
  log_sum = std::log(hsum(z));
}

template <typename acc_t>
void map_rows(const MapJob<acc_t>& job, int64_t lo, int64_t hi) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t B = job.s.size(0), H = job.s.size(1), L = job.s.size(2), Lp = round_up<acc_t>(L);
  (void)B;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const auto ld_s = loader<acc_t>(job.s.scalar_type()), ld_t = loader<acc_t>(job.t.scalar_type());
  const bool kl = job.kind == 0;
  // neutral values of masked keys and pads: kl scores -inf (probability 0), kl student
  // probabilities 1 (log 0, gradient -p/1 = 0 with p = 0), teacher probabilities 0, mse 0
  const acc_t fill_s = kl ? (job.s_scores ? ninf : acc_t(1)) : acc_t(0);
  const acc_t fill_t = kl ? (job.t_scores ? ninf : acc_t(0)) : acc_t(0);
  std::vector<acc_t> S(Lp), T(Lp), Es(Lp), Et(Lp);
  StoreFn<acc_t> st_g = job.gs ? storer<acc_t>(job.gs->scalar_type()) : nullptr;
  const V zero(0);
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t i = r % L, h = (r / L) % H, b = r / (L * H);
    const bool* keys = job.mask ? job.mask + b * L : nullptr;
    void* g_row = job.gs ? bytes(*job.gs) + (b * job.gs->stride(0) + h * job.gs->stride(1) + i * job.gs->stride(2)) *
                                                job.gs->element_size()
                         : nullptr;
    if (keys && !keys[i]) {  // a padded query row: 0, never read
      job.loss[r] = 0;
      if (g_row) {
        std::fill(S.begin(), S.end(), acc_t(0));
        st_g(S.data(), g_row, L);
      }
      continue;
    }
    ld_s(bytes(job.s) + (b * job.s.stride(0) + h * job.s.stride(1) + i * job.s.stride(2)) * job.s.element_size(),
         S.data(), L);
    ld_t(bytes(job.t) + (b * job.t.stride(0) + h * job.t.stride(1) + i * job.t.stride(2)) * job.t.element_size(),
         T.data(), L);
    for (int64_t j = L; j < Lp; ++j) S[j] = fill_s, T[j] = fill_t;
    if (keys)
      for (int64_t j = 0; j < L; ++j)
        if (!keys[j]) S[j] = fill_s, T[j] = fill_t;
    V acc(0);
    if (kl) {
      acc_t sh_s = 0, ls_s = 0, sh_t = 0, ls_t = 0, P = 1;
      if (job.s_scores) row_lse(S.data(), Lp, Es.data(), sh_s, ls_s);
      if (job.t_scores) {
        row_lse(T.data(), Lp, Et.data(), sh_t, ls_t);
      } else if (job.s_scores) {
        V vp(0);
        for (int64_t j = 0; j < Lp; j += W) vp = vp + V::loadu(T.data() + j);
        P = hsum(vp);
      }
      const V inv_zs(job.s_scores ? std::exp(-ls_s) : acc_t(1)), inv_zt(job.t_scores ? std::exp(-ls_t) : acc_t(1));
      const V lse_s(sh_s + ls_s), lse_t(sh_t + ls_t), vP(P);
      for (int64_t j = 0; j < Lp; j += W) {
        const V s = V::loadu(S.data() + j), t = V::loadu(T.data() + j);
        V p, lp, lq, g;
        if (job.t_scores) {
          p = V::loadu(Et.data() + j) * inv_zt;
          lp = t - lse_t;
        } else {
          p = t;
          lp = t.log();
        }
        if (job.s_scores) {
          lq = s - lse_s;
          g = V::loadu(Es.data() + j) * inv_zs * vP - p;
        } else {
          lq = s.log();
          g = select(p > zero, zero - p / s, zero);
        }
        acc = acc + select(p > zero, p * (lp - lq), zero);
        g.store(S.data() + j);
      }
    } else {
      const V floor(static_cast<acc_t>(kScoreFloor));
      for (int64_t j = 0; j < Lp; j += W) {
        V s = V::loadu(S.data() + j), t = V::loadu(T.data() + j);
        V keep;
        if (job.s_scores) {
          keep = s > floor;
          s = select(keep, s, zero);
        }
        if (job.t_scores) t = select(t > floor, t, zero);
        const V d = s - t;
        acc = acc + d * d;
        (job.s_scores ? select(keep, d * V(2), zero) : d * V(2)).store(S.data() + j);
      }
    }
    job.loss[r] = hsum(acc);
    if (g_row) {
      if (keys)  // masked keys get exactly 0 (their neutral values already give 0 or -0)
        for (int64_t j = 0; j < L; ++j)
          if (!keys[j]) S[j] = 0;
      st_g(S.data(), g_row, L);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// attention relations
template <typename acc_t>
struct RelJob {
  const at::Tensor &xm, &xn, &ym, &yn;
  const bool* mask;
  int64_t A, ds, dt;
  acc_t scale_s, scale_t;
  acc_t *loss, *lse_s, *lse_t;  // forward outputs; in backward lse_* are inputs
  const acc_t* weight;          // backward only
  const at::Tensor *gm, *gn;    // backward only, each may be null
};

inline int64_t query_block(int64_t Lp) {
  return std::max<int64_t>(16, std::min<int64_t>(128, 65536 / std::max<int64_t>(Lp, 1)));
}

// The head slice x[b, :, a*d:(a+1)*d] as a fresh contiguous [L, d] tensor of the accumulation
// type, with the rows of padded tokens zeroed (they are never read, whatever they hold).
template <typename acc_t>
at::Tensor head(const at::Tensor& x, int64_t b, int64_t a, int64_t d, const std::vector<int64_t>& masked) {
  at::Tensor out = at::empty({x.size(1), d}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  out.copy_(x.select(0, b).narrow(1, a * d, d));
  acc_t* p = out.data_ptr<acc_t>();
  for (int64_t j : masked) std::fill(p + j * d, p + (j + 1) * d, acc_t(0));
  return out;
}

template <typename acc_t, bool FWD>
void relation_task(const RelJob<acc_t>& job, int64_t b, int64_t a) {
  // Plain kernels below autograd: the inputs may require grad, and this may run on a worker
  // thread whose grad mode was never turned off.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t L = job.xm.size(1), Lp = round_up<acc_t>(L), kq = query_block(Lp);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const bool* keys = job.mask ? job.mask + b * L : nullptr;
  std::vector<int64_t> masked;
  if (keys)
    for (int64_t j = 0; j < L; ++j)
      if (!keys[j]) masked.push_back(j);
  const int64_t out0 = (b * job.A + a) * L;

  const at::Tensor Xm = head<acc_t>(job.xm, b, a, job.ds, masked);
  const at::Tensor Xn = job.xn.is_same(job.xm) ? Xm : head<acc_t>(job.xn, b, a, job.ds, masked);
  const at::Tensor Ym = head<acc_t>(job.ym, b, a, job.dt, masked);
  const at::Tensor Yn = job.yn.is_same(job.ym) ? Ym : head<acc_t>(job.yn, b, a, job.dt, masked);
  auto opts = at::TensorOptions().dtype(acc);
  at::Tensor Sb = at::full({kq, Lp}, ninf, opts), Tb = at::full({kq, Lp}, ninf, opts);
  at::Tensor GM, GN;
  acc_t c = 0;
  if constexpr (!FWD) {
    c = job.weight[b] * job.scale_s;
    if (job.gm) GM = at::empty({kq, job.ds}, opts);
    if (job.gn) GN = at::zeros({L, job.ds}, opts);
  }
  acc_t* S0 = Sb.data_ptr<acc_t>();
  acc_t* T0 = Tb.data_ptr<acc_t>();
  const V vss(job.scale_s), vst(job.scale_t), zero(0);

  for (int64_t i0 = 0; i0 < L; i0 += kq) {
    const int64_t n = std::min(kq, L - i0);
    bool any = !keys;
    for (int64_t r = 0; r < n && !any; ++r) any = keys[i0 + r];
    if (!any) {  // a fully padded block: zeros out, nothing to add to grad_n
      if constexpr (FWD) {
        std::fill(job.loss + out0 + i0, job.loss + out0 + i0 + n, acc_t(0));
        std::fill(job.lse_s + out0 + i0, job.lse_s + out0 + i0 + n, acc_t(0));
        std::fill(job.lse_t + out0 + i0, job.lse_t + out0 + i0 + n, acc_t(0));
      } else if (job.gm) {
        job.gm->select(0, b).narrow(0, i0, n).narrow(1, a * job.ds, job.ds).zero_();
      }
      continue;
    }
    at::Tensor Sv = Sb.narrow(0, 0, n).narrow(1, 0, L), Tv = Tb.narrow(0, 0, n).narrow(1, 0, L);
    at::mm_out(Sv, Xm.narrow(0, i0, n), Xn.t());
    at::mm_out(Tv, Ym.narrow(0, i0, n), Yn.t());
    for (int64_t r = 0; r < n; ++r) {
      acc_t* s = S0 + r * Lp;
      acc_t* t = T0 + r * Lp;
      const int64_t i = i0 + r;
      if (keys && !keys[i]) {
        if constexpr (FWD) {
          job.loss[out0 + i] = job.lse_s[out0 + i] = job.lse_t[out0 + i] = 0;
        } else {
          std::fill(s, s + L, acc_t(0));
        }
        continue;
      }
      for (int64_t j : masked) s[j] = t[j] = ninf;
      if constexpr (FWD) {
        V vms(ninf), vmt(ninf);
        for (int64_t j = 0; j < Lp; j += W) {
          const V x = V::loadu(s + j) * vss, y = V::loadu(t + j) * vst;
          x.store(s + j);
          y.store(t + j);
          vms = at::vec::maximum(vms, x);
          vmt = at::vec::maximum(vmt, y);
        }
        const acc_t ms = hmax(vms), mt = hmax(vmt);  // finite: the row's own key is valid
        const V vms_(ms), vmt_(mt);
        V zs(0), zt(0), kl(0);
        for (int64_t j = 0; j < Lp; j += W) {
          const V x = V::loadu(s + j) - vms_, y = V::loadu(t + j) - vmt_;
          const V ey = y.exp();
          zs = zs + x.exp();
          zt = zt + ey;
          kl = kl + select(ey > zero, ey * (y - x), zero);  // p (lp - lq), relative to the maxima
        }
        const acc_t lzs = std::log(hsum(zs)), zt_ = hsum(zt), lzt = std::log(zt_);
        job.loss[out0 + i] = hsum(kl) / zt_ - lzt + lzs;
        job.lse_s[out0 + i] = ms + lzs;
        job.lse_t[out0 + i] = mt + lzt;
      } else {
        const V ls(job.lse_s[out0 + i]), lt(job.lse_t[out0 + i]), vc(c);
        for (int64_t j = 0; j < Lp; j += W) {
          const V q = (V::loadu(s + j) * vss - ls).exp();
          const V p = (V::loadu(t + j) * vst - lt).exp();
          (vc * (q - p)).store(s + j);
        }
      }
    }
    if constexpr (!FWD) {
      if (job.gm) {
        at::Tensor out = GM.narrow(0, 0, n);
        at::mm_out(out, Sv, Xn);
        job.gm->select(0, b).narrow(0, i0, n).narrow(1, a * job.ds, job.ds).copy_(out);
      }
      if (job.gn) GN.addmm_(Sv.t(), Xm.narrow(0, i0, n));
    }
  }
  if constexpr (!FWD) {
    if (job.gn) job.gn->select(0, b).narrow(1, a * job.ds, job.ds).copy_(GN);
  }
}

template <typename acc_t, bool FWD>
void relation(const RelJob<acc_t>& job) {
  const int64_t B = job.xm.size(0);
  at::parallel_for(0, B * job.A, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) relation_task<acc_t, FWD>(job, task / job.A, task % job.A);
  });
}

// ---------------------------------------------------------------------------------------------
// op entry points: checks, then dispatch on the accumulation type
bool is_float(const at::Tensor& t) {
  auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

void check_input(const char* op, const char* name, const at::Tensor& x, int64_t dim) {
  TORCH_CHECK_VALUE(x.dim() == dim, "fastkd::", op, ": ", name, " must be ", dim, "-D, got shape ", x.sizes());
  TORCH_CHECK_TYPE(is_float(x), "fastkd::", op, ": ", name, " must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "fastkd::", op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK_VALUE(x.size(-1) <= 1 || x.stride(-1) == 1, "fastkd::", op, ": ", name,
                    " must have a contiguous last dim, got strides ", x.strides());
}

at::ScalarType acc_type(std::initializer_list<const at::Tensor*> xs) {
  for (const at::Tensor* x : xs)
    if (x->scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

void check_out(const char* op, const char* name, const at::Tensor& x, at::IntArrayRef shape, at::ScalarType acc) {
  TORCH_CHECK_VALUE(x.sizes() == shape, "fastkd::", op, ": ", name, " must have shape ", shape, ", got ", x.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == acc && x.is_contiguous() && x.device().is_cpu(), "fastkd::", op, ": ", name,
                    " must be a contiguous CPU ", acc, " tensor");
}

const bool* check_mask(const char* op, const c10::optional<at::Tensor>& mask, int64_t B, int64_t L) {
  if (!mask.has_value()) return nullptr;
  const at::Tensor& m = *mask;
  TORCH_CHECK_VALUE(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B && m.size(1) == L &&
                        m.is_contiguous() && m.device().is_cpu(),
                    "fastkd::", op, ": mask must be a contiguous bool [B, L] = [", B, ", ", L, "] CPU tensor");
  return m.data_ptr<bool>();
}

void attention_transfer_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& loss,
                                const c10::optional<at::Tensor>& grad_student, double p) {
  const char* op = "attention_transfer_fwd";
  check_input(op, "student", student, 3);
  check_input(op, "teacher", teacher, 3);
  TORCH_CHECK_VALUE(teacher.size(0) == student.size(0) && teacher.size(2) == student.size(2), "fastkd::", op,
                    ": teacher ", teacher.sizes(), " must match student ", student.sizes(), " in B and N");
  TORCH_CHECK_VALUE(p >= 1.0 && std::isfinite(p), "fastkd::", op, ": p must be a finite number >= 1, got ", p);
  const auto acc = acc_type({&student, &teacher});
  check_out(op, "loss", loss, {student.size(0)}, acc);
  if (grad_student.has_value()) {
    check_input(op, "grad_student", *grad_student, 3);
    TORCH_CHECK_VALUE(grad_student->sizes() == student.sizes(), "fastkd::", op, ": grad_student must have shape ",
                      student.sizes());
  }
  if (student.numel() == 0 || teacher.numel() == 0) {
    loss.zero_();
    if (grad_student.has_value()) grad_student->zero_();
    return;
  }
  if (acc == at::kDouble)
    attention_transfer<double>(student, teacher, loss, grad_student, p);
  else
    attention_transfer<float>(student, teacher, loss, grad_student, p);
}

void attention_map_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& mask,
                           const at::Tensor& loss, const c10::optional<at::Tensor>& grad_student, int64_t kind,
                           bool student_scores, bool teacher_scores) {
  const char* op = "attention_map_fwd";
  check_input(op, "student", student, 4);
  check_input(op, "teacher", teacher, 4);
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes() && student.size(2) == student.size(3), "fastkd::", op,
                    ": student ", student.sizes(), " and teacher ", teacher.sizes(), " must be the same [B, H, L, L]");
  TORCH_CHECK_VALUE(kind == 0 || kind == 1, "fastkd::", op, ": unknown attention map kind ", kind);
  const int64_t B = student.size(0), H = student.size(1), L = student.size(2);
  const auto acc = acc_type({&student, &teacher});
  check_out(op, "loss", loss, {B, H, L}, acc);
  const bool* m = check_mask(op, mask, B, L);
  if (grad_student.has_value()) {
    check_input(op, "grad_student", *grad_student, 4);
    TORCH_CHECK_VALUE(grad_student->sizes() == student.sizes(), "fastkd::", op, ": grad_student must have shape ",
                      student.sizes());
  }
  const int64_t rows = B * H * L;
  if (rows == 0) return;
  const at::Tensor* gs = grad_student.has_value() ? &*grad_student : nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1));
  if (acc == at::kDouble) {
    MapJob<double> job{student, teacher, m, loss.data_ptr<double>(), gs, kind, student_scores, teacher_scores};
    at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) { map_rows<double>(job, lo, hi); });
  } else {
    MapJob<float> job{student, teacher, m, loss.data_ptr<float>(), gs, kind, student_scores, teacher_scores};
    at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) { map_rows<float>(job, lo, hi); });
  }
}

struct RelShapes {
  int64_t B, L, ds, dt;
  at::ScalarType acc;
};

RelShapes check_relation(const char* op, const at::Tensor& xm, const at::Tensor& xn, const at::Tensor& ym,
                         const at::Tensor& yn, int64_t A) {
  check_input(op, "student_m", xm, 3);
  check_input(op, "student_n", xn, 3);
  check_input(op, "teacher_m", ym, 3);
  check_input(op, "teacher_n", yn, 3);
  TORCH_CHECK_VALUE(xn.sizes() == xm.sizes() && yn.sizes() == ym.sizes() && ym.size(0) == xm.size(0) &&
                        ym.size(1) == xm.size(1),
                    "fastkd::", op, ": student_m/student_n must be [B, L, Ds] and teacher_m/teacher_n [B, L, Dt]");
  TORCH_CHECK_VALUE(A >= 1 && xm.size(2) % A == 0 && ym.size(2) % A == 0, "fastkd::", op, ": num_heads=", A,
                    " must divide Ds=", xm.size(2), " and Dt=", ym.size(2));
  return {xm.size(0), xm.size(1), xm.size(2) / A, ym.size(2) / A, acc_type({&xm, &xn, &ym, &yn})};
}

template <typename acc_t>
RelJob<acc_t> rel_job(const at::Tensor& xm, const at::Tensor& xn, const at::Tensor& ym, const at::Tensor& yn,
                      const bool* m, int64_t A, const RelShapes& sh, double scale_s, double scale_t) {
  return RelJob<acc_t>{xm, xn, ym, yn, m, A, sh.ds, sh.dt, static_cast<acc_t>(scale_s), static_cast<acc_t>(scale_t),
                       nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
}

void attention_relation_fwd_cpu(const at::Tensor& xm, const at::Tensor& xn, const at::Tensor& ym, const at::Tensor& yn,
                                const c10::optional<at::Tensor>& mask, int64_t A, double scale_s, double scale_t,
                                const at::Tensor& loss, const at::Tensor& lse_s, const at::Tensor& lse_t) {
  const char* op = "attention_relation_fwd";
  const RelShapes sh = check_relation(op, xm, xn, ym, yn, A);
  const bool* m = check_mask(op, mask, sh.B, sh.L);
  for (auto [name, x] : {std::pair<const char*, const at::Tensor*>{"loss", &loss}, {"lse_student", &lse_s},
                         {"lse_teacher", &lse_t}})
    check_out(op, name, *x, {sh.B, A, sh.L}, sh.acc);
  if (sh.B * sh.L == 0) return;
  auto run = [&](auto tag) {
    using acc_t = decltype(tag);
    auto job = rel_job<acc_t>(xm, xn, ym, yn, m, A, sh, scale_s, scale_t);
    job.loss = loss.data_ptr<acc_t>();
    job.lse_s = lse_s.data_ptr<acc_t>();
    job.lse_t = lse_t.data_ptr<acc_t>();
    relation<acc_t, true>(job);
  };
  if (sh.acc == at::kDouble) run(double{}); else run(float{});
}

void attention_relation_bwd_cpu(const at::Tensor& xm, const at::Tensor& xn, const at::Tensor& ym, const at::Tensor& yn,
                                const c10::optional<at::Tensor>& mask, int64_t A, double scale_s, double scale_t,
                                const at::Tensor& lse_s, const at::Tensor& lse_t, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& grad_m, const c10::optional<at::Tensor>& grad_n) {
  const char* op = "attention_relation_bwd";
  const RelShapes sh = check_relation(op, xm, xn, ym, yn, A);
  const bool* m = check_mask(op, mask, sh.B, sh.L);
  check_out(op, "lse_student", lse_s, {sh.B, A, sh.L}, sh.acc);
  check_out(op, "lse_teacher", lse_t, {sh.B, A, sh.L}, sh.acc);
  check_out(op, "weight", weight, {sh.B}, sh.acc);
  for (auto [name, g] : {std::pair<const char*, const c10::optional<at::Tensor>*>{"grad_m", &grad_m},
                         {"grad_n", &grad_n}}) {
    if (!g->has_value()) continue;
    check_input(op, name, **g, 3);
    TORCH_CHECK_VALUE((*g)->sizes() == xm.sizes(), "fastkd::", op, ": ", name, " must have shape ", xm.sizes());
  }
  if (sh.B * sh.L == 0) return;
  auto run = [&](auto tag) {
    using acc_t = decltype(tag);
    auto job = rel_job<acc_t>(xm, xn, ym, yn, m, A, sh, scale_s, scale_t);
    job.lse_s = const_cast<acc_t*>(lse_s.data_ptr<acc_t>());
    job.lse_t = const_cast<acc_t*>(lse_t.data_ptr<acc_t>());
    job.weight = weight.data_ptr<acc_t>();
    job.gm = grad_m.has_value() ? &*grad_m : nullptr;
    job.gn = grad_n.has_value() ? &*grad_n : nullptr;
    relation<acc_t, false>(job);
  };
  if (sh.acc == at::kDouble) run(double{}); else run(float{});
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("attention_transfer_fwd", &fastkd::attention_transfer_fwd_cpu);
  m.impl("attention_map_fwd", &fastkd::attention_map_fwd_cpu);
  m.impl("attention_relation_fwd", &fastkd::attention_relation_fwd_cpu);
  m.impl("attention_relation_bwd", &fastkd::attention_relation_bwd_cpu);
}
