// Helpers over the 16-lane vector (vec16.h) that the kernel files share: widening, dot
// products, exp.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "vec16.h"

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace moefleet {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// Element types with a 16-lane widening load (vec16.h's load16); others go lane by lane.
template <typename scalar_t>
constexpr bool kVectorLoads = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;

// q . k over n entries, q already in float: one 16-lane accumulator, then a halving reduction
// (summing the lanes one after another was most of the kernel's time).
template <typename scalar_t>
inline float dot_row(const float* q, const scalar_t* k, int64_t n) {
  int64_t c = 0;
  float dot = 0.f;
  if constexpr (kVectorLoads<scalar_t>) {
    vec16 acc{};
    for (; c + 16 <= n; c += 16) acc += load16(q + c) * load16(k + c);
    dot = horizontal_sum(acc);
  }
  for (; c < n; ++c) dot += q[c] * to_float(k[c]);
  return dot;
}

// 2^n for integral n in [-126, 127], built in the exponent bits.
inline float pow2_integral(float n) {
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
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
