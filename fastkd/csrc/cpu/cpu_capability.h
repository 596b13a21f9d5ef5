// The vector ISA for ATen's at::vec in fastkd's CPU kernels. Include it before any ATen vec
// header (vec_math.h and the kernel files do so first).
#pragma once

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
