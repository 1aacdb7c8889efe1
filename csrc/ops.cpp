// The op schemas of qlora_kernels, declared once. Implementations register per device:
// csrc/cpu/*.cpp (CPU), csrc/cuda/*_binding.cpp (CUDA), and qlora_kernels/ops.py adds the
// fake (meta) kernels, autograd, and the pure-PyTorch fallback when this library is absent.
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include "cpu/cpu_isa.h"
#include "qk_format.h"

extern "C" {
// Importing qlora_kernels._C from Python runs the static initializers below, which
// register the ops; the module itself holds nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace qlora_kernels {

// The header's tables, exported so that tests can check them against formats.py.
// Row 0 holds the 16 code values; row 1 the thresholds used by the encoder (15 for
// sorted codes, 7 magnitude thresholds for FP4), padded with NaN.
at::Tensor format_table(c10::string_view quant_type) {
  at::Tensor out = at::full({2, 16}, NAN, at::kFloat);
  float* v = out.data_ptr<float>();
  const float* values;
  const float* thresholds;
  int nthr;
  if (quant_type == "nf4") {
    values = qk::kNF4Values; thresholds = qk::kNF4Thresholds; nthr = 15;
  } else if (quant_type == "fp4") {
    values = qk::kFP4Values; thresholds = qk::kFP4MagThresholds; nthr = 7;
  } else if (quant_type == "int4") {
    values = qk::kINT4Values; thresholds = qk::kINT4Thresholds; nthr = 15;
  } else {
    TORCH_CHECK(false, "format_table: unknown quant_type '", std::string(quant_type),
                "' (expected nf4, fp4 or int4)");
  }
  for (int i = 0; i < 16; ++i) v[i] = values[i];
  for (int i = 0; i < nthr; ++i) v[16 + i] = thresholds[i];
  return out;
}

TORCH_LIBRARY(qlora_kernels, m) {
  // 4-bit blockwise: A (any float dtype, any shape, read as flat) ->
  // packed uint8 [(numel+1)//2, 1], absmax float32 [nblocks] (NaN/Inf where the block has them)
  m.def("quantize_4bit(Tensor A, int blocksize, str quant_type) -> (Tensor, Tensor)");
  // flat output of `numel` elements; absmax is float32, or uint8 with nested_* given
  m.def("dequantize_4bit(Tensor packed, Tensor absmax, Tensor code, int blocksize, int numel, "
        "ScalarType dtype, Tensor? nested_absmax=None, Tensor? nested_code=None, "
        "float offset=0.0) -> Tensor");
  // the same into a preallocated flat `out` of `numel` elements (its dtype is the output dtype)
  m.def("dequantize_4bit_out(Tensor packed, Tensor absmax, Tensor code, int blocksize, "
        "Tensor? nested_absmax, Tensor? nested_code, float offset, Tensor(a!) out) -> ()");
  // columns [col0, col0 + cols) of the (rows, row_len) weight into out (rows, cols), whole
  // blocks only (row_len, col0, cols multiples of blocksize): the backward's tiles of W
  m.def("dequantize_4bit_cols_out(Tensor packed, Tensor absmax, Tensor code, int blocksize, "
        "Tensor? nested_absmax, Tensor? nested_code, float offset, int row_len, int col0, "
        "Tensor(a!) out) -> ()");
  // 8-bit blockwise with a sorted 256-entry code (double quantization, 8-bit optimizers)
  m.def("quantize_8bit(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)");
  m.def("dequantize_8bit(Tensor q, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) "
        "-> Tensor");
  // y[M, N] = x[M, K] @ W^T (+ bias) with W [N, K] packed 4-bit; accumulates in float32
  // (bias included), returns x.dtype
  m.def("gemv_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, "
        "int out_features, Tensor? nested_absmax=None, Tensor? nested_code=None, "
        "float offset=0.0, Tensor? bias=None) -> Tensor");
  // x[..., K] @ W^T (+ bias) -> [..., N], differentiable w.r.t. x and bias (autograd in
  // qlora_kernels/matmul.py, which also implements it: GEMV or GEMM path chosen by shape)
  m.def("matmul_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, "
        "int out_features, Tensor? nested_absmax=None, Tensor? nested_code=None, "
        "float offset=0.0, Tensor? bias=None) -> Tensor");
  // grad_y[..., N] @ W -> [..., K]: the input gradient of matmul_4bit
  m.def("matmul_4bit_backward(Tensor grad_y, Tensor packed, Tensor absmax, Tensor code, "
        "int blocksize, int in_features, Tensor? nested_absmax=None, Tensor? nested_code=None, "
        "float offset=0.0) -> Tensor");
  // Fused AdamW (decoupled weight decay, bias correction) in place on param and state.
  m.def("adamw_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, int step, "
        "bool maximize) -> ()");
  // adamw_step_ over many params in one call (CPU: one OpenMP team over all their chunks;
  // CUDA: a few launches for all of them). state_steps[i] is params[i]'s float32 CPU step
  // counter (torch's state layout): counted by one, then used.
  m.def("adamw_step_multi_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] state_steps, float lr, float beta1, "
        "float beta2, float eps, float weight_decay, bool maximize) -> ()");
  // The same with both moments blockwise 8-bit (blocks of 256).
  m.def("adamw8bit_step_(Tensor(a!) param, Tensor grad, Tensor(b!) qm, Tensor(c!) absmax_m, "
        "Tensor(d!) qv, Tensor(e!) absmax_v, Tensor code_m, Tensor code_v, float lr, "
        "float beta1, float beta2, float eps, float weight_decay, int step, bool maximize) -> ()");
  // CUDA unified (managed) memory for paged optimizer state; kernels in csrc/cuda/managed_memory.cpp.
  m.def("managed_supported(int device) -> bool");
  m.def("managed_empty(int[] size, ScalarType dtype, int device) -> Tensor");
  m.def("managed_prefetch_(Tensor(a!)[] tensors, int device) -> ()");  // -1: to host memory
  m.def("is_managed(Tensor t) -> bool");
  m.def("format_table(str quant_type) -> Tensor");
  m.impl("format_table", c10::DispatchKey::CompositeExplicitAutograd, &format_table);
  // Run-time CPU dispatch (csrc/cpu/cpu_isa.h): the feature bits read from the CPU, and
  // the path the CPU kernels take (set_cpu_isa(-1): the best; refuses one the CPU lacks).
  m.def("cpu_features() -> int");
  m.impl("cpu_features", c10::DispatchKey::CompositeExplicitAutograd, &cpu::cpu_features);
  m.def("set_cpu_isa(int isa) -> int");
  m.impl("set_cpu_isa", c10::DispatchKey::CompositeExplicitAutograd, &cpu::set_cpu_isa);
  m.def("cpu_isa() -> int");
  m.impl("cpu_isa", c10::DispatchKey::CompositeExplicitAutograd, &cpu::cpu_isa);
}

}  // namespace qlora_kernels
