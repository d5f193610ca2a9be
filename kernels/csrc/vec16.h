// The 16-lane float vector every kernel computes in, in the form this CPU holds in registers.
//
// With AVX-512 it is one GCC vector of 64 bytes (one zmm register). Without it, a 64-byte GCC
// vector has no machine mode: GCC keeps such a vector in memory and lowers every operation piece
// by piece, a scalar times a vector becoming 16 scalar stores (on a Zen 3 EPYC the float32 panel
// GEMM ran at ~2 GFLOP/s, 4-25x slower than torch's F.linear). There it is a pair of 8-lane
// vectors (two ymm registers), with the same operators, lane order and memory layout.
//
// Both forms offer: + - * / (vector or float on either side), unary -, +=, comparisons giving a
// mask16, mask16 &, where(mask, a, b) for the lane-wise choice (a GCC vector's `m ? a : b`),
// v[i] for a lane, load16 from float or bfloat16, pow2_integral, horizontal_sum, sum_lanes_16,
// keep_in_register.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace moefleet {

typedef float vec8f __attribute__((vector_size(32)));
typedef int32_t vec8i __attribute__((vector_size(32)));
typedef float vec4f __attribute__((vector_size(16)));

// The sum of v's 8 lanes by halving (a compiler's own reduction of a simd loop summed the lanes
// one after another, a chain of dependent adds).
inline float horizontal_sum(vec8f h8) {
  const vec4f h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
  return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}

#ifdef __AVX512F__

// may_alias: float arrays (weights, keys) are read through this type.
typedef float vec16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t vec16i __attribute__((vector_size(64)));
typedef vec16i mask16;
typedef uint16_t vec16u16 __attribute__((vector_size(32), aligned(2), may_alias));

inline vec16 where(mask16 m, vec16 a, vec16 b) { return m ? a : b; }

// Makes the compiler hold v in a register from here on instead of folding its load into each
// instruction that uses it. GCC folds a panel's weight vector into every row's multiply-add as a
// memory operand, one 64-byte load per multiply-add: on Zen 4, which loads one 64-byte vector a
// cycle, a 4-row block then waited on loads (158 vs 198-213 GFLOP/s at 4 rows with the weights in
// L3, float32 3072x768 panels; kernels/csrc/panel_gemm.cpp).
inline void keep_in_register(vec16& v) { asm("" : "+v"(v)); }

inline vec16 load16(const float* p) { return *reinterpret_cast<const vec16*>(p); }

// 16 bfloat16 widened to float: a bfloat16 is a float's upper 16 bits.
inline vec16 load16(const c10::BFloat16* p) {
  const vec16i bits = __builtin_convertvector(*reinterpret_cast<const vec16u16*>(p), vec16i) << 16;
  return reinterpret_cast<const vec16&>(bits);
}

// 2^n lane by lane for integral n in [-126, 127], built in the exponent bits.
inline vec16 pow2_integral(vec16 n) {
  const vec16i bits = (__builtin_convertvector(n, vec16i) + 127) << 23;
  return reinterpret_cast<const vec16&>(bits);
}

typedef uint32_t vec16u32 __attribute__((vector_size(64)));

// Each lane rounded to bfloat16 as c10::BFloat16(float) rounds it (to nearest, ties to even; a
// NaN becomes 0x7FC0), still as a float: its low 16 bits zero.
inline vec16 round_to_bf16(vec16 v) {
  const vec16u32 bits = reinterpret_cast<const vec16u32&>(v);
  vec16u32 rounded = (bits + (0x7FFFu + ((bits >> 16) & 1u))) & 0xFFFF0000u;
  rounded = v != v ? vec16u32{} + 0x7FC00000u : rounded;
  return reinterpret_cast<const vec16&>(rounded);
}

// 16 lanes stored as bfloat16, rounded as round_to_bf16 rounds them (c10's conversion, one lane
// at a time, keeps a loop of bfloat16 stores scalar).
inline void store16(c10::BFloat16* p, vec16 v) {
  const vec16 rounded = round_to_bf16(v);
  const vec16u32 high = reinterpret_cast<const vec16u32&>(rounded) >> 16;
  *reinterpret_cast<vec16u16*>(p) = __builtin_convertvector(high, vec16u16);
}

inline float horizontal_sum(vec16 v) {
  return horizontal_sum(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                        __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
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

#else  // two 8-lane halves: lanes 0-7 in h[0], 8-15 in h[1]

typedef float vec8f_in __attribute__((vector_size(32), aligned(4), may_alias));  // unaligned loads
typedef uint16_t vec8u16 __attribute__((vector_size(16), aligned(2), may_alias));

struct mask16 {
  vec8i h[2];
};

struct vec16 {
  vec8f h[2];
  float operator[](int64_t i) const { return h[i >> 3][i & 7]; }
  // GCC gives a vector type its element type's alias set, so a lane may be written through a float&.
  float& operator[](int64_t i) { return reinterpret_cast<float*>(h)[i]; }
  vec16& operator+=(const vec16& b) {
    h[0] += b.h[0];
    h[1] += b.h[1];
    return *this;
  }
};

#define MOEFLEET_VEC16_ARITHMETIC(op)                                                                       \
  inline vec16 operator op(const vec16& a, const vec16& b) { return {{a.h[0] op b.h[0], a.h[1] op b.h[1]}}; } \
  inline vec16 operator op(const vec16& a, float b) { return {{a.h[0] op b, a.h[1] op b}}; }                 \
  inline vec16 operator op(float a, const vec16& b) { return {{a op b.h[0], a op b.h[1]}}; }
MOEFLEET_VEC16_ARITHMETIC(+)
MOEFLEET_VEC16_ARITHMETIC(-)
MOEFLEET_VEC16_ARITHMETIC(*)
MOEFLEET_VEC16_ARITHMETIC(/)
#undef MOEFLEET_VEC16_ARITHMETIC

#define MOEFLEET_VEC16_COMPARISON(op)                                                                        \
  inline mask16 operator op(const vec16& a, const vec16& b) { return {{a.h[0] op b.h[0], a.h[1] op b.h[1]}}; } \
  inline mask16 operator op(const vec16& a, float b) { return {{a.h[0] op b, a.h[1] op b}}; }
MOEFLEET_VEC16_COMPARISON(<)
MOEFLEET_VEC16_COMPARISON(>)
MOEFLEET_VEC16_COMPARISON(>=)
MOEFLEET_VEC16_COMPARISON(==)
#undef MOEFLEET_VEC16_COMPARISON

inline vec16 operator-(const vec16& a) { return {{-a.h[0], -a.h[1]}}; }
inline mask16 operator&(const mask16& a, const mask16& b) { return {{a.h[0] & b.h[0], a.h[1] & b.h[1]}}; }

inline vec16 where(const mask16& m, const vec16& a, const vec16& b) {
  return {{m.h[0] ? a.h[0] : b.h[0], m.h[1] ? a.h[1] : b.h[1]}};
}

// A no-op here: the constraint applies to one register, and a pair of halves held for the weights
// would take 4 of the 16 registers the accumulators need (the weights are read as FMA operands).
inline void keep_in_register(vec16&) {}

inline vec16 load16(const float* p) {
  return {{*reinterpret_cast<const vec8f_in*>(p), *reinterpret_cast<const vec8f_in*>(p + 8)}};
}

// 8 bfloat16 widened to float: a bfloat16 is a float's upper 16 bits.
inline vec8f load8(const c10::BFloat16* p) {
  const vec8i bits = __builtin_convertvector(*reinterpret_cast<const vec8u16*>(p), vec8i) << 16;
  return reinterpret_cast<const vec8f&>(bits);
}
inline vec16 load16(const c10::BFloat16* p) { return {{load8(p), load8(p + 8)}}; }

inline vec8f pow2_integral(vec8f n) {
  const vec8i bits = (__builtin_convertvector(n, vec8i) + 127) << 23;
  return reinterpret_cast<const vec8f&>(bits);
}
// 2^n lane by lane for integral n in [-126, 127], built in the exponent bits.
inline vec16 pow2_integral(const vec16& n) { return {{pow2_integral(n.h[0]), pow2_integral(n.h[1])}}; }

inline float horizontal_sum(const vec16& v) { return horizontal_sum(v.h[0] + v.h[1]); }

// Lane j of the 8-lane result = the sum of t[j]'s lanes: the 8-lane form of the tree below.
inline vec8f sum_lanes_8(const vec8f* t) {
  vec8f s1[4], s2[2];
  for (int i = 0; i < 4; ++i)  // lanes 0-3: t[2i]'s partial sums, 4-7: t[2i+1]'s
    s1[i] = __builtin_shufflevector(t[2 * i], t[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
            __builtin_shufflevector(t[2 * i], t[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; ++i)  // two lanes per vector, t[4i..4i+3]
    s2[i] = __builtin_shufflevector(s1[2 * i], s1[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
            __builtin_shufflevector(s1[2 * i], s1[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(s2[0], s2[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(s2[0], s2[1], 1, 3, 5, 7, 9, 11, 13, 15);
}

// Lane j = the sum of v[j]'s lanes, for 16 vectors at once (see the AVX-512 form): each vector's
// halves added, then an 8-lane transposing tree for v[0..7] and one for v[8..15].
inline vec16 sum_lanes_16(const vec16* v) {
  vec8f t[16];
  for (int i = 0; i < 16; ++i) t[i] = v[i].h[0] + v[i].h[1];
  return {{sum_lanes_8(t), sum_lanes_8(t + 8)}};
}

#endif

}  // namespace moefleet
