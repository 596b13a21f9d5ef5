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

// at::vec only emits vector code when a CPU_CAPABILITY_* macro is defined together with the
// matching -m flags. Pick the widest one the compiler was told it may use (fastkd/_native.py
// passes -march=native where accepted); without such flags this is the portable scalar build.
// The vec namespace is named after fastkd so that none of its inline functions can be merged
// with libtorch's own copies of the same names.
#if !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_DEFAULT)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__FMA__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY fastkd_avx512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY fastkd_avx2
#endif
#endif
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY fastkd_default
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

namespace fastkd {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int64_t kPad = 4 * kW;    // scratch rows are padded with -inf up to a multiple of this
constexpr int64_t kBlock = 1024;    // cascade-sum block and gradient staging block (multiple of kPad)
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// exp, inlined. Sleef's exp is an out-of-line call per vector and dominated the run time; this
// is the Cephes single-precision polynomial (about 1 ulp), 0 for -inf, NaN for NaN.
#if defined(CPU_CAPABILITY_AVX512)
inline Vec vexp(const Vec& v) {
  __m512 x = v;
  const __mmask16 zero = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-103.9f), _CMP_LT_OQ);  // exp < FLT_TRUE_MIN / 2
  x = _mm512_max_ps(_mm512_set1_ps(-103.9f), x);  // NaN passes through (second operand)
  x = _mm512_min_ps(_mm512_set1_ps(88.72f), x);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_mov_ps(~zero, _mm512_scalef_ps(p, n));  // p * 2^n, with gradual underflow
}
#elif defined(CPU_CAPABILITY_AVX2)
inline Vec vexp(const Vec& v) {
  __m256 x0 = v;
  __m256 under = _mm256_cmp_ps(x0, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ);  // below FLT_MIN: 0
  __m256 x = _mm256_max_ps(_mm256_set1_ps(-87.33654f), x0);
  x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 res = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(under, res);
}
#else
inline Vec vexp(const Vec& v) { return v.exp(); }
#endif

inline float hsum(const Vec& v) {  // fixed order
  __at_align__ float t[kW];
  v.store(t);
  float s = 0.f;
  for (int64_t i = 0; i < kW; ++i) s += t[i];
  return s;
}

inline float hmax(const Vec& v) {  // NaN-propagating
  __at_align__ float t[kW];
  v.store(t);
  float m = t[0];
  for (int64_t i = 0; i < kW; ++i) {
    if (std::isnan(t[i])) return t[i];
    m = std::max(m, t[i]);
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// Pass A: one input row (float / Half / BFloat16) -> softcapped fp32 scratch row, -inf padded.
template <typename T>
inline Vec load_vec(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec v;
    at::vec::load_to_float<T>(p, v);
    return v;
  }
}

// cap(z) = c tanh(z / c) and, when dcap is non-null, cap'(z) = 1 - tanh^2 = 4 e / (1 + e)^2 with
// e = exp(-2 |z / c|): full relative precision where tanh saturates (1 - tanh^2 from a rounded
// tanh cancels). tanh: Cephes' odd polynomial below 0.625, (1 - e) / (1 + e) above (~2 ulp).
inline Vec softcap_vec(const Vec& z, const Vec& vc, const Vec& vinvc, float* dcap) {
  const Vec zero(0.f), one(1.f);
  const Vec u = z * vinvc, a = u.abs();
  const Vec e = vexp(Vec(-2.f) * a), r = one / (one + e);
  if (dcap) (Vec(4.f) * e * r * r).store(dcap);
  const Vec big = (one - e) * r, u2 = u * u;
  Vec small = at::vec::fmadd(Vec(-5.70498872745E-3f), u2, Vec(2.06390887954E-2f));
  small = at::vec::fmadd(small, u2, Vec(-5.37397155531E-2f));
  small = at::vec::fmadd(small, u2, Vec(1.33314422036E-1f));
  small = at::vec::fmadd(small, u2, Vec(-3.33332819422E-1f));
  small = at::vec::fmadd(small * u2, u, u);
  const Vec th = Vec::blendv(Vec::blendv(big, zero - big, u < zero), small, a < Vec(0.625f));
  return vc * th;
}

template <typename T>
float load_row(const void* src_, int64_t V, float* dst, int64_t Vpad, float softcap, float* dcap) {
  const T* src = static_cast<const T*>(src_);
  const Vec ninf(-kInf), vc(softcap), vinvc(softcap != 0.f ? 1.f / softcap : 0.f);
  const bool capped = softcap != 0.f;
  Vec vmax(-kInf);
  int64_t j = 0;
  for (; j + kW <= V; j += kW) {
    Vec x = load_vec<T>(src + j);
    if (capped) x = softcap_vec(x, vc, vinvc, dcap ? dcap + j : nullptr);
    x.store(dst + j);
    vmax = at::vec::maximum(vmax, x);
  }
  if (j < V) {
    __at_align__ float t[kW];
    for (int64_t i = 0; i < V - j; ++i) t[i] = static_cast<float>(src[j + i]);
    Vec x = Vec::loadu(t, V - j);
    if (capped) x = softcap_vec(x, vc, vinvc, dcap ? dcap + j : nullptr);
    x = Vec::set(ninf, x, V - j);
    x.store(dst + j);
    vmax = at::vec::maximum(vmax, x);
    j += kW;
  }
  for (; j < Vpad; j += kW) ninf.store(dst + j);
  return hmax(vmax);
}

// Pass D output: n fp32 gradient entries -> the buffer's dtype. STREAM uses non-temporal stores
// (no read-for-ownership of lines that are about to be overwritten whole: a quarter of the DRAM
// traffic of forward_kl with grad_student); chosen for outputs too large to stay in cache anyway.
template <typename T, bool STREAM>
void store_row(void* dst_, const float* src, int64_t n) {
  T* dst = static_cast<T*>(dst_);
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (STREAM) {
    for (; j < n && (reinterpret_cast<uintptr_t>(dst + j) & 63); ++j) dst[j] = static_cast<T>(src[j]);
    if constexpr (std::is_same_v<T, float>) {
      for (; j + kW <= n; j += kW) _mm512_stream_ps(dst + j, _mm512_loadu_ps(src + j));
    } else {
      for (; j + 2 * kW <= n; j += 2 * kW) {
        const at::vec::Vectorized<T> v = at::vec::convert_from_float<T>(Vec::loadu(src + j), Vec::loadu(src + j + kW));
        _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + j), static_cast<__m512i>(v));
      }
    }
  }
#endif
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst + j, src + j, (n - j) * sizeof(float));
  } else {
    for (; j + 2 * kW <= n; j += 2 * kW)
      at::vec::convert_from_float<T>(Vec::loadu(src + j), Vec::loadu(src + j + kW)).store(dst + j);
    if (j < n)  // staging is padded, the extra lanes are read but not stored
      at::vec::convert_from_float<T>(Vec::loadu(src + j), Vec::loadu(src + j + kW)).store(dst + j, n - j);
  }
}

using LoadFn = float (*)(const void*, int64_t, float*, int64_t, float, float*);
using StoreFn = void (*)(void*, const float*, int64_t);

LoadFn pick_load(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return &load_row<float>;
    case at::kHalf: return &load_row<c10::Half>;
    default: return &load_row<c10::BFloat16>;
  }
}

StoreFn pick_store(at::ScalarType t, bool stream) {
  switch (t) {
    case at::kFloat: return stream ? &store_row<float, true> : &store_row<float, false>;
    case at::kHalf: return stream ? &store_row<c10::Half, true> : &store_row<c10::Half, false>;
    default: return stream ? &store_row<c10::BFloat16, true> : &store_row<c10::BFloat16, false>;
  }
}

// ---------------------------------------------------------------------------------------------
// The divergence table: per-entry loss term ell and the gradients h = dD/dlq, k = dD/dlp.
// Entries with probability 0 contribute 0 (0 * log 0 = 0) and x / r with r = 0 is 0.
// forward_kl and reverse_kl never need it: their rows close in pass B (see pass_b, pass_d).
enum Div { kForwardKL = 0, kReverseKL = 1, kJSD = 2, kSkewForwardKL = 3, kSkewReverseKL = 4, kTVD = 5 };

struct Coef {
  Vec beta, omb, skew, oms;  // beta, 1-beta, skew, 1-skew
  int mix;                   // skew_*: log r = 0: log(r), 1: lp (r is p), 2: lq (r is q), as in the reference
};

// log for positive normal floats (and NaN), inlined like vexp: Cephes' logf (about 1 ulp).
#if defined(CPU_CAPABILITY_AVX512)
inline Vec vlog_normal(const Vec& v) {
  const __m512 x = v;
  __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_p5_1, _MM_MANT_SIGN_zero);  // x = m 2^e, m in [0.5, 1)
  __m512 e = _mm512_add_ps(_mm512_getexp_ps(x), _mm512_set1_ps(1.f));
  const __mmask16 lo = _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  m = _mm512_mask_add_ps(m, lo, m, m);  // m in [sqrt(1/2), sqrt(2))
  e = _mm512_mask_sub_ps(e, lo, e, _mm512_set1_ps(1.f));
  const __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.f)), z = _mm512_mul_ps(f, f);
  __m512 y = _mm512_set1_ps(7.0376836292E-2f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.1514610310E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.1676998740E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.2420140846E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.4249322787E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.6668057665E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.0000714765E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-2.4999993993E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(3.3333331174E-1f));
  y = _mm512_mul_ps(_mm512_mul_ps(y, f), z);
  y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
  y = _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z, y);
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), _mm512_add_ps(f, y));
}
#else
inline Vec vlog_normal(const Vec& v) { return v.log(); }
#endif

// log of a mixture of probabilities. The clamp only matters when both underflowed, where the
// terms it feeds are multiplied by a probability below FLT_MIN.
inline Vec log_mix(const Vec& m) { return vlog_normal(at::vec::maximum(m, Vec(FLT_MIN))); }

template <int DIV>
inline void terms(const Vec& q, const Vec& p, const Vec& lq, const Vec& lp, const Coef& cf, Vec& ell,
                  Vec& h, Vec& k) {
  static_assert(DIV != kForwardKL && DIV != kReverseKL, "closed form, see pass_b");
  const Vec zero(0.f);
  if constexpr (DIV == kJSD) {
    const Vec lm = log_mix(at::vec::fmadd(cf.beta, p, cf.omb * q));
    const Vec tp = Vec::blendv(zero, p * (lp - lm), p > zero);
    const Vec tq = Vec::blendv(zero, q * (lq - lm), q > zero);
    h = cf.omb * tq;
    k = cf.beta * tp;
    ell = h + k;
  } else if constexpr (DIV == kSkewForwardKL) {  // KL(p || r), r = skew p + (1-skew) q
    const Vec r = at::vec::fmadd(cf.skew, p, cf.oms * q);
    const Vec pr = Vec::blendv(zero, p / r, r > zero);
    const Vec lr = cf.mix == 0 ? log_mix(r) : cf.mix == 1 ? lp : lq;
    ell = Vec::blendv(zero, p * (lp - lr), p > zero);
    h = zero - cf.oms * (q * pr);
    k = ell + p - cf.skew * (p * pr);
  } else if constexpr (DIV == kSkewReverseKL) {  // KL(q || r), r = (1-skew) p + skew q
    const Vec r = at::vec::fmadd(cf.oms, p, cf.skew * q);
    const Vec qr = Vec::blendv(zero, q / r, r > zero);
    const Vec lr = cf.mix == 0 ? log_mix(r) : cf.mix == 1 ? lp : lq;
    ell = Vec::blendv(zero, q * (lq - lr), q > zero);
    h = ell + q - cf.skew * (q * qr);
    k = zero - cf.oms * (p * qr);
  } else {  // tvd
    const Vec half(0.5f);
    const Vec d = q - p;
    const Vec sg = d.gt(zero) - d.lt(zero);
    ell = half * d.abs();
    h = half * q * sg;
    k = zero - half * p * sg;
  }
}

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

// Lane-wise fp32 sums over a scratch row: a two-level cascade over blocks of kBlock entries.
struct Cascade {
  Vec total{0.f}, block{0.f};
  int64_t n = 0;
  inline void add(const Vec& v) {
    block = block + v;
    if (++n == kBlock / kW) flush();
  }
  inline void flush() { total = total + block; block = Vec(0.f); n = 0; }
  inline double value() { flush(); return hsum(total); }
};

// Lane-wise sums in float64 of fp32 terms, for the sums a gradient subtracts from its own terms
// (h_j - q_j sum(h) cancels when q_j -> 1): the sum then carries no rounding beyond that of the
// terms, which pass D uses bit for bit, so the cancellation is as exact as the terms.
struct DAcc {
#if defined(CPU_CAPABILITY_AVX512)
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  inline void add(const Vec& v) {
    const __m512 x = v;
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(x)));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))));
  }
  inline double value() const {
    __at_align__ double t[16];
    _mm512_storeu_pd(t, lo);
    _mm512_storeu_pd(t + 8, hi);
    double s = 0;
    for (int i = 0; i < 16; ++i) s += t[i];
    return s;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  inline void add(const Vec& v) {
    const __m256 x = v;
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
  }
  inline double value() const {
    __at_align__ double t[8];
    _mm256_storeu_pd(t, lo);
    _mm256_storeu_pd(t + 4, hi);
    double s = 0;
    for (int i = 0; i < 8; ++i) s += t[i];
    return s;
  }
#else
  double acc[kW] = {};
  inline void add(const Vec& v) {
    __at_align__ float t[kW];
    v.store(t);
    for (int64_t i = 0; i < kW; ++i) acc[i] += t[i];
  }
  inline double value() const {
    double s = 0;
    for (int64_t i = 0; i < kW; ++i) s += acc[i];
    return s;
  }
#endif
};

// x as an unevaluated sum hi + lo of floats, so that y - x = (y - hi) - lo keeps float64 accuracy
// when y is close to x.
struct Split {
  Vec hi, lo;
  explicit Split(double x) {
    const float h = static_cast<float>(x);
    hi = Vec(h);
    lo = Vec(std::isfinite(x) ? static_cast<float>(x - h) : 0.f);
  }
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
      const Vec l = DIV == kForwardKL ? Vec::blendv(zero, eb * (db - da), eb > zero)
                                      : Vec::blendv(zero, ea * (da - db), ea > zero);
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

// A vector with 1 in lane `lane` (0 <= lane < kW): a window into [0.., 1, 0..].
inline Vec unit(int64_t lane) {
  struct Table {
    __at_align__ float v[2 * kW];
    Table() { for (int64_t i = 0; i < 2 * kW; ++i) v[i] = i == kW ? 1.f : 0.f; }
  };
  static const Table t;
  return Vec::loadu(t.v + kW - lane);
}

// a * b + c with one rounding: at::vec's fmadd is only fused where the vector ISA has an FMA.
inline Vec fma1(const Vec& a, const Vec& b, const Vec& c) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return at::vec::fmadd(a, b, c);
#else
  __at_align__ float x[kW], y[kW], z[kW];
  a.store(x);
  b.store(y);
  c.store(z);
  for (int64_t i = 0; i < kW; ++i) z[i] = std::fma(x[i], y[i], z[i]);
  return Vec::loadu(z);
#endif
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
          g = vC * Vec::blendv(zero, q * ((d - M.hi) - M.lo), q > zero);
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
          g = vC * Vec::blendv(zero, p * ((d - M.hi) - M.lo), p > zero);
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
struct RowPtr {  // [B, R, V] tensor with arbitrary leading strides, element size es
  char* base = nullptr;
  int64_t s0 = 0, s1 = 0, es = 0, R = 1;
  RowPtr() = default;
  explicit RowPtr(const at::Tensor& t)
      : base(static_cast<char*>(t.data_ptr())), s0(t.stride(0)), s1(t.stride(1)), es(t.element_size()),
        R(t.size(1)) {}
  inline char* row(int64_t i) const { return base + ((i / R) * s0 + (i % R) * s1) * es; }
};

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

inline void store_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();  // order this thread's non-temporal stores before the op returns
#endif
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
bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// Byte range [lo, hi) a strided tensor may touch.
std::pair<uintptr_t, uintptr_t> byte_range(const at::Tensor& t) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(t.data_ptr());
  if (t.numel() == 0) return {lo, lo};
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return {lo, lo + (last + 1) * t.element_size()};
}

void check_grad_buffer(const at::Tensor& g, const at::Tensor& like, const char* gname, const char* lname,
                       const at::Tensor& other) {
  TORCH_CHECK(g.device().is_cpu(), "fastkd::kd_fwd: ", gname, " must be a CPU tensor");
  TORCH_CHECK(g.scalar_type() == like.scalar_type(), "fastkd::kd_fwd: ", gname, " must have the dtype of ", lname,
              " (", like.scalar_type(), "), got ", g.scalar_type());
  TORCH_CHECK(g.sizes() == like.sizes(), "fastkd::kd_fwd: ", gname, " must have the shape of ", lname, " ",
              like.sizes(), ", got ", g.sizes());
  TORCH_CHECK(g.size(2) <= 1 || g.stride(2) == 1, "fastkd::kd_fwd: ", gname, " must be contiguous in its last dim");
  TORCH_CHECK((g.size(0) <= 1 || g.stride(0) != 0) && (g.size(1) <= 1 || g.stride(1) != 0),
              "fastkd::kd_fwd: ", gname, " must not have rows sharing memory (stride 0)");
  // It may alias an input exactly (inplace mode: every row is read before it is written), but
  // not overlap one in any other way.
  for (const at::Tensor* in : {&like, &other}) {
    auto a = byte_range(g), b = byte_range(*in);
    if (a.first < b.second && b.first < a.second) {
      TORCH_CHECK(g.data_ptr() == in->data_ptr() && g.strides() == in->strides() &&
                      g.element_size() == in->element_size(),
                  "fastkd::kd_fwd: ", gname, " overlaps an input without being exactly that input");
    }
  }
}

void kd_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                const at::Tensor& loss, const std::optional<at::Tensor>& grad_student,
                const std::optional<at::Tensor>& grad_teacher, int64_t divergence, double temperature, double beta,
                double skew, int64_t ignore_index, double soft_weight, double hard_weight, bool scale_temperature,
                double softcap) {
  TORCH_CHECK(student.dim() == 3 && teacher.dim() == 3,
              "fastkd::kd_fwd: student and teacher must be 3-D [B, R, V], got ", student.sizes(), " and ",
              teacher.sizes());
  TORCH_CHECK(student.sizes() == teacher.sizes(), "fastkd::kd_fwd: student ", student.sizes(),
              " and teacher ", teacher.sizes(), " must have the same shape");
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(),
              "fastkd::kd_fwd: student and teacher must be CPU tensors");
  TORCH_CHECK(is_float_type(student.scalar_type()) && is_float_type(teacher.scalar_type()),
              "fastkd::kd_fwd: student and teacher must be float32, float16 or bfloat16, got ",
              student.scalar_type(), " and ", teacher.scalar_type());
  const int64_t B = student.size(0), R = student.size(1), V = student.size(2), N = B * R;
  TORCH_CHECK(V >= 1, "fastkd::kd_fwd: the vocabulary (last) dim must be non-empty");
  TORCH_CHECK((V <= 1 || student.stride(2) == 1) && (V <= 1 || teacher.stride(2) == 1),
              "fastkd::kd_fwd: student and teacher must be contiguous in their last dim (strides ",
              student.strides(), " and ", teacher.strides(), ")");
  TORCH_CHECK(loss.device().is_cpu() && loss.scalar_type() == at::kFloat && loss.dim() == 2 &&
                  loss.size(0) == B && loss.size(1) == R,
              "fastkd::kd_fwd: loss must be a float32 CPU tensor of shape [", B, ", ", R, "], got ",
              loss.scalar_type(), " ", loss.sizes());
  TORCH_CHECK(divergence >= 0 && divergence <= 5, "fastkd::kd_fwd: divergence code must be in 0..5, got ",
              divergence);
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), "fastkd::kd_fwd: temperature must be > 0, got ",
              temperature);
  TORCH_CHECK(divergence != kJSD || (beta > 0.0 && beta < 1.0),
              "fastkd::kd_fwd: jsd needs 0 < beta < 1 (beta 0 and 1 map to forward/reverse KL), got ", beta);
  TORCH_CHECK((divergence != kSkewForwardKL && divergence != kSkewReverseKL) || (skew >= 0.0 && skew <= 1.0),
              "fastkd::kd_fwd: skew must be in [0, 1], got ", skew);
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), "fastkd::kd_fwd: softcap must be >= 0 (0: none), got ",
              softcap);
  TORCH_CHECK(hard_weight == 0.0 || labels.has_value(), "fastkd::kd_fwd: hard_weight != 0 needs labels");

  const int64_t* lab = nullptr;
  int64_t l0 = 0, l1 = 0;
  if (labels.has_value()) {
    const at::Tensor& L = *labels;
    TORCH_CHECK(L.device().is_cpu() && L.scalar_type() == at::kLong && L.dim() == 2 && L.size(0) == B &&
                    L.size(1) == R,
                "fastkd::kd_fwd: labels must be an int64 CPU tensor of shape [", B, ", ", R, "], got ",
                L.scalar_type(), " ", L.sizes());
    lab = L.data_ptr<int64_t>();
    l0 = L.stride(0);
    l1 = L.stride(1);
    for (int64_t i = 0; i < N; ++i) {  // before any thread starts: errors stay on this thread
      const int64_t y = lab[(i / R) * l0 + (i % R) * l1];
      TORCH_CHECK(y == ignore_index || (y >= 0 && y < V), "fastkd::kd_fwd: label ", y, " at row ", i,
                  " is out of range for a vocabulary of ", V, " (ignore_index is ", ignore_index, ")");
    }
  }
  if (grad_student.has_value()) check_grad_buffer(*grad_student, student, "grad_student", "student", teacher);
  if (grad_teacher.has_value()) check_grad_buffer(*grad_teacher, teacher, "grad_teacher", "teacher", student);
  if (grad_student.has_value() && grad_teacher.has_value()) {
    auto a = byte_range(*grad_student), b = byte_range(*grad_teacher);
    TORCH_CHECK(!(a.first < b.second && b.first < a.second) || grad_student->numel() == 0,
                "fastkd::kd_fwd: grad_student and grad_teacher overlap");
  }
  if (N == 0) return;

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
  // r is exactly p or q at the ends of the skew range; use lp or lq then, as the reference does.
  const double w_p = divergence == kSkewForwardKL ? skew : 1.0 - skew;  // weight of p in r
  const int mix = w_p == 1.0 ? 1 : w_p == 0.0 ? 2 : 0;
  P.cf = {Vec(static_cast<float>(beta)), Vec(static_cast<float>(1.0 - beta)), Vec(static_cast<float>(skew)),
          Vec(static_cast<float>(1.0 - skew)), mix};
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
