"""8-bit optimizer reliability (issue 20, item 9): a NaN gradient stays in its element, a
failing step changes nothing, state dicts load only into the optimizer they fit."""
import pytest
import torch

import qlora_kernels as qk

pytestmark = pytest.mark.usefixtures("single_thread")
BACKENDS = ["torch"] + (["cpu"] if qk.EXTENSION_LOADED else [])
N = 5000  # above min_8bit_size (4096); 20 blocks of 256, the last one partial


def _opt8(params, backend):
    return qk.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.01, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_gradient_stays_in_its_element(rng, backend, bad):
    init = torch.randn(N, generator=rng)
    grads = [torch.randn(N, generator=rng) for _ in range(3)]
    hit = 300  # inside block 1
    w_bad, w_ref = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    o_bad, o_ref = _opt8([w_bad], backend), _opt8([w_ref], backend)
    for i, g in enumerate(grads):
        gb, gr = g.clone(), g.clone()
        if i == 0:
            gb[hit] = bad
            gr[hit] = 0.0  # the twin sees a zero there: the same block absmax
        w_bad.grad, w_ref.grad = gb, gr
        o_bad.step()
        o_ref.step()
    others = torch.ones(N, dtype=torch.bool)
    others[hit] = False
    assert torch.isnan(w_bad[hit])  # as torch's AdamW: the element itself is lost
    assert torch.equal(w_bad.detach()[others], w_ref.detach()[others])
    for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
        assert torch.isfinite(o_bad.state[w_bad][key]).all()


def test_nan_gradient_matches_torch_adamw_outside_the_element(rng):
    init = torch.randn(N, generator=rng)
    g = torch.randn(N, generator=rng)
    g[17] = float("nan")
    w8, wt = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    o8 = _opt8([w8], None)
    ot = torch.optim.AdamW([wt], lr=1e-2, weight_decay=0.01)
    w8.grad, wt.grad = g.clone(), g.clone()
    o8.step()
    ot.step()
    assert torch.isnan(w8[17]) and torch.isnan(wt[17])
    assert torch.isfinite(w8.detach()[18:]).all() and torch.isfinite(w8.detach()[:17]).all()
    # the first step's update is sign(g) * lr for both: 8-bit moments change nothing yet
    torch.testing.assert_close(w8.detach()[18:], wt.detach()[18:], rtol=0, atol=1e-4)


def _state_copy(opt):
    return {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}


@pytest.mark.parametrize("backend", BACKENDS + [None])
@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("warm", [False, True])
def test_failing_step_on_the_second_param_changes_nothing(rng, backend, bits, warm):
    a = torch.nn.Parameter(torch.randn(N, generator=rng))
    b = torch.nn.Parameter(torch.randn(N, generator=rng))
    opt = qk.optim.AdamW([a, b], lr=1e-2, optim_bits=bits, backend=backend)
    if warm:
        a.grad, b.grad = torch.randn(N, generator=rng), torch.randn(N, generator=rng)
        opt.step()
    saved_params = [a.detach().clone(), b.detach().clone()]
    saved_state = _state_copy(opt)
    a.grad = torch.randn(N, generator=rng)
    b.grad_dtype = None  # let torch accept a gradient of another dtype ...
    b.grad = torch.randn(N, generator=rng).half()  # ... which the op refuses
    with pytest.raises((ValueError, RuntimeError), match="grad dtype"):
        opt.step()
    assert torch.equal(a.detach(), saved_params[0]) and torch.equal(b.detach(), saved_params[1])
    now = _state_copy(opt)
    assert now.keys() == saved_state.keys()
    for pid, st in saved_state.items():
        assert st.keys() == now[pid].keys()
        assert all(torch.equal(st[k], now[pid][k]) for k in st)  # step counters included


def test_failing_step_in_a_later_group_changes_nothing(rng):
    a = torch.nn.Parameter(torch.randn(300, generator=rng))
    b = torch.nn.Parameter(torch.randn(300, generator=rng))
    opt = qk.optim.AdamW([{"params": [a]}, {"params": [b], "lr": 1e-3}])
    a.grad, b.grad = torch.randn(300, generator=rng), torch.randn(300, generator=rng)
    opt.param_groups[1]["lr"] = -1.0
    before = a.detach().clone()
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()
    assert torch.equal(a.detach(), before) and not opt.state[a]


def _trained(cls, rng, **kw):
    w = torch.nn.Parameter(torch.randn(N, generator=rng))
    opt = cls([w], **kw)
    w.grad = torch.randn(N, generator=rng)
    opt.step()
    return w, opt


def test_32bit_and_8bit_state_dicts_refuse_to_cross_load(rng):
    w8, o8 = _trained(qk.optim.AdamW8bit, rng)
    w32, o32 = _trained(qk.optim.AdamW, rng)
    with pytest.raises(ValueError, match="is 8-bit, this optimizer keeps 32-bit"):
        qk.optim.AdamW([w8]).load_state_dict(o8.state_dict())
    with pytest.raises(ValueError, match="is 32-bit, this optimizer keeps 8-bit"):
        qk.optim.AdamW8bit([w32]).load_state_dict(o32.state_dict())
    torch_opt = torch.optim.AdamW([w32])
    w32.grad = torch.randn(N, generator=rng)
    torch_opt.step()
    with pytest.raises(ValueError, match="is 32-bit"):
        qk.optim.AdamW8bit([w32]).load_state_dict(torch_opt.state_dict())
    qk.optim.AdamW([w32]).load_state_dict(torch_opt.state_dict())  # the matching one loads


@pytest.mark.parametrize("key, value, ok", [
    ("exp_avg_q", 300, False), ("exp_avg_q", -1, False), ("exp_avg_q", 2.5, False),
    ("exp_avg_q", 200, True), ("exp_avg_absmax", -1.0, False),
    ("exp_avg_sq_absmax", float("nan"), False), ("step", 1.5, False), ("step", -3.0, False)])
def test_out_of_range_state_values_are_rejected(rng, key, value, ok):
    w, opt = _trained(qk.optim.AdamW8bit, rng)
    sd = opt.state_dict()
    st = sd["state"][0]
    if key == "step":
        st[key] = torch.tensor(value)
    else:
        t = st[key].to(torch.float64 if isinstance(value, float) else torch.int64)
        t[5] = value
        st[key] = t
    fresh = qk.optim.AdamW8bit([w])
    if ok:
        fresh.load_state_dict(sd)
        assert int(fresh.state[w][key][5]) == value
    else:
        with pytest.raises(ValueError, match=key if key != "step" else "step"):
            fresh.load_state_dict(sd)


def test_failing_load_state_dict_changes_nothing(rng):
    a = torch.nn.Parameter(torch.randn(N, generator=rng))
    b = torch.nn.Parameter(torch.randn(N, generator=rng))
    opt = qk.optim.AdamW8bit([a, b], lr=1e-2)
    a.grad, b.grad = torch.randn(N, generator=rng), torch.randn(N, generator=rng)
    opt.step()
    sd = opt.state_dict()
    sd["state"][1]["exp_avg_q"] = sd["state"][1]["exp_avg_q"].to(torch.int64) + 300
    sd["param_groups"][0]["lr"] = 0.5
    saved = _state_copy(opt)
    with pytest.raises(ValueError, match="exp_avg_q"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 1e-2
    now = _state_copy(opt)
    assert all(torch.equal(saved[pid][k], now[pid][k]) for pid in saved for k in saved[pid])
