// CPU kernels for blockwise 4-bit and 8-bit quantize / dequantize.
//
// Parallel over blocks with OpenMP; the inner loops use AVX-512 or AVX2/FMA/F16C as
// cpu_isa() allows (checked at run time, compiled with per-function target attributes so
// the module still loads on CPUs without them) and the scalar code of qk_format.h otherwise.
// Quantize: a parallel task is 16 blocks; each block's absmax, then its codes 32 elements
// at a time (encode4_cpu.h: a binary search of the thresholds with AVX-512, one compare per
// threshold with AVX2), the tail of a block in scalar code; one body for both widths
// (simd_width.h).
// Dequantize builds, per block, the 16 possible outputs code[k] * absmax already rounded
// to the output dtype, so the inner loop is a byte shuffle: one table lookup per element,
// and the result is identical to computing code[q] * absmax element by element.
#include <omp.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#include "cpu_common.h"
#include "encode4_cpu.h"
#include "encode8_cpu.h"
#include "simd_width.h"

namespace qlora_kernels::cpu {
namespace {

// ------------------------------------------------------------------ scalar paths
// The block's absmax from elements [begin, len) and the running max `m` of the ones before
// (any NaN makes it NaN), stored to *absmax_out.
template <typename T>
float finish_absmax(const T* x, int64_t begin, int64_t len, float m, bool nan, float* absmax_out) {
  for (int64_t i = begin; i < len; ++i) {
    const float v = to_float(x[i]);
    if (std::fabs(v) > m) m = std::fabs(v);
    if (v != v) nan = true;
  }
  if (nan) m = NAN;
  *absmax_out = m;
  return m;
}

// Codes of elements [begin, len) (begin even), packed two per byte; an odd last element
// pairs with the pad code.
template <typename T>
void encode_pairs_scalar(const T* x, int64_t begin, int64_t len, int qt, float inv, uint8_t* out) {
  for (int64_t i = begin; i < len; i += 2) {
    const int hi = qk::encode_4bit(qt, to_float(x[i]) * inv);
    const int lo = i + 1 < len ? qk::encode_4bit(qt, to_float(x[i + 1]) * inv)
                               : qk::pad_code_4bit(qt, inv);
    out[i / 2] = qk::pack_pair(hi, lo);
  }
}

template <typename T>
void quantize_block_scalar(const T* x, int64_t len, int qt, float* absmax_out, uint8_t* out) {
  const float m = finish_absmax(x, 0, len, 0.0f, false, absmax_out);
  encode_pairs_scalar(x, 0, len, qt, qk::inverse_absmax_4bit(m), out);
}

template <typename OutT>
void dequant_block_scalar(const uint8_t* p, int64_t begin, int64_t len, const OutT* lut,
                          OutT* out) {
  // `begin` is even relative to the block start, so elements pair up with bytes.
  for (int64_t i = begin; i < len; ++i) {
    const uint8_t b = p[i / 2];
    out[i] = lut[(i & 1) ? qk::unpack_lo(b) : qk::unpack_hi(b)];
  }
}

#if defined(__x86_64__)
// ------------------------------------------------------------------ AVX2 dequantize
// 32 codes (16 packed bytes) in element order, as bytes.
QK_AVX2 inline __m256i unpack32(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  const __m128i lo = _mm_and_si128(b, m);
  return _mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo));
}

// float32 -> bfloat16 bits (round to nearest even) in the low half of each lane; the
// values here are finite products, so NaN needs no special case.
QK_AVX2 inline __m256i bf16_rne(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
}

// The 16 table entries code[k] * absmax rounded to a 16-bit output dtype, in index order:
// the same rounding as build_lut_planes (so every path gives the same bits).
template <typename OutT>
QK_AVX2 inline __m256i lut16(__m256 c0, __m256 c1, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  const __m256 v0 = _mm256_mul_ps(c0, vm), v1 = _mm256_mul_ps(c1, vm);
  if constexpr (std::is_same_v<OutT, c10::Half>)
    return _mm256_set_m128i(_mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT),
                            _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT));
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_rne(v0), bf16_rne(v1)), 0xD8);
}

// Per-block table of the 16 outputs code[k] * absmax, rounded to the output dtype and split
// into byte planes (byte b of every entry) broadcast to both 128-bit lanes for pshufb.
template <typename OutT>
QK_AVX2 inline void build_lut_planes(__m256 c0, __m256 c1, float m, __m256i* planes) {
  const __m256i h = lut16<OutT>(c0, c1, m);  // 16 uint16 in index order
  // per lane: [lo bytes of 8 entries, hi bytes of 8 entries]; then gather the two lanes
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i t = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(h, split), 0xD8);
  planes[0] = _mm256_permute4x64_epi64(t, 0x44);  // low bytes of entries 0..15, both lanes
  planes[1] = _mm256_permute4x64_epi64(t, 0xEE);  // high bytes
}

// 16-bit outputs (bf16/fp16) of one block.
template <typename OutT>
QK_AVX2 void dequant_block_avx2_16(const uint8_t* p, int64_t len, __m256 c0, __m256 c1, float m,
                                   uint16_t* out) {
  __m256i planes[2];
  build_lut_planes<OutT>(c0, c1, m, planes);
  int64_t j = 0;
  for (; j + 32 <= len; j += 32) {
    const __m256i idx = unpack32(p + j / 2);
    const __m256i bl = _mm256_shuffle_epi8(planes[0], idx);
    const __m256i bh = _mm256_shuffle_epi8(planes[1], idx);
    const __m256i w0 = _mm256_unpacklo_epi8(bl, bh);  // elements 0..7 | 16..23
    const __m256i w1 = _mm256_unpackhi_epi8(bl, bh);  // elements 8..15 | 24..31
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm256_permute2x128_si256(w0, w1, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j + 16),
                        _mm256_permute2x128_si256(w0, w1, 0x31));
  }
  if (j < len) {
    alignas(32) uint16_t lut[16];
    const __m256i lo = _mm256_unpacklo_epi8(planes[0], planes[1]);  // entries 0..7 per lane
    const __m256i hi = _mm256_unpackhi_epi8(planes[0], planes[1]);  // entries 8..15 per lane
    _mm_store_si128(reinterpret_cast<__m128i*>(lut), _mm256_castsi256_si128(lo));
    _mm_store_si128(reinterpret_cast<__m128i*>(lut + 8), _mm256_castsi256_si128(hi));
    dequant_block_scalar(p, j, len, lut, out);
  }
}

QK_AVX2 void dequant_block_avx2_32(const uint8_t* p, int64_t len, __m256 c0, __m256 c1, float m,
                                   float* out) {
  const __m256 vm = _mm256_set1_ps(m);
  const __m256 l0 = _mm256_mul_ps(c0, vm);
  const __m256 l1 = _mm256_mul_ps(c1, vm);
  int64_t j = 0;
  for (; j + 32 <= len; j += 32) {
    const __m256i idx = unpack32(p + j / 2);
    const __m128i halves[2] = {_mm256_castsi256_si128(idx), _mm256_extracti128_si256(idx, 1)};
    for (int h = 0; h < 2; ++h) {
      for (int e = 0; e < 2; ++e) {
        const __m256i i32 = _mm256_cvtepu8_epi32(e ? _mm_srli_si128(halves[h], 8) : halves[h]);
        const __m256 a = _mm256_permutevar8x32_ps(l0, i32);
        const __m256 b = _mm256_permutevar8x32_ps(l1, i32);
        const __m256 r = _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(i32, 28)));
        _mm256_storeu_ps(out + j + 16 * h + 8 * e, r);
      }
    }
  }
  if (j < len) {
    alignas(32) float lut[16];
    _mm256_store_ps(lut, l0);
    _mm256_store_ps(lut + 8, l1);
    dequant_block_scalar(p, j, len, lut, out);
  }
}

// ------------------------------------------------------------------ AVX-512 dequantize
// 32 codes of 16 packed bytes in element order, one per 16-bit lane: bytes widened to
// words hold (hi, lo) nibble pairs, which as bytes are already in element order.
QK_AVX512 inline __m512i unpack32_words(const uint8_t* p) {
  const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i pairs = _mm256_or_si256(_mm256_srli_epi16(w, 4),
                                        _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x0F)), 8));
  return _mm512_cvtepu8_epi16(pairs);
}

// 16-bit outputs of one block: one vpermw table lookup per 32 elements.
template <typename OutT>
QK_AVX512 void dequant_block_avx512_16(const uint8_t* p, int64_t len, __m256 c0, __m256 c1,
                                       float m, uint16_t* out) {
  const __m256i h = lut16<OutT>(c0, c1, m);
  const __m512i lut = _mm512_castsi256_si512(h);  // indices are < 16: the upper half is unused
  int64_t j = 0;
  for (; j + 32 <= len; j += 32)
    _mm512_storeu_si512(out + j, _mm512_permutexvar_epi16(unpack32_words(p + j / 2), lut));
  if (j < len) {
    alignas(32) uint16_t t[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), h);
    dequant_block_scalar(p, j, len, t, out);
  }
}

// float32 outputs of one block: two vpermps lookups per 32 elements.
QK_AVX512 void dequant_block_avx512_32(const uint8_t* p, int64_t len, __m256 c0, __m256 c1,
                                       float m, float* out) {
  const __m256 vm = _mm256_set1_ps(m);
  const __m512 lut = _mm512_castpd_ps(_mm512_insertf64x4(  // _mm512_insertf32x8 needs AVX512DQ
      _mm512_castps_pd(_mm512_castps256_ps512(_mm256_mul_ps(c0, vm))),
      _mm256_castps_pd(_mm256_mul_ps(c1, vm)), 1));
  int64_t j = 0;
  for (; j + 32 <= len; j += 32) {
    const __m512i idx = unpack32_words(p + j / 2);
    _mm512_storeu_ps(out + j, _mm512_permutexvar_ps(
                                  _mm512_cvtepu16_epi32(_mm512_castsi512_si256(idx)), lut));
    _mm512_storeu_ps(out + j + 16, _mm512_permutexvar_ps(
                                       _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(idx, 1)), lut));
  }
  if (j < len) {
    alignas(64) float t[16];
    _mm512_store_ps(t, lut);
    dequant_block_scalar(p, j, len, t, out);
  }
}

// ------------------------------------------------------------------ SIMD quantize
// One block: its absmax, then its codes 32 at a time, the rest in scalar code. One body for
// both widths (simd_width.h).
template <class S, typename T>
QK_ANY_WIDTH void quantize_block(const T* x, int64_t len, const Encoder4<S>& enc, int qt,
                                 float* absmax_out, uint8_t* out) {
  typename S::vf vmax = S::zero();
  typename S::mask nan = S::none();
  int64_t i = 0;
  for (; i + S::W <= len; i += S::W) {
    const typename S::vf v = S::load(x + i);
    vmax = S::max(vmax, S::abs(v));
    nan = S::either(nan, S::is_nan(v));
  }
  const float m = finish_absmax(x, i, len, S::reduce_max(vmax), S::any(nan), absmax_out);
  const typename S::vf inv = S::set1(qk::inverse_absmax_4bit(m));
  int64_t j = 0;
  for (; j + 32 <= len; j += 32) enc.encode32(x + j, inv, out + j / 2);
  encode_pairs_scalar(x, j, len, qt, qk::inverse_absmax_4bit(m), out);
}

template <class S, typename T>
QK_ANY_WIDTH void quantize_blocks(const T* x, int64_t n, int64_t bs, int qt, int64_t b0, int64_t b1,
                     uint8_t* packed, float* absmax) {
  const Encoder4<S> enc(qt);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs;
    quantize_block<S>(x + start, std::min(bs, n - start), enc, qt, absmax + b, packed + start / 2);
  }
}

template <typename T>
QK_AVX2_BODY void quantize_blocks_avx2(const T* x, int64_t n, int64_t bs, int qt, int64_t b0,
                                       int64_t b1, uint8_t* packed, float* absmax) {
  quantize_blocks<Avx2>(x, n, bs, qt, b0, b1, packed, absmax);
}
template <typename T>
QK_AVX512_BODY void quantize_blocks_avx512(const T* x, int64_t n, int64_t bs, int qt, int64_t b0,
                                           int64_t b1, uint8_t* packed, float* absmax) {
  quantize_blocks<Avx512>(x, n, bs, qt, b0, b1, packed, absmax);
}
#endif  // __x86_64__

template <typename T>
void quantize_4bit_impl(const T* x, int64_t n, int64_t bs, int qt, uint8_t* packed, float* absmax) {
  const int64_t nblocks = (n + bs - 1) / bs, isa = cpu_isa();
  const int64_t chunk = 16;  // blocks per task: amortizes the per-call setup
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < (nblocks + chunk - 1) / chunk; ++c) {
    const int64_t b0 = c * chunk, b1 = std::min(nblocks, b0 + chunk);
#if defined(__x86_64__)
    if (isa >= kIsaAvx512) {
      quantize_blocks_avx512(x, n, bs, qt, b0, b1, packed, absmax);
      continue;
    }
    if (isa >= kIsaAvx2) {
      quantize_blocks_avx2(x, n, bs, qt, b0, b1, packed, absmax);
      continue;
    }
#endif
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * bs;
      quantize_block_scalar(x + start, std::min(bs, n - start), qt, absmax + b, packed + start / 2);
    }
  }
}

// The value stored for k in the per-block table, bitwise as the output dtype.
template <typename OutT> struct Lut;
template <> struct Lut<float> {
  using bits = float;
  static float make(float v) { return v; }
};
template <> struct Lut<c10::BFloat16> {
  using bits = uint16_t;
  static uint16_t make(float v) { return c10::BFloat16(v).x; }
};
template <> struct Lut<c10::Half> {
  using bits = uint16_t;
  static uint16_t make(float v) { return c10::Half(v).x; }
};

// A 4-bit weight as the dequantize kernels read it; absmax is float32 (absmax) or
// double-quantized (qabsmax with its nested scales), decoded per block on the fly.
struct Packed4 {
  const uint8_t* packed;
  const float* absmax;
  const uint8_t* qabsmax;
  const float* nested_absmax;
  const float* nested_code;
  float offset;
  const float* code;
  int64_t n, bs;
};

// Block b of `w` (bs elements, the last one possibly partial): its bytes, length, absmax.
struct BlockView {
  const uint8_t* p;
  int64_t len;
  float m;
};
inline BlockView block_view(const Packed4& w, int64_t b) {
  const int64_t start = b * w.bs;
  // Fused double-quant decode: the block's absmax is rebuilt here, never stored.
  return {w.packed + start / 2, std::min(w.bs, w.n - start),
          block_absmax(w.absmax, w.qabsmax, w.nested_absmax, w.nested_code, w.offset, b)};
}

#if defined(__x86_64__)
template <typename OutT, typename Bits>
QK_AVX512 void dequant_blocks_avx512(const Packed4& w, int64_t b0, int64_t b1, Bits* out) {
  const __m256 c0 = _mm256_loadu_ps(w.code), c1 = _mm256_loadu_ps(w.code + 8);
  for (int64_t b = b0; b < b1; ++b, out += w.bs) {
    const BlockView v = block_view(w, b);
    if constexpr (sizeof(Bits) == 2) dequant_block_avx512_16<OutT>(v.p, v.len, c0, c1, v.m, out);
    else dequant_block_avx512_32(v.p, v.len, c0, c1, v.m, out);
  }
}

template <typename OutT, typename Bits>
QK_AVX2 void dequant_blocks_avx2(const Packed4& w, int64_t b0, int64_t b1, Bits* out) {
  const __m256 c0 = _mm256_loadu_ps(w.code), c1 = _mm256_loadu_ps(w.code + 8);
  for (int64_t b = b0; b < b1; ++b, out += w.bs) {
    const BlockView v = block_view(w, b);
    if constexpr (sizeof(Bits) == 2) dequant_block_avx2_16<OutT>(v.p, v.len, c0, c1, v.m, out);
    else dequant_block_avx2_32(v.p, v.len, c0, c1, v.m, out);
  }
}
#endif

// Dequantizes blocks [b0, b1) of `w` to out[(b - b0) * bs ...] on the path `isa`.
template <typename OutT>
void dequant_blocks(const Packed4& w, int64_t b0, int64_t b1, int64_t isa,
                    typename Lut<OutT>::bits* out) {
  using Bits = typename Lut<OutT>::bits;
#if defined(__x86_64__)
  if (isa >= kIsaAvx512) return dequant_blocks_avx512<OutT, Bits>(w, b0, b1, out);
  if (isa >= kIsaAvx2) return dequant_blocks_avx2<OutT, Bits>(w, b0, b1, out);
#endif
  for (int64_t b = b0; b < b1; ++b, out += w.bs) {
    const BlockView v = block_view(w, b);
    Bits lut[16];
    for (int k = 0; k < 16; ++k) lut[k] = Lut<OutT>::make(w.code[k] * v.m);
    dequant_block_scalar(v.p, 0, v.len, lut, out);
  }
}

template <typename OutT>
void dequantize_4bit_impl(const Packed4& w, OutT* out_t) {
  using Bits = typename Lut<OutT>::bits;
  Bits* out = reinterpret_cast<Bits*>(out_t);
  const int64_t nblocks = (w.n + w.bs - 1) / w.bs, isa = cpu_isa();
  const int64_t chunk = 16;  // blocks per call: amortizes the per-call dispatch
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < (nblocks + chunk - 1) / chunk; ++c)
    dequant_blocks<OutT>(w, c * chunk, std::min(nblocks, (c + 1) * chunk), isa, out + c * chunk * w.bs);
}

// Columns [col0, col0 + cols) of every row of the (rows, row_len) weight into out
// (rows, cols); whole blocks only: row_len and col0 are multiples of bs (checked by caller).
template <typename OutT>
void dequantize_4bit_cols_impl(const Packed4& w, int64_t rows, int64_t row_len, int64_t col0,
                               int64_t cols, OutT* out_t) {
  using Bits = typename Lut<OutT>::bits;
  Bits* out = reinterpret_cast<Bits*>(out_t);
  const int64_t isa = cpu_isa();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b0 = (r * row_len + col0) / w.bs;
    dequant_blocks<OutT>(w, b0, b0 + (cols + w.bs - 1) / w.bs, isa, out + r * cols);
  }
}

// ------------------------------------------------------------------ op entry points
std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& A, int64_t blocksize,
                                                     c10::string_view quant_type) {
  check_float_input(A, "quantize_4bit");
  check_blocksize(blocksize);
  const int qt = parse_quant_type(quant_type);
  const at::Tensor x = A.contiguous();
  const int64_t n = x.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, x.options().dtype(at::kFloat));
  dispatch_float(x.scalar_type(), "quantize_4bit", [&](auto tag) {
    using scalar_t = decltype(tag);
    quantize_4bit_impl<scalar_t>(x.data_ptr<scalar_t>(), n, blocksize, qt,
                                 packed.data_ptr<uint8_t>(), absmax.data_ptr<float>());
  });
  return {packed, absmax};
}

void check_dequant_args(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                        int64_t blocksize, int64_t numel, at::ScalarType dtype,
                        const std::optional<at::Tensor>& nested_absmax,
                        const std::optional<at::Tensor>& nested_code) {
  qk_checks::check_4bit_weight("dequantize_4bit", packed, absmax, code, blocksize, numel,
                               nested_absmax, nested_code);
  TORCH_CHECK(qk_checks::is_float_dtype(dtype),
              "dequantize_4bit: dtype must be float32, float16 or bfloat16, got ", dtype);
}

// Calls f(Packed4) with the contiguous tensors' pointers (kept alive for the call).
template <typename F>
void with_packed4(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                  int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                  const std::optional<at::Tensor>& nested_code, double offset, F&& f) {
  const at::Tensor p = packed.contiguous(), am = absmax.contiguous(), c = code.contiguous();
  const bool nested = nested_absmax.has_value();
  at::Tensor na = nested ? nested_absmax->contiguous() : at::Tensor();
  at::Tensor nc = nested ? nested_code->contiguous() : at::Tensor();
  const Packed4 w{p.data_ptr<uint8_t>(),
                  nested ? nullptr : am.data_ptr<float>(),
                  nested ? am.data_ptr<uint8_t>() : nullptr,
                  nested ? na.data_ptr<float>() : nullptr,
                  nested ? nc.data_ptr<float>() : nullptr,
                  static_cast<float>(offset), c.data_ptr<float>(), p.numel() * 2, blocksize};
  f(w);
}

void dequantize_4bit_out_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                             const at::Tensor& code, int64_t blocksize,
                             const std::optional<at::Tensor>& nested_absmax,
                             const std::optional<at::Tensor>& nested_code, double offset,
                             at::Tensor& out) {
  const int64_t numel = out.numel();
  check_dequant_args(packed, absmax, code, blocksize, numel, out.scalar_type(), nested_absmax,
                     nested_code);
  TORCH_CHECK(out.is_contiguous(), "dequantize_4bit: out must be contiguous");
  with_packed4(packed, absmax, code, blocksize, nested_absmax, nested_code, offset, [&](Packed4 w) {
    w.n = numel;
    dispatch_float(out.scalar_type(), "dequantize_4bit", [&](auto tag) {
      using scalar_t = decltype(tag);
      dequantize_4bit_impl<scalar_t>(w, out.data_ptr<scalar_t>());
    });
  });
}

void dequantize_4bit_cols_out_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                                  const at::Tensor& code, int64_t blocksize,
                                  const std::optional<at::Tensor>& nested_absmax,
                                  const std::optional<at::Tensor>& nested_code, double offset,
                                  int64_t row_len, int64_t col0, at::Tensor& out) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(),
              "dequantize_4bit_cols_out: out must be a contiguous (rows, cols) tensor");
  const int64_t rows = out.size(0), cols = out.size(1);
  check_dequant_args(packed, absmax, code, blocksize, rows * row_len, out.scalar_type(),
                     nested_absmax, nested_code);
  TORCH_CHECK(row_len % blocksize == 0 && col0 % blocksize == 0 && cols % blocksize == 0,
              "dequantize_4bit_cols_out: row_len (", row_len, "), col0 (", col0, ") and cols (",
              cols, ") must be multiples of blocksize ", blocksize);
  TORCH_CHECK(col0 >= 0 && col0 + cols <= row_len, "dequantize_4bit_cols_out: columns [", col0,
              ", ", col0 + cols, ") are not inside a row of ", row_len);
  with_packed4(packed, absmax, code, blocksize, nested_absmax, nested_code, offset, [&](Packed4 w) {
    w.n = rows * row_len;
    dispatch_float(out.scalar_type(), "dequantize_4bit_cols_out", [&](auto tag) {
      using scalar_t = decltype(tag);
      dequantize_4bit_cols_impl<scalar_t>(w, rows, row_len, col0, cols, out.data_ptr<scalar_t>());
    });
  });
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                               const at::Tensor& code, int64_t blocksize, int64_t numel,
                               at::ScalarType dtype, const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, double offset) {
  TORCH_CHECK(numel >= 0, "dequantize_4bit: numel must be >= 0, got ", numel);
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  dequantize_4bit_out_cpu(packed, absmax, code, blocksize, nested_absmax, nested_code, offset, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_8bit_cpu(const at::Tensor& A, const at::Tensor& code,
                                                     int64_t blocksize) {
  check_float_input(A, "quantize_8bit");
  TORCH_CHECK(blocksize > 0, "quantize_8bit: blocksize must be positive, got ", blocksize);
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 256,
              "quantize_8bit: code must be a float32 tensor of 256 sorted values");
  const at::Tensor x = A.contiguous().to(at::kFloat);
  const at::Tensor c = code.contiguous();
  const int64_t n = x.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  at::Tensor q = at::empty({n}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  const std::shared_ptr<const Encoder8> enc = Encoder8::get(cp);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * blocksize, end = std::min(n, start + blocksize);
    float m = 0.0f;
    bool nan = false;
    for (int64_t i = start; i < end; ++i) {
      m = std::max(m, std::fabs(xp[i]));
      nan |= xp[i] != xp[i];
    }
    if (nan) m = NAN;
    ap[b] = m;
    enc->encode_scaled(xp + start, qk::inverse_absmax(m), end - start, qp + start);
  }
  return {q, absmax};
}

at::Tensor dequantize_8bit_cpu(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                               int64_t blocksize, at::ScalarType dtype) {
  TORCH_CHECK(q.scalar_type() == at::kByte, "dequantize_8bit: q must be uint8, got ", q.scalar_type());
  TORCH_CHECK(blocksize > 0, "dequantize_8bit: blocksize must be positive, got ", blocksize);
  const int64_t n = q.numel();
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.numel() == (n + blocksize - 1) / blocksize,
              "dequantize_8bit: absmax must be float32 with ceil(numel / blocksize) entries");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 256,
              "dequantize_8bit: code must be a float32 tensor of 256 values");
  const at::Tensor qc = q.contiguous(), ac = absmax.contiguous(), cc = code.contiguous();
  at::Tensor out = at::empty({n}, q.options().dtype(at::kFloat));
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const float* ap = ac.data_ptr<float>();
  const float* cp = cc.data_ptr<float>();
  float* op = out.data_ptr<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) op[i] = cp[qp[i]] * ap[i / blocksize];
  return dtype == at::kFloat ? out : out.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_kernels, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
  m.impl("dequantize_4bit_out", &dequantize_4bit_out_cpu);
  m.impl("dequantize_4bit_cols_out", &dequantize_4bit_cols_out_cpu);
  m.impl("quantize_8bit", &quantize_8bit_cpu);
  m.impl("dequantize_8bit", &dequantize_8bit_cpu);
}

}  // namespace qlora_kernels::cpu
