// Weight-streaming GEMM for a few rows: out[M, N] = x[M, K] @ dequant(W[N, K])^T (+ bias), on CPU.
//
// W is bfloat16, or int8 with one float32 scale per output row. x is widened to float32 once; each
// weight row is then read once for all M rows and widened in registers. Threads split N. Within a
// thread, N goes in panels small enough to stay in L2; per panel, x goes in tiles of up to 4 rows
// (in L1 up to K ~ 1500) and each tile is dotted with groups of up to 4 weight rows, one accumulator per
// (row, weight row) pair, summed across lanes at the end, while the next group's rows are prefetched.
// Everything accumulates in float32.
#include "gemm_tiles.h"

namespace {

template <typename W, bool Simd>
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous [N, K] matrix");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "x must be bfloat16 or float32");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "x's last dimension must equal weight's K");
  TORCH_CHECK(!scale || scale->numel() == weight.size(0), "scale must hold one value per output row");
  TORCH_CHECK(!bias || bias->numel() == weight.size(0), "bias must hold one value per output row");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  at::Tensor out = at::empty(out_sizes, x.options());
  if (M == 0 || N == 0) return out;

  at::Tensor rows = x.contiguous();  // x itself, as a rule
  std::unique_ptr<float[]> wide;     // bfloat16 rows widened here: cheaper than an ATen op for a few rows
  const float* xf;
  if (rows.scalar_type() == at::kFloat) {
    xf = rows.data_ptr<float>();
  } else {
    wide.reset(new float[M * K]);
    for (int64_t m = 0; m < M; ++m) widen_row(rows, m, K, wide.get() + m * K);
    xf = wide.get();
  }
  at::Tensor scale_f = scale ? as_float(*scale) : at::Tensor(), bias_f = bias ? as_float(*bias) : at::Tensor();
  const W* w = reinterpret_cast<const W*>(weight.data_ptr());
  const float* s = scale ? scale_f.data_ptr<float>() : nullptr;
  const float* b = bias ? bias_f.data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat)
    gemm<W, float, Simd>(xf, w, s, b, out.data_ptr<float>(), M, N, K);
  else
    gemm<W, at::BFloat16, Simd>(xf, w, s, b, out.data_ptr<at::BFloat16>(), M, N, K);
  return out;
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "bf16_linear: weight must be bfloat16");
  return linear<uint16_t, kSimd>(x, weight, std::nullopt, bias);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.scalar_type() == at::kChar, "int8_linear: weight must be int8");
  return linear<int8_t, kSimd>(x, weight, scale, bias);
}

// The portable tiles on any machine, so that tests check them where AVX2 is what normally runs.
at::Tensor portable_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& bias) {
  if (weight.scalar_type() == at::kChar) {
    TORCH_CHECK(scale.has_value(), "portable_linear: int8 weights need a scale");
    return linear<int8_t, false>(x, weight, scale, bias);
  }
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "portable_linear: weight must be bfloat16 or int8");
  return linear<uint16_t, false>(x, weight, scale, bias);
}

std::string simd() { return kSimd ? "AVX2" : "portable"; }

}  // namespace

TORCH_LIBRARY(xpuserve_gemm, m) {
  m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias=None) -> Tensor");
  m.def("portable_linear(Tensor x, Tensor weight, Tensor? scale=None, Tensor? bias=None) -> Tensor");
  m.def("simd() -> str", &simd);
}

TORCH_LIBRARY_IMPL(xpuserve_gemm, CPU, m) {
  m.impl("bf16_linear", &bf16_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("portable_linear", &portable_linear);
}
