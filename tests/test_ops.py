"""The op registry: Python's fallback schemas mirror csrc/ops.cpp, and every op has a fake."""
import pytest
import torch

import qlora_kernels  # noqa: F401  (registers fakes and fallbacks)
from qlora_kernels import _extension
from qlora_kernels.ops import SCHEMAS


@pytest.mark.skipif(not _extension.EXTENSION_LOADED, reason="compiled extension not built")
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_python_schema_equals_cpp_schema(name):
    declared = getattr(torch.ops.qlora_kernels, name).default._schema
    assert torch._C.parse_schema("qlora_kernels::" + SCHEMAS[name]) == declared


def test_every_registered_op_is_mirrored():
    ops = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
           if n.startswith("qlora_kernels::")}
    ops.discard("format_table")  # exports the header's tables to the tests; no fallback needed
    assert ops == set(SCHEMAS)


def _opcheck_cases(rng):
    """op name -> a list of argument tuples: fresh random inputs, odd sizes, every op."""
    n, bs = 333, 64
    x = torch.randn(n, generator=rng).to(torch.bfloat16)
    p, a = torch.ops.qlora_kernels.quantize_4bit(x, bs, "nf4")
    code = qlora_kernels.get_4bit_code("nf4")
    fp8 = qlora_kernels.fp8_e4m3_map()
    q8, s8 = torch.ops.qlora_kernels.quantize_8bit(a - a.mean(), fp8, 256)
    w_args = (p, a, code, bs)
    xs = torch.randn(3, 37, generator=rng)
    pw, aw = torch.ops.qlora_kernels.quantize_4bit(torch.randn(9, 37, generator=rng), bs, "fp4")
    fp4 = qlora_kernels.get_4bit_code("fp4")
    m = 515  # two 8-bit blocks of 256 and a partial one
    pc, ac = torch.ops.qlora_kernels.quantize_4bit(torch.randn(5, 256, generator=rng), bs, "nf4")
    offc = ac.mean().item()
    q8c, s8c = torch.ops.qlora_kernels.quantize_8bit(ac - offc, fp8, 256)

    def adam_state():
        return (torch.randn(m, generator=rng), torch.randn(m, generator=rng),
                torch.randn(m, generator=rng) * 0.1, torch.rand(m, generator=rng) * 0.01)

    pm, gm, mm, vm = adam_state()
    code_m, code_v = qlora_kernels.dynamic_map(signed=True), qlora_kernels.dynamic_map(signed=False)
    qm, am = torch.ops.qlora_kernels.quantize_8bit(mm, code_m, 256)
    qv, av = torch.ops.qlora_kernels.quantize_8bit(vm, code_v, 256)
    hyper = (1e-3, 0.9, 0.999, 1e-8, 0.01)
    multi = [adam_state() for _ in range(3)]
    return {
        "quantize_4bit": [(x, bs, "nf4")],
        "dequantize_4bit": [(*w_args, n, torch.bfloat16),
                            (p, q8, code, bs, n, torch.float16, s8, fp8, 0.5)],
        "dequantize_4bit_out": [(*w_args, None, None, 0.0, torch.empty(n))],
        "quantize_8bit": [(x, qlora_kernels.dynamic_map(), 256)],
        "dequantize_8bit": [(q8, s8, fp8, 256, torch.float32)],
        "gemv_4bit": [(xs[:1], pw, aw, fp4, bs, 9), (xs, pw, aw, fp4, bs, 9, None, None, 0.0,
                                                     torch.randn(9, generator=rng))],
        "matmul_4bit": [(xs, pw, aw, fp4, bs, 9)],
        "matmul_4bit_backward": [(torch.randn(3, 9, generator=rng), pw, aw, fp4, bs, 37)],
        "adamw_step_": [(*adam_state(), *hyper, 3, False)],
        "adamw_step_multi_": [([s[0] for s in multi], [s[1] for s in multi],
                               [s[2] for s in multi], [s[3] for s in multi],
                               [torch.tensor(float(i)) for i in range(3)], *hyper, False)],
        "adamw8bit_step_": [(pm, gm, qm, am, qv, av, code_m, code_v, *hyper, 2, False)],
        "managed_supported": [(0,)],
        "managed_empty": [([5, 3], torch.float32, 0)],
        "managed_prefetch_": [([torch.randn(7, generator=rng)], -1)],
        "is_managed": [(torch.randn(7, generator=rng),)],
        "format_table": [("nf4",)],
        # columns 64..191 of a 5 x 256 weight (whole blocks), nested scales
        "dequantize_4bit_cols_out": [(pc, q8c, code, bs, s8c, fp8, offc, 256, 64,
                                      torch.empty(5, 128, dtype=torch.bfloat16))],
        "dropout_seeded": [(xs, 5, 0.3), (x.view(9, 37), -(1 << 40), 0.05)],
        "cpu_features": [()],
        "cpu_isa": [()],
        "set_cpu_isa": [(-1,)],  # -1: the best path, which is already in force
        "cpu_block_cache_stats": [()],
        "cpu_block_cache_enable": [(False,)],  # off: leaves torch's allocator as it is
    }


@pytest.mark.parametrize("name", sorted(set(SCHEMAS) | {"format_table"}))
def test_opcheck_every_op(name, rng):
    """torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch) on
    every op, the mutating and managed-memory ones included."""
    if name == "format_table" and not _extension.EXTENSION_LOADED:
        pytest.skip("format_table is registered by the compiled extension only")
    if name == "managed_empty" and not torch.ops.qlora_kernels.managed_supported(0):
        pytest.skip("managed_empty allocates CUDA unified memory: needs the CUDA build and a GPU")
    cases = _opcheck_cases(rng)
    assert set(cases) == set(SCHEMAS) | {"format_table"}
    # these take no tensor (format_table returns a constant CPU table for the tests, the
    # cpu_* ops read or set the CPU path): there is no fake tensor to trace them with, so
    # they get the schema and autograd checks only
    tensorless = ("format_table", "cpu_features", "cpu_isa", "set_cpu_isa",
                  "cpu_block_cache_enable", "cpu_block_cache_stats")
    utils = ("test_schema", "test_autograd_registration") if name in tensorless else "ALL"
    for args in cases[name]:
        torch.library.opcheck(getattr(torch.ops.qlora_kernels, name).default, args,
                              test_utils=utils)
