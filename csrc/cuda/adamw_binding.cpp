// Torch binding of the CUDA AdamW kernels (csrc/cuda/adamw_kernels.cu): input checks, the
// device guard and current stream, then the torch-free launchers. CUDA builds only.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "adamw_kernels.cuh"
#include "qk_optim_checks.h"

namespace qlora_kernels::cuda {
namespace {

int param_type(const at::Tensor& p, const char* op) {
  switch (p.scalar_type()) {
    case at::kFloat: return qk_cuda::kFloat32;
    case at::kHalf: return qk_cuda::kFloat16;
    case at::kBFloat16: return qk_cuda::kBFloat16;
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

// Many params, few launches (csrc/cuda/adamw_kernels.cu, adamw32_multi_kernel): one launch
// per param costs more than the update of a LoRA-sized param. Params of one dtype go to one
// launcher call; the CPU step counters are counted here, after every check passed.
void adamw_step_multi_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList state_steps, double lr,
                           double beta1, double beta2, double eps, double weight_decay,
                           bool maximize) {
  const char* op = "adamw_step_multi_";
  const std::vector<int64_t> steps = qk_optim::check_adamw32_multi(
      params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, eps);
  const size_t n = params.size();
  if (n == 0) return;
  for (size_t t = 0; t < n; ++t)
    TORCH_CHECK(params[t].is_cuda() && params[t].device() == params[0].device(), op,
                ": every param must be on one CUDA device, params[", t, "] is on ",
                params[t].device(), " and params[0] on ", params[0].device());
  for (size_t t = 0; t < n; ++t) *state_steps[t].data_ptr<float>() = static_cast<float>(steps[t]);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> g(n);  // keeps contiguous copies alive until the launches are queued
  for (int ptype : {qk_cuda::kFloat32, qk_cuda::kFloat16, qk_cuda::kBFloat16}) {
    std::vector<void*> pp;
    std::vector<const void*> gp;
    std::vector<float*> mp, vp;
    std::vector<int64_t> np;
    std::vector<qk::AdamWScalars> sp;
    for (size_t t = 0; t < n; ++t) {
      if (param_type(params[t], op) != ptype) continue;
      g[t] = grads[t].contiguous();
      pp.push_back(params[t].data_ptr());
      gp.push_back(g[t].data_ptr());
      mp.push_back(exp_avgs[t].data_ptr<float>());
      vp.push_back(exp_avg_sqs[t].data_ptr<float>());
      np.push_back(params[t].numel());
      sp.push_back(
          qk::make_adamw_scalars(lr, beta1, beta2, eps, weight_decay, steps[t], maximize));
    }
    if (pp.empty()) continue;
    const cudaError_t err = qk_cuda::launch_adamw32_multi(
        ptype, (int64_t)pp.size(), pp.data(), gp.data(), mp.data(), vp.data(), np.data(),
        sp.data(), stream);
    TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  }
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
  m.impl("adamw_step_multi_", &adamw_step_multi_cuda);
  m.impl("adamw8bit_step_", &adamw8bit_step_cuda);
}

}  // namespace qlora_kernels::cuda
