// gemv_4bit: y[M, N] = x[M, K] @ W^T for small M (decode-time batch sizes 1..16), with W
// [N, K] stored 4-bit (packed row-major: flat index n * K + k, element 2j in the high
// nibble) and its blockwise absmax float32 or double-quantized (decoded on the fly).
// Accumulates in float32 with explicit FMAs (the build uses --fmad=false for the bit-exact
// quantize kernels; here rounding differences from the reference are expected and fine)
// and writes x.dtype.
//
// Two kernels, each one warp per output feature n and MT rows of x per tile (MT = 1, 2, 4,
// 8 or 16); CTAs along y stride over the tiles by gridDim.y (M may need more than 65,535):
//  * fast (K % blocksize == 0, packed 16-byte aligned): the tile of x is staged in shared
//    memory as float32, KT elements of K per pass (all of K when it fits), padded by 4
//    floats every 32 so that lanes reading neighbouring 32-element chunks with 16-byte
//    loads hit distinct banks. Each lane loads 16 bytes of W (32 codes, all in one
//    quantization block since 32 | blocksize | K), multiplies the codes by x, and scales
//    the partial sums by the block's absmax once.
//  * general (any K, e.g. odd or not a multiple of the blocksize): lanes stride over k
//    element by element, x read through L1.
// Launch (csrc/cuda/gemv_plan.h): 256 threads (8 warps = 8 output features) per CTA,
// grid = (ceil(N / 8), min(ceil(M / MT), 65535)), dynamic shared memory
// min(M, MT) * KT / 32 * 36 * 4 bytes for the fast kernel.
#include <type_traits>

#include "gemv_plan.h"
#include "qk_device.cuh"

namespace qk_cuda {
namespace {

constexpr int kThreads = kGemvThreads;
constexpr int kWarps = kGemvWarps;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kPaddedChunk = kGemvPaddedChunk;
// Dynamic shared memory usable without opting in: 48 KiB less the static tables (1088 B).
constexpr int64_t kDefaultSmem = 46 * 1024;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Stages the 16-entry code and the nested 256-entry code; the caller syncs.
__device__ __forceinline__ void stage_tables(const float* code, const NestedAbsmax& nq,
                                             float* s_code, float* s_ncode) {
  if (threadIdx.x < 16) s_code[threadIdx.x] = code[threadIdx.x];
  if (nq.nested_code != nullptr) s_ncode[threadIdx.x] = nq.nested_code[threadIdx.x];
}

// The kernels' arguments (one struct: both kernels take the same).
template <typename T>
struct GemvArgs {
  const T* x;  // [M, K]
  int64_t M, K, N;
  const uint8_t* W;    // packed [N * K / 2]
  const float* absmax;  // null when double-quantized (nq)
  NestedAbsmax nq;
  const float* code;  // [16]
  int log2_bs;
  const float* bias;  // [N] or null
  T* y;               // [M, N]
  int64_t kt;         // fast kernel: elements of K staged per pass
};

template <typename T, int MT>
__device__ __forceinline__ void write_outputs(float (&acc)[MT], int64_t m0, int mc, int64_t N,
                                              int64_t n, const float* bias, T* y) {
  const float b = bias != nullptr ? bias[n] : 0.0f;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const float s = warp_sum(acc[m]);
    if (threadIdx.x % 32 == 0 && m < mc) y[(m0 + m) * N + n] = from_f32<T>(__fadd_rn(s, b));
  }
}

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads) gemv_4bit_fast_kernel(const GemvArgs<T> a) {
  const int64_t K = a.K;
  QK_DYNAMIC_SHARED(float4, s_x4);
  float* s_x = reinterpret_cast<float*>(s_x4);
  __shared__ float s_code[16];
  __shared__ float s_ncode[256];
  stage_tables(a.code, a.nq, s_code, s_ncode);
  // Warps past N still stage x and reach every barrier; they only skip the products.
  const int64_t n = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const bool active = n < a.N;
  const int lane = threadIdx.x % 32;
  const uint4* wrow = reinterpret_cast<const uint4*>(a.W + (active ? n : 0) * (K / 2));
  const int64_t row_tiles = (a.M + MT - 1) / MT;
  for (int64_t tile = blockIdx.y; tile < row_tiles; tile += gridDim.y) {
    const int64_t m0 = tile * MT;
    const int mc = (int)(a.M - m0 < MT ? a.M - m0 : MT);
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += a.kt) {
      // kn <= kt floats staged in shared memory: int. (int64 here made ptxas spill the
      // MT = 4 instantiation for sm_90; tests/test_cuda_compile.py checks every arch built.)
      const int kn = (int)(K - k0 < a.kt ? K - k0 : a.kt);
      const int row_stride = kn / 32 * kPaddedChunk;
      __syncthreads();  // the previous pass's reads of s_x (and the tables' writes) are done
      for (int64_t i = threadIdx.x; i < (int64_t)mc * kn; i += kThreads) {
        const int64_t m = i / kn, k = i - m * kn;
        s_x[m * row_stride + k + (k >> 5) * 4] = load_f32(a.x + (m0 + m) * K + k0 + k);
      }
      __syncthreads();
      if (!active) continue;
      const int nck = (int)(kn / 32);
      const uint4* wpass = wrow + k0 / 32;
      const int64_t e0 = n * K + k0;
      for (int c = lane; c < nck; c += 32) {
        const uint4 wv = __ldg(wpass + c);
        const float scale =
            block_absmax(a.absmax, a.nq, s_ncode, (e0 + c * 32) >> a.log2_bs);
        const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
        float part[MT];
#pragma unroll
        for (int m = 0; m < MT; ++m) part[m] = 0.0f;
#pragma unroll
        for (int g = 0; g < 8; ++g) {  // 4 elements: bytes 2g, 2g+1 of the chunk
          const uint32_t w = words[g / 2] >> (16 * (g % 2));
          const float w0 = s_code[(w >> 4) & 15], w1 = s_code[w & 15];
          const float w2 = s_code[(w >> 12) & 15], w3 = s_code[(w >> 8) & 15];
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            if (m < mc) {
              const float4 xv = *reinterpret_cast<const float4*>(s_x + m * row_stride +
                                                                 c * kPaddedChunk + 4 * g);
              part[m] = __fmaf_rn(w0, xv.x, part[m]);
              part[m] = __fmaf_rn(w1, xv.y, part[m]);
              part[m] = __fmaf_rn(w2, xv.z, part[m]);
              part[m] = __fmaf_rn(w3, xv.w, part[m]);
            }
          }
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[m] = __fmaf_rn(part[m], scale, acc[m]);
      }
    }
    if (active) write_outputs<T, MT>(acc, m0, mc, a.N, n, a.bias, a.y);
  }
}

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads) gemv_4bit_general_kernel(const GemvArgs<T> a) {
  const int64_t K = a.K;
  __shared__ float s_code[16];
  __shared__ float s_ncode[256];
  stage_tables(a.code, a.nq, s_code, s_ncode);
  __syncthreads();
  const int64_t n = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  if (n >= a.N) return;  // whole warps leave together; no block-wide sync follows
  const int lane = threadIdx.x % 32;
  const int64_t row_tiles = (a.M + MT - 1) / MT;
  for (int64_t tile = blockIdx.y; tile < row_tiles; tile += gridDim.y) {
    const int64_t m0 = tile * MT;
    const int mc = (int)(a.M - m0 < MT ? a.M - m0 : MT);
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
    int64_t cached_block = -1;
    float scale = 0.0f;
    for (int64_t k = lane; k < K; k += 32) {
      const int64_t e = n * K + k;
      const int64_t b = e >> a.log2_bs;
      if (b != cached_block) {  // consecutive k share a block: decode its absmax once
        scale = block_absmax(a.absmax, a.nq, s_ncode, b);
        cached_block = b;
      }
      const uint8_t byte = __ldg(a.W + e / 2);
      const float w =
          __fmul_rn(s_code[(e & 1) ? qk::unpack_lo(byte) : qk::unpack_hi(byte)], scale);
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m < mc) acc[m] = __fmaf_rn(w, load_f32(a.x + (m0 + m) * K + k), acc[m]);
    }
    write_outputs<T, MT>(acc, m0, mc, a.N, n, a.bias, a.y);
  }
}

template <typename F>
cudaError_t dispatch_mtile(int mt, F&& f) {
  switch (mt) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 16>{});
  }
}

// Largest shared memory a CTA may opt into on the current device (48 KiB without opt-in).
inline int64_t max_dynamic_smem() {
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return kDefaultSmem;
  return optin - 2 * 1024;  // leave room for the static tables
}

}  // namespace

cudaError_t gemv_4bit(const void* x, DType dtype, int64_t M, int64_t K, int64_t N,
                      const uint8_t* packed, const float* absmax, NestedAbsmax nested,
                      const float* code, int blocksize, const float* bias, void* y,
                      cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (!qk::is_supported_blocksize(blocksize) || K < 0 || M < 0 || N < 0)
    return cudaErrorInvalidValue;
  const GemvPlan plan =
      plan_gemv(M, K, N, blocksize, host_aligned(packed, 16), max_dynamic_smem());
  if (plan.grid_x > 0x7fffffff) return cudaErrorInvalidValue;
  const int mt = plan.mt;
  const bool fast = plan.fast;
  const int64_t smem = plan.smem;
  const int log2_bs = log2_int(blocksize);
  const dim3 grid((unsigned)plan.grid_x, (unsigned)plan.grid_y);
  return dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return dispatch_mtile(mt, [&](auto mt_tag) {
      constexpr int MT = decltype(mt_tag)::value;
      const GemvArgs<T> args{static_cast<const T*>(x), M, K, N, packed, absmax,
                             nested, code, log2_bs, bias, static_cast<T*>(y), plan.kt};
      if (fast) {
        auto kernel = gemv_4bit_fast_kernel<T, MT>;
        if (smem > kDefaultSmem) {
          const cudaError_t err = cudaFuncSetAttribute(
              kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
          if (err != cudaSuccess) return err;
        }
        QK_LAUNCH(grid, kThreads, (size_t)smem, stream, gemv_4bit_fast_kernel<T, MT>)(args);
      } else {
        QK_LAUNCH(grid, kThreads, 0, stream, gemv_4bit_general_kernel<T, MT>)(args);
      }
      return cudaGetLastError();
    });
  });
}

}  // namespace qk_cuda
