// relational families, CPU: fastkd::rkd_distance_fwd, fastkd::rkd_angle_fwd and
// fastkd::similarity_preserving_fwd. The math, symbols and edge cases are those of
// fastkd/reference/relational.py (its docstring is the contract); this file only says how.
//
// No N x N (or N^3) buffer ever exists. Gram values come a tile at a time from BLAS (the one
// part that is compute-bound) and every elementwise step (distances, smooth-L1,
// normalizations, reductions, gradient weights) is fused into one vectorized pass over the
// tile while it is in cache. Extra memory: the centred working-precision copies of the
// embeddings (N D each; none for similarity when the input is already float32), two strips
// of kRows rows (distance, similarity) or <= kAngleBlock rows per thread (angle), tiles of
// kRows x kCols per thread, and O(N) vectors; the gradient is accumulated in grad_student
// itself when it has the working dtype (a temporary otherwise).
//
// * distance and similarity-preserving use the symmetry of their matrices: tile-row
//   [m0, m0 + kRows) holds the pairs (i, j) with j >= i only, cut into tiles of kCols
//   columns; gradient weights are applied to both ends of each pair (grad_J += W^T X_M by
//   the tile that owns columns J, grad_M += W X_{j>=m0} from the tile-row's strip), so every
//   Gram entry is computed once per sweep.
// * Threads take tiles from a shared counter, each with its own single-threaded GEMM (no
//   barrier inside a BLAS call, so load from other processes slows one thread, not all);
//   sweeps whose output is a few scalars have no barrier at all, gradient sweeps one per
//   tile-row (the strip's row contribution runs alongside the next tile-row's tiles).
// * distance: sweep 0 finds the means, sweep 1 the loss and c = sum g_ij y_ij / (N (N-1)),
//   and sweep 2 (gradient only) the weights 2 (g_ij - c) / (mu d_ij). Same FLOPs as
//   accumulating sum g/d (x_i - x_j) and sum 1/d (x_i - x_j) in two sweeps and combining them
//   with c at the end, one N x D accumulator fewer.
// * similarity-preserving: sweep 0 the row norms |G_i|^2, |Gt_i|^2, G_i . Gt_i, sweep 1 the
//   loss and the gradient (Z + Z^T) X with weights (v_i + v_j) G_ij - (w_i + w_j) Gt_ij.
// * angle: a block of anchor rows M per task; for each block K the three sweeps over the
//   third index give the loss and the N x N gradient weights W_mk of the contract (P, q, t),
//   one strip of W at a time, then grad_M = W_M X - rowsum(W_M) X_M.
// * Squared distances come from the Gram identity |x_i|^2 + |x_j|^2 - 2 x_i.x_j on centred
//   rows; a pair whose value is within rounding of 0 (r <= kRefine (|x_i|^2 + |x_j|^2)) is
//   recomputed exactly from the difference, so duplicated rows give exactly 0.
// Arithmetic is float32 (float64 when an input is float64). Results are bitwise
// reproducible: every task's output is the same whichever thread runs it, and partial sums
// are combined in a fixed order (tiles, runs and tasks depend on N and D only).

#include "cpu_capability.h"  // first: it selects at::vec's ISA

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace fastkd {
namespace {

constexpr int64_t kRows = 64;        // rows per tile-row (distance, similarity)
constexpr int64_t kCols = 128;       // columns per tile: one task, two Gram GEMMs of kRows x kCols x D
constexpr int64_t kDcols = 128;      // embedding columns per task of a strip's row contribution
constexpr int64_t kSegments = 64;    // runs of tiles in a scalar-only sweep (one partial sum each)
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
    x = in.detach().to(acc);
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
// Parallel sweeps. Each thread takes tasks from a shared counter and computes its Gram tiles
// with its own single-threaded BLAS call (inside at::parallel_for, BLAS does not spawn
// threads): no barrier inside a GEMM, so a thread slowed by other load delays nobody, and
// a task's result never depends on which thread ran it. Every reduction is over fixed
// slices in a fixed order, so results are bitwise reproducible (and independent of the
// thread count).
template <typename Scratch, typename MakeScratch, typename Fn>
void run_tasks(int64_t n, const MakeScratch& make, const Fn& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    // worker threads do not inherit the caller's grad mode: plain kernels, no autograd
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Scratch scratch = make();
    for (int64_t k; (k = next.fetch_add(1, std::memory_order_relaxed)) < n;) fn(k, scratch);
  });
}

// The upper triangle (j >= i) of an N x N matrix: tile-rows of kRows rows, each cut into
// tiles of kCols columns starting at its diagonal (tile-row I covers rows and the first
// columns [m0, m0 + rows), m0 = I kRows).
struct Upper {
  int64_t N, R, nrows;
  explicit Upper(int64_t n) : N(n), R(std::min(kRows, n)), nrows((n + R - 1) / R) {}
  int64_t m0(int64_t I) const { return I * R; }
  int64_t rows(int64_t I) const { return std::min(R, N - I * R); }
  int64_t tiles(int64_t I) const { return (N - I * R + kCols - 1) / kCols; }
  int64_t c0(int64_t I, int64_t k) const { return I * R + k * kCols; }
  int64_t width(int64_t I, int64_t k) const { return std::min(kCols, N - c0(I, k)); }
};

// out[rows, cols] (contiguous) = x[r0:r0+rows] x[c0:c0+cols]^T
template <typename T>
void gram_tile(const at::Tensor& x, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* out) {
  at::Tensor o = at::from_blob(out, {rows, cols}, x.options());
  at::mm_out(o, x.narrow(0, r0, rows), x.narrow(0, c0, cols).t());
}

// Per-thread scratch of the tile sweeps: the two Gram tiles and two rows of squared distances.
template <typename T>
struct TileScratch {
  std::unique_ptr<T[]> buf;
  T *gs, *gt, *rs, *rt, *out;
  TileScratch(int64_t R, int64_t D) {
    const int64_t tile = R * kCols, out_n = R * std::min(D, kDcols);
    buf.reset(new T[2 * tile + 2 * kCols + out_n]);
    gs = buf.get(), gt = gs + tile, rs = gt + tile, rt = rs + kCols, out = rt + kCols;
  }
};

// The tiles of a sweep in a fixed order, cut into at most kSegments runs of about equal work:
// a scalar-only sweep needs no barrier, one partial sum per run.
struct Segments {
  std::vector<std::pair<int64_t, int64_t>> begin;  // run s: tiles (I, k) from begin[s] to begin[s + 1]
  explicit Segments(const Upper& U) {
    double total = 0;
    for (int64_t I = 0; I < U.nrows; ++I) total += static_cast<double>(U.rows(I) * (U.N - U.m0(I)));
    double done = 0;
    for (int64_t I = 0; I < U.nrows; ++I)
      for (int64_t k = 0; k < U.tiles(I); ++k) {
        if (done >= total * static_cast<double>(begin.size()) / kSegments) begin.emplace_back(I, k);
        done += static_cast<double>(U.rows(I) * U.width(I, k));
      }
    begin.emplace_back(U.nrows, 0);
  }
  int64_t runs() const { return static_cast<int64_t>(begin.size()) - 1; }
  static void next(const Upper& U, int64_t& I, int64_t& k) {
    if (++k == U.tiles(I)) ++I, k = 0;
  }
};

// Row contribution of a finished strip: acc[p0:p0+rows] += sign * W x[p0:] with W the strip
// (rows x (N - p0), leading dimension N), D split into kDcols-column tasks (d = task index).
template <typename T>
void strip_times_x(const T* strip, int64_t rows, int64_t p0, const at::Tensor& x, at::Tensor& acc, int64_t d,
                   T sign, T* out) {
  const int64_t N = x.size(0), D = x.size(1), d0 = d * kDcols, dw = std::min(kDcols, D - d0);
  const at::Tensor w = at::from_blob(const_cast<T*>(strip), {rows, N - p0}, {N, 1}, x.options());
  at::Tensor o = at::from_blob(out, {rows, dw}, x.options());
  at::mm_out(o, w, x.narrow(0, p0, N - p0).narrow(1, d0, dw));
  T* a = acc.data_ptr<T>();
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> s(sign);
  for (int64_t r = 0; r < rows; ++r) {
    T* ar = a + (p0 + r) * D + d0;
    const T* orow = out + r * dw;
    for (int64_t c = 0; c < dw; c += W) {
      const int64_t n = std::min<int64_t>(W, dw - c);
      at::vec::fmadd(s, Vec<T>::loadu(orow + c, n), Vec<T>::loadu(ar + c, n)).store(ar + c, n);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// RKD distance. Sweep 0: the means; sweep 1: the loss and c (both scalar-only, in kSegments
// runs); sweep 2 (gradient only): the weights W_ij = 2 (g_ij - c) [r_ij >= eps] / (mu d_ij) of
// the pairs j > i, one tile-row at a time: each tile applies W^T to its rows' embeddings
// (columns' gradient, owned by the tile) and writes W into the strip, whose row contribution
// W X runs with the next tile-row's tiles.
template <typename T>
void rkd_distance_impl(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& loss,
                       const std::optional<at::Tensor>& grad, double eps, double delta) {
  constexpr int64_t W = Vec<T>::size();
  const at::ScalarType acc = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
  const bool want = grad.has_value();
  const Side<T> S(student, acc, true), Tt(teacher, acc, true);
  const int64_t N = S.N, D = S.D;
  const auto opt = at::TensorOptions().dtype(acc);
  const Upper U(N);
  const Vec<T> veps(static_cast<T>(eps)), zero(0);
  const Huber<T> hub(delta);
  const double pairs = static_cast<double>(N) * (N - 1);
  const T invN2 = static_cast<T>(1.0 / (static_cast<double>(N) * N));
  double inv_mu_s = 0, inv_mu_t = 0, c = 0;
  auto scratch = [&] { return TileScratch<T>(U.R, D); };

  // Squared distances of row ii of a tile (both sides) for the pairs j > i: rs/rt[cc] for the
  // columns cc in [lo, width); returns lo.
  auto tile_row = [&](TileScratch<T>& sc, int64_t I, int64_t k, int64_t ii) -> int64_t {
    const int64_t i = U.m0(I) + ii, c0 = U.c0(I, k), w = U.width(I, k);
    const int64_t lo = std::min(w, std::max<int64_t>(0, i + 1 - c0));
    if (lo < w) {
      sq_dist_row(S, i, sc.gs + ii * w, c0, c0 + lo, c0 + w, sc.rs);
      sq_dist_row(Tt, i, sc.gt + ii * w, c0, c0 + lo, c0 + w, sc.rt);
    }
    return lo;
  };
  auto grams = [&](TileScratch<T>& sc, int64_t I, int64_t k) {
    gram_tile(S.x, U.m0(I), U.rows(I), U.c0(I, k), U.width(I, k), sc.gs);
    gram_tile(Tt.x, U.m0(I), U.rows(I), U.c0(I, k), U.width(I, k), sc.gt);
  };

  // sweeps 0 and 1: (a1, a2) summed over the pairs j > i of every tile, then doubled
  const Segments seg(U);
  for (int pass = 0; pass < 2; ++pass) {
    std::vector<double> p1(seg.runs(), 0.0), p2(seg.runs(), 0.0);
    const Vec<T> vims(static_cast<T>(inv_mu_s)), vimt(static_cast<T>(inv_mu_t));
    run_tasks<TileScratch<T>>(seg.runs(), scratch, [&](int64_t s, TileScratch<T>& sc) {
      double t1 = 0, t2 = 0;
      int64_t I = seg.begin[s].first, k = seg.begin[s].second;
      for (; std::make_pair(I, k) != seg.begin[s + 1]; Segments::next(U, I, k)) {
        const int64_t w = U.width(I, k);
        grams(sc, I, k);
        for (int64_t ii = 0; ii < U.rows(I); ++ii) {
          const int64_t lo = tile_row(sc, I, k, ii);
          Vec<T> a1(0), a2(0);
          for (int64_t cc = lo; cc < w; cc += W) {
            const int64_t n = std::min<int64_t>(W, w - cc);
            const Vec<T> lanes = lanes_below<T>(n);
            const Vec<T> d_s = at::vec::maximum(Vec<T>::loadu(sc.rs + cc, n), veps).sqrt();
            const Vec<T> d_t = at::vec::maximum(Vec<T>::loadu(sc.rt + cc, n), veps).sqrt();
            if (pass == 0) {
              a1 += d_s & lanes;
              a2 += d_t & lanes;
            } else {
              const Vec<T> y = d_s * vims, z = y - d_t * vimt;
              a1 += hub.h(z) & lanes;
              a2 += (hub.dh(z) * y) & lanes;
            }
          }
          t1 += hsum(a1);
          t2 += hsum(a2);
        }
      }
      p1[s] = 2.0 * t1;  // pairs (i, j) and (j, i)
      p2[s] = 2.0 * t2;
    });
    double s1 = 0, s2 = 0;
    for (int64_t s = 0; s < seg.runs(); ++s) s1 += p1[s], s2 += p2[s];
    if (pass == 0) {
      inv_mu_s = pairs / s1;
      inv_mu_t = pairs / s2;
    } else {
      loss.fill_(s1 / (static_cast<double>(N) * N));
      c = s2 * invN2 / pairs;  // c = sum g y / (N (N - 1)), g = h' / N^2
    }
  }
  if (!want) return;

  // sweep 2: sum_j W_ij (x_i - x_j) = rs_i x_i - (W X)_i
  at::Tensor gacc = grad_accumulator(grad, acc, N, D);
  std::vector<T> rs(N, T(0));
  std::vector<T> strips(2 * U.R * N);
  const int64_t nd = (D + kDcols - 1) / kDcols;
  const Vec<T> vims(static_cast<T>(inv_mu_s)), vimt(static_cast<T>(inv_mu_t));
  const Vec<T> vc(static_cast<T>(c)), coef(static_cast<T>(2.0 * inv_mu_s));
  for (int64_t I = 0; I <= U.nrows; ++I) {
    const int64_t ndef = I > 0 ? nd : 0, ntile = I < U.nrows ? U.tiles(I) : 0;
    run_tasks<TileScratch<T>>(ndef + ntile, scratch, [&](int64_t task, TileScratch<T>& sc) {
      if (task < ndef) {  // the previous tile-row's row contribution (and its row sums)
        const int64_t P = I - 1, p0 = U.m0(P), pr = U.rows(P);
        const T* strip = strips.data() + (P & 1) * U.R * N;
        strip_times_x(strip, pr, p0, S.x, gacc, task, T(-1), sc.out);
        if (task == 0)
          for (int64_t r = 0; r < pr; ++r) {
            Vec<T> a(0);
            const T* sr = strip + r * N;
            for (int64_t cc = 0; cc < N - p0; cc += W) a += Vec<T>::loadu(sr + cc, std::min<int64_t>(W, N - p0 - cc));
            rs[p0 + r] += hsum(a);
          }
        return;
      }
      const int64_t k = task - ndef, m0 = U.m0(I), rows = U.rows(I), c0 = U.c0(I, k), w = U.width(I, k);
      T* strip = strips.data() + (I & 1) * U.R * N + (c0 - m0);
      grams(sc, I, k);
      T* wt = sc.gs;  // W overwrites the student Gram tile, row by row
      for (int64_t ii = 0; ii < rows; ++ii) {
        const int64_t lo = tile_row(sc, I, k, ii);
        T* wr = wt + ii * w;
        std::fill(wr, wr + lo, T(0));
        for (int64_t cc = lo; cc < w; cc += W) {
          const int64_t n = std::min<int64_t>(W, w - cc);
          const Vec<T> r_s = Vec<T>::loadu(sc.rs + cc, n);
          const Vec<T> d_s = at::vec::maximum(r_s, veps).sqrt();
          const Vec<T> d_t = at::vec::maximum(Vec<T>::loadu(sc.rt + cc, n), veps).sqrt();
          const Vec<T> y = d_s * vims, z = y - d_t * vimt;
          const Vec<T> g = hub.dh(z) * Vec<T>(invN2);
          Vec<T>::blendv(zero, coef * (g - vc) / d_s, r_s >= veps).store(wr + cc, n);
        }
        std::copy(wr, wr + w, strip + ii * N);
      }
      for (int64_t cc = 0; cc < w; cc += W) {  // column sums, rows in order
        const int64_t n = std::min<int64_t>(W, w - cc);
        Vec<T> a(0);
        for (int64_t ii = 0; ii < rows; ++ii) a += Vec<T>::loadu(wt + ii * w + cc, n);
        __at_align__ T tmp[W];
        a.store(tmp);
        for (int64_t l = 0; l < n; ++l) rs[c0 + cc + l] += tmp[l];
      }
      const at::Tensor wv = at::from_blob(wt, {rows, w}, opt);
      gacc.narrow(0, c0, w).addmm_(wv.t(), S.x.narrow(0, m0, rows), 1, -1);
    });
  }
  gacc.addcmul_(at::from_blob(rs.data(), {N, 1}, opt), S.x);
  if (!gacc.is_same(*grad)) grad->copy_(gacc);
}

// ---------------------------------------------------------------------------------------------
// Similarity-preserving. Sweep 0: the row sums |Gs_i|^2, |Gt_i|^2, Gs_i . Gt_i (each tile adds
// its column sums to the rows it owns and leaves its row sums, added in tile order after the
// tile-row). Sweep 1: the loss and the gradient (Z + Z^T) X with the symmetric weights
// Y_ij = (v_i + v_j) Gs_ij - (w_i + w_j) Gt_ij, in tile-rows like the distance's sweep 2.
template <typename T>
void sp_impl(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& loss,
             const std::optional<at::Tensor>& grad) {
  constexpr int64_t W = Vec<T>::size();
  const at::ScalarType acc = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
  const Side<T> S(student, acc, false), Tt(teacher, acc, false);
  const int64_t N = S.N, D = S.D;
  const bool want = grad.has_value();
  const auto opt = at::TensorOptions().dtype(acc);
  const Upper U(N);
  auto scratch = [&] { return TileScratch<T>(U.R, D); };
  auto grams = [&](TileScratch<T>& sc, int64_t I, int64_t k) {
    gram_tile(S.x, U.m0(I), U.rows(I), U.c0(I, k), U.width(I, k), sc.gs);
    gram_tile(Tt.x, U.m0(I), U.rows(I), U.c0(I, k), U.width(I, k), sc.gt);
  };
  const int64_t max_tiles = U.tiles(0);

  // sweep 0
  std::vector<double> ss(N, 0.0), tt(N, 0.0), st(N, 0.0);
  std::vector<double> part(max_tiles * U.R * 3);  // row sums of each tile of a tile-row
  for (int64_t I = 0; I < U.nrows; ++I) {
    const int64_t m0 = U.m0(I), rows = U.rows(I);
    run_tasks<TileScratch<T>>(U.tiles(I), scratch, [&](int64_t k, TileScratch<T>& sc) {
      const int64_t c0 = U.c0(I, k), w = U.width(I, k);
      grams(sc, I, k);
      const T* gs = sc.gs;
      const T* gt = sc.gt;
      for (int64_t ii = 0; ii < rows; ++ii) {  // row parts: j >= i
        const int64_t lo = std::max<int64_t>(0, m0 + ii - c0);
        Vec<T> a(0), b(0), e(0);
        for (int64_t cc = lo; cc < w; cc += W) {
          const int64_t n = std::min<int64_t>(W, w - cc);
          const Vec<T> x = Vec<T>::loadu(gs + ii * w + cc, n), y = Vec<T>::loadu(gt + ii * w + cc, n);
          a = at::vec::fmadd(x, x, a);
          b = at::vec::fmadd(y, y, b);
          e = at::vec::fmadd(x, y, e);
        }
        double* p = part.data() + (k * U.R + ii) * 3;
        p[0] = hsum(a), p[1] = hsum(b), p[2] = hsum(e);
      }
      for (int64_t cc = 0; cc < w; cc += W) {  // column parts: i < j, the tile owns columns j
        const int64_t n = std::min<int64_t>(W, w - cc);
        const Vec<T> col = Vec<T>::arange(static_cast<T>(c0 + cc), T(1));
        Vec<T> a(0), b(0), e(0);
        for (int64_t ii = 0; ii < std::min(rows, c0 + cc + n - m0); ++ii) {
          const Vec<T> keep = col > Vec<T>(static_cast<T>(m0 + ii));
          const Vec<T> x = Vec<T>::loadu(gs + ii * w + cc, n) & keep;
          const Vec<T> y = Vec<T>::loadu(gt + ii * w + cc, n) & keep;
          a = at::vec::fmadd(x, x, a);
          b = at::vec::fmadd(y, y, b);
          e = at::vec::fmadd(x, y, e);
        }
        __at_align__ T ta[W], tb[W], te[W];
        a.store(ta), b.store(tb), e.store(te);
        for (int64_t l = 0; l < n; ++l) {
          ss[c0 + cc + l] += ta[l];
          tt[c0 + cc + l] += tb[l];
          st[c0 + cc + l] += te[l];
        }
      }
    });
    for (int64_t ii = 0; ii < rows; ++ii)
      for (int64_t k = 0; k < U.tiles(I); ++k) {
        const double* p = part.data() + (k * U.R + ii) * 3;
        ss[m0 + ii] += p[0], tt[m0 + ii] += p[1], st[m0 + ii] += p[2];
      }
  }
  const double invN2 = 1.0 / (static_cast<double>(N) * N);
  std::vector<T> inv_n(N), inv_m(N), vv(N), ww(N);
  for (int64_t i = 0; i < N; ++i) {
    const double ns = std::sqrt(ss[i]), nt = std::sqrt(tt[i]);
    const double n = std::max(ns, kSpEps), m = std::max(nt, kSpEps);
    const double rho = 2.0 * invN2 * (ss[i] / (n * n) - st[i] / (n * m));
    inv_n[i] = static_cast<T>(1.0 / n);
    inv_m[i] = static_cast<T>(1.0 / m);
    vv[i] = static_cast<T>((2.0 * invN2 - (ns >= kSpEps ? rho : 0.0)) / (n * n));
    ww[i] = static_cast<T>(2.0 * invN2 / (n * m));
  }

  // sweep 1
  at::Tensor gacc = want ? grad_accumulator(grad, acc, N, D) : at::Tensor();
  std::vector<T> strips(want ? 2 * U.R * N : 0);
  std::vector<double> lpart(max_tiles, 0.0);
  const int64_t nd = want ? (D + kDcols - 1) / kDcols : 0;
  double total = 0;
  for (int64_t I = 0; I <= U.nrows; ++I) {
    const int64_t ndef = I > 0 ? nd : 0, ntile = I < U.nrows ? U.tiles(I) : 0;
    run_tasks<TileScratch<T>>(ndef + ntile, scratch, [&](int64_t task, TileScratch<T>& sc) {
      if (task < ndef) {
        const int64_t P = I - 1;
        strip_times_x(strips.data() + (P & 1) * U.R * N, U.rows(P), U.m0(P), S.x, gacc, task, T(1),
                      sc.out);
        return;
      }
      const int64_t k = task - ndef, m0 = U.m0(I), rows = U.rows(I), c0 = U.c0(I, k), w = U.width(I, k);
      grams(sc, I, k);
      T* gs = sc.gs;  // Y overwrites the student Gram tile, row by row
      const T* gt = sc.gt;
      const T* in = inv_n.data() + c0;  // indexed by column
      const T* im = inv_m.data() + c0;
      double lsum = 0;
      for (int64_t ii = 0; ii < rows; ++ii) {
        const int64_t i = m0 + ii, lo = std::min(w, std::max<int64_t>(0, i + 1 - c0));
        T* gr = gs + ii * w;
        const T* tr = gt + ii * w;
        if (lo > 0 && i - c0 < w && i >= c0) {  // the diagonal (i, i), once
          const int64_t d = i - c0;
          const T dd = gr[d] * inv_n[i] - tr[d] * inv_m[i];
          lsum += static_cast<double>(dd) * dd;
          if (want) gr[d] = vv[i] * gr[d] - ww[i] * tr[d];  // half of (Z + Z^T)_ii: both ends apply it
        }
        if (want) std::fill(gr, gr + std::max<int64_t>(0, std::min(lo, i - c0)), T(0));
        const Vec<T> ini(inv_n[i]), imi(inv_m[i]), vi(vv[i]), wi(ww[i]);
        Vec<T> a(0);
        for (int64_t cc = lo; cc < w; cc += W) {
          const int64_t n = std::min<int64_t>(W, w - cc);
          const Vec<T> x = Vec<T>::loadu(gr + cc, n), z = Vec<T>::loadu(tr + cc, n);
          const Vec<T> e1 = x * ini - z * imi;
          const Vec<T> e2 = x * Vec<T>::loadu(in + cc, n) - z * Vec<T>::loadu(im + cc, n);
          a = at::vec::fmadd(e1, e1, a);
          a = at::vec::fmadd(e2, e2, a);  // zero-filled tail lanes add 0
          if (want)
            ((vi + Vec<T>::loadu(vv.data() + c0 + cc, n)) * x - (wi + Vec<T>::loadu(ww.data() + c0 + cc, n)) * z)
                .store(gr + cc, n);
        }
        lsum += hsum(a);
        if (want) std::copy(gr, gr + w, strips.data() + (I & 1) * U.R * N + ii * N + (c0 - m0));
      }
      lpart[k] = lsum;
      if (want) {
        const at::Tensor yv = at::from_blob(gs, {rows, w}, opt);
        gacc.narrow(0, c0, w).addmm_(yv.t(), S.x.narrow(0, m0, rows));
      }
    });
    for (int64_t k = 0; k < ntile; ++k) total += lpart[k];
  }
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
