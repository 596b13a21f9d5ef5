// Shared by the CPU kernels (csrc/cpu/*.cpp): the vector ISA selection, inlined exp/log, fixed-order
// sums, row loads/stores in any float dtype, and the divergence table, in fp32 vectors and in
// scalar float64 (the float64 paths, for gradcheck).
//
// Include it FIRST in a translation unit: it must define CPU_CAPABILITY before any ATen vec header.
// Everything here has internal linkage (an anonymous namespace), so each kernel file gets its own
// copy, compiled with that file's flags.
#pragma once

#include "cpu_capability.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../kd_checks.h"
#include "vec_reduce.h"

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

inline LoadFn pick_load(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return &load_row<float>;
    case at::kHalf: return &load_row<c10::Half>;
    default: return &load_row<c10::BFloat16>;
  }
}

inline StoreFn pick_store(at::ScalarType t, bool stream) {
  switch (t) {
    case at::kFloat: return stream ? &store_row<float, true> : &store_row<float, false>;
    case at::kHalf: return stream ? &store_row<c10::Half, true> : &store_row<c10::Half, false>;
    default: return stream ? &store_row<c10::BFloat16, true> : &store_row<c10::BFloat16, false>;
  }
}

// ---------------------------------------------------------------------------------------------
// The divergence table: per-entry loss term ell and the gradients h = dD/dlq, k = dD/dlp.
// Entries with probability 0 contribute 0 (0 * log 0 = 0) and x / r with r = 0 is 0. The masks
// test == 0, not > 0, so that a NaN probability stays NaN (a NaN logit makes its row NaN).
// (kd_fwd closes forward_kl and reverse_kl rows in closed form instead; sparse_kd_fwd uses all six.)
enum Div { kForwardKL = 0, kReverseKL = 1, kJSD = 2, kSkewForwardKL = 3, kSkewReverseKL = 4, kTVD = 5 };

struct Coef {
  Vec beta, omb, skew, oms;  // beta, 1-beta, skew, 1-skew
  int mix;                   // skew_*: log r = 0: log(r), 1: lp (r is p), 2: lq (r is q), as in the reference
};

inline Coef make_coef(int64_t divergence, double beta, double skew) {
  // r is exactly p or q at the ends of the skew range; use lp or lq then, as the reference does.
  const double w_p = divergence == kSkewForwardKL ? skew : 1.0 - skew;  // weight of p in r
  const int mix = w_p == 1.0 ? 1 : w_p == 0.0 ? 2 : 0;
  return {Vec(static_cast<float>(beta)), Vec(static_cast<float>(1.0 - beta)), Vec(static_cast<float>(skew)),
          Vec(static_cast<float>(1.0 - skew)), mix};
}

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
  const Vec zero(0.f);
  if constexpr (DIV == kForwardKL) {
    ell = Vec::blendv(p * (lp - lq), zero, p == zero);
    h = zero - p;
    k = ell + p;
  } else if constexpr (DIV == kReverseKL) {
    ell = Vec::blendv(q * (lq - lp), zero, q == zero);
    h = ell + q;
    k = zero - q;
  } else if constexpr (DIV == kJSD) {
    const Vec lm = log_mix(at::vec::fmadd(cf.beta, p, cf.omb * q));
    const Vec tp = Vec::blendv(p * (lp - lm), zero, p == zero);
    const Vec tq = Vec::blendv(q * (lq - lm), zero, q == zero);
    h = cf.omb * tq;
    k = cf.beta * tp;
    ell = h + k;
  } else if constexpr (DIV == kSkewForwardKL) {  // KL(p || r), r = skew p + (1-skew) q
    const Vec r = at::vec::fmadd(cf.skew, p, cf.oms * q);
    const Vec pr = Vec::blendv(p / r, zero, r == zero);
    const Vec lr = cf.mix == 0 ? log_mix(r) : cf.mix == 1 ? lp : lq;
    ell = Vec::blendv(p * (lp - lr), zero, p == zero);
    h = zero - cf.oms * (q * pr);
    k = ell + p - cf.skew * (p * pr);
  } else if constexpr (DIV == kSkewReverseKL) {  // KL(q || r), r = (1-skew) p + skew q
    const Vec r = at::vec::fmadd(cf.oms, p, cf.skew * q);
    const Vec qr = Vec::blendv(q / r, zero, r == zero);
    const Vec lr = cf.mix == 0 ? log_mix(r) : cf.mix == 1 ? lp : lq;
    ell = Vec::blendv(q * (lq - lr), zero, q == zero);
    h = ell + q - cf.skew * (q * qr);
    k = zero - cf.oms * (p * qr);
  } else {  // tvd
    const Vec half(0.5f);
    const Vec d = q - p;
    const Vec sg = (d.gt(zero) - d.lt(zero)) + (d - d);  // + (d - d): NaN where d is NaN
    ell = half * d.abs();
    h = half * q * sg;
    k = zero - half * p * sg;
  }
}

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

inline void store_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();  // order this thread's non-temporal stores before the op returns
#endif
}

inline bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

using checks::byte_range;  // ../kd_checks.h: shared with the CUDA kernels

// ---------------------------------------------------------------------------------------------
// Scalar float64: the float64 paths (an input is float64: gradcheck, debugging). Plain loops over
// per-thread float64 scratch rows; the formulas are the reference's, entry by entry.

// One row of n entries of dtype t -> float64.
inline void load_row_f64(const void* src, at::ScalarType t, int64_t n, double* dst) {
  switch (t) {
    case at::kDouble: std::memcpy(dst, src, n * sizeof(double)); break;
    case at::kFloat: for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<const float*>(src)[j]; break;
    case at::kHalf: for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(static_cast<const c10::Half*>(src)[j]); break;
    default: for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(static_cast<const c10::BFloat16*>(src)[j]);
  }
}

// float64 -> one row of dtype t (rounded once).
inline void store_row_f64(void* dst, at::ScalarType t, const double* src, int64_t n) {
  switch (t) {
    case at::kDouble: std::memcpy(dst, src, n * sizeof(double)); break;
    case at::kFloat: for (int64_t j = 0; j < n; ++j) static_cast<float*>(dst)[j] = static_cast<float>(src[j]); break;
    case at::kHalf: for (int64_t j = 0; j < n; ++j) static_cast<c10::Half*>(dst)[j] = static_cast<c10::Half>(static_cast<float>(src[j])); break;
    default: for (int64_t j = 0; j < n; ++j) static_cast<c10::BFloat16*>(dst)[j] = static_cast<c10::BFloat16>(static_cast<float>(src[j]));
  }
}

// log(w1 exp(l1) + w2 exp(l2)) for weights in [0, 1], -inf when both terms are: the reference's _log_mix.
inline double log_mix_f64(double w1, double l1, double w2, double l2) {
  constexpr double ninf = -std::numeric_limits<double>::infinity();
  const double x = w1 > 0 ? l1 + std::log(w1) : ninf, y = w2 > 0 ? l2 + std::log(w2) : ninf;
  const double m = std::max(x, y);
  if (std::isnan(x) || std::isnan(y)) return std::numeric_limits<double>::quiet_NaN();
  if (m == ninf) return ninf;
  return m + std::log1p(std::exp(-std::abs(x - y)));
}

// The divergence table for one entry (see terms), divergence code div.
inline void terms_f64(int64_t div, double q, double p, double lq, double lp, double beta, double skew, double& ell,
                      double& h, double& k) {
  // == 0 tests, as in terms: NaN stays NaN
  auto xlogy = [](double x, double lx, double ly) { return x == 0 ? 0.0 : x * (lx - ly); };
  auto sdiv = [](double x, double y) { return y == 0 ? 0.0 : x / y; };
  switch (div) {
    case kForwardKL: ell = xlogy(p, lp, lq); h = -p; k = ell + p; break;
    case kReverseKL: ell = xlogy(q, lq, lp); h = ell + q; k = -q; break;
    case kJSD: {
      const double lm = log_mix_f64(beta, lp, 1.0 - beta, lq);
      const double tp = xlogy(p, lp, lm), tq = xlogy(q, lq, lm);
      ell = beta * tp + (1.0 - beta) * tq; h = (1.0 - beta) * tq; k = beta * tp;
      break;
    }
    case kSkewForwardKL: {
      const double lr = log_mix_f64(skew, lp, 1.0 - skew, lq), r = std::exp(lr);
      ell = xlogy(p, lp, lr); h = -(1.0 - skew) * sdiv(p * q, r); k = ell + p - skew * sdiv(p * p, r);
      break;
    }
    case kSkewReverseKL: {
      const double lr = log_mix_f64(1.0 - skew, lp, skew, lq), r = std::exp(lr);
      ell = xlogy(q, lq, lr); h = ell + q - skew * sdiv(q * q, r); k = -(1.0 - skew) * sdiv(q * p, r);
      break;
    }
    default: {
      const double d = q - p, sg = std::isnan(d) ? d : (d > 0) - (d < 0);
      ell = 0.5 * std::abs(d); h = 0.5 * q * sg; k = -0.5 * p * sg;
    }
  }
}

// Per-thread float64 scratch, 64-byte aligned.
struct F64Scratch {
  std::unique_ptr<double, decltype(&std::free)> mem{nullptr, &std::free};
  explicit F64Scratch(size_t n, const char* op) {
    mem.reset(static_cast<double*>(std::aligned_alloc(64, ((std::max<size_t>(n, 1) * sizeof(double) + 63) / 64) * 64)));
    TORCH_CHECK(mem, op, ": out of memory for ", n, " float64 scratch entries");
  }
  double* get() const { return mem.get(); }
};

}  // namespace
}  // namespace fastkd
