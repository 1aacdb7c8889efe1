// dropout_seeded on the CPU: out = keep(i) ? x[i] * scale : 0, keep(i) a hash of (seed, i)
// (the definition is in qlora_kernels/op_schemas.inc). A counter-based draw, not torch's
// generator: each element's bit is independent of the thread that computes it and of the
// order, so a team of threads splits the tensor freely, and the backward recomputes the
// forward's mask from the seed instead of saving it. torch's generator drew ~1.3 ns per
// element sequentially, and the mask, where and scale passes made the LoRA dropout of the
// demo's layers 6-14x the cost of the x·Aᵀ product it feeds (benchmarks/README.md).
//
// The body is plain C++ written for the vectorizer: compiled once per width (the QK_*_BODY
// wrappers of simd_width.h), gcc turns the 32-bit multiplies, shifts and selects into
// 8 or 16 lanes. bfloat16 is rounded by hand (to nearest even, NaN to 0x7FC0, as
// c10::BFloat16), so that the loop stays vectorizable.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <cmath>
#include <cstring>

#include "cpu_common.h"
#include "simd_width.h"

namespace qlora_kernels::cpu {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per task: ~100 us of work at the slowest path
constexpr int64_t kMinParallelChunks = 2;

QK_ANY_WIDTH uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x21f0aaadu;
  h ^= h >> 15;
  h *= 0x735a2d97u;
  h ^= h >> 15;
  return h;
}

QK_ANY_WIDTH float load_elem(const float* p, int64_t i) { return p[i]; }
QK_ANY_WIDTH float load_elem(const c10::BFloat16* p, int64_t i) {
  uint16_t b;
  std::memcpy(&b, p + i, 2);
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
QK_ANY_WIDTH float load_elem(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }

QK_ANY_WIDTH void store_elem(float* p, int64_t i, float v) { p[i] = v; }
QK_ANY_WIDTH void store_elem(c10::BFloat16* p, int64_t i, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = 0u - static_cast<uint32_t>(v != v);  // all ones where NaN
  const uint16_t b = static_cast<uint16_t>((rounded & ~nan) | (0x7FC0u & nan));
  std::memcpy(p + i, &b, 2);
}
QK_ANY_WIDTH void store_elem(c10::Half* p, int64_t i, float v) { p[i] = c10::Half(v); }

// Elements [begin, end) of one 2**32-element span: lo32 is begin's low 32 bits, k0 the
// span's key.
template <typename T>
QK_ANY_WIDTH void dropout_body(const T* x, T* out, int64_t begin, int64_t end, uint32_t lo32,
                               uint32_t k0, uint32_t k1, uint32_t drop, float scale) {
  const int64_t n = end - begin;
  const T* xs = x + begin;
  T* os = out + begin;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t h = mix32(mix32((lo32 + static_cast<uint32_t>(j)) ^ k0) ^ k1);
    // Selects as masks: gcc leaves a ?: over floats as a branch on the AVX2 width.
    const uint32_t keep = 0u - static_cast<uint32_t>(h >= drop);
    const float v = load_elem(xs, j) * scale;
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    bits &= keep;
    float kept;
    std::memcpy(&kept, &bits, 4);
    store_elem(os, j, kept);
  }
}

template <typename T>
void dropout_scalar(const T* x, T* out, int64_t b, int64_t e, uint32_t lo, uint32_t k0,
                    uint32_t k1, uint32_t drop, float scale) {
  dropout_body(x, out, b, e, lo, k0, k1, drop, scale);
}
#if defined(__x86_64__)
template <typename T>
QK_AVX2_BODY void dropout_avx2(const T* x, T* out, int64_t b, int64_t e, uint32_t lo,
                               uint32_t k0, uint32_t k1, uint32_t drop, float scale) {
  dropout_body(x, out, b, e, lo, k0, k1, drop, scale);
}
template <typename T>
QK_AVX512_BODY void dropout_avx512(const T* x, T* out, int64_t b, int64_t e, uint32_t lo,
                                   uint32_t k0, uint32_t k1, uint32_t drop, float scale) {
  dropout_body(x, out, b, e, lo, k0, k1, drop, scale);
}
#endif

template <typename T>
void dropout_range(const T* x, T* out, int64_t begin, int64_t end, uint64_t seed,
                   uint32_t drop, float scale, int64_t isa) {
  const uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  // Split at multiples of 2**32: the counter is the index's low word, the span keys k0.
  for (int64_t b = begin; b < end;) {
    const uint64_t span = static_cast<uint64_t>(b) >> 32;
    const int64_t e = std::min<int64_t>(end, static_cast<int64_t>((span + 1) << 32));
    const uint32_t k0 = static_cast<uint32_t>(seed) ^ static_cast<uint32_t>(span * 0x9E3779B1u);
    const uint32_t lo = static_cast<uint32_t>(b);
#if defined(__x86_64__)
    if (isa >= kIsaAvx512) dropout_avx512(x, out, b, e, lo, k0, k1, drop, scale);
    else if (isa >= kIsaAvx2) dropout_avx2(x, out, b, e, lo, k0, k1, drop, scale);
    else dropout_scalar(x, out, b, e, lo, k0, k1, drop, scale);
#else
    dropout_scalar(x, out, b, e, lo, k0, k1, drop, scale);
#endif
    b = e;
  }
}

at::Tensor dropout_seeded_cpu(const at::Tensor& x, int64_t seed, double p) {
  check_float_input(x, "dropout_seeded");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "dropout_seeded: p must be in [0, 1), got ", p);
  const double levels = 4294967296.0;  // 2**32
  const uint32_t drop = static_cast<uint32_t>(std::min(std::nearbyint(p * levels), levels - 1));
  const float scale = static_cast<float>(levels / (levels - drop));
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t n = xc.numel();
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  const int64_t isa = cpu_isa();
  dispatch_float(xc.scalar_type(), "dropout_seeded", [&](auto zero) {
    using T = decltype(zero);
    const T* xp = xc.data_ptr<T>();
    T* op = out.data_ptr<T>();
#pragma omp parallel for schedule(static) if (nchunks >= kMinParallelChunks)
    for (int64_t c = 0; c < nchunks; ++c)
      dropout_range(xp, op, c * kChunk, std::min(n, (c + 1) * kChunk),
                    static_cast<uint64_t>(seed), drop, scale, isa);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_kernels, CPU, m) { m.impl("dropout_seeded", &dropout_seeded_cpu); }

}  // namespace qlora_kernels::cpu
