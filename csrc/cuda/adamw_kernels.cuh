// Torch-free entry points of csrc/cuda/adamw_kernels.cu: AdamW launchers (32-bit and
// blockwise 8-bit state). Param/grad element types are qk_cuda::DType codes (qk_cuda.h).
#pragma once
#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include "qk_adamw.h"
#include "qk_cuda.h"

namespace qk_cuda {

// 32-bit state: p, g of `ptype`; m, v float32; n elements.
cudaError_t launch_adamw32(int ptype, void* p, const void* g, float* m, float* v, int64_t n,
                           const qk::AdamWScalars& s, cudaStream_t stream);

// 32-bit state, many params in few launches: param t is p[t], g[t], m[t], v[t] with n[t]
// elements and its own scalars s[t] (its own step); every param of type `ptype`.
cudaError_t launch_adamw32_multi(int ptype, int64_t count, void* const* p, const void* const* g,
                                 float* const* m, float* const* v, const int64_t* n,
                                 const qk::AdamWScalars* s, cudaStream_t stream);

// 8-bit state: qm/qv uint8 [n], absmax_m/absmax_v float32 [ceil(n / 256)], codes float32 [256].
cudaError_t launch_adamw8bit(int ptype, void* p, const void* g, uint8_t* qm, float* absmax_m,
                             uint8_t* qv, float* absmax_v, const float* code_m,
                             const float* code_v, int64_t n, const qk::AdamWScalars& s,
                             cudaStream_t stream);

}  // namespace qk_cuda
