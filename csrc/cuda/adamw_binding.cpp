// Torch binding of the CUDA AdamW kernels (csrc/cuda/adamw_kernels.cu): input checks, the
// device guard and current stream, then the torch-free launchers. CUDA builds only.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "adamw_kernels.cuh"
#include "qk_optim_checks.h"

namespace qlora_kernels::cuda {
namespace {

int param_type(const at::Tensor& p, const char* op) {
  switch (p.scalar_type()) {
    case at::kFloat: return qk_cuda::kF32;
    case at::kHalf: return qk_cuda::kF16;
    case at::kBFloat16: return qk_cuda::kBF16;
    default: TORCH_CHECK(false, op, ": param must be float32, float16 or bfloat16, got ",
                         p.scalar_type());
  }
}

void adamw_step_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                     at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                     double weight_decay, int64_t step, bool maximize) {
  const char* op = "adamw_step_";
  qk_optim::check_adamw32(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, step);
  const int64_t n = param.numel();
  const c10::cuda::CUDAGuard guard(param.device());
  const at::Tensor g = grad.contiguous();
  const qk::AdamWScalars s =
      qk::make_adamw_scalars(lr, beta1, beta2, eps, weight_decay, step, maximize);
  const cudaError_t err = qk_cuda::launch_adamw32(
      param_type(param, op), param.data_ptr(), g.data_ptr(), exp_avg.data_ptr<float>(),
      exp_avg_sq.data_ptr<float>(), n, s, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

void adamw8bit_step_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& qm,
                         at::Tensor& absmax_m, at::Tensor& qv, at::Tensor& absmax_v,
                         const at::Tensor& code_m, const at::Tensor& code_v, double lr,
                         double beta1, double beta2, double eps, double weight_decay,
                         int64_t step, bool maximize) {
  const char* op = "adamw8bit_step_";
  qk_optim::check_adamw8bit(param, grad, qm, absmax_m, qv, absmax_v, code_m, code_v, lr, beta1,
                            beta2, eps, step);
  const int64_t n = param.numel();
  const c10::cuda::CUDAGuard guard(param.device());
  const at::Tensor g = grad.contiguous();
  const qk::AdamWScalars s =
      qk::make_adamw_scalars(lr, beta1, beta2, eps, weight_decay, step, maximize);
  const cudaError_t err = qk_cuda::launch_adamw8bit(
      param_type(param, op), param.data_ptr(), g.data_ptr(), qm.data_ptr<uint8_t>(),
      absmax_m.data_ptr<float>(), qv.data_ptr<uint8_t>(), absmax_v.data_ptr<float>(),
      code_m.data_ptr<float>(), code_v.data_ptr<float>(), n, s, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_kernels, CUDA, m) {
  m.impl("adamw_step_", &adamw_step_cuda);
  m.impl("adamw8bit_step_", &adamw8bit_step_cuda);
}

}  // namespace qlora_kernels::cuda
