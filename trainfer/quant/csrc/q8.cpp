// y = x @ dequant(q, s)^T for Q8_0-style weights: int8 values in blocks of 32 along K, one fp32 scale per
// block. Decode (a few input rows): int8 -> fp32 in registers, multiplied with x at once. Prefill (many rows):
// chunks of output rows are dequantized into a cache-sized buffer and multiplied by torch's GEMM. Either way the
// weights stream from memory once per call as int8 (decode is memory-bound: a quarter of the fp32 bytes).
// Reference: trainfer/quant/blocks.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kTile = 4;
constexpr int64_t kFusedRows = 8;  // up to this many input rows, the fused path (no fp32 buffer) wins
constexpr int64_t kChunk = 256;    // output rows dequantized at a time for the GEMM path (256 x 1536 fp32 = 1.5 MB)

void dequant_row(const int8_t* q, const float* s, float* out, int64_t K) {
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const __m256 scale = _mm256_set1_ps(s[b]);
    for (int64_t j = 0; j < kBlock; j += 8) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + b * kBlock + j));
      const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
      _mm256_storeu_ps(out + b * kBlock + j, _mm256_mul_ps(w, scale));
    }
  }
}

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// Small batches (decode): convert and multiply in registers, no buffer. Per block, the 32 products of a row
// are summed first and scaled once (as Q8_0 defines the dot product).
#ifdef __AVX512F__
inline __m512 load16(const int8_t* q) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
}

inline void fused_tile(const int8_t* q, const float* s, const float* x, int64_t K, int64_t rows, float* out) {
  __m512 total[kTile];
  for (int64_t r = 0; r < kTile; ++r) total[r] = _mm512_setzero_ps();
  const int64_t nb = K / kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 x0 = _mm512_loadu_ps(x + b * kBlock), x1 = _mm512_loadu_ps(x + b * kBlock + 16);
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* qr = q + r * K + b * kBlock;
      const __m512 block = _mm512_fmadd_ps(load16(qr + 16), x1, _mm512_mul_ps(load16(qr), x0));
      total[r] = _mm512_fmadd_ps(block, _mm512_set1_ps(s[r * nb + b]), total[r]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) out[r] = _mm512_reduce_add_ps(total[r]);
}
#else
inline __m256 load8(const int8_t* q) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}

inline void fused_tile(const int8_t* q, const float* s, const float* x, int64_t K, int64_t rows, float* out) {
  __m256 total[kTile];
  for (int64_t r = 0; r < kTile; ++r) total[r] = _mm256_setzero_ps();
  const int64_t nb = K / kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kBlock;
    const __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8), x2 = _mm256_loadu_ps(xb + 16),
                 x3 = _mm256_loadu_ps(xb + 24);
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* qr = q + r * K + b * kBlock;
      __m256 block = _mm256_mul_ps(load8(qr), x0);
      block = _mm256_fmadd_ps(load8(qr + 8), x1, block);
      block = _mm256_fmadd_ps(load8(qr + 16), x2, block);
      block = _mm256_fmadd_ps(load8(qr + 24), x3, block);
      total[r] = _mm256_fmadd_ps(block, _mm256_set1_ps(s[r * nb + b]), total[r]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) out[r] = hsum(total[r]);
}
#endif

}  // namespace

torch::Tensor q8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor s) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous (M, K) fp32");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8 && q.is_contiguous(), "q: contiguous (N, K) int8");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K && K % kBlock == 0, "K must match and be a multiple of 32");
  TORCH_CHECK(s.scalar_type() == torch::kFloat32 && s.is_contiguous() && s.numel() == N * (K / kBlock),
              "s: contiguous (N, K / 32) fp32");
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M <= kFusedRows) {
    at::parallel_for(0, (N + kTile - 1) / kTile, 16, [&](int64_t t0, int64_t t1) {
      float out[kTile];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * kTile, rows = std::min(kTile, N - n0);
        for (int64_t m = 0; m < M; ++m) {
          fused_tile(qp + n0 * K, sp + n0 * (K / kBlock), xp + m * K, K, rows, out);
          for (int64_t r = 0; r < rows; ++r) yp[m * N + n0 + r] = out[r];
        }
      }
    });
    return y;
  }
  // Many rows (prefill, big batches): dequantize a chunk of output rows into a cache-sized fp32 buffer and let
  // the BLAS GEMM (MKL / oneDNN in torch) multiply it with all input rows; weights are still read once as int8.
  const int64_t chunk = std::min<int64_t>(kChunk, N);
  auto buf = torch::empty({chunk, K}, x.options());
  float* bp = buf.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t rows = std::min(chunk, N - n0);
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) dequant_row(qp + (n0 + r) * K, sp + (n0 + r) * (K / kBlock), bp + r * K, K);
    });
    y.narrow(1, n0, rows).copy_(torch::mm(x, buf.narrow(0, 0, rows).t()));
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("q8_linear", &q8_linear, "x @ dequant(q, s)^T (Q8_0 blocks)"); }
