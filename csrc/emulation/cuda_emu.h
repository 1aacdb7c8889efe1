// cuda_emu.h — just enough of CUDA to run the torch-free kernels of csrc/cuda on the host.
//
// For tests/test_cuda_emulated.py: g++ compiles the .cu files as C++ with this header standing
// in for cuda_runtime.h / cuda_fp16.h / cuda_bf16.h (csrc/emulation/include). The runtime
// (cuda_emu.cpp) runs a launch one CUDA block at a time, one user-level fiber per CUDA thread,
// and switches fibers only at __syncthreads / __syncthreads_or / __shfl_xor_sync:
//  * blocks are fixed at 256 threads (all the kernels use); no atomics, no inline PTX;
//  * threads run in a random order between two synchronisation points, and shared memory is
//    poisoned with NaNs at each block start, so a missing __syncthreads changes the results;
//  * a shuffle is a two-phase exchange per warp: every lane named in the mask must arrive at
//    a shuffle with the same mask before any lane reads; a lane missing (exited, or waiting at
//    a barrier) is reported as an error of the launch, as is a barrier some threads skip;
//  * launches are validated like the driver does (block size, grid.y/z <= 65535, dynamic
//    shared memory against the function's attribute, static + dynamic against the emulated
//    arch's opt-in limit);
//  * static __shared__ variables are static storage, which the build moves into one section
//    ("qk_emu_shared") that the runtime poisons; dynamic shared memory goes through
//    QK_DYNAMIC_SHARED;
//  * intrinsics and conversions return the GPU's canonical NaN (float 0x7FFFFFFF, 16-bit
//    0x7FFF); plain float operators stay the host's.
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------ keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static
#define CUDART_VERSION 13000

// ------------------------------------------------------------------ vector types
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// The running thread's coordinates: set by the runtime before it resumes a fiber. Kernel
// code re-reads them after every synchronisation call (those are opaque calls into the runtime).
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

// ------------------------------------------------------------------ runtime API subset
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchFailure = 719,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
};
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr : int {
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrManagedMemory = 83,
  cudaDevAttrConcurrentManagedAccess = 89,
};
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaMemoryType : int { cudaMemoryTypeUnregistered = 0, cudaMemoryTypeManaged = 3 };
struct cudaPointerAttributes { cudaMemoryType type; int device; };
enum cudaMemLocationType : int { cudaMemLocationTypeDevice = 1, cudaMemLocationTypeHost = 2 };
struct cudaMemLocation { cudaMemLocationType type; int id; };

cudaError_t cudaGetLastError();
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void* ptr);
cudaError_t cudaMemPrefetchAsync(const void* ptr, size_t bytes, cudaMemLocation loc,
                                 unsigned flags, cudaStream_t stream);

namespace qk_emu {
cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);
// Runs body(ctx) once per thread of every block of the grid; returns the launch's error.
cudaError_t launch(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem,
                   void (*body)(void*), void* ctx);
void* dynamic_shared();
// Test controls: the arch whose limits apply and the seed of the thread order (also resets
// the cudaFuncSetAttribute values); the message of the last failed launch; the launch log.
void configure(int sm, uint64_t seed);
// The bytes of static __shared__ arrays of a kernel (read from the library's symbol table by
// tests/cuda_emulation.py), counted against the limits as the driver does.
void register_static_smem(const void* kernel, int bytes);
const char* last_error_message();
const char* launch_log();
void clear_log();
}  // namespace qk_emu

template <typename K>
cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return qk_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
}

namespace qk_emu {
// kernel<<<grid, block, smem, stream>>>(args...): each thread gets its own copy of the
// arguments converted to the parameter types, as the GPU passes them by value.
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  const char* name;
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... a) const {
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> args;
    } ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(a)...)};
    auto body = [](void* c) {
      Ctx& x = *static_cast<Ctx*>(c);
      std::tuple<std::decay_t<P>...> copy = x.args;
      std::apply(x.kernel, copy);
    };
    launch(name, reinterpret_cast<const void*>(kernel), grid, block, smem, body, &ctx);
  }
};
template <typename... P>
Launch<P...> make_launch(void (*kernel)(P...), const char* name, dim3 grid, dim3 block,
                         size_t smem) {
  return Launch<P...>{kernel, name, grid, block, smem};
}
}  // namespace qk_emu

#define QK_LAUNCH(grid, block, smem, stream, ...) \
  ::qk_emu::make_launch(__VA_ARGS__, #__VA_ARGS__, (grid), (block), (smem))
#define QK_DYNAMIC_SHARED(type, name) \
  type* const name = static_cast<type*>(::qk_emu::dynamic_shared())

// ------------------------------------------------------------------ synchronisation
void __syncthreads();
int __syncthreads_or(int predicate);
float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32);
int __shfl_xor_sync(unsigned mask, int v, int lane_mask, int width = 32);

// ------------------------------------------------------------------ float intrinsics
namespace qk_emu {
constexpr uint32_t kCanonicalNaN = 0x7FFFFFFFu;  // what GPU arithmetic returns for NaN
inline float canon(float v) {
  if (v != v) {
    float r;
    memcpy(&r, &kCanonicalNaN, 4);
    return r;
  }
  return v;
}
}  // namespace qk_emu
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __fmul_rn(float a, float b) { return qk_emu::canon(a * b); }
inline float __fadd_rn(float a, float b) { return qk_emu::canon(a + b); }
inline float __fmaf_rn(float a, float b, float c) { return qk_emu::canon(fmaf(a, b, c)); }
template <typename T>
inline T __ldg(const T* p) {
  T v;
  memcpy(&v, p, sizeof(T));
  return v;
}
using std::min;
using std::max;

// ------------------------------------------------------------------ 16-bit floats
struct __half { unsigned short x; };
struct __half2 { __half x, y; };
struct __nv_bfloat16 { unsigned short x; };

inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline __half2 __halves2half2(__half lo, __half hi) { return __half2{lo, hi}; }

inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.x & 0x8000u) << 16;
  uint32_t exp = (h.x >> 10) & 0x1Fu, man = h.x & 0x3FFu;
  if (exp == 0x1F) return __uint_as_float(sign | 0x7F800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return __uint_as_float(sign);
    int e = -1;  // subnormal: normalise
    do { man <<= 1; ++e; } while (!(man & 0x400u));
    return __uint_as_float(sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FFu) << 13));
  }
  return __uint_as_float(sign | ((exp + 112) << 23) | (man << 13));
}
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }

// Round to nearest even, as cvt.rn.f16.f32; NaN -> canonical 0x7FFF.
inline __half __float2half_rn(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return __half{0x7FFF};
  if (a >= 0x477FF000u) return __half{(uint16_t)(sign | 0x7C00u)};  // rounds to >= 65520: inf
  if (a < 0x38800000u) {  // below 2^-14: subnormal half, quantum 2^-24
    if (a < 0x33000000u) return __half{sign};  // <= 2^-25 rounds to 0 (tie at 2^-25 to even 0)
    const int e = (int)(a >> 23);
    const uint32_t man = (a & 0x7FFFFFu) | 0x800000u;
    const int shift = 126 - e;  // value = man * 2^(e-150); in units of 2^-24: >> (126 - e)
    uint32_t q = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) ++q;
    return __half{(uint16_t)(sign | q)};
  }
  uint32_t r = a - 0x38000000u;  // rebias 127 -> 15
  const uint32_t rem = r & 0x1FFFu;
  r >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1))) ++r;
  return __half{(uint16_t)(sign | r)};
}

inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((uint32_t)h.x << 16); }
// Round to nearest even, as cvt.rn.bf16.f32; NaN -> canonical 0x7FFF.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return __nv_bfloat16{0x7FFF};
  return __nv_bfloat16{(uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}
