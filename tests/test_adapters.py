"""save_adapter as one transaction, load_adapter all-or-nothing (issue 20, items 1 and 2).

The fault-injection test forks a child that saves two adapter versions in turn, SIGKILLs
it at random moments, and checks that every directory left behind holds one complete
version (never version A's config beside version B's weights).
"""
import json
import os
import random
import signal
import time

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.adapters import CONFIG_NAME, PAIRING_KEY, WEIGHTS_NAME, recover_adapter_dir

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32))


def _version(alpha: float, fill: float):
    """A prepared MLP whose adapters are all ``fill`` (so a file tells its version)."""
    m = qk.prepare_model(_mlp(), r=4, lora_alpha=alpha, verbose=False)
    with torch.no_grad():
        for layer in qk.adapters.lora_layers(m).values():
            layer.lora_A.weight.fill_(fill)
            layer.lora_B.weight.fill_(fill)
    return m


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _read_version(path):
    """(alpha from the config, the fill of the weights) of a saved adapter directory."""
    from safetensors.torch import load_file
    with open(os.path.join(path, CONFIG_NAME)) as f:
        alpha = json.load(f)["lora_alpha"]
    fills = {float(t.flatten()[0]) for t in load_file(os.path.join(path, WEIGHTS_NAME)).values()}
    assert len(fills) == 1, fills
    return alpha, fills.pop()


def test_save_replaces_both_files_and_keeps_other_files(tmp_path):
    d = str(tmp_path / "adapter")
    qk.save_adapter(_version(16, 0.25), d)
    with open(os.path.join(d, "README.md"), "w") as f:
        f.write("notes")
    open(os.path.join(d, ".tmp-stray"), "w").close()  # an older scheme's leftover
    qk.save_adapter(_version(32, 0.5), d)
    assert _read_version(d) == (32, 0.5)
    assert sorted(os.listdir(d)) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md"])
    assert open(os.path.join(d, "README.md")).read() == "notes"
    assert os.listdir(tmp_path) == ["adapter"]  # no temporary sibling left


def test_save_refuses_a_file_or_a_directory_with_subdirectories(tmp_path):
    m = _version(16, 0.25)
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        qk.save_adapter(m, str(tmp_path / "f"))
    (tmp_path / "d" / "sub").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match="sub"):
        qk.save_adapter(m, str(tmp_path / "d"))
    assert sorted(os.listdir(tmp_path)) == ["d", "f"]


def test_reader_recovers_a_kill_between_the_two_renames(tmp_path):
    d = tmp_path / "adapter"
    qk.save_adapter(_version(16, 0.25), str(d))
    os.rename(d, tmp_path / ".adapter.old-x1")  # killed after the first rename
    (tmp_path / ".adapter.tmp-x2").mkdir()       # the half-switched new version
    m = qk.prepare_model(_mlp(), r=4, lora_alpha=8, verbose=False)
    qk.load_adapter(m, str(d))
    assert _read_version(str(d)) == (16, 0.25)
    assert os.listdir(tmp_path) == ["adapter"]


def test_stray_temporaries_are_removed_by_the_next_save(tmp_path):
    d = tmp_path / "adapter"
    for name in (".adapter.tmp-a", ".adapter.tmp-b", ".adapter.old-c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / WEIGHTS_NAME).write_bytes(b"partial")
    (tmp_path / ".other.tmp-z").mkdir()  # another directory's: not ours to delete
    qk.save_adapter(_version(16, 0.25), str(d))
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-z", "adapter"]


def test_load_refuses_a_mixed_pair(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    qk.save_adapter(_version(16, 0.25), str(a))
    qk.save_adapter(_version(32, 0.5), str(b))
    os.replace(b / CONFIG_NAME, a / CONFIG_NAME)  # new config beside the old weights
    m = qk.prepare_model(_mlp(), r=4, lora_alpha=8, verbose=False)
    before = _snapshot(m)
    with pytest.raises(ValueError, match="different saves"):
        qk.load_adapter(m, str(a))
    assert _same(before, _snapshot(m))


def test_weights_record_the_config_they_belong_to(tmp_path):
    # (PEFT loading the layout: tests/test_prepare.py::test_peft_interop_both_ways)
    from safetensors import safe_open
    qk.save_adapter(_version(16, 0.25), str(tmp_path / "a"))
    with safe_open(str(tmp_path / "a" / WEIGHTS_NAME), "pt") as f:
        paired = json.loads(f.metadata()[PAIRING_KEY])
    assert paired["lora_alpha"] == 16 and paired["r"] == 4


def _saver(path: str) -> None:
    """Child process: save versions A and B in turn until killed."""
    versions = [_version(16, 0.25), _version(32, 0.5)]
    i = 0
    while True:
        qk.save_adapter(versions[i % 2], path)
        i += 1


def test_sigkill_during_repeated_saves_never_leaves_a_mixed_adapter(tmp_path):
    d = str(tmp_path / "adapter")
    qk.save_adapter(_version(16, 0.25), d)
    kills, seen, mixed, missing = 0, {}, 0, 0
    rng = random.Random(0)
    versions = {(16, 0.25): "A", (32, 0.5): "B"}
    while kills < 25:
        pid = os.fork()
        if pid == 0:  # child
            try:
                _saver(d)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.02, 0.25))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
        if not os.path.isdir(d):
            missing += 1  # killed between the renames: the reader puts the old one back
        recover_adapter_dir(d)
        try:
            v = versions.get(_read_version(d))
        except AssertionError:
            v = None
        if v is None:
            mixed += 1
        else:
            seen[v] = seen.get(v, 0) + 1
        m = qk.prepare_model(_mlp(), r=4, lora_alpha=8, verbose=False)
        qk.load_adapter(m, d)  # the pair agrees, so it loads
    print(f"\nfault injection: {kills} kills, versions seen {seen}, mixed {mixed}, "
          f"target missing before recovery {missing}")
    assert mixed == 0 and kills >= 20
    qk.save_adapter(_version(16, 0.25), d)
    assert os.listdir(tmp_path) == ["adapter"]  # every leftover removed by the next save


# ------------------------------------------------------------------ item 2: all or nothing
def _as_peft_file(d):
    """Rewrite the weights without our pairing metadata (as PEFT writes them)."""
    from safetensors.torch import load_file, save_file
    save_file(load_file(str(d / WEIGHTS_NAME)), str(d / WEIGHTS_NAME), metadata={"format": "pt"})


def test_failing_load_adapter_leaves_an_unprepared_model_unchanged(tmp_path):
    qk.save_adapter(_version(16, 0.25), str(tmp_path))
    _as_peft_file(tmp_path)
    with open(tmp_path / CONFIG_NAME) as f:
        cfg = json.load(f)
    cfg["r"] = 8  # the weights have rank 4: a shape mismatch found only after conversion
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    fresh = _mlp(seed=3)
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match="shape"):
        qk.load_adapter(fresh, str(tmp_path))
    assert not qk.adapters.lora_layers(fresh)
    assert all(type(m) in (torch.nn.Sequential, torch.nn.Linear, torch.nn.GELU)
               for m in fresh.modules())
    assert _same(before, _snapshot(fresh))


def test_load_adapter_rejects_nan_weights_before_writing(tmp_path):
    from safetensors.torch import load_file, save_file
    m = _version(16, 0.25)
    qk.save_adapter(m, str(tmp_path))
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    key = sorted(tensors)[-1]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))  # no pairing metadata: a PEFT-like file
    target = _version(8, 0.125)
    before = _snapshot(target)
    with pytest.raises(ValueError, match="NaN"):
        qk.load_adapter(target, str(tmp_path))
    assert _same(before, _snapshot(target))


# ------------------------------------------------------------------ fuzz
_CONFIG_EDITS = st.sampled_from([
    ("r", 0), ("r", -3), ("r", "4"), ("r", 2.5), ("r", None), ("lora_alpha", float("nan")),
    ("lora_alpha", "16"), ("target_modules", 5), ("target_modules", ["nope"]),
    ("rank_pattern", [1]), ("rank_pattern", {"0": 0}), ("alpha_pattern", {"0": "x"}),
    ("peft_type", "IA3"), ("use_dora", True)])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_load_adapter_rejects_corruption_and_leaves_the_model(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("fuzz")
    qk.save_adapter(_version(16, 0.25), str(d))
    kind = data.draw(st.sampled_from(["config", "config_bytes", "weights_bytes"]))
    if kind == "config":
        key, value = data.draw(_CONFIG_EDITS)
        cfg = json.loads((d / CONFIG_NAME).read_text())
        cfg[key] = value
        (d / CONFIG_NAME).write_text(json.dumps(cfg))
    else:
        f = d / (CONFIG_NAME if kind == "config_bytes" else WEIGHTS_NAME)
        raw = bytearray(f.read_bytes())
        pos = data.draw(st.integers(0, len(raw) - 1))
        cut = data.draw(st.booleans())
        if cut:
            raw = raw[:pos]
        else:
            raw[pos] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[pos]))
        f.write_bytes(bytes(raw))
    prepared = data.draw(st.booleans())
    model = _version(8, 0.125) if prepared else _mlp(seed=5)
    before = _snapshot(model)
    try:
        qk.load_adapter(model, str(d))
    except (ValueError, FileNotFoundError):
        assert _same(before, _snapshot(model))  # refused: untouched
        return
    # accepted (a byte flip in a float or a harmless field): finite adapters of the right shape
    for layer in qk.adapters.lora_layers(model).values():
        assert torch.isfinite(layer.lora_A.weight).all() and torch.isfinite(layer.lora_B.weight).all()


_SAVE_IN_CHILD = """
import sys, torch, qlora_kernels as qk
torch.manual_seed(1)
m = qk.prepare_model(torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.Linear(24, 8)),
                     r=3, lora_alpha=6, verbose=False)
with torch.no_grad():
    for layer in qk.adapters.lora_layers(m).values():
        layer.lora_B.weight.normal_()
for d in sys.argv[1:]:
    qk.save_adapter(m, d)
"""


def test_save_adapter_bytes_are_the_same_in_every_process(tmp_path):
    """Safetensors writes ``__metadata__`` from a Rust hash map whose order changes from map
    to map and process to process; save_adapter's files must not: three saves in each of two
    processes (different PYTHONHASHSEED) give identical bytes, with a sorted header."""
    import subprocess
    import sys

    dirs = []
    for seed in ("1", "2"):
        mine = [str(tmp_path / f"p{seed}-{i}") for i in range(3)]
        env = dict(os.environ, PYTHONHASHSEED=seed, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-c", _SAVE_IN_CHILD, *mine], check=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(qk.__file__)))
        dirs += mine
    blobs = {d: open(os.path.join(d, WEIGHTS_NAME), "rb").read() for d in dirs}
    configs = {d: open(os.path.join(d, CONFIG_NAME), "rb").read() for d in dirs}
    assert len(set(blobs.values())) == 1 and len(set(configs.values())) == 1
    blob = blobs[dirs[0]]
    n = int.from_bytes(blob[:8], "little")
    assert (8 + n) % 8 == 0
    header = json.loads(blob[8:8 + n])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"]) == ["format", PAIRING_KEY]
    # Still a valid safetensors file with the model's tensors, loadable back.
    from safetensors import safe_open
    with safe_open(os.path.join(dirs[0], WEIGHTS_NAME), framework="pt") as f:
        assert f.metadata()["format"] == "pt"
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
    assert shapes == {"base_model.model.0.lora_A.weight": (3, 40), "base_model.model.0.lora_B.weight": (24, 3),
                      "base_model.model.1.lora_A.weight": (3, 24), "base_model.model.1.lora_B.weight": (8, 3)}


def test_save_adapter_gives_the_usual_permissions(tmp_path):
    import stat

    old = os.umask(0o027)
    try:
        d = tmp_path / "adapter"
        qk.save_adapter(_version(16, 0.25), str(d))
        qk.save_adapter(_version(32, 0.5), str(d))  # the replacing save too
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o640, name
