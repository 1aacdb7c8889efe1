"""The training loop's handling of non-finite steps: skipped (nothing changes), counted,
and ``max_bad_steps`` in a row stop the run with a save."""
import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.train.loop import LoopConfig, lr_at, train


def _tiny_prepared():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2))
    qk.prepare_model(model, r=4, lora_alpha=8, compute_dtype=torch.float32, verbose=False)
    return model


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_non_finite_steps_are_skipped_then_stop_the_run():
    model = _tiny_prepared()
    poison = {"on": False}
    model.model.norm.register_forward_hook(lambda m, i, out: out * float("nan") if poison["on"] else out)
    data = [([1, 2, 3, 4, 5, 6], [-100, 2, 3, 4, 5, 6])] * 4
    seen, rows, after = [], [], {}

    def log(row):
        rows.append(row)
        if row["step"] == 1:
            after[1] = _lora(model)
            poison["on"] = True  # steps 2 and 3 get NaN

    def save(step, opt, state):
        seen.append((step, state["bad_in_row"]))
        after["saved"] = _lora(model)

    res = train(model, data, 0, LoopConfig(steps=10, lr=1e-2, batch_size=2, warmup=1,
                                           save_every=100, max_bad_steps=2), on_save=save, on_log=log)
    assert res["stopped"] and "2 steps in a row" in res["stopped"] and res["steps_done"] == 3
    assert res["bad_steps"] == 2 and seen == [(3, 2)]
    assert [r["skipped"] for r in rows] == [False, True, True]
    assert all(torch.equal(after[1][k], after["saved"][k]) for k in after[1])  # nothing applied


def test_one_bad_step_is_skipped_and_training_goes_on():
    model = _tiny_prepared()
    poison = {"step": 0}

    def hook(m, i, out):
        return out * float("nan") if poison["step"] == 2 else out
    model.model.norm.register_forward_hook(hook)
    rows = []

    def log(row):
        rows.append(row)
        poison["step"] = row["step"] + 1
    poison["step"] = 1
    data = [([1, 2, 3, 4, 5, 6], [-100, 2, 3, 4, 5, 6])] * 4
    res = train(model, data, 0, LoopConfig(steps=4, lr=1e-2, batch_size=2, warmup=1, max_bad_steps=2),
                on_log=log)
    assert res["stopped"] is None and res["bad_steps"] == 1 and res["steps_done"] == 4
    assert [r["skipped"] for r in rows] == [False, True, False, False]


def test_lr_schedules():
    assert [lr_at(s, 10, 1.0, 2) for s in (1, 2)] == [0.5, 1.0]
    assert lr_at(10, 10, 1.0, 2) == pytest.approx(0.1) and lr_at(6, 10, 1.0, 2) == pytest.approx(0.55)
    assert lr_at(10, 10, 1.0, 2, "constant") == 1.0
    assert lr_at(10, 10, 1.0, 2, min_ratio=0.0) == pytest.approx(0.0)
