// CPU fused 4-bit GEMV: y[M, N] = x[M, K] @ W^T (+ bias), W (N, K) packed 4-bit row-major.
//
// Streams the packed weight once (OpenMP over output rows n), decodes the (double-
// quantized) absmax of each block on the fly and accumulates in float32. Two AVX2 paths for
// K a multiple of the blocksize; other shapes take a scalar path with the same arithmetic.
//  * exact (float32 / float16 x): decodes 32 codes per 16 packed bytes with four pshufb
//    lookups into the byte planes of the float32 code table, then a 4x4 byte transpose.
//  * bf16 (bfloat16 x, blocksize a multiple of 64, |code| < 2): block fixed point. The
//    code table as int16 and each 64-group of x as int16 with a power-of-two scale (exact
//    for every element within 2^5 of the group's max |x|, see below); 64 codes per 32
//    packed bytes take two pshufb lookups and one byte unpack per 16 weights, and vpmaddwd
//    multiplies and adds pairs exactly. About 2/3 of the instructions of a bf16-table float
//    decode and half of the exact path's, which is what bounds this GEMV on the CPU: one
//    core streams ~14 GB/s but decodes more slowly than that.
// Both produce the weights in a fixed lane-interleaved order; x is permuted once into that
// order so no shuffle is needed per weight. On CPUs with AVX-512F/BW (path avx512 and up,
// cpu_isa.h) the exact path runs 512 bits wide (blocksize a multiple of 64): the same body
// (one template over the width, simd_width.h), 64 codes from 32 packed bytes. The bf16 path stays
// 256 bits wide: its 512-bit form measured 3-7% slower on Zen 4, which splits 512-bit
// operations into two 256-bit halves (benchmarks/README.md). Per block,
// sum(code[q] * x) is scaled by the block's absmax; the bias is added in float32 before
// the one rounding to x's dtype.
#include <omp.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "cpu_common.h"
#include "simd_width.h"

namespace qlora_kernels::cpu {
namespace {

struct GemvArgs {
  const float* x;  // [M, K] float32 (permuted per 32-group on the fast path)
  const uint8_t* packed;
  const float* absmax;
  const uint8_t* qabsmax;
  const float* nested_absmax;
  const float* nested_code;
  float offset;
  const float* code;
  int64_t M, N, K, bs;
  const float* bias;  // [N] float32 or null
  float* y;           // [M, N]
};

inline float bias_at(const GemvArgs& a, int64_t n) { return a.bias ? a.bias[n] : 0.0f; }

void gemv_scalar(const GemvArgs& a) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < a.N; ++n) {
    for (int64_t m = 0; m < a.M; ++m) {
      float acc = 0.0f;
      const float* xr = a.x + m * a.K;
      for (int64_t k = 0; k < a.K; ++k) {
        const int64_t i = n * a.K + k;
        const uint8_t byte = a.packed[i / 2];
        const int q = (i & 1) ? qk::unpack_lo(byte) : qk::unpack_hi(byte);
        const float w = a.code[q] * block_absmax(a.absmax, a.qabsmax, a.nested_absmax,
                                                 a.nested_code, a.offset, i / a.bs);
        acc += w * xr[k];
      }
      a.y[m * a.N + n] = acc + bias_at(a, n);
    }
  }
}

#if defined(__x86_64__)
// ---- exact path, one body for both widths (simd_width.h): 4 * S::W codes from 2 * S::W
// packed bytes per group. Four pshufb lookups into the byte planes of the code table (byte k
// of each of the 16 float32 code values), then a 4x4 byte transpose, give floats in a fixed
// order: vector t, 128-bit lane L, float u is byte lane i = 16L + 4t + u of the index vector,
// whose first 2W lanes are the high nibbles (elements 2i), the others the low nibbles
// (elements 2(i - 2W) + 1).
template <class S>
constexpr int64_t kExactGroup = 4 * S::W;

template <class S>
int64_t exact_position(int64_t e) {  // where element e of a group is in that order
  const int64_t i = (e & 1) ? e / 2 + 2 * S::W : e / 2;
  return S::W * ((i % 16) / 4) + 4 * (i / 16) + i % 4;
}

struct CodePlanes {
  alignas(16) uint8_t byte[4][16];

  explicit CodePlanes(const float* code) {
    for (int v = 0; v < 16; ++v) {
      uint32_t u;
      std::memcpy(&u, code + v, 4);
      for (int k = 0; k < 4; ++k) byte[k][v] = (u >> (8 * k)) & 0xFF;
    }
  }
};

template <class S>
QK_ANY_WIDTH void decode_group(const uint8_t* q, const typename S::vi planes[4],
                               typename S::vf f[4]) {
  const typename S::vi idx = S::nibbles(q);
  const typename S::vi b0 = S::shuffle_bytes(planes[0], idx), b1 = S::shuffle_bytes(planes[1], idx);
  const typename S::vi b2 = S::shuffle_bytes(planes[2], idx), b3 = S::shuffle_bytes(planes[3], idx);
  const typename S::vi u01l = S::unpacklo8(b0, b1), u01h = S::unpackhi8(b0, b1);
  const typename S::vi u23l = S::unpacklo8(b2, b3), u23h = S::unpackhi8(b2, b3);
  f[0] = S::floats(S::unpacklo16(u01l, u23l));
  f[1] = S::floats(S::unpackhi16(u01l, u23l));
  f[2] = S::floats(S::unpacklo16(u01h, u23h));
  f[3] = S::floats(S::unpackhi16(u01h, u23h));
}

// MR rows of x against one weight row; 4 accumulators per row hide the FMA latency.
template <class S, int MR>
QK_ANY_WIDTH void gemv_tile(const GemvArgs& a, const CodePlanes& c, int64_t n, int64_t m0) {
  using vf = typename S::vf;
  typename S::vi planes[4];
  for (int k = 0; k < 4; ++k) planes[k] = S::broadcast16(c.byte[k]);
  const int64_t nb = a.K / a.bs, groups = a.bs / kExactGroup<S>;
  const uint8_t* wrow = a.packed + n * a.K / 2;
  vf total[MR];
  for (int r = 0; r < MR; ++r) total[r] = S::zero();
  for (int64_t j = 0; j < nb; ++j) {
    vf acc[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int t = 0; t < 4; ++t) acc[r][t] = S::zero();
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = j * a.bs + g * kExactGroup<S>;
      vf f[4];
      decode_group<S>(wrow + k0 / 2, planes, f);
      for (int r = 0; r < MR; ++r) {
        const float* xr = a.x + (m0 + r) * a.K + k0;
        for (int t = 0; t < 4; ++t) acc[r][t] = S::fmadd(f[t], S::load(xr + S::W * t), acc[r][t]);
      }
    }
    const vf scale = S::set1(block_absmax(a.absmax, a.qabsmax, a.nested_absmax, a.nested_code,
                                          a.offset, n * nb + j));
    for (int r = 0; r < MR; ++r) {
      const vf s = S::add(S::add(acc[r][0], acc[r][1]), S::add(acc[r][2], acc[r][3]));
      total[r] = S::fmadd(s, scale, total[r]);
    }
  }
  for (int r = 0; r < MR; ++r) a.y[(m0 + r) * a.N + n] = S::reduce_add(total[r]) + bias_at(a, n);
}

// One function per width and tile: both tiles in one function made gcc keep half of the
// 512-bit accumulators on the stack (12% slower at 4 and 16 rows).
template <int MR>
QK_AVX2_BODY void gemv_tile_avx2(const GemvArgs& a, const CodePlanes& c, int64_t n, int64_t m0) {
  gemv_tile<Avx2, MR>(a, c, n, m0);
}
template <int MR>
QK_AVX512_BODY void gemv_tile_avx512(const GemvArgs& a, const CodePlanes& c, int64_t n,
                                     int64_t m0) {
  gemv_tile<Avx512, MR>(a, c, n, m0);
}

using GemvTile = void (*)(const GemvArgs&, const CodePlanes&, int64_t n, int64_t m0);

// The exact GEMV on x permuted per group into the order of exact_position<S>, with the
// tiles of S: rows of x two at a time, then one.
void gemv_exact(const GemvArgs& a, GemvTile two_rows, GemvTile one_row) {
  const CodePlanes c(a.code);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < a.N; ++n) {
    int64_t m = 0;
    for (; m + 2 <= a.M; m += 2) two_rows(a, c, n, m);
    if (m < a.M) one_row(a, c, n, m);
  }
}

// ---- bf16 path: block fixed point, 64 codes per 32 packed bytes.
// The code table becomes int16 (value * 2^14, |code| < 2, error <= 2^-15) and each group of
// 64 elements of x becomes int16 with a power-of-two scale 2^(e-13), e the exponent of the
// group's largest |x|. A bf16 x has 8 significant bits, so every element within 2^5 of its
// group's max is represented exactly; smaller ones are rounded by at most 2^-13 of the max,
// far below the bf16 rounding of the output. vpmaddwd multiplies and adds pairs exactly in
// int32 (per lane and group 8 products of at most 32767 * 8192 < 2^28: no overflow); each
// group's sum is converted to float32 and scaled by absmax * 2^(e-13) * 2^-14 into the
// float32 total.
// decode64_int16 yields vector v = 2*I + U, lane L, word w (position 8L + w) from packed byte
// 16L + 8U + w: I = 0 takes the low nibbles (odd elements), I = 1 the high ones (even).
constexpr int kCodeBits = 14, kXBits = 13;

inline int64_t int16_permuted_position(int64_t e) {
  const int64_t byte = e / 2, I = (e & 1) ? 0 : 1;
  const int64_t L = byte / 16, U = (byte % 16) / 8, w = byte % 8;
  return (2 * I + U) * 16 + 8 * L + w;
}

struct Int16Planes {
  __m256i lo, hi;  // low and high byte of the 16 int16 code values, both lanes
};

QK_AVX2 inline Int16Planes make_int16_planes(const float* code) {
  alignas(16) uint8_t lo[16], hi[16];
  for (int v = 0; v < 16; ++v) {
    const auto i16 = static_cast<int16_t>(std::lrint(std::ldexp(code[v], kCodeBits)));
    const auto q = static_cast<uint16_t>(i16);
    lo[v] = q & 0xFF;
    hi[v] = q >> 8;
  }
  return {_mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(lo))),
          _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(hi)))};
}

QK_AVX2 inline void decode64_int16(const uint8_t* p, const Int16Planes& c, __m256i w[4]) {
  const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i idx[2] = {_mm256_and_si256(y, m4), _mm256_and_si256(_mm256_srli_epi16(y, 4), m4)};
  for (int i = 0; i < 2; ++i) {
    const __m256i bl = _mm256_shuffle_epi8(c.lo, idx[i]), bh = _mm256_shuffle_epi8(c.hi, idx[i]);
    w[2 * i] = _mm256_unpacklo_epi8(bl, bh);
    w[2 * i + 1] = _mm256_unpackhi_epi8(bl, bh);
  }
}

struct FixedX {
  const int16_t* q;    // [M, K] permuted per 64-group
  const float* scale;  // [M, K / 64]: 2^(e-13) * 2^-14
};

// MR rows of x against one weight row; the decoded weights are reused across the rows.
// One loop over the row's 64-groups (a block spans bs / 64 of them, a power of two).
template <int MR>
QK_AVX2 void gemv_row_int16(const GemvArgs& a, const FixedX& fx, const Int16Planes& c, int64_t n,
                            int64_t m0) {
  const uint64_t ng = a.K / 64, nb = a.K / a.bs;
  const int shift = __builtin_ctzll(static_cast<uint64_t>(a.bs / 64));
  const uint64_t first = static_cast<uint64_t>(n) * nb;
  const uint8_t* wrow = a.packed + n * a.K / 2;
  const float* xs[MR];
  const int16_t* xq[MR];
  __m256 total[MR];
  for (int r = 0; r < MR; ++r) {
    total[r] = _mm256_setzero_ps();
    xs[r] = fx.scale + (m0 + r) * ng;
    xq[r] = fx.q + (m0 + r) * a.K;
  }
  float am = 0.0f;
  for (uint64_t g = 0; g < ng; ++g) {
    if ((g & ((1u << shift) - 1)) == 0)
      am = block_absmax(a.absmax, a.qabsmax, a.nested_absmax, a.nested_code, a.offset,
                        static_cast<int64_t>(first + (g >> shift)));
    __m256i w[4];
    decode64_int16(wrow + 32 * g, c, w);
    for (int r = 0; r < MR; ++r) {
      const __m256i* xr = reinterpret_cast<const __m256i*>(xq[r] + 64 * g);
      const __m256i s0 = _mm256_add_epi32(_mm256_madd_epi16(w[0], _mm256_loadu_si256(xr)),
                                          _mm256_madd_epi16(w[2], _mm256_loadu_si256(xr + 2)));
      const __m256i s1 = _mm256_add_epi32(_mm256_madd_epi16(w[1], _mm256_loadu_si256(xr + 1)),
                                          _mm256_madd_epi16(w[3], _mm256_loadu_si256(xr + 3)));
      total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1)),
                                 _mm256_set1_ps(am * xs[r][g]), total[r]);
    }
  }
  for (int r = 0; r < MR; ++r) a.y[(m0 + r) * a.N + n] = Avx2::reduce_add(total[r]) + bias_at(a, n);
}

QK_AVX2 void gemv_int16_avx2(const GemvArgs& a, const FixedX& fx) {
  const Int16Planes c = make_int16_planes(a.code);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < a.N; ++n) {
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) gemv_row_int16<4>(a, fx, c, n, m);
    for (; m + 2 <= a.M; m += 2) gemv_row_int16<2>(a, fx, c, n, m);
    if (m < a.M) gemv_row_int16<1>(a, fx, c, n, m);
  }
}

// Converts bf16 x [M, K] to the fixed-point form above. Returns false (nothing usable) when a
// group holds a non-finite value or is so small that its scale would underflow: the caller
// then takes the float path, which propagates NaN/Inf like the reference.
inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

QK_AVX2 bool to_fixed_x(const at::Tensor& x, int16_t* q, float* scale) {
  const int64_t M = x.size(0), K = x.size(1), ng = K / 64;
  const c10::BFloat16* src = x.data_ptr<c10::BFloat16>();
  for (int64_t r = 0; r < M; ++r)
    for (int64_t g = 0; g < ng; ++g) {
      const c10::BFloat16* xg = src + r * K + g * 64;
      float mx = 0.0f;
      bool finite = true;
      for (int i = 0; i < 64; ++i) {
        const float v = std::fabs(static_cast<float>(xg[i]));
        finite = finite && std::isfinite(v);
        mx = std::max(mx, v);
      }
      if (!finite || (mx > 0.0f && mx < 0x1p-100f)) return false;
      int e = 0;
      std::frexp(mx, &e);  // mx < 2^e, so |x| * 2^(13-e) < 2^13; e in [-100, 128]
      // 2^(13-e) and 2^(e-27) built from their bits: exact, and no libm call per element
      const float up = bits_to_float(static_cast<uint32_t>(127 + kXBits - e) << 23);
      for (int i = 0; i < 64; ++i)  // round to nearest even (the default MXCSR mode)
        q[r * K + g * 64 + int16_permuted_position(i)] = static_cast<int16_t>(
            _mm_cvtss_si32(_mm_set_ss(static_cast<float>(xg[i]) * up)));
      scale[r * ng + g] = bits_to_float(static_cast<uint32_t>(127 + e - kXBits - kCodeBits) << 23);
    }
  return true;
}
#endif

at::Tensor gemv_4bit_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                         const at::Tensor& code, int64_t blocksize, int64_t out_features,
                         const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& nested_code, double offset,
                         const std::optional<at::Tensor>& bias) {
  check_float_input(x, "gemv_4bit");
  TORCH_CHECK(x.dim() == 2, "gemv_4bit: x must be 2-D [M, K], got ", x.dim(), " dims");
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  TORCH_CHECK(N > 0 && K > 0, "gemv_4bit: empty weight (N=", N, ", K=", K, ")");
  qk_checks::check_4bit_weight("gemv_4bit", packed, absmax, code, blocksize, N * K,
                               nested_absmax, nested_code);
  const bool nested = nested_absmax.has_value();

  if (bias.has_value())
    TORCH_CHECK(bias->is_floating_point() && bias->numel() == N && bias->dim() == 1 &&
                    bias->device() == x.device(),
                "gemv_4bit: bias must be a 1-D float tensor of out_features = ", N,
                " values on x's device, got shape ", bias->sizes(), " ", bias->scalar_type(),
                " on ", bias->device());
  at::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();

  const at::Tensor p = packed.contiguous(), am = absmax.contiguous(), c = code.contiguous();
  at::Tensor na = nested ? nested_absmax->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor nc = nested ? nested_code->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  GemvArgs a{nullptr, p.data_ptr<uint8_t>(), nested ? nullptr : am.data_ptr<float>(),
             nested ? am.data_ptr<uint8_t>() : nullptr, nested ? na.data_ptr<float>() : nullptr,
             nested ? nc.data_ptr<float>() : nullptr, static_cast<float>(offset),
             c.data_ptr<float>(), M, N, K, blocksize,
             bias.has_value() ? bf.data_ptr<float>() : nullptr, y.data_ptr<float>()};
#if defined(__x86_64__)
  float cmax = 0.0f;  // the codes must fit int16 at 2^14 (NF4/FP4: 1, INT4: 8/7)
  for (int v = 0; v < 16; ++v) cmax = std::max(cmax, std::fabs(c.data_ptr<float>()[v]));
  if (has_avx2() && K % blocksize == 0 && x.scalar_type() == at::kBFloat16 &&
      blocksize % 64 == 0 && cmax < 1.999f) {
    const at::Tensor xc = x.contiguous();
    at::Tensor q = at::empty({M, K}, x.options().dtype(at::kShort));
    at::Tensor sc = at::empty({M, K / 64}, x.options().dtype(at::kFloat));
    if (to_fixed_x(xc, q.data_ptr<int16_t>(), sc.data_ptr<float>())) {
      gemv_int16_avx2(a, FixedX{q.data_ptr<int16_t>(), sc.data_ptr<float>()});
      return y.to(x.scalar_type());
    }
  }
#endif
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  a.x = xf.data_ptr<float>();
#if defined(__x86_64__)
  if (has_avx2() && K % blocksize == 0) {
    // permute x once into the order the decoder produces per group
    const bool wide = cpu_isa() >= kIsaAvx512 && blocksize % kExactGroup<Avx512> == 0;
    const int64_t group = wide ? kExactGroup<Avx512> : kExactGroup<Avx2>;
    at::Tensor xp = at::empty_like(xf);
    float* dst = xp.data_ptr<float>();
    for (int64_t r = 0; r < M; ++r)
      for (int64_t k = 0; k < K; ++k)
        dst[r * K + (k / group) * group +
            (wide ? exact_position<Avx512>(k % group) : exact_position<Avx2>(k % group))] =
            a.x[r * K + k];
    a.x = dst;
    if (wide) gemv_exact(a, gemv_tile_avx512<2>, gemv_tile_avx512<1>);
    else gemv_exact(a, gemv_tile_avx2<2>, gemv_tile_avx2<1>);
    return y.to(x.scalar_type());
  }
#endif
  gemv_scalar(a);
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_kernels, CPU, m) { m.impl("gemv_4bit", &gemv_4bit_cpu); }

}  // namespace qlora_kernels::cpu
