"""qlora_kernels.optim: fused AdamW (CPU / Triton / reference / CUDA) against torch.optim.AdamW,
8-bit state, paged state and state-dict round trips."""
import io
import warnings

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import _extension, ops
from qlora_kernels.optim import paged as paged_mod
from qlora_kernels.backends.reference import adamw as reference

HAS_CUDA = torch.cuda.is_available()
CPU_BACKENDS = ["torch", "triton"] + (["cpu"] if _extension.EXTENSION_LOADED else [])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the error relative to the tensor's scale (elementwise relative
    error is meaningless for entries that pass through zero)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def make_params(gen, sizes, dtype=torch.float32, device="cpu"):
    return [torch.randn(n, generator=gen).to(dtype).to(device) for n in sizes]


def run_pair(gen, sizes, steps, opt_kwargs, groups_kwargs=None, backend=None, scheduler=False,
             dtype=torch.float32):
    """Train identical params with qk.optim.AdamW and torch.optim.AdamW on the same fresh random
    grads; returns (ours, theirs, our optimizer, torch optimizer)."""
    init = make_params(gen, sizes)
    ours = [torch.nn.Parameter(t.clone().to(dtype)) for t in init]
    theirs = [torch.nn.Parameter(t.clone().to(dtype)) for t in init]
    if groups_kwargs:
        g_ours = [dict(params=[p], **kw) for p, kw in zip(ours, groups_kwargs)]
        g_theirs = [dict(params=[p], **kw) for p, kw in zip(theirs, groups_kwargs)]
    else:
        g_ours, g_theirs = ours, theirs
    opt = qk.optim.AdamW(g_ours, backend=backend, **opt_kwargs)
    ref = torch.optim.AdamW(g_theirs, foreach=False, **opt_kwargs)
    scheds = []
    if scheduler:
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + 0.05 * s))
                  for o in (opt, ref)]
    for _ in range(steps):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen).to(dtype)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for s in scheds:
            s.step()
    return ours, theirs, opt, ref


def set_same_grads(ours, theirs, gen, device="cpu"):
    """The same fresh random gradient on each pair of params."""
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(a.shape, generator=gen).to(device)
        b.grad = a.grad.clone()


# ------------------------------------------------------------------ 32-bit vs torch
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_adamw_matches_torch_100_steps(rng, backend):
    sizes = (1, 63, 65, 333 * 77) if backend != "triton" else (1, 65, 1500)
    groups = [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, weight_decay=0.0),
              dict(lr=1e-3, weight_decay=0.01), dict(lr=2e-2, weight_decay=0.05)][:len(sizes)]
    ours, theirs, opt, ref = run_pair(rng, sizes, 100, dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8),
                                      groups, backend=backend, scheduler=True)
    for a, b in zip(ours, theirs):
        assert rel_err(a.detach(), b.detach()) < 1e-6
        assert rel_err(opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"]) < 1e-6
        assert rel_err(opt.state[a]["exp_avg"], ref.state[b]["exp_avg"]) < 1e-6
        assert opt.state[a]["step"].dtype == torch.float32 and float(opt.state[a]["step"]) == 100
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] != 1e-2  # scheduler acted


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_adamw_maximize_and_large_beta1(rng, backend):
    # beta1 = 0.3 takes torch's other lerp branch (weight 1 - beta1 >= 0.5)
    ours, theirs, _, _ = run_pair(rng, (333,), 30, dict(lr=1e-2, betas=(0.3, 0.99),
                                  weight_decay=0.1, maximize=True), backend=backend)
    assert rel_err(ours[0].detach(), theirs[0].detach()) < 1e-6
    assert not torch.equal(ours[0].detach(), ours[0].detach() * 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adamw_low_precision_params_float32_state(rng, backend, dtype):
    """A bf16/fp16 param is updated in float32 from float32 state and rounded once per step:
    the same as torch.optim.AdamW on a float32 copy that is re-rounded after every step."""
    n = 1000
    p = torch.nn.Parameter(torch.randn(n, generator=rng).to(dtype))
    shadow = torch.nn.Parameter(p.detach().float())
    opt = qk.optim.AdamW([p], lr=1e-2, weight_decay=0.1, backend=backend)
    ref = torch.optim.AdamW([shadow], lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(20):
        g = torch.randn(n, generator=rng).to(dtype)
        p.grad, shadow.grad = g, g.float()
        opt.step()
        ref.step()
        with torch.no_grad():
            ulp = (p.detach().float() - shadow.to(dtype).float()).abs()
            # torch's CPU sqrt may be an ulp off, which can move a rounding boundary
            assert (ulp <= shadow.abs() * 2 ** -7 + 1e-30).all()
            shadow.copy_(p.detach().float())
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert rel_err(opt.state[p]["exp_avg_sq"], ref.state[shadow]["exp_avg_sq"]) < 1e-5


def test_amsgrad_rejected():
    w = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="amsgrad"):
        qk.optim.AdamW([w], amsgrad=True)
    opt = qk.optim.AdamW([w])
    with pytest.raises(ValueError, match="amsgrad"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "amsgrad": True})
    with pytest.raises(ValueError, match="betas"):
        qk.optim.AdamW([w], betas=(0.9, 1.0))


def test_op_errors_are_clear():
    # RuntimeError from the compiled op, ValueError from the reference standing in for it
    p, g = torch.randn(10), torch.randn(10)
    m, v = torch.zeros(10), torch.zeros(10)
    with pytest.raises((RuntimeError, ValueError), match="exp_avg_sq has 9 elements"):
        torch.ops.qlora_kernels.adamw_step_(p, g, m, torch.zeros(9), 1e-3, 0.9, 0.999, 1e-8, 0, 1,
                                            False)
    with pytest.raises((RuntimeError, ValueError), match="grad dtype"):
        torch.ops.qlora_kernels.adamw_step_(p, g.double(), m, v, 1e-3, 0.9, 0.999, 1e-8, 0, 1,
                                            False)
    with pytest.raises((RuntimeError, ValueError), match="step must be >= 1"):
        torch.ops.qlora_kernels.adamw_step_(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 0, 0, False)


def test_schemas_mirror_cpp():
    for name in ("adamw_step_", "adamw_step_multi_", "adamw8bit_step_", "managed_supported",
                 "managed_empty",
                 "managed_prefetch_", "is_managed"):
        schema = str(getattr(torch.ops.qlora_kernels, name).default._schema)
        assert schema == "qlora_kernels::" + ops.SCHEMAS[name]


# ------------------------------------------------------------------ multi-tensor op
def _multi_case(rng):
    # mixed dtypes and sizes (below, at and past a 32768-element chunk), different step counts
    sizes = (1, 65, 32768, 70001, 333 * 77)
    dtypes = (torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float32)
    ps = [torch.randn(n, generator=rng).to(dt) for n, dt in zip(sizes, dtypes)]
    gs = [torch.randn(n, generator=rng).to(dt) for n, dt in zip(sizes, dtypes)]
    ms = [torch.randn(n, generator=rng) * 0.1 for n in sizes]
    vs = [torch.rand(n, generator=rng) * 0.01 for n in sizes]
    counters = [torch.tensor(float(c)) for c in (2, 0, 6, 1, 99)]  # counted before use
    return ps, gs, ms, vs, counters


@pytest.mark.parametrize("maximize", [False, True])
def test_multi_tensor_op_equals_per_param_op(rng, maximize):
    ps, gs, ms, vs, counters = _multi_case(rng)
    one = [[t.clone() for t in ts] for ts in (ps, ms, vs)]
    before = [int(c) for c in counters]
    hyper = (1e-3, 0.9, 0.999, 1e-8, 0.01)
    torch.ops.qlora_kernels.adamw_step_multi_(ps, gs, ms, vs, counters, *hyper, maximize)
    assert [float(c) for c in counters] == [b + 1.0 for b in before]  # each counted once
    for i, b in enumerate(before):
        torch.ops.qlora_kernels.adamw_step_(one[0][i], gs[i], one[1][i], one[2][i], *hyper, b + 1,
                                            maximize)
    for got, want in zip(ps + ms + vs, one[0] + one[1] + one[2]):
        assert torch.equal(got, want)  # the same element updates: the same bits


def test_multi_tensor_op_matches_reference(rng):
    ps, gs, ms, vs, counters = _multi_case(rng)
    mine = [[t.clone() for t in ts] for ts in (ps, ms, vs, counters)]
    hyper = (1e-3, 0.9, 0.999, 1e-8, 0.01)
    torch.ops.qlora_kernels.adamw_step_multi_(ps, gs, ms, vs, counters, *hyper, False)
    reference.adamw_step_multi_(mine[0], gs, mine[1], mine[2], mine[3], *hyper, False)
    assert [float(c) for c in counters] == [float(c) for c in mine[3]]
    for got, want in zip(ps + ms + vs, mine[0] + mine[1] + mine[2]):
        # float32 params: IEEE sqrt here vs torch's CPU sqrt there (an ulp); half params round
        tol = 1e-6 if got.dtype == torch.float32 else 1e-2
        assert rel_err(got.float(), want.float()) < tol


@pytest.mark.parametrize("fn", ["native", "reference"])
def test_multi_tensor_op_checks_and_writes_nothing_on_error(rng, fn):
    op = (torch.ops.qlora_kernels.adamw_step_multi_ if fn == "native"
          else reference.adamw_step_multi_)
    ps, gs, ms, vs, counters = _multi_case(rng)
    saved = [[t.clone() for t in ts] for ts in (ps, ms, vs, counters)]
    hyper = (1e-3, 0.9, 0.999, 1e-8, 0.0)
    with pytest.raises((RuntimeError, ValueError), match="same length"):
        op(ps, gs[:-1], ms, vs, counters, *hyper, False)
    bad_vs = vs[:-1] + [torch.zeros(vs[-1].numel() - 1)]
    with pytest.raises((RuntimeError, ValueError), match=f"exp_avg_sq has {bad_vs[-1].numel()} "):
        op(ps, gs, ms, bad_vs, counters, *hyper, False)
    for bad, what in ((torch.tensor(1, dtype=torch.int64), "float32"),
                      (torch.zeros(2), "one-element"), (torch.tensor(2.5), "not a step count"),
                      (torch.tensor(-1.0), "not a step count")):
        with pytest.raises((RuntimeError, ValueError), match=what):
            op(ps, gs, ms, vs, counters[:-1] + [bad], *hyper, False)
    # the bad tensor was the last one: nothing before it may have been touched
    for got, want in zip(ps + ms + vs + counters, saved[0] + saved[1] + saved[2] + saved[3]):
        assert torch.equal(got, want)


def test_multi_tensor_op_opcheck(rng):
    ps, gs, ms, vs, counters = _multi_case(rng)
    torch.library.opcheck(torch.ops.qlora_kernels.adamw_step_multi_.default,
                          (ps, gs, ms, vs, counters, 1e-3, 0.9, 0.999, 1e-8, 0.01, False))


def test_optimizer_with_many_small_params_matches_torch(rng):
    # the optimizer batches CPU params into one multi-tensor call: a LoRA-like list
    shapes = [(8, 64), (64, 8)] * 40 + [(5,)]
    init = [torch.randn(*s, generator=rng) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = qk.optim.AdamW(ours, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    for _ in range(20):
        set_same_grads(ours, theirs, rng)
        ours[3].grad = None  # a param without a gradient is skipped, its step count too
        theirs[3].grad = None
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert rel_err(a.detach(), b.detach()) < 1e-6
    assert 3 not in [i for i, p in enumerate(ours) if p in opt.state]
    assert float(opt.state[ours[0]]["step"]) == 20


# ------------------------------------------------------------------ 8-bit
def test_adamw8bit_native_matches_reference(rng):
    n = 333 * 77  # a partial last block
    p0 = torch.randn(n, generator=rng)
    code_m, code_v = qk.dynamic_map(signed=True), qk.dynamic_map(signed=False)
    st = [[p0.clone(), torch.zeros(n, dtype=torch.uint8), torch.zeros(-(-n // 256)),
           torch.zeros(n, dtype=torch.uint8), torch.zeros(-(-n // 256))] for _ in range(2)]
    fns = (torch.ops.qlora_kernels.adamw8bit_step_, reference.adamw8bit_step_)
    for step in range(1, 6):
        g = torch.randn(n, generator=rng)
        for fn, (p, qm, am, qv, av) in zip(fns, st):
            fn(p, g, qm, am, qv, av, code_m, code_v, 1e-2, 0.9, 0.999, 1e-8, 0.01, step, False)
    (p1, qm1, am1, qv1, av1), (p2, qm2, am2, qv2, av2) = st
    assert rel_err(p1, p2) < 1e-6
    assert rel_err(am1, am2) < 1e-6 and rel_err(av1, av2) < 1e-6
    # torch's sqrt can differ by an ulp, which may move a value across a code midpoint
    assert (qm1 != qm2).float().mean() < 1e-3 and (qv1 != qv2).float().mean() < 1e-3


def test_adamw8bit_training_matches_32bit():
    """A small regression problem: 8-bit state reaches the 32-bit loss within a few percent."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(256, 32, generator=gen)
    W_true = torch.randn(32, 32, generator=gen) / 6
    Y = torch.tanh(X @ W_true.T) + 0.01 * torch.randn(256, 32, generator=gen)
    losses = {}
    for cls in (qk.optim.AdamW, qk.optim.AdamW8bit):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(),
                                    torch.nn.Linear(128, 32))  # 4096-element weights: 8-bit
        opt = cls(model.parameters(), lr=3e-3, weight_decay=0.0)
        for _ in range(100):
            loss = torch.nn.functional.mse_loss(model(X), Y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[cls.__name__] = loss.item()
        if cls is qk.optim.AdamW8bit:
            assert opt.state[model[0].weight]["exp_avg_q"].dtype == torch.uint8
            assert "exp_avg" in opt.state[model[0].bias]  # small params keep 32-bit state
    first = torch.nn.functional.mse_loss(torch.zeros_like(Y), Y).item()
    assert losses["AdamW"] < 0.2 * first  # it trained
    assert abs(losses["AdamW8bit"] - losses["AdamW"]) <= 0.05 * losses["AdamW"], losses


# ------------------------------------------------------------------ state dicts
@pytest.mark.parametrize("cls", [qk.optim.AdamW, qk.optim.AdamW8bit])
def test_state_dict_resume_is_exact(rng, cls):
    n = 5000
    init = torch.randn(n, generator=rng)
    grads = [torch.randn(n, generator=rng) for _ in range(6)]
    a = torch.nn.Parameter(init.clone())
    opt_a = cls([a], lr=1e-2)
    for g in grads:
        a.grad = g.clone()
        opt_a.step()
    b = torch.nn.Parameter(init.clone())
    opt_b = cls([b], lr=1e-2)
    for g in grads[:3]:
        b.grad = g.clone()
        opt_b.step()
    buf = io.BytesIO()
    torch.save(opt_b.state_dict(), buf)
    buf.seek(0)
    opt_c = cls([b], lr=123.0)  # lr comes back from the state dict
    opt_c.load_state_dict(torch.load(buf))
    assert opt_c.param_groups[0]["lr"] == 1e-2
    for g in grads[3:]:
        b.grad = g.clone()
        opt_c.step()
    assert torch.equal(a.detach(), b.detach())
    for key, val in opt_a.state[a].items():
        assert torch.equal(val, opt_c.state[b][key]) and val.dtype == opt_c.state[b][key].dtype
    assert "qmap_m" not in opt_b.state[b]  # the tables go into the dict, not the live state


def test_8bit_rejects_triton_backend():
    with pytest.raises(ValueError, match="no Triton kernel"):
        qk.optim.AdamW8bit([torch.nn.Parameter(torch.randn(8))], backend="triton")


def test_8bit_state_dict_carries_code_tables(rng):
    w = torch.nn.Parameter(torch.randn(5000, generator=rng))
    opt = qk.optim.AdamW8bit([w])
    w.grad = torch.randn(5000, generator=rng)
    opt.step()
    sd = opt.state_dict()
    st = sd["state"][0]
    assert torch.equal(st["qmap_m"], qk.formats.dynamic_map(signed=True))
    assert torch.equal(st["qmap_v"], qk.formats.dynamic_map(signed=False))
    qk.optim.AdamW8bit([w]).load_state_dict(sd)  # matching tables load
    st["qmap_v"] = st["qmap_v"].flip(0)
    with pytest.raises(ValueError, match="code table qmap_v differs"):
        qk.optim.AdamW8bit([w]).load_state_dict(sd)


def test_loads_torch_adamw_state_dict_for_bf16_param(rng):
    w = torch.nn.Parameter(torch.randn(100, generator=rng))
    ref = torch.optim.AdamW([w], lr=1e-3)
    w.grad = torch.randn(100, generator=rng)
    ref.step()
    wb = torch.nn.Parameter(w.detach().bfloat16())
    opt = qk.optim.AdamW([wb], lr=1e-3)
    opt.load_state_dict(ref.state_dict())
    assert opt.state[wb]["exp_avg"].dtype == torch.float32  # not cast to the param dtype
    assert torch.equal(opt.state[wb]["exp_avg"], ref.state[w]["exp_avg"])
    with pytest.raises(ValueError, match="elements"):
        qk.optim.AdamW([torch.nn.Parameter(torch.randn(7))]).load_state_dict(ref.state_dict())


# ------------------------------------------------------------------ paged
def test_paged_without_cuda_warns_once_and_uses_ordinary_memory(rng):
    params = [torch.nn.Parameter(torch.randn(n, generator=rng)) for n in (200_000, 10, 300_000)]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = qk.optim.PagedAdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    msgs = [w for w in rec if "paged=True" in str(w.message)]
    assert len(msgs) == 1 and "ordinary memory" in str(msgs[0].message)
    for p in params:
        p.grad = torch.randn(p.shape, generator=rng)
    opt.step()
    assert all(not paged_mod.is_paged(opt.state[p]["exp_avg"]) for p in params)


def test_paged_on_a_gpu_without_concurrent_managed_access_says_state_stays_resident(
        monkeypatch):
    # managed_supported (csrc/cuda/managed_memory.cpp) is false without concurrent managed
    # access; the optimizer's one warning then says why and where the state lives
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(paged_mod, "_op", lambda name: (lambda *a: False))
    why = paged_mod.fallback_reason(torch.device("cuda", 0))
    assert "concurrent managed access" in why and "resident" in why
    assert not paged_mod.managed_supported(torch.device("cuda", 0))


def test_prefetch_of_ordinary_memory_does_nothing(rng):
    ts = [torch.randn(5, generator=rng), torch.randn(200_000, generator=rng)]
    before = [t.clone() for t in ts]
    assert torch.ops.qlora_kernels.managed_prefetch_(ts, -1) is None  # a list in one call
    paged_mod.prefetch_(ts, "cpu")
    paged_mod.prefetch_(ts[0], "cpu")
    assert all(torch.equal(a, b) for a, b in zip(ts, before))


def test_paged_state_is_updated_in_groups_with_the_same_result(rng, monkeypatch):
    # paged: one multi-tensor call per PAGED_GROUP_BYTES of state (each after its prefetch)
    from qlora_kernels.optim import adamw as adamw_mod
    monkeypatch.setattr(adamw_mod, "PAGED_GROUP_BYTES", 8 * 3000)
    sizes = (1000, 1500, 700, 5000, 20, 333)
    assert [len(g) for g in adamw_mod._paged_groups(
        [(torch.zeros(n), None, {}) for n in sizes], 8 * 3000)] == [2, 1, 1, 2]
    init = [torch.randn(n, generator=rng) for n in sizes]
    paged = [torch.nn.Parameter(t.clone()) for t in init]
    plain = [torch.nn.Parameter(t.clone()) for t in init]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA: ordinary memory
        opt_paged = qk.optim.PagedAdamW(paged, lr=1e-2, weight_decay=0.1)
    opt_plain = qk.optim.AdamW(plain, lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        set_same_grads(paged, plain, rng)
        opt_paged.step()
        opt_plain.step()
    for a, b in zip(paged, plain):
        assert torch.equal(a, b)
        assert float(opt_paged.state[a]["step"]) == 5


def test_paged_restore_allocates_paged_again(rng, monkeypatch):
    """With managed memory (simulated here: no GPU), fresh and restored states both come from
    the managed allocator above the size threshold, and small ones from ordinary memory."""
    made = []

    def fake_managed_empty(size, dtype, device):
        t = torch.empty(size, dtype=dtype)
        made.append(t.data_ptr())
        return t

    class FakeOps:
        managed_empty = staticmethod(fake_managed_empty)

    monkeypatch.setattr(paged_mod, "managed_supported", lambda device: True)
    monkeypatch.setattr(paged_mod, "fallback_reason", lambda device: None)
    monkeypatch.setattr(paged_mod, "_op", lambda name: getattr(FakeOps, name))
    big, small = (torch.nn.Parameter(torch.randn(n, generator=rng)) for n in (3000, 50))
    opt = qk.optim.PagedAdamW8bit([big, small], paged_min_numel=1000, min_8bit_size=1000)
    for p in (big, small):
        p.grad = torch.randn(p.shape, generator=rng)
    opt.step()
    assert opt.state[big]["exp_avg_q"].data_ptr() in made
    assert opt.state[small]["exp_avg"].data_ptr() not in made
    sd = opt.state_dict()
    made.clear()
    opt2 = qk.optim.PagedAdamW8bit([big, small], paged_min_numel=1000, min_8bit_size=1000)
    opt2.load_state_dict(sd)
    for key in ("exp_avg_q", "exp_avg_sq_q"):
        assert opt2.state[big][key].data_ptr() in made
        assert torch.equal(opt2.state[big][key], opt.state[big][key])


# ------------------------------------------------------------------ GPU
gpu = pytest.mark.gpu


@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_cuda_adamw_matches_torch(backend):
    if backend == "cuda" and not _extension.cuda_kernels_built():
        pytest.skip("extension built without CUDA kernels")
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(n, generator=gen) for n in (1, 65, 333 * 77)]
    ours = [torch.nn.Parameter(t.cuda()) for t in init]
    theirs = [torch.nn.Parameter(t.cuda()) for t in init]
    opt = qk.optim.AdamW(ours, lr=1e-2, weight_decay=0.1, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(100):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen).cuda()
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert rel_err(a.detach(), b.detach()) < 1e-6


@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_multi_tensor_op_matches_per_param_and_cpu():
    if not _extension.cuda_kernels_built():
        pytest.skip("extension built without CUDA kernels")
    gen = torch.Generator().manual_seed(5)
    # 60 params (a launch takes 40), a large one (321 CUDA blocks of 16384), an empty one
    sizes = [1 + (i * 7919) % 40000 for i in range(57)] + [320 * 16384 + 3, 0, 65]
    dtypes = [(torch.float32, torch.bfloat16, torch.float16)[i % 3] for i in range(len(sizes))]
    ps = [torch.randn(n, generator=gen).to(dt) for n, dt in zip(sizes, dtypes)]
    gs = [torch.randn(n, generator=gen).to(dt) for n, dt in zip(sizes, dtypes)]
    ms = [torch.randn(n, generator=gen) * 0.1 for n in sizes]
    vs = [torch.rand(n, generator=gen) * 0.01 for n in sizes]
    counts = [float(i % 5) for i in range(len(sizes))]
    hyper = (1e-3, 0.9, 0.999, 1e-8, 0.01)
    multi = [[t.cuda() for t in ts] for ts in (ps, gs, ms, vs)]
    single = [[t.cuda() for t in ts] for ts in (ps, ms, vs)]
    cpu = [[t.clone() for t in ts] for ts in (ps, ms, vs)]
    steps = [torch.tensor(c) for c in counts]
    torch.ops.qlora_kernels.adamw_step_multi_(*multi, steps, *hyper, False)
    assert [float(c) for c in steps] == [c + 1 for c in counts]
    torch.ops.qlora_kernels.adamw_step_multi_(cpu[0], gs, cpu[1], cpu[2],
                                              [torch.tensor(c) for c in counts], *hyper, False)
    for i, c in enumerate(counts):
        torch.ops.qlora_kernels.adamw_step_(single[0][i], multi[1][i], single[1][i],
                                            single[2][i], *hyper, int(c) + 1, False)
    got = multi[0] + multi[2] + multi[3]
    for a, b, c in zip(got, single[0] + single[1] + single[2], cpu[0] + cpu[1] + cpu[2]):
        assert torch.equal(a, b)  # the same kernel math per element
        assert torch.equal(a.cpu(), c)  # and the same IEEE operations as the CPU kernel


@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_paged_steps_equal_unpaged_steps():
    gen = torch.Generator().manual_seed(6)
    init = [torch.randn(n, generator=gen) for n in (150_000, 64, 250_000, 333 * 77)]
    paged = [torch.nn.Parameter(t.cuda()) for t in init]
    plain = [torch.nn.Parameter(t.cuda()) for t in init]
    opt_paged = qk.optim.PagedAdamW(paged, lr=1e-2, weight_decay=0.1)
    opt_plain = qk.optim.AdamW(plain, lr=1e-2, weight_decay=0.1)
    for i in range(5):
        set_same_grads(paged, plain, gen, "cuda")
        if i == 3 and paged_mod.managed_supported("cuda"):  # out to host, then back for the step
            paged_mod.prefetch_([t for st in opt_paged.state.values() for t in st.values()
                                 if torch.is_tensor(t) and t.is_cuda], "cpu")
        opt_paged.step()
        opt_plain.step()
    for a, b in zip(paged, plain):
        assert torch.equal(a, b)
    if paged_mod.managed_supported("cuda"):
        assert paged_mod.is_paged(opt_paged.state[paged[0]]["exp_avg"])
        assert not paged_mod.is_paged(opt_paged.state[paged[1]]["exp_avg"])  # below threshold


@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_8bit_matches_cpu_kernel():
    gen = torch.Generator().manual_seed(4)
    n = 333 * 77
    p = torch.randn(n, generator=gen)
    code_m, code_v = qk.dynamic_map(signed=True), qk.dynamic_map(signed=False)
    st = [[p.clone().to(d), torch.zeros(n, dtype=torch.uint8, device=d),
           torch.zeros(-(-n // 256), device=d), torch.zeros(n, dtype=torch.uint8, device=d),
           torch.zeros(-(-n // 256), device=d), code_m.to(d), code_v.to(d)] for d in ("cpu", "cuda")]
    for step in range(1, 6):
        g = torch.randn(n, generator=gen)
        for d, s in zip(("cpu", "cuda"), st):
            torch.ops.qlora_kernels.adamw8bit_step_(*s[:1], g.to(d), *s[1:], 1e-2, 0.9, 0.999,
                                                    1e-8, 0.01, step, False)
    for a, b in zip(st[0][:5], st[1][:5]):
        assert torch.equal(a, b.cpu())  # same IEEE operations in the same order


@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_paged_state_and_cross_device_resume():
    if not paged_mod.managed_supported("cuda"):
        pytest.skip("this GPU/build has no managed memory")
    w = torch.nn.Parameter(torch.randn(200_000, device="cuda"))
    opt = qk.optim.PagedAdamW([w], lr=2e-4, weight_decay=0.0)
    w.grad = torch.randn_like(w)
    opt.step()
    assert paged_mod.is_paged(opt.state[w]["exp_avg"])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, map_location="cpu")
    w_cpu = torch.nn.Parameter(w.detach().cpu())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt_cpu = qk.optim.PagedAdamW([w_cpu], lr=2e-4, weight_decay=0.0)
    opt_cpu.load_state_dict(sd)
    assert opt_cpu.state[w_cpu]["exp_avg"].device.type == "cpu"
    opt_back = qk.optim.PagedAdamW([w], lr=2e-4, weight_decay=0.0)
    opt_back.load_state_dict(opt_cpu.state_dict())
    assert paged_mod.is_paged(opt_back.state[w]["exp_avg"])  # paged again, not plain memory
    assert torch.equal(opt_back.state[w]["exp_avg"].cpu(), opt.state[w]["exp_avg"].cpu())
    with pytest.raises(RuntimeError, match="refusing to allocate"):
        torch.ops.qlora_kernels.managed_empty([1 << 50], torch.float32, 0)


@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_paged_state_is_refused_beyond_free_gpu_memory():
    if not paged_mod.managed_supported("cuda"):
        pytest.skip("this GPU/build has no managed memory with concurrent access")
    free, _ = torch.cuda.mem_get_info(0)
    # more than the GPU has free, far less than free GPU + host memory: refused before any
    # cudaMallocManaged, never oversubscribed
    with pytest.raises(RuntimeError, match="never allowed to oversubscribe"):
        torch.ops.qlora_kernels.managed_empty([free // 4 + (1 << 26)], torch.float32, 0)
    t = torch.ops.qlora_kernels.managed_empty([1 << 20], torch.float32, 0)  # still works
    assert paged_mod.is_paged(t.zero_())


@gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_managed_state_freed_while_another_device_is_current():
    if not paged_mod.managed_supported("cuda:1"):
        pytest.skip("cuda:1 has no managed memory with concurrent access")
    with torch.cuda.device(1):
        t = torch.ops.qlora_kernels.managed_empty([1 << 20], torch.float32, 1).zero_()
    torch.cuda.synchronize(1)
    with torch.cuda.device(0):
        del t  # the deleter frees on cuda:1 and leaves cuda:0 current
        assert torch.cuda.current_device() == 0
        torch.cuda.synchronize(0)
