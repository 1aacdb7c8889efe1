"""Every backend's 4-bit bytes equal bitsandbytes' CUDA kernel's, as shared/FORMAT.md
states them.

The oracle is a small numpy port of the decision trees written from FORMAT.md's text
alone (its literals, its FP4 tree, s = float32(x) * (1.0f / m), the pad element loaded as
0.0), not from qlora_kernels' code. Inputs: every bf16 and fp16 value in [-1, 1] at
scale 1 (so every value next to a threshold), float32 values on and one ulp around every
threshold, and random blocks of odd sizes at random scales, for every blocksize. The
C++ CPU backend runs once per instruction-set path this CPU has (scalar, AVX2, AVX-512).
"""
from fractions import Fraction

import numpy as np
import pytest
import torch

from qlora_kernels import cpu_dispatch
from qlora_kernels._extension import EXTENSION_LOADED
from qlora_kernels.backends import available_backends, use_backend
from qlora_kernels.formats import SUPPORTED_BLOCKSIZES

from conftest import DTYPES, HAS_CUDA

# FORMAT.md, "Encoding": the float32 literals, as decimal text
NF4_LITERALS = """-0.8480964004993439 -0.6106329262256622 -0.4599952697753906
-0.33967943489551544 -0.23460740596055984 -0.13791173323988914 -0.045525018125772476
0.03979014977812767 0.1202552504837513 0.2035212516784668 0.2920137718319893
0.3893125355243683 0.5016634166240692 0.6427869200706482 0.8614784181118011""".split()
FP4_LITERALS = {name: text for name, text in zip(
    ("t0", "t1", "t2", "t3", "t4", "t5", "t6"),
    "0.00260417 0.0859375 0.20833333 0.29166667 0.4166667 0.583333 0.8333333".split())}


def float32_literal(text: str) -> np.float32:
    """The float32 nearest to a decimal, as a C compiler reads `<text>f` (no double
    rounding: candidates around the double are compared exactly)."""
    exact = Fraction(text)
    guess = np.float32(float(exact))
    cands = [np.nextafter(guess, np.float32(-np.inf)), guess,
             np.nextafter(guess, np.float32(np.inf))]
    return min(cands, key=lambda c: (abs(Fraction(float(c)) - exact),
                                     int(np.array(c).view(np.uint32)) & 1))


NF4_T = np.array([float32_literal(t) for t in NF4_LITERALS], dtype=np.float32)
FP4_T = {k: float32_literal(v) for k, v in FP4_LITERALS.items()}


def port_nf4(s: np.ndarray) -> np.ndarray:
    # "the decision tree is equivalent to counting the thresholds that s exceeds"
    return (s[:, None] > NF4_T[None, :]).sum(axis=1).astype(np.uint8)


def port_fp4(s: np.ndarray) -> np.ndarray:
    t = FP4_T
    a = np.abs(s)
    w = np.where
    mag = w(a > t["t3"],
            w(a > t["t5"], w(a > t["t6"], 0b011, 0b010), w(a > t["t4"], 0b101, 0b100)),
            w(a > t["t1"], w(a > t["t2"], 0b111, 0b110), w(a > t["t0"], 0b001, 0b000)))
    return (mag | w(s < 0, 0b1000, 0)).astype(np.uint8)


def port_quantize(x: torch.Tensor, blocksize: int, quant_type: str):
    """FORMAT.md's quantizer: (packed bytes, absmax)."""
    v = x.reshape(-1).float().numpy().astype(np.float32)
    n = v.size
    nblocks = -(-n // blocksize)
    padded = np.zeros(nblocks * blocksize, dtype=np.float32)  # missing elements load as 0.0
    padded[:n] = v
    blocks = padded.reshape(nblocks, blocksize)
    m = np.abs(blocks).max(axis=1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.float32(1.0) / m
        s = (blocks * inv[:, None]).astype(np.float32).reshape(-1)[: n + n % 2]
    codes = port_nf4(s) if quant_type == "nf4" else port_fp4(s)
    packed = (codes[0::2] << 4) | codes[1::2]
    return torch.from_numpy(packed.astype(np.uint8)).view(-1, 1), torch.from_numpy(m)


def _backends():
    # the C++ CPU backend once per instruction-set path this CPU has ("cpu@avx2", ...)
    out = []
    for b in available_backends("cpu"):
        paths = cpu_dispatch.ISA_NAMES[: cpu_dispatch.ISA_NAMES.index(cpu_dispatch.cpu_isa()) + 1]
        out += [("cpu", f"{b}@{p}") for p in paths] if b == "cpu" and EXTENSION_LOADED \
            else [("cpu", b)]
    if HAS_CUDA:
        out += [("cuda", b) for b in available_backends("cuda")]
    return out


BACKENDS = _backends()
IDS = [f"{d}-{b}" for d, b in BACKENDS]


def _quantize(device, backend, x, blocksize, quant_type):
    backend, _, isa = backend.partition("@")
    cpu_dispatch.set_cpu_isa(isa or None)
    try:
        with use_backend(backend):
            return torch.ops.qlora_kernels.quantize_4bit(x.to(device), blocksize, quant_type)
    finally:
        cpu_dispatch.set_cpu_isa(None)


def _check(device, backend, x, blocksize, quant_type):
    packed, absmax = _quantize(device, backend, x, blocksize, quant_type)
    want_p, want_a = port_quantize(x, blocksize, quant_type)
    assert torch.equal(absmax.cpu(), want_a)
    got = packed.cpu()
    if not torch.equal(got, want_p):
        bad = (got != want_p).nonzero()[:5, 0].tolist()
        raise AssertionError(f"{backend}: bytes differ at {bad}: got "
                             f"{got[bad, 0].tolist()} want {want_p[bad, 0].tolist()}")


def _all_16bit_in_unit_range(dtype):
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    v = bits.view(dtype).float()
    v = v[torch.isfinite(v) & (v.abs() <= 1)]
    return v.to(dtype)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16bit_value_at_scale_one(device, backend, quant_type, dtype):
    v = _all_16bit_in_unit_range(dtype)
    blocksize = 64
    nblocks = -(-v.numel() // (blocksize - 1))
    # every block holds a 1.0, so inv = 1 and s is the value itself
    body = torch.ones(nblocks * (blocksize - 1), dtype=dtype)
    body[: v.numel()] = v
    x = torch.ones(nblocks, blocksize, dtype=dtype)
    x[:, 1:] = body.view(nblocks, blocksize - 1)
    _check(device, backend, x.reshape(-1)[:-1], blocksize, quant_type)  # odd numel


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_float32_on_and_around_every_threshold(device, backend, quant_type):
    t = NF4_T if quant_type == "nf4" else np.array(list(FP4_T.values()), dtype=np.float32)
    if quant_type == "fp4":
        t = np.concatenate([t, -t])
    around = np.concatenate([t, np.nextafter(t, np.float32(np.inf)),
                             np.nextafter(t, np.float32(-np.inf))]).astype(np.float32)
    tiny = np.array([0.0, -0.0, 1e-30, -1e-30, 1e-3, -1e-3], dtype=np.float32)
    vals = np.concatenate([around, tiny])
    blocksize = 32
    nblocks = -(-vals.size // (blocksize - 1))
    x = np.ones((nblocks, blocksize), dtype=np.float32)
    flat = np.zeros(nblocks * (blocksize - 1), dtype=np.float32)
    flat[: vals.size] = vals
    x[:, 1:] = flat.reshape(nblocks, blocksize - 1)
    x[1::2, 0] = -1.0  # a negative absmax element: m stays 1
    _check(device, backend, torch.from_numpy(x.reshape(-1)[:-1].copy()), blocksize, quant_type)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", SUPPORTED_BLOCKSIZES)
def test_random_blocks_at_random_scales(device, backend, quant_type, dtype, blocksize, rng):
    for n in (1, 3, 63, 65, 4097, 33 * 65 + 7):
        nb = -(-n // blocksize)
        scale = torch.exp(3 * torch.randn(nb, generator=rng)).repeat_interleave(blocksize)[:n]
        x = (torch.randn(n, generator=rng) * scale).to(dtype)
        if n > blocksize:
            x[:blocksize] = 0.0  # an all-zero block: bnb's 0 * (1/0) = NaN gives code 0
        _check(device, backend, x, blocksize, quant_type)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("quant_type,pad", [("nf4", 7), ("fp4", 0), ("int4", 8)])
def test_odd_numel_pad_nibble_is_the_code_of_zero(device, backend, quant_type, pad, rng):
    for n in (1, 65, 333):
        x = torch.randn(n, generator=rng) + 3.0  # no element encodes to the pad by chance
        packed, _ = _quantize(device, backend, x, 64, quant_type)
        assert packed.cpu()[-1, 0].item() & 0xF == pad


def test_port_distinguishes_bnb_literals_from_nearest_midpoints():
    # the port must be able to fail: 0.583333f lies below 7/12's float32, so a value in
    # between encodes differently from a nearest-value rule
    t = FP4_T["t5"]
    s = np.nextafter(t, np.float32(1))
    assert s < np.float32(7 / 12)
    assert port_fp4(np.array([s], dtype=np.float32))[0] == 0b010  # 2/3, not 1/2
