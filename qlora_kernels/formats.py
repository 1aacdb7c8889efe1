"""The code tables of the 4-bit and 8-bit formats, on the Python side.

The same 4-bit tables live in ``csrc/include/qk_format.h`` for the C++/CUDA kernels;
``tests/test_formats.py`` checks that the two agree, and that NF4 equals the table
rebuilt from ``scipy.stats.norm.ppf`` as the QLoRA paper describes.

Example:
    >>> from qlora_kernels.formats import get_4bit_code
    >>> get_4bit_code("nf4")[7].item()
    0.0
"""
from __future__ import annotations

import functools

import torch

QUANT_TYPES = ("nf4", "fp4", "int4")
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
# dtypes the ops quantize from and dequantize to
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DQ_CODES = ("fp8", "dynamic")

# bitsandbytes' NF4 values, byte for byte (shared/FORMAT.md)
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 E2M1 in bit-pattern order (bit 3 is the sign): [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12
FP4_VALUES = tuple(v / 12.0 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)) + tuple(
    -v / 12.0 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
)
# Symmetric absmax int4: index i holds (i - 8) / 7; index 0 is never produced.
INT4_VALUES = tuple((i - 8) / 7.0 for i in range(16))

_TABLES = {"nf4": NF4_VALUES, "fp4": FP4_VALUES, "int4": INT4_VALUES}


def check_quant_type(quant_type: str) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return quant_type


def check_blocksize(blocksize: int) -> int:
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(
            f"unsupported blocksize {blocksize!r}: use one of {SUPPORTED_BLOCKSIZES}"
        )
    return int(blocksize)


def check_out_dtype(dtype, op: str) -> None:
    """Kernels write float32, float16 or bfloat16 only (an integer dtype would truncate): the
    same TypeError on every backend.

    Example:
        >>> import torch
        >>> check_out_dtype(torch.int32, "dequantize_4bit")
        Traceback (most recent call last):
        TypeError: dequantize_4bit: dtype must be float32, float16 or bfloat16, got torch.int32
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: dtype must be float32, float16 or bfloat16, got {dtype}")


@functools.lru_cache(maxsize=None)
def _code_cpu(quant_type: str) -> torch.Tensor:
    return torch.tensor(_TABLES[check_quant_type(quant_type)], dtype=torch.float32)


def get_4bit_code(quant_type: str, device="cpu") -> torch.Tensor:
    """The 16 float32 values of a 4-bit code, indexed by the 4-bit pattern.

    Example:
        >>> get_4bit_code("fp4")[3].item()
        1.0
    """
    return _code_cpu(quant_type).to(device).clone()


def floor_midpoints(sorted_values: torch.Tensor) -> torch.Tensor:
    """For neighbouring float32 values, the largest float32 not above their exact midpoint.

    With these thresholds, "s > t" for a float32 s holds exactly when s lies above the real
    midpoint, so counting thresholds below s gives the nearest value with ties to the lower
    index. (Rounding the midpoint to nearest instead can land one ulp above it.)

    Example:
        >>> floor_midpoints(torch.tensor([0.0, 1.0])).item()
        0.5
    """
    v = sorted_values.to(torch.float64)
    mid = (v[:-1] + v[1:]) / 2  # exact: the sum of two float32 fits a float64 here
    t = mid.to(torch.float32)
    above = t.to(torch.float64) > mid
    return torch.where(above, torch.nextafter(t, torch.full_like(t, -float("inf"))), t)


# bitsandbytes' CUDA encoder compares s against these float32 literals (dQuantizeNF4 and
# dQuantizeFP4 in its csrc/kernels.cu; shared/FORMAT.md). They are decimal midpoints, and a
# few of them are not the float32 nearest to the exact midpoint, so only these exact
# numbers give its bytes. Kept as text: several sit within 1e-17 of a float32 rounding tie,
# where going through a Python float (double) rounds differently from the compiler, which
# rounds the decimal straight to float32 (``float32_from_decimal``). The C++ header holds
# the same literals.
NF4_BNB_THRESHOLDS = (
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906",
    "-0.33967943489551544", "-0.23460740596055984", "-0.13791173323988914",
    "-0.045525018125772476", "0.03979014977812767", "0.1202552504837513",
    "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011",
)
# FP4: thresholds between the sorted magnitudes 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1
FP4_BNB_MAG_THRESHOLDS = (
    "0.00260417", "0.0859375", "0.20833333", "0.29166667", "0.4166667", "0.583333", "0.8333333",
)


def float32_from_decimal(text: str) -> float:
    """The float32 nearest to a decimal number (ties to even), as a C compiler reads the
    literal ``<text>f``: rounded once, with no double in between.

    Example:
        >>> float32_from_decimal("0.1") == torch.tensor(0.1, dtype=torch.float32).item()
        True
    """
    from fractions import Fraction

    exact = Fraction(text)
    guess = torch.tensor(float(exact), dtype=torch.float32)
    cands = [torch.nextafter(guess, torch.tensor(-float("inf"))), guess,
             torch.nextafter(guess, torch.tensor(float("inf")))]
    best = min(cands, key=lambda c: (abs(Fraction(c.item()) - exact),
                                     int(c.view(torch.int32).item()) & 1))
    return best.item()


@functools.lru_cache(maxsize=None)
def _thresholds_cpu(quant_type: str) -> torch.Tensor:
    check_quant_type(quant_type)
    if quant_type == "nf4":
        return torch.tensor([float32_from_decimal(t) for t in NF4_BNB_THRESHOLDS])
    if quant_type == "fp4":  # over magnitudes; the sign is a bit
        return torch.tensor([float32_from_decimal(t) for t in FP4_BNB_MAG_THRESHOLDS])
    return floor_midpoints(_code_cpu(quant_type))  # int4 is ours: exact nearest, ties low


def encode_thresholds(quant_type: str) -> torch.Tensor:
    """Sorted float32 thresholds the 4-bit encoder counts: the code index of s is the number
    of thresholds t with ``s > t`` (FP4: over |s|, the sign set as bit 3 when s < 0). NF4 and
    FP4 use bitsandbytes' literals, INT4 ``floor_midpoints``. The C++ header holds the same
    numbers.

    Example:
        >>> encode_thresholds("nf4").shape
        torch.Size([15])
    """
    return _thresholds_cpu(quant_type).clone()


def fp4_rank_to_pattern(rank: torch.Tensor) -> torch.Tensor:
    """Sorted-magnitude rank (0..7) to FP4 bit pattern, the same trick as the C++ header."""
    return rank ^ ((rank & 2) << 1)


def nf4_from_normal_quantiles(offset: float = 0.9677083) -> torch.Tensor:
    """Rebuild NF4 from normal quantiles as the QLoRA paper (appendix) describes.

    8 positive quantiles of linspace(offset, 0.5, 9)[:-1], 7 negative ones of
    linspace(offset, 0.5, 8)[:-1], and 0; sorted and divided by the largest magnitude.
    The linspaces are float32, as in the reference implementation.

    Example:
        >>> nf4_from_normal_quantiles()[0].item()
        -1.0
    """
    from scipy.stats import norm

    pos = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].numpy()).tolist()
    neg = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy())).tolist()
    values = torch.tensor(sorted(pos + neg + [0.0]), dtype=torch.float32)
    return values / values.abs().max()


@functools.lru_cache(maxsize=None)
def _dynamic_map(signed: bool) -> torch.Tensor:
    # Dynamic-exponent map of bitsandbytes (Dettmers, "8-bit approximations"), 7 exponent
    # levels of decade width; linearly spaced fractions whose count doubles each decade.
    data = []
    for i in range(7):
        items = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, items)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        if signed:
            data += ((-(10 ** (-6 + i))) * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256-entry dynamic 8-bit map bitsandbytes uses (signed for absmax/first moment,
    unsigned for the second moment), sorted ascending.

    Example:
        >>> dynamic_map()[-1].item()
        1.0
    """
    return _dynamic_map(bool(signed)).clone()


@functools.lru_cache(maxsize=None)
def _fp8_e4m3_map() -> torch.Tensor:
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    # The two NaN patterns (0x7F, 0xFF) become +-448, the largest finite magnitude, so the
    # table is 256 sorted finite values. The duplicates this makes (+-448 twice, +0/-0)
    # are harmless: the encoder always picks the lowest index among equal values.
    sign = torch.where(torch.arange(256) < 128, 1.0, -1.0)
    v = torch.where(torch.isnan(v), 448.0 * sign, v)
    return (v / 448.0).sort().values


def fp8_e4m3_map() -> torch.Tensor:
    """FP8 E4M3 values normalized to [-1, 1]: 256 sorted float32 values (see the comment in
    the source for how the NaN patterns are handled).

    Example:
        >>> m = fp8_e4m3_map(); (m.min().item(), m.max().item())
        (-1.0, 1.0)
    """
    return _fp8_e4m3_map().clone()


def get_dq_code(dq_code: str | torch.Tensor) -> torch.Tensor:
    """The 8-bit table for double quantization: "fp8" (default), "dynamic", or a tensor of
    256 sorted values (e.g. read from a checkpoint).

    Example:
        >>> get_dq_code("dynamic").numel()
        256
    """
    if isinstance(dq_code, torch.Tensor):
        code = dq_code.detach().to(torch.float32).reshape(-1)
        if code.numel() != 256:
            raise ValueError(f"an 8-bit code table needs 256 values, got {code.numel()}")
        if not torch.isfinite(code).all() or (code[1:] < code[:-1]).any():
            raise ValueError("an 8-bit code table must be 256 finite values sorted ascending")
        return code
    if dq_code == "fp8":
        return fp8_e4m3_map()
    if dq_code == "dynamic":
        return dynamic_map(signed=True)
    raise ValueError(f"dq_code must be one of {DQ_CODES} or a 256-entry tensor, got {dq_code!r}")
