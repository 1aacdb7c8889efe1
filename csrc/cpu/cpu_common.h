// Helpers shared by the CPU kernels: input checks, dtype loads, the AVX2 switch.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <string>

#include "cpu_isa.h"
#include "qk_format.h"

namespace qlora_kernels::cpu {

// Whether the AVX2 paths run: the CPU has AVX2/FMA/F16C and no lower path is forced.
inline bool has_avx2() { return cpu_isa() >= kIsaAvx2; }

inline int parse_quant_type(c10::string_view qt) {
  if (qt == "nf4") return qk::kNF4;
  if (qt == "fp4") return qk::kFP4;
  if (qt == "int4") return qk::kINT4;
  TORCH_CHECK(false, "quant_type must be 'nf4', 'fp4' or 'int4', got '", std::string(qt), "'");
}

inline void check_blocksize(int64_t blocksize) {
  TORCH_CHECK(qk::is_supported_blocksize(blocksize),
              "blocksize must be a power of two in [32, 4096], got ", blocksize);
}

inline void check_float_input(const at::Tensor& A, const char* op) {
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kHalf ||
                  A.scalar_type() == at::kBFloat16,
              op, ": input must be float32, float16 or bfloat16, got ", A.scalar_type());
}

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
