// Host-side launch plan of the 4-bit GEMV (csrc/cuda/gemv_kernels.cu): which kernel, how
// many rows of x per tile, how much of K each shared-memory pass stages, and the grid.
// Plain C++ with no CUDA or torch dependency, so that tests/cpp/gemv_plan_test.cpp checks
// it on machines without a GPU (every (row, k) staged exactly once, shared memory within
// the device limit, grid within CUDA's limits) for the sm_86/89 and sm_90 limits.
#pragma once
#include <stdint.h>

namespace qk_cuda {

constexpr int kGemvThreads = 256;                  // 8 warps = 8 output features per CTA
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kGemvPaddedChunk = 36;               // floats per 32-element chunk of x in smem
constexpr int64_t kGemvChunkBytes = kGemvPaddedChunk * 4;
constexpr int64_t kGemvMaxGridY = 65535;           // CUDA's limit on gridDim.y

struct GemvPlan {
  bool fast;          // x staged in shared memory (K % blocksize == 0, W 16-byte aligned)
  int mt;             // rows of x per tile: 1, 2, 4, 8 or 16
  int64_t kt;         // elements of K per staging pass (fast; a multiple of 32, or K)
  int64_t smem;       // dynamic shared memory per CTA in bytes (fast), 0 for general
  int64_t row_tiles;  // ceil(M / mt): CTAs along y stride over them by gridDim.y
  int64_t grid_x;     // ceil(N / kGemvWarps)
  int64_t grid_y;     // min(row_tiles, kGemvMaxGridY)
};

// M, K, N >= 0 (M, N > 0 for a launch); smem_limit: the dynamic shared memory a CTA may
// use on the device (after opting in), at least 46 KiB on every GPU the project targets.
//
// The tile of x is never shrunk to fit shared memory: fewer rows per tile would read W
// once more per extra tile, which is what a GEMV's time is made of, whereas staging K in
// passes costs one barrier per pass. A pass covers a multiple of 32 chunks of 32 elements
// when it can, so that every lane of a warp has a chunk in each pass.
inline GemvPlan plan_gemv(int64_t M, int64_t K, int64_t N, int blocksize, bool w_aligned16,
                          int64_t smem_limit) {
  GemvPlan p{};
  p.mt = 1;
  while (p.mt < M && p.mt < 16) p.mt *= 2;
  const int64_t rows = M < p.mt ? M : p.mt;  // rows staged at most (M < mt: one tile)
  p.fast = K > 0 && blocksize > 0 && K % blocksize == 0 && K % 32 == 0 && w_aligned16 &&
           rows > 0 && smem_limit >= rows * kGemvChunkBytes;
  if (p.fast) {
    const int64_t nchunks = K / 32;
    int64_t per_pass = smem_limit / (rows * kGemvChunkBytes);
    if (per_pass >= nchunks) {
      per_pass = nchunks;
    } else if (per_pass >= 32) {
      per_pass -= per_pass % 32;
    }
    p.kt = per_pass * 32;
    p.smem = rows * per_pass * kGemvChunkBytes;
  }
  p.row_tiles = (M + p.mt - 1) / p.mt;
  p.grid_x = (N + kGemvWarps - 1) / kGemvWarps;
  p.grid_y = p.row_tiles < kGemvMaxGridY ? p.row_tiles : kGemvMaxGridY;
  return p;
}

}  // namespace qk_cuda
