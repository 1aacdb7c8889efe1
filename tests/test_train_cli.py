"""``qlora-kernels train`` / ``merge`` / ``generate`` end to end on a tiny random Llama with
the demo model's tokenizer, and every bad input of issue 18 (exit 2, one line, no
traceback, before the model loads)."""
import io
import json
import os
import shutil

import pytest
import torch

import qlora_kernels as qk
import qlora_kernels.train.base as train_base
from qlora_kernels.__main__ import main as cli_main
from qlora_kernels.prepare import lora_layers
from qlora_kernels.train.command import read_log
from train_tiny import CHAT, modes_other_than_usual, require_packages, save_tiny_model, write_jsonl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    require_packages()
    d = tmp_path_factory.mktemp("tiny")
    model = save_tiny_model(d / "model")
    train = write_jsonl(d / "train.jsonl", CHAT)
    evalf = write_jsonl(d / "eval.jsonl", CHAT[::5])
    return {"dir": d, "model": model, "train": train, "eval": evalf}


def _train_argv(tiny, out, *extra):
    return ["train", "--model", tiny["model"], "--data", f"{tiny['train']},{tiny['eval']}",
            "--out", str(out), "--max-seq-len", "48", "--batch-size", "2", "--lr", "5e-3",
            "--compute-dtype", "float32", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def run(tiny):
    out = tiny["dir"] / "run"
    assert cli_main(_train_argv(tiny, out, "--max-steps", "6", "--save-every", "2",
                                "--eval-every", "3", "--keep", "2")) == 0
    return out


def test_run_outputs(run):
    assert sorted(os.listdir(run)) == ["adapter", "checkpoint-4", "checkpoint-6", "log.jsonl", "loss.png"]
    assert sorted(os.listdir(run / "checkpoint-6")) == ["adapter", "args.json", "optimizer.pt",
                                                        "rng.pt", "state.json"]
    rows = read_log(run / "log.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem"} <= set(r)
        assert r["grad_norm"] > 0 and r["tokens"] > 0
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 3, 6]
    assert all(r["eval_ppl"] == pytest.approx(2.718281828 ** r["eval_loss"]) for r in rows if "eval_loss" in r)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    state = json.loads((run / "checkpoint-6" / "state.json").read_text())
    assert state["step"] == 6 and state["data"]["units"] == len(CHAT)
    assert state["data"]["position_in_epoch"] == (6 * 2) % len(CHAT)
    # the final adapter holds the last checkpoint's weights
    from safetensors.torch import load_file
    final = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    last = load_file(str(run / "checkpoint-6" / "adapter" / "adapter_model.safetensors"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)



def test_every_written_file_has_the_usual_permissions(tiny, tmp_path):
    """Under umask 022, a train run (checkpoints, adapter, log.jsonl, loss.png), its resume
    (which rewrites log.jsonl) and both merges write 0644 files and 0755 directories, not
    the 0600 / 0700 that mkstemp / mkdtemp give."""
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert cli_main(_train_argv(tiny, out, "--max-steps", "2", "--save-every", "1")) == 0
        shutil.rmtree(out / "checkpoint-2")
        assert cli_main(_train_argv(tiny, out, "--max-steps", "2", "--save-every", "1",
                                    "--resume")) == 0
        for name, extra in (("merged", []), ("merged_q", ["--quantized"])):
            assert cli_main(["merge", "--model", tiny["model"], "--adapter", str(out / "adapter"),
                             "--out", str(tmp_path / name), *extra]) == 0
    finally:
        os.umask(old)
    assert {"adapter", "checkpoint-1", "checkpoint-2", "log.jsonl", "loss.png"} <= set(os.listdir(out))
    for root in (out, tmp_path / "merged", tmp_path / "merged_q"):
        assert modes_other_than_usual(root, 0o022) == [], root


def test_train_with_the_demos_options_repeats_the_demo(tiny, tmp_path):
    """``demo`` and ``train`` share the loop, the base model's loading and the seeding: with
    the demo's preset as options, train gives the demo's per-step losses, held-out losses
    and adapter bytes exactly."""
    from qlora_kernels.demo import PRESET, add_arguments, run_demo

    p = __import__("argparse").ArgumentParser()
    add_arguments(p)
    data = f"{tiny['train']},{tiny['eval']}"
    common = ["--batch-size", "2", "--lr", "5e-3", "--compute-dtype", "bfloat16", "--device", "cpu",
              "--save-every", "2"]
    demo = run_demo(p.parse_args(["--model", tiny["model"], "--data", data, "--out",
                                  str(tmp_path / "demo"), "--steps", "4", "--skip-perplexity",
                                  *common]), log=lambda *a: None)["train"]
    assert cli_main(["train", "--model", tiny["model"], "--data", data, "--out",
                     str(tmp_path / "train"), "--max-steps", "4",
                     "--warmup-steps", str(PRESET["warmup"]),
                     "--max-grad-norm", str(PRESET["max_grad_norm"]),
                     "--max-seq-len", str(PRESET["max_seq_len"]), *common]) == 0
    rows = read_log(tmp_path / "train" / "log.jsonl")
    assert [r["loss"] for r in rows if "loss" in r] == demo["losses"]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert evals == [demo["heldout_loss_before"], demo["heldout_loss_after"]]
    assert evals[1] < evals[0]
    weights = "adapter/adapter_model.safetensors"
    assert (tmp_path / "train" / weights).read_bytes() == (tmp_path / "demo" / weights).read_bytes()

def test_packing_text_format_and_fallback_template(tiny, tmp_path, capsys):
    """Text data packed, then chat data on a tokenizer without a chat template: one
    warning naming the fallback, and training runs."""
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"Number {i} is {'even' if i % 2 == 0 else 'odd'}."}
                                                 for i in range(30)])
    assert cli_main(["train", "--model", tiny["model"], "--data", text, "--out", str(tmp_path / "t"),
                     "--max-seq-len", "32", "--packing", "--batch-size", "2", "--max-steps", "2",
                     "--compute-dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "30 text records" in out and "packing: 30 examples into" in out
    bare = save_tiny_model(tmp_path / "bare", chat_template=False)
    with pytest.warns(UserWarning, match="no chat template") as caught:
        assert cli_main(_train_argv({**tiny, "model": bare}, tmp_path / "c", "--max-steps", "2")) == 0
    assert len([w for w in caught if "chat template" in str(w.message)]) == 1


def test_merge_equals_the_adapted_4bit_model(tiny, run, tmp_path):
    from transformers import AutoModelForCausalLM

    from qlora_kernels.train.merge import adapted_model

    out = tmp_path / "merged"
    assert cli_main(["merge", "--model", tiny["model"], "--adapter", str(run / "adapter"),
                     "--out", str(out), "--dtype", "float32"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    dense = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    adapted, _ = adapted_model(tiny["model"], str(run / "adapter"))
    assert any(float(m.lora_B.weight.detach().abs().max()) > 0 for m in lora_layers(adapted).values())
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = adapted(input_ids=ids, use_cache=False).logits
        got = dense(input_ids=ids, use_cache=False).logits
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel <= 1e-5, rel


def test_merge_quantized_reports_its_error(tiny, run, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli_main(["merge", "--model", tiny["model"], "--adapter", str(run / "adapter"),
                     "--out", str(out), "--quantized"]) == 0
    msg = capsys.readouterr().out
    err = float(msg.split("largest relative weight error ")[1].split(";")[0])
    assert 0.0 < err < 0.2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    reloaded = qk.from_pretrained(str(out), compute_dtype=torch.float32, progress=False)
    assert sum(isinstance(m, qk.nn.Linear4bit) for m in reloaded.modules()) == 14


def test_generate_is_greedy_and_deterministic(tiny, run):
    import argparse

    from qlora_kernels.train.generate import add_generate_arguments, run_generate
    from qlora_kernels.train.merge import adapted_model

    p = argparse.ArgumentParser()
    add_generate_arguments(p)
    args = p.parse_args(["--model", tiny["model"], "--adapter", str(run / "adapter"),
                         "--prompt", "What is 2 plus 1?", "--max-new-tokens", "6"])
    streamed = io.StringIO()
    first = run_generate(args, out=streamed)
    assert run_generate(args, out=io.StringIO()) == first
    assert streamed.getvalue().strip() == first[0]
    # the same tokens by hand: argmax, one token at a time, from the chat-formatted prompt
    model, tok = adapted_model(tiny["model"], str(run / "adapter"))
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 1?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert first[0] == tok.decode(new, skip_special_tokens=True).strip()


def test_generate_interactive_reads_one_prompt_per_line(tiny, run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 plus 1?\n\nWhat is 3 plus 3?\n"))
    assert cli_main(["generate", "--model", tiny["model"], "--adapter", str(run / "adapter"),
                     "--interactive", "--max-new-tokens", "3"]) == 0
    from qlora_kernels.train.generate import add_generate_arguments, run_generate
    import argparse
    p = argparse.ArgumentParser()
    add_generate_arguments(p)
    one = run_generate(p.parse_args(["--model", tiny["model"], "--adapter", str(run / "adapter"),
                                     "--prompt", "What is 3 plus 3?", "--max-new-tokens", "3"]),
                       out=io.StringIO())
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].strip() == one[0]


def test_generate_and_merge_bad_input_exit_2(tiny, capsys, tmp_path):
    _one_line_error(capsys, ["generate", "--model", tiny["model"], "--prompt", "x",
                             "--max-new-tokens", "0"], "--max-new-tokens must be >= 1")
    _one_line_error(capsys, ["generate", "--model", tiny["model"], "--prompt", "x",
                             "--adapter", str(tmp_path / "none")], "not a directory")
    _one_line_error(capsys, ["merge", "--model", tiny["model"], "--adapter", str(tmp_path),
                             "--out", str(tmp_path / "m")], "adapter_config.json")


# ------------------------------------------------------------------ bad input
@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(train_base, "load_base", refuse)


def _one_line_error(capsys, argv, match):
    rc = cli_main(argv)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert rc == 2, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert match in err[0], err
    return err[0]


@pytest.mark.parametrize("extra, match", [
    (["--save-every", "0"], "--save-every must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--batch-size", "-3"], "--batch-size must be >= 1, got -3"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--epochs", "0"], "--epochs must be a finite number > 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
    (["--max-seq-len", "1"], "--max-seq-len must be >= 2"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    (["--target-modules", "q_proj,no_such_proj"], "no module named 'no_such_proj'"),
    (["--resume"], "--resume: no complete checkpoint-STEP directory"),
    (["--layers", "3"], "--layers must be between 1 and 2"),
])
def test_bad_option_exits_2_before_loading(tiny, capsys, no_model_load, tmp_path, extra, match):
    _one_line_error(capsys, _train_argv(tiny, tmp_path / "o", *extra), match)


def test_out_naming_a_file_exits_2(tiny, capsys, no_model_load, tmp_path):
    (tmp_path / "f").write_text("x")
    _one_line_error(capsys, _train_argv(tiny, tmp_path / "f"), "exists and is not a directory")


@pytest.mark.parametrize("content, match", [
    (b"", "no examples (empty data set)"),
    (b"\n  \n", "no examples (empty data set)"),
    (b'{"text": "a"}\n{"text": "b"}\n{"text": \n', "line 3: not valid JSON"),
    (b'{"text": "a"}\n{"text": "\xff\xfe"}\n', "line 2: not UTF-8 text"),
    (b'{"text": "a"}\n{"txt": "b"}\n', "line 2: expected an object with"),
    (b'{"text": 3}\n', "line 1: \"text\" must be a string"),
    (b'{"messages": [{"role": "user", "content": "q"}]}\n', "line 1: the last message must be the assistant"),
    (b'{"messages": [{"role": "bot", "content": "q"}]}\n', "line 1: messages[0] must be"),
])
def test_bad_data_names_file_and_line(tiny, capsys, no_model_load, tmp_path, content, match):
    f = tmp_path / "data.jsonl"
    f.write_bytes(content)
    err = _one_line_error(capsys, ["train", "--model", tiny["model"], "--data", str(f),
                                   "--out", str(tmp_path / "o")], match)
    assert str(f) in err


def test_bad_eval_file_is_named_too(tiny, capsys, no_model_load, tmp_path):
    f = tmp_path / "eval.jsonl"
    f.write_bytes(b'{"prompt": "a", "completion": "b"}\n' * 2 + b"{oops\n")
    _one_line_error(capsys, ["train", "--model", tiny["model"], "--data", f"{tiny['train']},{f}",
                             "--out", str(tmp_path / "o")], f"{f}, line 3: not valid JSON")


def test_resume_refuses_other_settings_or_model(tiny, run, capsys, no_model_load, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(run, out)
    _one_line_error(capsys, _train_argv(tiny, out, "--max-steps", "6", "--resume", "--lr", "1e-3"),
                    "written with a different --lr (0.005, now 0.001)")
    _one_line_error(capsys, _train_argv(tiny, out, "--max-steps", "6", "--resume", "--r", "8"),
                    "written with a different --r")
    other = save_tiny_model(tmp_path / "other", seed=1)
    capsys.readouterr()
    _one_line_error(capsys, _train_argv({**tiny, "model": other}, out, "--max-steps", "6", "--resume"),
                    "written with a different model")
    # without --resume, a directory holding checkpoints is not silently reused
    _one_line_error(capsys, _train_argv(tiny, out, "--max-steps", "6"), "pass --resume to continue it")
