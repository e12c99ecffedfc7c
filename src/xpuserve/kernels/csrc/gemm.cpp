// Weight-streaming GEMM for a few rows: out[M, N] = x[M, K] @ dequant(W[N, K])^T (+ bias), on CPU.
//
// W is bfloat16, or int8 with one float32 scale per output row. x is widened to float32 once; each
// weight row is then read once for all M rows and widened in registers. Threads split N. Within a
// thread, N goes in panels small enough to stay in L2; per panel, x goes in tiles of up to 4 rows
// (in L1 up to K ~ 1500) and each tile is dotted with groups of up to 4 weight rows, one accumulator per
// (row, weight row) pair, summed across lanes at the end, while the next group's rows are prefetched.
// Everything accumulates in float32.
#include "gemm_tiles.h"

#include <vector>

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

// acc[0..M) += a * w[0..M), w widened from bfloat16.
inline void axpy(float a, const uint16_t* w, float* acc, int64_t M) {
  int64_t m = 0;
#ifdef XPUSERVE_GEMM_AVX2
  const __m256 av = _mm256_set1_ps(a);
  for (; m + kLanes <= M; m += kLanes) _mm256_storeu_ps(acc + m, _mm256_fmadd_ps(av, load8(w + m), _mm256_loadu_ps(acc + m)));
#endif
  for (; m < M; ++m) acc[m] += a * widen(w[m]);
}

// One head's rows: out[t, m] (row stride ld_out) = x[t] . w[m] (w [M, K]), or with `transposed`
// sum over k of x[t, k] * w[k] (w [K, M], row stride ld_w).
template <typename Out>
void head_rows(const float* x, const uint16_t* w, int64_t ld_w, Out* out, int64_t ld_out, int64_t T, int64_t K,
               int64_t M, bool transposed) {
  if (!transposed) {
    gemm_rows<uint16_t, Out, kSimd>(x, w, nullptr, nullptr, out, T, ld_out, K, 0, M);
    return;
  }
  std::vector<float> acc(M);
  for (int64_t t = 0; t < T; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t k = 0; k < K; ++k) axpy(x[t * K + k], w + k * ld_w, acc.data(), M);
    for (int64_t m = 0; m < M; ++m) out[t * ld_out + m] = Out(acc[m]);
  }
}

// out[t, h] = x[t, h] @ weight[h]^T for weight [H, M, K], or x[t, h] @ weight[h] for weight [H, K, M] with
// `transposed`: MLA's absorbed decode, whose per-head blocks of kv_b_proj (bfloat16) meet a few tokens.
// Heads are split across threads; each head's weight block is read once for all tokens.
at::Tensor head_linear(const at::Tensor& x, const at::Tensor& weight, bool transposed) {
  TORCH_CHECK(x.dim() == 3 && weight.dim() == 3 && weight.size(0) == x.size(1), "head_linear: x must be [T, H, K] and weight [H, ., .]");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.stride(2) == 1, "head_linear: weight must be bfloat16 with contiguous rows");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "head_linear: x must be bfloat16 or float32");
  const int64_t T = x.size(0), H = x.size(1), K = x.size(2);
  const int64_t M = weight.size(transposed ? 2 : 1);
  TORCH_CHECK(weight.size(transposed ? 1 : 2) == K, "head_linear: weight and x differ in K");
  TORCH_CHECK(transposed || weight.stride(1) == K, "head_linear: weight rows must be packed");
  at::Tensor out = at::empty({T, H, M}, x.options());
  if (T == 0 || M == 0) return out;
  const at::Tensor xc = x.stride(2) == 1 ? x : x.contiguous();
  std::vector<float> xf(H * T * K);  // [H][T][K]: each head's rows together, as the tiles take them
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      float* dst = xf.data() + (h * T + t) * K;
      const int64_t at = t * xc.stride(0) + h * xc.stride(1);
      if (xc.scalar_type() == at::kFloat) {
        std::memcpy(dst, xc.data_ptr<float>() + at, K * sizeof(float));
      } else {
        const auto* src = reinterpret_cast<const uint16_t*>(xc.data_ptr()) + at;
        for (int64_t k = 0; k < K; ++k) dst[k] = widen(src[k]);
      }
    }
  const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  at::parallel_for(0, H, std::max<int64_t>(1, kMinMacsPerThread / std::max<int64_t>(1, T * K * M)), [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      const float* xh = xf.data() + h * T * K;
      const uint16_t* wh = w + h * weight.stride(0);
      if (x.scalar_type() == at::kFloat)
        head_rows(xh, wh, weight.stride(1), out.data_ptr<float>() + h * M, H * M, T, K, M, transposed);
      else
        head_rows(xh, wh, weight.stride(1), out.data_ptr<at::BFloat16>() + h * M, H * M, T, K, M, transposed);
    }
  });
  return out;
}

std::string simd() { return kSimd ? "AVX2" : "portable"; }

}  // namespace

TORCH_LIBRARY(xpuserve_gemm, m) {
  m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias=None) -> Tensor");
  m.def("portable_linear(Tensor x, Tensor weight, Tensor? scale=None, Tensor? bias=None) -> Tensor");
  m.def("head_linear(Tensor x, Tensor weight, bool transposed=False) -> Tensor");
  m.def("simd() -> str", &simd);
}

TORCH_LIBRARY_IMPL(xpuserve_gemm, CPU, m) {
  m.impl("bf16_linear", &bf16_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("portable_linear", &portable_linear);
  m.impl("head_linear", &head_linear);
}
