// Horizontal reductions of one at::vec vector, shared by the CPU kernels: a fixed-order sum (so
// results do not depend on how the vector was filled) and a NaN-propagating max. Templated on the
// element type (float, and double for the float64 paths).
//
// Include cpu_capability.h (or vec_math.h, which includes it) first: it selects at::vec's ISA.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace fastkd {
namespace {

template <typename T>
inline T hsum(const at::vec::Vectorized<T>& v) {  // fixed order
  constexpr int64_t n = at::vec::Vectorized<T>::size();
  __at_align__ T t[n];
  v.store(t);
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += t[i];
  return s;
}

template <typename T>
inline T hmax(const at::vec::Vectorized<T>& v) {  // NaN-propagating
  constexpr int64_t n = at::vec::Vectorized<T>::size();
  __at_align__ T t[n];
  v.store(t);
  T m = t[0];
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(t[i])) return t[i];
    m = std::max(m, t[i]);
  }
  return m;
}

}  // namespace
}  // namespace fastkd
