// SIMD width traits of the CPU kernels: a kernel body is written once, as a template over a
// width S (Avx2: 8 float lanes, Avx512: 16), using only S's types and operations.
//
// How an instantiation gets its instruction set: every trait function carries its width's
// target attribute, and a body carries none. A body is called only from a function marked
// QK_AVX2_BODY or QK_AVX512_BODY (the width's target plus `flatten`), which inlines the body
// and every trait call in it: that function is compiled for its width alone, and the module
// still loads and runs on any x86-64, since the dispatchers call an Avx512 instance only at
// path avx512 and up (cpu_isa.h). Every function on S's vectors is also QK_ANY_WIDTH
// (always_inline): `flatten` does nothing at -O0 (QLORA_KERNELS_DEBUG builds), and a body
// left out of line would pass vectors to the trait functions without the width's registers,
// a different calling convention than theirs; inlined, each such call is made from the
// targeted function. gcc notes that convention (-Wpsabi, "changes the ABI") while parsing a
// body, before it is inlined, so the note is off here. The bodies hold no OpenMP region (its
// outlined function would be compiled apart): the parallel loops stay in the dispatchers.
// gcc 12's AVX-512 intrinsic headers build their "undefined" vectors as `__m512 __Y = __Y;`,
// which -W(maybe-)uninitialized reports wherever they are inlined: their code, not ours.
#pragma once
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <stdint.h>

#if defined(__x86_64__)
#include <immintrin.h>

// The features of path avx2 and avx512 (cpu_isa.h missing_feature), and nothing more.
#define QK_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QK_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")))
#define QK_AVX2_BODY QK_AVX2 __attribute__((flatten))
#define QK_AVX512_BODY QK_AVX512 __attribute__((flatten))
#define QK_ANY_WIDTH __attribute__((always_inline)) inline

namespace qlora_kernels::cpu {

struct Avx2 {
  using vf = __m256;
  using vi = __m256i;
  using mask = __m256;  // all-ones lanes where true
  static constexpr int W = 8;

  QK_AVX2 static vf zero() { return _mm256_setzero_ps(); }
  QK_AVX2 static vf set1(float v) { return _mm256_set1_ps(v); }
  QK_AVX2 static vf load(const float* p) { return _mm256_loadu_ps(p); }
  QK_AVX2 static vf load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  QK_AVX2 static vf load(const c10::BFloat16* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  QK_AVX2 static void store(float* p, vf v) { _mm256_storeu_ps(p, v); }
  QK_AVX2 static vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
  QK_AVX2 static vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
  QK_AVX2 static vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
  QK_AVX2 static vf div(vf a, vf b) { return _mm256_div_ps(a, b); }
  QK_AVX2 static vf sqrt(vf a) { return _mm256_sqrt_ps(a); }
  QK_AVX2 static vf fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c
  QK_AVX2 static vf max(vf a, vf b) { return _mm256_max_ps(a, b); }
  QK_AVX2 static vf abs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  QK_AVX2 static vf neg(vf a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
  QK_AVX2 static float reduce_add(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  QK_AVX2 static float reduce_max(vf v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }

  QK_AVX2 static mask none() { return _mm256_setzero_ps(); }
  QK_AVX2 static mask gt(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  QK_AVX2 static mask is_nan(vf a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
  QK_AVX2 static mask either(mask a, mask b) { return _mm256_or_ps(a, b); }
  QK_AVX2 static bool any(mask m) { return _mm256_movemask_ps(m) != 0; }

  QK_AVX2 static vi bits(vf a) { return _mm256_castps_si256(a); }
  QK_AVX2 static vi set1i(int v) { return _mm256_set1_epi32(v); }
  QK_AVX2 static vi or_i(vi a, vi b) { return _mm256_or_si256(a, b); }
  QK_AVX2 static vi xor_i(vi a, vi b) { return _mm256_xor_si256(a, b); }
  QK_AVX2 static vi srli(vi a, int n) { return _mm256_srli_epi32(a, n); }
  QK_AVX2 static vi srai(vi a, int n) { return _mm256_srai_epi32(a, n); }
  QK_AVX2 static vi inc_where(vi a, mask m) {
    return _mm256_add_epi32(a, _mm256_and_si256(_mm256_castps_si256(m), _mm256_set1_epi32(1)));
  }
  QK_AVX2 static vi zero_where(vi a, mask m) { return _mm256_andnot_si256(_mm256_castps_si256(m), a); }
  // table[idx] per lane (float32 table; byte table: 3 readable bytes past the last index)
  QK_AVX2 static vf gather(const float* table, vi idx) { return _mm256_i32gather_ps(table, idx, 4); }
  QK_AVX2 static vi gather_byte(const uint8_t* table, vi idx) {
    return _mm256_and_si256(
        _mm256_i32gather_epi32(reinterpret_cast<const int*>(table), idx, 1), _mm256_set1_epi32(0xff));
  }
  // The W lanes (each 0..255) as W bytes.
  QK_AVX2 static void store_bytes(uint8_t* p, vi a) {
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
  }

  // Byte operations (per 128-bit lane, as the instructions do).
  QK_AVX2 static vi broadcast16(const uint8_t* p) {  // 16 bytes to every 128-bit lane
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // The 2W bytes at p as 4W byte lanes: their high nibbles, then their low nibbles.
  QK_AVX2 static vi nibbles(const uint8_t* p) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
  }
  QK_AVX2 static vi shuffle_bytes(vi table, vi idx) { return _mm256_shuffle_epi8(table, idx); }
  QK_AVX2 static vi unpacklo8(vi a, vi b) { return _mm256_unpacklo_epi8(a, b); }
  QK_AVX2 static vi unpackhi8(vi a, vi b) { return _mm256_unpackhi_epi8(a, b); }
  QK_AVX2 static vi unpacklo16(vi a, vi b) { return _mm256_unpacklo_epi16(a, b); }
  QK_AVX2 static vi unpackhi16(vi a, vi b) { return _mm256_unpackhi_epi16(a, b); }
  QK_AVX2 static vf floats(vi a) { return _mm256_castsi256_ps(a); }  // the same bits
};

struct Avx512 {
  using vf = __m512;
  using vi = __m512i;
  using mask = __mmask16;
  static constexpr int W = 16;

  QK_AVX512 static vf zero() { return _mm512_setzero_ps(); }
  QK_AVX512 static vf set1(float v) { return _mm512_set1_ps(v); }
  QK_AVX512 static vf load(const float* p) { return _mm512_loadu_ps(p); }
  QK_AVX512 static vf load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  QK_AVX512 static vf load(const c10::BFloat16* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  QK_AVX512 static void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
  QK_AVX512 static vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
  QK_AVX512 static vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
  QK_AVX512 static vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
  QK_AVX512 static vf div(vf a, vf b) { return _mm512_div_ps(a, b); }
  QK_AVX512 static vf sqrt(vf a) { return _mm512_sqrt_ps(a); }
  QK_AVX512 static vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
  QK_AVX512 static vf max(vf a, vf b) { return _mm512_max_ps(a, b); }
  QK_AVX512 static vf abs(vf a) { return _mm512_abs_ps(a); }
  QK_AVX512 static vf neg(vf a) {  // _mm512_xor_ps would need AVX512DQ
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MIN)));
  }
  QK_AVX512 static float reduce_add(vf v) { return _mm512_reduce_add_ps(v); }
  QK_AVX512 static float reduce_max(vf v) { return _mm512_reduce_max_ps(v); }

  QK_AVX512 static mask none() { return 0; }
  QK_AVX512 static mask gt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  QK_AVX512 static mask is_nan(vf a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  QK_AVX512 static mask either(mask a, mask b) { return a | b; }
  QK_AVX512 static bool any(mask m) { return m != 0; }

  QK_AVX512 static vi bits(vf a) { return _mm512_castps_si512(a); }
  QK_AVX512 static vi set1i(int v) { return _mm512_set1_epi32(v); }
  QK_AVX512 static vi or_i(vi a, vi b) { return _mm512_or_si512(a, b); }
  QK_AVX512 static vi xor_i(vi a, vi b) { return _mm512_xor_si512(a, b); }
  QK_AVX512 static vi srli(vi a, int n) { return _mm512_srli_epi32(a, n); }
  QK_AVX512 static vi srai(vi a, int n) { return _mm512_srai_epi32(a, n); }
  QK_AVX512 static vi inc_where(vi a, mask m) {
    return _mm512_mask_add_epi32(a, m, a, _mm512_set1_epi32(1));
  }
  QK_AVX512 static vi zero_where(vi a, mask m) { return _mm512_maskz_mov_epi32(~m, a); }
  QK_AVX512 static vf gather(const float* table, vi idx) { return _mm512_i32gather_ps(idx, table, 4); }
  QK_AVX512 static vi gather_byte(const uint8_t* table, vi idx) {
    return _mm512_and_si512(_mm512_i32gather_epi32(idx, table, 1), _mm512_set1_epi32(0xff));
  }
  QK_AVX512 static void store_bytes(uint8_t* p, vi a) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(a));
  }

  QK_AVX512 static vi broadcast16(const uint8_t* p) {
    return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  QK_AVX512 static vi nibbles(const uint8_t* p) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i m = _mm256_set1_epi8(0x0F);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(_mm256_srli_epi16(b, 4), m)),
                              _mm256_and_si256(b, m), 1);
  }
  QK_AVX512 static vi shuffle_bytes(vi table, vi idx) { return _mm512_shuffle_epi8(table, idx); }
  QK_AVX512 static vi unpacklo8(vi a, vi b) { return _mm512_unpacklo_epi8(a, b); }
  QK_AVX512 static vi unpackhi8(vi a, vi b) { return _mm512_unpackhi_epi8(a, b); }
  QK_AVX512 static vi unpacklo16(vi a, vi b) { return _mm512_unpacklo_epi16(a, b); }
  QK_AVX512 static vi unpackhi16(vi a, vi b) { return _mm512_unpackhi_epi16(a, b); }
  QK_AVX512 static vf floats(vi a) { return _mm512_castsi512_ps(a); }
};

}  // namespace qlora_kernels::cpu
#endif  // __x86_64__
