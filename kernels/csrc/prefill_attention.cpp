// Prefill attention over the paged cache, read in place: every prefill chunk of a step attends to
// its sequence's context, causally, offset by the tokens cached before the chunk (and within the
// sliding window if there is one). The torch path (kernels/attention.py) gathers each chunk's
// context out of the cache and calls SDPA; for the short prompts of a batched prefill that cost
// ~3.6 ms a layer in the engine for 64 prompts of 32 tokens (tiny Mixtral, float32), mostly
// per-call and per-head overhead for ~35 MFLOP of work.
//
// Layout of the work: the query vectors of one chunk and one kv head, (row, head) pairs in order,
// go in blocks of 16, one per vector lane. Scores come out as one 16-lane vector per key position
// (a lane per query vector: each is a multiply-add of the lanes' queries by one broadcast key
// entry, with no horizontal sums), the softmax runs down the positions lane-wise, and the values
// accumulate into a [dv, 16] transposed output the same way. Keys and values are widened to float
// into a per-thread tile first, so every element type shares one inner loop.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention_operands.h"
#include "vector_math.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <vector>

namespace moefleet {
namespace {

constexpr int64_t kLanes = 16;     // query vectors per block
constexpr int64_t kKeyTile = 64;   // key (or value) rows widened to float at a time
constexpr int64_t kKeysAtOnce = 4; // score rows computed together, sharing each query load

inline vec16 broadcast(float x) { return vec16{} + x; }

// One work item: query vectors [v0, v0 + 16) of chunk `chunk`, kv head g.
struct Item {
  int64_t chunk, g, v0, cost;
};

struct Chunk {
  int64_t q_start, q_len, context_len;
  const int64_t* slots;  // [context_len] cache slot of each position
};

// Per-thread buffers an item reuses.
struct PrefillScratch {
  std::vector<vec16> qt;      // [dk] queries transposed: entry c of every lane's query, scaled
  std::vector<vec16> scores;  // [span] one lane per query vector, then the unnormalised probabilities
  std::vector<vec16> out;     // [dv] transposed output sums, a lane per query vector
  std::vector<float> tile;    // [kKeyTile, dim] keys or values widened to float
};

template <typename scalar_t>
void widen_rows(const scalar_t* base, int64_t slot_stride, const int64_t* slots, int64_t count, int64_t dim, float* tile) {
  for (int64_t i = 0; i < count; ++i) {
    const scalar_t* row = base + slots[i] * slot_stride;
    float* dst = tile + i * dim;
    for (int64_t c = 0; c < dim; ++c) dst[c] = static_cast<float>(row[c]);
  }
}

// acc[c] += probs[i] * values[i, c] over `count` rows, for `width` columns: 16 (the template
// argument, so the sums stay in registers) or, for the last columns of a head dim that is not a
// multiple of 16, any width (template argument 0).
template <int kWidth>
inline void add_values(vec16* acc, const vec16* probs, const float* values, int64_t count, int64_t stride, int64_t width) {
  constexpr int64_t kMax = 16;
  const int64_t w = kWidth ? kWidth : width;
  vec16 a[kMax];
  for (int64_t c = 0; c < w; ++c) a[c] = acc[c];
  for (int64_t i = 0; i < count; ++i) {
    const vec16 p = probs[i];
    const float* row = values + i * stride;
    for (int64_t c = 0; c < w; ++c) a[c] += p * row[c];
  }
  for (int64_t c = 0; c < w; ++c) acc[c] = a[c];
}

template <typename scalar_t>
void attend_block(const scalar_t* q, int64_t q_row_stride, int64_t q_head_stride, scalar_t* out, int64_t out_row_stride,
                  int64_t out_head_stride, const scalar_t* k_head, int64_t k_slot_stride, const scalar_t* v_head,
                  int64_t v_slot_stride, const Chunk& chunk, int64_t g, int64_t r, int64_t v0, int64_t dk, int64_t dv,
                  float scale, int64_t window, PrefillScratch& scratch) {
  const int64_t total = chunk.q_len * r, lanes = std::min(kLanes, total - v0);
  const int64_t first_pos = chunk.context_len - chunk.q_len;
  // Each lane's allowed positions [lo, hi); idle lanes of a last, partial block copy the last
  // real lane's (their queries are zero and their outputs are not written).
  alignas(64) int32_t lo_lane[kLanes], hi_lane[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    const int64_t pos = first_pos + (v0 + std::min(l, lanes - 1)) / r;
    hi_lane[l] = static_cast<int32_t>(pos + 1);
    lo_lane[l] = static_cast<int32_t>(window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0);
  }
  const int64_t lo = *std::min_element(lo_lane, lo_lane + kLanes), hi = *std::max_element(hi_lane, hi_lane + kLanes);
  const int64_t span = hi - lo;
  scratch.qt.assign(static_cast<size_t>(dk), vec16{});
  scratch.scores.resize(static_cast<size_t>(span));
  scratch.out.assign(static_cast<size_t>(dv), vec16{});
  scratch.tile.resize(static_cast<size_t>(kKeyTile * std::max(dk, dv)));
  vec16* qt = scratch.qt.data();
  for (int64_t l = 0; l < lanes; ++l) {
    const int64_t v = v0 + l;
    const scalar_t* qv = q + (chunk.q_start + v / r) * q_row_stride + (g * r + v % r) * q_head_stride;
    for (int64_t c = 0; c < dk; ++c) qt[c][l] = static_cast<float>(qv[c]) * scale;
  }
  vec16 lo_v, hi_v;
  for (int64_t l = 0; l < kLanes; ++l) lo_v[l] = static_cast<float>(lo_lane[l]), hi_v[l] = static_cast<float>(hi_lane[l]);
  const vec16 minus_inf = broadcast(-std::numeric_limits<float>::infinity());
  vec16* scores = scratch.scores.data();
  float* tile = scratch.tile.data();
  // Scores, a tile of key rows at a time; positions outside a lane's range get -inf.
  for (int64_t t0 = 0; t0 < span; t0 += kKeyTile) {
    const int64_t count = std::min(kKeyTile, span - t0);
    widen_rows(k_head, k_slot_stride, chunk.slots + lo + t0, count, dk, tile);
    int64_t i = 0;
    for (; i + kKeysAtOnce <= count; i += kKeysAtOnce) {
      const float* k0 = tile + i * dk;
      vec16 s0{}, s1{}, s2{}, s3{};
      for (int64_t c = 0; c < dk; ++c) {
        const vec16 qc = qt[c];
        s0 += qc * k0[c];
        s1 += qc * k0[dk + c];
        s2 += qc * k0[2 * dk + c];
        s3 += qc * k0[3 * dk + c];
      }
      scores[t0 + i] = s0, scores[t0 + i + 1] = s1, scores[t0 + i + 2] = s2, scores[t0 + i + 3] = s3;
    }
    for (; i < count; ++i) {
      vec16 s{};
      for (int64_t c = 0; c < dk; ++c) s += qt[c] * tile[i * dk + c];
      scores[t0 + i] = s;
    }
  }
  vec16 mx = minus_inf;
  for (int64_t p = 0; p < span; ++p) {
    const vec16 pos = broadcast(static_cast<float>(lo + p));
    scores[p] = where((pos >= lo_v) & (pos < hi_v), scores[p], minus_inf);
    mx = where(mx > scores[p], mx, scores[p]);
  }
  vec16 sum{};
  for (int64_t p = 0; p < span; ++p) {
    const vec16 x = scores[p] - mx;
    const vec16 e = exp_clamped(where(x < -87.f, broadcast(-87.f), x));
    scores[p] = where(x == minus_inf, vec16{}, e);  // masked positions weigh exactly 0
    sum += scores[p];
  }
  // Values: out[c] (lane = query vector) += p_lanes * value[c], a tile of value rows at a time.
  vec16* acc = scratch.out.data();
  for (int64_t t0 = 0; t0 < span; t0 += kKeyTile) {
    const int64_t count = std::min(kKeyTile, span - t0);
    widen_rows(v_head, v_slot_stride, chunk.slots + lo + t0, count, dv, tile);
    int64_t c0 = 0;
    for (; c0 + 16 <= dv; c0 += 16) add_values<16>(acc + c0, scores + t0, tile + c0, count, dv, 16);
    if (c0 < dv) add_values<0>(acc + c0, scores + t0, tile + c0, count, dv, dv - c0);
  }
  const vec16 inv = 1.f / sum;
  for (int64_t l = 0; l < lanes; ++l) {
    const int64_t v = v0 + l;
    scalar_t* ov = out + (chunk.q_start + v / r) * out_row_stride + (g * r + v % r) * out_head_stride;
    for (int64_t c = 0; c < dv; ++c) ov[c] = static_cast<scalar_t>(acc[c][l] * inv[l]);
  }
}

// q [T, H, dk]; k_cache [S, G, dk], v_cache [S, G, dv] (any strides but a contiguous last dim);
// chunks [C, 3] int64 rows (q_start, q_len, context_len): query rows [q_start, q_start + q_len)
// at positions [context_len - q_len, context_len); slots: every chunk's context slots, one after
// another (context_len each). Writes out [T, H, dv] at the chunks' rows; other rows are left as
// they are (a step's decode rows). The math of kernels.attention.paged_attention's prefill rows.
void paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& chunks, const at::Tensor& slots, double scale, int64_t window,
                             const at::Tensor& out) {
  check_attention_operands(q, k_cache, v_cache);
  TORCH_CHECK(chunks.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && chunks.dim() == 2 &&
                  chunks.size(1) == 3, "chunks must be int64 [C, 3] and slots int64");
  const int64_t T = q.size(0), H = q.size(1), dk = q.size(2), G = k_cache.size(1), dv = v_cache.size(2);
  TORCH_CHECK(out.dim() == 3 && out.size(0) == T && out.size(1) == H && out.size(2) == dv && out.stride(2) == 1 &&
                  out.scalar_type() == q.scalar_type(),
              "out must be a ", q.scalar_type(), " [", T, ", ", H, ", ", dv, "] tensor with a contiguous last dim");
  const auto chunk_table = chunks.contiguous();
  const auto slot_list = slots.contiguous();
  const int64_t C = chunk_table.size(0), r = H / G, num_slots = k_cache.size(0);
  const int64_t* ct = chunk_table.data_ptr<int64_t>();
  const int64_t* sp = slot_list.data_ptr<int64_t>();
  std::vector<Chunk> chunk_list;
  int64_t offset = 0;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t q_start = ct[3 * c], q_len = ct[3 * c + 1], context_len = ct[3 * c + 2];
    TORCH_CHECK(q_len >= 1 && q_len <= context_len && q_start >= 0 && q_start + q_len <= T, "chunk ", c,
                ": rows [", q_start, ", ", q_start + q_len, ") with context ", context_len, " do not fit ", T, " rows");
    TORCH_CHECK(offset + context_len <= slot_list.numel(), "slots hold fewer entries than the chunks' contexts");
    chunk_list.push_back({q_start, q_len, context_len, sp + offset});
    offset += context_len;
  }
  TORCH_CHECK(offset == slot_list.numel(), "slots hold ", slot_list.numel(), " entries, the chunks' contexts ", offset);
  for (int64_t i = 0; i < offset; ++i)
    TORCH_CHECK(sp[i] >= 0 && sp[i] < num_slots, "cache slot ", sp[i], " outside [0, ", num_slots, ")");
  std::vector<Item> items;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t v0 = 0; v0 < chunk_list[c].q_len * r; v0 += kLanes) {
        const int64_t last_pos = chunk_list[c].context_len - chunk_list[c].q_len +
                                 (std::min(v0 + kLanes, chunk_list[c].q_len * r) - 1) / r;
        items.push_back({c, g, v0, window > 0 ? std::min(window + kLanes, last_pos + 1) : last_pos + 1});
      }
  // Causal blocks differ in length: the longest go first and threads take the next item as they
  // finish, so no thread is left with a long one at the end.
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_prefill_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(items.size()));
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      thread_local PrefillScratch scratch;
      for (int64_t i = next++; i < static_cast<int64_t>(items.size()); i = next++) {
        const Item& item = items[i];
        attend_block<scalar_t>(qp, q.stride(0), q.stride(1), op, out.stride(0), out.stride(1),
                               kp + item.g * k_cache.stride(1), k_cache.stride(0), vp + item.g * v_cache.stride(1),
                               v_cache.stride(0), chunk_list[item.chunk], item.g, r, item.v0, dk, dv,
                               static_cast<float>(scale), window, scratch);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moefleet, m) {
  m.def("paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor chunks, Tensor slots, float scale, "
        "int window, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(moefleet, CPU, m) { m.impl("paged_prefill_attention", &paged_prefill_attention); }

}  // namespace moefleet
