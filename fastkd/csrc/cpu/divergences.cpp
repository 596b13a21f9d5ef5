// kd family, CPU: fastkd::kd_fwd. The math, symbols and gradient table are those of
// fastkd/reference/divergences.py (its docstring is the contract); this file only says how.
//
// Rows are independent and spread over threads with at::parallel_for. Per row, with per-thread
// scratch rows of V floats (O(V) per thread, never (N, V)):
//   A  read the student and teacher rows once (fp32/fp16/bf16, any mix), softcap them, store them
//      as fp32 and take their maxima;
//   B  exponentials and their sums (the log-sum-exps, and the temperature-1 one of the hard
//      label), kept for the later passes. forward_kl and reverse_kl get their loss here too, and
//      their sum(h), sum(k) in closed form. Meanwhile the next row is prefetched, so its DRAM
//      traffic overlaps this row's arithmetic;
//   C  (jsd, skew_*, tvd only) the per-entry loss terms and h, k, and their sums;
//   D  the gradients, staged per 1024 entries in fp32 and converted to the buffers' dtype.
// Reading the whole row before writing any of its gradient is what makes inplace mode
// (grad_student aliasing student) safe. Sums run per vector lane in a fixed order (a two-level
// cascade, or float64 where a gradient cancels against the sum), so results are bitwise the same
// whatever the thread count.
//
// float64 inputs (either side; for gradcheck and debugging) take a separate scalar float64 path,
// kd_row_f64 below: the reference's formulas entry by entry, not tuned for speed.
//
// NaN: a NaN logit makes its row's maximum NaN (load_row's max propagates it), hence every
// exponential, sum and probability of that side of the row; the zero masks test == 0 (not > 0)
// so that NaN is never masked out, and the row's loss and gradients come out NaN, at no cost.

#include "vec_math.h"  // first: it selects the vector ISA (CPU_CAPABILITY) for the ATen headers
#include "../kd_checks.h"

namespace fastkd {
namespace {

// ---------------------------------------------------------------------------------------------
struct Params {
  int64_t V, Vpad;
  float invT, softcap;
  float C;         // soft_weight * scale / T: factor of dD/da, dD/db in the gradients
  double sw_scale; // soft_weight * scale: factor of D in the loss
  float hw;        // hard_weight
  bool hard, t_is_one;
  Coef cf;
};

struct RowStats {
  float xms, xmt;      // maxima of the capped rows (temperature 1)
  float iSa, lSa;      // 1 / sum exp(a - max a), its log; same for b
  float iSb, lSb;
  float iS1, lS1;      // the temperature-1 student softmax (hard label)
  double D, Sh, Sk;    // divergence, sum h, sum k
  double M;            // forward_kl: E_p[b - a]; reverse_kl: E_q[a - b] (see pass_d)
};

// Per-thread scratch rows, Vpad floats each (-inf / 0 padded past V), plus two staging blocks.
struct Scratch {
  float *xs, *xt;    // capped logits (pass A); jsd/skew/tvd: h, k once pass C is done
  float *ea, *eb;    // exp(a - max a), exp(b - max b) (pass B)
  float *e1;         // exp(cap(s) - max cap(s)), the temperature-1 softmax numerators (hard label, T != 1)
  float *dcs, *dct;  // cap'(s), cap'(t) (softcap)
  float *stage_s, *stage_t;
};

// Pulls the next row's inputs into L2 while this row computes (pass B), so that the DRAM
// traffic overlaps the arithmetic instead of stalling pass A. A few lines per vector step.
struct Prefetch {
  const char* p[2] = {nullptr, nullptr};
  int64_t n[2] = {0, 0}, off = 0, step = 0;
  void start(const void* a, int64_t na, const void* b, int64_t nb, int64_t steps) {
    p[0] = static_cast<const char*>(a); n[0] = na;
    p[1] = static_cast<const char*>(b); n[1] = nb;
    off = 0;
    step = ((std::max(na, nb) + steps - 1) / std::max<int64_t>(steps, 1) + 63) / 64 * 64;
  }
  inline void next() {
#if defined(__GNUC__)
    for (int64_t o = off; o < off + step; o += 64) {
      if (o < n[0]) __builtin_prefetch(p[0] + o, 0, 2);
      if (o < n[1]) __builtin_prefetch(p[1] + o, 0, 2);
    }
#endif
    off += step;
  }
};

// Pass B: the exponentials and their sums. forward_kl and reverse_kl also get their loss
// (and M, in float64 where a gradient cancels against it).
template <int DIV, bool EXACT_M>
void pass_b(const Scratch& w, const Params& P, RowStats& st, Prefetch& pf) {
  const Vec vms(st.xms), vmt(st.xmt), vinvT(P.invT), zero(0.f);
  const bool sep1 = P.hard && !P.t_is_one;
  Cascade Sa, Sb, S1, Lf;
  DAcc Ld;
  for (int64_t j = 0; j < P.Vpad; j += kW) {
    pf.next();
    const Vec xa = Vec::loadu(w.xs + j), xb = Vec::loadu(w.xt + j);
    const Vec da = (xa - vms) * vinvT, db = (xb - vmt) * vinvT;
    const Vec ea = vexp(da), eb = vexp(db);
    ea.store(w.ea + j);
    eb.store(w.eb + j);
    Sa.add(ea);
    Sb.add(eb);
    if constexpr (DIV == kForwardKL || DIV == kReverseKL) {
      const Vec l = DIV == kForwardKL ? Vec::blendv(eb * (db - da), zero, eb == zero)
                                      : Vec::blendv(ea * (da - db), zero, ea == zero);
      if constexpr (EXACT_M) Ld.add(l); else Lf.add(l);
    }
    if (sep1) {
      const Vec e1 = vexp(xa - vms);
      if (w.e1) e1.store(w.e1 + j);
      S1.add(e1);
    }
  }
  const double sa = Sa.value(), sb = Sb.value();
  st.iSa = static_cast<float>(1.0 / sa); st.lSa = static_cast<float>(std::log(sa));
  st.iSb = static_cast<float>(1.0 / sb); st.lSb = static_cast<float>(std::log(sb));
  if (sep1) {
    const double s1 = S1.value();
    st.iS1 = static_cast<float>(1.0 / s1); st.lS1 = static_cast<float>(std::log(s1));
  } else {
    st.iS1 = st.iSa; st.lS1 = st.lSa;
  }
  if constexpr (DIV == kForwardKL || DIV == kReverseKL) {
    const double L = EXACT_M ? Ld.value() : Lf.value();
    if constexpr (DIV == kForwardKL) {  // sum p (lp - lq); sum h = -1, sum k = D + 1
      st.M = L / sb;
      st.D = st.M + (std::log(sa) - std::log(sb));
      st.Sh = -1.0; st.Sk = st.D + 1.0;
    } else {  // sum q (lq - lp); sum h = D + 1, sum k = -1
      st.M = L / sa;
      st.D = st.M + (std::log(sb) - std::log(sa));
      st.Sh = st.D + 1.0; st.Sk = -1.0;
    }
  }
}

// Probabilities and log-probabilities of one vector of entries.
struct Probs {
  Vec q, p, lq, lp;
};

inline Probs probs(const Scratch& w, int64_t j, const RowStats& st, const Params& P) {
  const Vec da = (Vec::loadu(w.xs + j) - Vec(st.xms)) * Vec(P.invT);
  const Vec db = (Vec::loadu(w.xt + j) - Vec(st.xmt)) * Vec(P.invT);
  return {Vec::loadu(w.ea + j) * Vec(st.iSa), Vec::loadu(w.eb + j) * Vec(st.iSb), da - Vec(st.lSa),
          db - Vec(st.lSb)};
}

// Pass C (jsd, skew_*, tvd): sums of the loss terms and of h, k; h and k replace the logits in
// xs, xt for pass D.
template <int DIV, bool GS, bool GT>
void pass_c(const Scratch& w, const Params& P, RowStats& st) {
  DAcc E, H, K;
  for (int64_t j = 0; j < P.Vpad; j += kW) {
    const Probs pr = probs(w, j, st, P);
    Vec ell, h, k;
    terms<DIV>(pr.q, pr.p, pr.lq, pr.lp, P.cf, ell, h, k);
    E.add(ell);
    if constexpr (GS) { H.add(h); h.store(w.xs + j); }
    if constexpr (GT) { K.add(k); k.store(w.xt + j); }
  }
  st.D = E.value(); st.Sh = H.value(); st.Sk = K.value();
}

// Pass D: the gradients, d loss / d s_j and d loss / d t_j.
template <int DIV, bool GS, bool GT>
void pass_d(const Scratch& w, const Params& P, const RowStats& st, int64_t label, void* gs, StoreFn store_s,
            int64_t es, void* gt, StoreFn store_t, int64_t et) {
  const Vec vC(P.C), vhw(P.hw), viSa(st.iSa), viSb(st.iSb), viS1(st.iS1), vinvT(P.invT), vms(st.xms),
      vmt(st.xmt), zero(0.f);
  const Split M(st.M), nSh(-st.Sh), nSk(-st.Sk);
  const bool capped = P.softcap != 0.f, sep1 = P.hard && !P.t_is_one;
  for (int64_t j0 = 0; j0 < P.V; j0 += kBlock) {
    const int64_t n = std::min(kBlock, P.V - j0);
    for (int64_t j = j0; j < j0 + n; j += kW) {
      const Vec q = Vec::loadu(w.ea + j) * viSa, p = Vec::loadu(w.eb + j) * viSb;
      if constexpr (GS) {
        Vec g;
        if constexpr (DIV == kForwardKL) {  // h - q sum(h) = q - p
          g = vC * (q - p);
        } else if constexpr (DIV == kReverseKL) {  // = q (lq - lp - D) = q ((a - b) - E_q[a - b])
          const Vec d = (Vec::loadu(w.xs + j) - vms) * vinvT - (Vec::loadu(w.xt + j) - vmt) * vinvT;
          g = vC * Vec::blendv(q * ((d - M.hi) - M.lo), zero, q == zero);
        } else {  // h from pass C
          g = vC * fma1(q, nSh.lo, fma1(q, nSh.hi, Vec::loadu(w.xs + j)));
        }
        if (P.hard) {
          Vec sm1 = sep1 ? Vec::loadu(w.e1 + j) * viS1 : q;
          const int64_t lane = label - j;
          if (lane >= 0 && lane < kW) sm1 = sm1 - unit(lane);
          g = at::vec::fmadd(vhw, sm1, g);
        }
        if (capped) g = g * Vec::loadu(w.dcs + j);
        g.store(w.stage_s + (j - j0));
      }
      if constexpr (GT) {
        Vec g;
        if constexpr (DIV == kForwardKL) {  // k - p sum(k) = p (lp - lq - D) = p ((b - a) - E_p[b - a])
          const Vec d = (Vec::loadu(w.xt + j) - vmt) * vinvT - (Vec::loadu(w.xs + j) - vms) * vinvT;
          g = vC * Vec::blendv(p * ((d - M.hi) - M.lo), zero, p == zero);
        } else if constexpr (DIV == kReverseKL) {  // k - p sum(k) = p - q
          g = vC * (p - q);
        } else {  // k from pass C
          g = vC * fma1(p, nSk.lo, fma1(p, nSk.hi, Vec::loadu(w.xt + j)));
        }
        if (capped) g = g * Vec::loadu(w.dct + j);
        g.store(w.stage_t + (j - j0));
      }
    }
    if constexpr (GS) store_s(static_cast<char*>(gs) + j0 * es, w.stage_s, n);
    if constexpr (GT) store_t(static_cast<char*>(gt) + j0 * et, w.stage_t, n);
  }
}

// ---------------------------------------------------------------------------------------------
struct Job {
  Params P;
  RowPtr s, t, gs, gt;
  const int64_t* labels = nullptr;
  int64_t l0 = 0, l1 = 0;  // labels strides
  int64_t ignore_index = 0;
  float* loss = nullptr;
  int64_t o0 = 0, o1 = 0;  // loss strides
  LoadFn load_s, load_t;
  StoreFn store_s = nullptr, store_t = nullptr;
};

template <int DIV, bool GS, bool GT>
void run_rows(const Job& job, int64_t begin, int64_t end) {
  // float64 sums for the terms a gradient cancels against (see DAcc), only where one does.
  constexpr bool kExactM = (DIV == kForwardKL && GT) || (DIV == kReverseKL && GS);
  const Params& P = job.P;
  const int64_t R = job.s.R;
  const bool capped = P.softcap != 0.f, e1 = GS && P.hard && !P.t_is_one;
  const int64_t nrows = 4 + e1 + (capped && GS) + (capped && GT);
  const size_t nfloat = nrows * P.Vpad + 2 * kBlock;
  std::unique_ptr<float, decltype(&std::free)> mem(
      static_cast<float*>(std::aligned_alloc(64, ((nfloat * sizeof(float) + 63) / 64) * 64)), &std::free);
  TORCH_CHECK(mem, "fastkd::kd_fwd: out of memory for the ", P.V, "-entry scratch rows");
  Scratch w;
  float* next = mem.get();
  auto take = [&](bool want, int64_t n) { float* r = want ? next : nullptr; next += want ? n : 0; return r; };
  w.xs = take(true, P.Vpad); w.xt = take(true, P.Vpad);
  w.ea = take(true, P.Vpad); w.eb = take(true, P.Vpad);
  w.e1 = take(e1, P.Vpad);
  w.dcs = take(capped && GS, P.Vpad); w.dct = take(capped && GT, P.Vpad);
  w.stage_s = take(true, kBlock); w.stage_t = take(true, kBlock);

  Prefetch pf;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / R, r = i % R;
    float* loss = job.loss + b * job.o0 + r * job.o1;
    int64_t label = -1;
    if (job.labels) {
      label = job.labels[b * job.l0 + r * job.l1];
      if (label == job.ignore_index) {  // loss 0, gradient 0, inputs never read
        *loss = 0.f;
        if (GS) std::memset(job.gs.row(i), 0, P.V * job.gs.es);
        if (GT) std::memset(job.gt.row(i), 0, P.V * job.gt.es);
        continue;
      }
    }
    if (i + 1 < end)
      pf.start(job.s.row(i + 1), P.V * job.s.es, job.t.row(i + 1), P.V * job.t.es, P.Vpad / kW);
    else
      pf.start(nullptr, 0, nullptr, 0, 1);
    RowStats st;
    st.xms = job.load_s(job.s.row(i), P.V, w.xs, P.Vpad, P.softcap, w.dcs);
    st.xmt = job.load_t(job.t.row(i), P.V, w.xt, P.Vpad, P.softcap, w.dct);
    const float x_label = P.hard ? w.xs[label] : 0.f;
    pass_b<DIV, kExactM>(w, P, st, pf);
    if constexpr (DIV != kForwardKL && DIV != kReverseKL) pass_c<DIV, GS, GT>(w, P, st);
    double row = P.sw_scale * st.D;
    if (P.hard) row += static_cast<double>(P.hw) * ((static_cast<double>(st.xms) - x_label) + st.lS1);
    *loss = static_cast<float>(row);
    if constexpr (GS || GT)
      pass_d<DIV, GS, GT>(w, P, st, label, GS ? job.gs.row(i) : nullptr, job.store_s, job.gs.es,
                          GT ? job.gt.row(i) : nullptr, job.store_t, job.gt.es);
  }
}


template <int DIV>
void run_div(const Job& job, bool gs, bool gt, int64_t N) {
  // Enough rows per task that a thread gets at least ~64K entries of work.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(job.P.V, 1));
  auto go = [&](auto fn) {
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      fn(job, b, e);
      store_fence();
    });
  };
  if (gs && gt) go(run_rows<DIV, true, true>);
  else if (gs) go(run_rows<DIV, true, false>);
  else if (gt) go(run_rows<DIV, false, true>);
  else go(run_rows<DIV, false, false>);
}

// ---------------------------------------------------------------------------------------------
// The float64 path: student or teacher is float64 (gradcheck, debugging). Scalar float64 math,
// the reference's formulas entry by entry; each row is read whole before its gradients are
// written (inplace-safe, like the fp32 path) and summed in a fixed order (deterministic).
struct JobF64 {
  RowPtr s, t, gs, gt;
  at::ScalarType ts, tt;
  const int64_t* labels = nullptr;
  int64_t l0 = 0, l1 = 0, ignore_index = 0;
  double* loss = nullptr;
  int64_t o0 = 0, o1 = 0;
  int64_t V = 0, div = 0;
  double T = 1, beta = 0, skew = 0, softcap = 0, sw_scale = 0, C = 0, hw = 0;
};

// max(x) + log(sum exp(x - max(x))) over n entries (NaN if one is NaN).
inline double lse_f64(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(x[j])) return x[j];  // std::max would drop it (and lose it among -inf entries)
    m = std::max(m, x[j]);
  }
  if (m == -std::numeric_limits<double>::infinity()) return m;
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += std::exp(x[j] - m);
  return m + std::log(s);
}

void kd_rows_f64(const JobF64& J, int64_t begin, int64_t end) {
  const int64_t V = J.V, R = J.s.R;
  const bool gs = J.gs.base != nullptr, gt = J.gt.base != nullptr, capped = J.softcap != 0.0, hard = J.hw != 0.0;
  F64Scratch mem(8 * V, "fastkd::kd_fwd");
  double *s = mem.get(), *t = s + V, *ds = t + V, *dt = ds + V, *lq = dt + V, *lp = lq + V, *h = lp + V,
         *k = h + V;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / R, r = i % R;
    double& loss = J.loss[b * J.o0 + r * J.o1];
    int64_t label = -1;
    if (J.labels) {
      label = J.labels[b * J.l0 + r * J.l1];
      if (label == J.ignore_index) {
        loss = 0.0;
        if (gs) std::memset(J.gs.row(i), 0, V * J.gs.es);
        if (gt) std::memset(J.gt.row(i), 0, V * J.gt.es);
        continue;
      }
    }
    load_row_f64(J.s.row(i), J.ts, V, s);
    load_row_f64(J.t.row(i), J.tt, V, t);
    if (capped) {
      for (int64_t j = 0; j < V; ++j) {
        const double a = std::tanh(s[j] / J.softcap), c = std::tanh(t[j] / J.softcap);
        s[j] = J.softcap * a; ds[j] = 1.0 - a * a;
        t[j] = J.softcap * c; dt[j] = 1.0 - c * c;
      }
    }
    for (int64_t j = 0; j < V; ++j) { lq[j] = s[j] / J.T; lp[j] = t[j] / J.T; }
    const double la = lse_f64(lq, V), lb = lse_f64(lp, V);
    double D = 0, Sh = 0, Sk = 0;
    for (int64_t j = 0; j < V; ++j) {
      lq[j] -= la;
      lp[j] -= lb;
      double ell;
      terms_f64(J.div, std::exp(lq[j]), std::exp(lp[j]), lq[j], lp[j], J.beta, J.skew, ell, h[j], k[j]);
      D += ell; Sh += h[j]; Sk += k[j];
    }
    const double l1 = hard ? lse_f64(s, V) : 0.0;
    loss = J.sw_scale * D + (hard ? J.hw * (l1 - s[label]) : 0.0);
    if (gs) {
      for (int64_t j = 0; j < V; ++j) {
        double g = J.C * (h[j] - std::exp(lq[j]) * Sh);
        if (hard) g += J.hw * (std::exp(s[j] - l1) - (j == label ? 1.0 : 0.0));
        h[j] = capped ? g * ds[j] : g;
      }
      store_row_f64(J.gs.row(i), J.ts, h, V);
    }
    if (gt) {
      for (int64_t j = 0; j < V; ++j) {
        const double g = J.C * (k[j] - std::exp(lp[j]) * Sk);
        k[j] = capped ? g * dt[j] : g;
      }
      store_row_f64(J.gt.row(i), J.tt, k, V);
    }
  }
}

// ---------------------------------------------------------------------------------------------
void kd_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                const at::Tensor& loss, const std::optional<at::Tensor>& grad_student,
                const std::optional<at::Tensor>& grad_teacher, int64_t divergence, double temperature, double beta,
                double skew, int64_t ignore_index, double soft_weight, double hard_weight, bool scale_temperature,
                double softcap) {
  const checks::KdShape shape =
      checks::check_kd_args(student, teacher, labels, loss, grad_student, grad_teacher, divergence, temperature, beta,
                            skew, hard_weight, softcap, c10::DeviceType::CPU);
  const int64_t B = shape.B, R = shape.R, V = shape.V, N = shape.N;
  const bool wide = shape.wide;
  const at::ScalarType ts = student.scalar_type(), tt = teacher.scalar_type();
  const int64_t* lab = nullptr;
  int64_t l0 = 0, l1 = 0;
  if (labels.has_value()) {
    const at::Tensor& L = *labels;
    lab = L.data_ptr<int64_t>();
    l0 = L.stride(0);
    l1 = L.stride(1);
    // Labels index the student row only for the hard loss; with hard_weight = 0 they are just
    // the valid-row mask (any value but ignore_index is a valid row), as on every backend.
    for (int64_t i = 0; hard_weight != 0.0 && i < N; ++i) {  // before any thread starts
      const int64_t y = lab[(i / R) * l0 + (i % R) * l1];
      TORCH_CHECK(y == ignore_index || (y >= 0 && y < V), "fastkd::kd_fwd: label ", y, " at row ", i,
                  " is out of range for a vocabulary of ", V, " (ignore_index is ", ignore_index, ")");
    }
  }
  if (N == 0) return;
  // Enough rows per task that a thread gets at least ~64K entries of work.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / V);

  if (wide) {
    JobF64 J;
    J.s = RowPtr(student);
    J.t = RowPtr(teacher);
    if (grad_student.has_value()) J.gs = RowPtr(*grad_student);
    if (grad_teacher.has_value()) J.gt = RowPtr(*grad_teacher);
    J.ts = ts;
    J.tt = tt;
    J.labels = lab;
    J.l0 = l0;
    J.l1 = l1;
    J.ignore_index = ignore_index;
    J.loss = loss.data_ptr<double>();
    J.o0 = loss.stride(0);
    J.o1 = loss.stride(1);
    J.V = V;
    J.div = divergence;
    J.T = temperature;
    J.beta = beta;
    J.skew = skew;
    J.softcap = softcap;
    const double scale = scale_temperature ? temperature * temperature : 1.0;
    J.sw_scale = soft_weight * scale;
    J.C = soft_weight * scale / temperature;
    J.hw = hard_weight;
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) { kd_rows_f64(J, b, e); });
    return;
  }

  Job job;
  Params& P = job.P;
  P.V = V;
  P.Vpad = (V + kPad - 1) / kPad * kPad;
  P.invT = static_cast<float>(1.0 / temperature);
  P.softcap = static_cast<float>(softcap);
  const double scale = scale_temperature ? temperature * temperature : 1.0;
  P.C = static_cast<float>(soft_weight * scale / temperature);
  P.sw_scale = soft_weight * scale;
  P.hw = static_cast<float>(hard_weight);
  P.hard = hard_weight != 0.0;
  P.t_is_one = temperature == 1.0;
  P.cf = make_coef(divergence, beta, skew);
  // Gradients larger than this are written with non-temporal stores (see store_row).
  const int64_t grad_bytes = N * V * (grad_student.has_value() ? student.element_size() : 0) +
                             N * V * (grad_teacher.has_value() ? teacher.element_size() : 0);
  const bool stream = grad_bytes >= (int64_t{32} << 20);
  job.s = RowPtr(student);
  job.t = RowPtr(teacher);
  job.load_s = pick_load(student.scalar_type());
  job.load_t = pick_load(teacher.scalar_type());
  if (grad_student.has_value()) {
    job.gs = RowPtr(*grad_student);
    job.store_s = pick_store(student.scalar_type(), stream);
  }
  if (grad_teacher.has_value()) {
    job.gt = RowPtr(*grad_teacher);
    job.store_t = pick_store(teacher.scalar_type(), stream);
  }
  job.labels = lab;
  job.l0 = l0;
  job.l1 = l1;
  job.ignore_index = ignore_index;
  job.loss = loss.data_ptr<float>();
  job.o0 = loss.stride(0);
  job.o1 = loss.stride(1);

  const bool gs = grad_student.has_value(), gt = grad_teacher.has_value();
  switch (divergence) {
    case kForwardKL: run_div<kForwardKL>(job, gs, gt, N); break;
    case kReverseKL: run_div<kReverseKL>(job, gs, gt, N); break;
    case kJSD: run_div<kJSD>(job, gs, gt, N); break;
    case kSkewForwardKL: run_div<kSkewForwardKL>(job, gs, gt, N); break;
    case kSkewReverseKL: run_div<kSkewReverseKL>(job, gs, gt, N); break;
    default: run_div<kTVD>(job, gs, gt, N); break;
  }
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("kd_fwd", &fastkd::kd_fwd_cpu); }
