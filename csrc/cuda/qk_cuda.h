// qk_cuda.h — torch-free launchers of the CUDA kernels (csrc/cuda/*.cu).
//
// The kernels take raw pointers and a cudaStream_t so that the .cu files include only CUDA
// headers and qk_format.h: they compile anywhere nvcc exists, without torch's CUDA headers.
// csrc/cuda/quantize_binding.cpp checks tensors and calls these on the current stream.
//
// Every launcher returns cudaGetLastError() after its launch (cudaSuccess when there was
// nothing to do). Element counts are int64; dtypes are the DType codes below.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace qk_cuda {

// The element type behind a void pointer: float, __half or __nv_bfloat16.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Double-quantized absmax (see qk_format.h: decode_nested_absmax). All null when the
// absmax is plain float32.
struct NestedAbsmax {
  const uint8_t* qabsmax = nullptr;      // [nblocks] uint8 codes
  const float* nested_absmax = nullptr;  // [ceil(nblocks / 256)] float32 scales
  const float* nested_code = nullptr;    // [256] float32 sorted code
  float offset = 0.0f;
};

// x[n] (dtype) -> packed[(n + 1) / 2] uint8 (element 2j in the high nibble), absmax[nblocks]
// float32 (NaN for a block holding NaN). blocksize: power of two in [32, 4096];
// quant_type: qk::kNF4 / kFP4 / kINT4.
cudaError_t quantize_4bit(const void* x, DType dtype, int64_t n, int blocksize, int quant_type,
                          uint8_t* packed, float* absmax, cudaStream_t stream);

// out[i] = code[q[i]] * absmax[i / blocksize] in float32, rounded once to out_dtype. absmax
// is float32, or null with `nested` giving the double-quantized absmax.
cudaError_t dequantize_4bit(const uint8_t* packed, const float* absmax, NestedAbsmax nested,
                            const float* code, int64_t n, int blocksize, DType out_dtype,
                            void* out, cudaStream_t stream);

// 8-bit blockwise with a sorted 256-entry code; any blocksize >= 1.
cudaError_t quantize_8bit(const void* x, DType dtype, int64_t n, int64_t blocksize,
                          const float* code, uint8_t* q, float* absmax, cudaStream_t stream);
cudaError_t dequantize_8bit(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                            int64_t blocksize, DType out_dtype, void* out, cudaStream_t stream);

// y[M, N] = x[M, K] @ W^T (+ bias), W [N, K] 4-bit packed row-major (flat index n * K + k),
// x and y of `dtype`, contiguous. absmax float32 [ceil(N * K / blocksize)] or null with
// `nested`; bias float32 [N] or null, added in float32 before the rounding to `dtype`.
cudaError_t gemv_4bit(const void* x, DType dtype, int64_t M, int64_t K, int64_t N,
                      const uint8_t* packed, const float* absmax, NestedAbsmax nested,
                      const float* code, int blocksize, const float* bias, void* y,
                      cudaStream_t stream);

}  // namespace qk_cuda
