// Decode attention read in place from the paged KV cache, on CPU.
//
// Each sequence's keys are cut into pieces, one run of pieces per thread with equal token counts
// (flash-decoding), so one long sequence keeps every thread busy. A piece walks its keys in tiles:
// the tile's rows are read through the block table and widened to float32 once, then scored
// against all query heads that share the KV head and accumulated into their outputs with an
// online softmax. Without a value cache (MLA's absorbed form) the values are those same widened
// rows, so each cached row is read once for all heads. The pieces' (max, sum, accumulator) are
// merged per sequence at the end.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// GCC/Clang vector types: 8 float32 lanes, one AVX2 register (two SSE or NEON ones elsewhere).
// Spelled out rather than left to the auto-vectoriser, which gave up on the softmax loops.
using Vec = float __attribute__((vector_size(32)));
using IntVec = int32_t __attribute__((vector_size(32)));
using HalfVec = uint16_t __attribute__((vector_size(16)));
constexpr int kLanes = 8;
constexpr int64_t kTile = 32;      // keys widened and scored together: a multiple of kLanes

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

inline Vec splat(float x) { return Vec{x, x, x, x, x, x, x, x}; }

inline float lane_sum(Vec v) {
  float sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += v[l];
  return sum;
}

// Holds v in a register. Without this gcc folds the load into every FMA that uses v (x86 FMAs take
// a memory operand), so the tile re-reads v once per use and waits on loads instead of FMAs.
inline void keep_in_register(Vec& v) {
#if defined(__x86_64__) && defined(__AVX__)
  asm("" : "+x"(v));
#else
  (void)v;
#endif
}

inline float widen(float x) { return x; }

inline float widen(at::BFloat16 x) {
  uint32_t bits = uint32_t(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// dst[0..n) = src[0..n) as float32.
inline void widen_row(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void widen_row(const at::BFloat16* src, float* dst, int64_t n) {
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    HalfVec half;
    std::memcpy(&half, src + d, sizeof half);
    store(dst + d, (Vec)(__builtin_convertvector(half, IntVec) << 16));  // bf16 is float32's top half
  }
  for (; d < n; ++d) dst[d] = widen(src[d]);
}

// exp(x) for x <= 0 (scores minus their running max), exactly 0 at -inf.
// x = n ln2 + r with |r| <= ln2 / 2; exp(r) by its Taylor series to r^6 (error ~2 ulp).
inline Vec exp_nonpositive(Vec x) {
  const Vec c = x > -87.0f ? x : splat(-87.0f);  // keeps 2^n a normal float
  const float shifter = 12582912.0f;  // 1.5 * 2^23: the sum's low mantissa bits hold round(c / ln2)
  const Vec t = c * 1.44269504f + shifter;
  const Vec n = t - shifter;
  Vec r = c - n * 0.693359375f;  // ln2 in two parts, so r keeps its low bits
  r = r - n * -2.12194440e-4f;
  Vec p = splat(1.0f / 720);
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const Vec two_n = (Vec)(((IntVec)t - 0x4B400000 + 127) << 23);
  return x < -87.0f ? splat(0.0f) : p * two_n;
}

// The 8 lanes' sums of each of a[0..8), as one vector: a tree of pairwise sums, no stores.
inline Vec sums_of_eight(const Vec* a) {
#if !defined(__clang__) && __GNUC__ < 12  // no __builtin_shufflevector
  Vec sums;
  for (int i = 0; i < kLanes; ++i) sums[i] = lane_sum(a[i]);
  return sums;
#else
  auto pairs = [](Vec x, Vec y) {  // [x0+x1, x2+x3, y0+y1, y2+y3, x4+x5, x6+x7, y4+y5, y6+y7]
    return __builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14) + __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15);
  };
  const Vec low = pairs(pairs(a[0], a[1]), pairs(a[2], a[3]));  // [a0..a3 sums of lanes 0-3, then of lanes 4-7]
  const Vec high = pairs(pairs(a[4], a[5]), pairs(a[6], a[7]));
  return __builtin_shufflevector(low, high, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(low, high, 4, 5, 6, 7, 12, 13, 14, 15);
#endif
}

// s[m][n] = dot(q row m, k row n) over dim values; M x N accumulators stay in registers.
template <int M, int N>
inline void dot_tile(const float* q, int64_t ldq, const float* k, int64_t ldk, float* s, int64_t lds, int64_t dim) {
  Vec acc[M * N] = {};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    Vec kv[N];
    for (int n = 0; n < N; ++n) {
      kv[n] = load(k + n * ldk + d);
      keep_in_register(kv[n]);
    }
    for (int m = 0; m < M; ++m) {
      Vec qv = load(q + m * ldq + d);
      keep_in_register(qv);
      for (int n = 0; n < N; ++n) acc[m * N + n] += qv * kv[n];
    }
  }
  float sums[M * N];
  if constexpr (M * N == kLanes) {
    store(sums, sums_of_eight(acc));
  } else {
    for (int i = 0; i < M * N; ++i) sums[i] = lane_sum(acc[i]);
  }
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float sum = sums[m * N + n];
      for (int64_t r = d; r < dim; ++r) sum += q[m * ldq + r] * k[n * ldk + r];
      s[m * lds + n] = sum;
    }
}

template <int M>
void dot_rows(const float* q, int64_t ldq, const float* k, int64_t ldk, float* s, int64_t lds, int64_t keys, int64_t dim) {
  int64_t n = 0;
  for (; n + 4 <= keys; n += 4) dot_tile<M, 4>(q, ldq, k + n * ldk, ldk, s + n, lds, dim);
  const float* kn = k + n * ldk;
  switch (keys - n) {
    case 3: dot_tile<M, 3>(q, ldq, kn, ldk, s + n, lds, dim); break;
    case 2: dot_tile<M, 2>(q, ldq, kn, ldk, s + n, lds, dim); break;
    case 1: dot_tile<M, 1>(q, ldq, kn, ldk, s + n, lds, dim); break;
  }
}

// s [rows, keys] = q [rows, dim] @ k [keys, dim]^T, in tiles of 2 query rows x 4 keys (the fastest
// of 4x2, 2x4, 3x4, 4x3, 6x2, 8x1 and 1x8 on AVX2).
void scores(const float* q, int64_t ldq, const float* k, int64_t ldk, float* s, int64_t lds, int64_t rows, int64_t keys,
            int64_t dim) {
  int64_t m = 0;
  for (; m + 2 <= rows; m += 2) dot_rows<2>(q + m * ldq, ldq, k, ldk, s + m * lds, lds, keys, dim);
  if (m < rows) dot_rows<1>(q + m * ldq, ldq, k, ldk, s + m * lds, lds, keys, dim);
}

// c[m][0..W) += sum over k of p[m][k] * v[k][0..W), W = V vectors; M x V accumulators stay in registers.
template <int M, int V>
inline void axpy_tile(const float* p, int64_t ldp, const float* v, int64_t ldv, float* c, int64_t ldc, int64_t keys) {
  Vec acc[M][V] = {};
  for (int64_t k = 0; k < keys; ++k) {
    Vec vv[V];
    for (int i = 0; i < V; ++i) {
      vv[i] = load(v + k * ldv + i * kLanes);
      keep_in_register(vv[i]);
    }
    for (int m = 0; m < M; ++m) {
      const Vec pm = splat(p[m * ldp + k]);
      for (int i = 0; i < V; ++i) acc[m][i] += pm * vv[i];
    }
  }
  for (int m = 0; m < M; ++m)
    for (int i = 0; i < V; ++i) store(c + m * ldc + i * kLanes, load(c + m * ldc + i * kLanes) + acc[m][i]);
}

template <int M>
void axpy_rows(const float* p, int64_t ldp, const float* v, int64_t ldv, float* c, int64_t ldc, int64_t keys, int64_t width) {
  int64_t n = 0;
  for (; n + 2 * kLanes <= width; n += 2 * kLanes) axpy_tile<M, 2>(p, ldp, v + n, ldv, c + n, ldc, keys);
  if (n + kLanes <= width) {
    axpy_tile<M, 1>(p, ldp, v + n, ldv, c + n, ldc, keys);
    n += kLanes;
  }
  for (; n < width; ++n)
    for (int m = 0; m < M; ++m)
      for (int64_t k = 0; k < keys; ++k) c[m * ldc + n] += p[m * ldp + k] * v[k * ldv + n];
}

// c [rows, width] += p [rows, keys] @ v [keys, width], in tiles of 4 rows x 16 columns (the fastest
// of 4x16, 2x32, 6x16, 3x32, 8x8 and 4x24 on AVX2).
void accumulate(const float* p, int64_t ldp, const float* v, int64_t ldv, float* c, int64_t ldc, int64_t rows, int64_t keys,
                int64_t width) {
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) axpy_rows<4>(p + m * ldp, ldp, v, ldv, c + m * ldc, ldc, keys, width);
  const float* pm = p + m * ldp;
  float* cm = c + m * ldc;
  switch (rows - m) {
    case 3: axpy_rows<3>(pm, ldp, v, ldv, cm, ldc, keys, width); break;
    case 2: axpy_rows<2>(pm, ldp, v, ldv, cm, ldc, keys, width); break;
    case 1: axpy_rows<1>(pm, ldp, v, ldv, cm, ldc, keys, width); break;
  }
}

struct Piece {
  int64_t stream;  // sequence * kv_heads + kv head
  int64_t begin, end;  // key positions
};

// Cuts the streams' keys into equal runs, one per thread, of at least min_share keys (so a small
// step wakes fewer threads); a run also ends where a stream does. Thread t's pieces are
// [first_of_thread[t], first_of_thread[t + 1]).
std::vector<Piece> cut(const std::vector<int64_t>& lens, int64_t kv_heads, int64_t threads, int64_t min_share,
                       std::vector<int64_t>& first_of_thread) {
  int64_t total = 0;
  for (int64_t len : lens) total += len * kv_heads;
  const int64_t used = std::clamp<int64_t>(total / min_share, 1, threads);
  const int64_t share = (total + used - 1) / used;
  std::vector<Piece> pieces;
  first_of_thread.assign(used + 1, 0);
  int64_t offset = 0;  // of the stream's first key among all keys
  for (int64_t s = 0; s < int64_t(lens.size()) * kv_heads; ++s) {
    const int64_t len = lens[s / kv_heads];
    for (int64_t begin = 0; begin < len;) {
      const int64_t owner = (offset + begin) / share;
      const int64_t end = std::min(len, (owner + 1) * share - offset);
      pieces.push_back({s, begin, end});
      first_of_thread[owner + 1] = int64_t(pieces.size());
      begin = end;
    }
    offset += len;
  }
  for (int64_t t = 1; t <= used; ++t) first_of_thread[t] = std::max(first_of_thread[t], first_of_thread[t - 1]);
  return pieces;
}

struct Problem {
  const float* q;  // [B, H, D], already scaled
  int64_t heads, kv_heads, dim, v_dim;
  const int32_t* tables;
  int64_t table_width, block_size;
  int64_t k_row, k_head, v_row, v_head;  // strides, in elements
};

// Softmax of one tile's scores, folded into the running max, sum and output of each query row:
// the scores become their weights exp(score - max) in place.
void softmax_tile(float* sbuf, int64_t rows, int64_t keys, float* run_max, float* run_sum, float* out, int64_t v_dim) {
  for (int64_t g = 0; g < rows; ++g) {
    float* row = sbuf + g * kTile;
    std::fill(row + keys, row + kTile, -std::numeric_limits<float>::infinity());  // a short last tile
    Vec top = load(row);
    for (int64_t j = kLanes; j < kTile; j += kLanes) top = top > load(row + j) ? top : load(row + j);
    float new_max = run_max[g];
    for (int l = 0; l < kLanes; ++l) new_max = std::max(new_max, top[l]);
    Vec sum = {};
    for (int64_t j = 0; j < kTile; j += kLanes) {
      const Vec e = exp_nonpositive(load(row + j) - new_max);
      store(row + j, e);
      sum += e;
    }
    if (new_max > run_max[g]) {
      const float shrink = std::exp(run_max[g] - new_max);  // 0 on the first tile, from -inf
      run_sum[g] *= shrink;
      for (float* o = out + g * v_dim; o < out + (g + 1) * v_dim; ++o) *o *= shrink;
      run_max[g] = new_max;
    }
    run_sum[g] += lane_sum(sum);
  }
}

// One piece: its running max, sum and unnormalised output for the group's query heads.
template <typename T>
void attend_piece(const Problem& p, const T* k_cache, const T* v_cache, const Piece& piece, float* kbuf, float* vbuf,
                  float* sbuf, float* run_max, float* run_sum, float* out) {
  const int64_t group = p.heads / p.kv_heads;
  const int64_t seq = piece.stream / p.kv_heads, kv_head = piece.stream % p.kv_heads;
  const float* q = p.q + (seq * p.heads + kv_head * group) * p.dim;
  const int32_t* table = p.tables + seq * p.table_width;
  auto slot = [&](int64_t pos) { return int64_t(table[pos / p.block_size]) * p.block_size + pos % p.block_size; };
  // With no separate values they are the keys' first v_dim columns, already widened in kbuf.
  const float* values = v_cache ? vbuf : kbuf;
  const int64_t ld_values = v_cache ? p.v_dim : p.dim;
  std::fill(run_max, run_max + group, -std::numeric_limits<float>::infinity());
  std::fill(run_sum, run_sum + group, 0.0f);
  std::fill(out, out + group * p.v_dim, 0.0f);
  for (int64_t start = piece.begin; start < piece.end; start += kTile) {
    const int64_t keys = std::min(kTile, piece.end - start);
    for (int64_t j = 0; j < keys; ++j) {
      const int64_t at = slot(start + j);
      widen_row(k_cache + at * p.k_row + kv_head * p.k_head, kbuf + j * p.dim, p.dim);
      if (v_cache) widen_row(v_cache + at * p.v_row + kv_head * p.v_head, vbuf + j * p.v_dim, p.v_dim);
      if (start + j + kTile < piece.end) {  // the next tile's key, so it is in cache by then (~5% faster)
        const char* next = reinterpret_cast<const char*>(k_cache + slot(start + j + kTile) * p.k_row + kv_head * p.k_head);
        for (int64_t b = 0; b < p.dim * int64_t(sizeof(T)); b += 64) __builtin_prefetch(next + b);
      }
    }
    scores(q, p.dim, kbuf, p.dim, sbuf, kTile, group, keys, p.dim);
    softmax_tile(sbuf, group, keys, run_max, run_sum, out, p.v_dim);
    accumulate(sbuf, kTile, values, ld_values, out, p.v_dim, group, keys, p.v_dim);
  }
}

// What the pieces leave for the merge: per piece and query head of the group, max, sum and output.
struct Partials {
  std::vector<Piece> pieces;
  std::vector<float> maxes, sums, outs;
};

template <typename T>
Partials attend_pieces(const Problem& p, const T* k_cache, const T* v_cache, const std::vector<int64_t>& lens) {
  const int64_t group = p.heads / p.kv_heads;
  const int64_t threads = at::get_num_threads();
  // A thread's share is at least ~4M multiply-adds (~0.1 ms): below that, waking it costs more than it saves.
  const int64_t min_share = std::max<int64_t>(kTile, (int64_t(1) << 22) / (group * (p.dim + p.v_dim)));
  std::vector<int64_t> first_of_thread;
  Partials r;
  r.pieces = cut(lens, p.kv_heads, threads, min_share, first_of_thread);
  const int64_t count = int64_t(r.pieces.size());
  r.maxes.resize(count * group);
  r.sums.resize(count * group);
  r.outs.resize(count * group * p.v_dim);
  at::parallel_for(0, int64_t(first_of_thread.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kbuf(kTile * p.dim), vbuf(v_cache ? kTile * p.v_dim : 0), sbuf(group * kTile);
    for (int64_t i = first_of_thread[begin]; i < first_of_thread[end]; ++i)
      attend_piece(p, k_cache, v_cache, r.pieces[i], kbuf.data(), vbuf.data(), sbuf.data(), &r.maxes[i * group],
                   &r.sums[i * group], &r.outs[i * group * p.v_dim]);
  });
  return r;
}

// dst[0..n) = src[0..n), rounded to bfloat16 (to nearest even, as torch rounds) or copied.
inline void narrow_row(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void narrow_row(const float* src, at::BFloat16* dst, int64_t n) {
  using UIntVec = uint32_t __attribute__((vector_size(32)));
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    const Vec x = load(src + d);
    const UIntVec bits = (UIntVec)x;
    const UIntVec rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
    const HalfVec half = __builtin_convertvector(x != x ? UIntVec{} + 0x7FC0 : rounded, HalfVec);  // NaN stays NaN
    std::memcpy(dst + d, &half, sizeof half);
  }
  for (; d < n; ++d) dst[d] = at::BFloat16(src[d]);
}

// Each stream's pieces (consecutive in the list) into out [B, H, v_dim], each weighted by exp(its max - the overall max).
template <typename Out>
void merge(const Partials& r, int64_t streams, int64_t group, int64_t v_dim, Out* out) {
  const int64_t count = int64_t(r.pieces.size());
  std::vector<int64_t> first_of_stream(streams + 1, count);
  for (int64_t i = count - 1; i >= 0; --i) first_of_stream[r.pieces[i].stream] = i;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (group * v_dim));  // ~0.25M multiply-adds a thread
  at::parallel_for(0, streams, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> weight, row(v_dim);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t lo = first_of_stream[s], hi = first_of_stream[s + 1];
      weight.resize(hi - lo);
      for (int64_t g = 0; g < group; ++g) {
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t i = lo; i < hi; ++i) top = std::max(top, r.maxes[i * group + g]);
        float total = 0;
        for (int64_t i = lo; i < hi; ++i) {
          weight[i - lo] = std::exp(r.maxes[i * group + g] - top);
          total += weight[i - lo] * r.sums[i * group + g];
        }
        std::fill(row.begin(), row.end(), 0.0f);
        for (int64_t i = lo; i < hi; ++i) {
          const float w = weight[i - lo] / total;
          const float* src = &r.outs[(i * group + g) * v_dim];
          for (int64_t d = 0; d < v_dim; ++d) row[d] += w * src[d];
        }
        narrow_row(row.data(), out + (s * group + g) * v_dim, v_dim);  // stream s's heads are rows s * group.. of [B, H]
      }
    }
  });
}

template <typename Q>
std::vector<float> scaled(const Q* q, int64_t n, float scale) {
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = widen(q[i]) * scale;
  return out;
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const std::optional<at::Tensor>& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size, double scale,
                        int64_t v_dim) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3, "q must be [B, H, D] and k_cache [slots, Hk, D]");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t slots = k_cache.size(0), kv_heads = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == dim, "q and k_cache differ in head size");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "q must be float32 or bfloat16");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16,
              "k_cache must be float32 or bfloat16");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.size(0) == batch,
              "block_tables must be int32 [B, max_blocks]");
  TORCH_CHECK(context_lens.scalar_type() == at::kInt && context_lens.numel() == batch, "context_lens must be int32 [B]");
  TORCH_CHECK(block_size > 0, "block_size must be positive");
  TORCH_CHECK(v_dim > 0, "v_dim must be positive");
  const at::Tensor keys = k_cache.stride(2) == 1 ? k_cache : k_cache.contiguous();
  at::Tensor values;
  if (v_cache.has_value()) {
    values = v_cache->stride(2) == 1 ? *v_cache : v_cache->contiguous();
    TORCH_CHECK(values.dim() == 3 && values.size(0) == slots && values.size(1) == kv_heads && values.size(2) >= v_dim,
                "v_cache must be [slots, Hk, >= v_dim]");
    TORCH_CHECK(values.scalar_type() == keys.scalar_type(), "k_cache and v_cache differ in dtype");
  } else {
    TORCH_CHECK(v_dim <= dim, "without v_cache, v_dim must be at most the key size");
  }

  const at::Tensor tables = block_tables.contiguous();
  const at::Tensor lens_tensor = context_lens.contiguous();
  const int32_t* table_data = tables.data_ptr<int32_t>();
  const int64_t width = tables.size(1);
  std::vector<int64_t> lens(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = lens_tensor.data_ptr<int32_t>()[b];
    TORCH_CHECK(len >= 1 && len <= width * block_size, "context length ", len, " of sequence ", b, " outside 1..",
                width * block_size);
    for (int64_t i = 0; i * block_size < len; ++i) {
      const int64_t block = table_data[b * width + i], used = std::min(block_size, len - i * block_size);
      TORCH_CHECK(block >= 0 && block * block_size + used <= slots, "block ", block, " of sequence ", b, " outside the cache");
    }
    lens[b] = len;
  }

  const at::Tensor qc = q.contiguous();
  const std::vector<float> qf = q.scalar_type() == at::kFloat ? scaled(qc.data_ptr<float>(), qc.numel(), float(scale))
                                                              : scaled(qc.data_ptr<at::BFloat16>(), qc.numel(), float(scale));
  Problem p{qf.data(), heads, kv_heads, dim, v_dim, table_data, width, block_size,
            keys.stride(0), keys.stride(1), values.defined() ? values.stride(0) : 0, values.defined() ? values.stride(1) : 0};
  const Partials partials =
      keys.scalar_type() == at::kFloat
          ? attend_pieces(p, keys.data_ptr<float>(), values.defined() ? values.data_ptr<float>() : nullptr, lens)
          : attend_pieces(p, keys.data_ptr<at::BFloat16>(), values.defined() ? values.data_ptr<at::BFloat16>() : nullptr, lens);
  at::Tensor out = at::empty({batch, heads, v_dim}, q.options());
  if (out.scalar_type() == at::kFloat)
    merge(partials, batch * kv_heads, heads / kv_heads, v_dim, out.data_ptr<float>());
  else
    merge(partials, batch * kv_heads, heads / kv_heads, v_dim, out.data_ptr<at::BFloat16>());
  return out;
}

}  // namespace

TORCH_LIBRARY(xpuserve_kernels, m) {
  m.def(
      "paged_decode(Tensor q, Tensor k_cache, Tensor? v_cache, Tensor block_tables, Tensor context_lens, int block_size, "
      "float scale, int v_dim) -> Tensor");
}

TORCH_LIBRARY_IMPL(xpuserve_kernels, CPU, m) { m.impl("paged_decode", &paged_decode); }
