// CUDA kernels for blockwise 4-bit and 8-bit quantize / dequantize (torch-free).
//
// Semantics are those of the PyTorch reference (qlora_kernels/backends/reference) and the CPU
// kernels, bit for bit: the encode/decode math comes from qk_format.h. Built with
// --fmad=false; the few products that must round on their own use __fmul_rn anyway.
#include <type_traits>

#include "qk_device.cuh"

namespace qk_cuda {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

// ============================================================================ quantize_4bit
// One group of LANES = min(32, BS / 8) consecutive lanes per quantization block of BS
// elements. Each lane owns 8-element chunks (16-byte loads when x is 16-byte aligned) at a
// stride of LANES * 8, so a warp's loads are contiguous. The group's absmax comes from one
// xor-shuffle reduction (plus a NaN flag: fmaxf drops NaN, the format keeps it); the chunks
// are kept in registers for the encode pass when BS <= 1024 and re-read (L1 hit) otherwise.
// Each lane writes its 8 codes as one 4-byte store.
// Launch: 256 threads, grid = ceil(nblocks * LANES / 256), on the caller's stream.
template <typename T, int BS>
__global__ void __launch_bounds__(kThreads)
    quantize_4bit_kernel(const T* __restrict__ x, int64_t n, int quant_type, bool vec,
                         uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  constexpr int LANES = BS / 8 < 32 ? BS / 8 : 32;
  constexpr int ITERS = BS / (8 * LANES);
  constexpr bool KEEP = ITERS <= 4;
  const int64_t tid = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  const int64_t block = tid / LANES;
  const int lane = (int)(tid % LANES);
  const int64_t nblocks = (n + BS - 1) / BS;
  // Inactive groups still take part in the shuffles (full-warp masks), with len 0.
  const int64_t start = block * BS;
  const int64_t len = block < nblocks ? (n - start < BS ? n - start : BS) : 0;

  float kept[KEEP ? ITERS : 1][8];
  float m = 0.0f;
  int nan = 0;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t off = (int64_t)it * LANES * 8 + lane * 8;
    float v[8];
    load8(x + start + off, len - off, vec, v);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      m = fmaxf(m, fabsf(v[k]));
      nan |= v[k] != v[k];
      if (KEEP) kept[KEEP ? it : 0][k] = v[k];
    }
  }
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) {
    m = fmaxf(m, __shfl_xor_sync(kFullMask, m, o));
    nan |= __shfl_xor_sync(kFullMask, nan, o);
  }
  if (nan) m = __int_as_float(0x7fc00000);
  if (lane == 0 && len > 0) absmax[block] = m;
  const float inv = qk::inverse_absmax_4bit(m);

  // Re-reading loops stay rolled: unrolling 8-16 encode passes only grows the code.
#pragma unroll(KEEP ? ITERS : 1)
  for (int it = 0; it < ITERS; ++it) {
    const int64_t off = (int64_t)it * LANES * 8 + lane * 8;
    if (off >= len) break;
    float v[8];
    if (KEEP) {
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = kept[KEEP ? it : 0][k];
    } else {
      load8(x + start + off, len - off, vec, v);
    }
    int c[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) c[k] = qk::encode_4bit(quant_type, v[k] * inv);
    uint8_t* dst = packed + (start + off) / 2;
    if (vec && len - off >= 8) {
      uint32_t w = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) w |= (uint32_t)qk::pack_pair(c[2 * j], c[2 * j + 1]) << (8 * j);
      *reinterpret_cast<uint32_t*>(dst) = w;
    } else {
      // Partial chunk (last block) or unaligned pointers: byte stores. An odd numel's
      // final low nibble encodes the 0.0 that load8 read past the end, as bitsandbytes'
      // kernel does.
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t e = off + 2 * j;
        if (e < len) dst[j] = qk::pack_pair(c[2 * j], c[2 * j + 1]);
      }
    }
  }
}

template <typename F>
cudaError_t dispatch_blocksize(int bs, F&& f) {
  switch (bs) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 256: return f(std::integral_constant<int, 256>{});
    case 512: return f(std::integral_constant<int, 512>{});
    case 1024: return f(std::integral_constant<int, 1024>{});
    case 2048: return f(std::integral_constant<int, 2048>{});
    case 4096: return f(std::integral_constant<int, 4096>{});
  }
  return cudaErrorInvalidValue;
}

// ============================================================================ dequantize_4bit
// One thread per 8-element chunk (grid-stride): one 4-byte load of packed codes, 8 products
// code[q] * absmax in float32 (code table in shared memory), each rounded once to T, and
// 16-byte stores. A chunk never straddles two quantization blocks (blocksize >= 32), so
// the block's absmax (decoded in-kernel when double-quantized, with the nested code in
// shared memory) is read once per chunk. Unaligned pointers and the tail use scalar code.
// Launch: 256 threads, grid = min(ceil(n / 8 / 256), 65536), on the caller's stream.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                           NestedAbsmax nq, const float* __restrict__ code, int64_t n,
                           int log2_bs, bool vec, T* __restrict__ out) {
  __shared__ float s_code[16];
  __shared__ float s_ncode[256];
  if (threadIdx.x < 16) s_code[threadIdx.x] = code[threadIdx.x];
  if (nq.nested_code != nullptr) s_ncode[threadIdx.x] = nq.nested_code[threadIdx.x];
  __syncthreads();
  const int64_t nchunks = (n + 7) / 8;
  for (int64_t c = (int64_t)blockIdx.x * kThreads + threadIdx.x; c < nchunks;
       c += (int64_t)gridDim.x * kThreads) {
    const int64_t e = c * 8;
    const float m = block_absmax(absmax, nq, s_ncode, e >> log2_bs);
    if (vec && e + 8 <= n) {
      const uint32_t w = __ldg(reinterpret_cast<const uint32_t*>(packed + e / 2));
      float v[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint8_t b = (uint8_t)(w >> (8 * j));
        v[2 * j] = __fmul_rn(s_code[qk::unpack_hi(b)], m);
        v[2 * j + 1] = __fmul_rn(s_code[qk::unpack_lo(b)], m);
      }
      store8_aligned(out + e, v);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int64_t i = e + k;
        if (i < n) {
          const uint8_t b = packed[i / 2];
          const int q = (i & 1) ? qk::unpack_lo(b) : qk::unpack_hi(b);
          out[i] = from_f32<T>(__fmul_rn(s_code[q], m));
        }
      }
    }
  }
}

// ============================================================================ quantize_8bit
// One warp per quantization block (grid-stride over blocks; any blocksize): lanes stride 32
// over the block for the absmax (xor-shuffle reduction, NaN tracked), then encode each value
// by binary search over the sorted 256-entry code staged in shared memory.
// Launch: 256 threads, grid = min(ceil(nblocks / 8), 65536), on the caller's stream.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_8bit_kernel(const T* __restrict__ x, int64_t n, int64_t bs,
                         const float* __restrict__ code, uint8_t* __restrict__ q,
                         float* __restrict__ absmax) {
  __shared__ float s_code[256];
  s_code[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t nblocks = (n + bs - 1) / bs;
  const int64_t warps = (int64_t)gridDim.x * (kThreads / 32);
  // b is the same for every lane of a warp, so the shuffles see the whole warp.
  for (int64_t b = (int64_t)blockIdx.x * (kThreads / 32) + threadIdx.x / 32; b < nblocks;
       b += warps) {
    const int64_t start = b * bs, end = start + bs < n ? start + bs : n;
    float m = 0.0f;
    int nan = 0;
    for (int64_t i = start + lane; i < end; i += 32) {
      const float v = load_f32(x + i);
      m = fmaxf(m, fabsf(v));
      nan |= v != v;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      m = fmaxf(m, __shfl_xor_sync(kFullMask, m, o));
      nan |= __shfl_xor_sync(kFullMask, nan, o);
    }
    if (nan) m = __int_as_float(0x7fc00000);
    if (lane == 0) absmax[b] = m;
    const float inv = qk::inverse_absmax(m);
    for (int64_t i = start + lane; i < end; i += 32)
      q[i] = (uint8_t)qk::encode_sorted256(s_code, load_f32(x + i) * inv);
  }
}

// ============================================================================ dequantize_8bit
// One thread per 8-element chunk (grid-stride): an 8-byte load of codes when aligned,
// out = code[q] * absmax[i / bs] in float32 (code in shared memory) rounded once to T,
// 16-byte stores when aligned. Any blocksize: the block index advances element by element.
// Launch: 256 threads, grid = min(ceil(n / 8 / 256), 65536), on the caller's stream.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_8bit_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax,
                           const float* __restrict__ code, int64_t n, int64_t bs, bool vec,
                           T* __restrict__ out) {
  __shared__ float s_code[256];
  s_code[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int64_t nchunks = (n + 7) / 8;
  for (int64_t c = (int64_t)blockIdx.x * kThreads + threadIdx.x; c < nchunks;
       c += (int64_t)gridDim.x * kThreads) {
    const int64_t e = c * 8;
    int64_t b = e / bs, rem = e - b * bs;
    float m = __ldg(absmax + b);
    if (vec && e + 8 <= n) {
      const uint2 w = __ldg(reinterpret_cast<const uint2*>(q + e));
      float v[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        if (rem == bs) {
          rem = 0;
          m = __ldg(absmax + ++b);
        }
        const uint8_t qb = (uint8_t)((k < 4 ? w.x : w.y) >> (8 * (k & 3)));
        v[k] = __fmul_rn(s_code[qb], m);
        ++rem;
      }
      store8_aligned(out + e, v);
    } else {
      for (int k = 0; k < 8 && e + k < n; ++k) {
        if (rem == bs) {
          rem = 0;
          m = __ldg(absmax + ++b);
        }
        out[e + k] = from_f32<T>(__fmul_rn(s_code[q[e + k]], m));
        ++rem;
      }
    }
  }
}

inline unsigned grid_for(int64_t work_items, int64_t per_block) {
  const int64_t g = ceil_div(work_items, per_block);
  return (unsigned)(g < 65536 ? (g > 0 ? g : 1) : 65536);
}

}  // namespace

// ============================================================================ launchers
cudaError_t quantize_4bit(const void* x, DType dtype, int64_t n, int blocksize, int quant_type,
                          uint8_t* packed, float* absmax, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const bool vec = host_aligned(x, 16) && host_aligned(packed, 4);
  return dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return dispatch_blocksize(blocksize, [&](auto bs_tag) {
      constexpr int BS = decltype(bs_tag)::value;
      constexpr int LANES = BS / 8 < 32 ? BS / 8 : 32;
      const int64_t grid = ceil_div(ceil_div(n, BS) * LANES, kThreads);
      QK_LAUNCH((unsigned)grid, kThreads, 0, stream, quantize_4bit_kernel<T, BS>)(
          static_cast<const T*>(x), n, quant_type, vec, packed, absmax);
      return cudaGetLastError();
    });
  });
}

cudaError_t dequantize_4bit(const uint8_t* packed, const float* absmax, NestedAbsmax nested,
                            const float* code, int64_t n, int blocksize, DType out_dtype,
                            void* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (!qk::is_supported_blocksize(blocksize)) return cudaErrorInvalidValue;
  const bool vec = host_aligned(out, 16) && host_aligned(packed, 4);
  const unsigned grid = grid_for(ceil_div(n, 8), kThreads);
  return dispatch_dtype(out_dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    QK_LAUNCH(grid, kThreads, 0, stream, dequantize_4bit_kernel<T>)(
        packed, absmax, nested, code, n, log2_int(blocksize), vec, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t quantize_8bit(const void* x, DType dtype, int64_t n, int64_t blocksize,
                          const float* code, uint8_t* q, float* absmax, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (blocksize <= 0) return cudaErrorInvalidValue;
  const unsigned grid = grid_for(ceil_div(n, blocksize), kThreads / 32);
  return dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    QK_LAUNCH(grid, kThreads, 0, stream, quantize_8bit_kernel<T>)(static_cast<const T*>(x), n,
                                                                  blocksize, code, q, absmax);
    return cudaGetLastError();
  });
}

cudaError_t dequantize_8bit(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                            int64_t blocksize, DType out_dtype, void* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (blocksize <= 0) return cudaErrorInvalidValue;
  const bool vec = host_aligned(out, 16) && host_aligned(q, 8);
  const unsigned grid = grid_for(ceil_div(n, 8), kThreads);
  return dispatch_dtype(out_dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    QK_LAUNCH(grid, kThreads, 0, stream, dequantize_8bit_kernel<T>)(q, absmax, code, n, blocksize,
                                                                    vec, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

}  // namespace qk_cuda
