// Run-time CPU dispatch: the CPU's features, read once, and the instruction-set path the
// kernels use. Every SIMD function is compiled with a per-function target attribute, so the
// build needs no -march flag and the module loads on any x86-64; each kernel picks its path
// with cpu_isa() at the call. set_cpu_isa() caps the path (tests force each lower path the
// machine has; QLORA_KERNELS_CPU_ISA does the same from qlora_kernels/cpu.py) and refuses
// a path whose features this CPU lacks, naming the missing one.
#pragma once
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <string>

namespace qlora_kernels::cpu {

// Feature bits of cpu_features(); the names are listed once, in qlora_kernels/cpu.py.
enum Feature : int64_t {
  kFeatAvx2 = 1 << 0,  // with FMA and F16C
  kFeatAvx512F = 1 << 1,
  kFeatAvx512BW = 1 << 2,
  kFeatAvx512VL = 1 << 3,
  kFeatAvx512Vnni = 1 << 4,
  kFeatAvx512Bf16 = 1 << 5,
  kFeatAmxBf16 = 1 << 6,
};

// Paths, lowest first: each needs the features of the ones below it plus its own.
enum Isa : int64_t { kIsaScalar = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kIsaAvx512Bf16 = 3 };

inline int64_t cpu_features() {
#if defined(__x86_64__) || defined(__i386__)
  static const int64_t bits = [] {
    __builtin_cpu_init();
    int64_t f = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
      f |= kFeatAvx2;
    if (__builtin_cpu_supports("avx512f")) f |= kFeatAvx512F;
    if (__builtin_cpu_supports("avx512bw")) f |= kFeatAvx512BW;
    if (__builtin_cpu_supports("avx512vl")) f |= kFeatAvx512VL;
    if (__builtin_cpu_supports("avx512vnni")) f |= kFeatAvx512Vnni;
    if (__builtin_cpu_supports("avx512bf16")) f |= kFeatAvx512Bf16;
    if (__builtin_cpu_supports("amx-bf16")) f |= kFeatAmxBf16;
    return f;
  }();
  return bits;
#else
  return 0;
#endif
}

// The first feature path `isa` needs that this CPU lacks, or nullptr.
inline const char* missing_feature(int64_t isa) {
  const int64_t f = cpu_features();
  if (isa >= kIsaAvx2 && !(f & kFeatAvx2)) return "avx2 (with fma and f16c)";
  if (isa >= kIsaAvx512) {
    if (!(f & kFeatAvx512F)) return "avx512f";
    if (!(f & kFeatAvx512BW)) return "avx512bw";
    if (!(f & kFeatAvx512VL)) return "avx512vl";
  }
  if (isa >= kIsaAvx512Bf16 && !(f & kFeatAvx512Bf16)) return "avx512_bf16";
  return nullptr;
}

inline int64_t best_isa() {
  for (int64_t isa = kIsaAvx512Bf16; isa > kIsaScalar; --isa)
    if (!missing_feature(isa)) return isa;
  return kIsaScalar;
}

inline std::atomic<int64_t>& isa_in_force() {
  static std::atomic<int64_t> isa{best_isa()};
  return isa;
}

inline int64_t cpu_isa() { return isa_in_force().load(std::memory_order_relaxed); }

// Caps the path at `isa` (-1: the best this CPU has); returns the path now in force.
inline int64_t set_cpu_isa(int64_t isa) {
  if (isa < 0) isa = best_isa();
  TORCH_CHECK(isa <= kIsaAvx512Bf16, "set_cpu_isa: unknown path ", isa);
  const char* missing = missing_feature(isa);
  TORCH_CHECK(missing == nullptr, "set_cpu_isa: this CPU lacks ", missing,
              " which the requested path needs");
  isa_in_force().store(isa);
  return isa;
}

}  // namespace qlora_kernels::cpu
