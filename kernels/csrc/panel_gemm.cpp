// See panel_gemm.h; the vector type is vector_math.h's.

#include "panel_gemm.h"
#include "vector_math.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace moefleet {
namespace {

constexpr int kMaxRows = 12;  // rows per register block: 12 x 2 accumulators of 16 lanes

// e^x for the SwiGLU gate, x clamped to exp_clamped's range (libm's expf, one call per element,
// was ~8% of the experts' time).
inline vec16 exp16(vec16 x) {
  const vec16 lo = vec16{} - 87.f, hi = vec16{} + 88.f;
  x = x < lo ? lo : x;
  return exp_clamped(x > hi ? hi : x);
}

// acc[m] = x[m, :] @ panel for `rows` (1..kMaxRows, a template parameter so the loops unroll).
template <int rows>
inline void multiply_block(const float* x, int64_t ldx, const float* panel, int64_t K, vec16 (&lo)[kMaxRows],
                           vec16 (&hi)[kMaxRows]) {
  for (int m = 0; m < rows; ++m) lo[m] = hi[m] = vec16{};
  for (int64_t k = 0; k < K; ++k) {
    const vec16 w_lo = load16(panel + k * kPanelWidth), w_hi = load16(panel + k * kPanelWidth + 16);
    for (int m = 0; m < rows; ++m) {
      const float v = x[m * ldx + k];
      lo[m] += v * w_lo;
      hi[m] += v * w_hi;
    }
  }
}

template <int rows>
void run_block(const float* x, int64_t ldx, const float* panel, int64_t K, float* y, int64_t ldy, int64_t n,
               bool swiglu, int64_t p) {
  vec16 lo[kMaxRows], hi[kMaxRows];
  multiply_block<rows>(x, ldx, panel, K, lo, hi);
  for (int m = 0; m < rows; ++m) {
    float* out = y + m * ldy;
    if (swiglu) {
      const int64_t first = p * 16, count = std::min<int64_t>(16, n - first);
      const vec16 act = lo[m] / (1.f + exp16(-lo[m])) * hi[m];  // silu(gate) * up, as F.silu computes it
      if (count == 16) {
        *reinterpret_cast<vec16*>(out + first) = act;
      } else {
        for (int64_t j = 0; j < count; ++j) out[first + j] = act[j];
      }
    } else {
      const int64_t first = p * kPanelWidth, count = std::min<int64_t>(kPanelWidth, n - first);
      for (int64_t j = 0; j < count; ++j) out[first + j] = j < 16 ? lo[m][j] : hi[m][j - 16];
    }
  }
}

using BlockFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, bool, int64_t);
constexpr BlockFn kBlocks[kMaxRows + 1] = {nullptr,       run_block<1>,  run_block<2>,  run_block<3>, run_block<4>,
                                           run_block<5>, run_block<6>,  run_block<7>,  run_block<8>, run_block<9>,
                                           run_block<10>, run_block<11>, run_block<12>};

// y[m, c] for rows [0, M) of x and panels [panel_begin, panel_end) (see PanelMultiply).
void panel_gemm(const float* x, int64_t ldx, int64_t M, const float* panels, int64_t K, float* y, int64_t ldy,
                int64_t n, bool swiglu, int64_t panel_begin, int64_t panel_end) {
  // Panel outer, rows inner: a panel (K x 32 floats) stays in L1/L2 while every row block reads it.
  for (int64_t p = panel_begin; p < panel_end; ++p) {
    const float* panel = panels + p * K * kPanelWidth;
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const int64_t rows = std::min<int64_t>(kMaxRows, M - m0);
      kBlocks[rows](x + m0 * ldx, ldx, panel, K, y + m0 * ldy, ldy, n, swiglu, p);
    }
  }
}

}  // namespace

void panel_gemm_batch(const std::vector<PanelMultiply>& multiplies) {
  int64_t work = 0;  // multiply-adds / 32
  for (const auto& mm : multiplies) work += mm.rows * mm.K * mm.num_panels;
  // ~64k multiply-adds per thread at least: below that a thread's wake-up costs more than it saves.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work * kPanelWidth >> 16));
  // Thread t takes the t-th share of every multiply's panels, so the threads stream disjoint
  // parts of each weight side by side (measured faster from memory than each thread streaming
  // whole experts of its own: 37 vs 25 GB/s here) and finish together however skewed the rows.
  auto run = [&](int64_t t) {
    for (const auto& mm : multiplies) {
      const int64_t first = mm.num_panels * t / threads, last = mm.num_panels * (t + 1) / threads;
      // Many rows (a prefill) are taken in chunks of ~256 KB of x, so that a chunk stays in L2
      // while every panel passes over it; without this each panel re-streamed all of x from
      // memory (a 64-prompt prefill ran 2.5x slower than oneDNN). A decode step's rows are one chunk.
      const int64_t chunk = std::max<int64_t>(kMaxRows, (262144 / 4 / std::max<int64_t>(1, mm.K)) / kMaxRows * kMaxRows);
      for (int64_t row = 0; row < mm.rows; row += chunk)
        panel_gemm(mm.x + row * mm.ldx, mm.ldx, std::min(chunk, mm.rows - row), mm.panels, mm.K, mm.y + row * mm.ldy,
                   mm.ldy, mm.n, mm.swiglu, first, last);
    }
  };
  if (threads == 1) {
    run(0);
  } else {
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) run(t);
    });
  }
}

namespace {

// torch.ops.moefleet.panel_linear(x [M, K], panels [P, K, 32], n, swiglu) -> [M, n]
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels, int64_t n, bool swiglu) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be a float32 [M, K] tensor");
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == kPanelWidth && panels.scalar_type() == at::kFloat &&
                  panels.is_contiguous(),
              "panels must be a contiguous float32 [P, K, 32] tensor");
  TORCH_CHECK(x.size(1) == panels.size(1), "x has ", x.size(1), " columns, the panels ", panels.size(1));
  TORCH_CHECK(n > 0 && n <= panels.size(0) * (swiglu ? 16 : kPanelWidth), "n = ", n, " does not fit the panels");
  const auto input = x.contiguous();
  auto out = at::empty({x.size(0), n}, x.options());
  if (x.size(0) > 0)
    panel_gemm_batch({{input.data_ptr<float>(), input.size(1), input.size(0), panels.data_ptr<float>(), panels.size(0),
                       panels.size(1), out.data_ptr<float>(), n, n, swiglu}});
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moefleet, m) { m.def("panel_linear(Tensor x, Tensor panels, int n, bool swiglu) -> Tensor"); }

TORCH_LIBRARY_IMPL(moefleet, CPU, m) { m.impl("panel_linear", &panel_linear); }

}  // namespace moefleet
