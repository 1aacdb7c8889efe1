// qk_device.cuh — device helpers shared by the CUDA kernels (torch-free).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "qk_cuda.h"
#include "qk_format.h"

// Kernels launch through QK_LAUNCH(grid, block, smem, stream, kernel)(args...) and declare
// dynamic shared memory with QK_DYNAMIC_SHARED, so that the host emulation of the tests
// (csrc/emulation/cuda_emu.h, which defines both first) can run the same sources.
#ifndef QK_LAUNCH
#define QK_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif
#ifndef QK_DYNAMIC_SHARED
#define QK_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace qk_cuda {

// ---------------------------------------------------------------- scalar conversions
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// float32 -> T rounded to nearest even, as torch's .to(dtype) does.
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Read-only global load of one element, as float.
template <typename T>
__device__ __forceinline__ float load_f32(const T* p) { return to_f32(__ldg(p)); }

// ---------------------------------------------------------------- 8-element chunks
// 8 consecutive elements from a 16-byte-aligned address: two 16-byte loads for float, one
// for the 16-bit types.
__device__ __forceinline__ void load8_aligned(const float* p, float (&v)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
// A 16-bit float widens to float32 by shifting its bits (bf16) or a conversion (half).
__device__ __forceinline__ void load8_aligned(const __half* p, float (&v)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const __half lo = __ushort_as_half((unsigned short)(w[k] & 0xFFFFu));
    const __half hi = __ushort_as_half((unsigned short)(w[k] >> 16));
    const float2 f = __half22float2(__halves2half2(lo, hi));
    v[2 * k] = f.x;
    v[2 * k + 1] = f.y;
  }
}
__device__ __forceinline__ void load8_aligned(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    v[2 * k] = __uint_as_float(w[k] << 16);
    v[2 * k + 1] = __uint_as_float(w[k] & 0xFFFF0000u);
  }
}

// 8 elements starting at p, of which `avail` (may be <= 0) exist; the rest read as 0.
// `vec`: p is 16-byte aligned, so a full chunk uses the vector load.
template <typename T>
__device__ __forceinline__ void load8(const T* p, int64_t avail, bool vec, float (&v)[8]) {
  if (vec && avail >= 8) {
    load8_aligned(p, v);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = k < avail ? load_f32(p + k) : 0.0f;
  }
}

// The bits of a 16-bit float (an intrinsic: reading them through a uint16_t pointer would
// break the aliasing rules).
__device__ __forceinline__ uint32_t bits16(__half h) { return __half_as_ushort(h); }
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 h) { return __bfloat16_as_ushort(h); }

// 8 float32 values rounded to T and stored with 16-byte stores (p 16-byte aligned).
__device__ __forceinline__ void store8_aligned(float* p, const float (&v)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
template <typename T>
__device__ __forceinline__ void store8_aligned(T* p, const float (&v)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    w[k] = bits16(from_f32<T>(v[2 * k])) | (bits16(from_f32<T>(v[2 * k + 1])) << 16);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// ---------------------------------------------------------------- block scales
// The absmax of quantization block b: plain float32, or decoded from the double-quantized
// state with the one expression every backend uses (rounded multiply, then rounded add).
__device__ __forceinline__ float block_absmax(const float* absmax, const NestedAbsmax& nq,
                                              const float* nested_code, int64_t b) {
  if (absmax != nullptr) return __ldg(absmax + b);
  return qk::decode_nested_absmax(nq.qabsmax, nested_code, nq.nested_absmax, nq.offset, b);
}

inline int log2_int(int64_t v) {
  int r = 0;
  while ((int64_t(1) << (r + 1)) <= v) ++r;
  return r;
}

inline bool host_aligned(const void* p, int bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls f((T*)nullptr) with T the element type of dtype.
template <typename F>
inline cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f((float*)nullptr);
    case kFloat16: return f((__half*)nullptr);
    case kBFloat16: return f((__nv_bfloat16*)nullptr);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qk_cuda
