// Prefill attention over the paged cache, read in place: every prefill chunk of a step attends to
// its sequence's context, causally, offset by the tokens cached before the chunk (and within the
// sliding window if there is one). The torch path (kernels/attention.py) gathers each chunk's
// context out of the cache and calls SDPA; for the short prompts of a batched prefill that cost
// ~3.6 ms a layer in the engine for 64 prompts of 32 tokens (tiny Mixtral, float32), mostly
// per-call and per-head overhead for ~35 MFLOP of work.
//
// Layout of the work: the query vectors of one chunk and one kv head, (row, head) pairs in order,
// go one per vector lane, 4 lane-vectors (64 query vectors) to a block. A block walks its keys in
// tiles of kKeyTile, flash-attention style: scores come out as one 16-lane vector per (key,
// lane-vector) (each lane's query times a broadcast key entry, no horizontal sums), an online
// softmax keeps a running max and sum per lane and rescales the transposed [dv, 64] output sums
// when the max grows, and the tile's probabilities times its values go into those sums. Nothing
// span-sized is stored: a tile's scores (16 KB) stay in L1. float32 keys and values are read in
// place through row pointers; other element types are widened to float a tile at a time, so every
// type shares the inner loops and the block's 64 queries share the copy.
//
// Why this shape: the first version (16 queries a block, the whole span's scores stored, two
// softmax passes, the span widened per block) multiplied one query vector by 4 broadcast keys per
// step and summed values into 16 accumulators fed by one probability each, so it waited on loads
// and on 4 dependent FMA chains: ~60-145 GFLOP/s on the 2 cores of a Xeon (Emerald Rapids) for a
// 1,900-token prompt (tiny Mixtral: head dim 32, GQA 2), where the expert GEMMs reach ~200. Here
// both products are register-blocked micro-kernels, scores as keys x lane-vectors (4 x 4: per key
// entry 4 query loads and 4 broadcasts feed 16 FMAs) and values as columns x lane-vectors (4 x 4
// likewise), and the softmax's exponentials (one per score, against 64 FMAs at head dim 32) take
// 9 instructions each (exp_shifted). Near the causal diagonal (and the window's edge) a tile is cut
// into segments where a contiguous range of the block's lane-vectors sees the keys, so a
// lane-vector never computes keys all its lanes are masked from (a 64-query block would otherwise
// compute a 32-row triangle of dead scores, more work than the 16-query blocks did for short
// prompts); lane masks apply only to the keys some of a lane-vector's lanes may not see. Measured
// against the first version in one process (float32, 2 threads, op alone, 2026-12-07): 1.71x for
// one 1,900-token prompt, 2.4x for 8, 1.72x for a 512-token chunk after 1,400 cached, 1.48x for
// 64 prompts of 32 tokens (docs/design-notes.md has the figures).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention_operands.h"
#include "vector_math.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace moefleet {
namespace {

constexpr int64_t kLanes = 16;    // query vectors per lane-vector
constexpr int kMaxVectors = 4;    // lane-vectors per block
constexpr int64_t kKeyTile = 64;  // keys (and values) widened to float and scored at a time

inline vec16 broadcast(float x) { return vec16{} + x; }
inline vec16 vmax(vec16 a, vec16 b) { return where(a > b, a, b); }

constexpr float kLog2e = 1.44269504088896341f;

// e^(s - m) for finite scores s <= m, given m log2(e) (shift2): 2^t with t = s log2(e) - shift2
// (one FMA), t = n + f with n integral and |f| <= 1/2, 2^f by a degree-5 polynomial fitted for
// relative error (2.3e-7 in float32, as exp_clamped's 2e-7), times 2^n. The exponentials were a
// fifth of the kernel's vector instructions at head dim 32: with AVX-512's round and scale
// instructions this is 9 where exp_clamped, its clamp and the subtraction took 16. t's rounding
// error grows with |t| but only where e^t is too small to count, and shift2's own rounding is the
// same factor for every score of a lane, which the normalisation cancels. Far below -126, scalef
// gives 0 (a denormal on the way), never garbage.
inline vec16 exp_shifted(vec16 s, vec16 shift2) {
  const vec16 t = s * kLog2e - shift2;
#ifdef __AVX512F__
  const vec16 n = static_cast<vec16>(_mm512_roundscale_ps(static_cast<__m512>(t), _MM_FROUND_TO_NEAREST_INT));
  const vec16 f = t - n;
  vec16 p = f * 0.0013276288518682122f + 0.009675540030002594f;
  p = p * f + 0.05550713837146759f;
  p = p * f + 0.24022120237350464f;
  p = p * f + 0.6931469440460205f;
  p = p * f + 1.0000001192092896f;
  return static_cast<vec16>(_mm512_scalef_ps(static_cast<__m512>(p), static_cast<__m512>(n)));
#else
  const vec16 x = t * 0.693147180559945309f;
  return exp_clamped(where(x < -87.f, broadcast(-87.f), x));
#endif
}

#ifdef __AVX512F__
// m[i][l] becomes m[l][i]: four stages, stage b swapping bit b of the vector index with bit b of
// the lane (8 pairs of two-vector shuffles each). Queries go into the lanes and sums come out of
// them this way, 16 x 16 at a time: lane by lane, those copies were a quarter of the kernel's time
// for 64 prompts of 32 tokens in float32 (1.03 ms on one thread, 0.78 ms without), near half in
// bfloat16.
template <int b>
inline void transpose_stage(vec16* m) {
  for (int i = 0; i < 16; ++i) {
    if (i & (1 << b)) continue;
    const vec16 lo = m[i], hi = m[i | (1 << b)];
    if constexpr (b == 0) {
      m[i] = __builtin_shufflevector(lo, hi, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
      m[i | 1] = __builtin_shufflevector(lo, hi, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    } else if constexpr (b == 1) {
      m[i] = __builtin_shufflevector(lo, hi, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
      m[i | 2] = __builtin_shufflevector(lo, hi, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    } else if constexpr (b == 2) {
      m[i] = __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
      m[i | 4] = __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    } else {
      m[i] = __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
      m[i | 8] = __builtin_shufflevector(lo, hi, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    }
  }
}

inline void transpose16(vec16* m) {
  transpose_stage<0>(m);
  transpose_stage<1>(m);
  transpose_stage<2>(m);
  transpose_stage<3>(m);
}

// 16 floats or bfloat16 (vec16.h's store16, rounded as c10 rounds) from a vector.
template <typename T>
inline void store_lanes(T* p, vec16 v) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(p, &v, sizeof v);
  } else {
    store16(p, v);
  }
}
#endif

// Register blocks of the two micro-kernels for a segment of nv lane-vectors: keys scored at once
// (score_keys) and value columns summed at once (add_values), so that nv x that many sums are in
// flight (8-18 of AVX-512's 32 registers; an FMA's 4 cycles of latency times 2 FMA units want at
// least 8) and loads stay well under one per FMA. 6 x 4 for 4 lane-vectors measured 3-10% slower
// than 4 x 4, and tiles of 96 or 128 keys alike or slower than 64.
#ifdef __AVX512F__
template <int nv>
constexpr int kKeysAtOnce = nv == 1 ? 8 : nv == 2 ? 8 : nv == 3 ? 6 : 4;
template <int nv>
constexpr int kColumnsAtOnce = nv == 1 ? 16 : nv == 2 ? 8 : nv == 3 ? 6 : 4;
#else  // 16 registers of 8 lanes: a vec16 takes two
template <int nv>
constexpr int kKeysAtOnce = nv == 1 ? 4 : nv == 2 ? 2 : 1;
template <int nv>
constexpr int kColumnsAtOnce = nv == 1 ? 4 : nv == 2 ? 2 : 1;
#endif

// One work item: query vectors [v0, v0 + 64) of chunk `chunk`, kv head g (fewer at its end).
struct Item {
  int64_t chunk, g, v0, cost;
};

struct Chunk {
  int64_t q_start, q_len, context_len;
  const int64_t* slots;  // [context_len] cache slot of each position
};

// Per-thread buffers a block reuses.
struct PrefillScratch {
  std::vector<vec16> qt;      // [dk, kMaxVectors] queries transposed: entry c of every lane's query, scaled
  std::vector<vec16> scores;  // [kKeyTile, kMaxVectors] the tile's scores, then its unnormalised probabilities
  std::vector<vec16> out;     // [dv, kMaxVectors] transposed output sums, a lane per query vector
  std::vector<float> keys;    // [kKeyTile, dk] the tile's keys widened to float (not float32's: read in place)
  std::vector<float> values;  // [kKeyTile, dv] and its values
};

// Points rows[i] at the float row of slot slots[i] of a head (base), i < count: float32 rows are
// read in place, other element types are widened into `tile` ([count, dim]) first.
template <typename scalar_t>
void gather_rows(const scalar_t* base, int64_t slot_stride, const int64_t* slots, int64_t count, int64_t dim,
                 float* tile, const float** rows) {
  for (int64_t i = 0; i < count; ++i) {
    const scalar_t* row = base + slots[i] * slot_stride;
    if constexpr (std::is_same_v<scalar_t, float>) {
      rows[i] = row;
    } else {
      float* dst = tile + i * dim;
      int64_t c = 0;
      if constexpr (kVectorLoads<scalar_t>)
        for (; c + 16 <= dim; c += 16) {
          const vec16 widened = load16(row + c);
          std::memcpy(dst + c, &widened, sizeof widened);
        }
      for (; c < dim; ++c) dst[c] = static_cast<float>(row[c]);
      rows[i] = dst;
    }
  }
}

// Asks for the cache rows of the next tile while this one computes: a context's slots are runs of
// a cache block's rows scattered over the cache, which the hardware's stride prefetch follows
// only within a run.
template <typename scalar_t>
void prefetch_rows(const scalar_t* base, int64_t slot_stride, const int64_t* slots, int64_t count, int64_t dim) {
  for (int64_t i = 0; i < count; ++i) {
    const char* row = reinterpret_cast<const char*>(base + slots[i] * slot_stride);
    for (int64_t b = 0; b < dim * static_cast<int64_t>(sizeof(scalar_t)); b += 64) __builtin_prefetch(row + b, 0, 3);
  }
}

// scores[i][j] = keys[i] . qt[., j] for kb keys and nv lane-vectors: the c loop loads nv query
// vectors and multiplies each by kb broadcast key entries (qt and scores start at the segment's
// first lane-vector; rows of both are kMaxVectors apart).
template <int nv, int kb>
inline void score_keys(const vec16* qt, const float* const* keys, int64_t dk, vec16* scores) {
  vec16 acc[kb][nv];  // zeroed element by element: `= {}` became a rep stos and a copy through the stack
  for (int i = 0; i < kb; ++i)
    for (int j = 0; j < nv; ++j) acc[i][j] = vec16{};
  const float* row[kb];
  for (int i = 0; i < kb; ++i) row[i] = keys[i];
  for (int64_t c = 0; c < dk; ++c) {
    vec16 q[nv];
    for (int j = 0; j < nv; ++j) q[j] = qt[c * kMaxVectors + j];
    for (int i = 0; i < kb; ++i) {
      const float k = row[i][c];
      for (int j = 0; j < nv; ++j) acc[i][j] += q[j] * k;
    }
  }
  for (int i = 0; i < kb; ++i)
    for (int j = 0; j < nv; ++j) scores[i * kMaxVectors + j] = acc[i][j];
}

template <int nv>
void score_segment(const vec16* qt, const float* const* keys, int64_t dk, int64_t count, vec16* scores) {
  constexpr int kb = kKeysAtOnce<nv>;
  int64_t i = 0;
  for (; i + kb <= count; i += kb) score_keys<nv, kb>(qt, keys + i, dk, scores + i * kMaxVectors);
  for (; i < count; ++i) score_keys<nv, 1>(qt, keys + i, dk, scores + i * kMaxVectors);
}

// out[c][j] += sum_i values[i][c] * probs[i][j] for cb columns from `values`' first, nv lane-vectors
// and `count` keys: per key, nv probability vectors times cb broadcast value entries.
template <int nv, int cb>
inline void add_values(vec16* out, const vec16* probs, const float* const* values, int64_t c0, int64_t count) {
  vec16 acc[cb][nv];
  for (int c = 0; c < cb; ++c)
    for (int j = 0; j < nv; ++j) acc[c][j] = out[c * kMaxVectors + j];
  for (int64_t i = 0; i < count; ++i) {
    vec16 p[nv];
    for (int j = 0; j < nv; ++j) p[j] = probs[i * kMaxVectors + j];
    for (int c = 0; c < cb; ++c) {
      const float v = values[i][c0 + c];
      for (int j = 0; j < nv; ++j) acc[c][j] += p[j] * v;
    }
  }
  for (int c = 0; c < cb; ++c)
    for (int j = 0; j < nv; ++j) out[c * kMaxVectors + j] = acc[c][j];
}

template <int nv>
void value_segment(vec16* out, const vec16* probs, const float* const* values, int64_t dv, int64_t count) {
  constexpr int cb = kColumnsAtOnce<nv>;
  int64_t c = 0;
  for (; c + cb <= dv; c += cb) add_values<nv, cb>(out + c * kMaxVectors, probs, values, c, count);
  for (; c < dv; ++c) add_values<nv, 1>(out + c * kMaxVectors, probs, values, c, count);
}

// Keys [k0, k1) of the tile that lane-vectors [ja, jb) of the block see (all of them some key).
struct Segment {
  int64_t k0, k1;
  int ja, jb;
};

template <typename scalar_t>
void attend_block(const scalar_t* q, int64_t q_row_stride, int64_t q_head_stride, scalar_t* out, int64_t out_row_stride,
                  int64_t out_head_stride, const scalar_t* k_head, int64_t k_slot_stride, const scalar_t* v_head,
                  int64_t v_slot_stride, const Chunk& chunk, int64_t g, int64_t r, int64_t v0, int64_t dk, int64_t dv,
                  float scale, int64_t window, PrefillScratch& scratch) {
  const int64_t total = chunk.q_len * r, lanes = std::min(kMaxVectors * kLanes, total - v0);
  const int nv = static_cast<int>((lanes + kLanes - 1) / kLanes);
  const int64_t first_pos = chunk.context_len - chunk.q_len;
  // Each lane's allowed positions [lo, hi); idle lanes of a last, partial lane-vector copy the
  // last real lane's (their queries are zero and their outputs are not written). Positions grow
  // with the lane, so a lane-vector sees [its first lane's lo, its last lane's hi) and every one
  // of its lanes sees [its last lane's lo, its first lane's hi): only keys outside that need masks.
  vec16 lo_v[kMaxVectors], hi_v[kMaxVectors];
  int64_t seen_lo[kMaxVectors], seen_hi[kMaxVectors], all_lo[kMaxVectors], all_hi[kMaxVectors];
  for (int j = 0; j < nv; ++j)
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t pos = first_pos + (v0 + std::min(j * kLanes + l, lanes - 1)) / r;
      const int64_t hi = pos + 1, lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      hi_v[j][l] = static_cast<float>(hi);
      lo_v[j][l] = static_cast<float>(lo);
      if (l == 0) seen_lo[j] = lo, all_hi[j] = hi;
      if (l == kLanes - 1) all_lo[j] = lo, seen_hi[j] = hi;
    }
  scratch.qt.assign(static_cast<size_t>(dk * kMaxVectors), vec16{});
  scratch.scores.resize(static_cast<size_t>(kKeyTile * kMaxVectors));
  scratch.out.assign(static_cast<size_t>(dv * kMaxVectors), vec16{});
  scratch.keys.resize(static_cast<size_t>(kKeyTile * dk));
  scratch.values.resize(static_cast<size_t>(kKeyTile * dv));
  // Lane l's query and output rows: query vector v0 + l is (row, head) pair (v0 + l) / r, % r.
  const scalar_t* q_lane[kMaxVectors * kLanes];
  scalar_t* out_lane[kMaxVectors * kLanes];
  for (int64_t l = 0, row = chunk.q_start + v0 / r, head = g * r + v0 % r; l < lanes; ++l) {
    q_lane[l] = q + row * q_row_stride + head * q_head_stride;
    out_lane[l] = out + row * out_row_stride + head * out_head_stride;
    if (++head == (g + 1) * r) head = g * r, ++row;
  }
  vec16* qt = scratch.qt.data();
  int64_t q0 = 0;  // entries before q0 went in 16 x 16 at a time
#ifdef __AVX512F__
  if constexpr (kVectorLoads<scalar_t>) {
    for (; q0 + kLanes <= dk; q0 += kLanes)
      for (int j = 0; j < nv; ++j) {
        vec16 m[kLanes];
        for (int64_t l = 0; l < kLanes; ++l)
          m[l] = j * kLanes + l < lanes ? load16(q_lane[j * kLanes + l] + q0) * scale : vec16{};
        transpose16(m);
        for (int64_t i = 0; i < kLanes; ++i) qt[(q0 + i) * kMaxVectors + j] = m[i];
      }
  }
#endif
  float* qt_lanes = reinterpret_cast<float*>(qt);  // [dk][kMaxVectors * kLanes]
  for (int64_t l = 0; l < lanes; ++l)
    for (int64_t c = q0; c < dk; ++c) qt_lanes[c * kMaxVectors * kLanes + l] = static_cast<float>(q_lane[l][c]) * scale;
  const vec16 minus_inf = broadcast(-std::numeric_limits<float>::infinity());
  vec16 run_max[kMaxVectors], run_sum[kMaxVectors];
  for (int j = 0; j < nv; ++j) run_max[j] = minus_inf, run_sum[j] = vec16{};
  vec16* scores = scratch.scores.data();
  vec16* acc = scratch.out.data();
  const float* key_rows[kKeyTile];
  const float* value_rows[kKeyTile];
  const int64_t lo = seen_lo[0], hi = seen_hi[nv - 1];
  for (int64_t t0 = lo; t0 < hi; t0 += kKeyTile) {
    const int64_t t1 = std::min(t0 + kKeyTile, hi), count = t1 - t0;
    gather_rows(k_head, k_slot_stride, chunk.slots + t0, count, dk, scratch.keys.data(), key_rows);
    gather_rows(v_head, v_slot_stride, chunk.slots + t0, count, dv, scratch.values.data(), value_rows);
    if (t1 < hi) {
      const int64_t ahead = std::min(kKeyTile, hi - t1);
      prefetch_rows(k_head, k_slot_stride, chunk.slots + t1, ahead, dk);
      prefetch_rows(v_head, v_slot_stride, chunk.slots + t1, ahead, dv);
    }
    // Segments: lane-vector j sees key k when seen_lo[j] <= k < seen_hi[j]; both bounds grow with
    // j, so the lane-vectors seeing a key are a range [ja, jb) that changes at those bounds.
    Segment segments[2 * kMaxVectors + 1];
    int num_segments = 0;
    for (int64_t k = t0; k < t1;) {
      int ja = 0, jb = 0;
      while (ja < nv && seen_hi[ja] <= k) ++ja;
      while (jb < nv && seen_lo[jb] <= k) ++jb;
      int64_t k1 = t1;
      if (ja < nv) k1 = std::min(k1, seen_hi[ja]);
      if (jb < nv) k1 = std::min(k1, seen_lo[jb]);
      if (ja < jb) {
        segments[num_segments++] = {k, k1, ja, jb};
        const vec16* qs = qt + ja;
        const float* const* ks = key_rows + (k - t0);
        vec16* ss = scores + (k - t0) * kMaxVectors + ja;
        switch (jb - ja) {
          case 1: score_segment<1>(qs, ks, dk, k1 - k, ss); break;
          case 2: score_segment<2>(qs, ks, dk, k1 - k, ss); break;
          case 3: score_segment<3>(qs, ks, dk, k1 - k, ss); break;
          default: score_segment<4>(qs, ks, dk, k1 - k, ss); break;
        }
      }
      k = k1;
    }
    // Online softmax, lane-vector by lane-vector over the keys it sees in this tile: the new
    // running max rescales the sums so far, then the scores become e^(score - max).
    for (int j = 0; j < nv; ++j) {
      const int64_t k0 = std::max(t0, seen_lo[j]), k1 = std::min(t1, seen_hi[j]);
      if (k0 >= k1) continue;
      const bool masked = k0 < all_lo[j] || k1 > all_hi[j];
      // The tile's max: four running maxima, one chain of dependent vmaxps being 4 cycles a key.
      vec16 tile_max[4] = {minus_inf, minus_inf, minus_inf, minus_inf};
      if (masked) {
        for (int64_t k = k0; k < k1; ++k) {
          vec16& s = scores[(k - t0) * kMaxVectors + j];
          if (k < all_lo[j] || k >= all_hi[j]) {
            const vec16 pos = broadcast(static_cast<float>(k));
            s = where((pos >= lo_v[j]) & (pos < hi_v[j]), s, minus_inf);
          }
          tile_max[k & 3] = vmax(tile_max[k & 3], s);
        }
      } else {
        int64_t k = k0;
        for (; k + 4 <= k1; k += 4)
          for (int u = 0; u < 4; ++u) tile_max[u] = vmax(tile_max[u], scores[(k + u - t0) * kMaxVectors + j]);
        for (; k < k1; ++k) tile_max[0] = vmax(tile_max[0], scores[(k - t0) * kMaxVectors + j]);
      }
      const vec16 new_max = vmax(run_max[j], vmax(vmax(tile_max[0], tile_max[1]), vmax(tile_max[2], tile_max[3])));
      // A lane that has seen no key yet keeps -inf; shifting by 0 there keeps its e^ at 0, not NaN.
      const vec16 shift = where(new_max == minus_inf, vec16{}, new_max);
      if (horizontal_sum(where(new_max > run_max[j], broadcast(1.f), vec16{})) > 0) {  // once the max settles, rarely
        const vec16 d = run_max[j] - shift;  // -inf where a lane had seen no key
        const vec16 rescale = exp_clamped(where(d < -87.f, broadcast(-87.f), d));
        run_max[j] = new_max;
        run_sum[j] = run_sum[j] * rescale;
        for (int64_t c = 0; c < dv; ++c) acc[c * kMaxVectors + j] = acc[c * kMaxVectors + j] * rescale;
      }
      const vec16 shift2 = shift * kLog2e;
      vec16 sum{};
      for (int64_t k = k0; k < k1; ++k) {
        vec16& s = scores[(k - t0) * kMaxVectors + j];
        vec16 e = exp_shifted(s, shift2);
        if (masked) e = where(s == minus_inf, vec16{}, e);  // masked positions weigh exactly 0
        s = e;
        sum += e;
      }
      run_sum[j] += sum;
    }
    // Values: out[c][j] (lane = query vector) += p[k][j] * value[k][c], segment by segment.
    for (int n = 0; n < num_segments; ++n) {
      const Segment& seg = segments[n];
      vec16* os = acc + seg.ja;
      const vec16* ps = scores + (seg.k0 - t0) * kMaxVectors + seg.ja;
      const float* const* vs = value_rows + (seg.k0 - t0);
      switch (seg.jb - seg.ja) {
        case 1: value_segment<1>(os, ps, vs, dv, seg.k1 - seg.k0); break;
        case 2: value_segment<2>(os, ps, vs, dv, seg.k1 - seg.k0); break;
        case 3: value_segment<3>(os, ps, vs, dv, seg.k1 - seg.k0); break;
        default: value_segment<4>(os, ps, vs, dv, seg.k1 - seg.k0); break;
      }
    }
  }
  for (int j = 0; j < nv; ++j) {
    const vec16 inv = 1.f / run_sum[j];
    for (int64_t c = 0; c < dv; ++c) acc[c * kMaxVectors + j] = acc[c * kMaxVectors + j] * inv;
  }
  int64_t o0 = 0;  // entries before o0 went out 16 x 16 at a time
#ifdef __AVX512F__
  if constexpr (kVectorLoads<scalar_t>) {
    for (; o0 + kLanes <= dv; o0 += kLanes)
      for (int j = 0; j < nv; ++j) {
        vec16 m[kLanes];
        for (int64_t i = 0; i < kLanes; ++i) m[i] = acc[(o0 + i) * kMaxVectors + j];
        transpose16(m);
        for (int64_t l = 0; l < kLanes && j * kLanes + l < lanes; ++l) store_lanes(out_lane[j * kLanes + l] + o0, m[l]);
      }
  }
#endif
  const float* sums = reinterpret_cast<const float*>(acc);  // [dv][kMaxVectors * kLanes]
  for (int64_t l = 0; l < lanes; ++l)
    for (int64_t c = o0; c < dv; ++c) out_lane[l][c] = static_cast<scalar_t>(sums[c * kMaxVectors * kLanes + l]);
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
  constexpr int64_t kBlock = kMaxVectors * kLanes;
  std::vector<Item> items;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t v0 = 0; v0 < chunk_list[c].q_len * r; v0 += kBlock) {
        const int64_t end = std::min(v0 + kBlock, chunk_list[c].q_len * r);
        const int64_t first_pos = chunk_list[c].context_len - chunk_list[c].q_len;
        const int64_t last_pos = first_pos + (end - 1) / r;
        const int64_t keys = window > 0 ? std::min(window + (end - 1 - v0) / r, last_pos + 1) : last_pos + 1;
        items.push_back({c, g, v0, keys * (end - v0)});
      }
  // Threads take the next item as they finish. Items go by (chunk, kv head), the costliest first,
  // and within one the longest blocks first: the threads then read one head's keys and values at a
  // time, which stay in L2 (a 1,900-token context is ~0.5 MB a head at head dim 32; in order of
  // length alone every block read another head's, 15 MB for 8 such prompts), and the list still
  // ends with short blocks, so no thread is left with a long one at the end.
  std::vector<int64_t> group_cost(static_cast<size_t>(C * G), 0);
  for (const Item& item : items) group_cost[item.chunk * G + item.g] += item.cost;
  std::stable_sort(items.begin(), items.end(), [&](const Item& a, const Item& b) {
    const int64_t ga = a.chunk * G + a.g, gb = b.chunk * G + b.g;
    if (ga != gb) return group_cost[ga] != group_cost[gb] ? group_cost[ga] > group_cost[gb] : ga < gb;
    return a.cost > b.cost;
  });
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
