// The SIMD 4-bit encoders of quantize_4bit (quantize_cpu.cpp), one per width: the codes of
// 32 scaled values x[i] * inv, packed two per byte (16 bytes), each code the count of
// thresholds strictly below its value (qk_format.h), so NaN encodes to 0 and every width
// gives the bits of the scalar qk::encode_4bit. Encoder4<Avx2> compares with each
// threshold; Encoder4<Avx512> finds the count by binary search, one vpermps lookup a step.
#pragma once
#include <stdint.h>

#include "qk_format.h"
#include "simd_width.h"

#if defined(__x86_64__)
namespace qlora_kernels::cpu {

// 32 codes as bytes in element order -> byte pairs (c[2k], c[2k+1]) as c[2k] << 4 | c[2k+1],
// one per 16-bit lane.
QK_AVX2 inline __m256i pack_pairs(__m256i b) {
  return _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(b, 4), _mm256_set1_epi16(0x00F0)),
                         _mm256_srli_epi16(b, 8));
}

template <class S> struct Encoder4;

template <> struct Encoder4<Avx2> {
  int qt;

  explicit Encoder4(int quant_type) : qt(quant_type) {}

  // Codes of 8 scaled values: the count of thresholds strictly below each (see qk_format.h).
  QK_AVX2 __m256i encode8(__m256 s) const {
    __m256i q = _mm256_setzero_si256();
    if (qt == qk::kFP4) {
      const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), s);
      for (int k = 0; k < 7; ++k)
        q = _mm256_sub_epi32(q, _mm256_castps_si256(_mm256_cmp_ps(
                                    a, _mm256_set1_ps(qk::kFP4MagThresholds[k]), _CMP_GT_OQ)));
      q = _mm256_xor_si256(q, _mm256_slli_epi32(_mm256_and_si256(q, _mm256_set1_epi32(2)), 1));
      const __m256i neg = _mm256_castps_si256(_mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_LT_OQ));
      return _mm256_or_si256(q, _mm256_and_si256(neg, _mm256_set1_epi32(8)));
    }
    const float* t = qt == qk::kNF4 ? qk::kNF4Thresholds : qk::kINT4Thresholds;
    for (int k = 0; k < 15; ++k)
      q = _mm256_sub_epi32(q, _mm256_castps_si256(_mm256_cmp_ps(s, _mm256_set1_ps(t[k]), _CMP_GT_OQ)));
    return q;
  }

  template <typename T>
  QK_AVX2 void encode32(const T* x, __m256 inv, uint8_t* out) const {
    const __m256i q0 = encode8(_mm256_mul_ps(Avx2::load(x), inv));
    const __m256i q1 = encode8(_mm256_mul_ps(Avx2::load(x + 8), inv));
    const __m256i q2 = encode8(_mm256_mul_ps(Avx2::load(x + 16), inv));
    const __m256i q3 = encode8(_mm256_mul_ps(Avx2::load(x + 24), inv));
    // 32 int32 codes -> 32 bytes in element order
    __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
    b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    const __m256i w = pack_pairs(b);
    const __m128i packed =
        _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), packed);
  }
};

// Binary search over the sorted thresholds (4 steps for 15, 3 for FP4's 7 magnitudes)
// instead of one compare per threshold; the greater-than compares are the same, so the bits
// equal Avx2's.
template <> struct Encoder4<Avx512> {
  __m512 t;    // thresholds in ascending order (entries past the last are never read)
  int steps;   // log2 of the table size rounded up
  bool fp4;

  QK_AVX512 explicit Encoder4(int qt) : steps(qt == qk::kFP4 ? 3 : 4), fp4(qt == qk::kFP4) {
    alignas(64) float v[16] = {};
    const float* src = qt == qk::kNF4 ? qk::kNF4Thresholds
                       : qt == qk::kFP4 ? qk::kFP4MagThresholds : qk::kINT4Thresholds;
    for (int k = 0; k < (fp4 ? 7 : 15); ++k) v[k] = src[k];
    t = _mm512_load_ps(v);
  }
  QK_AVX512 __m512i encode16(__m512 s) const {
    const __m512 a = fp4 ? _mm512_abs_ps(s) : s;
    __m512i q = _mm512_setzero_si512();
    for (int step = 1 << (steps - 1); step > 0; step >>= 1) {
      const __m512 th = _mm512_permutexvar_ps(_mm512_add_epi32(q, _mm512_set1_epi32(step - 1)), t);
      q = _mm512_mask_add_epi32(q, _mm512_cmp_ps_mask(a, th, _CMP_GT_OQ), q, _mm512_set1_epi32(step));
    }
    if (!fp4) return q;
    q = _mm512_xor_si512(q, _mm512_slli_epi32(_mm512_and_si512(q, _mm512_set1_epi32(2)), 1));
    return _mm512_mask_or_epi32(q, _mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_LT_OQ), q,
                                _mm512_set1_epi32(8));
  }
  template <typename T>
  QK_AVX512 void encode32(const T* x, __m512 inv, uint8_t* out) const {
    const __m128i c0 = _mm512_cvtepi32_epi8(encode16(_mm512_mul_ps(Avx512::load(x), inv)));
    const __m128i c1 = _mm512_cvtepi32_epi8(encode16(_mm512_mul_ps(Avx512::load(x + 16), inv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                     _mm256_cvtepi16_epi8(pack_pairs(_mm256_set_m128i(c1, c0))));
  }
};

}  // namespace qlora_kernels::cpu
#endif  // __x86_64__
