// sparse_kd family, CPU: fastkd::sparse_kd_fwd, distillation from a sparse top-k teacher. The math,
// tails and gradient g_j = q_j * gamma + [j = idx_i] e_i are those of fastkd/reference/sparse.py (its
// docstring is the contract); the per-entry terms are the divergence table of vec_math.h. This file
// only says how.
//
// Rows are independent and spread over threads with at::parallel_for. Per row, with per-thread
// scratch (O(V + k) floats, never (N, V)):
//   sort  the k indices by 1024-entry block (a counting sort, O(k + V/1024)), so that each block of
//         the row meets its own teacher entries;
//   1     (when the student's full softmax is needed: bucket tail, forward_kl with renormalize, or
//         hard labels) read the row once, a block at a time: convert it to fp32, take the student's
//         logits at the k indices and set them to -inf in the block, then exponentials and sums
//         against the running maximum (a block whose maximum raised it rescales the sums; the
//         block's exponentials keep their own reference, blockM, corrected in pass 3). The sums
//         therefore run over the entries outside the teacher's support only: the k entries' own
//         exponentials are added from the gathered logits, and the bucket tail's mass
//         q_tail = sum_{j not in S} q_j comes out with full relative precision instead of as
//         1 - sum_i q_i, which cancels when the k entries hold nearly all the mass;
//   2     the k-entry math, vectorized over the k entries: bucket log-probabilities, the divergence
//         terms, D = sum ell and H = sum h (float64 sums), the tail bucket in float64 (both masses
//         floored at 2^-20: bucket_tail), and the full gradient of each teacher entry,
//         C (h_i - q_i H) (+ the hard-label part), which is what q_i gamma + e_i is for every tail
//         (and needs no cancellation of gamma's large terms);
//   3     (grad_student) per 1024-entry block, the dense part C gamma q_j + hw (softmax(z)_j -
//         [j = label]) staged in fp32 from the exponentials of pass 1 (0 at the teacher's entries),
//         plus the block's teacher entries, converted once to the buffer's dtype. Meanwhile the next
//         row's first blocks are prefetched (pass 1 prefetches two blocks ahead of itself): ~10%
//         faster with a gradient, measured at V = 32000.
// The row is read (pass 1, or the k-entry gather) before its gradient is written. Sums run per
// vector lane in a fixed order and rows never share a sum, so results are bitwise the same
// whatever the thread count. Ignored rows are never read: loss 0, gradient 0.
//
// Inputs with float64 (student or values; for gradcheck and debugging) take a scalar float64 path,
// sparse_rows_f64 below, with the same passes in plain loops.
//
// NaN (the contract's rule): a NaN the row reads makes its maximum or its sums NaN, hence every q or
// p of that side, D and H; the divergence terms let NaN through, the tail floors (std::max with the
// mass first) keep it, and gamma of the renormalized divergences, 0, is NaN when H is, which pass 3
// writes over the whole row (fill): the row's loss and gradient are NaN, at no extra read.

#include "vec_math.h"  // first: it selects the vector ISA (CPU_CAPABILITY) for the ATen headers

#include "../sparse_checks.h"

#include <atomic>

namespace fastkd {
namespace {

enum Tail { kRenormalize = 0, kBucket = 1 };

struct SParams {
  int64_t V, K, Kpad, nblk;
  float invT;
  double invT_d, C, sw_scale, hw;  // C = soft_weight * scale / T: factor of dD/da in the gradient
  bool hard, t_is_one;
  bool ca;     // the soft part needs the student's full softmax at T (bucket, or forward_kl renormalize)
  bool c1;     // the hard label needs its own temperature-1 softmax (not ca's, which it is at T = 1)
  bool pass1;  // ca || hard: the row is read whole
  double beta, skew;
  Coef cf;
};

// The tail buckets' floor, fastkd.reference.sparse.TAIL_FLOOR (its docstring says why): a tail
// mass below 2^-20 reads as 2^-20 on either side.
constexpr double kTailFloor = 0x1p-20;

// The tail bucket (teacher mass p_t = 1 - sum p_i, student mass q_t outside the k entries) added to
// D and H, and gamma of the contract: r = h_t / q~ with the floored masses, H += r q_t (the floored
// student tail moves with q_t), gamma = r - H. Per row, in float64.
inline void bucket_tail(int64_t div, double p_t, double q_t, const SParams& P, double& D, double& H, double& gamma) {
  // std::max(x, floor) is x < floor ? floor : x: a NaN mass stays NaN (do not swap the arguments)
  p_t = std::max(p_t, kTailFloor);
  const double qf = std::max(q_t, kTailFloor);
  double ell_t, h_t, k_t;
  terms_f64(div, qf, p_t, std::log(qf), std::log(p_t), P.beta, P.skew, ell_t, h_t, k_t);
  const double r = h_t / qf;
  D += ell_t;
  H += r * q_t;
  gamma = r - H;
}

using GatherFn = void (*)(const void*, const int64_t*, int64_t, float*, int64_t);

// The k logits row[ix[i]] as fp32, -inf padded to Kpad.
template <typename T>
void gather_row(const void* row_, const int64_t* ix, int64_t K, float* dst, int64_t Kpad) {
  const T* row = static_cast<const T*>(row_);
  for (int64_t i = 0; i < K; ++i) dst[i] = static_cast<float>(row[ix[i]]);
  for (int64_t i = K; i < Kpad; ++i) dst[i] = -kInf;
}

GatherFn pick_gather(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return &gather_row<float>;
    case at::kHalf: return &gather_row<c10::Half>;
    default: return &gather_row<c10::BFloat16>;
  }
}

struct SJob {
  SParams P;
  RowPtr s, gs;
  const int64_t* idx = nullptr;
  const char* vals = nullptr;
  int64_t ves = 0;  // values' element size
  const int64_t* labels = nullptr;
  int64_t l0 = 0, l1 = 0, ignore_index = 0;
  void* loss = nullptr;  // float, or double on the float64 path
  int64_t o0 = 0, o1 = 0;
  at::ScalarType ts, tv;
  LoadFn load_s = nullptr, load_v = nullptr;
  GatherFn gather_s = nullptr;
  StoreFn store_g = nullptr;
  std::atomic<int64_t>* bad_row = nullptr;  // the first row with an index outside [0, V)
};

inline bool indices_ok(const int64_t* ix, int64_t K, int64_t V) {
  bool ok = true;
  for (int64_t i = 0; i < K; ++i) ok &= (ix[i] >= 0) & (ix[i] < V);
  return ok;
}

inline void note_bad_row(std::atomic<int64_t>* bad, int64_t i) {
  int64_t cur = bad->load();
  while (i < cur && !bad->compare_exchange_weak(cur, i)) {
  }
}

// Counting sort of the k entries by block (idx >> 10): order[start[b] .. start[b + 1]) are the
// entries of block b.
inline void sort_by_block(const int64_t* ix, int64_t K, int64_t nblk, int64_t* start, int64_t* order) {
  std::fill(start, start + nblk + 1, 0);
  for (int64_t i = 0; i < K; ++i) ++start[(ix[i] / kBlock) + 1];
  for (int64_t b = 0; b < nblk; ++b) start[b + 1] += start[b];
  for (int64_t i = 0; i < K; ++i) order[start[ix[i] / kBlock]++] = i;
  for (int64_t b = nblk; b > 0; --b) start[b] = start[b - 1];  // undo the bumps: start[b] again
  start[0] = 0;
}

// Software prefetch of block b of a row (a no-op past the row's end): pass 1 reads kAhead blocks
// ahead of its work, and pass 3 fetches the next row's first kAhead blocks.
constexpr int64_t kAhead = 2;
inline void prefetch_block(const char* row, int64_t b, int64_t V, int64_t es) {
#if defined(__GNUC__)
  const int64_t lo = b * kBlock * es, hi = std::min(V, (b + 1) * kBlock) * es;
  for (int64_t o = lo; o < hi; o += 64) __builtin_prefetch(row + o, 0, 3);
#endif
}

struct SScratch {
  float *ea, *e1;      // exp((z - blockM) / T), exp(z - blockM) over the row, 0 at the teacher's entries
  float *blk, *stage;  // one block: pass 1 without a gradient, pass 3's staging
  float* blockM;       // the running maximum each block's exponentials are taken against
  float *zk, *vk, *xk, *x1, *xv, *hk;  // k-entry rows (Kpad each)
  int64_t *start, *order;
};

template <int DIV, int TAIL, bool GS>
void sparse_rows(const SJob& job, int64_t begin, int64_t end) {
  const SParams& P = job.P;
  const int64_t V = P.V, K = P.K, Kp = P.Kpad, nb = P.nblk, R = job.s.R;
  const int64_t Vrow = nb * kBlock;
  const bool full_ea = GS && P.ca, full_e1 = GS && P.c1;
  const size_t nfloat = (full_ea + full_e1) * Vrow + 2 * kBlock + nb + 6 * Kp + 2 * kW;
  const size_t nbytes = nfloat * sizeof(float) + sizeof(int64_t) + (nb + 1 + K) * sizeof(int64_t);
  std::unique_ptr<char, decltype(&std::free)> mem(static_cast<char*>(std::aligned_alloc(64, (nbytes + 63) / 64 * 64)),
                                                  &std::free);
  TORCH_CHECK(mem, "fastkd::sparse_kd_fwd: out of memory for the scratch rows (V = ", V, ", k = ", K, ")");
  SScratch w;
  float* next = reinterpret_cast<float*>(mem.get());
  auto take = [&](bool want, int64_t n) { float* r = want ? next : nullptr; next += want ? n : 0; return r; };
  w.ea = take(full_ea, Vrow); w.e1 = take(full_e1, Vrow);
  w.blk = take(true, kBlock); w.stage = take(true, kBlock);
  w.zk = take(true, Kp); w.vk = take(true, Kp); w.xk = take(true, Kp); w.x1 = take(true, Kp);
  w.xv = take(true, Kp); w.hk = take(true, Kp);
  w.blockM = take(true, nb + 2 * kW);
  w.start = reinterpret_cast<int64_t*>((reinterpret_cast<uintptr_t>(next) + 7) & ~uintptr_t{7});
  w.order = w.start + nb + 1;

  const Vec vinvT(P.invT);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / R, r = i % R;
    float* loss = static_cast<float*>(job.loss) + b * job.o0 + r * job.o1;
    int64_t label = -1;
    if (job.labels) {
      label = job.labels[b * job.l0 + r * job.l1];
      if (label == job.ignore_index) {  // loss 0, gradient 0, inputs never read
        *loss = 0.f;
        if (GS) std::memset(job.gs.row(i), 0, V * job.gs.es);
        continue;
      }
    }
    const int64_t* ix = job.idx + i * K;
    if (!indices_ok(ix, K, V)) {
      note_bad_row(job.bad_row, i);
      continue;
    }
    const char* srow = job.s.row(i);
    const float mv = job.load_v(job.vals + i * K * job.ves, K, w.vk, Kp, 0.f, nullptr);
    if (P.pass1 || GS) sort_by_block(ix, K, nb, w.start, w.order);

    // ---- pass 1: the row, a block at a time ------------------------------------------------------
    float M = -kInf, zl = 0.f;
    double So_a = 0, So_1 = 0;  // sums of exp over the entries outside the teacher's support
    if (P.pass1) {
      Vec Ta(0.f), T1(0.f);
      for (int64_t bi = 0; bi < nb; ++bi) {
        const int64_t j0 = bi * kBlock, n = std::min(kBlock, V - j0), npad = (n + kW - 1) / kW * kW;
        float* xb = GS ? (P.ca ? w.ea : w.e1) + j0 : w.blk;
        prefetch_block(srow, bi + kAhead, V, job.s.es);
        const float bm = job.load_s(srow + j0 * job.s.es, n, xb, npad, 0.f, nullptr);
        if (P.hard && label >= j0 && label < j0 + n) zl = xb[label - j0];
        const int64_t t0 = w.start[bi], t1 = w.start[bi + 1];
        for (int64_t t = t0; t < t1; ++t) w.zk[w.order[t]] = xb[ix[w.order[t]] - j0];
        for (int64_t t = t0; t < t1; ++t) xb[ix[w.order[t]] - j0] = -kInf;
        if (std::isnan(bm)) {
          M = bm;
        } else if (bm > M) {  // rescale the sums to the new maximum (0 while they are empty)
          Ta = Ta * Vec(static_cast<float>(std::exp((static_cast<double>(M) - bm) * P.invT_d)));
          T1 = T1 * Vec(static_cast<float>(std::exp(static_cast<double>(M) - bm)));
          M = bm;
        }
        w.blockM[bi] = M;
        if (M == -kInf) {  // nothing but -inf so far: exponentials 0
          if (full_ea) std::fill(w.ea + j0, w.ea + j0 + npad, 0.f);
          if (full_e1) std::fill(w.e1 + j0, w.e1 + j0 + npad, 0.f);
          continue;
        }
        const Vec vM(M);
        Vec Ba(0.f), B1(0.f);
        for (int64_t j = 0; j < npad; j += kW) {
          const Vec d = Vec::loadu(xb + j) - vM;
          if (P.ca) {
            const Vec e = vexp(d * vinvT);
            if (full_ea) e.store(w.ea + j0 + j);
            Ba = Ba + e;
          }
          if (P.c1) {
            const Vec e = vexp(d);
            if (full_e1) e.store(w.e1 + j0 + j);
            B1 = B1 + e;
          }
        }
        Ta = Ta + Ba;
        T1 = T1 + B1;
      }
      So_a = hsum(Ta);
      So_1 = hsum(T1);
      for (int64_t t = K; t < Kp; ++t) w.zk[t] = -kInf;
    } else {
      job.gather_s(srow, ix, K, w.zk, Kp);
    }

    // ---- pass 2: the k entries -------------------------------------------------------------------
    // xk: exp of the student's bucket log-probability numerators (-> q), x1: exp(z - M) (-> q1),
    // xv: exp of the teacher's (renormalize).
    float mk = -kInf;
    if (!P.ca) {
      Vec m(-kInf);
      for (int64_t j = 0; j < Kp; j += kW) m = at::vec::maximum(m, Vec::loadu(w.zk + j));
      mk = hmax(m);
    }
    const Vec vM(M), vmk(mk), vmv(mv);
    DAcc Sin_a, Sin_1, Sk, Sv;
    for (int64_t j = 0; j < Kp; j += kW) {
      const Vec z = Vec::loadu(w.zk + j);
      if (P.ca) {
        const Vec e = vexp((z - vM) * vinvT);
        e.store(w.xk + j);
        Sin_a.add(e);
      } else {
        const Vec e = vexp((z - vmk) * vinvT);
        e.store(w.xk + j);
        Sk.add(e);
      }
      if (P.c1) {
        const Vec e = vexp(z - vM);
        e.store(w.x1 + j);
        Sin_1.add(e);
      }
      if constexpr (TAIL == kRenormalize) {
        const Vec e = vexp((Vec::loadu(w.vk + j) - vmv) * vinvT);
        e.store(w.xv + j);
        Sv.add(e);
      }
    }
    // log-normalizers of the bucket log-probabilities: lq = (z - zref) / T - lq0, lp = (v - mv) / T - lp0
    const double Sa = So_a + Sin_a.value();
    const double Sq = P.ca ? Sa : Sk.value();
    const double S1 = P.c1 ? So_1 + Sin_1.value() : Sa;
    const double Svd = TAIL == kRenormalize ? Sv.value() : 1.0;
    const Vec vzref(P.ca ? M : mk), vlq0(static_cast<float>(std::log(Sq))), viq(static_cast<float>(1.0 / Sq));
    const Vec vlp0(static_cast<float>(std::log(Svd))), vip(static_cast<float>(1.0 / Svd));
    const Vec viS1(static_cast<float>(1.0 / S1));
    DAcc E, H, SP;
    for (int64_t j = 0; j < Kp; j += kW) {
      const Vec z = Vec::loadu(w.zk + j), v = Vec::loadu(w.vk + j);
      const Vec lq = (z - vzref) * vinvT - vlq0, q = Vec::loadu(w.xk + j) * viq;
      Vec lp, p;
      if constexpr (TAIL == kRenormalize) {
        lp = (v - vmv) * vinvT - vlp0;
        p = Vec::loadu(w.xv + j) * vip;
      } else {
        lp = v;
        p = vexp(v);
        SP.add(p);
      }
      Vec ell, h, kk;
      terms<DIV>(q, p, lq, lp, P.cf, ell, h, kk);
      E.add(ell);
      H.add(h);
      q.store(w.xk + j);
      h.store(w.hk + j);
    }
    double D = E.value(), Hs = H.value(), gamma = 0.0;
    if constexpr (TAIL == kBucket) {
      bucket_tail(DIV, 1.0 - SP.value(), So_a / Sa, P, D, Hs, gamma);
    } else if (DIV == kForwardKL) {
      gamma = -Hs;
    } else if (std::isnan(Hs)) {
      gamma = Hs;  // 0 otherwise; NaN so that the dense part of a NaN row is NaN
    }
    double row = P.sw_scale * D;
    if (P.hard) row += P.hw * ((static_cast<double>(M) - zl) + std::log(S1));
    *loss = static_cast<float>(row);
    if constexpr (!GS) continue;

    // the teacher entries' full gradient: C (h_i - q_i H) (+ hw softmax(z)_i)
    const Split nH(-Hs);
    const Vec vC(static_cast<float>(P.C)), vhw(static_cast<float>(P.hw));
    for (int64_t j = 0; j < Kp; j += kW) {
      const Vec q = Vec::loadu(w.xk + j);
      Vec g = vC * fma1(q, nH.lo, fma1(q, nH.hi, Vec::loadu(w.hk + j)));
      if (P.hard) g = at::vec::fmadd(vhw, P.c1 ? Vec::loadu(w.x1 + j) * viS1 : q, g);
      g.store(w.hk + j);
    }

    // ---- pass 3: the dense gradient, block by block, and the teacher entries -----------------------
    const float* e1row = P.c1 ? w.e1 : w.ea;
    char* grow = job.gs.row(i);
    const char* nrow = i + 1 < end ? job.s.row(i + 1) : nullptr;
    // the dense part where it is known to be 0: 0, or NaN for a NaN row (gamma is NaN then)
    const float fill = std::isnan(gamma) ? static_cast<float>(gamma) : 0.f;
    const Vec vfill(fill);
    for (int64_t bi = 0; bi < nb; ++bi) {
      const int64_t j0 = bi * kBlock, n = std::min(kBlock, V - j0);
      const bool live = P.pass1 && w.blockM[bi] != -kInf;
      const double bM = live ? w.blockM[bi] : 0.0;
      const Vec va(live && P.ca ? static_cast<float>(P.C * gamma * std::exp((bM - M) * P.invT_d) / Sa) : fill);
      const Vec v1(live && P.hard ? static_cast<float>(P.hw * std::exp(P.c1 ? bM - M : (bM - M) * P.invT_d) / S1)
                                  : 0.f);
      for (int64_t j = 0; j < n; j += kW) {
        Vec g = vfill;
        if (P.ca) g = va * Vec::loadu(w.ea + j0 + j);
        if (P.hard) g = at::vec::fmadd(v1, Vec::loadu(e1row + j0 + j), g);
        g.store(w.stage + j);
      }
      for (int64_t t = w.start[bi]; t < w.start[bi + 1]; ++t) {
        const int64_t e = w.order[t];
        w.stage[ix[e] - j0] += w.hk[e];
      }
      if (P.hard && label >= j0 && label < j0 + n) w.stage[label - j0] -= static_cast<float>(P.hw);
      job.store_g(grow + j0 * job.gs.es, w.stage, n);
      if (nrow && bi < kAhead) prefetch_block(nrow, bi, V, job.s.es);
    }
  }
}

template <int DIV, int TAIL>
void run_sparse(const SJob& job, bool gs, int64_t N, int64_t grain) {
  auto go = [&](auto fn) {
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      fn(job, b, e);
      store_fence();
    });
  };
  if (gs) go(sparse_rows<DIV, TAIL, true>);
  else go(sparse_rows<DIV, TAIL, false>);
}

template <int DIV>
void run_sparse_div(const SJob& job, bool gs, int64_t N, int64_t grain, int64_t tail) {
  if (tail == kBucket) run_sparse<DIV, kBucket>(job, gs, N, grain);
  else run_sparse<DIV, kRenormalize>(job, gs, N, grain);
}

// ---------------------------------------------------------------------------------------------
// The float64 path (student or values float64): the same passes, scalar, in float64.
void sparse_rows_f64(const SJob& job, int64_t tail, int64_t div, int64_t begin, int64_t end) {
  const SParams& P = job.P;
  const int64_t V = P.V, K = P.K, R = job.s.R;
  constexpr double ninf = -std::numeric_limits<double>::infinity();
  F64Scratch mem(V + 6 * K, "fastkd::sparse_kd_fwd");
  double *x = mem.get(), *zk = x + V, *vk = zk + K, *lq = vk + K, *q = lq + K, *lp = q + K, *h = lp + K;
  const double T = 1.0 / P.invT_d;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / R, r = i % R;
    double* loss = static_cast<double*>(job.loss) + b * job.o0 + r * job.o1;
    int64_t label = -1;
    if (job.labels) {
      label = job.labels[b * job.l0 + r * job.l1];
      if (label == job.ignore_index) {
        *loss = 0.0;
        if (job.gs.base) std::memset(job.gs.row(i), 0, V * job.gs.es);
        continue;
      }
    }
    const int64_t* ix = job.idx + i * K;
    if (!indices_ok(ix, K, V)) {
      note_bad_row(job.bad_row, i);
      continue;
    }
    load_row_f64(job.s.row(i), job.ts, V, x);
    load_row_f64(job.vals + i * K * job.ves, job.tv, K, vk);
    double M = ninf;
    for (int64_t j = 0; j < V; ++j) M = std::max(M, x[j]);
    const double zl = P.hard ? x[label] : 0.0;
    for (int64_t t = 0; t < K; ++t) zk[t] = x[ix[t]];
    for (int64_t t = 0; t < K; ++t) x[ix[t]] = ninf;  // x: the entries outside the teacher's support
    double So_a = 0, So_1 = 0, Sin_a = 0, Sin_1 = 0;
    for (int64_t j = 0; j < V; ++j) {
      So_a += std::exp((x[j] - M) / T);
      So_1 += std::exp(x[j] - M);
    }
    for (int64_t t = 0; t < K; ++t) {
      Sin_a += std::exp((zk[t] - M) / T);
      Sin_1 += std::exp(zk[t] - M);
    }
    const double Sa = So_a + Sin_a, S1 = So_1 + Sin_1;
    // bucket log-probabilities
    double mk = ninf, mv = ninf, Sk = 0, Sv = 0, SP = 0;
    for (int64_t t = 0; t < K; ++t) { mk = std::max(mk, zk[t]); mv = std::max(mv, vk[t]); }
    for (int64_t t = 0; t < K; ++t) { Sk += std::exp((zk[t] - mk) / T); Sv += std::exp((vk[t] - mv) / T); }
    const bool full = tail == kBucket || div == kForwardKL;  // the student normalized over the full V
    for (int64_t t = 0; t < K; ++t) {
      lq[t] = full ? (zk[t] - M) / T - std::log(Sa) : (zk[t] - mk) / T - std::log(Sk);
      lp[t] = tail == kBucket ? vk[t] : (vk[t] - mv) / T - std::log(Sv);
      q[t] = std::exp(lq[t]);
    }
    double D = 0, H = 0, gamma = 0;
    for (int64_t t = 0; t < K; ++t) {
      const double p = std::exp(lp[t]);
      double ell, kk;
      terms_f64(div, q[t], p, lq[t], lp[t], P.beta, P.skew, ell, h[t], kk);
      D += ell;
      H += h[t];
      SP += p;
    }
    if (tail == kBucket) {
      bucket_tail(div, 1.0 - SP, So_a / Sa, P, D, H, gamma);
    } else if (div == kForwardKL) {
      gamma = -H;
    } else if (std::isnan(H)) {
      gamma = H;  // 0 otherwise; NaN so that the dense part of a NaN row is NaN
    }
    *loss = P.sw_scale * D + (P.hard ? P.hw * ((M - zl) + std::log(S1)) : 0.0);
    if (!job.gs.base) continue;
    // the gradient, built in x: dense part, then the teacher entries, then the label
    for (int64_t j = 0; j < V; ++j) {
      double g = full ? P.C * gamma * (std::exp((x[j] - M) / T) / Sa) : gamma;  // (gamma: 0 or NaN)
      if (P.hard) g += P.hw * (std::exp(x[j] - M) / S1);
      x[j] = g;
    }
    for (int64_t t = 0; t < K; ++t) {
      double g = P.C * (h[t] - q[t] * H);
      if (P.hard) g += P.hw * (std::exp(zk[t] - M) / S1);
      x[ix[t]] += g;
    }
    if (P.hard) x[label] -= P.hw;
    store_row_f64(job.gs.row(i), job.ts, x, V);
  }
}

// ---------------------------------------------------------------------------------------------
void sparse_kd_fwd_cpu(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& values,
                       const std::optional<at::Tensor>& labels, const at::Tensor& loss,
                       const std::optional<at::Tensor>& grad_student, int64_t divergence, double temperature,
                       double beta, double skew, int64_t tail, int64_t ignore_index, double soft_weight,
                       double hard_weight, bool scale_temperature) {
  constexpr const char* op = "fastkd::sparse_kd_fwd: ";
  const checks::SparseShape sh =
      checks::check_sparse_kd_args(student, indices, values, labels, loss, grad_student, divergence, temperature,
                                   beta, skew, tail, ignore_index, hard_weight, c10::DeviceType::CPU);
  const int64_t V = sh.V, K = sh.K, N = sh.N;
  const bool wide = sh.wide;
  const at::ScalarType ts = student.scalar_type(), tv = values.scalar_type();
  const bool hard = hard_weight != 0.0;
  const int64_t* lab = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  const int64_t l0 = labels.has_value() ? labels->stride(0) : 0, l1 = labels.has_value() ? labels->stride(1) : 0;
  if (N == 0) return;

  SJob job;
  SParams& P = job.P;
  P.V = V;
  P.K = K;
  P.Kpad = (K + kW - 1) / kW * kW;
  P.nblk = (V + kBlock - 1) / kBlock;
  P.invT = static_cast<float>(1.0 / temperature);
  P.invT_d = 1.0 / temperature;
  const double scale = scale_temperature ? temperature * temperature : 1.0;
  P.C = soft_weight * scale / temperature;
  P.sw_scale = soft_weight * scale;
  P.hw = hard_weight;
  P.hard = hard;
  P.t_is_one = temperature == 1.0;
  P.ca = tail == kBucket || divergence == kForwardKL;
  P.c1 = hard && !(P.ca && P.t_is_one);
  P.pass1 = P.ca || hard;
  P.beta = beta;
  P.skew = skew;
  P.cf = make_coef(divergence, beta, skew);
  job.s = RowPtr(student);
  job.idx = indices.data_ptr<int64_t>();
  job.vals = static_cast<const char*>(values.data_ptr());
  job.ves = values.element_size();
  job.labels = lab;
  job.l0 = l0;
  job.l1 = l1;
  job.ignore_index = ignore_index;
  job.loss = loss.data_ptr();
  job.o0 = loss.stride(0);
  job.o1 = loss.stride(1);
  job.ts = ts;
  job.tv = tv;
  std::atomic<int64_t> bad_row{N};
  job.bad_row = &bad_row;
  const bool gs = grad_student.has_value();
  if (gs) job.gs = RowPtr(*grad_student);
  // Enough rows per task that a thread gets at least ~64K entries of work.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (V + K));

  if (wide) {
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) { sparse_rows_f64(job, tail, divergence, b, e); });
  } else {
    job.load_s = pick_load(ts);
    job.load_v = pick_load(tv);
    job.gather_s = pick_gather(ts);
    // Gradients larger than this are written with non-temporal stores (see store_row).
    if (gs) job.store_g = pick_store(ts, N * V * student.element_size() >= (int64_t{32} << 20));
    switch (divergence) {
      case kForwardKL: run_sparse_div<kForwardKL>(job, gs, N, grain, tail); break;
      case kReverseKL: run_sparse_div<kReverseKL>(job, gs, N, grain, tail); break;
      case kJSD: run_sparse_div<kJSD>(job, gs, N, grain, tail); break;
      case kSkewForwardKL: run_sparse_div<kSkewForwardKL>(job, gs, N, grain, tail); break;
      case kSkewReverseKL: run_sparse_div<kSkewReverseKL>(job, gs, N, grain, tail); break;
      default: run_sparse_div<kTVD>(job, gs, N, grain, tail); break;
    }
  }
  const int64_t bad = bad_row.load();
  if (bad < N) {
    const int64_t* ix = indices.data_ptr<int64_t>() + bad * K;
    int64_t t = 0;
    while (t < K && ix[t] >= 0 && ix[t] < V) ++t;
    TORCH_CHECK(false, op, "index ", ix[t], " at row ", bad, " is out of range for a vocabulary of ", V);
  }
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("sparse_kd_fwd", &fastkd::sparse_kd_fwd_cpu); }
