// CUDA implementations of the qlora_kernels ops: tensor checks, then the torch-free
// launchers of qk_cuda.h on the current stream of the input's device.
//
// Compiled by the host compiler (CUDAExtension, -DQK_WITH_CUDA) only where torch has CUDA;
// the kernels themselves live in csrc/cuda/*.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "qk_4bit_checks.h"
#include "qk_cuda.h"

namespace qlora_kernels::cuda_impl {
namespace {

using qk_checks::check_blocksize;
using qk_checks::check_float_input;
using qk_checks::parse_quant_type;

qk_cuda::DType kernel_dtype(at::ScalarType t, const char* op, const char* what) {
  switch (t) {
    case at::kFloat: return qk_cuda::kFloat32;
    case at::kHalf: return qk_cuda::kFloat16;
    case at::kBFloat16: return qk_cuda::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", what, " must be float32, float16 or bfloat16, got ", t);
  }
  return qk_cuda::kFloat32;  // not reached
}

// `t` must be a CUDA tensor on the same device as `ref` (the op's first tensor).
void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
              " but the input is on ", ref.device(), "; move them to one device");
}

void check_table(const at::Tensor& code, const at::Tensor& ref, int64_t size, const char* op,
                 const char* name) {
  check_device(code, ref, op, name);
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == size, op, ": ", name,
              " must be a float32 tensor of ", size, " values, got ", code.scalar_type(), " with ",
              code.numel());
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The absmax of a 4-bit state (its format checked by qk_checks::check_4bit_weight): float32
// [nblocks], or uint8 [nblocks] with nested tensors. Checks their devices and returns the
// launcher's view of them; keeps contiguous copies alive in `keep`.
struct AbsmaxArgs {
  const float* absmax = nullptr;
  qk_cuda::NestedAbsmax nested;
  at::Tensor keep[3];
};

AbsmaxArgs absmax_args(const at::Tensor& ref, const at::Tensor& absmax,
                       const std::optional<at::Tensor>& nested_absmax,
                       const std::optional<at::Tensor>& nested_code, double offset,
                       const char* op) {
  AbsmaxArgs a;
  check_device(absmax, ref, op, "absmax");
  a.keep[0] = absmax.contiguous();
  if (!nested_absmax.has_value()) {
    a.absmax = a.keep[0].data_ptr<float>();
    return a;
  }
  check_device(*nested_absmax, ref, op, "nested_absmax");
  check_device(*nested_code, ref, op, "nested_code");
  a.keep[1] = nested_absmax->contiguous();
  a.keep[2] = nested_code->contiguous();
  a.nested.qabsmax = a.keep[0].data_ptr<uint8_t>();
  a.nested.nested_absmax = a.keep[1].data_ptr<float>();
  a.nested.nested_code = a.keep[2].data_ptr<float>();
  a.nested.offset = static_cast<float>(offset);
  return a;
}

// ------------------------------------------------------------------ 4-bit
std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& A, int64_t blocksize,
                                                      c10::string_view quant_type) {
  check_float_input(A, "quantize_4bit");
  check_blocksize(blocksize);
  const int qt = parse_quant_type(quant_type);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor x = A.contiguous();
  const int64_t n = x.numel();
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(n + blocksize - 1) / blocksize}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(qk_cuda::quantize_4bit(
      x.data_ptr(), kernel_dtype(x.scalar_type(), "quantize_4bit", "A"), n, (int)blocksize, qt,
      packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), current_stream()));
  return {packed, absmax};
}

void dequantize_4bit_out_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                              const at::Tensor& code, int64_t blocksize,
                              const std::optional<at::Tensor>& nested_absmax,
                              const std::optional<at::Tensor>& nested_code, double offset,
                              at::Tensor& out) {
  const char* op = "dequantize_4bit";
  const int64_t numel = out.numel();
  qk_checks::check_4bit_weight(op, packed, absmax, code, blocksize, numel, nested_absmax,
                               nested_code);
  TORCH_CHECK(packed.is_cuda(), op, ": packed must be a CUDA tensor, got one on ", packed.device());
  check_device(out, packed, op, "out");
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  const qk_cuda::DType dtype = kernel_dtype(out.scalar_type(), op, "the output dtype");
  check_device(code, packed, op, "code");
  const c10::cuda::CUDAGuard guard(packed.device());
  const AbsmaxArgs a = absmax_args(packed, absmax, nested_absmax, nested_code, offset, op);
  const at::Tensor p = packed.contiguous(), c = code.contiguous();
  C10_CUDA_CHECK(qk_cuda::dequantize_4bit(p.data_ptr<uint8_t>(), a.absmax, a.nested,
                                          c.data_ptr<float>(), numel, (int)blocksize, dtype,
                                          out.data_ptr(), current_stream()));
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                                const at::Tensor& code, int64_t blocksize, int64_t numel,
                                at::ScalarType dtype,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code, double offset) {
  TORCH_CHECK(numel >= 0, "dequantize_4bit: numel must be >= 0, got ", numel);
  kernel_dtype(dtype, "dequantize_4bit", "the output dtype");
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  dequantize_4bit_out_cuda(packed, absmax, code, blocksize, nested_absmax, nested_code, offset,
                           out);
  return out;
}

// ------------------------------------------------------------------ 8-bit
std::tuple<at::Tensor, at::Tensor> quantize_8bit_cuda(const at::Tensor& A, const at::Tensor& code,
                                                      int64_t blocksize) {
  const char* op = "quantize_8bit";
  check_float_input(A, op);
  TORCH_CHECK(blocksize > 0, op, ": blocksize must be positive, got ", blocksize);
  TORCH_CHECK(A.is_cuda(), op, ": A must be a CUDA tensor, got one on ", A.device());
  check_table(code, A, 256, op, "code");
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor x = A.contiguous(), c = code.contiguous();
  const int64_t n = x.numel();
  at::Tensor q = at::empty({n}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(n + blocksize - 1) / blocksize}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(qk_cuda::quantize_8bit(x.data_ptr(), kernel_dtype(x.scalar_type(), op, "A"), n,
                                        blocksize, c.data_ptr<float>(), q.data_ptr<uint8_t>(),
                                        absmax.data_ptr<float>(), current_stream()));
  return {q, absmax};
}

at::Tensor dequantize_8bit_cuda(const at::Tensor& q, const at::Tensor& absmax,
                                const at::Tensor& code, int64_t blocksize, at::ScalarType dtype) {
  const char* op = "dequantize_8bit";
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got one on ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kByte, op, ": q must be uint8, got ", q.scalar_type());
  TORCH_CHECK(blocksize > 0, op, ": blocksize must be positive, got ", blocksize);
  const int64_t n = q.numel();
  check_table(absmax, q, (n + blocksize - 1) / blocksize, op, "absmax");
  check_table(code, q, 256, op, "code");
  const qk_cuda::DType kd = kernel_dtype(dtype, op, "the output dtype");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), ac = absmax.contiguous(), cc = code.contiguous();
  at::Tensor out = at::empty({n}, q.options().dtype(dtype));
  C10_CUDA_CHECK(qk_cuda::dequantize_8bit(qc.data_ptr<uint8_t>(), ac.data_ptr<float>(),
                                          cc.data_ptr<float>(), n, blocksize, kd, out.data_ptr(),
                                          current_stream()));
  return out;
}

// ------------------------------------------------------------------ gemv
at::Tensor gemv_4bit_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const at::Tensor& code, int64_t blocksize, int64_t out_features,
                          const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code, double offset,
                          const std::optional<at::Tensor>& bias) {
  const char* op = "gemv_4bit";
  check_float_input(x, op);
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(out_features >= 0, op, ": out_features must be >= 0, got ", out_features);
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  qk_checks::check_4bit_weight(op, packed, absmax, code, blocksize, N * K, nested_absmax,
                               nested_code);
  check_device(packed, x, op, "packed");
  check_device(code, x, op, "code");
  const c10::cuda::CUDAGuard guard(x.device());
  const AbsmaxArgs a = absmax_args(x, absmax, nested_absmax, nested_code, offset, op);
  at::Tensor bf;
  if (bias.has_value()) {
    check_device(*bias, x, op, "bias");
    TORCH_CHECK(bias->is_floating_point() && bias->dim() == 1 && bias->numel() == N, op,
                ": bias must be a 1-D float tensor of out_features = ", N, " values, got shape ",
                bias->sizes(), " ", bias->scalar_type());
    bf = bias->to(at::kFloat).contiguous();
  }
  const at::Tensor xc = x.contiguous(), p = packed.contiguous(), c = code.contiguous();
  at::Tensor y = at::empty({M, N}, xc.options());
  C10_CUDA_CHECK(qk_cuda::gemv_4bit(xc.data_ptr(), kernel_dtype(xc.scalar_type(), op, "x"), M, K,
                                    N, p.data_ptr<uint8_t>(), a.absmax, a.nested,
                                    c.data_ptr<float>(), (int)blocksize,
                                    bias.has_value() ? bf.data_ptr<float>() : nullptr,
                                    y.data_ptr(), current_stream()));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_kernels, CUDA, m) {
  m.impl("quantize_4bit", &quantize_4bit_cuda);
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
  m.impl("dequantize_4bit_out", &dequantize_4bit_out_cuda);
  m.impl("quantize_8bit", &quantize_8bit_cuda);
  m.impl("dequantize_8bit", &dequantize_8bit_cuda);
  m.impl("gemv_4bit", &gemv_4bit_cuda);
}

}  // namespace qlora_kernels::cuda_impl
