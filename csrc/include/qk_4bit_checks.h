// Argument checks of the 4-bit ops (quantize_4bit, dequantize_4bit[_out], gemv_4bit), shared
// by the CPU kernels (csrc/cpu) and the CUDA bindings (csrc/cuda/*_binding.cpp) so that every
// device rejects bad input before any work, with the same messages. Device placement is the
// CUDA bindings' own check. The Python mirror for Triton and the reference is
// qlora_kernels/op_checks.py (check_4bit_weight). Needs ATen, unlike qk_format.h.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "qk_format.h"

namespace qk_checks {

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

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float_input(const at::Tensor& A, const char* op) {
  TORCH_CHECK_TYPE(is_float_dtype(A.scalar_type()), op,
                   ": input must be float32, float16 or bfloat16, got ", A.scalar_type());
}

// A packed 4-bit weight of `numel` elements and its state: packed uint8 bytes, one absmax per
// block (float32, or uint8 with the nested scales and 256-entry code), a 16-value code.
inline void check_4bit_weight(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                              const at::Tensor& code, int64_t blocksize, int64_t numel,
                              const std::optional<at::Tensor>& nested_absmax,
                              const std::optional<at::Tensor>& nested_code) {
  check_blocksize(blocksize);
  TORCH_CHECK(numel >= 0, op, ": numel must be >= 0, got ", numel);
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ",
              packed.scalar_type());
  TORCH_CHECK(packed.numel() == (numel + 1) / 2, op, ": packed holds ", packed.numel(),
              " bytes but numel ", numel, " needs ", (numel + 1) / 2);
  const int64_t nblocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.numel() == nblocks, op, ": absmax has ", absmax.numel(),
              " entries, expected ", nblocks, " (numel ", numel, ", blocksize ", blocksize, ")");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16, op,
              ": code must be a float32 tensor of 16 values");
  TORCH_CHECK(nested_absmax.has_value() == nested_code.has_value(), op,
              ": nested_absmax and nested_code go together");
  if (!nested_absmax.has_value()) {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, op, ": absmax must be float32, got ",
                absmax.scalar_type(), " (a uint8 absmax needs nested_absmax and nested_code)");
    return;
  }
  TORCH_CHECK(absmax.scalar_type() == at::kByte, op,
              ": a double-quantized absmax must be uint8, got ", absmax.scalar_type());
  const int64_t nested_blocks = (nblocks + qk::kNestedBlocksize - 1) / qk::kNestedBlocksize;
  TORCH_CHECK(nested_absmax->scalar_type() == at::kFloat && nested_absmax->numel() == nested_blocks,
              op, ": nested_absmax must be float32 with ceil(nblocks / 256) = ", nested_blocks,
              " entries, got ", nested_absmax->numel(), " ", nested_absmax->scalar_type());
  TORCH_CHECK(nested_code->scalar_type() == at::kFloat && nested_code->numel() == 256, op,
              ": nested_code must be a float32 tensor of 256 values");
}

}  // namespace qk_checks
