// relational families, CPU: fastkd::rkd_distance_fwd, fastkd::rkd_angle_fwd and
// fastkd::similarity_preserving_fwd. The math, symbols and edge cases are those of
// fastkd/reference/relational.py (its docstring is the contract); this file only says how.
//
// No N x N (or N^3) buffer ever exists. Gram values come a tile at a time from BLAS (the one
// part that is compute-bound) and every elementwise step (distances, smooth-L1,
// normalizations, reductions, gradient weights) is fused into one vectorized pass over the
// tile while it is in cache. Extra memory: the centred working-precision copies of the
// embeddings (N D each; none for similarity when the input is already float32), kSlots
// strips of kRows rows (distance, similarity) or <= kAngleBlock rows per thread (angle), tiles
// of kRows x kCols per thread, and O(N) vectors; the gradient is accumulated in grad_student
// itself when it has the working dtype (a temporary otherwise).
//
// * distance and similarity-preserving use the symmetry of their matrices: tile-row
//   [m0, m0 + kRows) holds the pairs (i, j) with j >= i only, cut into tiles of kCols
//   columns; gradient weights are applied to both ends of each pair (grad_J += W^T X_M by
//   the tile that owns columns J, grad_M += W X_{j>=m0} from the tile-row's strip), so every
//   Gram entry is computed once per sweep.
// * Threads take tiles from a shared counter, each with its own single-threaded GEMM (no
//   barrier inside a BLAS call). Sweeps whose output is a few scalars have no barrier at all;
//   gradient and row-sum sweeps keep their order with per-row-block counters instead of a
//   barrier per tile-row (class Ordered), so load from other processes slows one thread, not
//   every thread at every tile-row.
// * distance: sweep 0 finds the means and the sums that give c = sum g_ij y_ij / (N (N-1))
//   in closed form while every pair is in the quadratic part of the smooth L1; one more sweep
//   then gives the loss and the gradient with the weights 2 (g_ij - c) / (mu d_ij). A pair in
//   the linear part adds an exact correction sweep (student only); L1 finds c in its own sweep.
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

#include "../relational_checks.h"
#include "vec_reduce.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace fastkd {
namespace {

constexpr int64_t kRows = 64;        // rows per tile-row (distance, similarity)
constexpr int64_t kCols = 128;       // columns per tile: one task, two Gram GEMMs of kRows x kCols x D
constexpr int64_t kDcols = 128;      // embedding columns per task of a strip's row contribution
constexpr int64_t kSegments = 64;    // runs of tiles in a scalar-only sweep (one partial sum each)
static_assert(kCols % kRows == 0, "tiles start on row-block boundaries");
constexpr int64_t kAngleBlock = 64;  // anchor rows per angle task (fewer when threads would idle)
constexpr double kRefine = 1.0 / 64; // relative threshold below which r_ij is recomputed exactly
constexpr double kSpEps = 1e-12;     // F.normalize's eps (similarity-preserving)

template <typename T>
using Vec = at::vec::Vectorized<T>;

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

// Per-thread scratch of the tile sweeps: the two Gram tiles, two rows of squared distances,
// column sums and the output of a strip's row-contribution task.
template <typename T>
struct TileScratch {
  std::unique_ptr<T[]> buf;
  T *gs, *gt, *rs, *rt, *cs, *out;
  TileScratch(int64_t R, int64_t D) {
    const int64_t tile = R * kCols, out_n = R * std::min(D, kDcols);
    buf.reset(new T[2 * tile + 5 * kCols + out_n]);
    gs = buf.get(), gt = gs + tile, rs = gt + tile, rt = rs + kCols, cs = rt + kCols, out = cs + 3 * kCols;
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
// A gradient (or row-sum) sweep over the upper triangle in one parallel region, without a
// barrier per tile-row. Tasks are claimed in this order: for b = 0, 1, ..., the tiles of
// tile-row b, then the `nfin` finishing tasks of tile-row b - 1 (its strip's row
// contribution). Order is kept by counters instead of barriers:
// * block b (rows [b R, b R + R)) receives column parts from tile-rows 0, 1, ..., b in that
//   order: tile-row I applies its part to a block once col[b] == I, then sets it to I + 1;
// * tile-row I's finishing tasks wait for its tiles and for col[I] == I + 1 (all column parts
//   of its own rows), so they are the last to touch those rows;
// * strips (and per-tile partial sums) rotate through kSlots slots: tile-row I waits for
//   tile-row I - kSlots's finishing tasks before writing its slot.
// A task only ever waits for tasks claimed before it, so the sweep always progresses, and
// every row's sums are added in one fixed order whichever thread runs which task.
constexpr int64_t kSlots = 3;

class Ordered {
 public:
  Ordered(const Upper& U, int64_t nfin)
      : U_(U), nfin_(nfin), col_(new std::atomic<int64_t>[U.nrows]), tiles_(new std::atomic<int64_t>[U.nrows]),
        fins_(new std::atomic<int64_t>[U.nrows]), offset_(U.nrows + 2) {
    for (int64_t b = 0; b < U.nrows; ++b) col_[b] = 0, tiles_[b] = 0, fins_[b] = 0;
    offset_[0] = 0;
    for (int64_t b = 0; b <= U.nrows; ++b) offset_[b + 1] = offset_[b] + (b < U.nrows ? U.tiles(b) : 0) + (b > 0 ? nfin : 0);
  }
  // Runs tile(I, k, scratch) and fin(I, d, scratch) for every tile and finishing task.
  template <typename Scratch, typename MakeScratch, typename Tile, typename Fin>
  void run(const MakeScratch& make, const Tile& tile, const Fin& fin) {
    run_tasks<Scratch>(offset_[U_.nrows + 1], make, [&](int64_t task, Scratch& sc) {
      const int64_t b = std::upper_bound(offset_.begin(), offset_.end(), task) - offset_.begin() - 1;
      const int64_t local = task - offset_[b], nt = b < U_.nrows ? U_.tiles(b) : 0;
      try {
        if (local < nt) {
          tile(b, local, sc);
          tiles_[b].fetch_add(1, std::memory_order_acq_rel);
        } else {
          const int64_t I = b - 1;
          wait(tiles_[I], U_.tiles(I));
          wait(col_[I], I + 1);
          fin(I, local - nt, sc);
          fins_[I].fetch_add(1, std::memory_order_acq_rel);
        }
      } catch (...) {
        failed_.store(true);
        throw;
      }
    });
  }
  // In a tile of tile-row I: before writing its slot (strip, partial sums).
  void slot_free(int64_t I) {
    if (I >= kSlots) wait(fins_[I - kSlots], nfin_);
  }
  // In a tile of tile-row I: runs apply() once the rows [c0, c0 + w) have every column part of
  // tile-rows < I, and lets tile-row I + 1 in after it.
  template <typename F>
  void columns(int64_t I, int64_t c0, int64_t w, const F& apply) {
    const int64_t b0 = c0 / U_.R, b1 = (c0 + w - 1) / U_.R;
    for (int64_t b = b0; b <= b1; ++b) wait(col_[b], I);
    apply();
    for (int64_t b = b0; b <= b1; ++b) col_[b].store(I + 1, std::memory_order_release);
  }

 private:
  void wait(const std::atomic<int64_t>& a, int64_t v) {
    for (int spin = 0; a.load(std::memory_order_acquire) < v; ++spin) {
      TORCH_CHECK(!failed_.load(std::memory_order_relaxed), "fastkd: a task of the same sweep failed");
      if (spin >= 64) std::this_thread::yield();  // under load, let the thread we wait for run
    }
  }
  const Upper& U_;
  int64_t nfin_;
  std::unique_ptr<std::atomic<int64_t>[]> col_, tiles_, fins_;
  std::vector<int64_t> offset_;
  std::atomic<bool> failed_{false};
};

// ---------------------------------------------------------------------------------------------
// RKD distance, with a = 1/mu_s, b = 1/mu_t and the pairs j > i counted twice.
// * Sweep 0 (scalar-only, in kSegments runs): sum d_s, sum d_t, and sum d_s^2, sum d_s d_t.
// * While |y - z| < delta for every pair (the quadratic part of the smooth L1, which holds
//   for most batches at the default delta = 1), c = sum g_ij y_ij / (N (N - 1)) is a
//   closed form of those sums: c = 2 a (a S_ss - b S_st) / (delta N^2 N (N - 1)) over i < j,
//   so one more sweep gives the loss and the gradient (2 Gram sweeps and one product).
//   The gradient sweep also sums the clamped pairs' excess c_x = sum (g - g_quad) y / (N (N-1));
//   when some pair clamps, a student-only sweep adds the missing -2 a c_x sum_j (x_i - x_j)
//   [r_ij >= eps] / d_ij (one Gram and one product more; the result is exact either way).
// * L1 (delta = 0) has no quadratic part: sweep 1 (scalar-only) finds the loss and c first.
// Gradient sweeps (Ordered): each tile applies W^T to its rows' embeddings (the gradient of
// its columns) and writes W into its tile-row's strip, whose row contribution W X follows.
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
  const double pairs = static_cast<double>(N) * (N - 1), N2 = static_cast<double>(N) * N;
  const T invN2 = static_cast<T>(1.0 / N2);
  auto scratch = [&] { return TileScratch<T>(U.R, D); };

  // Squared distances of row ii of a tile for the pairs j > i: rs (and rt with the teacher)
  // [cc] for the columns cc in [lo, width); returns lo.
  auto tile_row = [&](TileScratch<T>& sc, int64_t I, int64_t k, int64_t ii, bool teacher_too) -> int64_t {
    const int64_t i = U.m0(I) + ii, c0 = U.c0(I, k), w = U.width(I, k);
    const int64_t lo = std::min(w, std::max<int64_t>(0, i + 1 - c0));
    if (lo < w) {
      sq_dist_row(S, i, sc.gs + ii * w, c0, c0 + lo, c0 + w, sc.rs);
      if (teacher_too) sq_dist_row(Tt, i, sc.gt + ii * w, c0, c0 + lo, c0 + w, sc.rt);
    }
    return lo;
  };
  auto grams = [&](TileScratch<T>& sc, int64_t I, int64_t k, bool teacher_too) {
    gram_tile(S.x, U.m0(I), U.rows(I), U.c0(I, k), U.width(I, k), sc.gs);
    if (teacher_too) gram_tile(Tt.x, U.m0(I), U.rows(I), U.c0(I, k), U.width(I, k), sc.gt);
  };

  // scalar-only sweeps: 0 (four sums) and 1 (the loss and sum g y, once a and b are known)
  const Segments seg(U);
  double inv_mu_s = 0, inv_mu_t = 0;
  auto scalar_sweep = [&](int pass) {
    std::vector<std::array<double, 4>> part(seg.runs());
    const Vec<T> vims(static_cast<T>(inv_mu_s)), vimt(static_cast<T>(inv_mu_t));
    run_tasks<TileScratch<T>>(seg.runs(), scratch, [&](int64_t s, TileScratch<T>& sc) {
      std::array<double, 4> t{0, 0, 0, 0};
      int64_t I = seg.begin[s].first, k = seg.begin[s].second;
      for (; std::make_pair(I, k) != seg.begin[s + 1]; Segments::next(U, I, k)) {
        const int64_t w = U.width(I, k);
        grams(sc, I, k, true);
        for (int64_t ii = 0; ii < U.rows(I); ++ii) {
          const int64_t lo = tile_row(sc, I, k, ii, true);
          Vec<T> a1(0), a2(0), a3(0), a4(0);
          for (int64_t cc = lo; cc < w; cc += W) {
            const int64_t n = std::min<int64_t>(W, w - cc);
            const Vec<T> lanes = lanes_below<T>(n);
            const Vec<T> r_s = at::vec::maximum(Vec<T>::loadu(sc.rs + cc, n), veps) & lanes;
            const Vec<T> d_s = r_s.sqrt();
            const Vec<T> d_t = at::vec::maximum(Vec<T>::loadu(sc.rt + cc, n), veps).sqrt() & lanes;
            if (pass == 0) {
              a1 += d_s;
              a2 += d_t;
              a3 += r_s;
              a4 = at::vec::fmadd(d_s, d_t, a4);
            } else {
              const Vec<T> y = d_s * vims, z = y - d_t * vimt;
              a1 += hub.h(z) & lanes;
              a2 += (hub.dh(z) * y) & lanes;
            }
          }
          t[0] += hsum(a1), t[1] += hsum(a2), t[2] += hsum(a3), t[3] += hsum(a4);
        }
      }
      part[s] = t;
    });
    std::array<double, 4> tot{0, 0, 0, 0};
    for (const auto& p : part)
      for (int q = 0; q < 4; ++q) tot[q] += p[q];
    return tot;
  };
  const auto sums = scalar_sweep(0);
  inv_mu_s = pairs / (2.0 * sums[0]);
  inv_mu_t = pairs / (2.0 * sums[1]);
  const bool quad = delta > 0;
  double c = quad ? 2.0 * inv_mu_s * (inv_mu_s * sums[2] - inv_mu_t * sums[3]) / (delta * N2 * pairs) : 0.0;
  if (!quad || !want) {
    const auto l = scalar_sweep(1);
    loss.fill_(2.0 * l[0] / N2);
    c = 2.0 * l[1] / (N2 * pairs);
    if (!want) return;
  }

  // gradient sweeps: sum_j W_ij (x_i - x_j) = rs_i x_i - (W X)_i
  at::Tensor gacc = grad_accumulator(grad, acc, N, D);
  std::vector<T> rs(N, T(0));
  std::vector<T> strips(kSlots * U.R * N);
  const int64_t nd = (D + kDcols - 1) / kDcols, max_tiles = U.tiles(0);
  std::vector<std::array<double, 3>> part(kSlots * max_tiles), row_tot(U.nrows);
  const Vec<T> vims(static_cast<T>(inv_mu_s)), vimt(static_cast<T>(inv_mu_t));
  const Vec<T> coef(static_cast<T>(2.0 * inv_mu_s)), vinvN2(invN2), vinvd(static_cast<T>(quad ? 1.0 / delta : 0.0));
  // full: W = 2 a (g - c) [live] / d_s, also sums h(z), the excess (g - g_quad) y and the
  // number of clamped pairs; else (correction): W = kappa [live] / d_s
  auto grad_sweep = [&](bool full, T kappa) {
    const Vec<T> vc(static_cast<T>(c)), vkappa(kappa);
    Ordered ord(U, nd);
    ord.run<TileScratch<T>>(
        scratch,
        [&](int64_t I, int64_t k, TileScratch<T>& sc) {
          const int64_t m0 = U.m0(I), rows = U.rows(I), c0 = U.c0(I, k), w = U.width(I, k);
          grams(sc, I, k, full);
          T* wt = sc.gs;  // W overwrites the student Gram tile, row by row
          std::array<double, 3> t{0, 0, 0};
          for (int64_t ii = 0; ii < rows; ++ii) {
            const int64_t lo = tile_row(sc, I, k, ii, full);
            T* wr = wt + ii * w;
            std::fill(wr, wr + lo, T(0));
            Vec<T> a1(0), a2(0), a3(0);
            for (int64_t cc = lo; cc < w; cc += W) {
              const int64_t n = std::min<int64_t>(W, w - cc);
              const Vec<T> r_s = Vec<T>::loadu(sc.rs + cc, n);
              const Vec<T> d_s = at::vec::maximum(r_s, veps).sqrt();
              const Vec<T> live = (r_s >= veps) & lanes_below<T>(n);
              if (!full) {
                Vec<T>::blendv(zero, vkappa / d_s, live).store(wr + cc, n);
                continue;
              }
              const Vec<T> d_t = at::vec::maximum(Vec<T>::loadu(sc.rt + cc, n), veps).sqrt();
              const Vec<T> y = d_s * vims, z = y - d_t * vimt;
              const Vec<T> g = hub.dh(z) * vinvN2;
              Vec<T>::blendv(zero, coef * (g - vc) / d_s, live).store(wr + cc, n);
              if (quad) {
                const Vec<T> lanes = lanes_below<T>(n);
                const Vec<T> excess = g - z * vinvd * vinvN2;  // exactly 0 unless the pair clamps
                a1 += hub.h(z) & lanes;
                a2 += (excess * y) & lanes;
                a3 += Vec<T>(1) & (excess != zero) & lanes;
              }
            }
            if (full && quad) t[0] += hsum(a1), t[1] += hsum(a2), t[2] += hsum(a3);
          }
          for (int64_t cc = 0; cc < w; cc += W) {  // column sums, rows in order
            const int64_t n = std::min<int64_t>(W, w - cc);
            Vec<T> a(0);
            for (int64_t ii = 0; ii < rows; ++ii) a += Vec<T>::loadu(wt + ii * w + cc, n);
            a.store(sc.cs + cc, n);
          }
          ord.slot_free(I);
          T* strip = strips.data() + (I % kSlots) * U.R * N + (c0 - m0);
          for (int64_t ii = 0; ii < rows; ++ii) std::copy(wt + ii * w, wt + ii * w + w, strip + ii * N);
          part[(I % kSlots) * max_tiles + k] = t;
          const at::Tensor wv = at::from_blob(wt, {rows, w}, opt);
          ord.columns(I, c0, w, [&] {
            for (int64_t cc = 0; cc < w; ++cc) rs[c0 + cc] += sc.cs[cc];
            gacc.narrow(0, c0, w).addmm_(wv.t(), S.x.narrow(0, m0, rows), 1, -1);
          });
        },
        [&](int64_t I, int64_t d, TileScratch<T>& sc) {  // the strip's row contribution (and row sums)
          const int64_t m0 = U.m0(I), rows = U.rows(I);
          const T* strip = strips.data() + (I % kSlots) * U.R * N;
          strip_times_x(strip, rows, m0, S.x, gacc, d, T(-1), sc.out);
          if (d != 0) return;
          for (int64_t r = 0; r < rows; ++r) {
            Vec<T> a(0);
            const T* sr = strip + r * N;
            for (int64_t cc = 0; cc < N - m0; cc += W) a += Vec<T>::loadu(sr + cc, std::min<int64_t>(W, N - m0 - cc));
            rs[m0 + r] += hsum(a);
          }
          std::array<double, 3> t{0, 0, 0};
          for (int64_t k = 0; k < U.tiles(I); ++k)
            for (int q = 0; q < 3; ++q) t[q] += part[(I % kSlots) * max_tiles + k][q];
          row_tot[I] = t;
        });
    std::array<double, 3> tot{0, 0, 0};
    for (const auto& t : row_tot)
      for (int q = 0; q < 3; ++q) tot[q] += t[q];
    return tot;
  };
  const auto g = grad_sweep(true, T(0));
  if (quad) {
    loss.fill_(2.0 * g[0] / N2);
    if (g[2] > 0) grad_sweep(false, static_cast<T>(-2.0 * inv_mu_s * 2.0 * g[1] / pairs));
  }
  gacc.addcmul_(at::from_blob(rs.data(), {N, 1}, opt), S.x);
  if (!gacc.is_same(*grad)) grad->copy_(gacc);
}

// ---------------------------------------------------------------------------------------------
// Row i of similarity-preserving from its three sums ss = |Gs_i|^2, st = Gs_i . Gt_i,
// tt = |Gt_i|^2 (both forms): the clamped norms n, m (F.normalize's eps), the row's loss term
// sum_j (Gs_ij / n - Gt_ij / m)^2 and the gradient weights v (of Gs) and w (of Gt) of
// Z = diag(v) Gs - diag(w) Gt.
struct SpRow {
  double n, m, loss, v, w;
  SpRow(double ss, double st, double tt, double invN2) {
    const double ns = std::sqrt(ss);
    n = std::max(ns, kSpEps), m = std::max(std::sqrt(tt), kSpEps);
    loss = ss / (n * n) + tt / (m * m) - 2.0 * st / (n * m);
    const double rho = 2.0 * invN2 * (ss / (n * n) - st / (n * m));
    v = (2.0 * invN2 - (ns >= kSpEps ? rho : 0.0)) / (n * n);
    w = 2.0 * invN2 / (n * m);
  }
};

// ---------------------------------------------------------------------------------------------
// Similarity-preserving, two Ordered sweeps. Sweep 0: the row sums |Gs_i|^2, |Gt_i|^2,
// Gs_i . Gt_i (each tile adds its column sums to the rows it covers and leaves its row sums,
// added in tile order by the tile-row's finishing task). Sweep 1: the loss and the gradient
// (Z + Z^T) X with the symmetric weights Y_ij = (v_i + v_j) Gs_ij - (w_i + w_j) Gt_ij, like
// the distance's gradient sweep.
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
  const int64_t max_tiles = U.tiles(0);
  auto scratch = [&] { return TileScratch<T>(U.R, D); };
  auto grams = [&](TileScratch<T>& sc, int64_t I, int64_t k) {
    gram_tile(S.x, U.m0(I), U.rows(I), U.c0(I, k), U.width(I, k), sc.gs);
    gram_tile(Tt.x, U.m0(I), U.rows(I), U.c0(I, k), U.width(I, k), sc.gt);
  };

  // sweep 0
  std::vector<double> ss(N, 0.0), tt(N, 0.0), st(N, 0.0);
  std::vector<double> part(kSlots * max_tiles * U.R * 3);  // row sums of each tile of a tile-row
  {
    Ordered ord(U, 1);
    ord.run<TileScratch<T>>(
        scratch,
        [&](int64_t I, int64_t k, TileScratch<T>& sc) {
          const int64_t m0 = U.m0(I), rows = U.rows(I), c0 = U.c0(I, k), w = U.width(I, k);
          grams(sc, I, k);
          const T* gs = sc.gs;
          const T* gt = sc.gt;
          ord.slot_free(I);
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
            double* p = part.data() + (((I % kSlots) * max_tiles + k) * U.R + ii) * 3;
            p[0] = hsum(a), p[1] = hsum(b), p[2] = hsum(e);
          }
          T* cs = sc.cs;  // column parts (i < j) of the three sums: cs[3 cc + q]
          for (int64_t cc = 0; cc < w; cc += W) {
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
            a.store(cs + cc, n), b.store(cs + kCols + cc, n), e.store(cs + 2 * kCols + cc, n);
          }
          ord.columns(I, c0, w, [&] {
            for (int64_t cc = 0; cc < w; ++cc) {
              ss[c0 + cc] += cs[cc];
              tt[c0 + cc] += cs[kCols + cc];
              st[c0 + cc] += cs[2 * kCols + cc];
            }
          });
        },
        [&](int64_t I, int64_t, TileScratch<T>&) {
          const int64_t m0 = U.m0(I);
          for (int64_t ii = 0; ii < U.rows(I); ++ii)
            for (int64_t k = 0; k < U.tiles(I); ++k) {
              const double* p = part.data() + (((I % kSlots) * max_tiles + k) * U.R + ii) * 3;
              ss[m0 + ii] += p[0], tt[m0 + ii] += p[1], st[m0 + ii] += p[2];
            }
        });
  }
  const double invN2 = 1.0 / (static_cast<double>(N) * N);
  std::vector<T> inv_n(N), inv_m(N), vv(N), ww(N);
  for (int64_t i = 0; i < N; ++i) {
    const SpRow row(ss[i], st[i], tt[i], invN2);
    inv_n[i] = static_cast<T>(1.0 / row.n);
    inv_m[i] = static_cast<T>(1.0 / row.m);
    vv[i] = static_cast<T>(row.v);
    ww[i] = static_cast<T>(row.w);
  }

  // sweep 1
  at::Tensor gacc = want ? grad_accumulator(grad, acc, N, D) : at::Tensor();
  std::vector<T> strips(want ? kSlots * U.R * N : 0);
  std::vector<double> lpart(kSlots * max_tiles, 0.0), row_loss(U.nrows, 0.0);
  const int64_t nd = want ? (D + kDcols - 1) / kDcols : 1;
  Ordered ord(U, nd);
  ord.run<TileScratch<T>>(
      scratch,
      [&](int64_t I, int64_t k, TileScratch<T>& sc) {
        const int64_t m0 = U.m0(I), rows = U.rows(I), c0 = U.c0(I, k), w = U.width(I, k);
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
          if (i >= c0) {  // the diagonal (i, i), once (tile 0 only)
            const int64_t d = i - c0;
            const T dd = gr[d] * inv_n[i] - tr[d] * inv_m[i];
            lsum += static_cast<double>(dd) * dd;
            if (want) gr[d] = vv[i] * gr[d] - ww[i] * tr[d];  // half of (Z + Z^T)_ii: both ends apply it
            if (want) std::fill(gr, gr + d, T(0));
          }
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
        }
        ord.slot_free(I);
        lpart[(I % kSlots) * max_tiles + k] = lsum;
        if (want) {
          T* strip = strips.data() + (I % kSlots) * U.R * N + (c0 - m0);
          for (int64_t ii = 0; ii < rows; ++ii) std::copy(gs + ii * w, gs + ii * w + w, strip + ii * N);
        }
        const at::Tensor yv = at::from_blob(gs, {rows, w}, opt);
        ord.columns(I, c0, w, [&] {
          if (want) gacc.narrow(0, c0, w).addmm_(yv.t(), S.x.narrow(0, m0, rows));
        });
      },
      [&](int64_t I, int64_t d, TileScratch<T>& sc) {
        if (want)
          strip_times_x(strips.data() + (I % kSlots) * U.R * N, U.rows(I), U.m0(I), S.x, gacc, d, T(1), sc.out);
        if (d != 0) return;
        double l = 0;
        for (int64_t k = 0; k < U.tiles(I); ++k) l += lpart[(I % kSlots) * max_tiles + k];
        row_loss[I] = l;
      });
  double total = 0;
  for (int64_t I = 0; I < U.nrows; ++I) total += row_loss[I];
  loss.fill_(total * invN2);
  if (want && !gacc.is_same(*grad)) grad->copy_(gacc);
}

// ---------------------------------------------------------------------------------------------
// Similarity-preserving, feature form: the same loss and gradient from feature Gram matrices
// (Ds x Ds, Dt x Ds, Dt x Dt) instead of N x N tiles, so O(N D^2) work instead of O(N^2 D).
// With X the student [N, Ds], Y the teacher [N, Dt], Gs = X X^T and Gt = Y Y^T, the three row
// sums of the pairwise form are quadratic forms in one row each:
//   |Gs_i|^2 = x_i . (X Maa)_i,   Gs_i . Gt_i = x_i . (Y Mba)_i,   |Gt_i|^2 = y_i . (Y Mbb)_i
// (Maa = X^T X, Mba = Y^T X, Mbb = Y^T Y), the loss sum_i |u_i Gs_i - v_i Gt_i|^2 / N^2 expands
// into them, and the gradient (Z + Z^T) X with Z = diag(alpha) Gs - diag(beta) Gt (alpha,
// beta: SpRow's v, w; they depend on row i's sums only) is
//   alpha * (X Maa) - beta * (Y Mba) + X (X^T diag(alpha) X) - Y (Y^T diag(beta) X).
// Every product is cut into output tiles, each one single-threaded GEMM over the whole inner
// dimension (no partial sums), so results do not depend on the thread count. Symmetric
// products (Maa, Mbb, X^T diag(alpha) X) compute the tiles on and above the diagonal only.
// Multiply-adds with the gradient: N (3 Ds^2 + 4 Ds Dt + 1.5 Dt^2), against N^2 (2 Ds + Dt) for
// the pairwise sweeps: 0.71 of them at N = 4D, 0.18 at N = 16D.
// Precision is the price, so this form is opt-in (FASTKD_SP_FORM=features, or auto). The
// loss becomes sum_i (2 - 2 cos_i) / N^2, cos_i the cosine of row i's normalized Gram rows,
// from sums of size |Gs_i|^2, and the gradient a sum of four terms of that size: both
// cancel after the sums over N, where the pairwise form cancels entry by entry. As the
// student's rows approach the teacher's, the loss's relative error grows like 1 / (1 - cos)
// and the gradient's is 3-22x that of the eager fp32 code (tests/test_relational.py and the
// README give measured figures).
constexpr int64_t kFeatTile = 128;  // output tile edge of the feature-form products
constexpr int64_t kFeatRows = 256;  // rows per task of the row passes

// The form FASTKD_SP_FORM asks for: pairs (unset: the default), features, or auto (the one
// with fewer multiply-adds, counted with the gradient when `grad`).
bool sp_feature_form(int64_t N, int64_t Ds, int64_t Dt, bool grad) {
  const char* env = std::getenv("FASTKD_SP_FORM");
  const std::string form = env ? env : "";
  if (form.empty() || form == "pairs") return false;
  if (form == "features") return true;
  TORCH_CHECK(form == "auto", "FASTKD_SP_FORM must be pairs, features or auto, got '", form, "'");
  const double n = static_cast<double>(N), s = static_cast<double>(Ds), t = static_cast<double>(Dt);
  const double features = grad ? 3 * s * s + 4 * s * t + 1.5 * t * t : 1.5 * s * s + 2 * s * t + 1.5 * t * t;
  const double pairs = grad ? n * (2 * s + t) : n * (s + t);
  return features < pairs;
}

// out [Da, Db] = a^T b for a [N, Da], b [N, Db]. With `symmetric` (a^T b symmetric: a is b,
// or b a row-scaled a) the tiles below the diagonal are copied from their mirror images.
template <typename T>
void feature_gram(const at::Tensor& a, const at::Tensor& b, bool symmetric, at::Tensor& out) {
  const int64_t ta = (a.size(1) + kFeatTile - 1) / kFeatTile, tb = (b.size(1) + kFeatTile - 1) / kFeatTile;
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t i = 0; i < ta; ++i)
    for (int64_t j = symmetric ? i : 0; j < tb; ++j) tiles.emplace_back(i, j);
  run_tasks<std::unique_ptr<T[]>>(
      static_cast<int64_t>(tiles.size()), [] { return std::unique_ptr<T[]>(new T[kFeatTile * kFeatTile]); },
      [&](int64_t k, std::unique_ptr<T[]>& buf) {
        const auto [i, j] = tiles[k];
        const int64_t i0 = i * kFeatTile, j0 = j * kFeatTile;
        const int64_t wi = std::min(kFeatTile, a.size(1) - i0), wj = std::min(kFeatTile, b.size(1) - j0);
        at::Tensor t = at::from_blob(buf.get(), {wi, wj}, b.options());
        at::mm_out(t, a.narrow(1, i0, wi).t(), b.narrow(1, j0, wj));
        out.narrow(0, i0, wi).narrow(1, j0, wj).copy_(t);
        if (symmetric && j != i) out.narrow(0, j0, wj).narrow(1, i0, wi).copy_(t.t());
      });
}

template <typename T>
void sp_feature_impl(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& loss,
                     const std::optional<at::Tensor>& grad) {
  constexpr int64_t W = Vec<T>::size();
  const at::ScalarType acc = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
  const Side<T> S(student, acc, false), Tt(teacher, acc, false);
  const at::Tensor &X = S.x, &Y = Tt.x;
  const int64_t N = S.N, Ds = S.D, Dt = Tt.D;
  const bool want = grad.has_value();
  const auto opt = at::TensorOptions().dtype(acc);
  at::Tensor maa = at::empty({Ds, Ds}, opt), mba = at::empty({Dt, Ds}, opt), mbb = at::empty({Dt, Dt}, opt);
  feature_gram<T>(X, X, true, maa);
  feature_gram<T>(Y, X, false, mba);
  feature_gram<T>(Y, Y, true, mbb);

  // Row pass: P = X Maa, Q = Y Mba, R = Y Mbb a block of rows at a time; the three sums, the
  // row's loss term and weights; the first part of the gradient alpha P - beta Q.
  const double invN2 = 1.0 / (static_cast<double>(N) * N);
  at::Tensor gacc = want ? grad_accumulator(grad, acc, N, Ds) : at::Tensor();
  std::vector<double> row_loss(N);
  std::vector<T> alpha(N), beta(N);
  const int64_t nblk = (N + kFeatRows - 1) / kFeatRows;
  struct Rows {
    std::unique_ptr<T[]> buf;
  };
  run_tasks<Rows>(
      nblk, [&] { return Rows{std::unique_ptr<T[]>(new T[kFeatRows * (2 * Ds + Dt)])}; },
      [&](int64_t b, Rows& sc) {
        const int64_t r0 = b * kFeatRows, rows = std::min(kFeatRows, N - r0);
        T* p = sc.buf.get();
        T* q = p + rows * Ds;
        T* r = q + rows * Ds;
        at::Tensor P = at::from_blob(p, {rows, Ds}, opt), Q = at::from_blob(q, {rows, Ds}, opt),
                   R = at::from_blob(r, {rows, Dt}, opt);
        at::mm_out(P, X.narrow(0, r0, rows), maa);
        at::mm_out(Q, Y.narrow(0, r0, rows), mba);
        at::mm_out(R, Y.narrow(0, r0, rows), mbb);
        auto dot = [&](const T* u, const T* v, int64_t n) {
          Vec<T> s(0);
          for (int64_t d = 0; d < n; d += W) {
            const int64_t m = std::min<int64_t>(W, n - d);
            s = at::vec::fmadd(Vec<T>::loadu(u + d, m), Vec<T>::loadu(v + d, m), s);
          }
          return static_cast<double>(hsum(s));
        };
        for (int64_t ii = 0; ii < rows; ++ii) {
          const int64_t i = r0 + ii;
          const SpRow row(std::max(0.0, dot(S.row(i), p + ii * Ds, Ds)), dot(S.row(i), q + ii * Ds, Ds),
                          std::max(0.0, dot(Tt.row(i), r + ii * Dt, Dt)), invN2);
          row_loss[i] = row.loss;
          alpha[i] = static_cast<T>(row.v);
          beta[i] = static_cast<T>(row.w);
          if (!want) continue;
          T* g = gacc.data_ptr<T>() + i * Ds;
          const Vec<T> va(alpha[i]), vb(beta[i]);
          for (int64_t d = 0; d < Ds; d += W) {
            const int64_t m2 = std::min<int64_t>(W, Ds - d);
            (va * Vec<T>::loadu(p + ii * Ds + d, m2) - vb * Vec<T>::loadu(q + ii * Ds + d, m2)).store(g + d, m2);
          }
        }
      });
  double total = 0;
  for (int64_t i = 0; i < N; ++i) total += row_loss[i];
  loss.fill_(total * invN2);
  if (!want) return;

  // The rest of the gradient: X (X^T diag(alpha) X) - Y (Y^T diag(beta) X), a block of rows at a time.
  at::Tensor& s1 = maa;  // Maa and Mba are done: their buffers take the two sandwiches
  at::Tensor& s2 = mba;
  at::Tensor scaled = at::empty({N, Ds}, opt);  // diag(alpha) X, then diag(beta) X
  at::mul_out(scaled, X, at::from_blob(alpha.data(), {N, 1}, opt));
  feature_gram<T>(X, scaled, true, s1);
  at::mul_out(scaled, X, at::from_blob(beta.data(), {N, 1}, opt));
  feature_gram<T>(Y, scaled, false, s2);
  scaled.reset();
  run_tasks<int>(nblk, [] { return 0; }, [&](int64_t b, int&) {
    const int64_t r0 = b * kFeatRows, rows = std::min(kFeatRows, N - r0);
    at::Tensor g = gacc.narrow(0, r0, rows);
    g.addmm_(X.narrow(0, r0, rows), s1);
    g.addmm_(Y.narrow(0, r0, rows), s2, /*beta=*/1, /*alpha=*/-1);
  });
  if (!gacc.is_same(*grad)) grad->copy_(gacc);
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
void rkd_distance_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& loss,
                          const std::optional<at::Tensor>& grad_student, double eps, double huber_delta) {
  const bool wide = checks::check_rkd_distance_args(student, teacher, loss, grad_student, eps, huber_delta,
                                                    c10::DeviceType::CPU).wide;
  if (wide) rkd_distance_impl<double>(student, teacher, loss, grad_student, eps, huber_delta);
  else rkd_distance_impl<float>(student, teacher, loss, grad_student, eps, huber_delta);
}

void rkd_angle_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& loss,
                       const std::optional<at::Tensor>& grad_student, double huber_delta) {
  checks::check_relational_args("rkd_angle_fwd", student, teacher, loss, grad_student, c10::DeviceType::CPU);
  TORCH_CHECK(huber_delta >= 0.0 && std::isfinite(huber_delta),
              "fastkd::rkd_angle_fwd: huber_delta must be >= 0, got ", huber_delta);
  // float64 inside whatever the input dtype. The numerators G_kl - G_ml - G_mk + G_mm cancel
  // down to u_mk . u_ml: for a pair (m, k) much closer than the rows' spread |x| that is of
  // size |u_mk| |u_ml| while float32 rounds each G at eps |x|^2, so an angle at a near-duplicate
  // pair came out wrong by eps |x|^2 / (|u_mk| |u_ml|) (a_mkk = 1 was off by 50% at a pair 1e-3
  // apart, and the gradient by 10%). In float64 that error is 2^-29 of it; the cost is about
  // 2x (N = 256, D = 512: 18 -> 34 ms here), far inside the angle's margin over eager.
  rkd_angle_impl<double>(student, teacher, loss, grad_student, huber_delta);
}

void similarity_preserving_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& loss,
                                   const std::optional<at::Tensor>& grad_student) {
  const auto shape = checks::check_relational_args("similarity_preserving_fwd", student, teacher, loss, grad_student,
                                                   c10::DeviceType::CPU);
  const bool wide = shape.wide;
  if (sp_feature_form(shape.N, shape.Ds, shape.Dt, grad_student.has_value())) {
    if (wide) sp_feature_impl<double>(student, teacher, loss, grad_student);
    else sp_feature_impl<float>(student, teacher, loss, grad_student);
  } else if (wide) {
    sp_impl<double>(student, teacher, loss, grad_student);
  } else {
    sp_impl<float>(student, teacher, loss, grad_student);
  }
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("rkd_distance_fwd", &fastkd::rkd_distance_fwd_cpu);
  m.impl("rkd_angle_fwd", &fastkd::rkd_angle_fwd_cpu);
  m.impl("similarity_preserving_fwd", &fastkd::similarity_preserving_fwd_cpu);
}
