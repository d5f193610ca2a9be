// CPU fast paths for moefleet, registered as torch.ops.moefleet.*. Each op has a plain torch
// reference in kernels/*.py that tests compare against; kernels/cpu_extension.py builds this
// file on first use with the machine's own compiler and falls back to the references when it
// cannot.
//
// Why C++ here: on a CPU, a decode step of a small model is bound by per-op overhead (Python
// and dispatch, a few microseconds each) and by copies the torch formulation needs (gathering
// every sequence's context out of the paged cache before attending). These ops read the paged
// cache in place.
//
// Shape legend: B sequences, H query heads, G key/value heads, S cache slots, W blocks per
// table, T tokens, N columns.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace moefleet {
namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// exp(x) for x <= 0 (softmax after subtracting the max), written so the compiler vectorizes
// it (glibc's expf is a call per element): 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, p the
// degree-6 Taylor polynomial (relative error ~2e-7, below float32's rounding of the sum).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// One (sequence, kv head) pair: the r = H / G query heads that share kv head g attend over
// positions [start, len) of the sequence, read slot by slot through its block table.
template <typename scalar_t>
void attend_one(const scalar_t* q, int64_t q_head_stride, scalar_t* out, int64_t out_head_stride,
                const scalar_t* k_base, int64_t k_slot_stride, const scalar_t* v_base, int64_t v_slot_stride,
                const int64_t* table, int64_t block_size, int64_t start, int64_t len, int64_t r, int64_t dk,
                int64_t dv, float scale, std::vector<float>& scratch) {
  const int64_t span = len - start;
  scratch.resize(static_cast<size_t>(r * dk + r * span + r * dv + dk * span));
  float* qf = scratch.data();          // [r, dk] scaled queries in float
  float* scores = qf + r * dk;         // [r, span]
  float* acc = scores + r * span;      // [r, dv]
  float* keys_t = acc + r * dv;        // [dk, span] this head's keys, transposed: the score
                                       // loop then runs along positions, one vector at a time
  for (int64_t j = 0; j < r; ++j)
    for (int64_t c = 0; c < dk; ++c) qf[j * dk + c] = to_float(q[j * q_head_stride + c]) * scale;
  for (int64_t p = start; p < len; ++p) {
    const scalar_t* kp = k_base + (table[p / block_size] * block_size + p % block_size) * k_slot_stride;
    for (int64_t c = 0; c < dk; ++c) keys_t[c * span + (p - start)] = to_float(kp[c]);
  }
  for (int64_t j = 0; j < r; ++j) {
    float* s = scores + j * span;
    std::fill(s, s + span, 0.f);
    for (int64_t c = 0; c < dk; ++c) {
      const float qc = qf[j * dk + c];
      const float* kc = keys_t + c * span;
#pragma omp simd
      for (int64_t i = 0; i < span; ++i) s[i] += qc * kc[i];
    }
  }
  for (int64_t j = 0; j < r; ++j) {
    float* s = scores + j * span;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < span; ++i) mx = std::max(mx, s[i]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < span; ++i) {
      s[i] = exp_nonpositive(s[i] - mx);
      sum += s[i];
    }
    const float inv = 1.f / sum;
    for (int64_t i = 0; i < span; ++i) s[i] *= inv;
  }
  std::fill(acc, acc + r * dv, 0.f);
  for (int64_t p = start; p < len; ++p) {
    const int64_t slot = table[p / block_size] * block_size + p % block_size;
    const scalar_t* vp = v_base + slot * v_slot_stride;
    for (int64_t j = 0; j < r; ++j) {
      const float w = scores[j * span + (p - start)];
      float* a = acc + j * dv;
#pragma omp simd
      for (int64_t c = 0; c < dv; ++c) a[c] += w * to_float(vp[c]);
    }
  }
  for (int64_t j = 0; j < r; ++j)
    for (int64_t c = 0; c < dv; ++c) out[j * out_head_stride + c] = static_cast<scalar_t>(acc[j * dv + c]);
}

// q [B, H, dk]; k_cache [S, G, dk], v_cache [S, G, dv] (any strides but a contiguous last dim:
// MLA's values are a view of its keys); block_tables [B, W] int64; context_lens [B] int64.
// Sequence b attends to positions [max(0, len - window), len) when window > 0, else [0, len).
// Returns [B, H, dv]: the same math as kernels.attention.paged_attention's decode rows.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                                  double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "q, k_cache, v_cache must be 3-d");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(2) == 1 && v_cache.stride(2) == 1,
              "the last dim of q, k_cache and v_cache must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_tables and context_lens must be int64");
  const int64_t B = q.size(0), H = q.size(1), dk = q.size(2), G = k_cache.size(1), dv = v_cache.size(2);
  TORCH_CHECK(k_cache.size(2) == dk, "k_cache head dim ", k_cache.size(2), " differs from q's ", dk);
  TORCH_CHECK(H % G == 0, "query heads ", H, " are not a multiple of kv heads ", G);
  const auto tables = block_tables.contiguous();
  const auto lens = context_lens.contiguous();
  TORCH_CHECK(tables.size(0) == B && lens.size(0) == B, "block_tables and context_lens need one row per sequence");
  const int64_t W = tables.size(1), r = H / G;
  auto out = at::empty({B, H, dv}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* tp = tables.data_ptr<int64_t>();
    const int64_t* lp = lens.data_ptr<int64_t>();
    at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / G, g = item % G;
        const int64_t len = lp[b];
        TORCH_CHECK(len >= 1 && len <= W * block_size, "context length ", len, " does not fit the block table");
        const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
        attend_one<scalar_t>(qp + b * q.stride(0) + g * r * q.stride(1), q.stride(1),
                             op + (b * H + g * r) * dv, dv, kp + g * k_cache.stride(1), k_cache.stride(0),
                             vp + g * v_cache.stride(1), v_cache.stride(0), tp + b * W, block_size, start, len, r, dk,
                             dv, static_cast<float>(scale), scratch);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace moefleet

TORCH_LIBRARY(moefleet, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "int block_size, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(moefleet, CPU, m) {
  m.impl("paged_decode_attention", &moefleet::paged_decode_attention);
}
