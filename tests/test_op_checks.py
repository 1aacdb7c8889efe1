"""Every backend rejects the same bad op arguments with the same message: the C++ checks
(csrc/include/qk_4bit_checks.h, the 8-bit ops) and their Python mirror
(qlora_kernels/op_checks.py, used by the reference and the Triton launchers)."""
import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.backends import available_backends

OPS = torch.ops.qlora_kernels
BACKENDS = available_backends("cpu")  # the compiled kernels, the reference, Triton (interpreted)
BAD_ARGS = (RuntimeError, ValueError, TypeError)


def _weight(rng, n=96, k=64):
    w = torch.randn(n, k, generator=rng)
    packed, absmax = OPS.quantize_4bit(w, 64, "nf4")
    return packed, absmax, qk.get_4bit_code("nf4")


def _cases(rng):
    p, a, code = _weight(rng)  # a 96 x 64 weight: 96 blocks of 64
    x1, x64 = torch.randn(1, 64, generator=rng), torch.randn(64, 64, generator=rng)
    g = torch.randn(64, 96, generator=rng)
    q8, s8 = OPS.quantize_8bit(torch.randn(300, generator=rng), qk.dynamic_map(), 64)
    dq = qk.dynamic_map()
    return [
        ("packed holds", lambda: OPS.dequantize_4bit(p, a, code, 64, 300, torch.float32)),
        ("absmax has", lambda: OPS.dequantize_4bit(p, a[:1], code, 64, 96 * 64, torch.float32)),
        ("code must be", lambda: OPS.dequantize_4bit(p, a, code[:8], 64, 96 * 64, torch.float32)),
        ("uint8 absmax needs", lambda: OPS.dequantize_4bit(p, a.to(torch.uint8), code, 64,
                                                           96 * 64, torch.float32)),
        ("go together", lambda: OPS.dequantize_4bit(p, a, code, 64, 96 * 64, torch.float32,
                                                    torch.ones(1), None)),
        ("blocksize", lambda: OPS.dequantize_4bit(p, a, code, 48, 96 * 64, torch.float32)),
        ("dtype must be", lambda: OPS.dequantize_4bit(p, a, code, 64, 96 * 64, torch.int32)),
        ("absmax has", lambda: OPS.gemv_4bit(x1, p, a[:3], code, 64, 96)),
        ("absmax has", lambda: OPS.matmul_4bit(x64, p, a[:3], code, 64, 96)),
        ("absmax has", lambda: OPS.matmul_4bit_backward(g, p, a[:3], code, 64, 64)),
        ("packed holds", lambda: OPS.matmul_4bit_backward(g, p[:10], a, code, 64, 64)),
        ("blocksize must be positive", lambda: OPS.quantize_8bit(torch.randn(10), dq, 0)),
        ("code must be", lambda: OPS.quantize_8bit(torch.randn(10), dq[:255], 64)),
        ("input must be float32", lambda: OPS.quantize_8bit(torch.ones(10, dtype=torch.int32),
                                                            dq, 64)),
        ("q must be uint8", lambda: OPS.dequantize_8bit(q8.float(), s8, dq, 64, torch.float32)),
        ("absmax must be float32", lambda: OPS.dequantize_8bit(q8, s8[:2], dq, 64,
                                                               torch.float32)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_rejects_bad_arguments_with_one_message(backend, rng):
    for message, call in _cases(rng):
        with qk.use_backend(backend):
            with pytest.raises(BAD_ARGS, match=message):
                call()


def test_the_cases_are_valid_once_repaired(rng):
    # the bad calls differ from good ones only in what the message names
    p, a, code = _weight(rng)
    assert OPS.dequantize_4bit(p, a, code, 64, 96 * 64, torch.float32).shape == (96 * 64,)
    assert OPS.matmul_4bit(torch.randn(64, 64), p, a, code, 64, 96).shape == (64, 96)
    assert OPS.matmul_4bit_backward(torch.randn(64, 96), p, a, code, 64, 64).shape == (64, 64)
