// The qlora_kernels library: its schemas (declared once, in qlora_kernels/op_schemas.inc)
// and the test helper op format_table. Implementations register per device: csrc/cpu/*.cpp
// (CPU), csrc/cuda/*_binding.cpp (CUDA), and qlora_kernels/ops.py adds the fake (meta)
// kernels, autograd, and the pure-PyTorch fallback when this library is absent.
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
#define QK_OP(schema) m.def(schema);
#include "../qlora_kernels/op_schemas.inc"
#undef QK_OP
  m.def("format_table(str quant_type) -> Tensor");
  m.impl("format_table", c10::DispatchKey::CompositeExplicitAutograd, &format_table);
  // Run-time CPU dispatch (csrc/cpu/cpu_isa.h): the feature bits read from the CPU, and
  // the path the CPU kernels take (set_cpu_isa(-1): the best; refuses one the CPU lacks).
  m.impl("cpu_features", c10::DispatchKey::CompositeExplicitAutograd, &cpu::cpu_features);
  m.impl("set_cpu_isa", c10::DispatchKey::CompositeExplicitAutograd, &cpu::set_cpu_isa);
  m.impl("cpu_isa", c10::DispatchKey::CompositeExplicitAutograd, &cpu::cpu_isa);
}

}  // namespace qlora_kernels
