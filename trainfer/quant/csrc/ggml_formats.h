// llama.cpp's own weight formats, read in place from a memory-mapped GGUF file (included by kernels.cpp, after its
// vector helpers V / W). Reference: gguf-py's gguf/quants.py (dequantize_blocks per type), which the tests compare
// with bit for bit.
//
// Every format is read as groups of 32 consecutive weights of a row; a group's weights are q * s + m, where q is a
// small integer (signed after subtracting `offset`), s a scale and m a min (zero for the symmetric formats). K-quants
// pack 8 groups into one 256-weight super-block with 6-bit (Q4_K, Q5_K) or 8-bit per-16 (Q6_K) sub-scales.
//
//   kind       ggml  bytes/block  weights/block  q bits  layout
//   Q4_0        2       18            32           4    d fp16, 16 bytes: byte j = q[j] | q[j + 16] << 4; offset 8
//   Q4_1        3       20            32           4    d, m fp16, nibbles as Q4_0
//   Q5_0        6       22            32           5    d, qh u32 (bit j: q[j]'s 5th bit), nibbles; offset 16
//   Q5_1        7       24            32           5    d, m, qh, nibbles
//   Q8_0        8       34            32           8    d, 32 int8
//   Q4_K       12      144           256           4    d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes:
//                                                       group g reads nibble g % 2 of bytes 32 (g / 2) .. + 31
//   Q5_K       13      176           256           5    d, dmin, scales, qh[32] (bit g of byte j), 128 as Q4_K
//   Q6_K       14      210           256           6    ql[128], qh[64], 16 int8 scales (one per 16), d; offset 32
//   F16 / BF16  1 / 30  2 per weight (read in pseudo-blocks of 32)
// The fast path (`weights`) may fuse q * s + m into one FMA or a table lookup; the exact one (`exact`) computes it as
// gguf-py does, multiply then add, so `dequantize` is bit-exact (the file is built with -ffp-contract=off).

#pragma once
#include <cstring>

enum GgmlKind : int64_t {
  kGgml = 100,  // kernel kind = 100 + ggml type id
  kF16 = 101, kQ4_0 = 102, kQ4_1 = 103, kQ5_0 = 106, kQ5_1 = 107, kQ8_0 = 108,
  kQ4_K = 112, kQ5_K = 113, kQ6_K = 114, kBF16 = 130,
};

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// W consecutive bytes (zero- or sign-extended) as 32-bit integer lanes, and lane-wise integer helpers.
#ifdef __AVX512F__
using VI = __m512i;
inline VI u8_lanes(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline VI i8_lanes(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline VI srl(VI v, int n) { return _mm512_srl_epi32(v, _mm_cvtsi32_si128(n)); }
inline VI srlv(VI v, VI n) { return _mm512_srlv_epi32(v, n); }
inline VI sll(VI v, int n) { return _mm512_sll_epi32(v, _mm_cvtsi32_si128(n)); }
inline VI band(VI v, int k) { return _mm512_and_si512(v, _mm512_set1_epi32(k)); }
inline VI bor(VI a, VI b) { return _mm512_or_si512(a, b); }
inline VI isub(VI v, int k) { return _mm512_sub_epi32(v, _mm512_set1_epi32(k)); }
inline VI iadd(VI v, int k) { return _mm512_add_epi32(v, _mm512_set1_epi32(k)); }
inline VI iset(int k) { return _mm512_set1_epi32(k); }
inline VI lane_index() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
inline V tofloat(VI v) { return _mm512_cvtepi32_ps(v); }
inline V f16_lanes(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline V bf16_lanes(const uint8_t* p) {
  const VI u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
#else
using VI = __m256i;
inline VI u8_lanes(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
inline VI i8_lanes(const uint8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
inline VI srl(VI v, int n) { return _mm256_srl_epi32(v, _mm_cvtsi32_si128(n)); }
inline VI srlv(VI v, VI n) { return _mm256_srlv_epi32(v, n); }
inline VI sll(VI v, int n) { return _mm256_sll_epi32(v, _mm_cvtsi32_si128(n)); }
inline VI band(VI v, int k) { return _mm256_and_si256(v, _mm256_set1_epi32(k)); }
inline VI bor(VI a, VI b) { return _mm256_or_si256(a, b); }
inline VI isub(VI v, int k) { return _mm256_sub_epi32(v, _mm256_set1_epi32(k)); }
inline VI iadd(VI v, int k) { return _mm256_add_epi32(v, _mm256_set1_epi32(k)); }
inline VI iset(int k) { return _mm256_set1_epi32(k); }
inline VI lane_index() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
inline V tofloat(VI v) { return _mm256_cvtepi32_ps(v); }
inline V f16_lanes(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline V bf16_lanes(const uint8_t* p) {
  const VI u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
#endif

// A group's scale and min as registers, prepared once per (row, group): `s`, `m` for the exact path, `m2` = m - offset
// s for the fused one, and for 4- and 5-bit formats on AVX-512 the group's possible weights as lookup tables.
struct GroupScale {
  V s, m, m2;
  V s_hi, m2_hi;  // Q6_K: the group's second 16 weights have their own scale
  V t0, t1;       // AVX-512 tables: q -> q * s + m2 for q in 0..15 (t0) and 16..31 (t1)
};

// Weights [j0, j0 + W) of group g as integers 0..2^bits-1 (before `offset`), for block pointer p.
template <int KIND>
inline VI group_q(const uint8_t* p, int g, int j0);

template <>
inline VI group_q<kQ8_0>(const uint8_t* p, int, int j0) { return i8_lanes(p + 2 + j0); }
template <>
inline VI group_q<kQ4_0>(const uint8_t* p, int, int j0) { return band(srl(u8_lanes(p + 2 + j0 % 16), 4 * (j0 / 16)), 15); }
template <>
inline VI group_q<kQ4_1>(const uint8_t* p, int, int j0) { return band(srl(u8_lanes(p + 4 + j0 % 16), 4 * (j0 / 16)), 15); }
inline VI q5_high(const uint8_t* qh, int j0) {  // bit j of a little-endian u32, for j in [j0, j0 + W), at bit 4
  uint32_t h;
  std::memcpy(&h, qh, 4);
  return sll(band(srlv(iset(static_cast<int>(h)), iadd(lane_index(), j0)), 1), 4);
}
template <>
inline VI group_q<kQ5_0>(const uint8_t* p, int, int j0) {
  return bor(band(srl(u8_lanes(p + 6 + j0 % 16), 4 * (j0 / 16)), 15), q5_high(p + 2, j0));
}
template <>
inline VI group_q<kQ5_1>(const uint8_t* p, int, int j0) {
  return bor(band(srl(u8_lanes(p + 8 + j0 % 16), 4 * (j0 / 16)), 15), q5_high(p + 4, j0));
}
template <>
inline VI group_q<kQ4_K>(const uint8_t* p, int g, int j0) { return band(srl(u8_lanes(p + 16 + 32 * (g / 2) + j0), 4 * (g % 2)), 15); }
template <>
inline VI group_q<kQ5_K>(const uint8_t* p, int g, int j0) {
  const VI lo = band(srl(u8_lanes(p + 48 + 32 * (g / 2) + j0), 4 * (g % 2)), 15);
  return bor(lo, sll(band(srl(u8_lanes(p + 16 + j0), g), 1), 4));
}
template <>
inline VI group_q<kQ6_K>(const uint8_t* p, int g, int j0) {
  const int h = g / 4, gi = g % 4;
  const VI lo = band(srl(u8_lanes(p + 64 * h + 32 * (gi % 2) + j0), 4 * (gi / 2)), 15);
  return bor(lo, sll(band(srl(u8_lanes(p + 128 + 32 * h + j0), 2 * gi), 3), 4));
}

// The 6-bit scale and min of group g of a Q4_K / Q5_K super-block (gguf-py's get_scale_min).
inline void k_scale_min(const uint8_t* s, int g, int& sc, int& mn) {
  if (g < 4) {
    sc = s[g] & 63, mn = s[g + 4] & 63;
  } else {
    sc = (s[g + 4] & 0x0F) | ((s[g - 4] >> 6) << 4), mn = (s[g + 4] >> 4) | ((s[g] >> 6) << 4);
  }
}

// Per format: weights per block, bytes per block, bits of q, the offset subtracted from q, and whether there is a min.
template <int KIND>
struct Fmt;
template <> struct Fmt<kQ8_0> { static constexpr int vals = 32, bytes = 34, bits = 8, offset = 0; static constexpr bool min = false; };
template <> struct Fmt<kQ4_0> { static constexpr int vals = 32, bytes = 18, bits = 4, offset = 8; static constexpr bool min = false; };
template <> struct Fmt<kQ4_1> { static constexpr int vals = 32, bytes = 20, bits = 4, offset = 0; static constexpr bool min = true; };
template <> struct Fmt<kQ5_0> { static constexpr int vals = 32, bytes = 22, bits = 5, offset = 16; static constexpr bool min = false; };
template <> struct Fmt<kQ5_1> { static constexpr int vals = 32, bytes = 24, bits = 5, offset = 0; static constexpr bool min = true; };
template <> struct Fmt<kQ4_K> { static constexpr int vals = 256, bytes = 144, bits = 4, offset = 0; static constexpr bool min = true; };
template <> struct Fmt<kQ5_K> { static constexpr int vals = 256, bytes = 176, bits = 5, offset = 0; static constexpr bool min = true; };
template <> struct Fmt<kQ6_K> { static constexpr int vals = 256, bytes = 210, bits = 6, offset = 32; static constexpr bool min = false; };
template <> struct Fmt<kF16> { static constexpr int vals = 32, bytes = 64, bits = 16, offset = 0; static constexpr bool min = false; };
template <> struct Fmt<kBF16> { static constexpr int vals = 32, bytes = 64, bits = 16, offset = 0; static constexpr bool min = false; };

// Scale (and min) of group g of block p: s = d (or d * sub-scale), m = m (or -dmin * sub-min), as gguf-py rounds them.
template <int KIND>
inline void scale_min(const uint8_t* p, int g, float& s, float& m, float& s_hi) {
  m = 0.0f;
  if constexpr (KIND == kQ8_0 || KIND == kQ4_0 || KIND == kQ5_0) s = fp16(p);
  if constexpr (KIND == kQ4_1 || KIND == kQ5_1) s = fp16(p), m = fp16(p + 2);
  if constexpr (KIND == kQ4_K || KIND == kQ5_K) {
    int sc, mn;
    k_scale_min(p + 4, g, sc, mn);
    s = fp16(p) * static_cast<float>(sc);
    m = -(fp16(p + 2) * static_cast<float>(mn));
  }
  if constexpr (KIND == kQ6_K) {
    const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
    const float d = fp16(p + 208);
    s = d * static_cast<float>(sc[2 * g]);
    s_hi = d * static_cast<float>(sc[2 * g + 1]);
  } else {
    s_hi = s;
  }
}

// All 8 scales d * sc and mins -dmin * mn of a Q4_K / Q5_K super-block at once: the 12 bytes' 32-bit words are
// rearranged so that bytes 0-7 hold the six-bit scales and bytes 8-15 the mins (group by group, as k_scale_min),
// then widened and multiplied 8 at a time (one by one they cost more than the weights' own decoding).
__attribute__((always_inline)) inline void k_scales_mins(const uint8_t* p, __m256& s, __m256& m) {
  uint32_t w[3];
  std::memcpy(w, p + 4, 12);
  const uint64_t scales = (w[0] & 0x3F3F3F3Fu)                                                          // 0-3
                          | uint64_t((w[2] & 0x0F0F0F0Fu) | (((w[0] >> 6) & 0x03030303u) << 4)) << 32;  // 4-7
  const uint64_t mins = (w[1] & 0x3F3F3F3Fu)
                        | uint64_t(((w[2] >> 4) & 0x0F0F0F0Fu) | (((w[1] >> 6) & 0x03030303u) << 4)) << 32;
  // in registers: four 32-bit stores read back as one 128-bit load cannot be forwarded and stall (measured: the
  // whole Q4_K product ran at 16 GB/s instead of ~20)
  const __m128i bytes = _mm_set_epi64x(static_cast<int64_t>(mins), static_cast<int64_t>(scales));
  const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
  const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)));
  s = _mm256_mul_ps(_mm256_set1_ps(fp16(p)), sc);
  m = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(_mm256_set1_ps(fp16(p + 2)), mn));
}

// The scales and mins (m2 = m - offset s) of every group of block p, decoded once per (row, block): for Q6_K one pair per
// 16 weights, else one per 32.
template <int KIND>
inline void block_scales(const uint8_t* p, float* s, float* m2) {
  constexpr int groups = Fmt<KIND>::vals / 32;
  if constexpr (KIND == kQ6_K) {
    const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
    const float d = fp16(p + 208);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) s[i] = d * static_cast<float>(sc[i]), m2[i] = -32.0f * s[i];
  } else if constexpr (KIND == kQ4_K || KIND == kQ5_K) {
    __m256 sv, mv;
    k_scales_mins(p, sv, mv);
    _mm256_storeu_ps(s, sv);
    _mm256_storeu_ps(m2, mv);
  } else if constexpr (KIND != kF16 && KIND != kBF16) {
#pragma GCC unroll 8
    for (int g = 0; g < groups; ++g) {
      float hi, m;
      scale_min<KIND>(p, g, s[g], m, hi);
      m2[g] = m - Fmt<KIND>::offset * s[g];
    }
  }
}

#ifdef __AVX512F__
// Q4_K's groups 2k and 2k + 1 read the low and the high nibbles of the same 32 bytes: for chunk c (16 of those
// bytes) one load gives both groups' weights, each through its own table (vpermps reads the low 4 bits of each
// index, so neither needs a mask).
inline void q4k_pair(const uint8_t* p, int k, int c, const GroupScale& lo, const GroupScale& hi, V& w_lo, V& w_hi) {
  const VI q = u8_lanes(p + 16 + 32 * k + 16 * c);
  w_lo = _mm512_permutexvar_ps(q, lo.t0);
  w_hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), hi.t0);
}
#endif

// Group g's registers from block_scales' arrays: the fused path's scale and min, or its lookup tables.
template <int KIND>
inline GroupScale group_from(const float* s, const float* m2, int g) {
  GroupScale G;
  if constexpr (KIND == kF16 || KIND == kBF16) return G;
  if constexpr (KIND == kQ6_K) {
    G.s = vset(s[2 * g]), G.m2 = vset(m2[2 * g]), G.s_hi = vset(s[2 * g + 1]), G.m2_hi = vset(m2[2 * g + 1]);
    return G;
  }
  G.s = vset(s[g]), G.m2 = vset(m2[g]);
#ifdef __AVX512F__
  if constexpr (Fmt<KIND>::bits <= 5) {
    const V iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    G.t0 = _mm512_fmadd_ps(iota, G.s, G.m2);
    if constexpr (Fmt<KIND>::bits == 5) G.t1 = _mm512_fmadd_ps(_mm512_add_ps(iota, vset(16.0f)), G.s, G.m2);
  }
#endif
  return G;
}

// The exact path's registers for group g of block p (dequantize: once per group, speed matters less).
template <int KIND>
inline GroupScale group_scale(const uint8_t* p, int g) {
  GroupScale G;
  if constexpr (KIND == kF16 || KIND == kBF16) return G;
  float s, m, s_hi;
  scale_min<KIND>(p, g, s, m, s_hi);
  G.s = vset(s), G.m = vset(m), G.s_hi = vset(s_hi);
  return G;
}

// Weights [j0, j0 + W) of group g of block p, fast: one FMA per register, or a table lookup on AVX-512.
template <int KIND>
inline V group_weights(const uint8_t* p, int g, int j0, const GroupScale& G) {
  if constexpr (KIND == kF16) return f16_lanes(p + 64 * g + 2 * j0);
  if constexpr (KIND == kBF16) return bf16_lanes(p + 64 * g + 2 * j0);
  if constexpr (KIND != kF16 && KIND != kBF16) {
    const VI q = group_q<KIND>(p, g, j0);
#ifdef __AVX512F__
    if constexpr (Fmt<KIND>::bits == 4) return _mm512_permutexvar_ps(q, G.t0);
    if constexpr (Fmt<KIND>::bits == 5) return _mm512_permutex2var_ps(G.t0, q, G.t1);
#endif
    if constexpr (KIND == kQ8_0) return vmul(tofloat(q), G.s);
    if constexpr (KIND == kQ6_K) return j0 < 16 ? vfma(tofloat(q), G.s, G.m2) : vfma(tofloat(q), G.s_hi, G.m2_hi);
    return vfma(tofloat(q), G.s, G.m2);
  }
}

// The same weights exactly as gguf-py computes them: (q - offset) * s, then + m.
template <int KIND>
inline V group_exact(const uint8_t* p, int g, int j0, const GroupScale& G) {
  if constexpr (KIND == kF16 || KIND == kBF16) return group_weights<KIND>(p, g, j0, G);
  if constexpr (KIND != kF16 && KIND != kBF16) {
    const V q = tofloat(isub(group_q<KIND>(p, g, j0), Fmt<KIND>::offset));
    const V s = KIND == kQ6_K && j0 >= 16 ? G.s_hi : G.s;
    if constexpr (Fmt<KIND>::min) return vadd(vmul(s, q), G.m);
    return vmul(s, q);
  }
}
