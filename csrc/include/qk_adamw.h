// qk_adamw.h — one AdamW update of one element, shared by the CPU and CUDA kernels.
//
// The arithmetic follows torch.optim.AdamW (single-tensor path) operation by operation,
// so that results agree with it to the last bit or two:
//   param.mul_(1 - lr * wd)                        (decoupled weight decay)
//   exp_avg.lerp_(grad, 1 - beta1)                 (torch's lerp: one FMA, see qk_lerp)
//   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)   -> fma(c2*g, g, v*b2)
//   denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
//   param.addcdiv_(exp_avg, denom, value=-step_size)              -> p + (-ss*m)/denom
// One known difference: torch's CPU sqrt for float32 is not correctly rounded (about 15% of
// values 1 ulp off); we use IEEE sqrt, as torch's CUDA build does, so params may differ from
// torch's CPU result by an ulp or so per step.
// Scalars are computed in double on the host, as Python does, then rounded to float once,
// as torch does when it applies a Python scalar to a float tensor. Compile with FMA
// contraction off (-ffp-contract=off, nvcc --fmad=false): the only FMAs are the explicit ones
// (torch's vectorized lerp and addcmul use FMA; its CUDA build contracts the same expressions).
#pragma once
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define QK_ADAMW_HD __host__ __device__ __forceinline__
#else
#define QK_ADAMW_HD inline
#endif

namespace qk {

constexpr int kOptimBlocksize = 256;  // block of the 8-bit optimizer states

struct AdamWScalars {
  float decay;          // 1 - lr * weight_decay
  float w1;             // lerp weight 1 - beta1
  float w1m1;           // w1 - 1 (torch's lerp for weights >= 0.5)
  int w1_small;         // |w1| < 0.5
  float beta2;
  float c2;             // 1 - beta2
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
  int maximize;
  int apply_decay;
};

// Host side: the double-precision scalar math of torch.optim.adam._single_tensor_adam.
inline AdamWScalars make_adamw_scalars(double lr, double beta1, double beta2, double eps,
                                       double weight_decay, int64_t step, bool maximize) {
  AdamWScalars s;
  const double w1 = 1.0 - beta1;
  const double bc1 = 1.0 - pow(beta1, (double)step);
  const double bc2 = 1.0 - pow(beta2, (double)step);
  s.decay = (float)(1.0 - lr * weight_decay);
  s.w1 = (float)w1;
  s.w1m1 = s.w1 - 1.0f;
  s.w1_small = fabs((double)s.w1) < 0.5;
  s.beta2 = (float)beta2;
  s.c2 = (float)(1.0 - beta2);
  s.bc2_sqrt = (float)pow(bc2, 0.5);
  s.eps = (float)eps;
  s.neg_step_size = (float)(-(lr / bc1));
  s.maximize = maximize ? 1 : 0;
  s.apply_decay = weight_decay != 0.0 ? 1 : 0;
  return s;
}

QK_ADAMW_HD float qk_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return fmaf(a, b, c);
#endif
}

// torch's lerp(start, end, w): small weights start + w*(end-start), else end + (w-1)*(end-start),
// each as one FMA (as its vectorized CPU kernel and its nvcc-compiled CUDA kernel do).
QK_ADAMW_HD float qk_lerp(float start, float end, const AdamWScalars& s) {
  const float d = end - start;
  return s.w1_small ? qk_fma(s.w1, d, start) : qk_fma(s.w1m1, d, end);
}

// One element: p, m, v updated in place (float32), g the gradient.
QK_ADAMW_HD void adamw_update(float& p, float g, float& m, float& v, const AdamWScalars& s) {
  if (s.maximize) g = -g;
  if (s.apply_decay) p = p * s.decay;
  m = qk_lerp(m, g, s);
  v = qk_fma(s.c2 * g, g, v * s.beta2);
  const float denom = sqrtf(v) / s.bc2_sqrt + s.eps;
  p = p + (s.neg_step_size * m) / denom;
}

}  // namespace qk
