// Softmax top-k routing from the hidden states: the router's logits, softmax and the top k in
// one call (kernels/routing.py holds the torch reference the tests compare against).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vector_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

namespace moefleet {
namespace {

// Routers up to this many weights (E x D, 256 KB in float32: Mixtral's 8 x 4096 and smaller) run
// here; larger ones (Qwen's 60-128 experts) go to ATen's GEMM, which blocks them better.
constexpr int64_t kOwnLoopWeights = int64_t{1} << 16;

// logits[e] = x . w[e] for the E experts, x in float: four experts at a time, so that four
// independent multiply-add chains share each load of x (one chain waits on its own adds).
void router_logits_row(const float* x, const float* w, int64_t E, int64_t D, float* logits) {
  int64_t e = 0;
  for (; e + 4 <= E; e += 4) {
    const float* w0 = w + e * D;
    vec16 a0{}, a1{}, a2{}, a3{};
    int64_t c = 0;
    for (; c + 16 <= D; c += 16) {
      const vec16 xv = load16(x + c);
      a0 += xv * load16(w0 + c);
      a1 += xv * load16(w0 + D + c);
      a2 += xv * load16(w0 + 2 * D + c);
      a3 += xv * load16(w0 + 3 * D + c);
    }
    float s[4] = {horizontal_sum(a0), horizontal_sum(a1), horizontal_sum(a2), horizontal_sum(a3)};
    for (; c < D; ++c)
      for (int j = 0; j < 4; ++j) s[j] += x[c] * w0[j * D + c];
    std::copy(s, s + 4, logits + e);
  }
  for (; e < E; ++e) logits[e] = dot_row(x, w + e * D, D);
}

// One token: softmax over the E logits in float32, the k most probable (the lower id first among
// equal probabilities, NaN above every number as torch.topk orders it), optionally renormalised
// over the k. probs and taken: scratch of E.
void softmax_topk_row(const float* logits, int64_t E, int64_t k, bool renormalize, float* probs, char* taken,
                      float* weights, int64_t* ids) {
  auto above = [](float a, float b) { return (std::isnan(a) && !std::isnan(b)) || a > b; };
  const float mx = *std::max_element(logits, logits + E);
  float sum = 0.f;
  for (int64_t e = 0; e < E; ++e) sum += probs[e] = std::exp(logits[e] - mx);
  for (int64_t e = 0; e < E; ++e) probs[e] /= sum;
  std::fill(taken, taken + E, 0);
  for (int64_t j = 0; j < k; ++j) {  // k is small (2-8): selection beats a sort
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e)
      if (!taken[e] && (best < 0 || above(probs[e], probs[best]))) best = e;
    weights[j] = probs[best];
    ids[j] = best;
    taken[best] = 1;
  }
  if (renormalize) {
    float top = 0.f;
    for (int64_t j = 0; j < k; ++j) top += weights[j];
    for (int64_t j = 0; j < k; ++j) weights[j] /= top;
  }
}

// x's row as float: float rows are read in place, others widened into scratch [D].
inline const float* float_row(const float* x, int64_t, float*) { return x; }
template <typename scalar_t>
const float* float_row(const scalar_t* x, int64_t D, float* scratch) {
  for (int64_t c = 0; c < D; ++c) scratch[c] = to_float(x[c]);
  return scratch;
}

// Tokens [begin, end) of x [T, D]: their logits from the router's own loop, or read from
// gemm_logits [T, E] when the router is too large for it (gemm_logits not null).
template <typename scalar_t>
void route_rows(const scalar_t* x, const float* router, const float* gemm_logits, int64_t begin, int64_t end,
                int64_t E, int64_t D, int64_t k, bool renormalize, float* weights, int64_t* ids) {
  std::vector<float> logits(E), probs(E), x_float(std::is_same_v<scalar_t, float> ? 0 : D);
  std::vector<char> taken(E);
  for (int64_t t = begin; t < end; ++t) {
    const float* row = gemm_logits + t * E;
    if (gemm_logits == nullptr) {
      router_logits_row(float_row(x + t * D, D, x_float.data()), router, E, D, logits.data());
      row = logits.data();
    }
    softmax_topk_row(row, E, k, renormalize, probs.data(), taken.data(), weights + t * k, ids + t * k);
  }
}

// The router of a softmax-scored MoE layer: logits = x @ router.T in float32, then
// softmax_topk_row per token. x [T, D] float32, bfloat16 or float16; router [E, D] float32 ->
// (weights [T, k] float32, ids [T, k] int64). One call where the torch formulation made four
// (x.float(), F.linear, the softmax top-k, its wrapper).
std::tuple<at::Tensor, at::Tensor> router_softmax_topk(const at::Tensor& x, const at::Tensor& router, int64_t k,
                                                       bool renormalize) {
  TORCH_CHECK(x.dim() == 2, "router_softmax_topk: x must be [T, D], got ", x.sizes());
  TORCH_CHECK(router.dim() == 2 && router.scalar_type() == at::kFloat && router.size(1) == x.size(1),
              "router_softmax_topk: the router must be float32 [E, ", x.size(1), "], got ", router.scalar_type(), " ",
              router.sizes());
  const int64_t T = x.size(0), E = router.size(0), D = x.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "router_softmax_topk: k = ", k, " for ", E, " experts");
  auto weights = at::empty({T, k}, x.options().dtype(at::kFloat));
  auto ids = at::empty({T, k}, x.options().dtype(at::kLong));
  if (T == 0) return {weights, ids};
  const auto wc = router.contiguous();
  const auto xc = x.contiguous();
  // Larger routers: the logits from one GEMM first (the same call F.linear makes).
  const at::Tensor gemm_logits = E * D <= kOwnLoopWeights ? at::Tensor() : at::mm(xc.to(at::kFloat), wc.t()).contiguous();
  const float* gemm = gemm_logits.defined() ? gemm_logits.data_ptr<float>() : nullptr;
  float* wp = weights.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "router_softmax_topk", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    // ~128k multiply-adds a task: a decode step's router is one task.
    at::parallel_for(0, T, std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(E * D, 1)),
                     [&](int64_t begin, int64_t end) {
      route_rows(xp, wc.data_ptr<float>(), gemm, begin, end, E, D, k, renormalize, wp, ip);
    });
  });
  return {weights, ids};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moefleet, m) {
  m.def("router_softmax_topk(Tensor x, Tensor router, int k, bool renormalize) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moefleet, CPU, m) { m.impl("router_softmax_topk", &router_softmax_topk); }

}  // namespace moefleet
