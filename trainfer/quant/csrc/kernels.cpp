// trainfer's CPU kernels: matrix products on fp32, int8 (Q8_0-style) and int4 (Q4_1-style) weights, and one whole
// decode step of a Llama-family model over the paged KV cache. Built by `make setup` (python -m
// trainfer.quant.native) with -march=native; references in plain PyTorch: trainfer/quant/blocks.py (formats) and
// trainfer/model/transformer.py with trainfer/infer/runner.py (the step). Tests: tests/quant/.
//
// Formats (blocks of 32 along the input dimension K, one fp32 scale s per block):
//   int8: q int8 (N, K), w = q * s                    (llama.cpp Q8_0; its fp16 scales load exactly)
//   int4: q uint8 (N, K/2), w = q * s + m, q in 0..15 (llama.cpp Q4_1; Q4_0 is m = -8 s). Byte j of a block holds
//         element j in its low nibble and element j + 16 in its high nibble, as in ggml.
//
// Activations are not rounded to 8-bit integers (llama.cpp rounds them to Q8_0 blocks for integer dot products;
// measured here that was 7-15% faster and cost top-1 agreement with fp32, 97.3% -> 94.7%: docs/LOG.md). The integer
// paths (Q4_K / Q6_K against a few rows where the CPU has AVX512_VNNI; the 4- to 6-bit formats against one or two
// rows on AVX2) split each input value into two int8 parts, ~16 bits in all (split_input says where). GGUF formats
// are in ggml_formats.h. Single-stream decode
// is memory-bound: each weight is read from memory once per step and turned into fp32 in registers, where it meets up
// to four input rows at a time (no fp32 copy of the weights is ever written); rows are prefetched one tile ahead.
// fp32 weights against one or two input rows are read instead as one sequential stream per thread (rows_f32).
// More rows (batched decode) are bound by arithmetic: a tile's rows are dequantized once into an L1-sized buffer, in
// bf16 for bf16 dot products where the CPU has them (the caller may forbid it). Many rows (prefill): chunks of output
// rows are dequantized into a cache-sized buffer and multiplied by torch's GEMM (bf16 likewise). Where the CPU and the
// OS allow AMX, every bf16 product of more than 4 rows runs on AMX tiles instead (tiles_amx_prepared: fp32 sums and
// output, the weights' decoding most of the cost).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kRows = 4;        // output rows per tile
constexpr int64_t kFusedRows = 16;  // up to this many input rows, the in-register path
constexpr int64_t kChunk = 256;     // output rows dequantized at a time for the GEMM path
constexpr int kAhead = 1024;        // bytes ahead that a row-streaming product prefetches
enum Kind : int64_t { kF32 = 0, kQ8 = 1, kQ4 = 2 };

#ifdef __AVX512F__
constexpr int W = 16;
using V = __m512;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vset(float f) { return _mm512_set1_ps(f); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline float vsum(V v) { return _mm512_reduce_add_ps(v); }
inline V q8_load(const int8_t* q) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
}
// Elements [W c, W c + W) of an int4 block as floats 0..15: c = 0 low nibbles, c = 1 high nibbles of 16 bytes.
inline V q4_load(const uint8_t* q, int c) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  if (c) b = _mm_srli_epi16(b, 4);
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, _mm_set1_epi8(0x0F))));
}
#else
constexpr int W = 8;
using V = __m256;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline V vset(float f) { return _mm256_set1_ps(f); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline float vsum(V v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
inline V q8_load(const int8_t* q) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}
// Elements [8 c, 8 c + 8): low nibbles of bytes 0..7 / 8..15 for c = 0 / 1, high nibbles of the same for c = 2 / 3.
inline V q4_load(const uint8_t* q, int c) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * (c & 1)));
  if (c >= 2) b = _mm_srli_epi16(b, 4);
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(b, _mm_set1_epi8(0x0F))));
}
#endif
#include "ggml_formats.h"
constexpr int kChunksPerBlock = kBlock / W;
// Input rows multiplied per pass over a tile: the accumulators (kRows x kM vectors) must fit in registers.
constexpr int kM = W == 16 ? 4 : 2;

// A weight matrix y = x @ w^T (+ bias) in one of the formats, as raw pointers into tensors kept alive by `keep`.
struct Lin {
  int64_t kind = kF32, N = 0, K = 0;
  const float* w = nullptr;    // fp32 (N, K)
  const int8_t* q8 = nullptr;  // int8 (N, K)
  const uint8_t* q4 = nullptr; // int4 (N, K / 2)
  const float* s = nullptr;    // (N, K / 32)
  const float* m = nullptr;    // (N, K / 32), int4 only
  const float* bias = nullptr; // (N,) or none
  const uint8_t* raw = nullptr; // a GGUF tensor's own blocks (kind > kGgml), (N, rb) bytes
  int64_t rb = 0;
  std::vector<Lin> parts;      // a stack: these matrices' rows one after another (same K), none stored twice
  std::vector<torch::Tensor> keep;
};

// fn(std::integral_constant<int64_t, KIND>) for the kernel kind `kind`.
template <typename Fn>
void with_kind(int64_t kind, Fn fn) {
  switch (kind) {
    case kF32: return fn(std::integral_constant<int64_t, kF32>{});
    case kQ8: return fn(std::integral_constant<int64_t, kQ8>{});
    case kQ4: return fn(std::integral_constant<int64_t, kQ4>{});
    case kF16: return fn(std::integral_constant<int64_t, kF16>{});
    case kBF16: return fn(std::integral_constant<int64_t, kBF16>{});
    case kQ8_0: return fn(std::integral_constant<int64_t, kQ8_0>{});
    case kQ4_0: return fn(std::integral_constant<int64_t, kQ4_0>{});
    case kQ4_1: return fn(std::integral_constant<int64_t, kQ4_1>{});
    case kQ5_0: return fn(std::integral_constant<int64_t, kQ5_0>{});
    case kQ5_1: return fn(std::integral_constant<int64_t, kQ5_1>{});
    case kQ4_K: return fn(std::integral_constant<int64_t, kQ4_K>{});
    case kQ5_K: return fn(std::integral_constant<int64_t, kQ5_K>{});
    case kQ6_K: return fn(std::integral_constant<int64_t, kQ6_K>{});
    default: TORCH_CHECK(false, "unknown weight kind ", kind);
  }
}

// Bytes per block and weights per block of a GGUF kind.
std::pair<int64_t, int64_t> ggml_geometry(int64_t kind) {
  std::pair<int64_t, int64_t> out{0, 0};
  with_kind(kind, [&](auto k) {
    if constexpr (k.value > kGgml) out = {Fmt<k.value>::bytes, Fmt<k.value>::vals};
  });
  TORCH_CHECK(out.first > 0, "kind ", kind, " is not a GGUF block format");
  return out;
}

void check(const torch::Tensor& t, c10::ScalarType type, std::vector<int64_t> shape, const char* what) {
  TORCH_CHECK(t.scalar_type() == type && t.is_contiguous() && t.device().is_cpu(), what, ": wrong dtype, layout or device");
  TORCH_CHECK(t.sizes() == c10::IntArrayRef(shape), what, ": shape ", t.sizes(), " expected ", c10::IntArrayRef(shape));
}

Lin make_lin(int64_t kind, const torch::Tensor& w, const c10::optional<torch::Tensor>& s,
             const c10::optional<torch::Tensor>& m, const c10::optional<torch::Tensor>& bias) {
  Lin L;
  L.kind = kind;
  L.N = w.size(0);
  if (kind > kGgml) {  // a GGUF tensor as it is in the file: (N, rb) bytes of whole blocks per row
    const auto [bytes, vals] = ggml_geometry(kind);
    TORCH_CHECK(w.dim() == 2 && w.size(1) % bytes == 0, "GGUF weights: (N, row bytes), whole blocks of ", bytes);
    check(w, torch::kUInt8, {w.size(0), w.size(1)}, "GGUF weights");
    L.rb = w.size(1);
    L.K = L.rb / bytes * vals;
    L.raw = w.data_ptr<uint8_t>();
    L.keep.push_back(w);
    if (bias.has_value()) {
      check(*bias, torch::kFloat32, {L.N}, "bias");
      L.bias = bias->data_ptr<float>();
      L.keep.push_back(*bias);
    }
    return L;
  }
  L.K = kind == kQ4 ? w.size(1) * 2 : w.size(1);
  TORCH_CHECK(w.dim() == 2 && L.K % kBlock == 0, "weights: (N, K) with K a multiple of 32");
  const int64_t nb = L.K / kBlock;
  L.keep.push_back(w);
  if (kind == kF32) {
    check(w, torch::kFloat32, {L.N, L.K}, "fp32 weights");
    L.w = w.data_ptr<float>();
  } else {
    TORCH_CHECK(s.has_value(), "quantized weights need scales");
    check(*s, torch::kFloat32, {L.N, nb}, "scales");
    L.s = s->data_ptr<float>();
    L.keep.push_back(*s);
    if (kind == kQ8) {
      check(w, torch::kInt8, {L.N, L.K}, "int8 weights");
      L.q8 = w.data_ptr<int8_t>();
    } else {
      TORCH_CHECK(kind == kQ4 && m.has_value(), "kind must be 0 (fp32), 1 (int8) or 2 (int4, with mins)");
      check(w, torch::kUInt8, {L.N, L.K / 2}, "int4 weights");
      check(*m, torch::kFloat32, {L.N, nb}, "mins");
      L.q4 = w.data_ptr<uint8_t>();
      L.m = m->data_ptr<float>();
      L.keep.push_back(*m);
    }
  }
  if (bias.has_value()) {
    check(*bias, torch::kFloat32, {L.N}, "bias");
    L.bias = bias->data_ptr<float>();
    L.keep.push_back(*bias);
  }
  return L;
}

// Several matrices on the same input as one (qkv, gate|up) without copying them: their rows one after another.
Lin make_stack(std::vector<Lin> parts) {
  TORCH_CHECK(!parts.empty(), "a stack needs matrices");
  Lin L;
  L.kind = -1;
  L.K = parts[0].K;
  for (const Lin& P : parts) {
    TORCH_CHECK(P.K == L.K && P.parts.empty(), "stacked matrices share their input size");
    L.N += P.N;
  }
  L.parts = std::move(parts);
  return L;
}

// Block row n, 32-weight group b of a GGUF-format Lin: its block's bytes and the group within the block.
template <int64_t KIND>
inline const uint8_t* raw_block(const Lin& L, int64_t n, int64_t b, int& g) {
  constexpr int groups = Fmt<KIND>::vals / kBlock;
  g = static_cast<int>(b % groups);
  return L.raw + n * L.rb + (b / groups) * Fmt<KIND>::bytes;
}

// Chunk c of block b of weight row n, as fp32 (w = q * s, or q * s + m).
template <int64_t KIND>
inline V wvec(const Lin& L, int64_t n, int64_t b, int c, V s, V m) {
  if constexpr (KIND == kF32) return vload(L.w + n * L.K + b * kBlock + c * W);
  if constexpr (KIND == kQ8) return vmul(q8_load(L.q8 + n * L.K + b * kBlock + c * W), s);
  if constexpr (KIND == kQ4) return vfma(q4_load(L.q4 + n * (L.K / 2) + b * (kBlock / 2), c), s, m);
}

// Block b of weight row n (past the last row: prefetches never fault).
template <int64_t KIND>
inline void prefetch(const Lin& L, int64_t n, int64_t b) {
  if constexpr (KIND > kGgml) {
    constexpr int groups = Fmt<KIND>::vals / kBlock;
    const uint8_t* p = L.raw + n * L.rb + (b / groups) * Fmt<KIND>::bytes + (b % groups) * Fmt<KIND>::bytes / groups;
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
    return;
  }
  const void* p = KIND == kF32 ? static_cast<const void*>(L.w + n * L.K + b * kBlock)
                  : KIND == kQ8 ? static_cast<const void*>(L.q8 + n * L.K + b * kBlock)
                                : static_cast<const void*>(L.q4 + n * (L.K / 2) + b * (kBlock / 2));
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
}

// Y[i][n0 + r] (+)= sum_k X[i][k] w[n0 + r][k] for r < R, i < MB: R weight rows meet MB input rows in registers.
template <int64_t KIND, int R, int MB>
inline void tile(const Lin& L, int64_t n0, const float* X, float* Y, int64_t ldy, bool add) {
  V acc[R][MB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) acc[r][i] = vzero();
  const int64_t K = L.K, nb = K / kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    V s[R], m[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if constexpr (KIND != kF32) s[r] = vset(L.s[(n0 + r) * nb + b]);
      if constexpr (KIND == kQ4) m[r] = vset(L.m[(n0 + r) * nb + b]);
    }
#pragma GCC unroll 4
    for (int c = 0; c < kChunksPerBlock; ++c) {
      V x[MB];
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) x[i] = vload(X + i * K + b * kBlock + c * W);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        if (c == 0) prefetch<KIND>(L, n0 + r + R, b);  // the next tile's row: keeps enough loads in flight
        const V w = wvec<KIND>(L, n0 + r, b, c, s[r], m[r]);
#pragma GCC unroll 8
        for (int i = 0; i < MB; ++i) acc[r][i] = vfma(w, x[i], acc[r][i]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float bias = L.bias ? L.bias[n0 + r] : 0.0f;
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      float& y = Y[i * ldy + n0 + r];
      y = (add ? y : 0.0f) + vsum(acc[r][i]) + bias;
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
// Q4_K against up to 3 input rows with integer dot products (vpdpbusd: 64 products of unsigned bytes and signed
// bytes per instruction, where fp32 FMAs do 16). Converting each weight to fp32 made this format compute-bound on
// 2 cores at ~13 GB/s (llama.cpp: ~26); llama.cpp rounds the input rows to 8 bits per 256 values. Here each
// 32-value group of an input row is written as two int8 parts, hi = round(x / sx) and lo = round((x - hi sx) 256 /
// sx) with sx = max |x| / 127, so x = sx (hi + lo / 256) to ~16 bits (relative error <= 2^-16 of the group's
// largest |x|): the sums hi . q and lo . q meet in one int32 (hi . q * 256 + lo . q, at most ~2^21), one conversion
// and one FMA per 16 lanes. The mins enter through each group's exact fp32 sum of x. docs/LOG.md has the numbers.
struct XQ8 {  // the input rows, prepared once per call (per thread)
  // (M, K) each; a 256-block in Q4_K's nibble order (groups 0 2 1 3 4 6 5 7: slot()) or, for Q6_K, in natural order
  std::vector<int8_t> hi, lo;
  std::vector<float> lane;   // per 256-block 4 x 16 lane scales sx / 256 (vector v: slots 2v, 2v + 1)
  std::vector<float> sum;    // (M, K / 32) exact sums of x per group, for Q4_K's mins
  std::vector<float> sum16;  // (M, K / 16) the same per 16 values, for Q6_K's offset of -32 (one scale per 16)
};

constexpr int slot(int g) { return (g & 4) | ((g & 1) << 1) | ((g >> 1) & 1); }  // an involution

void prepare_xq8(const float* X, int64_t M, int64_t K, XQ8& q, bool natural) {
  const int64_t nblk = K / 256, ng = K / kBlock;
  q.hi.resize(M * K), q.lo.resize(M * K), q.lane.resize(M * nblk * 64), q.sum.resize(M * ng), q.sum16.resize(2 * M * ng);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t b = 0; b < nblk; ++b)
      for (int g = 0; g < 8; ++g) {
        const float* x = X + i * K + b * 256 + g * kBlock;
        const __m512 a = _mm512_loadu_ps(x), c = _mm512_loadu_ps(x + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
        const float sx = amax / 127.0f, inv = sx > 0.0f ? 1.0f / sx : 0.0f;
        const int s = natural ? g : slot(g);
        const int64_t at = i * K + b * 256 + s * kBlock;
        for (int h = 0; h < 2; ++h) {
          const __m512 v = h ? c : a;
          const __m512i hi = _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(inv)));
          const __m512 rest = _mm512_sub_ps(v, _mm512_mul_ps(_mm512_cvtepi32_ps(hi), _mm512_set1_ps(sx)));
          const __m512i lo = _mm512_cvtps_epi32(_mm512_mul_ps(rest, _mm512_set1_ps(inv * 256.0f)));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(q.hi.data() + at + 16 * h), _mm512_cvtsepi32_epi8(hi));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(q.lo.data() + at + 16 * h), _mm512_cvtsepi32_epi8(lo));
        }
        const float sa = _mm512_reduce_add_ps(a), sc = _mm512_reduce_add_ps(c);
        q.sum[i * ng + b * 8 + g] = sa + sc;
        q.sum16[2 * (i * ng + b * 8 + g)] = sa, q.sum16[2 * (i * ng + b * 8 + g) + 1] = sc;
        float* lane = q.lane.data() + (i * nblk + b) * 64 + s * 8;
        std::fill(lane, lane + 8, sx / 256.0f);
      }
}

template <int R, int MB>
inline void tile_q4k_vnni(const Lin& L, int64_t n0, const XQ8& q, int64_t i0, float* Y, int64_t ldy, bool add) {
  __m512 acc[R][MB];
  __m256 accm[R][MB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm512_setzero_ps(), accm[r][i] = _mm256_setzero_ps();
  const int64_t K = L.K, nblk = K / 256, ng = K / kBlock;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i pick[4] = {  // vector v's lanes: the weight scales of the groups in slots 2v and 2v + 1
      _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
      _mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3),
      _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6),
      _mm512_setr_epi32(5, 5, 5, 5, 5, 5, 5, 5, 7, 7, 7, 7, 7, 7, 7, 7)};
  for (int64_t blk = 0; blk < nblk; ++blk) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = L.raw + (n0 + r) * L.rb + blk * 144;
      const char* next = reinterpret_cast<const char*>(p + R * L.rb);  // the next tile's row: loads in flight
      _mm_prefetch(next, _MM_HINT_T0), _mm_prefetch(next + 64, _MM_HINT_T0), _mm_prefetch(next + 128, _MM_HINT_T0);
      __m256 sv, mv;
      k_scales_mins(p, sv, mv);
      const __m512 S = _mm512_castps256_ps512(sv);
      const __m512i v0 = _mm512_loadu_si512(p + 16), v1 = _mm512_loadu_si512(p + 80);
      const __m512i w[4] = {_mm512_and_si512(v0, nibble), _mm512_and_si512(_mm512_srli_epi16(v0, 4), nibble),
                            _mm512_and_si512(v1, nibble), _mm512_and_si512(_mm512_srli_epi16(v1, 4), nibble)};
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i)
        accm[r][i] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(q.sum.data() + (i0 + i) * ng + blk * 8), accm[r][i]);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        const __m512 ws = _mm512_permutexvar_ps(pick[v], S);
#pragma GCC unroll 8
        for (int i = 0; i < MB; ++i) {
          const int64_t at = (i0 + i) * K + blk * 256 + 64 * v;
          __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[v], _mm512_loadu_si512(q.hi.data() + at));
          t = _mm512_dpbusd_epi32(_mm512_slli_epi32(t, 8), w[v], _mm512_loadu_si512(q.lo.data() + at));
          const __m512 lane = _mm512_loadu_ps(q.lane.data() + ((i0 + i) * nblk + blk) * 64 + 16 * v);
          acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(ws, lane), acc[r][i]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float bias = L.bias ? L.bias[n0 + r] : 0.0f;
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      __m128 m4 = _mm_add_ps(_mm256_castps256_ps128(accm[r][i]), _mm256_extractf128_ps(accm[r][i], 1));
      m4 = _mm_add_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_add_ss(m4, _mm_movehdup_ps(m4));
      float& y = Y[i * ldy + n0 + r];
      y = (add ? y : 0.0f) + _mm512_reduce_add_ps(acc[r][i]) + _mm_cvtss_f32(m4) + bias;
    }
  }
}

// Output tiles [t0, t1) of Q4_K weights against M <= kM input rows on the integer path.
void tiles_q4k_vnni(const Lin& L, const float* X, int64_t M, float* Y, int64_t ldy, bool add, int64_t t0, int64_t t1) {
  thread_local XQ8 q;
  prepare_xq8(X, M, L.K, q, false);
  for (int64_t t = t0; t < t1; ++t) {  // every input row in one pass over the weights (3 rows: 2 weight rows)
    const int64_t n0 = t * kRows;
    if (n0 + kRows > L.N) {
      for (int64_t n = n0; n < L.N; ++n)
        for (int64_t i = 0; i < M; ++i) tile_q4k_vnni<1, 1>(L, n, q, i, Y + i * ldy, ldy, add);
    } else if (M == 1) {
      tile_q4k_vnni<kRows, 1>(L, n0, q, 0, Y, ldy, add);
    } else if (M == 2) {
      tile_q4k_vnni<kRows, 2>(L, n0, q, 0, Y, ldy, add);
    } else {
      for (int64_t h = 0; h < kRows; h += 2) tile_q4k_vnni<2, 3>(L, n0 + h, q, 0, Y, ldy, add);
    }
  }
}

// Q6_K the same way. A block's 256 weights are read as four vectors of 64 in natural order: bytes 0-63 of ql give
// weights 0-63 (low nibbles) and 64-127 (high), bytes 64-127 the next 128, and qh's 2-bit pairs are moved to bits 4-5
// per half vector (variable 16-bit shifts; each byte's own bits survive the 0x30 mask). q is 0..63 unsigned, as
// vpdpbusd wants; its offset of -32 enters, like Q4_K's mins, through exact sums of x (one per 16, a scale each).
template <int R, int MB>
inline void tile_q6k_vnni(const Lin& L, int64_t n0, const XQ8& q, int64_t i0, float* Y, int64_t ldy, bool add) {
  __m512 acc[R][MB], acco[R][MB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm512_setzero_ps(), acco[r][i] = _mm512_setzero_ps();
  const int64_t K = L.K, nblk = K / 256, ng = K / kBlock;
  const __m512i nibble = _mm512_set1_epi8(0x0F), bits45 = _mm512_set1_epi8(0x30);
  // variable shifts per 16 bits: << 4 for weights 0-31 and << 2 for 32-63 (low half, high half of the vector), >> 0
  // for 64-95 and >> 2 for 96-127
  constexpr int64_t two = 0x0002000200020002, four = 0x0004000400040004;
  const __m512i up = _mm512_set_epi64(two, two, two, two, four, four, four, four);
  const __m512i down = _mm512_set_epi64(two, two, two, two, 0, 0, 0, 0);
  const __m512i pick[4] = {  // vector v's lanes (4 bytes each): the scales of weights 64 v + 16 j, j = lane / 4
      _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
      _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7),
      _mm512_setr_epi32(8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11),
      _mm512_setr_epi32(12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15)};
  for (int64_t blk = 0; blk < nblk; ++blk) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = L.raw + (n0 + r) * L.rb + blk * 210;
      const char* next = reinterpret_cast<const char*>(p + R * L.rb);  // the next tile's row: loads in flight
      _mm_prefetch(next, _MM_HINT_T0), _mm_prefetch(next + 64, _MM_HINT_T0), _mm_prefetch(next + 128, _MM_HINT_T0);
      _mm_prefetch(next + 192, _MM_HINT_T0);
      const __m512 S = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 192)))),
                                     _mm512_set1_ps(fp16(p + 208)));
      __m512i w[4];
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m512i ql = _mm512_loadu_si512(p + 64 * h);
        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * h)));
        w[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, nibble), _mm512_and_si512(_mm512_sllv_epi16(qh, up), bits45));
        w[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), nibble),
                                       _mm512_and_si512(_mm512_srlv_epi16(qh, down), bits45));
      }
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i)
        acco[r][i] = _mm512_fmadd_ps(S, _mm512_loadu_ps(q.sum16.data() + 2 * ((i0 + i) * ng + blk * 8)), acco[r][i]);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        const __m512 ws = _mm512_permutexvar_ps(pick[v], S);
#pragma GCC unroll 8
        for (int i = 0; i < MB; ++i) {
          const int64_t at = (i0 + i) * K + blk * 256 + 64 * v;
          __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[v], _mm512_loadu_si512(q.hi.data() + at));
          t = _mm512_dpbusd_epi32(_mm512_slli_epi32(t, 8), w[v], _mm512_loadu_si512(q.lo.data() + at));
          const __m512 lane = _mm512_loadu_ps(q.lane.data() + ((i0 + i) * nblk + blk) * 64 + 16 * v);
          acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(ws, lane), acc[r][i]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float bias = L.bias ? L.bias[n0 + r] : 0.0f;
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      float& y = Y[i * ldy + n0 + r];
      y = (add ? y : 0.0f) + _mm512_reduce_add_ps(acc[r][i]) - 32.0f * _mm512_reduce_add_ps(acco[r][i]) + bias;
    }
  }
}

void tiles_q6k_vnni(const Lin& L, const float* X, int64_t M, float* Y, int64_t ldy, bool add, int64_t t0, int64_t t1) {
  thread_local XQ8 q;
  prepare_xq8(X, M, L.K, q, true);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * kRows;
    if (n0 + kRows > L.N) {
      for (int64_t n = n0; n < L.N; ++n)
        for (int64_t i = 0; i < M; ++i) tile_q6k_vnni<1, 1>(L, n, q, i, Y + i * ldy, ldy, add);
    } else if (M == 1) {
      tile_q6k_vnni<kRows, 1>(L, n0, q, 0, Y, ldy, add);
    } else if (M == 2) {
      tile_q6k_vnni<kRows, 2>(L, n0, q, 0, Y, ldy, add);
    } else {
      for (int64_t h = 0; h < kRows; h += 2) tile_q6k_vnni<2, 3>(L, n0 + h, q, 0, Y, ldy, add);
    }
  }
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// The 4- to 6-bit formats against one or two input rows on AVX2, with integer products. Converting each weight to fp32
// (cvtepu8_epi32, cvtdq2ps, an FMA per 8) made them compute-bound on AVX2 at 10-13 GB/s (measured on a 2-core
// EPYC reading 33 GB/s; llama.cpp, rounding its input to 8 bits, reads Q4_0 at about twice that). The input is
// split as on the VNNI path (x = sx (hi + lo / 256), both int8, sx = max |x| / 127 per 32 values: ~16 bits) and
// vpmaddubsw multiplies 32 unsigned nibbles by 32 signed bytes at once; the products of hi and lo meet in one int32
// (madd by 256 and by 1), one conversion and one FMA per 8 lanes. Mins and offsets enter through per-group sums of the
// split values (not of x: an asymmetric format's q . x carries its offset, and only the same input on both sides
// cancels it; with exact sums the error was ~1e-4 of the output, here ~1e-5).
// Lane bounds (4 bits): a 16-bit pair sum is at most 2 * 15 * 127 (two such added: 7620 < 32767), an int32 lane at
// most 8 * 15 * 127 * 257 (~3.9e6): nothing saturates or overflows (Q5_K's and Q6_K's below, with their kernels).
struct XS {  // the input rows, prepared once per call (per thread)
  std::vector<int8_t> hi, lo;  // (M, K) in the order the weights' nibbles come in (below)
  std::vector<float> lane;     // (M, K / 32, 8): per 64-value step, sx / 256 for each int32 lane of its vectors
  std::vector<float> sum;      // (M, K / 32): sums per group of the values as split, sx (hi + lo / 256)
  std::vector<float> sum16;    // (M, K / 16): the same per 16 values, for Q6_K's offset (one scale per 16)
};

// Orders: kPairs for the 32-blocks (Q4_0 / Q4_1 / int4: a 32-byte load of two blocks A, B gives A0-15, B0-15 in its
// low nibbles and A16-31, B16-31 in its high ones; lanes 0-3 hold A, 4-7 B), kGroups for K-quants (group g's 32
// values in natural order, its lane scales the 8 floats at (i * K / 32 + g) * 8).
enum XOrder { kPairs, kGroups };

void prepare_xs(const float* X, int64_t M, int64_t K, XS& q, XOrder order) {
  const int64_t ng = K / kBlock;
  q.hi.resize(M * K), q.lo.resize(M * K), q.lane.resize(M * ng * 8), q.sum.resize(M * ng), q.sum16.resize(2 * M * ng);
  const __m256 signbit = _mm256_set1_ps(-0.0f);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t g = 0; g < ng; ++g) {
      const float* x = X + i * K + g * kBlock;
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int c = 0; c < 4; ++c) {
        v[c] = _mm256_loadu_ps(x + 8 * c);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(signbit, v[c]));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float sx = _mm_cvtss_f32(m4) / 127.0f, inv = sx > 0.0f ? 1.0f / sx : 0.0f;
      alignas(32) int8_t hi[32], lo[32];
      for (int c = 0; c < 4; ++c) {
        const __m256i h = _mm256_cvtps_epi32(_mm256_mul_ps(v[c], _mm256_set1_ps(inv)));
        const __m256 rest = _mm256_sub_ps(v[c], _mm256_mul_ps(_mm256_cvtepi32_ps(h), _mm256_set1_ps(sx)));
        __m256i l = _mm256_cvtps_epi32(_mm256_mul_ps(rest, _mm256_set1_ps(inv * 256.0f)));
        l = _mm256_max_epi32(_mm256_min_epi32(l, _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
        alignas(32) int32_t hs[8], ls[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(hs), h), _mm256_store_si256(reinterpret_cast<__m256i*>(ls), l);
        for (int j = 0; j < 8; ++j) hi[8 * c + j] = static_cast<int8_t>(hs[j]), lo[8 * c + j] = static_cast<int8_t>(ls[j]);
      }
      int32_t half[2] = {0, 0};  // sums of the values as split, not of x: the mins then meet the same input as the weights
      for (int j = 0; j < 32; ++j) half[j / 16] += 256 * hi[j] + lo[j];
      q.sum16[2 * (i * ng + g)] = static_cast<float>(half[0]) * (sx / 256.0f);
      q.sum16[2 * (i * ng + g) + 1] = static_cast<float>(half[1]) * (sx / 256.0f);
      q.sum[i * ng + g] = static_cast<float>(half[0] + half[1]) * (sx / 256.0f);
      int8_t* ho = q.hi.data() + i * K;
      int8_t* lw = q.lo.data() + i * K;
      float* lane = q.lane.data() + (i * ng + (g & ~int64_t{1})) * 8;  // the pair's 16 floats: two vectors of 8
      if (order == kPairs) {  // the pair (g & ~1, g | 1) is 64 values: low halves first, then high halves
        const int64_t base = (g & ~int64_t{1}) * kBlock, side = (g & 1) * 16;
        std::memcpy(ho + base + side, hi, 16), std::memcpy(ho + base + 32 + side, hi + 16, 16);
        std::memcpy(lw + base + side, lo, 16), std::memcpy(lw + base + 32 + side, lo + 16, 16);
        std::fill(lane + (g & 1) * 4, lane + (g & 1) * 4 + 4, sx / 256.0f);
      } else {
        std::memcpy(ho + g * kBlock, hi, 32), std::memcpy(lw + g * kBlock, lo, 32);
        std::fill(lane + (g & 1) * 8, lane + (g & 1) * 8 + 8, sx / 256.0f);
      }
    }
}

// hi . q * 256 + lo . q as 8 int32 lanes, for 32 unsigned weights (0..63) against 32 values' two parts
inline __m256i dot_split(__m256i w, const int8_t* hi, const int8_t* lo) {
  const __m256i h = _mm256_maddubs_epi16(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi)));
  const __m256i l = _mm256_maddubs_epi16(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo)));
  return _mm256_add_epi32(_mm256_madd_epi16(h, _mm256_set1_epi16(256)), _mm256_madd_epi16(l, _mm256_set1_epi16(1)));
}

// Two 32-blocks b, b + 1 of row n of a 4-bit 32-block format: the 32 nibble bytes, the scales and the mins.
template <int64_t KIND>
inline __m256i pair_q4(const Lin& L, int64_t n, int64_t b, float s[2], float m[2]) {
  if constexpr (KIND == kQ4) {
    const int64_t nb = L.K / kBlock;
    s[0] = L.s[n * nb + b], s[1] = L.s[n * nb + b + 1], m[0] = L.m[n * nb + b], m[1] = L.m[n * nb + b + 1];
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(L.q4 + n * (L.K / 2) + b * (kBlock / 2)));
  } else {
    constexpr int64_t bytes = Fmt<KIND>::bytes, at = KIND == kQ4_1 ? 4 : 2;
    const uint8_t* p = L.raw + n * L.rb + b * bytes;
    s[0] = fp16(p), s[1] = fp16(p + bytes);
    if constexpr (KIND == kQ4_1) {
      m[0] = fp16(p + 2), m[1] = fp16(p + bytes + 2);
    } else {
      m[0] = -8.0f * s[0], m[1] = -8.0f * s[1];
    }
    return _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + bytes + at)),
                            _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + at)));
  }
}

template <int64_t KIND, int R, int MB>
inline void tile_q4_avx2(const Lin& L, int64_t n0, const XS& q, float* Y, int64_t ldy, bool add) {
  __m256 acc[R][MB];
  float accm[R][MB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm256_setzero_ps(), accm[r][i] = 0.0f;
  const int64_t K = L.K, ng = K / kBlock;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < ng; b += 2) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      prefetch<KIND>(L, n0 + r + R, b);  // the next tile's row: keeps enough loads in flight
      float s[2], m[2];
      const __m256i v = pair_q4<KIND>(L, n0 + r, b, s, m);
      const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      const __m256 ws = _mm256_set_m128(_mm_set1_ps(s[1]), _mm_set1_ps(s[0]));
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) {
        const int64_t at = i * K + b * kBlock;
        const int8_t* h = q.hi.data() + at;
        const int8_t* l = q.lo.data() + at;
        const __m256i ph = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h))),
                                            _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + 32))));
        const __m256i pl = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(l))),
                                            _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(l + 32))));
        const __m256i t = _mm256_add_epi32(_mm256_madd_epi16(ph, _mm256_set1_epi16(256)), _mm256_madd_epi16(pl, _mm256_set1_epi16(1)));
        const __m256 lane = _mm256_loadu_ps(q.lane.data() + (i * ng + b) * 8);
        acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(ws, lane), acc[r][i]);
        accm[r][i] += m[0] * q.sum[i * ng + b] + m[1] * q.sum[i * ng + b + 1];
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float bias = L.bias ? L.bias[n0 + r] : 0.0f;
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      float& y = Y[i * ldy + n0 + r];
      y = (add ? y : 0.0f) + vsum(acc[r][i]) + accm[r][i] + bias;
    }
  }
}

// Q4_K and Q5_K the same way, a super-block's 8 groups at a time: scales d * sc and mins -dmin * mn decoded once per
// row and block (k_scales_mins), each group's lanes scaled by its own scale times its input's sx / 256. Q5_K's fifth
// bits (bit g of byte j of qh for weight j of group g) are moved to bit 4 by 16-bit shifts and a mask (pair sums <=
// 2 * 31 * 127).
template <int64_t KIND, int R, int MB>
inline void tile_k_avx2(const Lin& L, int64_t n0, const XS& q, float* Y, int64_t ldy, bool add) {
  __m256 acc[R][MB], accm[R][MB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm256_setzero_ps(), accm[r][i] = _mm256_setzero_ps();
  const int64_t K = L.K, nblk = K / 256, ng = K / kBlock;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  for (int64_t blk = 0; blk < nblk; ++blk) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      constexpr int64_t bytes = Fmt<KIND>::bytes, qs = KIND == kQ5_K ? 48 : 16;
      const uint8_t* p = L.raw + (n0 + r) * L.rb + blk * bytes;
      const char* next = reinterpret_cast<const char*>(p + R * L.rb);  // the next tile's row: loads in flight
#pragma GCC unroll 4
      for (int off = 0; off < bytes; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
      __m256i qh;
      if constexpr (KIND == kQ5_K) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
      __m256 sv, mv;
      k_scales_mins(p, sv, mv);
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) accm[r][i] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(q.sum.data() + i * ng + blk * 8), accm[r][i]);
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + qs + 32 * k));
        __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        if constexpr (KIND == kQ5_K) {  // bits 2k and 2k + 1 of each byte to bit 4
          const __m256i bit4 = _mm256_set1_epi8(0x10);
          const __m256i b0 = 2 * k <= 4 ? _mm256_slli_epi16(qh, 4 - 2 * k) : _mm256_srli_epi16(qh, 2 * k - 4);
          const __m256i b1 = 2 * k + 1 <= 4 ? _mm256_slli_epi16(qh, 3 - 2 * k) : _mm256_srli_epi16(qh, 2 * k - 3);
          lo = _mm256_or_si256(lo, _mm256_and_si256(b0, bit4)), hi = _mm256_or_si256(hi, _mm256_and_si256(b1, bit4));
        }
        const __m256 s_lo = _mm256_permutevar8x32_ps(sv, _mm256_set1_epi32(2 * k));
        const __m256 s_hi = _mm256_permutevar8x32_ps(sv, _mm256_set1_epi32(2 * k + 1));
#pragma GCC unroll 8
        for (int i = 0; i < MB; ++i) {
          const int64_t at = i * K + blk * 256 + 64 * k;
          const float* lane = q.lane.data() + (i * ng + blk * 8 + 2 * k) * 8;
          const __m256i tl = dot_split(lo, q.hi.data() + at, q.lo.data() + at);
          const __m256i th = dot_split(hi, q.hi.data() + at + 32, q.lo.data() + at + 32);
          acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tl), _mm256_mul_ps(s_lo, _mm256_loadu_ps(lane)), acc[r][i]);
          acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(th), _mm256_mul_ps(s_hi, _mm256_loadu_ps(lane + 8)), acc[r][i]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float bias = L.bias ? L.bias[n0 + r] : 0.0f;
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      float& y = Y[i * ldy + n0 + r];
      y = (add ? y : 0.0f) + vsum(acc[r][i]) + vsum(accm[r][i]) + bias;
    }
  }
}


// Q6_K: per half of a super-block, 32 bytes of ql (twice) and of qh give four groups of 32 in natural order (group 4h +
// 0 / 1: low nibbles of ql's first / second 32 bytes, 2 / 3: the high ones; qh's bit pairs 0-1, 2-3, 4-5, 6-7 moved to
// bits 4-5). q is 0..63 unsigned (maddubs' pair sums stay <= 2 * 63 * 127); the offset of -32 enters through the
// per-16 sums of the split input, each with its own scale. A group's 8 lanes hold weights 0-15 (lanes 0-3) and 16-31.
template <int R, int MB>
inline void tile_q6k_avx2(const Lin& L, int64_t n0, const XS& q, float* Y, int64_t ldy, bool add) {
  __m256 acc[R][MB], acco[R][MB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm256_setzero_ps(), acco[r][i] = _mm256_setzero_ps();
  const int64_t K = L.K, nblk = K / 256, ng = K / kBlock;
  const __m256i nibble = _mm256_set1_epi8(0x0F), bits45 = _mm256_set1_epi8(0x30);
  for (int64_t blk = 0; blk < nblk; ++blk) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = L.raw + (n0 + r) * L.rb + blk * 210;
      const char* next = reinterpret_cast<const char*>(p + R * L.rb);  // the next tile's row: loads in flight
#pragma GCC unroll 4
      for (int off = 0; off < 210; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
      const __m256 d = _mm256_set1_ps(fp16(p + 208));
      const __m256 S[2] = {_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 192))))),
                           _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 200)))))};
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) {
        const float* s16 = q.sum16.data() + 2 * (i * ng + blk * 8);
        acco[r][i] = _mm256_fmadd_ps(S[0], _mm256_loadu_ps(s16), acco[r][i]);
        acco[r][i] = _mm256_fmadd_ps(S[1], _mm256_loadu_ps(s16 + 8), acco[r][i]);
      }
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * h));
        const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * h + 32));
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * h));
        const __m256i w[4] = {
            _mm256_or_si256(_mm256_and_si256(ql0, nibble), _mm256_and_si256(_mm256_slli_epi16(qh, 4), bits45)),
            _mm256_or_si256(_mm256_and_si256(ql1, nibble), _mm256_and_si256(_mm256_slli_epi16(qh, 2), bits45)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), nibble), _mm256_and_si256(qh, bits45)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), nibble), _mm256_and_si256(_mm256_srli_epi16(qh, 2), bits45))};
#pragma GCC unroll 4
        for (int gi = 0; gi < 4; ++gi) {
          const int g = 4 * h + gi;  // scales 2g, 2g + 1: lanes 0-3, 4-7
          const __m256 ws = _mm256_permutevar8x32_ps(S[h], _mm256_setr_epi32(2 * gi, 2 * gi, 2 * gi, 2 * gi, 2 * gi + 1, 2 * gi + 1, 2 * gi + 1, 2 * gi + 1));
#pragma GCC unroll 8
          for (int i = 0; i < MB; ++i) {
            const int64_t at = i * K + blk * 256 + 32 * g;
            const __m256i t = dot_split(w[gi], q.hi.data() + at, q.lo.data() + at);
            const __m256 lane = _mm256_loadu_ps(q.lane.data() + (i * ng + blk * 8 + g) * 8);
            acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(ws, lane), acc[r][i]);
          }
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float bias = L.bias ? L.bias[n0 + r] : 0.0f;
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      float& y = Y[i * ldy + n0 + r];
      y = (add ? y : 0.0f) + vsum(acc[r][i]) - 32.0f * vsum(acco[r][i]) + bias;
    }
  }
}

// Output tiles [t0, t1) of a 4- to 6-bit format against M <= kM input rows on the AVX2 integer path.
template <int64_t KIND>
void tiles_split_avx2(const Lin& L, const float* X, int64_t M, float* Y, int64_t ldy, bool add, int64_t t0, int64_t t1) {
  thread_local XS q;
  constexpr bool k_quant = KIND == kQ4_K || KIND == kQ5_K || KIND == kQ6_K;
  prepare_xs(X, M, L.K, q, k_quant ? kGroups : kPairs);
  auto run = [&](auto r, auto mb, int64_t n0) {
    if constexpr (KIND == kQ6_K) {
      tile_q6k_avx2<r.value, mb.value>(L, n0, q, Y, ldy, add);
    } else if constexpr (k_quant) {
      tile_k_avx2<KIND, r.value, mb.value>(L, n0, q, Y, ldy, add);
    } else {
      tile_q4_avx2<KIND, r.value, mb.value>(L, n0, q, Y, ldy, add);
    }
  };
  using one = std::integral_constant<int, 1>;
  using rows = std::integral_constant<int, kRows>;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * kRows;
    if (n0 + kRows > L.N) {
      for (int64_t n = n0; n < L.N; ++n) M == 1 ? run(one{}, one{}, n) : run(one{}, std::integral_constant<int, 2>{}, n);
    } else {
      M == 1 ? run(rows{}, one{}, n0) : run(rows{}, std::integral_constant<int, 2>{}, n0);
    }
  }
}
#endif

// tile() for a GGUF block format: per (row, block) the groups' scales and mins are decoded once (for K-quants, 8 or
// 16 of them), then per 32-weight group each W-weight chunk becomes fp32 in registers (through a lookup table on
// AVX-512 for 4- and 5-bit formats) and meets MB input rows.
template <int64_t KIND, int R, int MB>
inline void tile_raw(const Lin& L, int64_t n0, const float* X, float* Y, int64_t ldy, bool add) {
  using F = Fmt<KIND>;
  constexpr int groups = F::vals / kBlock;
  V acc[R][MB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) acc[r][i] = vzero();
  const int64_t K = L.K, nblk = K / F::vals;
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const uint8_t* p[R];
    alignas(64) float s[R][16], m2[R][16];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      p[r] = L.raw + (n0 + r) * L.rb + blk * F::bytes;
      const char* next = reinterpret_cast<const char*>(p[r] + R * L.rb);  // the next tile's row: loads in flight
#pragma GCC unroll 4
      for (int off = 0; off < F::bytes; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
      block_scales<KIND>(p[r], s[r], m2[r]);
    }
#pragma GCC unroll 8
    for (int g = 0; g < groups; ++g) {
      const float* xg = X + blk * F::vals + g * kBlock;
      V x[MB][kChunksPerBlock];
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
        for (int c = 0; c < kChunksPerBlock; ++c) x[i][c] = vload(xg + i * K + c * W);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const GroupScale G = group_from<KIND>(s[r], m2[r], g);
#pragma GCC unroll 4
        for (int c = 0; c < kChunksPerBlock; ++c) {
          const V w = group_weights<KIND>(p[r], g, c * W, G);
#pragma GCC unroll 8
          for (int i = 0; i < MB; ++i) acc[r][i] = vfma(w, x[i][c], acc[r][i]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float bias = L.bias ? L.bias[n0 + r] : 0.0f;
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      float& y = Y[i * ldy + n0 + r];
      y = (add ? y : 0.0f) + vsum(acc[r][i]) + bias;
    }
  }
}

#ifdef __AVX512F__
// int4 with AVX-512: a block's 16 possible values q * s + m fill one register (a table, one FMA per block), and
// vpermps looks each weight up by its nibble: no per-weight integer-to-float conversion or scaling.
template <int R, int MB>
inline void tile_q4(const Lin& L, int64_t n0, const float* X, float* Y, int64_t ldy, bool add) {
  __m512 acc[R][MB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm512_setzero_ps();
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t K = L.K, nb = K / kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    __m512 x0[MB], x1[MB];
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) x0[i] = vload(X + i * K + b * kBlock), x1[i] = vload(X + i * K + b * kBlock + 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int64_t n = n0 + r;
      prefetch<kQ4>(L, n + R, b);
      const __m512 table = _mm512_fmadd_ps(iota, vset(L.s[n * nb + b]), vset(L.m[n * nb + b]));
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
          L.q4 + n * (K / 2) + b * (kBlock / 2))));  // vpermps reads only the low 4 bits of each index
      const __m512 w0 = _mm512_permutexvar_ps(bytes, table);
      const __m512 w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) acc[r][i] = vfma(w1, x1[i], vfma(w0, x0[i], acc[r][i]));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float bias = L.bias ? L.bias[n0 + r] : 0.0f;
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      float& y = Y[i * ldy + n0 + r];
      y = (add ? y : 0.0f) + vsum(acc[r][i]) + bias;
    }
  }
}
#endif

// Row n of a GGUF-format Lin as fp32, exactly as gguf-py dequantizes it.
template <int64_t KIND>
void dequant_row_raw(const Lin& L, int64_t n, float* out) {
  for (int64_t b = 0; b < L.K / kBlock; ++b) {
    int g;
    const uint8_t* p = raw_block<KIND>(L, n, b, g);
    const GroupScale G = group_scale<KIND>(p, g);
    for (int c = 0; c < kChunksPerBlock; ++c) vstore(out + b * kBlock + c * W, group_exact<KIND>(p, g, c * W, G));
  }
}

void dequant_row(const Lin& L, int64_t n, float* out) {
  const int64_t K = L.K, nb = K / kBlock;
  if (L.kind > kGgml) {
    with_kind(L.kind, [&](auto k) {
      if constexpr (k.value > kGgml) dequant_row_raw<k.value>(L, n, out);
    });
    return;
  }
  if (L.kind == kF32) {
    std::copy(L.w + n * K, L.w + (n + 1) * K, out);
    return;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const V s = vset(L.s[n * nb + b]);
    const V m = L.kind == kQ4 ? vset(L.m[n * nb + b]) : vzero();
    for (int c = 0; c < kChunksPerBlock; ++c) {
      const V w = L.kind == kQ8 ? wvec<kQ8>(L, n, b, c, s, m) : wvec<kQ4>(L, n, b, c, s, m);
      vstore(out + b * kBlock + c * W, w);
    }
  }
}

// Rows n0..n0+R-1 of the weights against MB input rows in one pass, in the format's own tile.
template <int64_t KIND, int R, int MB>
inline void tile_of(const Lin& L, int64_t n0, const float* X, float* Y, int64_t ldy, bool add) {
  if constexpr (KIND > kGgml) {
    tile_raw<KIND, R, MB>(L, n0, X, Y, ldy, add);
#ifdef __AVX512F__
  } else if constexpr (KIND == kQ4) {
    tile_q4<R, MB>(L, n0, X, Y, ldy, add);
#endif
  } else {
    tile<KIND, R, MB>(L, n0, X, Y, ldy, add);
  }
}

// Rows n0..n0+R-1 of the weights against all M input rows; Y's rows are ldy apart. The rows left after the passes
// of kM share one more pass: one pass per left row made 2 and 3 rows (speculation's checks, 2-3 streams) cost more
// than 4 (SmolLM2 int8 step: 7.7 and 9.6 ms against 8.1, docs/LOG.md). Each row's sums are formed in the same order
// whatever MB, so a row's result does not depend on how many rows share its pass.
template <int64_t KIND, int R>
inline void tile_rows(const Lin& L, int64_t n0, const float* X, int64_t M, float* Y, int64_t ldy, bool add) {
  int64_t i = 0;
  for (; i + kM <= M; i += kM) tile_of<KIND, R, kM>(L, n0, X + i * L.K, Y + i * ldy, ldy, add);
  X += i * L.K, Y += i * ldy;
  if (M - i == 1) tile_of<KIND, R, 1>(L, n0, X, Y, ldy, add);
  if constexpr (kM > 2) {
    if (M - i == 2) tile_of<KIND, R, 2>(L, n0, X, Y, ldy, add);
    if (M - i == 3) tile_of<KIND, R, 3>(L, n0, X, Y, ldy, add);
  }
}

// Where the CPU has bf16 dot products (AVX512_BF16): weights dequantized to bf16, and products in bf16.
#ifdef __AVX512BF16__
constexpr bool kBf16 = true;
// Row n of a GGUF-format Lin rounded to bf16, decoded as the fused products decode it (scales once per block, 4- and
// 5-bit weights by table lookup): the exact path's per-group scalar scales and fp32 round trip cost ~2x as much, and
// the rounding to bf16 is far coarser than their difference.
template <int64_t KIND>
void dequant_row_bf16_raw(const Lin& L, int64_t n, at::BFloat16* out, int64_t step) {
  using F = Fmt<KIND>;
  constexpr int groups = F::vals / kBlock;
  alignas(64) float s[16], m2[16];
  const int64_t nblk = L.K / F::vals;
  if constexpr (KIND == kQ4_K) {  // each group's 16 possible weights as a bf16 table; vpermw looks up 32 at a time
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const uint8_t* p = L.raw + n * L.rb + blk * F::bytes;
      block_scales<KIND>(p, s, m2);
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {  // groups 2k and 2k + 1: the low and the high nibbles of the same 32 bytes
        const __m512i q = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 + 32 * k)));
        const __m512i idx[2] = {_mm512_and_si512(q, _mm512_set1_epi16(15)), _mm512_srli_epi16(q, 4)};
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const int g = 2 * k + h;
          const __m512 t = _mm512_fmadd_ps(iota, _mm512_set1_ps(s[g]), _mm512_set1_ps(m2[g]));
          const __m512i table = _mm512_zextsi256_si512((__m256i)_mm512_cvtneps_pbh(t));
          _mm512_storeu_si512(out + (blk * groups + g) * step, _mm512_permutexvar_epi16(idx[h], table));
        }
      }
    }
    return;
  }
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const uint8_t* p = L.raw + n * L.rb + blk * F::bytes;
    block_scales<KIND>(p, s, m2);
#pragma GCC unroll 8
    for (int g = 0; g < groups; ++g) {
      const GroupScale G = group_from<KIND>(s, m2, g);
#pragma GCC unroll 2
      for (int c = 0; c < kChunksPerBlock; ++c) {
        const V w = group_weights<KIND>(p, g, c * W, G);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (blk * groups + g) * step + c * W),
                            (__m256i)_mm512_cvtneps_pbh(w));
      }
    }
  }
}

// Row n of any format but fp32 in bf16; each 32 values of K `step` elements after the last (K apart: a plain row).
void dequant_row_bf16(const Lin& L, int64_t n, at::BFloat16* out, int64_t step = kBlock) {
  const int64_t nb = L.K / kBlock;
  if (L.kind > kGgml) {
    with_kind(L.kind, [&](auto k) {
      if constexpr (k.value > kGgml) dequant_row_bf16_raw<k.value>(L, n, out, step);
    });
    return;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const V s = vset(L.s[n * nb + b]);
    const V m = L.kind == kQ4 ? vset(L.m[n * nb + b]) : vzero();
    for (int c = 0; c < kChunksPerBlock; ++c) {
      const V w = L.kind == kQ8 ? wvec<kQ8>(L, n, b, c, s, m) : wvec<kQ4>(L, n, b, c, s, m);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + b * step + c * W), (__m256i)_mm512_cvtneps_pbh(w));
    }
  }
}

// Y[i][r] (+)= sum_k x[i][k] w[r][k] for r < R, i < MB, both operands bf16 (rows of K), accumulated in fp32 by
// vdpbf16ps: 32 products per instruction where an fp32 FMA does 16.
template <int R, int MB>
inline void tile_bf16(const uint16_t* w, const uint16_t* x, int64_t K, float* Y, int64_t ldy, bool add,
                      const float* bias) {
  __m512 acc[R][MB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh xv[MB];
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) xv[i] = (__m512bh)_mm512_loadu_si512(x + i * K + k);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * K + k);
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], wv, xv[i]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float b = bias ? bias[r] : 0.0f;
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      float& y = Y[i * ldy + r];
      y = (add ? y : 0.0f) + _mm512_reduce_add_ps(acc[r][i]) + b;
    }
  }
}

void to_bf16(const float* x, int64_t n, uint16_t* out) {  // n: a multiple of 16
  for (int64_t j = 0; j < n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + j)));
}

// Tiles [t0, t1) for more than kM input rows in bf16: X converted once, each tile's rows dequantized once to bf16.
template <int64_t KIND>
void tiles_bf16(const Lin& L, const float* X, int64_t M, float* Y, int64_t ldy, bool add, int64_t t0, int64_t t1) {
  thread_local std::vector<uint16_t> xb, wb;
  xb.resize(M * L.K);
  wb.resize(kRows * L.K);
  to_bf16(X, M * L.K, xb.data());
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * kRows, rows = std::min(kRows, L.N - n0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t b = 0; b < L.K / kBlock; b += 2) prefetch<KIND>(L, n0 + kRows + r, b);  // the next tile
      dequant_row_bf16(L, n0 + r, reinterpret_cast<at::BFloat16*>(wb.data() + r * L.K));
    }
    const float* bias = L.bias ? L.bias + n0 : nullptr;
    for (int64_t r0 = 0; r0 < rows; r0 += (rows == kRows ? kRows : 1)) {
      const uint16_t* w = wb.data() + r0 * L.K;
      float* y = Y + n0 + r0;
      const float* b = bias ? bias + r0 : nullptr;
      int64_t i = 0;
      if (rows == kRows) {
        for (; i + kM <= M; i += kM) tile_bf16<kRows, kM>(w, xb.data() + i * L.K, L.K, y + i * ldy, ldy, add, b);
        for (; i < M; ++i) tile_bf16<kRows, 1>(w, xb.data() + i * L.K, L.K, y + i * ldy, ldy, add, b);
      } else {
        for (; i + kM <= M; i += kM) tile_bf16<1, kM>(w, xb.data() + i * L.K, L.K, y + i * ldy, ldy, add, b);
        for (; i < M; ++i) tile_bf16<1, 1>(w, xb.data() + i * L.K, L.K, y + i * ldy, ldy, add, b);
      }
    }
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
constexpr int64_t kAmxRows = 16;  // up to this many rows (one B tile) each thread prepares the inputs itself (tiles_amx)

// Linux hands a process the tile registers' state only on request (arch_prctl, once per process).
bool amx_ready() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {  // ldtilecfg's 64 bytes
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The input rows as AMX B tiles: per group of 16 rows and per step of 32 along K, 16 rows of k pairs, each row the
// 16 inputs' pair (2k, 2k + 1) in bf16, as tdpbf16ps reads them; rows past M are zeros. (groups, K / 32, 256) pairs.
void prepare_amx_inputs(const float* X, int64_t M, int64_t K, std::vector<uint32_t>& xb) {
  const int64_t nk = K / 32, groups = (M + 15) / 16;
  std::vector<uint32_t> row(K / 2);
  xb.assign(groups * nk * 256, 0);
  for (int64_t i = 0; i < M; ++i) {
    to_bf16(X + i * K, K, reinterpret_cast<uint16_t*>(row.data()));
    uint32_t* out = xb.data() + (i / 16) * nk * 256 + i % 16;
    for (int64_t kc = 0; kc < nk; ++kc)
      for (int r = 0; r < 16; ++r) out[kc * 256 + r * 16] = row[kc * 16 + r];
  }
}

// Tiles [t0, t1) of the weights against M input rows prepared by prepare_amx_inputs. The products are those of
// tiles_bf16 (bf16 operands, fp32 sums and output) at 16 x 16 x 32 per tdpbf16ps instead of 16 x 32 per vdpbf16ps,
// which left those tiles bound by arithmetic. The weights are tile A: 32 rows dequantized to bf16 per pass, laid out
// as the tiles read them, then met by every group of 16 inputs (tile B); tile C, 16 x 16 fp32, is Y transposed for
// those weight rows and inputs. Used for 5-16 rows (batched decode) and for prefill, whose GEMM in torch rounded its
// output to bf16 as well (+0.18% perplexity on a Q4_K_M file; fp32 output here: docs/LOG.md).
template <int64_t KIND>
void tiles_amx_prepared(const Lin& L, const uint32_t* xb, int64_t M, float* Y, int64_t ldy, bool add, int64_t t0,
                        int64_t t1) {
  const int64_t K = L.K, nk = K / 32, groups = (M + 15) / 16;
  thread_local std::vector<uint16_t> wb;
  wb.resize(2 * 16 * K);  // A tiles in order: for each step along K, the 16 rows' 32 values (1 KiB), two blocks
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  alignas(64) float c[4][16][16];
  const int64_t n_end = std::min(t1 * kRows, L.N);
  for (int64_t n0 = t0 * kRows; n0 < n_end; n0 += 32) {
    const int64_t rows = std::min<int64_t>(32, n_end - n0);
    const bool two = rows > 16;
    for (int64_t r = 0; r < (two ? 32 : 16); ++r) {
      uint16_t* w = wb.data() + (r / 16) * 16 * K + (r % 16) * 32;
      if (r < rows) {
        dequant_row_bf16(L, n0 + r, reinterpret_cast<at::BFloat16*>(w), 16 * 32);
      } else {
        for (int64_t kc = 0; kc < nk; ++kc) std::fill(w + kc * 512, w + kc * 512 + 32, uint16_t{0});
      }
    }
    const uint16_t* a0 = wb.data();
    const uint16_t* a1 = wb.data() + 16 * K;
    // the next pass's rows (one stretch of memory in the GGUF formats) are fetched into L2 while the tiles multiply:
    // their decoding otherwise waits on memory
    const char* next = KIND > kGgml && n0 + 32 < L.N ? reinterpret_cast<const char*>(L.raw + (n0 + 32) * L.rb) : nullptr;
    const int64_t lines = next ? (std::min<int64_t>(32, L.N - n0 - 32) * L.rb + 63) / 64 : 0;
    const int64_t per_step = (lines + nk / 2 - 1) / (nk / 2);
    for (int64_t g = 0; g < groups; ++g) {
      const uint32_t* b = xb + g * nk * 256;
      // four chains of sums (two blocks x even and odd steps): tdpbf16ps's latency is several times its issue rate
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      _tile_zero(7);
      for (int64_t kc = 0, line = 0; kc < nk; kc += 2) {
        if (g == 0)
          for (int64_t e = std::min(lines, line + per_step); line < e; ++line) _mm_prefetch(next + 64 * line, _MM_HINT_T1);
        _tile_loadd(2, b + kc * 256, 64);
        _tile_loadd(3, b + (kc + 1) * 256, 64);
        _tile_loadd(0, a0 + kc * 512, 64);
        _tile_loadd(1, a0 + (kc + 1) * 512, 64);
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(5, 1, 3);
        if (two) {
          _tile_loadd(0, a1 + kc * 512, 64);
          _tile_loadd(1, a1 + (kc + 1) * 512, 64);
          _tile_dpbf16ps(6, 0, 2);
          _tile_dpbf16ps(7, 1, 3);
        }
      }
      _tile_stored(4, c[0], 64);
      _tile_stored(5, c[1], 64);
      if (two) {
        _tile_stored(6, c[2], 64);
        _tile_stored(7, c[3], 64);
      }
      const int64_t inputs = std::min<int64_t>(16, M - 16 * g);
      for (int64_t r = 0; r < rows; ++r) {
        const float bias = L.bias ? L.bias[n0 + r] : 0.0f;
        const int h = 2 * static_cast<int>(r / 16), j = static_cast<int>(r % 16);
        for (int64_t i = 0; i < inputs; ++i) {
          float& y = Y[(16 * g + i) * ldy + n0 + r];
          y = (add ? y : 0.0f) + (c[h][j][i] + c[h + 1][j][i]) + bias;
        }
      }
    }
  }
  _tile_release();
}

// 5-16 input rows (batched decode), inside a thread's share of the tiles: the inputs prepared per thread.
template <int64_t KIND>
void tiles_amx(const Lin& L, const float* X, int64_t M, float* Y, int64_t ldy, bool add, int64_t t0, int64_t t1) {
  thread_local std::vector<uint32_t> xb;
  prepare_amx_inputs(X, M, L.K, xb);
  tiles_amx_prepared<KIND>(L, xb.data(), M, Y, ldy, add, t0, t1);
}
#endif
#else
constexpr bool kBf16 = false;
void dequant_row_bf16(const Lin&, int64_t, at::BFloat16*) { TORCH_CHECK(false, "built without AVX512_BF16"); }
template <int64_t KIND>
void tiles_bf16(const Lin&, const float*, int64_t, float*, int64_t, bool, int64_t, int64_t) {
  TORCH_CHECK(false, "built without AVX512_BF16");
}
#endif

// fp32 weights against one or two input rows (decode of one or two sequences): a thread's rows n0..n1 are one
// contiguous stretch of memory, read as one sequential stream, every line prefetched kAhead bytes ahead and marked
// non-temporal (each weight is read once per step). Measured in the decode step against the 4-row tiles: one row
// 1.10-1.17x, two rows 1.10x, three 0.96x (docs/LOG.md).
template <int MB>
void rows_f32(const Lin& L, const float* X, float* Y, int64_t ldy, bool add, int64_t n0, int64_t n1) {
  const int64_t K = L.K;
  for (int64_t n = n0; n < n1; ++n) {
    const float* p = L.w + n * K;
    V a[MB][4];
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) a[i][j] = vzero();
    int64_t k = 0;
    for (; k + 4 * W <= K; k += 4 * W) {
      const char* ahead = reinterpret_cast<const char*>(p + k) + kAhead;
#pragma GCC unroll 4
      for (int j = 0; j < 4 * W * 4 / 64; ++j) _mm_prefetch(ahead + 64 * j, _MM_HINT_NTA);  // the step's lines
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const V w = vload(p + k + j * W);
#pragma GCC unroll 4
        for (int i = 0; i < MB; ++i) a[i][j] = vfma(w, vload(X + i * K + k + j * W), a[i][j]);
      }
    }
    for (; k < K; k += W) {
      const V w = vload(p + k);
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) a[i][0] = vfma(w, vload(X + i * K + k), a[i][0]);
    }
    const float bias = L.bias ? L.bias[n] : 0.0f;
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      float& y = Y[i * ldy + n];
      y = (add ? y : 0.0f) + vsum(vadd(vadd(a[i][0], a[i][1]), vadd(a[i][2], a[i][3]))) + bias;
    }
  }
}

// int8 weights against one or two input rows, read like rows_f32: row by row, one sequential stream per thread
// (the weights and, beside them, the scales), prefetched kAhead bytes ahead. Alternated in SmolLM2's decode step
// against the 4-row tiles: 1.07-1.17x (7-9 rounds each, two runs); GGUF Q8_0 rows streamed the same way (its scales
// inline) gave 0.94x, and the 4-bit integer path streamed row by row 0.98-1.04x: both stay on the tiles.
template <int MB>
void rows_q8(const Lin& L, const float* X, float* Y, int64_t ldy, bool add, int64_t n0, int64_t n1) {
  const int64_t K = L.K, nb = K / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* p = L.q8 + n * K;
    const float* sc = L.s + n * nb;
    _mm_prefetch(reinterpret_cast<const char*>(sc + nb), _MM_HINT_NTA);
    V a[MB][2];
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) a[i][0] = vzero(), a[i][1] = vzero();
    for (int64_t b = 0; b < nb; ++b) {
      if (b % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(p + b * kBlock) + kAhead, _MM_HINT_NTA);
      const V s = vset(sc[b]);
#pragma GCC unroll 4
      for (int c = 0; c < kChunksPerBlock; ++c) {
        const V w = vmul(q8_load(p + b * kBlock + c * W), s);
#pragma GCC unroll 4
        for (int i = 0; i < MB; ++i) a[i][c & 1] = vfma(w, vload(X + i * K + b * kBlock + c * W), a[i][c & 1]);
      }
    }
    const float bias = L.bias ? L.bias[n] : 0.0f;
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      float& y = Y[i * ldy + n];
      y = (add ? y : 0.0f) + vsum(vadd(a[i][0], a[i][1])) + bias;
    }
  }
}


// Whether a product of `kind` weights against M input rows of K values runs on an integer path, the input split into
// two int8 parts (~16 bits; error ~1e-5 of the output's largest value where fp32 products give ~1e-7). VNNI: Q4_K and
// Q6_K up to 3 rows (at 4 the fp32 tiles, converting each weight once for all four, were faster: 9.1 vs 8.1 GB/s).
// AVX2: the 4-bit formats, Q5_K and Q6_K up to kM rows (1.6-1.9x the fp32 path's speed at 1 row, 1.2-1.7x at 2: docs/LOG.md).
bool split_input(int64_t kind, int64_t M, int64_t K) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
  return (kind == kQ4_K || kind == kQ6_K) && M <= 3 && K % 256 == 0;
#elif defined(__AVX2__) && !defined(__AVX512F__)
  const bool q4 = kind == kQ4 || kind == kQ4_0 || kind == kQ4_1, k_quant = kind == kQ4_K || kind == kQ5_K || kind == kQ6_K;
  return (q4 || k_quant) && M <= kM && K % (k_quant ? 256 : 64) == 0;
#else
  return false;
#endif
}

// Output-row tiles [t0, t1) of Y (M, N) (+)= X (M, K) @ w^T. Up to kM input rows, quantized weights turn into fp32 in
// registers; beyond (batched decode), a tile's rows are dequantized once into an L1-sized buffer that every input
// row then reads (bf16 with `bf16` where the CPU has it, else fp32), instead of converting each weight once per
// group of kM input rows.
template <int64_t KIND>
void tiles(const Lin& L, const float* X, int64_t M, float* Y, int64_t ldy, bool add, int64_t t0, int64_t t1, bool bf16) {
  if (KIND == kF32 && M <= 2) {  // 3 and 4 rows: the tiles, which load each input vector once per 4 weight rows
    const int64_t n0 = t0 * kRows, n1 = std::min(t1 * kRows, L.N);
    return M == 1 ? rows_f32<1>(L, X, Y, ldy, add, n0, n1) : rows_f32<2>(L, X, Y, ldy, add, n0, n1);
  }
  // the same for int8 on AVX2 (measured there: rows_q8; the AVX-512 tiles were not measured against it)
  if (KIND == kQ8 && M <= 2 && W == 8) {
    const int64_t n0 = t0 * kRows, n1 = std::min(t1 * kRows, L.N);
    return M == 1 ? rows_q8<1>(L, X, Y, ldy, add, n0, n1) : rows_q8<2>(L, X, Y, ldy, add, n0, n1);
  }
  if (split_input(KIND, M, L.K)) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    if constexpr (KIND == kQ4_K) return tiles_q4k_vnni(L, X, M, Y, ldy, add, t0, t1);
    if constexpr (KIND == kQ6_K) return tiles_q6k_vnni(L, X, M, Y, ldy, add, t0, t1);
#elif defined(__AVX2__) && !defined(__AVX512F__)
    if constexpr (KIND == kQ4 || KIND == kQ4_0 || KIND == kQ4_1 || KIND == kQ4_K || KIND == kQ5_K || KIND == kQ6_K) {
      return tiles_split_avx2<KIND>(L, X, M, Y, ldy, add, t0, t1);
    }
#endif
  }
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (KIND != kF32 && M > kM && M <= kAmxRows && L.K % 64 == 0 && bf16 && amx_ready()) return tiles_amx<KIND>(L, X, M, Y, ldy, add, t0, t1);
#endif
  if (KIND != kF32 && M > kM && bf16) return tiles_bf16<KIND>(L, X, M, Y, ldy, add, t0, t1);
  if (KIND != kF32 && M > kM) {
    thread_local std::vector<float> buf;
    buf.resize(kRows * L.K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kRows, rows = std::min(kRows, L.N - n0);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t b = 0; b < L.K / kBlock; b += 2) prefetch<KIND>(L, n0 + kRows + r, b);  // the next tile
        dequant_row(L, n0 + r, buf.data() + r * L.K);
      }
      Lin F;
      F.N = rows, F.K = L.K, F.w = buf.data(), F.bias = L.bias ? L.bias + n0 : nullptr;
      if (rows == kRows) {
        tile_rows<kF32, kRows>(F, 0, X, M, Y + n0, ldy, add);
      } else {
        for (int64_t r = 0; r < rows; ++r) tile_rows<kF32, 1>(F, r, X, M, Y + n0, ldy, add);
      }
    }
    return;
  }
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * kRows;
    if (n0 + kRows <= L.N) {
      tile_rows<KIND, kRows>(L, n0, X, M, Y, ldy, add);
    } else {
      for (int64_t n = n0; n < L.N; ++n) tile_rows<KIND, 1>(L, n, X, M, Y, ldy, add);
    }
  }
}

void tiles_any(const Lin& L, const float* X, int64_t M, float* Y, int64_t ldy, bool add, int64_t t0, int64_t t1,
               bool bf16) {
  with_kind(L.kind, [&](auto k) { tiles<k.value>(L, X, M, Y, ldy, add, t0, t1, k.value != kF32 && bf16); });
}

// Inside an OpenMP parallel region: this thread's share of the tiles, then a barrier.
// A stack's matrices one after another, each shared out among the threads, with one barrier at the end.
void linear_team(const Lin& L, const float* X, int64_t M, float* Y, bool bf16, bool add = false) {
  const int nt = omp_get_num_threads(), id = omp_get_thread_num();
  int64_t offset = 0;
  for (const Lin* P = L.parts.empty() ? &L : L.parts.data(); offset < L.N; ++P) {
    const int64_t ntiles = (P->N + kRows - 1) / kRows, per = (ntiles + nt - 1) / nt;
    tiles_any(*P, X, M, Y + offset, L.N, add, std::min(ntiles, id * per), std::min(ntiles, (id + 1) * per), bf16);
    offset += P->N;
  }
#pragma omp barrier
}


}  // namespace

// y = x @ w^T (+ bias) for x (M, K) fp32 and weights in one of the formats.
torch::Tensor linear(torch::Tensor x, int64_t kind, torch::Tensor w, c10::optional<torch::Tensor> s,
                     c10::optional<torch::Tensor> m, c10::optional<torch::Tensor> bias, bool allow_bf16) {
  const Lin L = make_lin(kind, w, s, m, bias);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == L.K, "x: (M, K)");
  check(x, torch::kFloat32, {x.size(0), L.K}, "x");
  const int64_t M = x.size(0), N = L.N;
  auto y = torch::empty({M, N}, x.options());
  // No rows (a prompt chunk that samples nothing, through the LM head): the tiles below assume at least one, and
  // the AVX2 split path read a second row that is not there (a segfault on a 600-token prompt of a Q4_K_M file).
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M <= kFusedRows) {
    const bool bf16 = allow_bf16 && kBf16;
    at::parallel_for(0, (N + kRows - 1) / kRows, 8, [&](int64_t t0, int64_t t1) {
      tiles_any(L, xp, M, yp, N, false, t0, t1, bf16);
    });
    return y;
  }
  // Many rows (prefill, big batches): dequantize a chunk of output rows into a cache-sized buffer and let torch's
  // GEMM multiply it with all input rows; the weights are still read once per call in their format. With
  // `allow_bf16` on a CPU with bf16 dot products (AVX512_BF16), the GEMM runs in bf16 (inputs and output rounded to
  // bf16, fp32 accumulation): measured 4.7x the fp32 GEMM's rate on such a CPU, at a rounding error of the order of
  // int8's own (docs/LOG.md). Up to kM rows (single-stream decode) products are always fp32.
  const bool bf16 = allow_bf16 && kBf16 && kind != kF32;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (bf16 && L.K % 64 == 0 && amx_ready()) {  // the inputs prepared once, the weights' passes shared out
    std::vector<uint32_t> xb;
    prepare_amx_inputs(xp, M, L.K, xb);
    at::parallel_for(0, (N + kRows - 1) / kRows, 8, [&](int64_t t0, int64_t t1) {
      with_kind(L.kind, [&](auto k) {
        if constexpr (k.value != kF32) tiles_amx_prepared<k.value>(L, xb.data(), M, yp, N, false, t0, t1);
      });
    });
    return y;
  }
#endif
  const torch::Tensor xg = bf16 ? x.to(torch::kBFloat16) : x;
  const int64_t chunk = std::min<int64_t>(kChunk, N);
  auto buf = torch::empty({chunk, L.K}, xg.options());
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t rows = std::min(chunk, N - n0);
    if (kind == kF32) {
      y.narrow(1, n0, rows).copy_(torch::mm(x, w.narrow(0, n0, rows).t()));
      continue;
    }
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (bf16) {
          dequant_row_bf16(L, n0 + r, buf.data_ptr<at::BFloat16>() + r * L.K);
        } else {
          dequant_row(L, n0 + r, buf.data_ptr<float>() + r * L.K);
        }
      }
    });
    y.narrow(1, n0, rows).copy_(torch::mm(xg, buf.narrow(0, 0, rows).t()));
  }
  if (L.bias) y.add_(*bias);
  return y;
}

torch::Tensor dequantize(int64_t kind, torch::Tensor w, c10::optional<torch::Tensor> s, c10::optional<torch::Tensor> m) {
  const Lin L = make_lin(kind, w, s, m, c10::nullopt);
  auto out = torch::empty({L.N, L.K}, torch::kFloat32);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, L.N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) dequant_row(L, r, op + r * L.K);
  });
  return out;
}

// ---- One decode step through the whole model, for D sequences with one new token each ----------------------------
// The Python module path (trainfer/model/transformer.py + trainfer/infer/runner.py) runs ~25 PyTorch ops per layer;
// at batch 1 their dispatch costs more than the weights' memory traffic. Here a layer is 4 fused matrix products
// (QKV, O, gate|up, down) plus norms, RoPE, the paged K/V write and attention, in one OpenMP team.

namespace {

void rmsnorm(const float* x, const float* w, float eps, int64_t n, float* out) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

// exp(x) for a register of floats: 2^n * 2^f with n = round(x log2 e), |f| <= 1/2, 2^f by its degree-6 Taylor
// polynomial (relative error ~1e-7, torch's own is ~1 ulp): the scalar std::exp in SiLU and softmax cost ~4 ms of a
// 16-sequence decode step.
inline V vexp(V x) {
#ifdef __AVX512F__
  x = _mm512_max_ps(_mm512_min_ps(x, vset(88.7f)), vset(-87.3f));
  const V t = vmul(x, vset(1.44269504088896341f));
  const V n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  x = _mm256_max_ps(_mm256_min_ps(x, vset(88.7f)), vset(-87.3f));
  const V t = vmul(x, vset(1.44269504088896341f));
  const V n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
  const V f = t - n;
  V p = vset(1.5403530393381606e-4f);
  p = vfma(p, f, vset(1.3333558146428443e-3f));
  p = vfma(p, f, vset(9.6181291076284772e-3f));
  p = vfma(p, f, vset(5.5504108664821580e-2f));
  p = vfma(p, f, vset(2.4022650695910071e-1f));
  p = vfma(p, f, vset(6.9314718055994531e-1f));
  p = vfma(p, f, vset(1.0f));
#ifdef __AVX512F__
  return _mm512_scalef_ps(p, n);
#else
  return _mm256_castsi256_ps(
      _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23)));
#endif
}

// out[j] = fn(in[j]) over n floats, whole registers first, the tail through a zero-padded register.
template <typename Fn>
inline void vmap(const float* in, float* out, int64_t n, Fn fn) {
  int64_t j = 0;
  for (; j + W <= n; j += W) vstore(out + j, fn(vload(in + j), j));
  if (j < n) {
    alignas(64) float tmp[W] = {0};
    std::copy(in + j, in + n, tmp);
    vstore(tmp, fn(vload(tmp), j));
    std::copy(tmp, tmp + (n - j), out + j);
  }
}

// x <- x * cos + roll(x, hd / 2) * sin, where sin already carries the sign (-sin, sin) (Transformer.rope).
void rope(float* x, const float* cos, const float* sin, int64_t hd) {
  const int64_t h = hd / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * cos[i] + b * sin[i];
    x[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

// The K/V pool holds fp32, fp16 or int8 (Engine's kv_dtype): a register of W elements of any, as floats (int8
// before its scale).
inline V kv_load(const float* p) { return vload(p); }
inline V kv_load(const at::Half* p) {
#ifdef __AVX512F__
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
}
inline V kv_load(const int8_t* p) { return q8_load(p); }
inline float kv_float(float x) { return x; }
inline float kv_float(at::Half x) { return static_cast<float>(x); }
inline float kv_float(int8_t x) { return static_cast<float>(x); }
// One head's K or V (hd floats) -> the pool's type: fp16 rounded to nearest even as torch's .to(torch.float16)
// does; int8 as runner.quantize_kv does (scale = max |x| / 127, q = x / scale rounded to nearest even), the same
// IEEE operations, so both paths write the same bytes.
inline void kv_store(const float* src, float* dst, float*, int64_t hd) { std::copy(src, src + hd, dst); }
inline void kv_store(const float* src, at::Half* dst, float*, int64_t hd) {
  for (int64_t i = 0; i < hd; ++i) dst[i] = static_cast<at::Half>(src[i]);
}
inline void kv_store(const float* src, int8_t* dst, float* scale, int64_t hd) {
  float amax = 0.0f;
  for (int64_t i = 0; i < hd; ++i) amax = std::max(amax, std::fabs(src[i]));
  const float sc = amax / 127.0f, div = amax > 0.0f ? sc : 1.0f;
  *scale = sc;
  for (int64_t i = 0; i < hd; ++i) dst[i] = static_cast<int8_t>(std::nearbyint(src[i] / div));
}

// sum_i a[i] * b[i] over hd elements (whole registers, then the tail) with b from the pool.
template <typename T>
inline float kv_dot(const float* a, const T* b, int64_t hd) {
  V acc = vzero();
  int64_t i = 0;
  for (; i + W <= hd; i += W) acc = vfma(vload(a + i), kv_load(b + i), acc);
  float s = vsum(acc);
  for (; i < hd; ++i) s += a[i] * kv_float(b[i]);
  return s;
}

// Attention of one decode row is split into parts along its positions [p0, p1) (flash-decoding): one sequence at
// 32k tokens keeps every core busy. A part takes all heads of its positions, so it streams whole rows of the pool
// (slot, KV, hd) front to back, and each key and value is read once for the G query heads that share it. A part
// leaves, per query head, its running max m, its sum of exp(score - m) and its unnormalized sum of weighted values;
// `combine` merges a head's parts exactly (softmax is shift-invariant).
struct Part {
  int64_t d, p0, p1;
};

// Positions per part: at least kMinSpan, and about 8 parts per thread in all, so that a step with few long rows is
// shared evenly; a multiple of the block size, so a part walks whole blocks.
constexpr int64_t kMinSpan = 256;

std::vector<Part> attention_parts(const int64_t* len, int64_t D, int64_t bs, int64_t threads) {
  int64_t total = 0;
  for (int64_t d = 0; d < D; ++d) total += len[d];
  int64_t span = std::max(kMinSpan, (total + 8 * threads - 1) / (8 * threads));
  span = (span + bs - 1) / bs * bs;
  std::vector<Part> parts;
  for (int64_t d = 0; d < D; ++d)
    for (int64_t p0 = 0; p0 < len[d]; p0 += span) parts.push_back({d, p0, std::min(len[d], p0 + span)});
  return parts;
}

// One part: q holds the H query heads (H * hd floats), head h attending KV head h / G; scores has room for
// H * (p1 - p0); out receives, per head, [m, sum, values (hd)]. ks / vs: an int8 pool's scales (slot, KV), or null.
template <typename T>
void attend_part(const float* q, const T* kp, const T* vp, const float* ks, const float* vs, const int64_t* table,
                 const Part& pt, int64_t bs, int64_t H, int64_t KV, int64_t hd, float scale, float* scores,
                 float* out) {
  const int64_t n = pt.p1 - pt.p0, G = H / KV, row = KV * hd;
  for (int64_t b0 = pt.p0; b0 < pt.p1; b0 += bs) {  // whole blocks: a part starts on a block boundary
    for (int64_t p = b0, slot = table[b0 / bs] * bs; p < std::min(pt.p1, b0 + bs); ++p, ++slot) {
      const T* k = kp + slot * row;
      const float* sk = ks ? ks + slot * KV : nullptr;
      for (int64_t h = 0; h < H; ++h)
        scores[h * n + p - pt.p0] = kv_dot(q + h * hd, k + (h / G) * hd, hd) * (sk ? scale * sk[h / G] : scale);
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    float* s = scores + h * n;
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
    vmap(s, s, n, [&](V v, int64_t) { return vexp(v - vset(mx)); });
    float total = 0.0f;
    for (int64_t j = 0; j < n; ++j) total += s[j];
    float* o = out + h * (2 + hd);
    o[0] = mx;
    o[1] = total;
    std::fill(o + 2, o + 2 + hd, 0.0f);
  }
  // Values, a block at a time: per head, 64 output values stay in registers over the block's positions (loaded and
  // stored once a block, not once a position: a store per FMA bounded the AVX2 loop); the block's rows, read from
  // memory for the first head, come from cache for the others. Per output value the positions are added in the same
  // order with the same operations as one position at a time: the result is bit-identical.
  constexpr int U = 64 / W;
  for (int64_t b0 = pt.p0; b0 < pt.p1; b0 += bs) {
    const int64_t slot0 = table[b0 / bs] * bs, np = std::min(pt.p1, b0 + bs) - b0, j0 = b0 - pt.p0;
    for (int64_t g = 0; g < KV; ++g) {
      const T* vg = vp + slot0 * row + g * hd;  // position b0 + i: vg + i * row
      const float* sv = vs ? vs + slot0 * KV + g : nullptr;  // its scale: sv[i * KV]
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        float* sh = scores + h * n + j0;  // its weights: the scores, times the value rows' scales in an int8 pool
        if (sv)
          for (int64_t i = 0; i < np; ++i) sh[i] *= sv[i * KV];
        float* o = out + h * (2 + hd) + 2;
        int64_t c = 0;
        for (; c + U * W <= hd; c += U * W) {
          V acc[U];
#pragma GCC unroll 8
          for (int u = 0; u < U; ++u) acc[u] = vload(o + c + u * W);
          for (int64_t i = 0; i < np; ++i) {
            const V w = vset(sh[i]);
            const T* v = vg + i * row + c;
#pragma GCC unroll 8
            for (int u = 0; u < U; ++u) acc[u] = vfma(w, kv_load(v + u * W), acc[u]);
          }
#pragma GCC unroll 8
          for (int u = 0; u < U; ++u) vstore(o + c + u * W, acc[u]);
        }
        for (; c + W <= hd; c += W) {
          V acc = vload(o + c);
          for (int64_t i = 0; i < np; ++i) acc = vfma(vset(sh[i]), kv_load(vg + i * row + c), acc);
          vstore(o + c, acc);
        }
        for (; c < hd; ++c) {
          float a = o[c];
          for (int64_t i = 0; i < np; ++i) a += sh[i] * kv_float(vg[i * row + c]);
          o[c] = a;
        }
      }
    }
  }
}

// A query head's parts (first, first + step, ...: `count` of them) merged into its output: sum_c o_c e^(m_c - M) over
// sum_c s_c e^(m_c - M), M the largest m_c.
void combine(const float* parts, int64_t first, int64_t step, int64_t count, int64_t hd, float* out) {
  float mx = -INFINITY;
  for (int64_t c = 0; c < count; ++c) mx = std::max(mx, parts[(first + c * step) * (2 + hd)]);
  float total = 0.0f;
  std::fill(out, out + hd, 0.0f);
  for (int64_t c = 0; c < count; ++c) {
    const float* o = parts + (first + c * step) * (2 + hd);
    const float w = std::exp(o[0] - mx);
    total += w * o[1];
    for (int64_t j = 0; j < hd; ++j) out[j] += w * o[2 + j];
  }
  const float inv = 1.0f / total;
  for (int64_t j = 0; j < hd; ++j) out[j] *= inv;
}

}  // namespace

class Decoder {
 public:
  // lins: qkv, o, gate|up, down per layer; norms: input and post-attention per layer, then the final one; qk_norms:
  // none, or q's and k's per-head norm per layer (Qwen3).
  Decoder(std::vector<Lin> lins, std::vector<torch::Tensor> norms, std::vector<torch::Tensor> qk_norms, Lin embed,
          Lin head, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double eps)
      : lins_(std::move(lins)), norms_(std::move(norms)), qk_norms_(std::move(qk_norms)), embed_(std::move(embed)),
        head_(std::move(head)), H_(n_heads), KV_(n_kv_heads), hd_(head_dim), eps_(static_cast<float>(eps)) {
    TORCH_CHECK(lins_.size() % 4 == 0 && norms_.size() == lins_.size() / 2 + 1, "4 matrices and 2 norms per layer");
    L_ = static_cast<int64_t>(lins_.size() / 4);
    dim_ = embed_.K;
    hidden_ = lins_[3].K;
    for (int64_t l = 0; l < L_; ++l) {
      const Lin *qkv = &lins_[4 * l], *o = qkv + 1, *gu = qkv + 2, *down = qkv + 3;
      TORCH_CHECK(qkv->K == dim_ && qkv->N == (H_ + 2 * KV_) * hd_, "layer ", l, ": qkv shape");
      TORCH_CHECK(o->K == H_ * hd_ && o->N == dim_, "layer ", l, ": o shape");
      TORCH_CHECK(gu->K == dim_ && gu->N == 2 * hidden_ && down->K == hidden_ && down->N == dim_, "layer ", l, ": mlp");
    }
    for (const auto& n : norms_) check(n, torch::kFloat32, {dim_}, "norm weight");
    TORCH_CHECK(qk_norms_.empty() || qk_norms_.size() == lins_.size() / 2, "q and k norms: two per layer, or none");
    for (const auto& n : qk_norms_) check(n, torch::kFloat32, {hd_}, "q/k norm weight");
    TORCH_CHECK(head_.K == dim_, "head shape");
  }

  // tokens (D,), cos/sin (D, hd), pools (L, slots, KV, hd), tables (D, nb) block ids, lengths (D,) keys including the
  // new token, rows: which sequences' logits to return -> (len(rows), vocab).
  // The pools hold fp32, fp16 or int8 with a scale per (slot, KV head) in kscale / vscale (Engine's kv_dtype);
  // either way the arithmetic is fp32.
  torch::Tensor step(torch::Tensor tokens, torch::Tensor cos, torch::Tensor sin, torch::Tensor kpool,
                     torch::Tensor vpool, c10::optional<torch::Tensor> kscale, c10::optional<torch::Tensor> vscale,
                     torch::Tensor tables, torch::Tensor lengths, int64_t bs, torch::Tensor rows, bool allow_bf16) {
    const auto type = kpool.scalar_type();
    TORCH_CHECK(type == torch::kFloat32 || type == torch::kHalf || type == torch::kInt8, "pools: fp32, fp16 or int8");
    TORCH_CHECK((type == torch::kInt8) == (kscale.has_value() && vscale.has_value()), "scales: with an int8 pool only");
    float *ks = nullptr, *vs = nullptr;
    if (type == torch::kInt8) {
      const std::vector<int64_t> shape{kpool.size(0), kpool.size(1), kpool.size(2)};
      check(*kscale, torch::kFloat32, shape, "k scales");
      check(*vscale, torch::kFloat32, shape, "v scales");
      ks = kscale->data_ptr<float>();
      vs = vscale->data_ptr<float>();
      return run<int8_t>(tokens, cos, sin, kpool, vpool, ks, vs, tables, lengths, bs, rows, allow_bf16);
    }
    if (type == torch::kHalf)
      return run<at::Half>(tokens, cos, sin, kpool, vpool, ks, vs, tables, lengths, bs, rows, allow_bf16);
    return run<float>(tokens, cos, sin, kpool, vpool, ks, vs, tables, lengths, bs, rows, allow_bf16);
  }

 private:
  template <typename T>
  torch::Tensor run(torch::Tensor tokens, torch::Tensor cos, torch::Tensor sin, torch::Tensor kpool,
                    torch::Tensor vpool, float* ks0, float* vs0, torch::Tensor tables, torch::Tensor lengths,
                    int64_t bs, torch::Tensor rows, bool allow_bf16) {
    const bool bf16 = allow_bf16 && kBf16;
    const int64_t D = tokens.numel(), nb = tables.size(1), R = rows.numel();
    check(tokens, torch::kInt64, {D}, "tokens");
    check(cos, torch::kFloat32, {D, hd_}, "cos");
    check(sin, torch::kFloat32, {D, hd_}, "sin");
    TORCH_CHECK(kpool.dim() == 4 && kpool.size(0) == L_ && kpool.size(2) == KV_ && kpool.size(3) == hd_, "pool shape");
    check(kpool, kpool.scalar_type(), kpool.sizes().vec(), "k pool");
    check(vpool, kpool.scalar_type(), kpool.sizes().vec(), "v pool");
    check(tables, torch::kInt64, {D, nb}, "block tables");
    check(lengths, torch::kInt64, {D}, "lengths");
    check(rows, torch::kInt64, {R}, "rows");
    const int64_t S = kpool.size(1);
    const int64_t* tok = tokens.data_ptr<int64_t>();
    const int64_t* tab = tables.data_ptr<int64_t>();
    const int64_t* len = lengths.data_ptr<int64_t>();
    const int64_t* row = rows.data_ptr<int64_t>();
    for (int64_t d = 0; d < D; ++d) {
      TORCH_CHECK(tok[d] >= 0 && tok[d] < embed_.N, "token id out of range");
      TORCH_CHECK(len[d] >= 1 && len[d] <= nb * bs, "length beyond the block table");
      for (int64_t j = 0; j < (len[d] + bs - 1) / bs; ++j)
        TORCH_CHECK(tab[d * nb + j] >= 0 && (tab[d * nb + j] + 1) * bs <= S, "block id out of range");
    }
    TORCH_CHECK(R <= D, "more rows than sequences");
    for (int64_t i = 0; i < R; ++i) TORCH_CHECK(row[i] >= 0 && row[i] < D, "row out of range");

    const int64_t nqkv = (H_ + 2 * KV_) * hd_;
    const std::vector<Part> parts = attention_parts(len, D, bs, at::get_num_threads());
    int64_t span = 0;
    for (const Part& pt : parts) span = std::max(span, pt.p1 - pt.p0);
    std::vector<float> x(D * dim_), h(D * std::max(dim_, H_ * hd_)), qkv(D * nqkv), att(D * H_ * hd_),
        gu(D * 2 * hidden_), act(D * hidden_), partial(parts.size() * H_ * (2 + hd_));
    std::vector<int64_t> first(D + 1, 0);  // parts of row d: [first[d], first[d + 1]), in position order
    for (const Part& pt : parts) ++first[pt.d + 1];
    for (int64_t d = 0; d < D; ++d) first[d + 1] += first[d];
    auto logits = torch::empty({R, head_.N}, torch::kFloat32);
    float* out = logits.data_ptr<float>();
    T* kp0 = reinterpret_cast<T*>(kpool.data_ptr());
    T* vp0 = reinterpret_cast<T*>(vpool.data_ptr());
    const float* cs = cos.data_ptr<float>();
    const float* sn = sin.data_ptr<float>();
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd_));
    const int64_t per_layer = S * KV_ * hd_;

#pragma omp parallel num_threads(at::get_num_threads())
    {
      std::vector<float> scores(H_ * span);
#pragma omp for
      for (int64_t d = 0; d < D; ++d) dequant_row(embed_, tok[d], x.data() + d * dim_);
      for (int64_t l = 0; l < L_; ++l) {
        const Lin* lin = &lins_[4 * l];
        T *kp = kp0 + l * per_layer, *vp = vp0 + l * per_layer;
        float *ks = ks0 ? ks0 + l * S * KV_ : nullptr, *vs = vs0 ? vs0 + l * S * KV_ : nullptr;
#pragma omp for
        for (int64_t d = 0; d < D; ++d)
          rmsnorm(x.data() + d * dim_, norms_[2 * l].data_ptr<float>(), eps_, dim_, h.data() + d * dim_);
        linear_team(lin[0], h.data(), D, qkv.data(), bf16);
#pragma omp for
        for (int64_t d = 0; d < D; ++d) {  // (Qwen3's per-head norms,) RoPE on q and k, the new K/V into its slot
          float* r = qkv.data() + d * nqkv;
          if (!qk_norms_.empty()) {
            const float *qn = qk_norms_[2 * l].data_ptr<float>(), *kn = qk_norms_[2 * l + 1].data_ptr<float>();
            for (int64_t j = 0; j < H_ + KV_; ++j) rmsnorm(r + j * hd_, j < H_ ? qn : kn, eps_, hd_, r + j * hd_);
          }
          for (int64_t j = 0; j < H_ + KV_; ++j) rope(r + j * hd_, cs + d * hd_, sn + d * hd_, hd_);
          const int64_t p = len[d] - 1, slot = tab[d * nb + p / bs] * bs + p % bs;
          for (int64_t g = 0; g < KV_; ++g) {
            kv_store(r + (H_ + g) * hd_, kp + (slot * KV_ + g) * hd_, ks ? ks + slot * KV_ + g : nullptr, hd_);
            kv_store(r + (H_ + KV_ + g) * hd_, vp + (slot * KV_ + g) * hd_, vs ? vs + slot * KV_ + g : nullptr, hd_);
          }
        }
#pragma omp for schedule(dynamic, 1)
        for (size_t i = 0; i < parts.size(); ++i) {
          const Part& pt = parts[i];
          attend_part(qkv.data() + pt.d * nqkv, kp, vp, ks, vs, tab + pt.d * nb, pt, bs, H_, KV_, hd_, scale,
                      scores.data(), partial.data() + i * H_ * (2 + hd_));
        }
#pragma omp for
        for (int64_t dh = 0; dh < D * H_; ++dh) {  // part i's head h is entry i * H + h of `partial`
          const int64_t d = dh / H_, head = dh % H_;
          combine(partial.data(), first[d] * H_ + head, H_, first[d + 1] - first[d], hd_,
                  att.data() + d * H_ * hd_ + head * hd_);
        }
        linear_team(lin[1], att.data(), D, x.data(), bf16, true);
#pragma omp for
        for (int64_t d = 0; d < D; ++d)
          rmsnorm(x.data() + d * dim_, norms_[2 * l + 1].data_ptr<float>(), eps_, dim_, h.data() + d * dim_);
        linear_team(lin[2], h.data(), D, gu.data(), bf16);
#pragma omp for
        for (int64_t d = 0; d < D; ++d) {
          const float* gate = gu.data() + d * 2 * hidden_;
          const float* up = gate + hidden_;
          float* a = act.data() + d * hidden_;
          vmap(gate, a, hidden_, [&](V g, int64_t j) {  // silu(gate) * up
            V u;
            if (j + W <= hidden_) {
              u = vload(up + j);
            } else {
              alignas(64) float tail[W] = {0};
              std::copy(up + j, up + hidden_, tail);
              u = vload(tail);
            }
            return vmul(vmul(g, u), vset(1.0f) / (vset(1.0f) + vexp(vzero() - g)));
          });
        }
        linear_team(lin[3], act.data(), D, x.data(), bf16, true);
      }
#pragma omp for
      for (int64_t i = 0; i < R; ++i)
        rmsnorm(x.data() + row[i] * dim_, norms_.back().data_ptr<float>(), eps_, dim_, h.data() + i * dim_);
      linear_team(head_, h.data(), R, out, bf16);
    }
    return logits;
  }

  std::vector<Lin> lins_;
  std::vector<torch::Tensor> norms_, qk_norms_;
  Lin embed_, head_;
  int64_t H_, KV_, hd_, L_ = 0, dim_ = 0, hidden_ = 0;
  float eps_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Lin>(m, "Lin").def(pybind11::init(&make_lin), "kind (0 fp32, 1 int8, 2 int4), weights, scales, mins, bias");
  pybind11::class_<Decoder>(m, "Decoder")
      .def(pybind11::init<std::vector<Lin>, std::vector<torch::Tensor>, std::vector<torch::Tensor>, Lin, Lin, int64_t,
                          int64_t, int64_t, double>())
      .def("step", &Decoder::step, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.attr("bf16_gemm") = kBf16;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  m.def("amx", &amx_ready, "whether 5-16 row products in bf16 run on AMX tiles (the OS granted their state)");
#else
  m.def("amx", [] { return false; }, "whether 5-16 row products in bf16 run on AMX tiles (built without AMX)");
#endif
  m.def("linear", &linear, "x @ w^T (+ bias) for fp32 / int8 / int4 weights (allow_bf16: prefill GEMMs in bf16)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("split_input", &split_input, "whether (kind, input rows, K) multiplies on the ~16-bit split of the input");
  m.def("dequantize", &dequantize, "int8 / int4 / GGUF blocks -> fp32 (N, K)");
  m.def("stack", &make_stack, "matrices on the same input as one, rows one after another (no copy)");
}
