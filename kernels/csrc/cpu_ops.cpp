// CPU fast paths for moefleet, registered as torch.ops.moefleet.*. Each op has a plain torch
// reference in kernels/*.py that tests compare against; kernels/cpu_extension.py builds this
// file on first use with the machine's own compiler and falls back to the references when it
// cannot.
//
// Why C++ here: on a CPU, a decode step of a small model is bound by per-op overhead (Python
// and dispatch, a few microseconds each) and by copies the torch formulation needs (gathering
// every sequence's context out of the paged cache before attending). These ops read the paged
// cache in place, and run a shard's experts for a step in one call.
//
// Shape legend: B sequences, H query heads, G key/value heads, S cache slots, W blocks per
// table, T tokens, N columns.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "attention_operands.h"
#include "panel_gemm.h"
#include "vector_math.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace moefleet {
namespace {

// a[0, n) += w * v[0, n), v widened to float.
template <typename scalar_t>
inline void add_scaled_row(float* a, float w, const scalar_t* v, int64_t n) {
  int64_t c = 0;
  if constexpr (kVectorLoads<scalar_t>) {
    for (; c + 16 <= n; c += 16) {
      const vec16 sum = load16(a + c) + w * load16(v + c);
      std::memcpy(a + c, &sum, sizeof sum);
    }
  }
  for (; c < n; ++c) a[c] += w * to_float(v[c]);
}

// Where a decode row's keys and values are: the cache bases and slot strides, the block table.
template <typename scalar_t>
struct PagedContext {
  const scalar_t* k;  // the kv head's first key
  const scalar_t* v;
  int64_t k_slot_stride, k_head_stride, v_slot_stride, v_head_stride;
  const int64_t* table;
  int64_t block_size;
  // slots[i] = the cache slot of position start + i, for [start, len): block by block, with no
  // division per position.
  void slots_of(int64_t start, int64_t len, int64_t* slots) const {
    for (int64_t p = start; p < len;) {
      const int64_t block = p / block_size, first = block * block_size;
      const int64_t stop = std::min(len, first + block_size);
      const int64_t base = table[block] * block_size - first;
      for (; p < stop; ++p) slots[p - start] = base + p;
    }
  }
};

// q . k over dk entries (a multiple of 16) as a 16-lane vector whose lanes are still to be
// summed; DK > 0 is dk known at compile time. The compiler may fuse the products into
// multiply-adds differently for the unrolled and the runtime-length loop (the last bits differ:
// up to ~3e-7 against the loop this replaced), but a head dim always takes the same one, so a
// sequence's result does not depend on its batch.
template <int64_t DK, typename scalar_t>
inline vec16 partial_dot(const float* q, const scalar_t* k, int64_t dk) {
  const int64_t n = DK > 0 ? DK : dk;
  vec16 a = load16(q) * load16(k);
  for (int64_t c = 16; c < n; c += 16) a += load16(q + c) * load16(k + c);
  return a;
}

// Query heads whose value sums one pass keeps in registers (4 running sums each): 4 x 4 of
// AVX-512's 32 vector registers; AVX2's 16 hold one head's (each vec16 is two registers there).
#ifdef __AVX512F__
constexpr int64_t kValueHeads = 4;
#else
constexpr int64_t kValueHeads = 1;
#endif

// a[h][0, 16) += sum over positions i in [p0, p1) of s[h][i] * (v_i's 16 values at v), for NH
// query heads that share one kv head: each value vector is loaded once for all of them (a pass
// per head loaded it, its slot and its address once per head). Four running sums per head so
// that consecutive multiply-adds do not wait on each other, summed as (0 + 1) + (2 + 3).
template <int NH, typename scalar_t>
void add_values(const float* const* s, float* const* a, const scalar_t* v, const int64_t* slots, int64_t slot_stride,
                int64_t p0, int64_t p1) {
  vec16 sum[NH][4];
  for (int h = 0; h < NH; ++h) {
    sum[h][0] = load16(a[h]);
    sum[h][1] = sum[h][2] = sum[h][3] = vec16{};
  }
  int64_t i = p0;
  for (; i + 4 <= p1; i += 4) {
    vec16 value[4];
    for (int t = 0; t < 4; ++t) value[t] = load16(v + slots[i + t] * slot_stride);
    for (int h = 0; h < NH; ++h)
      for (int t = 0; t < 4; ++t) sum[h][t] += s[h][i + t] * value[t];
  }
  for (; i < p1; ++i) {
    const vec16 value = load16(v + slots[i] * slot_stride);
    for (int h = 0; h < NH; ++h) sum[h][0] += s[h][i] * value;
  }
  for (int h = 0; h < NH; ++h) {
    const vec16 total = (sum[h][0] + sum[h][1]) + (sum[h][2] + sum[h][3]);
    std::memcpy(a[h], &total, sizeof total);
  }
}

template <typename scalar_t>
using AddValuesFn = void (*)(const float* const*, float* const*, const scalar_t*, const int64_t*, int64_t, int64_t, int64_t);
template <typename scalar_t, size_t... N>
constexpr std::array<AddValuesFn<scalar_t>, sizeof...(N)> make_add_values(std::index_sequence<N...>) {
  return {add_values<N + 1, scalar_t>...};
}
template <typename scalar_t>
constexpr auto kAddValues = make_add_values<scalar_t>(std::make_index_sequence<kValueHeads>{});  // [heads - 1]

// Per-thread scratch an item reuses: scaled queries, scores and output sums in float, each
// head's per-position score vectors of a chunk, and the cache slot of each attended position.
struct AttendScratch {
  std::vector<float> floats;
  std::vector<vec16> partials;
  std::vector<int64_t> slots;
};

constexpr int64_t kScoreChunk = 16;  // positions scored together: one transposing reduction per head
constexpr int64_t kValueChunk = 64;  // positions whose values are summed while they sit in L1
constexpr int64_t kKeyAhead = 4;     // a position's key row is fetched this many positions before it is scored
// ... and, with its value row, brought towards L2 this many positions before (attend_heads says why).
constexpr int64_t kL2Ahead = 12;

// One sequence's kv heads [g0, g1), each with the r = H / G query heads that share it, over
// positions [start, len). Scores go position by position: a slot's key row (every kv head of
// the item) is read once, in memory order, and each position fetches the key row kKeyAhead
// positions on and its own value row, so that loads go out at an even pace beside the
// arithmetic. (Fetching 16 positions' rows at a time, 32 positions ahead, stalled on the
// prefetches themselves once the core's outstanding misses were full: tiny float32 at 64
// sequences in the engine took 1.61-1.85 ms of attention per step against 1.23-1.44 ms now,
// bfloat16 1.13-1.40 against 0.80-0.82; the small model's head dim 64 gained 10-15% in a
// microbench, cache flushed or not.) Each key and value row is also asked for kL2Ahead positions
// earlier with prefetcht2 (outer caches), so that the paced L1 prefetch mostly finds it on chip
// rather than in memory (tiny float32 at 64 sequences in the engine: 1.17-1.24 -> 0.89-1.00 ms
// of attention per decode step; small's head dim 64, cache flushed: 664-732 -> 528-563 us a layer;
// bfloat16 within this VM's noise). Values go in chunks and, inside a chunk, kv head by kv head:
// the value sums of the query heads sharing it stay in registers over the chunk (add_values),
// where slot-by-slot loops read and wrote every head's sums in memory at each position. Scores
// are direct dot products along the head dim; a head's result does not depend on which other
// heads share its item. With the cache warm, the dot products at a compile-time head dim, the
// shared value loads and a vector max took 370-405 -> 168-182 us for 64 sequences of 32-96
// positions (tiny's heads, Sapphire Rapids); with 48 MB read between calls, as the weights
// pass between layers in the engine, 627 -> 552 us (small's: 1100 -> 940).
template <typename scalar_t>
void attend_heads(const scalar_t* q, int64_t q_head_stride, scalar_t* out, const PagedContext<scalar_t>& ctx,
                  int64_t g0, int64_t g1, int64_t start, int64_t len, int64_t r, int64_t dk, int64_t dv, float scale,
                  AttendScratch& scratch) {
  const int64_t span = len - start, heads = (g1 - g0) * r;
  scratch.floats.resize(static_cast<size_t>(heads * (dk + span + dv)));
  scratch.slots.resize(static_cast<size_t>(span));
  float* qf = scratch.floats.data();  // [heads, dk] scaled queries in float
  float* scores = qf + heads * dk;    // [heads, span]
  float* acc = scores + heads * span; // [heads, dv]
  int64_t* slots = scratch.slots.data();
  ctx.slots_of(start, len, slots);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t c = 0; c < dk; ++c) qf[h * dk + c] = to_float(q[(g0 * r + h) * q_head_stride + c]) * scale;
  // This item's part of a slot's row: its kv heads, contiguous.
  const int64_t k_bytes = ((g1 - g0 - 1) * ctx.k_head_stride + dk) * sizeof(scalar_t);
  const int64_t v_bytes = ((g1 - g0 - 1) * ctx.v_head_stride + dv) * sizeof(scalar_t);
  const scalar_t* k0 = ctx.k + g0 * ctx.k_head_stride;
  const scalar_t* v0 = ctx.v + g0 * ctx.v_head_stride;
  // Blocks lie anywhere in the cache, and a block's rows span pages the hardware prefetcher does
  // not cross: without these the key and value loads were most of the kernel's time.
  // locality 3: prefetcht0, into L1; locality 1: prefetcht2, a hint for the outer caches.
  auto prefetch = [&](const scalar_t* base, int64_t slot_stride, int64_t bytes, int64_t from, int64_t to,
                      auto locality) {
    for (int64_t i = from; i < std::min(to, span); ++i) {
      const char* p = reinterpret_cast<const char*>(base + slots[i] * slot_stride);
      for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, decltype(locality)::value);
    }
  };
  constexpr std::integral_constant<int, 3> l1{};
  constexpr std::integral_constant<int, 1> l2{};
  // 16-lane paths where the head dims allow them, each pass on its own (the other keeps its
  // element-wise loop).
  bool vector_scores = false, vector_values = false;
  if constexpr (kVectorLoads<scalar_t>) {
    vector_scores = dk % 16 == 0;
    vector_values = dv % 16 == 0;
  }
  scratch.partials.resize(static_cast<size_t>(heads * kScoreChunk));
  vec16* partials = scratch.partials.data();  // [heads, kScoreChunk]
  // The score pass, for a head dim fixed at compile time (DK > 0: the products unroll and stay
  // in registers; a loop of runtime length per head and position, its pointers spilled, was about
  // a third of the kernel's time with the cache warm) or of any length (DK = 0).
  auto score_pass = [&](auto dk_tag) {
    constexpr int64_t DK = decltype(dk_tag)::value;
    prefetch(k0, ctx.k_slot_stride, k_bytes, 0, kKeyAhead, l1);
    for (int64_t i0 = 0; i0 < span; i0 += kScoreChunk) {
      const int64_t n = std::min(kScoreChunk, span - i0);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = i0 + j;
        prefetch(k0, ctx.k_slot_stride, k_bytes, i + kL2Ahead, i + kL2Ahead + 1, l2);
        prefetch(v0, ctx.v_slot_stride, v_bytes, i + kL2Ahead, i + kL2Ahead + 1, l2);
        prefetch(k0, ctx.k_slot_stride, k_bytes, i + kKeyAhead, i + kKeyAhead + 1, l1);
        prefetch(v0, ctx.v_slot_stride, v_bytes, i, i + 1, l1);  // read after the softmax, from L2
        const scalar_t* row = k0 + slots[i] * ctx.k_slot_stride;
        for (int64_t g = 0; g < g1 - g0; ++g) {
          const scalar_t* kp = row + g * ctx.k_head_stride;
          for (int64_t h = g * r; h < (g + 1) * r; ++h) {
            if constexpr (kVectorLoads<scalar_t>) {
              if (vector_scores) {  // the product stays a vector until the chunk's reduction
                partials[h * kScoreChunk + j] = partial_dot<DK>(qf + h * dk, kp, dk);
                continue;
              }
            }
            scores[h * span + i] = dot_row(qf + h * dk, kp, dk);
          }
        }
      }
      if (vector_scores) {
        // One transposing reduction (sum_lanes_16) per head gives the chunk's scores.
        for (int64_t h = 0; h < heads; ++h) {
          vec16* part = partials + h * kScoreChunk;
          for (int64_t j = n; j < kScoreChunk; ++j) part[j] = vec16{};
          const vec16 sums = sum_lanes_16(part);
          std::memcpy(scores + h * span + i0, &sums, n * sizeof(float));
        }
      }
    }
  };
  switch (vector_scores ? dk : 0) {
    case 32: score_pass(std::integral_constant<int64_t, 32>{}); break;
    case 64: score_pass(std::integral_constant<int64_t, 64>{}); break;
    case 128: score_pass(std::integral_constant<int64_t, 128>{}); break;
    default: score_pass(std::integral_constant<int64_t, 0>{});
  }
  for (int64_t h = 0; h < heads; ++h) {
    float* s = scores + h * span;
    float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)  // a chain of scalar maxes was ~8% of the kernel's time
    for (int64_t i = 0; i < span; ++i) mx = std::max(mx, s[i]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < span; ++i) {
      s[i] = exp_clamped(std::max(s[i] - mx, -87.f));  // <= 0: softmax after subtracting the max
      sum += s[i];
    }
    const float inv = 1.f / sum;
    for (int64_t i = 0; i < span; ++i) s[i] *= inv;
  }
  std::fill(acc, acc + heads * dv, 0.f);
  for (int64_t p0 = 0; p0 < span; p0 += kValueChunk) {
    const int64_t p1 = std::min(span, p0 + kValueChunk);
    for (int64_t g = g0; g < g1; ++g) {
      const scalar_t* vg = ctx.v + g * ctx.v_head_stride;
      const int64_t h_end = (g - g0 + 1) * r;
      if constexpr (kVectorLoads<scalar_t>) {
        if (vector_values) {
          // The query heads sharing this kv head, kValueHeads at a time, each value vector loaded once for them.
          for (int64_t h = (g - g0) * r; h < h_end; h += kValueHeads) {
            const int64_t nh = std::min(kValueHeads, h_end - h);
            const float* s[kValueHeads];
            float* a[kValueHeads];
            for (int64_t c = 0; c < dv; c += 16) {
              for (int64_t t = 0; t < nh; ++t) {
                s[t] = scores + (h + t) * span;
                a[t] = acc + (h + t) * dv + c;
              }
              kAddValues<scalar_t>[nh - 1](s, a, vg + c, slots, ctx.v_slot_stride, p0, p1);
            }
          }
          continue;
        }
      }
      for (int64_t h = (g - g0) * r; h < h_end; ++h)
        for (int64_t i = p0; i < p1; ++i) add_scaled_row(acc + h * dv, scores[h * span + i], vg + slots[i] * ctx.v_slot_stride, dv);
    }
  }
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t c = 0; c < dv; ++c) out[(g0 * r + h) * dv + c] = static_cast<scalar_t>(acc[h * dv + c]);
}

// q [B, H, dk]; k_cache [S, G, dk], v_cache [S, G, dv] (any strides but a contiguous last dim:
// MLA's values are a view of its keys); block_tables [B, W] int64; context_lens [B] int64.
// Sequence b attends to positions [max(0, len - window), len) when window > 0, else [0, len).
// Returns [B, H, dv]: the same math as kernels.attention.paged_attention's decode rows.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                                  double scale, int64_t window) {
  check_attention_operands(q, k_cache, v_cache);
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_tables and context_lens must be int64");
  const int64_t B = q.size(0), H = q.size(1), dk = q.size(2), G = k_cache.size(1), dv = v_cache.size(2);
  const auto tables = block_tables.contiguous();
  const auto lens = context_lens.contiguous();
  TORCH_CHECK(tables.size(0) == B && lens.size(0) == B, "block_tables and context_lens need one row per sequence");
  const int64_t W = tables.size(1), r = H / G;
  // A whole sequence per item where there are enough sequences to share among the threads;
  // otherwise (a few long decodes) one kv head per item, so every thread has work.
  const int64_t heads_per_item = B >= 2 * at::get_num_threads() ? G : 1;
  const int64_t items_per_row = G / heads_per_item;
  auto out = at::empty({B, H, dv}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* tp = tables.data_ptr<int64_t>();
    const int64_t* lp = lens.data_ptr<int64_t>();
    at::parallel_for(0, B * items_per_row, 1, [&](int64_t begin, int64_t end) {
      AttendScratch scratch;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / items_per_row, g0 = item % items_per_row * heads_per_item;
        const int64_t len = lp[b];
        TORCH_CHECK(len >= 1 && len <= W * block_size, "context length ", len, " does not fit the block table");
        const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
        const PagedContext<scalar_t> ctx{k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                                         k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
                                         tp + b * W, block_size};
        attend_heads<scalar_t>(qp + b * q.stride(0), q.stride(1), op + b * H * dv, ctx, g0, g0 + heads_per_item,
                               start, len, r, dk, dv, static_cast<float>(scale), scratch);
      }
    });
  });
  return out;
}

// Rotate-half ("neox") rotary on one head vector, rounded op by op as the torch reference
// (x * cos + rotate_half(x) * sin) rounds it, so float32 and bf16 results match it.
#ifdef __AVX512F__
// bfloat16 heads whose half is a multiple of 16, 16 lanes at a time with rotate_half's roundings
// (c10's scalar conversions keep its loop scalar: 3.2 ms for a 2048-token prefill of the small
// Mixtral, 1.5 ms this way).
inline void rotate_half_bf16x16(const c10::BFloat16* x, const c10::BFloat16* cos, const c10::BFloat16* sin,
                                c10::BFloat16* out, int64_t half) {
  for (int64_t c = 0; c < half; c += 16) {
    const vec16 first = load16(x + c), second = load16(x + c + half);
    store16(out + c, round_to_bf16(first * load16(cos + c)) + round_to_bf16(-second * load16(sin + c)));
    store16(out + c + half, round_to_bf16(second * load16(cos + c + half)) + round_to_bf16(first * load16(sin + c + half)));
  }
}
#endif

template <typename scalar_t>
inline void rotate_half(const scalar_t* x, const scalar_t* cos, const scalar_t* sin, scalar_t* out, int64_t d) {
  const int64_t half = d / 2;
#ifdef __AVX512F__
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (half % 16 == 0) return rotate_half_bf16x16(x, cos, sin, out, half);
  }
#endif
  for (int64_t c = 0; c < d; ++c) {
    const scalar_t rotated = c < half ? static_cast<scalar_t>(-x[c + half]) : x[c - half];
    const scalar_t a = static_cast<scalar_t>(x[c] * cos[c]);
    const scalar_t b = static_cast<scalar_t>(rotated * sin[c]);
    out[c] = static_cast<scalar_t>(a + b);
  }
}

// One step's new tokens: q [T, H, d] rotated in place; k [T, G, d] rotated and v [T, G, dv]
// copied into the cache slots slot_mapping [T] of k_cache [S, G, d] and v_cache [S, G, dv].
// cos, sin: [T, d] (or [T, 1, d]) in q's dtype. Replaces ~14 small ops per layer.
void rotary_and_write_kv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                         const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& slot_mapping) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be [T, heads, dim]");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && k_cache.stride(2) == 1 &&
                  v_cache.stride(2) == 1, "the last dim of q, k, v and the caches must be contiguous");
  const int64_t T = q.size(0), H = q.size(1), d = q.size(2), G = k.size(1), dv = v.size(2);
  TORCH_CHECK(d % 2 == 0 && k.size(2) == d, "q and k need the same even head dim");
  TORCH_CHECK(k_cache.size(1) == G && k_cache.size(2) == d && v_cache.size(1) == G && v_cache.size(2) == dv,
              "cache shapes do not match k and v");
  const auto c = cos.contiguous().view({T, d});
  const auto s = sin.contiguous().view({T, d});
  const auto slots = slot_mapping.contiguous();
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == T, "slot_mapping must be int64 [T]");
  TORCH_CHECK(c.scalar_type() == q.scalar_type() && k.scalar_type() == q.scalar_type() &&
                  k_cache.scalar_type() == q.scalar_type(), "q, k, cos, sin and the cache must share a dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary_and_write_kv", [&] {
    scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* cp = c.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* kc = k_cache.data_ptr<scalar_t>();
    scalar_t* vc = v_cache.data_ptr<scalar_t>();
    const int64_t* slot = slots.data_ptr<int64_t>();
    const int64_t num_slots = k_cache.size(0);
    for (int64_t t = 0; t < T; ++t)
      TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "cache slot ", slot[t], " outside [0, ", num_slots, ")");
    // Tokens shared among the threads, 8 at least a task: a decode step's writes go to scattered
    // cache slots that are mostly not in cache, and two threads keep twice the misses in flight
    // (tiny float32 at 64 sequences: ~110 us a layer on one thread in the engine, ~30 us warm).
    at::parallel_for(0, T, 8, [&](int64_t t_begin, int64_t t_end) {
      std::vector<scalar_t> head(d);
      for (int64_t t = t_begin; t < t_end; ++t) {
        const scalar_t* ct = cp + t * d;
        const scalar_t* st = sp + t * d;
        for (int64_t h = 0; h < H; ++h) {
          scalar_t* x = qp + t * q.stride(0) + h * q.stride(1);
          rotate_half(x, ct, st, head.data(), d);
          std::copy(head.begin(), head.end(), x);
        }
        for (int64_t g = 0; g < G; ++g) {
          rotate_half(kp + t * k.stride(0) + g * k.stride(1), ct, st, kc + slot[t] * k_cache.stride(0) + g * k_cache.stride(1), d);
          const scalar_t* vs = vp + t * v.stride(0) + g * v.stride(1);
          std::copy(vs, vs + dv, vc + slot[t] * v_cache.stride(0) + g * v_cache.stride(1));
        }
      }
    });
  });
}

// y = x @ w.T with w either a oneDNN-prepacked weight (kernels/linear.py packs them on CPU) or a
// plain [N, K] tensor. The packed op is reached through the dispatcher, as Python reaches it.
at::Tensor packed_or_plain_linear(const at::Tensor& x, const at::Tensor& w) {
  if (!w.is_mkldnn()) return at::linear(x, w);
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, w, c10::IValue(), std::string("none"), c10::List<std::optional<at::Scalar>>(),
                          std::string("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

template <typename scalar_t>
void scatter_weighted_rows(const scalar_t* src, int64_t count, const int64_t* rows, const float* row_weights,
                           at::Tensor& out) {
  const int64_t D = out.size(1);
  scalar_t* dst = out.data_ptr<scalar_t>();
  for (int64_t i = 0; i < count; ++i) {
    // Rounded to the output dtype before the add, as `index_add_(expert_out * weight)` does.
    const scalar_t w = static_cast<scalar_t>(row_weights[i]);
    scalar_t* o = dst + rows[i] * D;
    const scalar_t* e = src + i * D;
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(o[c] + static_cast<scalar_t>(e[c] * w));
  }
}

// A buffer of `elements` for run_panel_experts. Past glibc's largest mmap threshold (32 MiB) every
// allocation is a fresh mapping whose pages fault in, zeroed, on each call: a 2048-token prefill
// of the small Mixtral spent ~10% of its expert time there when its buffer per layer was 50 MB
// (it held gathered inputs and outputs too; its activations alone are 25 MB now). So a
// buffer that large is kept for the next call on this thread (the largest one a prefill has
// needed, one per thread): 157-169 -> 149-156 ms a layer of experts, the whole prefill step
// 1586-1665 -> 1447-1497 ms. Smaller ones come and go through malloc, which reuses them once
// the engine has fixed glibc's thresholds (cluster/malloc_tuning.py); glibc will not raise its
// mmap threshold past 32 MiB, so blocks this large are mapped afresh whatever it is told.
at::Tensor expert_scratch(int64_t elements, const at::TensorOptions& options) {
  constexpr int64_t kKeepFromBytes = int64_t{32} << 20;
  if (elements * static_cast<int64_t>(options.dtype().itemsize()) < kKeepFromBytes) return at::empty({elements}, options);
  thread_local at::Tensor kept;
  if (!kept.defined() || kept.scalar_type() != options.dtype().toScalarType() || kept.numel() < elements) {
    kept = at::Tensor();  // frees the old one before the new one is mapped
    kept = at::empty({elements}, options);
  }
  return kept.narrow(0, 0, elements);
}

// The busy experts over column panels (kernels/panel_linear.py), float32 or bfloat16 (T, the
// dtype of x and the panels): every expert's gate_up (SwiGLU fused), then every down projection,
// each pass one parallel region (panel_gemm_batch). Expert e's pairs are [start[e], start[e + 1])
// of sorted_rows and sorted_weights. The gate_up pass reads each pair's token row where it is in
// x, and the down pass adds each pair's weighted output into its token's row of `out`, experts in
// slot order (what grouped_swiglu promises): a gathered copy of the rows and a serial scatter
// afterwards were ~5% of a float32 decode step's expert time, with the second thread idle. Only
// the activations have a buffer. (A buffer per expert, from index_select and two empties, was
// ~24 ATen calls per layer, 20-30% of a bfloat16 decode layer's expert time at 16 sequences.)
template <typename T>
void run_panel_experts(const at::Tensor& x, const std::vector<int64_t>& sorted_rows,
                       const std::vector<float>& sorted_weights, const std::vector<int64_t>& start,
                       const std::vector<int64_t>& busy, at::TensorList w13, at::TensorList w2, at::Tensor& out) {
  const int64_t D = x.size(1), group = kPanelKGroup<T>;
  std::vector<int64_t> act_offset(start.size(), 0);
  int64_t act_elements = 0;
  for (const int64_t e : busy) {
    const int64_t I = w2[e].size(1) * group;
    TORCH_CHECK(w13[e].scalar_type() == x.scalar_type() && w2[e].scalar_type() == x.scalar_type() && w2[e].dim() == 3 &&
                    I > 0 && w13[e].size(1) * group == D && w13[e].size(0) * 16 >= I &&
                    w2[e].size(0) * kPanelWidth >= D,
                "expert slot ", e, ": ", w13[e].scalar_type(), " panels ", w13[e].sizes(), " / ", w2[e].sizes(),
                " do not fit ", x.scalar_type(), " hidden size ", D);
    act_offset[e] = act_elements;
    act_elements += (start[e + 1] - start[e]) * I;
  }
  auto buffer = expert_scratch(act_elements, x.options());
  T* act = buffer.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  T* outp = out.data_ptr<T>();
  std::vector<PanelMultiply<T>> gate_up, down;
  for (const int64_t e : busy) {
    const int64_t M = start[e + 1] - start[e], I = w2[e].size(1) * group;
    gate_up.push_back({xp, D, M, sorted_rows.data() + start[e], w13[e].data_ptr<T>(), w13[e].size(0), D,
                       act + act_offset[e], I, I, /*swiglu=*/true, nullptr, nullptr});
    down.push_back({act + act_offset[e], I, M, nullptr, w2[e].data_ptr<T>(), w2[e].size(0), I, outp, D, D,
                    /*swiglu=*/false, sorted_rows.data() + start[e], sorted_weights.data() + start[e]});
  }
  panel_gemm_batch<T>(gate_up);
  panel_gemm_batch<T>(down);
}

// The busy experts over oneDNN-packed (bf16) or plain weights, as run_panel_experts. Decode
// steps give each expert a few rows: splitting each small matmul over the threads costs a
// barrier per matmul, so the threads take whole experts instead (longest first, each to the
// least loaded thread), unless one expert outweighs a thread's fair share of the rows.
void run_packed_experts(const at::Tensor& x, const at::Tensor& index, const std::vector<int64_t>& start,
                        std::vector<int64_t> busy, at::TensorList w13, at::TensorList w2,
                        std::vector<at::Tensor>& outputs) {
  auto rows_of_expert = [&](int64_t e) { return start[e + 1] - start[e]; };
  auto run_expert = [&](int64_t e) {
    const auto expert_rows = x.index_select(0, index.narrow(0, start[e], rows_of_expert(e)));
    const auto gate_up = packed_or_plain_linear(expert_rows, w13[e]);
    const int64_t I = gate_up.size(1) / 2;
    const auto act = at::silu(gate_up.narrow(1, 0, I)).mul_(gate_up.narrow(1, I, I));
    outputs[e] = packed_or_plain_linear(act, w2[e]).contiguous();
  };
  int64_t most = 0;
  for (const int64_t e : busy) most = std::max(most, rows_of_expert(e));
  const int64_t N = start.back();
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(busy.size()));
  if (threads <= 1 || most * threads > N) {
    for (const int64_t e : busy) run_expert(e);
    return;
  }
  std::sort(busy.begin(), busy.end(), [&](int64_t a, int64_t b) { return rows_of_expert(a) > rows_of_expert(b); });
  std::vector<std::vector<int64_t>> share(threads);
  std::vector<int64_t> rows_of_thread(threads, 0);
  for (const int64_t e : busy) {
    const auto t = std::min_element(rows_of_thread.begin(), rows_of_thread.end()) - rows_of_thread.begin();
    share[t].push_back(e);
    rows_of_thread[t] += rows_of_expert(e);
  }
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (const int64_t e : share[t]) run_expert(e);
  });
}

// The experts of one shard for one step: hidden [R, D]; row_index, slots (local expert slot),
// weights (float): [N], one per (token, expert) pair; w13[s] [2I, D] and w2[s] [D, I] per slot
// (oneDNN-packed or plain), or column panels [ceil(I/16), D, 32] and [ceil(D/32), I, 32] (float32;
// bfloat16 [.., D/2, 64] and [.., I/2, 64])
// (kernels/panel_linear.py).
// Returns [num_rows, D]: each row's weighted sum over its pairs' experts. Pairs are grouped by
// slot in a stable counting sort, so every row accumulates in the order the torch reference
// (kernels.expert_ffn.grouped_swiglu) does; each busy expert reads its weights once.
at::Tensor grouped_swiglu(const at::Tensor& hidden, const at::Tensor& row_index, const at::Tensor& slots,
                          const at::Tensor& weights, at::TensorList w13, at::TensorList w2, int64_t num_rows) {
  TORCH_CHECK(hidden.dim() == 2, "hidden must be [R, D]");
  TORCH_CHECK(w13.size() == w2.size(), "w13 and w2 need one weight per slot");
  TORCH_CHECK(row_index.scalar_type() == at::kLong && slots.scalar_type() == at::kLong,
              "row_index and slots must be int64");
  const auto x = hidden.contiguous();
  const auto rows = row_index.contiguous();
  const auto slot = slots.contiguous();
  const auto weight = weights.to(at::kFloat).contiguous();
  const int64_t N = slot.numel(), E = static_cast<int64_t>(w13.size());
  TORCH_CHECK(rows.numel() == N && weight.numel() == N, "row_index, slots and weights need one entry per pair");
  auto out = at::zeros({num_rows, x.size(1)}, x.options());
  if (N == 0) return out;
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* sp = slot.data_ptr<int64_t>();
  const float* wp = weight.data_ptr<float>();
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(sp[i] >= 0 && sp[i] < E, "slot ", sp[i], " outside [0, ", E, ")");
    TORCH_CHECK(rp[i] >= 0 && rp[i] < x.size(0), "row ", rp[i], " outside [0, ", x.size(0), ")");
    ++start[sp[i] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> sorted_rows(N), fill(start.begin(), start.end() - 1);
  std::vector<float> sorted_weights(N);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t at = fill[sp[i]]++;
    sorted_rows[at] = rp[i];
    sorted_weights[at] = wp[i];
  }
  std::vector<int64_t> busy;
  for (int64_t e = 0; e < E; ++e)
    if (start[e + 1] > start[e]) busy.push_back(e);
  if (std::all_of(busy.begin(), busy.end(), [&](int64_t e) { return w13[e].dim() == 3; })) {
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                "column-panel experts take float32 or bfloat16 hidden states, got ", x.scalar_type());
    TORCH_CHECK(x.size(1) > 0, "hidden states have no columns");
    if (x.scalar_type() == at::kBFloat16)
      run_panel_experts<c10::BFloat16>(x, sorted_rows, sorted_weights, start, busy, w13, w2, out);
    else
      run_panel_experts<float>(x, sorted_rows, sorted_weights, start, busy, w13, w2, out);
    return out;
  }
  std::vector<at::Tensor> outputs(E);  // expert e's output rows [rows of e, D], in pair order
  run_packed_experts(x, at::from_blob(sorted_rows.data(), {N}, at::kLong), start, busy, w13, w2, outputs);
  // Summed in slot order, as the reference does, whichever thread computed an expert.
  for (const int64_t e : busy) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "grouped_swiglu", [&] {
      scatter_weighted_rows<scalar_t>(outputs[e].data_ptr<scalar_t>(), start[e + 1] - start[e],
                                      sorted_rows.data() + start[e], sorted_weights.data() + start[e], out);
    });
  }
  return out;
}

}  // namespace
}  // namespace moefleet

TORCH_LIBRARY(moefleet, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "int block_size, float scale, int window) -> Tensor");
  m.def("rotary_and_write_kv(Tensor(a!) q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(b!) k_cache, "
        "Tensor(c!) v_cache, Tensor slot_mapping) -> ()");
  m.def("grouped_swiglu(Tensor hidden, Tensor row_index, Tensor slots, Tensor weights, Tensor[] w13, Tensor[] w2, "
        "int num_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(moefleet, CPU, m) {
  m.impl("paged_decode_attention", &moefleet::paged_decode_attention);
  m.impl("rotary_and_write_kv", &moefleet::rotary_and_write_kv);
}

// The expert weights are oneDNN-packed tensors (dispatch key MkldnnCPU) or plain CPU tensors:
// one kernel for every backend key, as the op calls ATen for the backend-specific parts.
TORCH_LIBRARY_IMPL(moefleet, CompositeExplicitAutograd, m) {
  m.impl("grouped_swiglu", &moefleet::grouped_swiglu);
}
