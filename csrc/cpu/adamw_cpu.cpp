// CPU kernels of the fused AdamW step, 32-bit and blockwise 8-bit state.
//
// adamw_step_: one pass over param, grad, exp_avg, exp_avg_sq (float32 state; param and
// grad float32, float16 or bfloat16), parallel over chunks with OpenMP. float32 params use
// AVX2 (8 lanes; checked at run time, per-function target attribute so the module loads on
// any x86-64) and the scalar qk::adamw_update otherwise; both do the same IEEE operations
// in the same order (see qk_adamw.h), so lanes and tails agree bit for bit.
// adamw8bit_step_: per block of 256, decode both moments (code[q] * absmax), update them in
// float32 with the same element update, write the param, and re-encode both moments with
// the block's new absmax (Encoder8, encode8_cpu.h: qk::encode_sorted256's result from a
// bucket table), as quantize_8bit does; non-finite moments are stored as 0 (see adamw8bit_block).
// float32 params take 16 lanes (AVX-512F) at cpu path avx512 and up, the same bits again:
// one body for both widths (simd_width.h).
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "encode8_cpu.h"
#include "qk_adamw.h"
#include "qk_optim_checks.h"
#include "simd_width.h"

namespace qlora_kernels::cpu {
namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per OpenMP work item; static: contiguous ranges per thread
// Below this many work items one thread does it all: waking a team costs more than it saves
// (and on a busy machine a team waits for the slowest thread to be scheduled).
constexpr int64_t kMinParallelChunks = 2;
constexpr int64_t kMinParallelBlocks = 64;

template <typename T>
void adamw_range_scalar(T* p, const T* g, float* m, float* v, int64_t n,
                        const qk::AdamWScalars& s) {
  for (int64_t i = 0; i < n; ++i) {
    float pf = static_cast<float>(p[i]);
    qk::adamw_update(pf, static_cast<float>(g[i]), m[i], v[i], s);
    p[i] = static_cast<T>(pf);  // one rounding to the param dtype per step
  }
}

#if defined(__x86_64__)
// One body for both widths (simd_width.h). The flags are template parameters and the
// scalars locals: the stores go through may-alias vector types, so fields read through a
// reference would be reloaded every iteration. The tail takes the scalar loop (the same bits).
template <class S, bool kMaximize, bool kDecay, bool kSmall>
QK_ANY_WIDTH void adamw_lanes(float* p, const float* g, float* m, float* v, int64_t n,
                              const qk::AdamWScalars s) {
  using vf = typename S::vf;
  const vf decay = S::set1(s.decay), w = S::set1(kSmall ? s.w1 : s.w1m1);
  const vf b2 = S::set1(s.beta2), c2 = S::set1(s.c2);
  const vf bc2s = S::set1(s.bc2_sqrt), eps = S::set1(s.eps), nss = S::set1(s.neg_step_size);
  int64_t i = 0;
  for (; i + S::W <= n; i += S::W) {
    vf gv = S::load(g + i);
    if (kMaximize) gv = S::neg(gv);
    vf pv = S::load(p + i);
    if (kDecay) pv = S::mul(pv, decay);
    vf mv = S::load(m + i);
    const vf d = S::sub(gv, mv);
    mv = S::fmadd(w, d, kSmall ? mv : gv);
    const vf vv = S::fmadd(S::mul(c2, gv), gv, S::mul(S::load(v + i), b2));
    const vf denom = S::add(S::div(S::sqrt(vv), bc2s), eps);
    pv = S::add(pv, S::div(S::mul(nss, mv), denom));
    S::store(m + i, mv);
    S::store(v + i, vv);
    S::store(p + i, pv);
  }
  adamw_range_scalar(p + i, g + i, m + i, v + i, n - i, s);
}

// The instance of adamw_lanes for the scalars' flags.
template <class S>
QK_ANY_WIDTH void adamw_range_lanes(float* p, const float* g, float* m, float* v, int64_t n,
                       const qk::AdamWScalars& s) {
  switch ((s.maximize ? 4 : 0) | (s.apply_decay ? 2 : 0) | (s.w1_small ? 1 : 0)) {
    case 0: return adamw_lanes<S, false, false, false>(p, g, m, v, n, s);
    case 1: return adamw_lanes<S, false, false, true>(p, g, m, v, n, s);
    case 2: return adamw_lanes<S, false, true, false>(p, g, m, v, n, s);
    case 3: return adamw_lanes<S, false, true, true>(p, g, m, v, n, s);
    case 4: return adamw_lanes<S, true, false, false>(p, g, m, v, n, s);
    case 5: return adamw_lanes<S, true, false, true>(p, g, m, v, n, s);
    case 6: return adamw_lanes<S, true, true, false>(p, g, m, v, n, s);
    default: return adamw_lanes<S, true, true, true>(p, g, m, v, n, s);
  }
}

QK_AVX2_BODY void adamw_range_avx2(float* p, const float* g, float* m, float* v, int64_t n,
                                   const qk::AdamWScalars& s) {
  adamw_range_lanes<Avx2>(p, g, m, v, n, s);
}
QK_AVX512_BODY void adamw_range_avx512(float* p, const float* g, float* m, float* v, int64_t n,
                                       const qk::AdamWScalars& s) {
  adamw_range_lanes<Avx512>(p, g, m, v, n, s);
}
#endif

// n elements from these pointers; float32 params take the AVX2 or AVX-512 lanes (the same
// bits).
template <typename T>
void adamw_update_n(T* p, const T* g, float* m, float* v, int64_t n, const qk::AdamWScalars& s) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_isa() >= kIsaAvx512) return adamw_range_avx512(p, g, m, v, n, s);
    if (has_avx2()) return adamw_range_avx2(p, g, m, v, n, s);
  }
#endif
  adamw_range_scalar(p, g, m, v, n, s);
}

// Updates elements [b, b + len) of one param.
void adamw_range(const at::Tensor& param, const at::Tensor& grad, float* m, float* v, int64_t b,
                 int64_t len, const qk::AdamWScalars& s) {
  dispatch_float(param.scalar_type(), "adamw_step_", [&](auto tag) {
    using T = decltype(tag);
    adamw_update_n(param.data_ptr<T>() + b, grad.data_ptr<T>() + b, m + b, v + b, len, s);
  });
}

void adamw_step_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                    at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                    double weight_decay, int64_t step, bool maximize) {
  qk_optim::check_adamw32(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, step);
  const int64_t n = param.numel();
  const at::Tensor g = grad.contiguous();
  const qk::AdamWScalars s =
      qk::make_adamw_scalars(lr, beta1, beta2, eps, weight_decay, step, maximize);
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (nchunks >= kMinParallelChunks)
  for (int64_t c = 0; c < nchunks; ++c)
    adamw_range(param, g, m, v, c * kChunk, std::min(kChunk, n - c * kChunk), s);
}

// Many params in one call: one OpenMP team over the chunks of all of them. Per-param calls
// cost ~20 us of Python and a team wake-up each, and a LoRA model has hundreds of small
// params (448 for LLaMA-7B, all linears). Same element updates, so the same bits.
// state_steps are the optimizer's float32 step counters (torch's state layout): each is
// counted here, as torch counts before its update; a foreach add of 113 CPU scalars plus
// reading them back cost ~0.4 ms a step in Python, 1.5% of a 40M-param step.
void adamw_step_multi_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList state_steps, double lr,
                          double beta1, double beta2, double eps, double weight_decay,
                          bool maximize) {
  const size_t n = params.size();
  const std::vector<int64_t> steps = qk_optim::check_adamw32_multi(
      params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, eps);
  struct Item {
    size_t t;
    int64_t begin, len;
  };
  std::vector<at::Tensor> g(n);
  std::vector<qk::AdamWScalars> s;
  std::vector<Item> items;
  s.reserve(n);
  for (size_t t = 0; t < n; ++t) {
    *state_steps[t].data_ptr<float>() = static_cast<float>(steps[t]);
    g[t] = grads[t].contiguous();
    s.push_back(qk::make_adamw_scalars(lr, beta1, beta2, eps, weight_decay, steps[t], maximize));
    for (int64_t b = 0; b < params[t].numel(); b += kChunk)
      items.push_back({t, b, std::min(kChunk, params[t].numel() - b)});
  }
  const int64_t nitems = static_cast<int64_t>(items.size());
  // Chunks dealt round-robin: the threads stream through neighbouring memory at any time
  // (like a parallel loop per param), not through two far-apart halves of the param list.
#pragma omp parallel for schedule(static, 1) if (nitems >= kMinParallelChunks)
  for (int64_t i = 0; i < nitems; ++i) {
    const Item& it = items[i];
    adamw_range(params[it.t], g[it.t], exp_avgs[it.t].data_ptr<float>(),
                exp_avg_sqs[it.t].data_ptr<float>(), it.begin, it.len, s[it.t]);
  }
}

// One block of the 8-bit step. Scratch holds the updated moments until the new absmax is known.
template <typename T>
void adamw8bit_block(T* p, const T* g, uint8_t* qm, float* am, uint8_t* qv, float* av,
                     const float* code_m, const float* code_v, const Encoder8& enc_m,
                     const Encoder8& enc_v, int64_t len, const qk::AdamWScalars& s) {
  float mbuf[qk::kOptimBlocksize], vbuf[qk::kOptimBlocksize];
  const float am_old = *am, av_old = *av;
  for (int64_t i = 0; i < len; ++i) {
    mbuf[i] = code_m[qm[i]] * am_old;
    vbuf[i] = code_v[qv[i]] * av_old;
  }
  adamw_update_n(p, g, mbuf, vbuf, len, s);  // the 32-bit step's element update
  // A NaN/Inf gradient element makes its own moments non-finite (and its param NaN, as in
  // the 32-bit step). Those moments are stored as 0 and left out of the block's absmax: a
  // NaN absmax would decode all 256 moments of the block as NaN on the next step.
  float mmax = 0.0f, vmax = 0.0f;
  for (int64_t i = 0; i < len; ++i) {
    if (!std::isfinite(mbuf[i]) || !std::isfinite(vbuf[i])) mbuf[i] = vbuf[i] = 0.0f;
    mmax = std::max(mmax, std::fabs(mbuf[i]));
    vmax = std::max(vmax, std::fabs(vbuf[i]));
  }
  *am = mmax;
  *av = vmax;
  enc_m.encode_scaled(mbuf, qk::inverse_absmax(mmax), len, qm);
  enc_v.encode_scaled(vbuf, qk::inverse_absmax(vmax), len, qv);
}

void adamw8bit_step_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& qm,
                        at::Tensor& absmax_m, at::Tensor& qv, at::Tensor& absmax_v,
                        const at::Tensor& code_m, const at::Tensor& code_v, double lr,
                        double beta1, double beta2, double eps, double weight_decay,
                        int64_t step, bool maximize) {
  const char* op = "adamw8bit_step_";
  qk_optim::check_adamw8bit(param, grad, qm, absmax_m, qv, absmax_v, code_m, code_v, lr, beta1,
                            beta2, eps, step);
  const int64_t n = param.numel();
  const int64_t nblocks = (n + qk::kOptimBlocksize - 1) / qk::kOptimBlocksize;
  const at::Tensor g = grad.contiguous();
  const qk::AdamWScalars s =
      qk::make_adamw_scalars(lr, beta1, beta2, eps, weight_decay, step, maximize);
  uint8_t* qmp = qm.data_ptr<uint8_t>();
  uint8_t* qvp = qv.data_ptr<uint8_t>();
  float* amp = absmax_m.data_ptr<float>();
  float* avp = absmax_v.data_ptr<float>();
  const float* cm = code_m.data_ptr<float>();
  const float* cv = code_v.data_ptr<float>();
  const std::shared_ptr<const Encoder8> enc_m = Encoder8::get(cm), enc_v = Encoder8::get(cv);
  dispatch_float(param.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    T* p = param.data_ptr<T>();
    const T* gp = g.data_ptr<T>();
#pragma omp parallel for schedule(static) if (nblocks >= kMinParallelBlocks)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t start = b * qk::kOptimBlocksize;
      const int64_t len = std::min<int64_t>(qk::kOptimBlocksize, n - start);
      adamw8bit_block(p + start, gp + start, qmp + start, amp + b, qvp + start, avp + b, cm, cv,
                      *enc_m, *enc_v, len, s);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_kernels, CPU, m) {
  m.impl("adamw_step_", &adamw_step_cpu);
  m.impl("adamw_step_multi_", &adamw_step_multi_cpu);
  m.impl("adamw8bit_step_", &adamw8bit_step_cpu);
}

}  // namespace qlora_kernels::cpu
