"""Exact resume (issue 18): a ``qlora-kernels train`` subprocess SIGKILLed after its first
checkpoint and resumed with ``--resume`` gives the same per-step losses, eval losses and
final adapter bytes as an uninterrupted run, in float32 and bf16 compute (with LoRA
dropout on, so the RNG state matters)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from qlora_kernels.train.command import read_log
from train_tiny import CHAT, require_packages, save_tiny_model, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(model, data, out, dtype, *extra):
    return [sys.executable, "-m", "qlora_kernels", "train", "--model", model, "--data", data,
            "--out", str(out), "--max-steps", "6", "--save-every", "2", "--eval-every", "3",
            "--max-seq-len", "48", "--batch-size", "2", "--lr", "5e-3", "--lora-dropout", "0.1",
            "--compute-dtype", dtype, "--device", "cpu", *extra]


def _popen(cmd):
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, dtype):
    require_packages()
    model = save_tiny_model(tmp_path / "model")
    data = f"{write_jsonl(tmp_path / 'train.jsonl', CHAT)},{write_jsonl(tmp_path / 'eval.jsonl', CHAT[::4])}"
    full, cut = tmp_path / "full", tmp_path / "cut"
    uninterrupted = _popen(_cmd(model, data, full, dtype))
    killed = _popen(_cmd(model, data, cut, dtype))
    deadline = time.time() + 300
    while not (cut / "checkpoint-2" / "state.json").exists():
        assert killed.poll() is None, killed.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (cut / "adapter").exists(), "the run finished before the kill: nothing tested"
    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.stderr.read().decode()
    resumed = _popen(_cmd(model, data, cut, dtype, "--resume"))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()

    a, b = read_log(full / "log.jsonl"), read_log(cut / "log.jsonl")
    assert [r["step"] for r in a if "loss" in r] == list(range(1, 7))
    assert [(r["step"], r.get("loss"), r.get("eval_loss")) for r in a] == \
        [(r["step"], r.get("loss"), r.get("eval_loss")) for r in b]
    assert ((full / "adapter" / "adapter_model.safetensors").read_bytes()
            == (cut / "adapter" / "adapter_model.safetensors").read_bytes())
    assert ((full / "checkpoint-6" / "optimizer.pt").stat().st_size
            == (cut / "checkpoint-6" / "optimizer.pt").stat().st_size)
