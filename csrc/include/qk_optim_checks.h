// Argument checks of the optimizer ops (adamw_step_, adamw_step_multi_, adamw8bit_step_),
// shared by the CPU kernels (csrc/cpu/adamw_cpu.cpp) and the CUDA binding
// (csrc/cuda/adamw_binding.cpp) so that both reject bad input with the same messages.
// Needs ATen (unlike qk_format.h / qk_adamw.h).
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "qk_adamw.h"

namespace qk_optim {

inline void check_state(const at::Tensor& param, const at::Tensor& t, at::ScalarType dtype,
                        int64_t numel, const char* op, const char* what) {
  TORCH_CHECK(t.device() == param.device(), op, ": ", what, " is on ", t.device(),
              " but param is on ", param.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", what, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.numel() == numel, op, ": ", what, " has ", t.numel(), " elements, expected ",
              numel);
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, " must be contiguous");
}

// param, grad and the hyperparameters.
inline void check_common(const at::Tensor& param, const at::Tensor& grad, double lr, double beta1,
                         double beta2, double eps, int64_t step, const char* op) {
  const auto dt = param.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": param must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(param.is_contiguous(), op, ": param must be contiguous (it is updated in place)");
  TORCH_CHECK(!grad.is_sparse(), op, ": sparse gradients are not supported");
  TORCH_CHECK(grad.scalar_type() == dt, op, ": grad dtype ", grad.scalar_type(),
              " differs from param dtype ", dt);
  TORCH_CHECK(grad.numel() == param.numel(), op, ": grad has ", grad.numel(), " elements, param ",
              param.numel());
  TORCH_CHECK(grad.device() == param.device(), op, ": grad is on ", grad.device(),
              " but param is on ", param.device());
  TORCH_CHECK(lr >= 0.0, op, ": lr must be >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, op, ": beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, op, ": beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  TORCH_CHECK(step >= 1, op, ": step must be >= 1 (count it before the update), got ", step);
}

inline void check_adamw32(const at::Tensor& param, const at::Tensor& grad,
                          const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, double lr,
                          double beta1, double beta2, double eps, int64_t step) {
  const char* op = "adamw_step_";
  check_common(param, grad, lr, beta1, beta2, eps, step, op);
  check_state(param, exp_avg, at::kFloat, param.numel(), op, "exp_avg");
  check_state(param, exp_avg_sq, at::kFloat, param.numel(), op, "exp_avg_sq");
}

inline void check_adamw8bit(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& qm,
                            const at::Tensor& absmax_m, const at::Tensor& qv,
                            const at::Tensor& absmax_v, const at::Tensor& code_m,
                            const at::Tensor& code_v, double lr, double beta1, double beta2,
                            double eps, int64_t step) {
  const char* op = "adamw8bit_step_";
  check_common(param, grad, lr, beta1, beta2, eps, step, op);
  const int64_t n = param.numel();
  const int64_t nblocks = (n + qk::kOptimBlocksize - 1) / qk::kOptimBlocksize;
  check_state(param, qm, at::kByte, n, op, "qm");
  check_state(param, qv, at::kByte, n, op, "qv");
  check_state(param, absmax_m, at::kFloat, nblocks, op, "absmax_m (one per 256 elements)");
  check_state(param, absmax_v, at::kFloat, nblocks, op, "absmax_v (one per 256 elements)");
  check_state(param, code_m, at::kFloat, 256, op, "code_m");
  check_state(param, code_v, at::kFloat, 256, op, "code_v");
}

// adamw_step_multi_ (CPU and CUDA): equal list lengths, every param's checks, and the step
// counters, each a one-element float32 CPU tensor (torch's state layout) holding a whole
// count. Returns each param's step for this update (count + 1). Writes nothing, so a bad
// tensor anywhere in the lists leaves every counter and param as it was.
inline std::vector<int64_t> check_adamw32_multi(at::TensorList params, at::TensorList grads,
                                                at::TensorList exp_avgs,
                                                at::TensorList exp_avg_sqs,
                                                at::TensorList state_steps, double lr,
                                                double beta1, double beta2, double eps) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  state_steps.size() == n,
              "adamw_step_multi_: params, grads, exp_avgs, exp_avg_sqs and state_steps must have "
              "the same length, got ", n, ", ", grads.size(), ", ", exp_avgs.size(), ", ",
              exp_avg_sqs.size(), ", ", state_steps.size());
  std::vector<int64_t> steps(n);
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& st = state_steps[t];
    TORCH_CHECK(st.device().is_cpu() && st.scalar_type() == at::kFloat && st.numel() == 1,
                "adamw_step_multi_: state_steps[", t, "] must be a one-element float32 CPU "
                "tensor (torch's step counter), got ", st.scalar_type(), " with ", st.numel(),
                " elements on ", st.device());
    const float count = *st.data_ptr<float>();
    TORCH_CHECK(count >= 0.0f && count < 16777216.0f && count == std::floor(count),
                "adamw_step_multi_: state_steps[", t, "] holds ", count,
                ", not a step count (a whole number in [0, 2^24))");
    steps[t] = static_cast<int64_t>(count) + 1;
    check_adamw32(params[t], grads[t], exp_avgs[t], exp_avg_sqs[t], lr, beta1, beta2, eps,
                  steps[t]);
  }
  return steps;
}

}  // namespace qk_optim
