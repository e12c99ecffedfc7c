// A MoE layer's routed experts in one op, for the few tokens of a decode step, on CPU:
//   out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = topk_ids[t, j]
// with each expert's [gate; up] stacked in w13[e] ([2I, K]) and down in w2[e] ([K, I]), bfloat16 or int8
// with one float32 scale per output row. This rank holds experts first_expert .. first_expert + E - 1;
// pairs routed elsewhere are skipped (another rank adds them).
//
// The (token, expert) pairs are grouped by expert and their rows of x gathered and widened to float32.
// Two parallel passes then read every busy expert's weights once, each thread its own slice of them:
//   1. threads split the I intermediate features: gate and up rows of each expert against its tokens,
//      silu(gate) * up written straight into the hidden buffer;
//   2. threads split the K output columns: down rows of each expert against its hidden rows, added
//      into the output times the routing weight. Columns are disjoint, so no two threads write the
//      same element however many experts a token went to.
// Everything accumulates in float32; no ATen op runs in between (at these sizes they would cost more
// than the matmuls), and nothing waits on Python.
#include "gemm_tiles.h"

#include <cmath>
#include <vector>

namespace {

struct Routes {
  std::vector<int64_t> first;   // [E + 1]: expert e's pairs are first[e] .. first[e + 1] - 1
  std::vector<int64_t> token;   // per pair, in expert order: its token
  std::vector<float> weight;    // and its routing weight
};

Routes group_by_expert(const at::Tensor& ids, const at::Tensor& weights, int64_t first_expert, int64_t E) {
  const int64_t pairs = ids.numel(), top_k = ids.size(1);
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* w = weights.data_ptr<float>();
  Routes r{std::vector<int64_t>(E + 1, 0), {}, {}};
  for (int64_t p = 0; p < pairs; ++p) {
    int64_t e = id[p] - first_expert;
    if (e >= 0 && e < E) ++r.first[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) r.first[e + 1] += r.first[e];
  r.token.resize(r.first[E]);
  r.weight.resize(r.first[E]);
  std::vector<int64_t> next(r.first.begin(), r.first.end() - 1);
  for (int64_t p = 0; p < pairs; ++p) {  // in token order within an expert: the reference's order
    int64_t e = id[p] - first_expert;
    if (e < 0 || e >= E) continue;
    r.token[next[e]] = p / top_k;
    r.weight[next[e]++] = w[p];
  }
  return r;
}

template <typename W, typename Out, bool Simd>
void experts(const at::Tensor& x, const Routes& r, const W* w13, const float* s13, const W* w2, const float* s2,
             Out* out, int64_t E, int64_t K, int64_t I) {
  const int64_t pairs = r.first[E], M = x.size(0);
  std::vector<float> rows(pairs * K), gate(pairs * I), up(pairs * I), down(pairs * K), sum(M * K, 0.0f);
  for (int64_t p = 0; p < pairs; ++p) widen_row(x, r.token[p], K, rows.data() + p * K);

  at::parallel_for(0, I, grain(pairs * K * 2), [&](int64_t f0, int64_t f1) {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t p0 = r.first[e], n = r.first[e + 1] - p0;
      if (n == 0) continue;
      const W* we = w13 + e * 2 * I * K;
      const float* se = s13 ? s13 + e * 2 * I : nullptr;
      gemm_rows<W, float, Simd>(rows.data() + p0 * K, we, se, nullptr, gate.data() + p0 * I, n, I, K, f0, f1);
      gemm_rows<W, float, Simd>(rows.data() + p0 * K, we + I * K, se ? se + I : nullptr, nullptr, up.data() + p0 * I,
                                n, I, K, f0, f1);
      for (int64_t m = p0; m < p0 + n; ++m)
        for (int64_t f = f0; f < f1; ++f) {
          float g = gate[m * I + f];
          gate[m * I + f] = g / (1.0f + std::exp(-g)) * up[m * I + f];
        }
    }
  });

  at::parallel_for(0, K, grain(pairs * I), [&](int64_t c0, int64_t c1) {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t p0 = r.first[e], n = r.first[e + 1] - p0;
      if (n == 0) continue;
      gemm_rows<W, float, Simd>(gate.data() + p0 * I, w2 + e * K * I, s2 ? s2 + e * K : nullptr, nullptr,
                                down.data() + p0 * K, n, K, I, c0, c1);
      for (int64_t m = p0; m < p0 + n; ++m) {
        float* dst = sum.data() + r.token[m] * K;
        const float* src = down.data() + m * K;
        for (int64_t c = c0; c < c1; ++c) dst[c] += r.weight[m] * src[c];
      }
    }
    for (int64_t t = 0; t < M; ++t)
      for (int64_t c = c0; c < c1; ++c) out[t * K + c] = Out(sum[t * K + c]);
  });
}

template <typename W, bool Simd>
at::Tensor run(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids, const at::Tensor& w13,
               const std::optional<at::Tensor>& w13_scale, const at::Tensor& w2,
               const std::optional<at::Tensor>& w2_scale, int64_t first_expert) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "fused_experts: x must be a bfloat16 or float32 [tokens, hidden] matrix");
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.is_contiguous() && w2.is_contiguous(),
              "fused_experts: w13 and w2 must be contiguous [experts, rows, columns]");
  const int64_t E = w13.size(0), I = w13.size(1) / 2, K = x.size(1);
  TORCH_CHECK(w13.size(1) == 2 * I && w13.size(2) == K && w2.size(0) == E && w2.size(1) == K && w2.size(2) == I,
              "fused_experts: w13 must be [E, 2I, K] and w2 [E, K, I] for x [M, K]");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0) && topk_weights.sizes() == topk_ids.sizes(),
              "fused_experts: topk_ids and topk_weights must both be [tokens, top_k]");
  TORCH_CHECK(w13_scale.has_value() == w2_scale.has_value(), "fused_experts: scales for both or neither");
  at::Tensor ids = topk_ids.to(at::kLong).contiguous(), weights = as_float(topk_weights);
  at::Tensor s13 = w13_scale ? as_float(*w13_scale) : at::Tensor(), s2 = w2_scale ? as_float(*w2_scale) : at::Tensor();
  TORCH_CHECK(!w13_scale || (s13.numel() == E * 2 * I && s2.numel() == E * K),
              "fused_experts: one scale per output row of each expert");
  at::Tensor xc = x.contiguous(), out = at::empty(xc.sizes(), xc.options());
  Routes routes = group_by_expert(ids, weights, first_expert, E);
  const W* a = reinterpret_cast<const W*>(w13.data_ptr());
  const W* b = reinterpret_cast<const W*>(w2.data_ptr());
  const float* sa = w13_scale ? s13.data_ptr<float>() : nullptr;
  const float* sb = w2_scale ? s2.data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat)
    experts<W, float, Simd>(xc, routes, a, sa, b, sb, out.data_ptr<float>(), E, K, I);
  else
    experts<W, at::BFloat16, Simd>(xc, routes, a, sa, b, sb, out.data_ptr<at::BFloat16>(), E, K, I);
  return out;
}

template <bool Simd>
at::Tensor dispatch(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                    const at::Tensor& w13, const std::optional<at::Tensor>& w13_scale, const at::Tensor& w2,
                    const std::optional<at::Tensor>& w2_scale, int64_t first_expert) {
  TORCH_CHECK(w13.scalar_type() == w2.scalar_type(), "fused_experts: w13 and w2 must have one dtype");
  if (w13.scalar_type() == at::kChar) {
    TORCH_CHECK(w13_scale.has_value(), "fused_experts: int8 experts need their scales");
    return run<int8_t, Simd>(x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, first_expert);
  }
  TORCH_CHECK(w13.scalar_type() == at::kBFloat16, "fused_experts: experts must be bfloat16 or int8");
  TORCH_CHECK(!w13_scale.has_value(), "fused_experts: bfloat16 experts take no scales");
  return run<uint16_t, Simd>(x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, first_expert);
}

at::Tensor fused_experts(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                         const at::Tensor& w13, const std::optional<at::Tensor>& w13_scale, const at::Tensor& w2,
                         const std::optional<at::Tensor>& w2_scale, int64_t first_expert, bool portable) {
  if (portable) return dispatch<false>(x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, first_expert);
  return dispatch<kSimd>(x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, first_expert);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xpuserve_gemm, m) {
  m.def("fused_experts(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor w13, Tensor? w13_scale, Tensor w2, "
        "Tensor? w2_scale, int first_expert=0, bool portable=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(xpuserve_gemm, CPU, m) { m.impl("fused_experts", &fused_experts); }
