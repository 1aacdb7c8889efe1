// CUDA kernels of the fused AdamW step, and the unified-memory helpers of the paged
// optimizers. Torch-free: raw pointers and a cudaStream_t (binding: adamw_binding.cpp).
// Element math: qk::adamw_update (csrc/include/qk_adamw.h), torch.optim.AdamW's op order;
// build with --fmad=false so that the only FMAs are the explicit ones there.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "adamw_kernels.cuh"
#include "adamw_multi_pack.h"
#include "qk_device.cuh"  // to_f32 / from_f32
#include "qk_format.h"

namespace qk_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGrid = 65535 * 8;  // grid-stride beyond this

// The loop of both 32-bit kernels: elements begin, begin + stride, ... below end.
template <typename T>
__device__ __forceinline__ void adamw32_range(T* __restrict__ p, const T* __restrict__ g,
                                              float* __restrict__ m, float* __restrict__ v,
                                              int64_t begin, int64_t end, int64_t stride,
                                              const qk::AdamWScalars& s) {
  for (int64_t i = begin; i < end; i += stride) {
    float pf = to_f32(p[i]), mf = m[i], vf = v[i];
    qk::adamw_update(pf, to_f32(g[i]), mf, vf, s);
    p[i] = from_f32<T>(pf);
    m[i] = mf;
    v[i] = vf;
  }
}

// adamw32_kernel: one AdamW step on n elements, float32 state.
// Launch: block 256 threads, grid min(ceil(n / 256), 524280), grid-stride loop; one thread
// per element per iteration (memory bound: 2 reads of T, 2 of float, 1 write of T, 2 of float).
template <typename T>
__global__ void adamw32_kernel(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ m,
                               float* __restrict__ v, int64_t n, qk::AdamWScalars s) {
  adamw32_range(p, g, m, v, (int64_t)blockIdx.x * blockDim.x + threadIdx.x, n,
                (int64_t)gridDim.x * blockDim.x, s);
}

// adamw32_multi_kernel: adamw32_kernel over many params in one launch (a LoRA model has
// hundreds: one launch each would cost more than the step). The arguments (MultiArgs,
// adamw_multi_pack.h) carry up to kMultiTensors params; block b finds its param t by
// block_start and updates the (b - block_start[t])-th kMultiChunk elements of it.
// Launch: block 256 threads, grid = the chunks of this launch's params; one thread per
// element per iteration, 64 iterations.
template <typename T>
__global__ void adamw32_multi_kernel(const __grid_constant__ MultiArgs a) {
  const int t = multi_param_of_block(a, (int)blockIdx.x);
  const int64_t begin = (int64_t)((int)blockIdx.x - a.block_start[t]) * kMultiChunk;
  adamw32_range((T*)a.p[t], (const T*)a.g[t], a.m[t], a.v[t], begin + threadIdx.x,
                min(begin + kMultiChunk, a.n[t]), (int64_t)blockDim.x, a.s[t]);
}

// adamw8bit_kernel: one AdamW step with blockwise 8-bit moments; CUDA block b owns
// quantization block b (256 elements): decode m = code_m[qm] * absmax_m[b] (v likewise),
// update in float32, reduce the new absmax of each moment over the block, re-encode with
// qk::encode_sorted256 against the codes staged in shared memory. A non-finite moment (from a
// NaN/Inf gradient element, whose param turns NaN as in the 32-bit step) is stored as 0 and
// left out of the absmax, so it never spreads to the other 255 elements of its block.
// Launch: block 256 threads, grid ceil(n / 256) (one thread per element); 2 KiB shared.
template <typename T>
__global__ void adamw8bit_kernel(T* __restrict__ p, const T* __restrict__ g,
                                 uint8_t* __restrict__ qm, float* __restrict__ absmax_m,
                                 uint8_t* __restrict__ qv, float* __restrict__ absmax_v,
                                 const float* __restrict__ code_m, const float* __restrict__ code_v,
                                 int64_t n, qk::AdamWScalars s) {
  __shared__ float cm[256], cv[256];
  __shared__ float wmax_m[kThreads / 32], wmax_v[kThreads / 32];
  const int t = threadIdx.x;
  cm[t] = code_m[t];
  cv[t] = code_v[t];
  const int64_t b = blockIdx.x;
  const int64_t i = b * qk::kOptimBlocksize + t;
  const bool valid = i < n;
  const float am_old = absmax_m[b], av_old = absmax_v[b];
  __syncthreads();
  float mf = 0.0f, vf = 0.0f;
  if (valid) {
    float pf = to_f32(p[i]);
    mf = cm[qm[i]] * am_old;
    vf = cv[qv[i]] * av_old;
    qk::adamw_update(pf, to_f32(g[i]), mf, vf, s);
    p[i] = from_f32<T>(pf);
    if (!isfinite(mf) || !isfinite(vf)) mf = vf = 0.0f;
  }
  float am = fabsf(mf), av = fabsf(vf);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, off));
    av = fmaxf(av, __shfl_xor_sync(0xffffffffu, av, off));
  }
  if ((t & 31) == 0) {
    wmax_m[t >> 5] = am;
    wmax_v[t >> 5] = av;
  }
  __syncthreads();
  am = wmax_m[0];
  av = wmax_v[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) {
    am = fmaxf(am, wmax_m[w]);
    av = fmaxf(av, wmax_v[w]);
  }
  if (t == 0) {
    absmax_m[b] = am;
    absmax_v[b] = av;
  }
  if (valid) {
    qm[i] = (uint8_t)qk::encode_sorted256(cm, mf * qk::inverse_absmax(am));
    qv[i] = (uint8_t)qk::encode_sorted256(cv, vf * qk::inverse_absmax(av));
  }
}

template <typename T>
cudaError_t launch32(void* p, const void* g, float* m, float* v, int64_t n,
                     const qk::AdamWScalars& s, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const int grid = (int)(blocks < kMaxGrid ? blocks : kMaxGrid);
  QK_LAUNCH(grid, kThreads, 0, stream, adamw32_kernel<T>)((T*)p, (const T*)g, m, v, n, s);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch32_multi(int64_t count, void* const* p, const void* const* g, float* const* m,
                           float* const* v, const int64_t* n, const qk::AdamWScalars* s,
                           cudaStream_t stream) {
  auto launch = [stream](const MultiArgs& a, int nblocks) {
    QK_LAUNCH(nblocks, kThreads, 0, stream, adamw32_multi_kernel<T>)(a);
    return (int)cudaGetLastError();
  };
  const int res = pack_adamw32_multi(count, p, g, m, v, n, s, launch);
  return res < 0 ? cudaErrorInvalidValue : (cudaError_t)res;
}

template <typename T>
cudaError_t launch8(void* p, const void* g, uint8_t* qm, float* am, uint8_t* qv, float* av,
                    const float* cm, const float* cv, int64_t n, const qk::AdamWScalars& s,
                    cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + qk::kOptimBlocksize - 1) / qk::kOptimBlocksize;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  QK_LAUNCH((unsigned)blocks, kThreads, 0, stream, adamw8bit_kernel<T>)((T*)p, (const T*)g, qm,
                                                                         am, qv, av, cm, cv, n, s);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_adamw32(int ptype, void* p, const void* g, float* m, float* v, int64_t n,
                           const qk::AdamWScalars& s, cudaStream_t stream) {
  switch (ptype) {
    case kFloat32: return launch32<float>(p, g, m, v, n, s, stream);
    case kFloat16: return launch32<__half>(p, g, m, v, n, s, stream);
    case kBFloat16: return launch32<__nv_bfloat16>(p, g, m, v, n, s, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_adamw32_multi(int ptype, int64_t count, void* const* p, const void* const* g,
                                 float* const* m, float* const* v, const int64_t* n,
                                 const qk::AdamWScalars* s, cudaStream_t stream) {
  switch (ptype) {
    case kFloat32: return launch32_multi<float>(count, p, g, m, v, n, s, stream);
    case kFloat16: return launch32_multi<__half>(count, p, g, m, v, n, s, stream);
    case kBFloat16: return launch32_multi<__nv_bfloat16>(count, p, g, m, v, n, s, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_adamw8bit(int ptype, void* p, const void* g, uint8_t* qm, float* absmax_m,
                             uint8_t* qv, float* absmax_v, const float* code_m,
                             const float* code_v, int64_t n, const qk::AdamWScalars& s,
                             cudaStream_t stream) {
  switch (ptype) {
    case kFloat32: return launch8<float>(p, g, qm, absmax_m, qv, absmax_v, code_m, code_v, n, s, stream);
    case kFloat16: return launch8<__half>(p, g, qm, absmax_m, qv, absmax_v, code_m, code_v, n, s, stream);
    case kBFloat16:
      return launch8<__nv_bfloat16>(p, g, qm, absmax_m, qv, absmax_v, code_m, code_v, n, s, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace qk_cuda
