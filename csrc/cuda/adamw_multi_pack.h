// Host-side packing of the multi-tensor AdamW launches (csrc/cuda/adamw_kernels.cu,
// adamw32_multi_kernel): which param and which chunk of it each CUDA block updates. Plain
// C++ with no CUDA or torch dependency, so that tests/cpp/adamw_multi_pack_test.cpp checks
// it on machines without a GPU (every element updated exactly once, tables rolled over).
#pragma once
#include <stdint.h>

#include "qk_adamw.h"

namespace qk_cuda {

constexpr int kMultiTensors = 24;       // params per launch
constexpr int kMultiBlocks = 320;       // (param, chunk) pairs, one per CUDA block, per launch
constexpr int64_t kMultiChunk = 16384;  // elements per chunk

// The kernel's arguments: passed by value, so they must fit the 4 KiB of kernel parameters
// that CUDA before 12.1 (and pre-Volta GPUs) allow.
struct MultiArgs {
  void* p[kMultiTensors];
  const void* g[kMultiTensors];
  float* m[kMultiTensors];
  float* v[kMultiTensors];
  int64_t n[kMultiTensors];
  qk::AdamWScalars s[kMultiTensors];
  int chunk[kMultiBlocks];
  unsigned char tensor[kMultiBlocks];
};
static_assert(sizeof(MultiArgs) <= 4000, "MultiArgs must fit in the 4 KiB kernel parameters");
static_assert(kMultiTensors <= 256, "param indices are stored as unsigned char");

// Fills MultiArgs with the params and their chunks and calls launch(args, nblocks) whenever
// either table is full, and once at the end; a param whose chunks span two launches is
// carried over as the next launch's param 0. Empty params are skipped. Returns the first
// nonzero result of launch, or -1 for a param of more than 2^31 chunks; 0 on success.
template <typename Launch>
int pack_adamw32_multi(int64_t count, void* const* p, const void* const* g, float* const* m,
                       float* const* v, const int64_t* n, const qk::AdamWScalars* s,
                       Launch&& launch) {
  MultiArgs a;
  int nt = 0, nb = 0;
  auto set_param = [&a](int slot, void* pp, const void* gp, float* mp, float* vp, int64_t np,
                        const qk::AdamWScalars& sp) {
    a.p[slot] = pp;
    a.g[slot] = gp;
    a.m[slot] = mp;
    a.v[slot] = vp;
    a.n[slot] = np;
    a.s[slot] = sp;
  };
  for (int64_t t = 0; t < count; ++t) {
    if (n[t] <= 0) continue;
    const int64_t chunks = (n[t] + kMultiChunk - 1) / kMultiChunk;
    if (chunks > 0x7fffffffLL) return -1;
    set_param(nt++, p[t], g[t], m[t], v[t], n[t], s[t]);
    for (int64_t c = 0; c < chunks; ++c) {
      a.tensor[nb] = (unsigned char)(nt - 1);
      a.chunk[nb] = (int)c;
      ++nb;
      const bool last = c == chunks - 1;
      if (nb == kMultiBlocks || (last && nt == kMultiTensors)) {
        if (const int err = launch(a, nb)) return err;
        nb = 0;
        nt = 0;
        if (!last) set_param(nt++, p[t], g[t], m[t], v[t], n[t], s[t]);  // its other chunks
      }
    }
  }
  if (nb > 0) return launch(a, nb);
  return 0;
}

}  // namespace qk_cuda
