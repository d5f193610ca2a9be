// Small-batch matrix multiply over weights packed in column panels (kernels/panel_linear.py
// packs them): y = x @ W.T for W [N, K], panel p holding output columns 32p..32p+31 for every k,
// so that one pass streams each weight once, in order, whatever the number of rows. Decode steps
// give an expert 1-16 rows, where oneDNN's packed GEMM read weights at ~24 GB/s here; this layout
// lets the row loop sit inside the weight stream.
//   float32:  [P, K, 32]
//   bfloat16 with AVX512-BF16: [P, K/2, 64] (K even), k in pairs: element 2c+t of pair row j is
//             W[32p+c, 2j+t], the operand order of AVX512-BF16's dot product, which multiplies
//             a pair of bf16 weights by a pair of bf16 inputs into one float32 lane.
//   bfloat16 without it: [P, K, 32], float32's layout; the kernel widens weights and inputs to
//             float in registers (a bf16 product is exact in float32, so both forms give the
//             exact products summed in float32, up to order).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace moefleet {

constexpr int64_t kPanelWidth = 32;

// Input columns per panel element group: bfloat16 panels hold k in pairs where the CPU has
// AVX512-BF16, every other panel one k at a time. A panel holds K x 32 elements either way.
#ifdef __AVX512BF16__
constexpr int64_t kBf16PanelKGroup = 2;
#else
constexpr int64_t kBf16PanelKGroup = 1;
#endif
template <typename T>
constexpr int64_t kPanelKGroup = std::is_same_v<T, c10::BFloat16> ? kBf16PanelKGroup : 1;

// One multiply: y = x @ W.T for `rows` rows of x (row stride ldx) into y (row stride ldy, n valid
// columns; panels are zero-padded past n), accumulating in float32. swiglu=false: panel p gives
// columns 32p..32p+31. swiglu=true: the gate_up layout (lanes 0-15 gate columns 16p..16p+15,
// lanes 16-31 the same up columns); y gets silu(gate) * up, n = the intermediate size.
// x_rows (optional): row m is x's row x_rows[m], so an expert reads its tokens where they are
// rather than from a gathered copy. y_rows and y_weights (optional, not with swiglu): instead of
// storing row m, add y_weights[m] times it into y's row y_rows[m] (an expert's weighted share of
// each token's output; the threads own disjoint columns, so this needs no lock).
template <typename T>
struct PanelMultiply {
  const T* x;
  int64_t ldx, rows;
  const int64_t* x_rows;
  const T* panels;
  int64_t num_panels, K;
  T* y;
  int64_t ldy, n;
  bool swiglu;
  const int64_t* y_rows;
  const float* y_weights;
};

// Independent multiplies (a step's experts) in one parallel region: each of ATen's threads takes
// its share of every multiply's panels, so there is one barrier for all of them and the threads
// finish together however the rows are spread over the multiplies. A thread runs its shares in
// the order given, so multiplies that add into the same y rows add in that order.
template <typename T>
void panel_gemm_batch(const std::vector<PanelMultiply<T>>& multiplies);

// kBf16PanelKGroup, for the packing code (kernels/panel_linear.py).
int64_t bf16_panel_k_group();

}  // namespace moefleet
