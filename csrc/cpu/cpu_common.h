// Helpers shared by the CPU kernels: dtype loads, the AVX2 switch (input checks: qk_4bit_checks.h).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <string>

#include "cpu_isa.h"
#include "qk_4bit_checks.h"
#include "qk_format.h"

namespace qlora_kernels::cpu {

// Whether the AVX2 paths run: the CPU has AVX2/FMA/F16C and no lower path is forced.
inline bool has_avx2() { return cpu_isa() >= kIsaAvx2; }

using qk_checks::check_blocksize;  // the 4-bit checks are shared with the CUDA bindings
using qk_checks::check_float_input;
using qk_checks::parse_quant_type;

// A block's float32 absmax: stored as is, or double-quantized (qabsmax non-null) and
// decoded on the fly with the header's exact expression.
inline float block_absmax(const float* absmax, const uint8_t* qabsmax, const float* nested_absmax,
                          const float* nested_code, float offset, int64_t b) {
  return qabsmax ? qk::decode_nested_absmax(qabsmax, nested_code, nested_absmax, offset, b)
                 : absmax[b];
}

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

// Calls f(T{}) with T the C++ type of a float32/float16/bfloat16 dtype.
template <typename F>
inline void dispatch_float(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": dtype must be float32, float16 or bfloat16, got ", dtype);
  }
}

}  // namespace qlora_kernels::cpu
