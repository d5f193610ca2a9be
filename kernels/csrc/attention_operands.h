// The operand checks both attention kernels (decode in cpu_ops.cpp, prefill in
// prefill_attention.cpp) make on the queries and the paged cache.
#pragma once

#include <ATen/ATen.h>

namespace moefleet {

// q [T, H, dk]; k_cache [S, G, dk], v_cache [S, G, dv] (any strides but a contiguous last dim:
// MLA's values are a view of its keys), one dtype, H a multiple of G.
inline void check_attention_operands(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "q, k_cache, v_cache must be 3-d");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(2) == 1 && v_cache.stride(2) == 1,
              "the last dim of q, k_cache and v_cache must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(k_cache.size(2) == q.size(2), "k_cache head dim ", k_cache.size(2), " differs from q's ", q.size(2));
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "query heads ", q.size(1), " are not a multiple of kv heads ",
              k_cache.size(1));
}

}  // namespace moefleet
