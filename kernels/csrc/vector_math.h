// The 16-lane float vector both kernel files use, and the exp they share. Written with GCC/Clang
// vector extensions rather than intrinsics: a 16-lane float vector is one AVX-512 register or two
// AVX2 ones, whichever -march=native gives.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace moefleet {

// may_alias: float arrays (weights, keys) are read through this type.
typedef float vec16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t vec16i __attribute__((vector_size(64)));

typedef uint16_t vec16u16 __attribute__((vector_size(32), aligned(2), may_alias));
typedef float vec8f __attribute__((vector_size(32)));
typedef float vec4f __attribute__((vector_size(16)));

inline vec16 load16(const float* p) { return *reinterpret_cast<const vec16*>(p); }

// Makes the compiler hold v in a register from here on instead of folding its load into each
// instruction that uses it. GCC folds a panel's weight vector into every row's multiply-add as a
// memory operand, one 64-byte load per multiply-add: on Zen 4, which loads one 64-byte vector a
// cycle, a 4-row block then waited on loads (158 vs 198-213 GFLOP/s at 4 rows with the weights in
// L3, float32 3072x768 panels; kernels/csrc/panel_gemm.cpp). A no-op without AVX-512, where
// vec16 spans two registers and the constraint does not apply.
inline void keep_in_register(vec16& v) {
#ifdef __AVX512F__
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// 16 bfloat16 widened to float: a bfloat16 is a float's upper 16 bits.
inline vec16 load16(const c10::BFloat16* p) {
  const vec16i bits = __builtin_convertvector(*reinterpret_cast<const vec16u16*>(p), vec16i) << 16;
  return reinterpret_cast<const vec16&>(bits);
}

// The lanes' sum by halving (a compiler's own reduction of a simd loop summed the 16 lanes one
// after another, a chain of 16 dependent adds).
inline float horizontal_sum(vec16 v) {
  const vec8f h8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vec4f h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
  return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}

// 2^n for integral n in [-126, 127], built in the exponent bits.
inline float pow2_integral(float n) {
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

inline vec16 pow2_integral(vec16 n) {
  const vec16i bits = (__builtin_convertvector(n, vec16i) + 127) << 23;
  return reinterpret_cast<const vec16&>(bits);
}

// Lane j = the sum of v[j]'s lanes, for 16 vectors at once: a transposing tree of 15 shuffle
// pairs and adds, where 16 separate horizontal_sum calls take 64 (attention scores at head dim
// 32 were mostly these reductions).
inline vec16 sum_lanes_16(const vec16* v) {
  vec16 s1[8], s2[4], s3[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: v[2i]'s partial sums, 8-15: v[2i+1]'s
    s1[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
            __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)  // four lanes per vector, v[4i..4i+3]
    s2[i] = __builtin_shufflevector(s1[2 * i], s1[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
            __builtin_shufflevector(s1[2 * i], s1[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // two lanes per vector, v[8i..8i+7]
    s3[i] = __builtin_shufflevector(s2[2 * i], s2[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
            __builtin_shufflevector(s2[2 * i], s2[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(s3[0], s3[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(s3[0], s3[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// e^x for x in [-87, 88] (callers clamp; e^x stays a normal float there), a float or lane by lane
// on a vec16, written so the compiler vectorizes it (libm's expf is a call per element):
// x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative error
// ~2e-7, about float32's rounding), times 2^n.
template <typename T>
inline T exp_clamped(T x) {
  const float shifter = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const T n = (x * 1.44269504088896341f + shifter) - shifter;
  const T r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  T p = r * (1.f / 720) + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  return p * pow2_integral(n);
}

}  // namespace moefleet
