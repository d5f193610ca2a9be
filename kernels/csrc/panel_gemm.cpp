// See panel_gemm.h; the vector type is vector_math.h's.

#include "panel_gemm.h"
#include "vector_math.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <cmath>
#include <exception>
#include <type_traits>
#include <utility>

#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

namespace moefleet {
namespace {

using bf16 = c10::BFloat16;
// Rows per register block: 12 x 2 accumulators of 16 lanes fill 24 of AVX-512's 32 registers.
// AVX2 has 16 registers of 8 lanes: 4 rows x 4 accumulators, the weights read as FMA operands.
// GCC spills 2 of the 16 accumulators there (the broadcast input needs a register); 2 and 4 rows
// measured alike on a Zen 3 EPYC within its noise, and 3 rows (no spill) 393-397 vs 428-473 us
// for 64 rows of a 1024x256 layer with cold weights, alike at 16 rows, not yet tried in the engine.
#ifdef __AVX512F__
constexpr int kMaxRows = 12;
#else
constexpr int kMaxRows = 4;
#endif
// Weight rows the first row block of a panel asks for ahead: 4 KB of float32 (rows of 128 bytes),
// 2 KB of bfloat16 in the unpaired layout.
constexpr int64_t kWeightAhead = 32;

// e^x for the SwiGLU gate, x clamped to exp_clamped's range (libm's expf, one call per element,
// was ~8% of the experts' time).
inline vec16 exp16(vec16 x) {
  const vec16 lo = vec16{} - 87.f, hi = vec16{} + 88.f;
  x = where(x < lo, lo, x);
  return exp_clamped(where(x > hi, hi, x));
}

// acc[m] += x[m][k] * panel row k for `rows` rows (1..kMaxRows, a template parameter so the loops
// unroll and the sums stay in registers); `first` sets the sums instead. bfloat16 panels of one k
// per row (no AVX512-BF16) widen inputs and weights to float here.
// With `prefetch`, it also asks for the weights kWeightAhead rows on (panel_gemm says when;
// paired bfloat16 panels do not: not measured).
template <int rows, bool prefetch, bool first, typename T>
inline void multiply_row(const T* const* x, const T* panel, int64_t k, vec16 (&lo)[rows], vec16 (&hi)[rows]) {
  if constexpr (prefetch) {  // past the panel's end: the next panel, read next (a prefetch never faults)
    __builtin_prefetch(panel + (k + kWeightAhead) * kPanelWidth, 0, 1);
    __builtin_prefetch(panel + (k + kWeightAhead) * kPanelWidth + 16, 0, 1);
  }
  vec16 w_lo = load16(panel + k * kPanelWidth), w_hi = load16(panel + k * kPanelWidth + 16);
  keep_in_register(w_lo);  // loaded once per k, not once per row (vec16.h says why)
  keep_in_register(w_hi);
  for (int m = 0; m < rows; ++m) {
    const float v = to_float(x[m][k]);
    if constexpr (first) {
      lo[m] = v * w_lo;
      hi[m] = v * w_hi;
    } else {
      lo[m] += v * w_lo;
      hi[m] += v * w_hi;
    }
  }
}

// lo/hi[m] = x[m] @ panel, x[m] being row m's first input column. The first k sets the sums:
// zeroing them first became two memset calls per block for 9-12 rows (~1.5% of a float32
// decode step's samples).
template <int rows, bool prefetch, typename T>
inline void multiply_block(const T* const* x, const T* panel, int64_t K, vec16 (&lo)[rows], vec16 (&hi)[rows]) {
  multiply_row<rows, prefetch, true>(x, panel, 0, lo, hi);  // K >= 1 (panel_linear checks)
  for (int64_t k = 1; k < K; ++k) multiply_row<rows, prefetch, false>(x, panel, k, lo, hi);
}

#ifdef __AVX512BF16__
// The same over bf16 pairs: one vdpbf16ps per 16 lanes multiplies two k at once (twice float32's
// multiply-adds per instruction, half its weight bytes).
template <int rows, bool first>
inline void multiply_pair_row(const bf16* const* x, const bf16* panel, int64_t j, __m512 (&lo)[rows],
                              __m512 (&hi)[rows]) {
  const bf16* pair_row = panel + j * 2 * kPanelWidth;
  const auto w_lo = (__m512bh)_mm512_loadu_si512(pair_row), w_hi = (__m512bh)_mm512_loadu_si512(pair_row + 32);
  for (int m = 0; m < rows; ++m) {
    int32_t pair;  // x[m, 2j] in the low half, as the dot product pairs it with W[., 2j]
    std::memcpy(&pair, x[m] + 2 * j, sizeof pair);
    const auto v = (__m512bh)_mm512_set1_epi32(pair);
    lo[m] = _mm512_dpbf16_ps(first ? _mm512_setzero_ps() : lo[m], v, w_lo);
    hi[m] = _mm512_dpbf16_ps(first ? _mm512_setzero_ps() : hi[m], v, w_hi);
  }
}

template <int rows, bool prefetch>
inline void multiply_block(const bf16* const* x, const bf16* panel, int64_t K, vec16 (&lo)[rows], vec16 (&hi)[rows]) {
  // Overloads the generic template above for paired panels (partial ordering picks this one).
  __m512 acc_lo[rows], acc_hi[rows];
  multiply_pair_row<rows, true>(x, panel, 0, acc_lo, acc_hi);  // K is even and at least 2 (panel_linear checks)
  for (int64_t j = 1; j < K / 2; ++j) multiply_pair_row<rows, false>(x, panel, j, acc_lo, acc_hi);
  for (int m = 0; m < rows; ++m) {
    lo[m] = reinterpret_cast<const vec16&>(acc_lo[m]);
    hi[m] = reinterpret_cast<const vec16&>(acc_hi[m]);
  }
}
#endif

// Where a block's rows come from and go: x[m] is row m's input, y[m] its output row, and with
// `weight`, row m's result is added, times weight[m], into y[m] instead of stored (PanelMultiply's
// y_rows). Panel p's columns are stored at their place in the row.
template <typename T>
struct RowBlock {
  const T* x[kMaxRows];
  T* y[kMaxRows];
  const float* weight;
};

// out[0, count) = v[0, count) (count <= 32), two stores when the panel is whole.
template <typename T>
[[gnu::always_inline]] inline void store_columns(T* out, const vec16& lo, const vec16& hi, int64_t count) {
  if constexpr (std::is_same_v<T, float>) {
    if (count == kPanelWidth) {
      std::memcpy(out, &lo, sizeof lo);  // an element loop became a memcpy call per row
      std::memcpy(out + 16, &hi, sizeof hi);
      return;
    }
  }
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, bf16>) {
    if (count == kPanelWidth) {
      store16(out, lo);
      store16(out + 16, hi);
      return;
    }
  }
#endif
  for (int64_t j = 0; j < count; ++j) out[j] = static_cast<T>(j < 16 ? lo[j] : hi[j - 16]);
}

// out[0, count) += w * v[0, count), rounded as the torch reference's index_add_(out * weight)
// rounds it: the result and the weight in T, their product in T, then the sum.
template <typename T>
[[gnu::always_inline]] inline void add_weighted_columns(T* out, const vec16& lo, const vec16& hi, int64_t count, float weight) {
  const T w = static_cast<T>(weight);
  if constexpr (std::is_same_v<T, float>) {
    if (count == kPanelWidth) {
      const vec16 sum_lo = load16(out) + lo * w, sum_hi = load16(out + 16) + hi * w;
      std::memcpy(out, &sum_lo, sizeof sum_lo);
      std::memcpy(out + 16, &sum_hi, sizeof sum_hi);
      return;
    }
  }
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, bf16>) {  // the same three roundings, 16 lanes at a time
    if (count == kPanelWidth) {
      const float wf = static_cast<float>(w);
      store16(out, load16(out) + round_to_bf16(round_to_bf16(lo) * wf));
      store16(out + 16, load16(out + 16) + round_to_bf16(round_to_bf16(hi) * wf));
      return;
    }
  }
#endif
  for (int64_t j = 0; j < count; ++j) {
    const T v = static_cast<T>(j < 16 ? lo[j] : hi[j - 16]);
    out[j] = static_cast<T>(out[j] + static_cast<T>(v * w));
  }
}

// Row m's 32 results (lo, hi) out: swiglu gives silu(gate) * up into columns 16p.., otherwise
// panel p's columns are stored, or added times the row's weight.
template <typename T>
[[gnu::always_inline]] inline void finish_row(T* out, const float* weight, const vec16& lo, const vec16& hi, int64_t n,
                                              bool swiglu, int64_t p) {
  if (swiglu) {
    const int64_t first = p * 16, count = std::min<int64_t>(16, n - first);
    const vec16 act = lo / (1.f + exp16(-lo)) * hi;  // silu(gate) * up, as F.silu computes it
    if constexpr (std::is_same_v<T, float>) {
      if (count == 16) {
        std::memcpy(out + first, &act, sizeof act);
        return;
      }
    }
#ifdef __AVX512F__
    if constexpr (std::is_same_v<T, bf16>) {
      if (count == 16) {
        store16(out + first, act);
        return;
      }
    }
#endif
    for (int64_t j = 0; j < count; ++j) out[first + j] = static_cast<T>(act[j]);
  } else {
    const int64_t first = p * kPanelWidth, count = std::min<int64_t>(kPanelWidth, n - first);
    if (weight != nullptr)
      add_weighted_columns(out + first, lo, hi, count, *weight);
    else
      store_columns(out + first, lo, hi, count);
  }
}

template <typename T, int rows, bool prefetch>
void run_block(const RowBlock<T>& block, const T* panel, int64_t K, int64_t n, bool swiglu, int64_t p) {
  vec16 lo[rows], hi[rows];
  multiply_block<rows, prefetch>(block.x, panel, K, lo, hi);
  for (int m = 0; m < rows; ++m)
    finish_row(block.y[m], block.weight != nullptr ? block.weight + m : nullptr, lo[m], hi[m], n, swiglu, p);
}

template <typename T>
using BlockFn = void (*)(const RowBlock<T>&, const T*, int64_t, int64_t, bool, int64_t);

template <typename T, bool prefetch, size_t... R>
constexpr std::array<BlockFn<T>, sizeof...(R)> make_blocks(std::index_sequence<R...>) {
  return {run_block<T, R + 1, prefetch>...};
}
template <typename T, bool prefetch>
constexpr auto kBlocks = make_blocks<T, prefetch>(std::make_index_sequence<kMaxRows>{});  // [rows - 1]

// Rows [row_begin, row_end) of mm through its panels [panel_begin, panel_end).
template <typename T>
void panel_gemm(const PanelMultiply<T>& mm, int64_t row_begin, int64_t row_end, int64_t panel_begin,
                int64_t panel_end) {
  // Panel outer, rows inner: a panel stays in L1/L2 while every row block reads it.
  for (int64_t p = panel_begin; p < panel_end; ++p) {
    const T* panel = mm.panels + p * mm.K * kPanelWidth;  // K x 32 elements (bf16: K/2 pair rows of 64)
    for (int64_t m0 = row_begin; m0 < row_end; m0 += kMaxRows) {
      const int64_t rows = std::min<int64_t>(kMaxRows, row_end - m0);
      RowBlock<T> block;
      for (int64_t i = 0; i < rows; ++i) {
        block.x[i] = mm.x + (mm.x_rows != nullptr ? mm.x_rows[m0 + i] : m0 + i) * mm.ldx;
        block.y[i] = mm.y + (mm.y_rows != nullptr ? mm.y_rows[m0 + i] : m0 + i) * mm.ldy;
      }
      block.weight = mm.y_weights != nullptr ? mm.y_weights + m0 : nullptr;
      // The first row block streams the panel from memory, so it asks for the weights ahead
      // (prefetcht2): the hardware prefetcher alone left a 16-row block waiting on memory (tiny
      // float32 at 64 sequences, +4-5% tokens/s alternating in one process). Later row blocks find
      // the panel in L1/L2, where the extra instructions only cost.
      (m0 == row_begin ? kBlocks<T, true> : kBlocks<T, false>)[rows - 1](block, panel, mm.K, mm.n, mm.swiglu, p);
    }
  }
}

#ifdef __AMX_BF16__
// Paired bfloat16 panels through oneDNN's batch-reduce GEMM micro-kernel (ATen's cpublas::brgemm,
// JIT-compiled for this CPU, cached per shape and thread): a paired panel [K/2, 64] is the VNNI
// layout it takes as B, so on AMX CPUs the tiles multiply our weights as they lie. x's rows are
// gathered into one block first where an expert reads them by index; each tile of up to
// kTileRows rows lands in a float32 buffer and leaves through the register path's epilogues.
// Panels go in groups of ~512 KB that stay in L2 while every tile of rows passes over them
// (tiles outer over all of a thread's panels re-read a small-model expert's 2.4 MB share from
// memory for every tile); within a group one kernel serves every full tile (a kernel switch
// reconfigures the AMX tiles).
constexpr int64_t kTileRows = 32;
constexpr int64_t kBrgemmPanelBytes = 512 << 10;
static_assert(kBf16PanelKGroup == 2, "brgemm reads bfloat16 panels in k pairs (AMX CPUs have AVX512-BF16)");

void panel_gemm_brgemm(const PanelMultiply<bf16>& mm, int64_t row_begin, int64_t row_end, int64_t panel_begin,
                       int64_t panel_end) {
  thread_local std::vector<bf16> gathered;
  const bf16* a = mm.x + row_begin * mm.ldx;
  int64_t lda = mm.ldx;
  if (mm.x_rows != nullptr) {
    gathered.resize((row_end - row_begin) * mm.K);
    for (int64_t m = row_begin; m < row_end; ++m)
      std::memcpy(gathered.data() + (m - row_begin) * mm.K, mm.x + mm.x_rows[m] * mm.ldx, mm.K * sizeof(bf16));
    a = gathered.data();
    lda = mm.K;
  }
  alignas(64) float tile[kTileRows * kPanelWidth];
  const int64_t group = std::max<int64_t>(1, kBrgemmPanelBytes / (mm.K * kPanelWidth * static_cast<int64_t>(sizeof(bf16))));
  for (int64_t g0 = panel_begin; g0 < panel_end; g0 += group) {
    for (int64_t m0 = row_begin; m0 < row_end; m0 += kTileRows) {
      const int64_t rows = std::min<int64_t>(kTileRows, row_end - m0);
      for (int64_t p = g0; p < std::min(g0 + group, panel_end); ++p) {
        at::native::cpublas::brgemm(rows, kPanelWidth, mm.K, lda, kPanelWidth, kPanelWidth, false,
                                    a + (m0 - row_begin) * lda, mm.panels + p * mm.K * kPanelWidth, tile, true);
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t m = m0 + i;
          bf16* out = mm.y + (mm.y_rows != nullptr ? mm.y_rows[m] : m) * mm.ldy;
          finish_row(out, mm.y_weights != nullptr ? mm.y_weights + m : nullptr, load16(tile + i * kPanelWidth),
                     load16(tile + i * kPanelWidth + 16), mm.n, mm.swiglu, p);
        }
      }
    }
  }
}

// Whether ATen's brgemm takes paired bf16 panels here: it needs oneDNN's micro-kernels built into
// torch (else it raises) and oneDNN left on (torch.backends.mkldnn.enabled). Probed once with a
// 1 x 32 x 2 multiply; the switch is read at every call, as a user may turn oneDNN off.
bool brgemm_usable() {
  static const bool built_in = [] {
    try {
      const bf16 a[2] = {bf16(1.f), bf16(2.f)};
      bf16 b[2 * kPanelWidth];
      for (int64_t j = 0; j < 2 * kPanelWidth; ++j) b[j] = bf16(1.f);
      float c[kPanelWidth];
      at::native::cpublas::brgemm(1, kPanelWidth, 2, 2, kPanelWidth, kPanelWidth, false, a, b, c, true);
      at::native::cpublas::brgemm_release(true);
      return c[0] == 3.f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return built_in && at::globalContext().userEnabledMkldnn();
}
#endif

// bfloat16 multiplies of at least this many rows go to brgemm on AMX CPUs (0: none). At 4 rows
// it was 1.0-1.5x the register path (1-2 threads), at 16 2.3-3.8x, at 64-2048 4-9x; at 1-2
// rows 0.93-0.98x.
std::atomic<int64_t> g_brgemm_min_rows{4};

// Rows [row_begin, row_end) of mm through panels [panel_begin, panel_end), by brgemm or the
// register blocks; returns whether brgemm ran (its AMX context is released after a batch).
template <typename T>
bool panel_rows(const PanelMultiply<T>& mm, int64_t row_begin, int64_t row_end, int64_t panel_begin, int64_t panel_end) {
#ifdef __AMX_BF16__
  if constexpr (std::is_same_v<T, bf16>) {
    const int64_t min_rows = g_brgemm_min_rows.load(std::memory_order_relaxed);
    if (min_rows > 0 && mm.rows >= min_rows && brgemm_usable()) {
      panel_gemm_brgemm(mm, row_begin, row_end, panel_begin, panel_end);
      return true;
    }
  }
#endif
  panel_gemm(mm, row_begin, row_end, panel_begin, panel_end);
  return false;
}

}  // namespace

template <typename T>
void panel_gemm_batch(const std::vector<PanelMultiply<T>>& multiplies) {
  int64_t work = 0;  // multiply-adds / 32
  for (const auto& mm : multiplies) work += mm.rows * mm.K * mm.num_panels;
  // ~64k multiply-adds per thread at least: below that a thread's wake-up costs more than it saves.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work * kPanelWidth >> 16));
  // Thread t takes the t-th share of every multiply's panels, so the threads stream disjoint
  // parts of each weight side by side (measured faster from memory than each thread streaming
  // whole experts of its own: 37 vs 25 GB/s here) and finish together however skewed the rows.
  auto run = [&](int64_t t) {
    bool brgemm_ran = false;
    for (const auto& mm : multiplies) {
      const int64_t first = mm.num_panels * t / threads, last = mm.num_panels * (t + 1) / threads;
      // Many rows (a prefill) are taken in chunks of ~256 KB of x, so that a chunk stays in L2
      // while every panel passes over it; without this each panel re-streamed all of x from
      // memory (a 64-prompt prefill ran 2.5x slower than oneDNN). A decode step's rows are one chunk.
      const int64_t row_bytes = static_cast<int64_t>(sizeof(T)) * std::max<int64_t>(1, mm.K);
      const int64_t chunk = std::max<int64_t>(kMaxRows, 262144 / row_bytes / kMaxRows * kMaxRows);
      for (int64_t row = 0; row < mm.rows; row += chunk)
        brgemm_ran |= panel_rows(mm, row, std::min(row + chunk, mm.rows), first, last);
    }
    if (brgemm_ran) at::native::cpublas::brgemm_release(true);
  };
  if (threads == 1) {
    run(0);
  } else {
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) run(t);
    });
  }
}

template void panel_gemm_batch<float>(const std::vector<PanelMultiply<float>>&);
template void panel_gemm_batch<bf16>(const std::vector<PanelMultiply<bf16>>&);
int64_t bf16_panel_k_group() { return kBf16PanelKGroup; }

// torch.ops.moefleet.bf16_brgemm_min_rows(min_rows): from how many rows bfloat16 multiplies use
// brgemm on AMX CPUs (0: never; elsewhere it has no effect); a negative value only asks.
// Returns the setting in force (A/B measurements switch it within one process).
int64_t bf16_brgemm_min_rows(int64_t min_rows) {
  if (min_rows >= 0) g_brgemm_min_rows.store(min_rows);
  return g_brgemm_min_rows.load();
}

namespace {

// panels: T [P, K / kPanelKGroup<T>, 32 kPanelKGroup<T>] (panel_gemm.h), x: T [M, K].
template <typename T>
at::Tensor panel_linear_as(const at::Tensor& x, const at::Tensor& panels, int64_t n, bool swiglu) {
  constexpr int64_t group = kPanelKGroup<T>;
  const int64_t K = x.size(1);
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == kPanelWidth * group && panels.scalar_type() == x.scalar_type() &&
                  panels.is_contiguous(),
              "panels must be a contiguous ", x.scalar_type(), " [P, ", group == 2 ? "K/2, 64" : "K, 32",
              "] tensor, got ", panels.scalar_type(), " ", panels.sizes());
  TORCH_CHECK(K > 0 && K % group == 0, "x needs ", group == 2 ? "an even number of" : "at least one",
              " input columns for these panels, it has ", K);
  TORCH_CHECK(panels.size(1) * group == K, "x has ", K, " columns, the panels ", panels.sizes());
  TORCH_CHECK(n > 0 && n <= panels.size(0) * (swiglu ? 16 : kPanelWidth), "n = ", n, " does not fit the panels");
  const auto input = x.contiguous();
  auto out = at::empty({x.size(0), n}, x.options());
  if (x.size(0) > 0)
    panel_gemm_batch<T>({{input.data_ptr<T>(), K, input.size(0), nullptr, panels.data_ptr<T>(), panels.size(0), K,
                          out.data_ptr<T>(), n, n, swiglu, nullptr, nullptr}});
  return out;
}

// torch.ops.moefleet.panel_linear(x [M, K], panels, n, swiglu) -> [M, n]; x and panels float32
// or bfloat16 (panel_gemm.h gives the layouts).
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels, int64_t n, bool swiglu) {
  const bool is_bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.dim() == 2 && (is_bf16 || x.scalar_type() == at::kFloat), "x must be a float32 or bfloat16 [M, K] tensor");
  return is_bf16 ? panel_linear_as<bf16>(x, panels, n, swiglu) : panel_linear_as<float>(x, panels, n, swiglu);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moefleet, m) {
  m.def("panel_linear(Tensor x, Tensor panels, int n, bool swiglu) -> Tensor");
  m.def("bf16_panel_k_group() -> int", &bf16_panel_k_group);
  m.def("bf16_brgemm_min_rows(int min_rows) -> int", &bf16_brgemm_min_rows);
}

TORCH_LIBRARY_IMPL(moefleet, CPU, m) { m.impl("panel_linear", &panel_linear); }

}  // namespace moefleet
