// Writes a step's new keys/values (or MLA latents) into their cache slots, on CPU: one op instead of
// index_put plus a dtype conversion, and callable inside a compiled graph without a Python round trip.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

// c10's BFloat16(float) rounds to nearest even, as torch's conversion does, and keeps NaN a NaN.
template <typename From, typename To>
void copy_row(const From* src, To* dst, int64_t n) {
  if constexpr (std::is_same_v<From, To>) {
    std::memcpy(dst, src, n * sizeof(To));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = To(float(src[i]));
  }
}

template <typename From, typename To>
void write_rows(const at::Tensor& cache, const int64_t* slots, const at::Tensor& values, int64_t rows, int64_t width) {
  const From* src = values.data_ptr<From>();
  To* dst = cache.data_ptr<To>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) copy_row(src + r * width, dst + slots[r] * width, width);
  });
}

template <typename From>
void write_from(const at::Tensor& cache, const int64_t* slots, const at::Tensor& values, int64_t rows, int64_t width) {
  if (cache.scalar_type() == at::kFloat)
    write_rows<From, float>(cache, slots, values, rows, width);
  else
    write_rows<From, at::BFloat16>(cache, slots, values, rows, width);
}

// cache [slots, ...] contiguous; values [N, ...] with the same trailing shape; slots int64 [N].
void store_kv(at::Tensor& cache, const at::Tensor& slots, const at::Tensor& values) {
  TORCH_CHECK(cache.is_contiguous() && cache.dim() >= 1, "store_kv: cache must be contiguous");
  TORCH_CHECK(cache.scalar_type() == at::kFloat || cache.scalar_type() == at::kBFloat16, "store_kv: cache must be float32 or bfloat16");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16, "store_kv: values must be float32 or bfloat16");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1, "store_kv: slots must be int64 [N]");
  TORCH_CHECK(values.dim() == cache.dim() && values.size(0) == slots.size(0), "store_kv: values must be [N, ...] like the cache's rows");
  for (int64_t d = 1; d < cache.dim(); ++d)
    TORCH_CHECK(values.size(d) == cache.size(d), "store_kv: values and cache rows differ in shape");
  const int64_t rows = slots.size(0), width = cache.dim() == 1 ? 1 : cache.numel() / cache.size(0);
  const at::Tensor slots_c = slots.contiguous(), values_c = values.contiguous();
  const int64_t* s = slots_c.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(s[r] >= 0 && s[r] < cache.size(0), "store_kv: slot ", s[r], " outside the cache of ", cache.size(0));
  if (values_c.scalar_type() == at::kFloat)
    write_from<float>(cache, s, values_c, rows, width);
  else
    write_from<at::BFloat16>(cache, s, values_c, rows, width);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xpuserve_kernels, m) { m.def("store_kv(Tensor(a!) cache, Tensor slots, Tensor values) -> ()"); }

TORCH_LIBRARY_IMPL(xpuserve_kernels, CPU, m) { m.impl("store_kv", &store_kv); }
