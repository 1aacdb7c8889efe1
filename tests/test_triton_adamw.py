"""The Triton AdamW launcher (qlora_kernels/triton/adamw.py): it launches on the param's
device, and its bfloat16 rounding keeps every NaN a NaN. The element update itself is
compared with torch.optim.AdamW in tests/test_optim.py (backend "triton").
"""
import pytest
import torch

pytest.importorskip("triton")

from qlora_kernels.backends.reference import adamw as reference  # noqa: E402
from qlora_kernels.triton import adamw as triton_adamw  # noqa: E402

from conftest import HAS_CUDA  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
HYPER = (1e-2, 0.9, 0.999, 1e-8, 0.01, 1, False)  # lr, beta1, beta2, eps, wd, step, maximize


def _gpu_nan(n: int, where: int) -> torch.Tensor:
    """float32 zeros with the NaN a GPU produces (0x7FFFFFFF, not x86's 0xFFC00000)."""
    bits = torch.zeros(n, dtype=torch.int32)
    bits[where] = 0x7FFFFFFF
    return bits.view(torch.float32)


def test_bf16_param_hit_by_a_gpu_nan_stays_nan(rng):
    # rounding 0x7FFFFFFF by its bits (u + 0x7FFF + lsb) >> 16 gives 0x8000: -0.0, a NaN
    # gradient would silently zero the weight instead of surfacing
    n = 37
    p = torch.randn(n, generator=rng).to(torch.bfloat16)
    # float32 grad (the launcher converts it to float32 anyway) holding bf16 values, so that
    # the reference sees the same gradient in the param's dtype
    g = torch.randn(n, generator=rng).to(torch.bfloat16).float() + _gpu_nan(n, 5)
    assert g.view(torch.int32)[5].item() == 0x7FFFFFFF
    m, v = torch.rand(n, generator=rng), torch.rand(n, generator=rng)
    p_ref, m_ref, v_ref = p.clone(), m.clone(), v.clone()
    p, g, m, v = (t.to(DEV) for t in (p, g, m, v))
    triton_adamw.adamw_step_(p, g, m, v, *HYPER)
    reference.adamw_step_(p_ref, g.cpu().to(torch.bfloat16), m_ref, v_ref, *HYPER)
    assert torch.isnan(p[5]).item() and torch.isnan(m[5]).item()
    keep = torch.arange(n) != 5
    assert torch.equal(p.cpu()[keep], p_ref[keep])  # round to nearest even elsewhere
    assert torch.equal(m.cpu()[keep], m_ref[keep]) and torch.equal(v.cpu()[keep], v_ref[keep])


def test_launch_is_made_on_the_params_device(rng, monkeypatch):
    entered = []
    real = triton_adamw.on_device

    def recording(t):
        entered.append(t)
        return real(t)

    monkeypatch.setattr(triton_adamw, "on_device", recording)
    p, g = torch.randn(9, generator=rng).to(DEV), torch.randn(9, generator=rng).to(DEV)
    m, v = torch.zeros(9, device=DEV), torch.zeros(9, device=DEV)
    triton_adamw.adamw_step_(p, g, m, v, *HYPER)
    assert len(entered) == 1 and entered[0] is p


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_params_on_the_second_gpu_while_the_first_is_current(rng):
    p = torch.randn(4097, generator=rng)
    g = torch.randn(4097, generator=rng)
    m, v = torch.zeros(4097), torch.zeros(4097)
    p_ref, m_ref, v_ref = p.clone(), m.clone(), v.clone()
    reference.adamw_step_(p_ref, g, m_ref, v_ref, *HYPER)
    on1 = [t.to("cuda:1") for t in (p, g, m, v)]
    with torch.cuda.device(0):
        triton_adamw.adamw_step_(*on1, *HYPER)
    torch.cuda.synchronize(1)
    assert torch.equal(on1[0].cpu(), p_ref) and torch.equal(on1[2].cpu(), m_ref)
