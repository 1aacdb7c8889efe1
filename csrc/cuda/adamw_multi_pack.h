// Host-side packing of the multi-tensor AdamW launches (csrc/cuda/adamw_kernels.cu,
// adamw32_multi_kernel): which params each launch updates, and which CUDA blocks update
// which param. Plain C++ with no CUDA or torch dependency, so that
// tests/cpp/adamw_multi_pack_test.cpp checks it on machines without a GPU (every element
// updated exactly once, the same bits as a per-element loop).
#pragma once
#include <stdint.h>

#include "qk_adamw.h"

namespace qk_cuda {

constexpr int kMultiTensors = 40;       // params per launch
constexpr int64_t kMultiChunk = 16384;  // elements per CUDA block

// The kernel's arguments: param t of a launch is updated by blocks
// [block_start[t], block_start[t + 1]), each taking kMultiChunk elements of it in turn.
// Passed by value, so it must fit the 4 KiB of kernel parameters that CUDA before 12.1
// (and pre-Volta GPUs) allow.
struct MultiArgs {
  void* p[kMultiTensors];
  const void* g[kMultiTensors];
  float* m[kMultiTensors];
  float* v[kMultiTensors];
  int64_t n[kMultiTensors];
  qk::AdamWScalars s[kMultiTensors];
  int block_start[kMultiTensors + 1];
  int count;  // params in this launch
};
static_assert(sizeof(MultiArgs) <= 4000, "MultiArgs must fit in the 4 KiB kernel parameters");

// The param of a launch that CUDA block `block` updates (the kernel's lookup: at most
// kMultiTensors comparisons against kernel parameters, the same for the whole block).
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int multi_param_of_block(const MultiArgs& a, int block) {
  int t = 0;
  while (t + 1 < a.count && a.block_start[t + 1] <= block) ++t;
  return t;
}

// Groups the non-empty params kMultiTensors at a time and calls launch(args, nblocks) for
// each group. Returns the first nonzero result of launch, or -1 when a group would need
// 2^31 blocks or more; 0 on success.
template <typename Launch>
int pack_adamw32_multi(int64_t count, void* const* p, const void* const* g, float* const* m,
                       float* const* v, const int64_t* n, const qk::AdamWScalars* s,
                       Launch&& launch) {
  MultiArgs a;
  a.count = 0;
  int64_t blocks = 0;
  for (int64_t t = 0; t < count; ++t) {
    if (n[t] <= 0) continue;
    const int k = a.count++;
    a.p[k] = p[t];
    a.g[k] = g[t];
    a.m[k] = m[t];
    a.v[k] = v[t];
    a.n[k] = n[t];
    a.s[k] = s[t];
    a.block_start[k] = (int)blocks;
    blocks += (n[t] + kMultiChunk - 1) / kMultiChunk;
    if (blocks > 0x7fffffffLL) return -1;
    if (a.count == kMultiTensors) {
      a.block_start[a.count] = (int)blocks;
      if (const int err = launch(a, (int)blocks)) return err;
      a.count = 0;
      blocks = 0;
    }
  }
  if (a.count == 0) return 0;
  a.block_start[a.count] = (int)blocks;
  return launch(a, (int)blocks);
}

}  // namespace qk_cuda
