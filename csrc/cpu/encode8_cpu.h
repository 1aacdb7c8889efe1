// Fast nearest-entry encoding into a sorted 256-entry table (quantize_8bit, the 8-bit
// AdamW states), bit-identical to qk::encode_sorted256: the code of s is the number of
// midpoints mids[k] = 0.5f * (code[k] + code[k+1]) strictly below s (0 for NaN).
//
// Instead of 8 binary-search steps, a bucket table: the float's bits, made order-preserving
// (negatives flipped), give a 16-bit bucket (sign, exponent, 7 mantissa bits); lo[bucket] is
// the number of midpoints below the bucket's smallest value, and every s in the bucket
// encodes to lo + (s > mids[lo]) + ... with at most `span` comparisons. For the codes of this
// project a bucket holds at most one midpoint (span 1: one table load, one comparison); a
// table whose midpoints crowd closer keeps the binary search. Building the table walks the
// 65536 buckets once; tables are kept per distinct code (Encoder8::get). The lookups are
// gathers, 8 lanes wide (AVX2) or 16 (AVX-512, path avx512 and up): the same bits.
#pragma once
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "cpu_common.h"
#include "qk_format.h"
#include "simd_width.h"

namespace qlora_kernels::cpu {

class Encoder8 {
 public:
  static constexpr int kBucketBits = 16;
  static constexpr int kMaxSpan = 2;  // more comparisons than this: binary search instead

  // The encoder of a 256-entry sorted code, built once per distinct code and kept (a few
  // codes exist: the dynamic maps, FP8 E4M3), so each call does not pay for the table.
  static std::shared_ptr<const Encoder8> get(const float* code) {
    static std::mutex mu;
    static std::vector<std::shared_ptr<const Encoder8>> cache;
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& e : cache)
      if (std::memcmp(e->code_, code, sizeof(e->code_)) == 0) return e;
    auto e = std::make_shared<const Encoder8>(code);
    if (cache.size() >= 8) cache.erase(cache.begin());
    cache.push_back(e);
    return e;
  }

  explicit Encoder8(const float* code) {
    std::memcpy(code_, code, sizeof(code_));
    for (int k = 0; k < 255; ++k) mids_[k] = 0.5f * (code[k] + code[k + 1]);
    for (int k = 255; k < 256 + kMaxSpan; ++k) mids_[k] = INFINITY;  // never below any s
    build();
  }

  // Whether the bucket table is used (else qk::encode_sorted256's binary search).
  bool fast() const { return fast_; }

  // The code of one value.
  int encode(float s) const {
    if (!fast_) return qk::encode_sorted256(code_, s);
    int lo = lo_[bucket(s)];
    for (int j = 0; j < span_; ++j) lo += s > mids_[lo] ? 1 : 0;  // mids_[lo] >= bucket min
    return s != s ? 0 : lo;
  }

  // q[i] = code of x[i] * inv for i < n.
  void encode_scaled(const float* x, float inv, int64_t n, uint8_t* q) const {
    int64_t i = 0;
#if defined(__x86_64__)
    if (fast_ && cpu_isa() >= kIsaAvx512) i = encode_scaled_avx512(x, inv, n, q);
    else if (fast_ && has_avx2()) i = encode_scaled_avx2(x, inv, n, q);
#endif
    for (; i < n; ++i) q[i] = (uint8_t)encode(x[i] * inv);
  }

 private:
  static uint32_t key(float s) {
    uint32_t u;
    std::memcpy(&u, &s, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  static int bucket(float s) { return (int)(key(s) >> (32 - kBucketBits)); }
  static float value_of_key(uint32_t k) {
    const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }

  void build() {
    // The table assumes sorted midpoints (the binary search gives the same answer then);
    // anything else keeps the binary search, whatever it makes of such a code.
    for (int k = 0; k < 255; ++k)
      if (mids_[k] != mids_[k] || (k > 0 && mids_[k] < mids_[k - 1])) return;
    const int nb = 1 << kBucketBits;
    lo_.assign(nb + 4, 0);  // +4: the SIMD paths read 4 bytes at each bucket's offset
    int p = 0, span = 0;
    for (int b = 0; b < nb; ++b) {
      float fmin = value_of_key((uint32_t)b << (32 - kBucketBits));
      // NaN keys sit beyond -inf (low end) and +inf (high end): order them as those infinities
      if (fmin != fmin) fmin = b < nb / 2 ? -INFINITY : INFINITY;
      while (p < 255 && mids_[p] < fmin) ++p;
      lo_[b] = (uint8_t)p;
    }
    for (int b = 0; b < nb; ++b) {
      const int next = b + 1 < nb ? lo_[b + 1] : 255;
      span = std::max(span, next - lo_[b]);
    }
    span_ = span;
    fast_ = span <= kMaxSpan;
  }

#if defined(__x86_64__)
  // S::W lanes of encode() at a time (one body for both widths, simd_width.h); returns how
  // many elements it did (a multiple of S::W).
  template <class S>
  QK_ANY_WIDTH int64_t encode_scaled_lanes(const float* x, float inv, int64_t n,
                                           uint8_t* q) const {
    using vi = typename S::vi;
    const typename S::vf vinv = S::set1(inv);
    const vi sign = S::set1i(INT32_MIN);
    int64_t i = 0;
    for (; i + S::W <= n; i += S::W) {
      const typename S::vf s = S::mul(S::load(x + i), vinv);
      const vi u = S::bits(s);
      const vi k = S::xor_i(u, S::or_i(S::srai(u, 31), sign));  // key(s)
      vi lo = S::gather_byte(lo_.data(), S::srli(k, 32 - kBucketBits));
      for (int j = 0; j < span_; ++j) lo = S::inc_where(lo, S::gt(s, S::gather(mids_, lo)));
      S::store_bytes(q + i, S::zero_where(lo, S::is_nan(s)));
    }
    return i;
  }
  QK_AVX2_BODY int64_t encode_scaled_avx2(const float* x, float inv, int64_t n,
                                          uint8_t* q) const {
    return encode_scaled_lanes<Avx2>(x, inv, n, q);
  }
  QK_AVX512_BODY int64_t encode_scaled_avx512(const float* x, float inv, int64_t n,
                                              uint8_t* q) const {
    return encode_scaled_lanes<Avx512>(x, inv, n, q);
  }
#endif

  float code_[256];
  float mids_[256 + kMaxSpan];
  std::vector<uint8_t> lo_;
  int span_ = 0;
  bool fast_ = false;
};

}  // namespace qlora_kernels::cpu
