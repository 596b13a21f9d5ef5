// relational families, CPU: fastkd::rkd_distance_fwd, fastkd::rkd_angle_fwd and
// fastkd::similarity_preserving_fwd. The math, symbols and edge cases are those of
// fastkd/reference/relational.py (its docstring is the contract); this file only says how.
//
// No N x N (or N^3) buffer ever exists. Gram values come a strip of rows at a time from BLAS
// (at::mm_out, the one part that is compute-bound) and every elementwise step (distances,
// smooth-L1, normalizations, reductions, gradient weights) is fused into one vectorized pass
// over the strip while it is in cache. Extra memory: the centred working-precision copies of
// the embeddings (N D each), strips of kStrip (distance, similarity) or <= kAngleBlock (angle,
// per thread) rows, and O(N) vectors; the gradient is accumulated in grad_student itself
// when it has the working dtype (a temporary otherwise).
//
// * distance and similarity-preserving use the symmetry of their matrices: strip [m0, m0+B)
//   holds the pairs (i, j) with j >= i only, and its gradient weights are applied to both
//   ends of each pair (grad_M += W X_{j>=m0}, grad_{j>=m0} += W^T X_M), so every Gram entry
//   is computed once per pass.
// * distance: pass 0 finds the means, pass 1 the loss and c = sum g_ij y_ij / (N (N-1)), and
//   pass 2 (gradient only) the weights 2 (g_ij - c) / (mu d_ij). Same FLOPs as accumulating
//   sum g/d (x_i - x_j) and sum 1/d (x_i - x_j) in two passes and combining them with c at
//   the end, one N x D accumulator fewer.
// * similarity-preserving: pass 0 the row norms |G_i|^2, |Gt_i|^2, G_i . Gt_i, pass 1 the loss
//   and the gradient (Z + Z^T) X with weights (v_i + v_j) G_ij - (w_i + w_j) Gt_ij.
// * angle: a block of anchor rows M per task; for each block K the three sweeps over the
//   third index give the loss and the N x N gradient weights W_mk of the contract (P, q, t),
//   one strip of W at a time, then grad_M = W_M X - rowsum(W_M) X_M.
// * Squared distances come from the Gram identity |x_i|^2 + |x_j|^2 - 2 x_i.x_j on centred
//   rows; a pair whose value is within rounding of 0 (r <= kRefine (|x_i|^2 + |x_j|^2)) is
//   recomputed exactly from the difference, so duplicated rows give exactly 0.
// Arithmetic is float32 (float64 when an input is float64); results are deterministic for a
// given thread count (fixed-order reductions; BLAS as configured).

#include "cpu_capability.h"  // first: it selects at::vec's ISA

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace fastkd {
namespace {

constexpr int64_t kStrip = 64;       // rows per Gram strip (distance, similarity)
constexpr int64_t kAngleBlock = 64;  // anchor rows per angle task (fewer when threads would idle)
constexpr double kRefine = 1.0 / 64; // relative threshold below which r_ij is recomputed exactly
constexpr double kSpEps = 1e-12;     // F.normalize's eps (similarity-preserving)

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline T hsum(const Vec<T>& v) {  // fixed order
  __at_align__ T t[Vec<T>::size()];
  v.store(t);
  T s = 0;
  for (int64_t i = 0; i < Vec<T>::size(); ++i) s += t[i];
  return s;
}

// Lanes [0, n) set (all bits), the rest 0.
template <typename T>
inline Vec<T> lanes_below(int64_t n) {
  return Vec<T>::arange(T(0), T(1)) < Vec<T>(static_cast<T>(n));
}

// smooth-L1 with beta = delta (delta = 0: L1)
template <typename T>
struct Huber {
  T delta, inv, half;
  bool l1;
  explicit Huber(double d)
      : delta(static_cast<T>(d)), inv(d > 0 ? static_cast<T>(1.0 / d) : T(0)), half(static_cast<T>(0.5 * d)),
        l1(d == 0.0) {}
  inline Vec<T> h(const Vec<T>& z) const {
    const Vec<T> az = z.abs();
    if (l1) return az;
    const Vec<T> quad = Vec<T>(T(0.5) * inv) * z * z;
    return Vec<T>::blendv(az - Vec<T>(half), quad, az < Vec<T>(delta));
  }
  inline Vec<T> dh(const Vec<T>& z) const {
    if (l1) {
      const Vec<T> one(1);
      return (one & (z > Vec<T>(0))) - (one & (z < Vec<T>(0)));
    }
    return at::vec::clamp(z * Vec<T>(inv), Vec<T>(-1), Vec<T>(1));
  }
};

// One side's embeddings in the working precision: x [N, D] contiguous (centred when asked;
// distances and angles do not change; no copy when neither is needed) and sq_i = |x_i|^2.
template <typename T>
struct Side {
  at::Tensor x, sq;
  const T* px;
  const T* psq;
  int64_t N, D;
  Side(const at::Tensor& in, at::ScalarType acc, bool centre) {
    x = in.to(acc);
    if (centre) x = x - x.mean(0, /*keepdim=*/true);
    x = x.contiguous();
    N = x.size(0);
    D = x.size(1);
    sq = at::linalg_vector_norm(x, 2, {1}).square_().contiguous();  // no N x D temporary
    px = x.data_ptr<T>();
    psq = sq.data_ptr<T>();
  }
  const T* row(int64_t i) const { return px + i * D; }
};

template <typename T>
T exact_sq_dist(const T* a, const T* b, int64_t D) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> acc(0);
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    const Vec<T> v = Vec<T>::loadu(a + d) - Vec<T>::loadu(b + d);
    acc = at::vec::fmadd(v, v, acc);
  }
  if (d < D) {
    const Vec<T> v = Vec<T>::loadu(a + d, D - d) - Vec<T>::loadu(b + d, D - d);
    acc = at::vec::fmadd(v, v, acc);
  }
  return hsum(acc);
}

// r[c] = r_{i, col0 + c} for columns j in [j0, j1), from the Gram row g (g[c] = G_{i, col0+c}).
template <typename T>
void sq_dist_row(const Side<T>& s, int64_t i, const T* g, int64_t col0, int64_t j0, int64_t j1, T* r) {
  constexpr int64_t W = Vec<T>::size();
  const T sqi = s.psq[i];
  const Vec<T> vsqi(sqi), two(2), tau(static_cast<T>(kRefine));
  for (int64_t j = j0; j < j1; j += W) {
    const int64_t n = std::min<int64_t>(W, j1 - j);
    const Vec<T> sqj = Vec<T>::loadu(s.psq + j, n);
    const Vec<T> rv = vsqi + sqj - two * Vec<T>::loadu(g + (j - col0), n);
    rv.store(r + (j - col0), n);
    const Vec<T> near = (rv <= tau * (vsqi + sqj)) & lanes_below<T>(n);
    if (near.zero_mask() != (1 << W) - 1) {  // some pair within rounding of 0: exact
      for (int64_t l = 0; l < n; ++l) {
        const int64_t jj = j + l;
        if (r[jj - col0] <= static_cast<T>(kRefine) * (sqi + s.psq[jj]))
          r[jj - col0] = exact_sq_dist(s.row(i), s.row(jj), s.D);
      }
    }
  }
}

at::Tensor strip_view(at::Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

// G[m0:m0+rows, c0:N] = X[m0:m0+rows] X[c0:N]^T into buf
at::Tensor gram_strip(const at::Tensor& x, int64_t m0, int64_t rows, int64_t c0, at::Tensor& buf) {
  at::Tensor out = strip_view(buf, rows, x.size(0) - c0);
  at::mm_out(out, x.narrow(0, m0, rows), x.narrow(0, c0, x.size(0) - c0).t());
  return out;
}

at::ScalarType acc_type(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

// ---------------------------------------------------------------------------------------------
// The gradient accumulator: grad_student itself when it already has the working dtype and is
// contiguous (no extra N x D buffer), else a working-precision temporary copied out at the end.
at::Tensor grad_accumulator(const std::optional<at::Tensor>& grad, at::ScalarType acc, int64_t N, int64_t D) {
  const at::Tensor& g = *grad;
  if (g.scalar_type() == acc && g.is_contiguous()) return g.zero_();
  return at::zeros({N, D}, at::TensorOptions().dtype(acc));
}

// ---------------------------------------------------------------------------------------------
// RKD distance. Pass 0: the means; pass 1: the loss and c; pass 2 (gradient only): the weights
// W_ij = 2 (g_ij - c) [r_ij >= eps] / (mu d_ij) of the pairs, applied at both ends.
template <typename T>
void rkd_distance_impl(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& loss,
                       const std::optional<at::Tensor>& grad, double eps, double delta) {
  constexpr int64_t W = Vec<T>::size();
  const at::ScalarType acc = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
  const bool want = grad.has_value();
  const Side<T> S(student, acc, true), Tt(teacher, acc, true);
  const int64_t N = S.N;
  const auto opt = at::TensorOptions().dtype(acc);
  const int64_t B = std::min(kStrip, N);
  // pass 2 writes the weights W of a strip over its student Gram values (each row is turned
  // into squared distances first)
  at::Tensor gs_buf = at::empty({B * N}, opt), gt_buf = at::empty({B * N}, opt);
  at::Tensor gacc, rs;  // sum_j W_ij (x_i - x_j) = rs_i x_i + gacc_i
  T* prs = nullptr;
  if (want) {
    gacc = grad_accumulator(grad, acc, N, S.D);
    rs = at::zeros({N}, opt);
    prs = rs.data_ptr<T>();
  }
  const Vec<T> veps(static_cast<T>(eps)), zero(0), one(1);
  const Huber<T> hub(delta);
  std::vector<double> sum_s(N, 0.0), sum_t(N, 0.0), loss_row(N, 0.0), c_row(N, 0.0);
  double inv_mu_s = 0, inv_mu_t = 0, c = 0;
  const double pairs = static_cast<double>(N) * (N - 1);
  const T invN2 = static_cast<T>(1.0 / (static_cast<double>(N) * N));

  for (int pass = 0; pass < (want ? 3 : 2); ++pass) {
    for (int64_t m0 = 0; m0 < N; m0 += B) {
      const int64_t rows = std::min(B, N - m0), cols = N - m0;
      const at::Tensor Gs = gram_strip(S.x, m0, rows, m0, gs_buf);
      const at::Tensor Gt = gram_strip(Tt.x, m0, rows, m0, gt_buf);
      const T* gs = Gs.data_ptr<T>();
      const T* gt = Gt.data_ptr<T>();
      T* w = pass == 2 ? Gs.data_ptr<T>() : nullptr;
      const Vec<T> vims(static_cast<T>(inv_mu_s)), vimt(static_cast<T>(inv_mu_t));
      const Vec<T> vc(static_cast<T>(c)), coef(static_cast<T>(2.0 * inv_mu_s));
      at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
        std::vector<T> rbs(cols), rbt(cols);
        for (int64_t ii = r0; ii < r1; ++ii) {
          const int64_t i = m0 + ii, c1 = ii + 1;  // columns c >= c1 are the pairs j > i
          T* wrow = w ? w + ii * cols : nullptr;
          if (wrow) std::fill(wrow, wrow + std::min(c1, cols), T(0));
          if (i + 1 >= N) continue;
          sq_dist_row(S, i, gs + ii * cols, m0, i + 1, N, rbs.data());
          sq_dist_row(Tt, i, gt + ii * cols, m0, i + 1, N, rbt.data());
          Vec<T> a1(0), a2(0);
          for (int64_t cc = c1; cc < cols; cc += W) {
            const int64_t n = std::min<int64_t>(W, cols - cc);
            const Vec<T> lanes = lanes_below<T>(n);
            const Vec<T> r_s = Vec<T>::loadu(rbs.data() + cc, n);
            const Vec<T> d_s = at::vec::maximum(r_s, veps).sqrt();
            const Vec<T> d_t = at::vec::maximum(Vec<T>::loadu(rbt.data() + cc, n), veps).sqrt();
            if (pass == 0) {
              a1 += d_s & lanes;
              a2 += d_t & lanes;
              continue;
            }
            const Vec<T> y = d_s * vims, z = y - d_t * vimt;
            const Vec<T> g = hub.dh(z) * Vec<T>(invN2);
            if (pass == 1) {
              a1 += hub.h(z) & lanes;
              a2 += (g * y) & lanes;
            } else {
              const Vec<T> wv = Vec<T>::blendv(zero, coef * (g - vc) / d_s, r_s >= veps) & lanes;
              wv.store(wrow + cc, n);
              a1 += wv;
            }
          }
          if (pass == 0) {
            sum_s[i] = hsum(a1);
            sum_t[i] = hsum(a2);
          } else if (pass == 1) {
            loss_row[i] = 2.0 * hsum(a1);  // pairs (i, j) and (j, i)
            c_row[i] = 2.0 * hsum(a2);
          } else {
            prs[i] += hsum(a1);  // row sums; column sums below
          }
        }
      });
      if (pass == 2) {
        gacc.narrow(0, m0, rows).addmm_(Gs, S.x.narrow(0, m0, cols), 1, -1);
        gacc.narrow(0, m0, cols).addmm_(Gs.t(), S.x.narrow(0, m0, rows), 1, -1);
        rs.narrow(0, m0, cols).add_(Gs.sum(0));
      }
    }
    if (pass == 0) {
      double ts = 0, tt = 0;
      for (int64_t i = 0; i < N; ++i) ts += sum_s[i], tt += sum_t[i];
      inv_mu_s = pairs / (2.0 * ts);
      inv_mu_t = pairs / (2.0 * tt);
    } else if (pass == 1) {
      double total = 0, csum = 0;
      for (int64_t i = 0; i < N; ++i) total += loss_row[i], csum += c_row[i];
      loss.fill_(total / (static_cast<double>(N) * N));
      c = csum / pairs;
    }
  }
  if (want) {
    gacc.addcmul_(rs.unsqueeze(1), S.x);
    if (!gacc.is_same(*grad)) grad->copy_(gacc);
  }
}

// ---------------------------------------------------------------------------------------------
// Similarity-preserving
template <typename T>
void sp_impl(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& loss,
             const std::optional<at::Tensor>& grad) {
  constexpr int64_t W = Vec<T>::size();
  const at::ScalarType acc = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
  const Side<T> S(student, acc, false), Tt(teacher, acc, false);
  const int64_t N = S.N;
  const bool want = grad.has_value();
  const auto opt = at::TensorOptions().dtype(acc);
  const int64_t B = std::min(kStrip, N);
  // the gradient weights Y of a strip overwrite its student Gram values, entry by entry
  at::Tensor gs_buf = at::empty({B * N}, opt), gt_buf = at::empty({B * N}, opt), gacc;
  if (want) gacc = grad_accumulator(grad, acc, N, S.D);
  // pass 1: ss_i = |Gs_i|^2, tt_i = |Gt_i|^2, st_i = Gs_i . Gt_i (row parts, then column parts)
  std::vector<double> ss(N, 0.0), tt(N, 0.0), st(N, 0.0);
  std::vector<T> inv_n(N), inv_m(N), vv(N), ww(N);
  std::vector<double> loss_row(N, 0.0);
  const double invN2 = 1.0 / (static_cast<double>(N) * N);
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t m0 = 0; m0 < N; m0 += B) {
      const int64_t rows = std::min(B, N - m0), cols = N - m0;
      const at::Tensor Gs = gram_strip(S.x, m0, rows, m0, gs_buf);
      const at::Tensor Gt = gram_strip(Tt.x, m0, rows, m0, gt_buf);
      const T* gs = Gs.data_ptr<T>();
      const T* gt = Gt.data_ptr<T>();
      if (pass == 0) {
        at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {  // row parts: j >= i
          for (int64_t ii = r0; ii < r1; ++ii) {
            Vec<T> a(0), b(0), c(0);
            for (int64_t cc = ii; cc < cols; cc += W) {
              const int64_t n = std::min<int64_t>(W, cols - cc);
              const Vec<T> x = Vec<T>::loadu(gs + ii * cols + cc, n), y = Vec<T>::loadu(gt + ii * cols + cc, n);
              a = at::vec::fmadd(x, x, a);
              b = at::vec::fmadd(y, y, b);
              c = at::vec::fmadd(x, y, c);
            }
            ss[m0 + ii] += hsum(a);
            tt[m0 + ii] += hsum(b);
            st[m0 + ii] += hsum(c);
          }
        });
        // column parts: j > i, each thread owns a range of columns
        at::parallel_for(0, (cols + W - 1) / W, 4, [&](int64_t v0, int64_t v1) {
          for (int64_t cv = v0; cv < v1; ++cv) {
            const int64_t cc = cv * W, n = std::min<int64_t>(W, cols - cc);
            Vec<T> a(0), b(0), c(0);
            const Vec<T> col = Vec<T>::arange(static_cast<T>(cc), T(1));
            for (int64_t ii = 0; ii < std::min(rows, cc + n); ++ii) {
              const Vec<T> keep = col > Vec<T>(static_cast<T>(ii));
              const Vec<T> x = Vec<T>::loadu(gs + ii * cols + cc, n) & keep;
              const Vec<T> y = Vec<T>::loadu(gt + ii * cols + cc, n) & keep;
              a = at::vec::fmadd(x, x, a);
              b = at::vec::fmadd(y, y, b);
              c = at::vec::fmadd(x, y, c);
            }
            __at_align__ T ta[W], tb[W], tc[W];
            a.store(ta), b.store(tb), c.store(tc);
            for (int64_t l = 0; l < n; ++l) {
              ss[m0 + cc + l] += ta[l];
              tt[m0 + cc + l] += tb[l];
              st[m0 + cc + l] += tc[l];
            }
          }
        });
        continue;
      }
      T* y = want ? Gs.data_ptr<T>() : nullptr;
      at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
        for (int64_t ii = r0; ii < r1; ++ii) {
          const int64_t i = m0 + ii;
          const T* gsr = gs + ii * cols;
          const T* gtr = gt + ii * cols;
          const T* in = inv_n.data() + m0;  // indexed by column
          const T* im = inv_m.data() + m0;
          // diagonal: the pair (i, i) once
          const T dd = gsr[ii] * inv_n[i] - gtr[ii] * inv_m[i];
          double row = static_cast<double>(dd) * dd;
          T* yr = want ? y + ii * cols : nullptr;  // == gsr: each entry is read, then replaced
          if (want) {
            yr[ii] = vv[i] * gsr[ii] - ww[i] * gtr[ii];  // half of (Z + Z^T)_ii: both ends apply it
            std::fill(yr, yr + ii, T(0));
          }
          const Vec<T> ini(inv_n[i]), imi(inv_m[i]), vi(vv[i]), wi(ww[i]);
          Vec<T> a(0);
          for (int64_t c = ii + 1; c < cols; c += W) {
            const int64_t n = std::min<int64_t>(W, cols - c);
            const Vec<T> x = Vec<T>::loadu(gsr + c, n), z = Vec<T>::loadu(gtr + c, n);
            const Vec<T> e1 = x * ini - z * imi;
            const Vec<T> e2 = x * Vec<T>::loadu(in + c, n) - z * Vec<T>::loadu(im + c, n);
            a = at::vec::fmadd(e1, e1, a);
            a = at::vec::fmadd(e2, e2, a);  // zero-filled tail lanes add 0
            if (want)
              ((vi + Vec<T>::loadu(vv.data() + m0 + c, n)) * x - (wi + Vec<T>::loadu(ww.data() + m0 + c, n)) * z)
                  .store(yr + c, n);
          }
          loss_row[i] = row + hsum(a);
        }
      });
      if (want) {
        gacc.narrow(0, m0, rows).addmm_(Gs, S.x.narrow(0, m0, cols));
        gacc.narrow(0, m0, cols).addmm_(Gs.t(), S.x.narrow(0, m0, rows));
      }
    }
    if (pass == 0) {
      for (int64_t i = 0; i < N; ++i) {
        const double ns = std::sqrt(ss[i]), nt = std::sqrt(tt[i]);
        const double n = std::max(ns, kSpEps), m = std::max(nt, kSpEps);
        const double rho = 2.0 * invN2 * (ss[i] / (n * n) - st[i] / (n * m));
        inv_n[i] = static_cast<T>(1.0 / n);
        inv_m[i] = static_cast<T>(1.0 / m);
        vv[i] = static_cast<T>((2.0 * invN2 - (ns >= kSpEps ? rho : 0.0)) / (n * n));
        ww[i] = static_cast<T>(2.0 * invN2 / (n * m));
      }
    }
  }
  double total = 0;
  for (int64_t i = 0; i < N; ++i) total += loss_row[i];
  loss.fill_(total * invN2);
  if (want && !gacc.is_same(*grad)) grad->copy_(gacc);
}

// ---------------------------------------------------------------------------------------------
// RKD angle
template <typename T>
struct AngleStrip {  // Gram rows G[b0:b0+rows, :] and inverse distances w of one side
  at::Tensor G, w;
  T* g;
  T* pw;
  AngleStrip(int64_t B, int64_t N, const at::TensorOptions& opt)
      : G(at::empty({B * N}, opt)), w(at::empty({B * N}, opt)), g(G.data_ptr<T>()), pw(w.data_ptr<T>()) {}
  void fill(const Side<T>& s, int64_t b0, int64_t rows) {
    const int64_t N = s.N;
    gram_strip(s.x, b0, rows, 0, G);
    constexpr int64_t W = Vec<T>::size();
    for (int64_t ii = 0; ii < rows; ++ii) {
      T* wr = pw + ii * N;
      sq_dist_row(s, b0 + ii, g + ii * N, 0, 0, N, wr);
      for (int64_t j = 0; j < N; j += W) {  // w = 1/sqrt(r), 0 where r = 0 (equal rows, the diagonal)
        const int64_t n = std::min<int64_t>(W, N - j);
        const Vec<T> r = Vec<T>::loadu(wr + j, n);
        const Vec<T> pos = r > Vec<T>(0);
        (Vec<T>::blendv(Vec<T>(1), r, pos).rsqrt() & pos).store(wr + j, n);
      }
    }
  }
};

template <typename T>
void rkd_angle_impl(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& loss,
                    const std::optional<at::Tensor>& grad, double delta) {
  constexpr int64_t W = Vec<T>::size();
  const at::ScalarType acc = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
  const Side<T> S(student, acc, true), Tt(teacher, acc, true);
  const int64_t N = S.N;
  const bool want = grad.has_value();
  const auto opt = at::TensorOptions().dtype(acc);
  // Each task recomputes N x D x B strips per block of B rows (N^3 D / B in all): big blocks,
  // but at least two tasks per thread.
  const int64_t per_task = (N + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  const int64_t B = std::min({kAngleBlock, N, std::max<int64_t>(16, (per_task + 7) / 8 * 8)});
  const int64_t nb = (N + B - 1) / B;
  const Huber<T> hub(delta);
  const double invN3 = 1.0 / (static_cast<double>(N) * N * N);
  at::Tensor gacc = want ? at::empty({N, S.D}, opt) : at::Tensor();
  std::vector<double> loss_blk(nb, 0.0);

  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    AngleStrip<T> Ms(B, N, opt), Mt(B, N, opt), Ks(B, N, opt), Kt(B, N, opt);
    at::Tensor Wbuf = want ? at::empty({B, N}, opt) : at::Tensor();
    for (int64_t mb = b0; mb < b1; ++mb) {
      const int64_t m0 = mb * B, mr = std::min(B, N - m0);
      Ms.fill(S, m0, mr);
      Mt.fill(Tt, m0, mr);
      T* Wst = want ? Wbuf.data_ptr<T>() : nullptr;
      double lsum = 0;
      for (int64_t kb = 0; kb < nb; ++kb) {
        const int64_t k0 = kb * B, kr = std::min(B, N - k0);
        const AngleStrip<T>* ks = &Ms;
        const AngleStrip<T>* kt = &Mt;
        if (kb != mb) {
          Ks.fill(S, k0, kr);
          Kt.fill(Tt, k0, kr);
          ks = &Ks;
          kt = &Kt;
        }
        for (int64_t mi = 0; mi < mr; ++mi) {
          const int64_t m = m0 + mi;
          const T* gms = Ms.g + mi * N;  // G_m.  (student)
          const T* wms = Ms.pw + mi * N; // w_m.
          const T* gmt = Mt.g + mi * N;
          const T* wmt = Mt.pw + mi * N;
          Vec<T> lacc(0);
          for (int64_t ki = 0; ki < kr; ++ki) {
            const int64_t k = k0 + ki;
            const T* gks = ks->g + ki * N;
            const T* wks = ks->pw + ki * N;
            const T* gkt = kt->g + ki * N;
            const T* wkt = kt->pw + ki * N;
            const T wmk_s = wms[k], wmk_t = wmt[k], wkm_s = wks[m], wkm_t = wkt[m];
            // T1: triples (m, k, l): a = (G_kl - G_ml + sq_m - G_mk) w_mk w_ml
            Vec<T> q1(0), s1(0);
            if (wmk_s != T(0) || wmk_t != T(0)) {
              const Vec<T> cs(S.psq[m] - gms[k]), ct(Tt.psq[m] - gmt[k]), fs(wmk_s), ft(wmk_t);
              for (int64_t l = 0; l < N; l += W) {
                const int64_t n = std::min<int64_t>(W, N - l);  // zero-filled tails give a = 0 on both sides
                const Vec<T> wl = Vec<T>::loadu(wms + l, n);
                const Vec<T> as = (Vec<T>::loadu(gks + l, n) - Vec<T>::loadu(gms + l, n) + cs) * (fs * wl);
                const Vec<T> at_ = (Vec<T>::loadu(gkt + l, n) - Vec<T>::loadu(gmt + l, n) + ct) *
                                   (ft * Vec<T>::loadu(wmt + l, n));
                const Vec<T> z = as - at_;
                lacc += hub.h(z);
                if (want) {
                  const Vec<T> g = hub.dh(z);
                  q1 = at::vec::fmadd(g, wl, q1);
                  s1 = at::vec::fmadd(g, as, s1);
                }
              }
            }
            if (!want) continue;
            // T2: triples (k, m, l): a = (G_ml - G_kl + sq_k - G_km) w_km w_kl
            Vec<T> q2(0), s2(0);
            if (wkm_s != T(0) || wkm_t != T(0)) {
              const Vec<T> cs(S.psq[k] - gks[m]), ct(Tt.psq[k] - gkt[m]), fs(wkm_s), ft(wkm_t);
              for (int64_t l = 0; l < N; l += W) {
                const int64_t n = std::min<int64_t>(W, N - l);
                const Vec<T> wl = Vec<T>::loadu(wks + l, n);
                const Vec<T> as = (Vec<T>::loadu(gms + l, n) - Vec<T>::loadu(gks + l, n) + cs) * (fs * wl);
                const Vec<T> at_ = (Vec<T>::loadu(gmt + l, n) - Vec<T>::loadu(gkt + l, n) + ct) *
                                   (ft * Vec<T>::loadu(wkt + l, n));
                const Vec<T> g = hub.dh(as - at_);
                q2 = at::vec::fmadd(g, wl, q2);
                s2 = at::vec::fmadd(g, as, s2);
              }
            }
            // T3: triples (i, m, k): a = (G_mk - G_mi - G_ki + sq_i) w_mi w_ki
            Vec<T> p3(0);
            {
              const Vec<T> cs(gms[k]), ct(gmt[k]);
              for (int64_t l = 0; l < N; l += W) {
                const int64_t n = std::min<int64_t>(W, N - l);
                const Vec<T> ww = Vec<T>::loadu(wms + l, n) * Vec<T>::loadu(wks + l, n);
                const Vec<T> as = (cs - Vec<T>::loadu(gms + l, n) - Vec<T>::loadu(gks + l, n) +
                                   Vec<T>::loadu(S.psq + l, n)) * ww;
                const Vec<T> at_ = (ct - Vec<T>::loadu(gmt + l, n) - Vec<T>::loadu(gkt + l, n) +
                                    Vec<T>::loadu(Tt.psq + l, n)) *
                                   (Vec<T>::loadu(wmt + l, n) * Vec<T>::loadu(wkt + l, n));
                p3 = at::vec::fmadd(hub.dh(as - at_), ww, p3);
              }
            }
            // W_mk = P_mk - q_mk - q_km + t_mk + t_km, all with the factor 2/N^3
            const double wmk = wmk_s, wkm = wkm_s;
            const double Wmk = hsum(p3) - wmk * hsum(q1) - wkm * hsum(q2) + wmk * wmk * hsum(s1) +
                               wkm * wkm * hsum(s2);
            Wst[mi * N + k] = k == m ? T(0) : static_cast<T>(2.0 * invN3 * Wmk);
          }
          lsum += hsum(lacc);
        }
      }
      loss_blk[mb] = lsum;
      if (want) {  // grad_M = W_M X - rowsum(W_M) X_M
        const at::Tensor Wm = Wbuf.narrow(0, 0, mr);
        at::Tensor out = gacc.narrow(0, m0, mr);
        at::mm_out(out, Wm, S.x);
        out.sub_(Wm.sum(1, /*keepdim=*/true) * S.x.narrow(0, m0, mr));
      }
    }
  });
  double total = 0;
  for (int64_t b = 0; b < nb; ++b) total += loss_blk[b];
  loss.fill_(total * invN3);
  if (want) grad->copy_(gacc);
}

// ---------------------------------------------------------------------------------------------
bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Checks shared by the three ops; returns whether to run in float64.
bool check_inputs(const char* op, const at::Tensor& s, const at::Tensor& t, const at::Tensor& loss,
                  const std::optional<at::Tensor>& grad) {
  TORCH_CHECK(s.dim() == 2 && t.dim() == 2, "fastkd::", op, ": student and teacher must be 2-D [N, D], got ",
              s.sizes(), " and ", t.sizes());
  TORCH_CHECK(s.size(0) == t.size(0), "fastkd::", op, ": student and teacher must have the same N, got ",
              s.size(0), " and ", t.size(0));
  TORCH_CHECK(s.size(0) >= 2, "fastkd::", op, ": needs N >= 2 embeddings, got ", s.size(0));
  TORCH_CHECK(s.size(1) >= 1 && t.size(1) >= 1, "fastkd::", op, ": embeddings must be non-empty (D >= 1)");
  TORCH_CHECK(s.device().is_cpu() && t.device().is_cpu(), "fastkd::", op, ": student and teacher must be CPU tensors");
  TORCH_CHECK(is_float_type(s.scalar_type()) && is_float_type(t.scalar_type()), "fastkd::", op,
              ": student and teacher must be floating (float32, float16, bfloat16 or float64), got ",
              s.scalar_type(), " and ", t.scalar_type());
  const bool wide = s.scalar_type() == at::kDouble || t.scalar_type() == at::kDouble;
  TORCH_CHECK(loss.device().is_cpu() && loss.numel() == 1 &&
                  loss.scalar_type() == (wide ? at::kDouble : at::kFloat),
              "fastkd::", op, ": loss must be a one-element ", (wide ? "float64" : "float32"), " CPU tensor, got ",
              loss.scalar_type(), " ", loss.sizes());
  if (grad.has_value()) {
    const at::Tensor& g = *grad;
    TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == s.scalar_type() && g.sizes() == s.sizes(),
                "fastkd::", op, ": grad_student must be a CPU tensor with student's dtype and shape (",
                s.scalar_type(), " ", s.sizes(), "), got ", g.scalar_type(), " ", g.sizes());
  }
  return wide;
}

void rkd_distance_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& loss,
                          const std::optional<at::Tensor>& grad_student, double eps, double huber_delta) {
  const bool wide = check_inputs("rkd_distance_fwd", student, teacher, loss, grad_student);
  TORCH_CHECK(eps > 0.0 && std::isfinite(eps), "fastkd::rkd_distance_fwd: eps must be > 0, got ", eps);
  TORCH_CHECK(huber_delta >= 0.0 && std::isfinite(huber_delta),
              "fastkd::rkd_distance_fwd: huber_delta must be >= 0, got ", huber_delta);
  if (wide) rkd_distance_impl<double>(student, teacher, loss, grad_student, eps, huber_delta);
  else rkd_distance_impl<float>(student, teacher, loss, grad_student, eps, huber_delta);
}

void rkd_angle_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& loss,
                       const std::optional<at::Tensor>& grad_student, double huber_delta) {
  const bool wide = check_inputs("rkd_angle_fwd", student, teacher, loss, grad_student);
  TORCH_CHECK(huber_delta >= 0.0 && std::isfinite(huber_delta),
              "fastkd::rkd_angle_fwd: huber_delta must be >= 0, got ", huber_delta);
  if (wide) rkd_angle_impl<double>(student, teacher, loss, grad_student, huber_delta);
  else rkd_angle_impl<float>(student, teacher, loss, grad_student, huber_delta);
}

void similarity_preserving_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& loss,
                                   const std::optional<at::Tensor>& grad_student) {
  const bool wide = check_inputs("similarity_preserving_fwd", student, teacher, loss, grad_student);
  if (wide) sp_impl<double>(student, teacher, loss, grad_student);
  else sp_impl<float>(student, teacher, loss, grad_student);
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("rkd_distance_fwd", &fastkd::rkd_distance_fwd_cpu);
  m.impl("rkd_angle_fwd", &fastkd::rkd_angle_fwd_cpu);
  m.impl("similarity_preserving_fwd", &fastkd::similarity_preserving_fwd_cpu);
}
