// The weight-streaming GEMM's tiles and panels, shared by the linear ops (gemm.cpp) and the fused
// experts (moe.cpp). Included once per translation unit; everything here is internal to it.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define XPUSERVE_GEMM_AVX2 1
#endif

namespace {

constexpr int kMaxRows = 4;         // x rows per tile
constexpr int kMaxCols = 4;         // weight rows per tile
constexpr int kLanes = 8;           // float32 lanes of one AVX2 register
constexpr int64_t kPanelBytes = 128 << 10;  // weight bytes per panel: a quarter of a 512 KiB L2
constexpr int64_t kMinMacsPerThread = 1 << 16;  // less work than this is not worth a thread

inline float widen(int8_t v) { return float(v); }

inline float widen(uint16_t v) {  // bfloat16 bits
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// dots[i][j] += x[i, k0..K) . w[j, k0..K): the tail past the last full group of lanes.
template <int R, int C, typename W>
inline void tail(const float* x, const W* w, int64_t K, int64_t k0, float (&dots)[kMaxRows][kMaxCols]) {
  for (int64_t k = k0; k < K; ++k)
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < C; ++j) dots[i][j] += x[i * K + k] * widen(w[j * K + k]);
}

// The portable tile: the same lane-wise sums as the AVX2 one, in plain C++ (vectorised by the
// compiler where it can). This is what machines without AVX2 and FMA run.
template <int R, int C, typename W>
void tile_portable(const float* x, const W* w, int64_t K, float (&dots)[kMaxRows][kMaxCols]) {
  float acc[R][C][kLanes] = {};
  const char* next = reinterpret_cast<const char*>(w + C * K);
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    __builtin_prefetch(next + k * C * sizeof(W));
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < C; ++j)
        for (int l = 0; l < kLanes; ++l) acc[i][j][l] += x[i * K + k + l] * widen(w[j * K + k + l]);
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) {
      float sum = 0;
      for (int l = 0; l < kLanes; ++l) sum += acc[i][j][l];
      dots[i][j] = sum;
    }
  tail<R, C>(x, w, K, k, dots);
}

#ifdef XPUSERVE_GEMM_AVX2
inline __m256 load8(const uint16_t* p) {  // 8 bfloat16 -> float32: the bits moved to the high half
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Also fetches the next tile's weight rows (they follow this tile's in memory) into L1 as it goes: with
// only the hardware prefetcher, which sees C streams of one short row each, a thread read weights from
// memory at about half the rate. A prefetch past the end of the weights is harmless: prefetches never fault.
template <int R, int C, typename W>
void tile_avx2(const float* x, const W* w, int64_t K, float (&dots)[kMaxRows][kMaxCols]) {
  __m256 acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) acc[i][j] = _mm256_setzero_ps();
  const char* next = reinterpret_cast<const char*>(w + C * K);
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    _mm_prefetch(next + k * C * sizeof(W), _MM_HINT_T0);
    __m256 wv[C];
    for (int j = 0; j < C; ++j) wv[j] = load8(w + j * K + k);
    for (int i = 0; i < R; ++i) {
      __m256 xv = _mm256_loadu_ps(x + i * K + k);
      for (int j = 0; j < C; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) dots[i][j] = lane_sum(acc[i][j]);
  tail<R, C>(x, w, K, k, dots);
}
#endif

template <typename W>
using Tile = void (*)(const float*, const W*, int64_t, float (&)[kMaxRows][kMaxCols]);

template <int R, int C, typename W, bool Simd>
constexpr Tile<W> pick() {
#ifdef XPUSERVE_GEMM_AVX2
  if (Simd) return &tile_avx2<R, C, W>;
#endif
  return &tile_portable<R, C, W>;
}

// Every shape of tile, indexed [rows - 1][columns - 1].
template <typename W, bool Simd>
constexpr Tile<W> kTiles[kMaxRows][kMaxCols] = {
    {pick<1, 1, W, Simd>(), pick<1, 2, W, Simd>(), pick<1, 3, W, Simd>(), pick<1, 4, W, Simd>()},
    {pick<2, 1, W, Simd>(), pick<2, 2, W, Simd>(), pick<2, 3, W, Simd>(), pick<2, 4, W, Simd>()},
    {pick<3, 1, W, Simd>(), pick<3, 2, W, Simd>(), pick<3, 3, W, Simd>(), pick<3, 4, W, Simd>()},
    {pick<4, 1, W, Simd>(), pick<4, 2, W, Simd>(), pick<4, 3, W, Simd>(), pick<4, 4, W, Simd>()},
};

// The tile shape for M rows: all of them against 4 weight rows while they fit (a single pass over
// the weights, which is bound by memory bandwidth), else 4 rows by 3 weight rows, 12 accumulators.
inline void tile_shape(int64_t M, int& rows, int& cols) {
  rows = M < kMaxRows ? int(M) : kMaxRows;
  cols = M < kMaxRows ? 4 : 3;
}

// out[m0 + i, n + j] for one tile's dots: scaled, biased and rounded to Out.
template <typename Out>
inline void store(const float (&dots)[kMaxRows][kMaxCols], int r, int c, const float* scale, const float* bias,
                  Out* out, int64_t N, int64_t m, int64_t n) {
  for (int i = 0; i < r; ++i)
    for (int j = 0; j < c; ++j) {
      float v = dots[i][j];
      if (scale) v *= scale[n + j];
      if (bias) v += bias[n + j];
      out[(m + i) * N + n + j] = Out(v);
    }
}

// Weight rows [p0, p1) against all M rows of x; w points at row p0.
template <typename W, typename Out, bool Simd>
void panel(const float* x, const W* w, const float* scale, const float* bias, Out* out, int64_t M, int64_t N,
           int64_t K, int64_t p0, int64_t p1, int rows, int cols) {
  const auto& tiles = kTiles<W, Simd>;
  float dots[kMaxRows][kMaxCols];
  for (int64_t m = 0; m < M; m += rows) {
    int r = int(std::min<int64_t>(rows, M - m));
    for (int64_t n = p0; n < p1; n += cols) {
      int c = int(std::min<int64_t>(cols, p1 - n));
      tiles[r - 1][c - 1](x + m * K, w + (n - p0) * K, K, dots);
      store(dots, r, c, scale, bias, out, N, m, n);
    }
  }
}

// Weight rows [n_begin, n_end) of w (N rows in all) against all M rows of x, in panels that stay in L2:
// what one thread does. out is [M, N]; scale (one per weight row) and bias may be null.
template <typename W, typename Out, bool Simd>
void gemm_rows(const float* x, const W* w, const float* scale, const float* bias, Out* out, int64_t M, int64_t N,
               int64_t K, int64_t n_begin, int64_t n_end) {
  int rows, cols;
  tile_shape(M, rows, cols);
  // Measured slower, so not done: widening a panel to float32 once for all tiles of rows (instead of in
  // registers), and slicing K so that x's tile stays in L1 (K = 1408 and 4096, M = 16 and 64: the extra
  // lane sums and partial-sum passes cost more than the L2 reads they save).
  int64_t width = std::max<int64_t>(cols, kPanelBytes / std::max<int64_t>(1, K * int64_t(sizeof(W))) / cols * cols);
  for (int64_t p0 = n_begin; p0 < n_end; p0 += width)
    panel<W, Out, Simd>(x, w + p0 * K, scale, bias, out, M, N, K, p0, std::min(p0 + width, n_end), rows, cols);
}

// The smallest share of a parallel loop worth a thread when each item costs `macs_per_item`.
inline int64_t grain(int64_t macs_per_item) {
  return std::max<int64_t>(kMaxCols, kMinMacsPerThread / std::max<int64_t>(1, macs_per_item));
}

template <typename W, typename Out, bool Simd>
void gemm(const float* x, const W* w, const float* scale, const float* bias, Out* out, int64_t M, int64_t N,
          int64_t K) {
  at::parallel_for(0, N, grain(M * K), [&](int64_t n_begin, int64_t n_end) {
    gemm_rows<W, Out, Simd>(x, w, scale, bias, out, M, N, K, n_begin, n_end);
  });
}

// t as contiguous float32: itself where it already is (no ATen op: at decode sizes those cost more than the GEMM).
inline at::Tensor as_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
}

// Row r of a contiguous bfloat16 or float32 matrix of width K, widened into dst.
inline void widen_row(const at::Tensor& t, int64_t r, int64_t K, float* dst) {
  if (t.scalar_type() == at::kFloat) {
    std::memcpy(dst, t.data_ptr<float>() + r * K, K * sizeof(float));
    return;
  }
  const auto* src = reinterpret_cast<const uint16_t*>(t.data_ptr()) + r * K;
  for (int64_t k = 0; k < K; ++k) dst[k] = widen(src[k]);
}

constexpr bool kSimd =
#ifdef XPUSERVE_GEMM_AVX2
    true;
#else
    false;
#endif

}  // namespace
