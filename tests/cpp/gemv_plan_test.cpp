// Checks qk_cuda::plan_gemv (csrc/cuda/gemv_plan.h) on the host: for the shared-memory
// limits of sm_86/sm_89 (99 KiB opt-in), sm_90 (227 KiB) and the 48 KiB default, and
// shapes from decode (M = 1) to far more row tiles than gridDim.y allows:
//  * the fast kernel is chosen exactly when K % blocksize == 0 and W is 16-byte aligned,
//    whatever K (LLaMA-70B's down_proj has K = 28,672), with the full tile of rows;
//  * its passes stage every (row, k) of a tile exactly once, at distinct shared-memory
//    addresses inside the dynamic allocation, which fits the limit;
//  * gridDim.y <= 65,535 and the grid-stride over row tiles visits each tile once.
// Prints "ok <cases>" on success; exits 1 with a message on the first failure.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "gemv_plan.h"

using qk_cuda::GemvPlan;

static int64_t g_cases = 0;

#define CHECK(cond, ...)                                              \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);     \
      std::printf(__VA_ARGS__);                                       \
      std::printf("\n");                                              \
      std::exit(1);                                                   \
    }                                                                 \
  } while (0)

static void check(int64_t M, int64_t K, int64_t N, int bs, bool aligned, int64_t limit) {
  ++g_cases;
  const GemvPlan p = qk_cuda::plan_gemv(M, K, N, bs, aligned, limit);
  const char* fmt = "M=%lld K=%lld N=%lld bs=%d aligned=%d limit=%lld";
#define ARGS (long long)M, (long long)K, (long long)N, bs, (int)aligned, (long long)limit
  int want_mt = 1;
  while (want_mt < M && want_mt < 16) want_mt *= 2;
  CHECK(p.mt == want_mt, fmt, ARGS);  // never fewer rows per tile (W read once per tile)
  CHECK(p.fast == (K > 0 && K % bs == 0 && aligned), fmt, ARGS);
  CHECK(p.grid_x * qk_cuda::kGemvWarps >= N && (p.grid_x - 1) * qk_cuda::kGemvWarps < N, fmt,
        ARGS);
  CHECK(p.grid_y >= 1 && p.grid_y <= 65535, fmt, ARGS);
  CHECK(p.row_tiles * p.mt >= M && (p.row_tiles - 1) * p.mt < M, fmt, ARGS);
  // grid-stride over row tiles (blockIdx.y, += gridDim.y): each tile once
  std::vector<int> seen(p.row_tiles, 0);
  for (int64_t by = 0; by < p.grid_y; ++by)
    for (int64_t t = by; t < p.row_tiles; t += p.grid_y) ++seen[t];
  for (int64_t t = 0; t < p.row_tiles; ++t) CHECK(seen[t] == 1, "tile %lld: %s", (long long)t, "");
  if (!p.fast) {
    CHECK(p.smem == 0, fmt, ARGS);
    return;
  }
  CHECK(p.smem > 0 && p.smem <= limit, fmt, ARGS);
  CHECK(p.kt > 0 && p.kt % 32 == 0 && p.kt <= K, fmt, ARGS);
  CHECK(p.kt == K || p.kt % 1024 == 0 || p.kt < 1024, "whole warps per pass: %s", "");
  // The kernel's staging of one tile (mc rows), pass by pass, into smem / 4 floats.
  const int64_t floats = p.smem / 4;
  for (int64_t m0 = 0; m0 < M && m0 < 2 * p.mt; m0 += p.mt) {
    const int64_t mc = M - m0 < p.mt ? M - m0 : p.mt;
    std::vector<int> staged(mc * K, 0);
    for (int64_t k0 = 0; k0 < K; k0 += p.kt) {
      const int64_t kn = K - k0 < p.kt ? K - k0 : p.kt;
      const int64_t row_stride = kn / 32 * qk_cuda::kGemvPaddedChunk;
      std::vector<char> used(floats, 0);
      for (int64_t i = 0; i < mc * kn; ++i) {
        const int64_t m = i / kn, k = i - m * kn;
        const int64_t at = m * row_stride + k + (k >> 5) * 4;
        CHECK(at >= 0 && at < floats && !used[at], "smem slot %lld: %s", (long long)at, "");
        used[at] = 1;
        ++staged[m * K + k0 + k];
        // the reads: chunk c = k / 32, float4 g = (k % 32) / 4 of row m
        const int64_t c = k / 32, g = (k % 32) / 4;
        CHECK(m * row_stride + c * qk_cuda::kGemvPaddedChunk + 4 * g + (k % 4) == at, "%s", "read");
      }
    }
    for (int64_t i = 0; i < mc * K; ++i) CHECK(staged[i] == 1, "element %lld", (long long)i);
  }
#undef ARGS
}

int main() {
  const int64_t limits[] = {46 * 1024, 97 * 1024, 225 * 1024};  // default, sm_86/89, sm_90
  const int64_t Ms[] = {1, 2, 3, 5, 8, 9, 16, 17};
  const int64_t Ks[] = {0, 32, 64, 96, 1000, 4096, 8192, 11008, 14336, 22016, 22080,
                        28672, 53248, 65536};
  const int bss[] = {32, 64, 128, 4096};
  for (int64_t limit : limits)
    for (int64_t M : Ms)
      for (int64_t K : Ks)
        for (int bs : bss)
          for (int aligned = 0; aligned < 2; ++aligned) check(M, K, 40, bs, aligned, limit);
  // The case of the review: x of K = 28,672 does not fit 97 KiB even with one row.
  const GemvPlan big = qk_cuda::plan_gemv(16, 28672, 8192, 64, true, 97 * 1024);
  CHECK(big.fast && big.mt == 16 && big.kt < 28672, "K=28672: fast=%d mt=%d kt=%lld",
        (int)big.fast, big.mt, (long long)big.kt);
  // More row tiles than gridDim.y allows (the op accepts any M).
  for (int64_t M : {int64_t(65535) * 16, int64_t(65535) * 16 + 1, int64_t(1) << 21}) {
    check(M, 64, 3, 64, true, 97 * 1024);
    CHECK(qk_cuda::plan_gemv(M, 64, 3, 64, true, 97 * 1024).grid_y == 65535, "M=%lld",
          (long long)M);
  }
  std::printf("ok %lld\n", (long long)g_cases);
  return 0;
}
