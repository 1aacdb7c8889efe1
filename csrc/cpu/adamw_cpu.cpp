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
// float32 params take 16 lanes (AVX-512F) at cpu path avx512 and up, the same bits again.
// gcc 12's AVX-512 intrinsic headers build their "undefined" vectors as `__m512 __Y = __Y;`,
// which -Wmaybe-uninitialized reports wherever they are inlined: their code, not ours.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "encode8_cpu.h"
#include "qk_adamw.h"
#include "qk_optim_checks.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define QK_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QK_AVX512 __attribute__((target("avx2,fma,f16c,avx512f")))
#endif

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
// The flags are template parameters and the scalars locals: the stores go through may-alias
// vector types, so fields read through a reference would be reloaded every iteration.
template <bool kMaximize, bool kDecay, bool kSmall>
QK_AVX2 void adamw_range_avx2(float* p, const float* g, float* m, float* v, int64_t n,
                              const qk::AdamWScalars s) {
  const __m256 decay = _mm256_set1_ps(s.decay), w = _mm256_set1_ps(kSmall ? s.w1 : s.w1m1);
  const __m256 b2 = _mm256_set1_ps(s.beta2), c2 = _mm256_set1_ps(s.c2);
  const __m256 bc2s = _mm256_set1_ps(s.bc2_sqrt), eps = _mm256_set1_ps(s.eps);
  const __m256 nss = _mm256_set1_ps(s.neg_step_size), sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 gv = _mm256_loadu_ps(g + i);
    if (kMaximize) gv = _mm256_xor_ps(gv, sign);
    __m256 pv = _mm256_loadu_ps(p + i);
    if (kDecay) pv = _mm256_mul_ps(pv, decay);
    __m256 mv = _mm256_loadu_ps(m + i);
    const __m256 d = _mm256_sub_ps(gv, mv);
    mv = _mm256_fmadd_ps(w, d, kSmall ? mv : gv);
    const __m256 vv = _mm256_fmadd_ps(_mm256_mul_ps(c2, gv), gv,
                                      _mm256_mul_ps(_mm256_loadu_ps(v + i), b2));
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vv), bc2s), eps);
    pv = _mm256_add_ps(pv, _mm256_div_ps(_mm256_mul_ps(nss, mv), denom));
    _mm256_storeu_ps(m + i, mv);
    _mm256_storeu_ps(v + i, vv);
    _mm256_storeu_ps(p + i, pv);
  }
  adamw_range_scalar(p + i, g + i, m + i, v + i, n - i, s);
}

// One of the eight instantiations of `kernel` for the scalars' flags.
#define QK_ADAMW_FLAGS_SWITCH(kernel, s, ...)                                  \
  switch (((s).maximize ? 4 : 0) | ((s).apply_decay ? 2 : 0) | ((s).w1_small ? 1 : 0)) { \
    case 0: return kernel<false, false, false>(__VA_ARGS__);                  \
    case 1: return kernel<false, false, true>(__VA_ARGS__);                   \
    case 2: return kernel<false, true, false>(__VA_ARGS__);                   \
    case 3: return kernel<false, true, true>(__VA_ARGS__);                    \
    case 4: return kernel<true, false, false>(__VA_ARGS__);                   \
    case 5: return kernel<true, false, true>(__VA_ARGS__);                    \
    case 6: return kernel<true, true, false>(__VA_ARGS__);                    \
    default: return kernel<true, true, true>(__VA_ARGS__);                    \
  }

QK_AVX2 void adamw_range_avx2(float* p, const float* g, float* m, float* v, int64_t n,
                              const qk::AdamWScalars& s) {
  QK_ADAMW_FLAGS_SWITCH(adamw_range_avx2, s, p, g, m, v, n, s)
}

// The AVX2 kernel 16 lanes wide (path avx512 and up): the same operations, so the same bits.
template <bool kMaximize, bool kDecay, bool kSmall>
QK_AVX512 void adamw_range_avx512(float* p, const float* g, float* m, float* v, int64_t n,
                                  const qk::AdamWScalars s) {
  const __m512 decay = _mm512_set1_ps(s.decay), w = _mm512_set1_ps(kSmall ? s.w1 : s.w1m1);
  const __m512 b2 = _mm512_set1_ps(s.beta2), c2 = _mm512_set1_ps(s.c2);
  const __m512 bc2s = _mm512_set1_ps(s.bc2_sqrt), eps = _mm512_set1_ps(s.eps);
  const __m512 nss = _mm512_set1_ps(s.neg_step_size), sign = _mm512_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 gv = _mm512_loadu_ps(g + i);
    if (kMaximize) gv = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(gv),
                                                             _mm512_castps_si512(sign)));
    __m512 pv = _mm512_loadu_ps(p + i);
    if (kDecay) pv = _mm512_mul_ps(pv, decay);
    __m512 mv = _mm512_loadu_ps(m + i);
    const __m512 d = _mm512_sub_ps(gv, mv);
    mv = _mm512_fmadd_ps(w, d, kSmall ? mv : gv);
    const __m512 vv = _mm512_fmadd_ps(_mm512_mul_ps(c2, gv), gv,
                                      _mm512_mul_ps(_mm512_loadu_ps(v + i), b2));
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vv), bc2s), eps);
    pv = _mm512_add_ps(pv, _mm512_div_ps(_mm512_mul_ps(nss, mv), denom));
    _mm512_storeu_ps(m + i, mv);
    _mm512_storeu_ps(v + i, vv);
    _mm512_storeu_ps(p + i, pv);
  }
  adamw_range_avx2<kMaximize, kDecay, kSmall>(p + i, g + i, m + i, v + i, n - i, s);
}

QK_AVX512 void adamw_range_avx512(float* p, const float* g, float* m, float* v, int64_t n,
                                  const qk::AdamWScalars& s) {
  QK_ADAMW_FLAGS_SWITCH(adamw_range_avx512, s, p, g, m, v, n, s)
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
