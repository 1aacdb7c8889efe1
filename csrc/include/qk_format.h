// qk_format.h — the 4-bit / 8-bit blockwise format, written once.
//
// Every backend that touches packed weights includes this header: the CPU kernels
// (csrc/cpu), the torch-free CUDA kernels (csrc/cuda) and, through the op
// `qlora_kernels::format_table`, the Python tests that check it against
// qlora_kernels/formats.py. Nothing here depends on torch.
//
// Format (see shared/FORMAT.md):
//   * one float32 absmax per `blocksize` consecutive elements of the flat tensor;
//   * s = (float)x * (1.0f / absmax) is encoded by strict `s > t` comparisons against
//     thresholds between neighbouring code values (NF4/FP4: bitsandbytes' literals), a
//     value equal to a threshold taking the lower index;
//   * two codes per byte, element 2j in the high nibble, 2j+1 in the low nibble;
//   * decode: out = code[q] * absmax in float32, rounded once to the output dtype;
//   * double quantization: absmax[i] = code8[q8[i]] * scale2[i / 256] + offset,
//     computed as a rounded multiply followed by a rounded add (never an FMA), so
//     that fused and unfused decoders agree bit for bit.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define QK_HD __host__ __device__ __forceinline__
#define QK_UNROLL _Pragma("unroll")
#else
#define QK_HD inline
#define QK_UNROLL  // host compilers unroll on their own; g++ warns on the CUDA pragma
#endif

namespace qk {

enum QuantType : int { kNF4 = 0, kFP4 = 1, kINT4 = 2 };

constexpr int kNestedBlocksize = 256;  // blocks of absmax values in double quantization

// --- the 16-entry code tables, index order (FP4 in bit-pattern order) ---------------
#define QK_NF4_VALUES                                                                  \
  -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,            \
      -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,       \
      0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,                \
      0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,                 \
      0.7229568362236023f, 1.0f
// NF4 thresholds: bitsandbytes' decimal literals (dQuantizeNF4 in its csrc/kernels.cu;
// shared/FORMAT.md), so that the packed bytes equal the ones its CUDA kernel writes. They
// are decimal midpoints, a few an ulp or more off the float32 nearest the exact midpoint;
// `s > t` with ties to the lower index. formats.py holds the same numbers and
// tests/test_formats.py checks they agree.
#define QK_NF4_THRESHOLDS                                                              \
  -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f,                    \
      -0.33967943489551544f, -0.23460740596055984f, -0.13791173323988914f,             \
      -0.045525018125772476f, 0.03979014977812767f, 0.1202552504837513f,               \
      0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,                   \
      0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f
// FP4 E2M1 as bitsandbytes orders it: [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12, then negated
#define QK_FP4_VALUES                                                                  \
  0.0f, 0.0052083334885537624f, 0.6666666865348816f, 1.0f, 0.3333333432674408f, 0.5f,  \
      0.1666666716337204f, 0.25f, -0.0f, -0.0052083334885537624f,                      \
      -0.6666666865348816f, -1.0f, -0.3333333432674408f, -0.5f,                        \
      -0.1666666716337204f, -0.25f
// thresholds of the sorted FP4 magnitudes (0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1):
// bitsandbytes' dQuantizeFP4 literals; its decision tree equals counting them.
#define QK_FP4_MAG_THRESHOLDS                                                          \
  0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f, 0.8333333f
// symmetric absmax int4: index i holds (i - 8) / 7; index 0 (-8/7) is never produced
#define QK_INT4_VALUES                                                                 \
  -1.1428571939468384f, -1.0f, -0.8571428656578064f, -0.7142857313156128f,             \
      -0.5714285969734192f, -0.4285714328289032f, -0.2857142984867096f,                \
      -0.1428571492433548f, 0.0f, 0.1428571492433548f, 0.2857142984867096f,            \
      0.4285714328289032f, 0.5714285969734192f, 0.7142857313156128f,                   \
      0.8571428656578064f, 1.0f
// INT4 (ours): the largest float32 not above each exact midpoint (hex literals), so
// counting gives the nearest index with ties to the lower one.
#define QK_INT4_THRESHOLDS                                                             \
  -0x1.124926p+0f, -0x1.db6db8p-1f, -0x1.924926p-1f, -0x1.492494p-1f, -0x1.000002p-1f,     \
      -0x1.6db6dcp-2f, -0x1.b6db7p-3f, -0x1.24924ap-4f, 0x1.24924ap-4f, 0x1.b6db6ep-3f,    \
      0x1.6db6dcp-2f, 0x1p-1f, 0x1.492492p-1f, 0x1.924924p-1f, 0x1.db6db6p-1f

// Host-side copies for the CPU SIMD paths and the table-export op. Device code uses the
// encode functions below, whose local tables the compiler folds into immediates.
#if !defined(__CUDA_ARCH__)
static constexpr float kNF4Values[16] = {QK_NF4_VALUES};
static constexpr float kNF4Thresholds[15] = {QK_NF4_THRESHOLDS};
static constexpr float kFP4Values[16] = {QK_FP4_VALUES};
static constexpr float kFP4MagThresholds[7] = {QK_FP4_MAG_THRESHOLDS};
static constexpr float kINT4Values[16] = {QK_INT4_VALUES};
static constexpr float kINT4Thresholds[15] = {QK_INT4_THRESHOLDS};
#endif

// --- encode -------------------------------------------------------------------------
// Counting the thresholds strictly below s gives the nearest index with ties to the
// lower one; NaN compares false everywhere and maps to 0 (callers reject NaN input).
QK_HD int encode_nf4(float s) {
  const float t[15] = {QK_NF4_THRESHOLDS};
  int q = 0;
QK_UNROLL
  for (int k = 0; k < 15; ++k) q += (s > t[k]) ? 1 : 0;
  return q;
}

QK_HD int encode_int4(float s) {
  const float t[15] = {QK_INT4_THRESHOLDS};
  int q = 0;
QK_UNROLL
  for (int k = 0; k < 15; ++k) q += (s > t[k]) ? 1 : 0;
  return q;
}

// Sorted-magnitude rank r (0..7) -> FP4 bit pattern: 0,1,6,7,4,5,2,3.
QK_HD int fp4_rank_to_pattern(int r) { return r ^ ((r & 2) << 1); }

QK_HD int encode_fp4(float s) {
  const float t[7] = {QK_FP4_MAG_THRESHOLDS};
  const float a = s < 0.0f ? -s : s;
  int r = 0;
QK_UNROLL
  for (int k = 0; k < 7; ++k) r += (a > t[k]) ? 1 : 0;
  return fp4_rank_to_pattern(r) | (s < 0.0f ? 8 : 0);
}

QK_HD int encode_4bit(int quant_type, float s) {
  return quant_type == kNF4 ? encode_nf4(s) : quant_type == kFP4 ? encode_fp4(s) : encode_int4(s);
}

// Nearest entry of a sorted 256-entry table (ties to the lower index): the number of
// midpoints 0.5f * (code[k] + code[k+1]) strictly below s, found by binary search.
QK_HD int encode_sorted256(const float* code, float s) {
  int lo = 0;
QK_UNROLL
  for (int step = 128; step >= 1; step >>= 1) {
    const int idx = lo + step;
    if (idx <= 255) {
      const float mid = 0.5f * (code[idx - 1] + code[idx]);
      if (s > mid) lo = idx;
    }
  }
  return lo;
}

// 1 / absmax, with an all-zero block mapping every value to code 0.0 (the 8-bit paths).
QK_HD float inverse_absmax(float absmax) { return absmax > 0.0f ? 1.0f / absmax : 0.0f; }

// The 4-bit encoder's scale, exactly bitsandbytes' kQuantizeBlockwise: 1.0f / absmax with no
// guard, so an all-zero block gives 0 * inf = NaN and every code (pad included) compares
// false everywhere: code 0 for NF4, FP4 and INT4.
QK_HD float inverse_absmax_4bit(float absmax) { return 1.0f / absmax; }

// Code of the element past an odd numel: bitsandbytes loads it as 0.0 and encodes it with
// the block's scale (the code of 0.0, or code 0 in an all-zero block).
QK_HD int pad_code_4bit(int quant_type, float inv) { return encode_4bit(quant_type, 0.0f * inv); }

// --- decode -------------------------------------------------------------------------
// Host code relies on -ffp-contract=off (setup.py) to keep a*b+c unfused; the bit-exact
// fused-vs-unfused tests fail if a build ever contracts it.
QK_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

QK_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Decode one double-quantized absmax; the exact expression every backend must use.
QK_HD float decode_nested_absmax(const uint8_t* qabsmax, const float* nested_code,
                                 const float* nested_absmax, float offset, int64_t block) {
  return add_rn(mul_rn(nested_code[qabsmax[block]], nested_absmax[block / kNestedBlocksize]),
                offset);
}

QK_HD uint8_t pack_pair(int hi, int lo) { return (uint8_t)((hi << 4) | (lo & 0xF)); }
QK_HD int unpack_hi(uint8_t b) { return b >> 4; }
QK_HD int unpack_lo(uint8_t b) { return b & 0xF; }

QK_HD bool is_supported_blocksize(int64_t b) {
  return b >= 32 && b <= 4096 && (b & (b - 1)) == 0;
}

}  // namespace qk
