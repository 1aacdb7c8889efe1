"""Command-line options checked before any expensive work (issue 20, items 7 and 8): a user
error exits with code 2 and one line on stderr, never a traceback, and the model is never
loaded for it."""
import json

import pytest

import qlora_kernels as qk
import qlora_kernels.demo as demo
from qlora_kernels.__main__ import main as cli_main
from qlora_kernels.demo.model import check_model_path, is_gguf

GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "ANSWER: hello"}]})


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(demo, "load_model", refuse)


def _one_line_error(capsys, argv, match):
    rc = cli_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert match in err[0], err
    return err[0]


@pytest.mark.parametrize("args, match", [
    (["--save-every", "0"], "--save-every must be >= 1"),
    (["--seq-len", "0"], "--seq-len must be >= 2"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--layers", "0"], "--layers must be >= 1"),
    (["--r", "0"], "--r must be >= 1"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lora-dropout", "1"], "--lora-dropout"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    (["--data", "a.jsonl,b.jsonl,c.jsonl"], "got 3 comma-separated names"),
])
def test_bad_demo_option_exits_2_before_loading(capsys, no_model_load, tmp_path, args, match):
    _one_line_error(capsys, ["demo", "--out", str(tmp_path / "o")] + args, match)


def test_out_naming_a_file_exits_2(capsys, no_model_load, tmp_path):
    (tmp_path / "f").write_text("x")
    _one_line_error(capsys, ["demo", "--out", str(tmp_path / "f")], "not a directory")
    _one_line_error(capsys, ["demo", "--out", str(tmp_path / "f" / "sub")], "not a directory")


@pytest.mark.parametrize("content, match", [
    (None, "no config.json"), ("{junk", "config.json is not valid JSON"),
    ("[1, 2]", "model_type"), ('{"model_type": "llama"}', "no weight files")])
def test_bad_model_directory_exits_2(capsys, no_model_load, tmp_path, content, match):
    d = tmp_path / "model"
    d.mkdir()
    if content is not None:
        (d / "config.json").write_text(content)
    _one_line_error(capsys, ["demo", "--out", str(tmp_path / "o"), "--model", str(d)], match)


def test_gguf_extension_in_any_case(tmp_path):
    assert is_gguf("a/M.GGUF") and is_gguf("m.Gguf") and not is_gguf("gguf")
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        check_model_path(str(tmp_path / "Model.GGUF"))
    (tmp_path / "Model.GGUF").write_bytes(b"GGUF")
    check_model_path(str(tmp_path / "Model.GGUF"))  # recognised as a GGUF file


def test_undecodable_data_names_file_and_line(capsys, no_model_load, tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_bytes((GOOD + "\n").encode() * 3 + b'{"messages": "\xff\xfe"}\n')
    err = _one_line_error(capsys, ["demo", "--out", str(tmp_path / "o"), "--data", str(f)],
                          "line 4")
    assert str(f) in err and "UTF-8" in err


def test_too_few_examples_for_a_held_out_split_exits_2(capsys, no_model_load, tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text((GOOD + "\n") * 5)
    _one_line_error(capsys, ["demo", "--out", str(tmp_path / "o"), "--data", str(f)],
                    "no held-out")


# ------------------------------------------------------------------ memory
@pytest.mark.parametrize("args, match", [
    (["--params", "-1"], "params must be a finite number > 0"),
    (["--params", "0"], "params must be a finite number > 0"),
    (["--params", "nan"], "params must be a finite number > 0"),
    (["--params", "inf"], "params must be a finite number > 0"),
    (["--r", "-4"], "r must be an integer >= 1"),
    (["--world-size", "0"], "world_size must be an integer >= 1"),
])
def test_memory_rejects_nonsense(capsys, args, match):
    _one_line_error(capsys, ["memory"] + args, match)


def test_memory_scales_the_shapes_to_a_small_model(capsys):
    assert cli_main(["memory", "--params", "135e6", "7e9"]) == 0
    rows = capsys.readouterr().out.splitlines()
    small, big = rows[1].split(), rows[2].split()
    assert small[0] == "135M" and big[0] == "7B"
    lora_small = qk.memory.lora_param_count(135e6)
    assert lora_small < 0.2 * 135e6  # r=64 on every linear of a 135M model, not 7B's 160M
    assert small[4] == f"{lora_small / 1e6:.3g}M"
    assert qk.memory.lora_param_count(7e9) == pytest.approx(160e6, rel=0.01)
    with pytest.raises(ValueError):
        qk.estimate_memory(1e9, world_size=0)
