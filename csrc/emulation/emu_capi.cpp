// emu_capi.cpp — C entry points of the emulated CUDA kernels, for ctypes
// (tests/cuda_emulation.py).
//
// Each wraps the launcher the torch binding calls (qk_cuda.h, adamw_kernels.cuh) with the same
// arguments, so the tests run the same host launch code (grid, tile and kernel choice) as a GPU.
// Returns the launcher's cudaError_t; qk_emu_last_error() says what failed.
#include "../cuda/adamw_kernels.cuh"
#include "../cuda/qk_cuda.h"
#include "cuda_emu.h"

namespace {
qk_cuda::NestedAbsmax nested(const uint8_t* qabsmax, const float* nested_absmax,
                             const float* nested_code, float offset) {
  qk_cuda::NestedAbsmax nq;
  nq.qabsmax = qabsmax;
  nq.nested_absmax = nested_absmax;
  nq.nested_code = nested_code;
  nq.offset = offset;
  return nq;
}

// The probe: thread t writes t to shared memory, reads thread 255 - t's slot after the
// barrier, adds its xor-1 neighbour's value. The other modes break one rule each, which the
// emulation must expose: no barrier, a lane exits before the shuffle, lanes outside the mask.
enum ProbeMode : int { kProbeNoBarrier = 0, kProbeOk = 1, kProbeLaneExits = 2, kProbeHalfMask = 3 };

__global__ void probe_kernel(float* out, int mode) {
  __shared__ float s[256];
  s[threadIdx.x] = (float)threadIdx.x;
  if (mode != kProbeNoBarrier) __syncthreads();
  if (mode == kProbeLaneExits && threadIdx.x == 5) return;
  float v = s[255 - threadIdx.x];
  v += __shfl_xor_sync(mode == kProbeHalfMask ? 0x0000ffffu : 0xffffffffu, v, 1);
  if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) out[threadIdx.x] = v;
}
}  // namespace

extern "C" {

void qk_emu_configure(int sm, uint64_t seed) { qk_emu::configure(sm, seed); }
void qk_emu_register_static_smem(const void* kernel, int bytes) {
  qk_emu::register_static_smem(kernel, bytes);
}
const char* qk_emu_last_error() { return qk_emu::last_error_message(); }
const char* qk_emu_launch_log() { return qk_emu::launch_log(); }
void qk_emu_clear_log() { qk_emu::clear_log(); }

int qk_emu_quantize_4bit(const void* x, int dtype, int64_t n, int blocksize, int quant_type,
                         uint8_t* packed, float* absmax) {
  return qk_cuda::quantize_4bit(x, (qk_cuda::DType)dtype, n, blocksize, quant_type, packed, absmax,
                                nullptr);
}

int qk_emu_dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                           const float* nested_absmax, const float* nested_code, float offset,
                           const float* code, int64_t n, int blocksize, int out_dtype, void* out) {
  const qk_cuda::NestedAbsmax nq = nested(qabsmax, nested_absmax, nested_code, offset);
  return qk_cuda::dequantize_4bit(packed, absmax, nq, code, n, blocksize,
                                  (qk_cuda::DType)out_dtype, out, nullptr);
}

int qk_emu_quantize_8bit(const void* x, int dtype, int64_t n, int64_t blocksize, const float* code,
                         uint8_t* q, float* absmax) {
  return qk_cuda::quantize_8bit(x, (qk_cuda::DType)dtype, n, blocksize, code, q, absmax, nullptr);
}

int qk_emu_dequantize_8bit(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                           int64_t blocksize, int out_dtype, void* out) {
  return qk_cuda::dequantize_8bit(q, absmax, code, n, blocksize, (qk_cuda::DType)out_dtype, out,
                                  nullptr);
}

int qk_emu_gemv_4bit(const void* x, int dtype, int64_t M, int64_t K, int64_t N,
                     const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                     const float* nested_absmax, const float* nested_code, float offset,
                     const float* code, int blocksize, const float* bias, void* y) {
  return qk_cuda::gemv_4bit(x, (qk_cuda::DType)dtype, M, K, N, packed, absmax,
                            nested(qabsmax, nested_absmax, nested_code, offset), code, blocksize,
                            bias, y, nullptr);
}

int qk_emu_adamw32(int ptype, void* p, const void* g, float* m, float* v, int64_t n, double lr,
                   double beta1, double beta2, double eps, double weight_decay, int64_t step,
                   int maximize) {
  const qk::AdamWScalars s =
      qk::make_adamw_scalars(lr, beta1, beta2, eps, weight_decay, step, maximize != 0);
  return qk_cuda::launch_adamw32(ptype, p, g, m, v, n, s, nullptr);
}

// steps[t]: param t's step (the binding counts torch's step tensors, then builds the scalars).
int qk_emu_adamw32_multi(int ptype, int64_t count, void* const* p, const void* const* g,
                         float* const* m, float* const* v, const int64_t* n, const int64_t* steps,
                         double lr, double beta1, double beta2, double eps, double weight_decay,
                         int maximize) {
  qk::AdamWScalars* s = new qk::AdamWScalars[count > 0 ? count : 1];
  for (int64_t t = 0; t < count; ++t)
    s[t] = qk::make_adamw_scalars(lr, beta1, beta2, eps, weight_decay, steps[t], maximize != 0);
  const int err = qk_cuda::launch_adamw32_multi(ptype, count, p, g, m, v, n, s, nullptr);
  delete[] s;
  return err;
}

int qk_emu_adamw8bit(int ptype, void* p, const void* g, uint8_t* qm, float* absmax_m,
                     uint8_t* qv, float* absmax_v, const float* code_m, const float* code_v,
                     int64_t n, double lr, double beta1, double beta2, double eps,
                     double weight_decay, int64_t step, int maximize) {
  const qk::AdamWScalars s =
      qk::make_adamw_scalars(lr, beta1, beta2, eps, weight_decay, step, maximize != 0);
  return qk_cuda::launch_adamw8bit(ptype, p, g, qm, absmax_m, qv, absmax_v, code_m, code_v, n, s,
                                   nullptr);
}

// The probe kernel launched with any configuration: checks the emulation's own launch
// validation and synchronisation (tests/test_cuda_emulated.py).
int qk_emu_probe_launch(unsigned gx, unsigned gy, unsigned gz, unsigned threads, int64_t smem,
                        int mode, float* out) {
  QK_LAUNCH(dim3(gx, gy, gz), dim3(threads), (size_t)smem, nullptr, probe_kernel)(out, mode);
  return cudaGetLastError();
}
}
