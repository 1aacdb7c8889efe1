"""Triton tiled GEMM against a 4-bit packed weight, dequantized tile by tile in registers.

W is the row-major (N, K) weight packed as in shared/FORMAT.md: element (n, k) has flat
index n*K + k, its code sits in byte index // 2 (high nibble when the index is even) and
its absmax is block index // blocksize (K need not be a multiple of blocksize, so block
ids always come from flat indices). A double-quantized absmax is decoded on the fly.

    forward   (transpose_w=False): y[M, N] = x[M, K] @ W^T
    backward  (transpose_w=True):  y[M, K] = x[M, N] @ W      (grad_x = grad_y @ W)

Kernel: program (pid_m, pid_o) computes a [BLOCK_M, BLOCK_O] tile of y, walking the
reduction dimension R in BLOCK_R steps: load x[BLOCK_M, BLOCK_R], dequantize
W-tile[BLOCK_R, BLOCK_O] to x.dtype (code[q] * absmax in float32, rounded once, exactly
as dequantize_4bit), tl.dot with float32 accumulation. Programs are grouped GROUP_M
rows at a time along M so that neighbouring programs reuse W tiles from L2.
Grid: (ceil(M / BLOCK_M) * ceil(OUT / BLOCK_O),) with OUT = N (forward) or K (transposed).

Example:
    >>> import torch
    >>> from qlora_kernels.formats import get_4bit_code
    >>> from qlora_kernels.triton.quantize_4bit import quantize_4bit
    >>> from qlora_kernels.triton.matmul_4bit import matmul_4bit_triton
    >>> W, x = torch.randn(96, 200), torch.randn(7, 200)
    >>> packed, absmax = quantize_4bit(W, 64, "nf4")                                    # doctest: +SKIP
    >>> matmul_4bit_triton(x, packed, absmax, get_4bit_code("nf4"), 64, 96, 200).shape  # doctest: +SKIP
    torch.Size([7, 96])
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..formats import FLOAT_DTYPES
from ..op_checks import check_4bit_weight
from ._common import flat, interpreting, next_pow2, on_device
from .dequantize_4bit import cast_rn, load_absmax


# Autotune candidates for Ada / Ampere consumer and workstation GPUs (RTX 4090 sm_89, A6000
# sm_86: at most 99 KiB of shared memory per block, 64K registers): small-M tiles for decode
# and LoRA-sized batches, larger square-ish tiles for prefill / training.
# BLOCK_M, BLOCK_O, BLOCK_R, num_warps, num_stages. The stage counts are the most that fit in
# 99 KiB: each stage holds the W tile's gathered bytes, nested scales and decoded values (~12
# bytes per element), e.g. 16x64x64 tiles take 10 / 58 / 106 KiB with 1 / 2 / 3 stages.
# float32 x doubles the x tile and the decoded W tile: FLOAT32_STAGES lowers the stage count
# of the configs that would not fit then (128x64x32 with 4 stages needs 128 KiB, 3 take 96).
# tests/test_triton_gemm_configs.py compiles each for sm_80/86/89 without a GPU (float32 and bf16)
# and checks its shared memory and that it spills no registers.
GPU_TILE_CONFIGS = [
    (16, 64, 64, 4, 2), (16, 128, 64, 8, 1), (32, 64, 64, 4, 2), (32, 128, 64, 8, 1),
    (64, 64, 64, 4, 2), (64, 128, 32, 4, 2), (128, 64, 32, 8, 4), (128, 128, 32, 8, 2),
    (64, 256, 32, 8, 1),
]
FLOAT32_STAGES = {(128, 64, 32, 8): 3}


def gpu_tile_configs(dtype: torch.dtype) -> list[tuple[int, int, int, int, int]]:
    """GPU_TILE_CONFIGS with the stage counts for x of ``dtype``.

    Example:
        >>> [c for c in gpu_tile_configs(torch.float32) if c[:4] == (128, 64, 32, 8)]
        [(128, 64, 32, 8, 3)]
    """
    if dtype != torch.float32:
        return list(GPU_TILE_CONFIGS)
    return [(*c[:4], FLOAT32_STAGES.get(c[:4], c[4])) for c in GPU_TILE_CONFIGS]


def _config(bm, bo, br, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_O": bo, "BLOCK_R": br, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


def _fit_to_dtype(configs, named_args, **kwargs):
    """Autotune pruning: the candidates for this call's x dtype (the autotuner keys its
    cache on argument dtypes too, so each dtype is tuned over its own list)."""
    if named_args["x_ptr"].dtype != torch.float32:
        return configs
    return [_config(*c) for c in gpu_tile_configs(torch.float32)]


def _configs():
    """The autotune candidates (GPU_TILE_CONFIGS).

    Under TRITON_INTERPRET=1 the list is a single small config: with more than one config
    the autotuner benchmarks every candidate by running it many times, and each interpreted
    run is slow Python, so tests would take minutes. One config skips benchmarking; its
    tile dims are 16/32 because the interpreter's tl.dot needs every dim >= 16.
    """
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_O": 32, "BLOCK_R": 32, "GROUP_M": 8},
                              num_warps=4, num_stages=1)]
    return [_config(*c) for c in GPU_TILE_CONFIGS]


# --- kernel -------------------------------------------------------------------------------
# Tuned per power-of-two bucket of M, not per M: training with variable sequence lengths
# would otherwise benchmark every candidate again for each new token count.
@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "TRANSPOSE_W", "NESTED"],
                 prune_configs_by={"early_config_prune": _fit_to_dtype})
@triton.jit
def _matmul_4bit_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                        nested_code_ptr, offset, bias_ptr, y_ptr, M, M_BUCKET, N, K,
                        stride_xm, stride_xr, stride_ym, stride_yo,
                        BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
                        TRANSPOSE_W: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        DOT_UPCAST: tl.constexpr, INDEX_64: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
                        GROUP_M: tl.constexpr):
    if TRANSPOSE_W:
        OUT = K
        RED = N
    else:
        OUT = N
        RED = K
    # grouped ordering: GROUP_M row-tiles share each column-tile's W in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_o = tl.cdiv(OUT, BLOCK_O)
    group = pid // (GROUP_M * num_o)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_o)) % group_size
    pid_o = (pid % (GROUP_M * num_o)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    if INDEX_64:  # int32 indices halve the registers of the W tile; int64 only if needed
        offs_m = offs_m.to(tl.int64)
        offs_o = offs_o.to(tl.int64)
    m_ok = offs_m < M
    o_ok = offs_o < OUT
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for r0 in range(0, RED, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        if INDEX_64:
            offs_r = offs_r.to(tl.int64)
        r_ok = offs_r < RED
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_r[None, :] * stride_xr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        # flat index into W (N, K) of the tile element (r, o)
        if TRANSPOSE_W:
            widx = offs_r[:, None] * K + offs_o[None, :]
        else:
            widx = offs_o[None, :] * K + offs_r[:, None]
        w_ok = r_ok[:, None] & o_ok[None, :]
        byte = tl.load(packed_ptr + (widx >> 1), mask=w_ok, other=0).to(tl.int32)
        q = tl.where((widx & 1) == 0, byte >> 4, byte & 0xF)
        a = load_absmax(absmax_ptr, widx // BLOCKSIZE, w_ok, nested_absmax_ptr,
                        nested_code_ptr, offset, NESTED)
        w = tl.where(w_ok, tl.load(code_ptr + q) * a, 0.0)
        w = cast_rn(w, x_ptr.dtype.element_ty)  # the value dequantize_4bit would give
        if DOT_UPCAST:  # see the launcher: exact, the products of bf16 values fit float32
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:  # added to the float32 sum: one rounding, as the GEMV and CPU paths do
        acc += tl.load(bias_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    y = cast_rn(acc, y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_o[None, :] * stride_yo, y,
             mask=m_ok[:, None] & o_ok[None, :])


# --- launcher -----------------------------------------------------------------------------
def matmul_4bit_triton(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                       code: torch.Tensor, blocksize: int, N: int, K: int,
                       nested_absmax: Optional[torch.Tensor] = None,
                       nested_code: Optional[torch.Tensor] = None, offset: float = 0.0,
                       transpose_w: bool = False,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T`` (or ``x @ W`` with ``transpose_w``) for the packed 4-bit (N, K) weight W.

    ``x`` is [..., K] (or [..., N] transposed), float32/float16/bfloat16; the result has
    x's dtype and leading dims. Accumulates in float32; float32 inputs use IEEE (not TF32)
    products so the result tracks ``x @ dequantize(W).T`` closely. ``bias`` ([N], forward
    only) is added to the float32 sum before the single rounding to x's dtype.

    Example:
        >>> y = matmul_4bit_triton(torch.randn(3, 200), packed, absmax,
        ...                        get_4bit_code("nf4"), 64, 96, 200)   # doctest: +SKIP
        >>> y.shape                                                    # doctest: +SKIP
        torch.Size([3, 96])
    """
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"matmul_4bit: x must be float32, float16 or bfloat16, got {x.dtype}")
    N, K = int(N), int(K)
    if N <= 0 or K <= 0:
        raise ValueError(f"matmul_4bit: N and K must be positive, got N={N}, K={K}")
    red, out_dim = (N, K) if transpose_w else (K, N)
    if x.dim() == 0 or x.shape[-1] != red:
        raise ValueError(f"matmul_4bit: x has shape {tuple(x.shape)}, its last dim must be "
                         f"{red} ({'N' if transpose_w else 'K'} of the ({N}, {K}) weight)")
    check_4bit_weight("matmul_4bit", packed, absmax, code, blocksize, N * K,
                      nested_absmax, nested_code)
    if x.device != packed.device:
        raise ValueError(f"matmul_4bit: x is on {x.device} but the weight on {packed.device}")
    if bias is not None:
        if transpose_w:
            raise ValueError("matmul_4bit: bias is only added in the forward (transpose_w=False)")
        if bias.numel() != N or bias.device != x.device or bias.dtype not in FLOAT_DTYPES:
            raise ValueError(f"matmul_4bit: bias must be a float tensor of {N} values on "
                             f"{x.device}, got {bias.dtype} {tuple(bias.shape)} on {bias.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, red)
    M = x2.shape[0]
    y = torch.empty((M, out_dim), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*lead, out_dim)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(out_dim, meta["BLOCK_O"]),)

    with on_device(x):
        _matmul_4bit_kernel[grid](
            x2, flat(packed), flat(absmax), flat(code), flat(nested_absmax), flat(nested_code),
            float(offset), flat(bias), y, M, next_pow2(M), N, K, x2.stride(0), x2.stride(1),
            y.stride(0), y.stride(1),
            BLOCKSIZE=int(blocksize), NESTED=nested_absmax is not None, HAS_BIAS=bias is not None,
            TRANSPOSE_W=bool(transpose_w),
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,
            # Triton's interpreter multiplies bfloat16 tiles as their raw uint16 bits in
            # tl.dot, so there the (exact) float32 upcast is multiplied instead.
            DOT_UPCAST=interpreting() and x.dtype == torch.bfloat16,
            INDEX_64=max(N * K, x2.shape[0] * x2.stride(0), M * red, M * out_dim) >= 2**31,
            enable_fp_fusion=False)
    return y.view(*lead, out_dim)
