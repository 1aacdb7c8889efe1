"""The per-machine GEMV/GEMM switch (qlora_kernels/gemv_calibration.py): the threshold rule,
the cache (written, read back, keyed by CPU and setting, bad files ignored with one warning
and rebuilt), when calibration runs, the precedence of the overrides, and what ``info`` and
``qlora-kernels calibrate`` show. Timings are injected, so every expected threshold is
known in advance and differs from the features rule (float32 8, bfloat16 16 or 64)."""
import io
import json
import os
import warnings

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import cpu_dispatch, gemv_calibration as gc, matmul as mm, system_info

needs_ext = pytest.mark.skipif(not qk.EXTENSION_LOADED,
                               reason="the calibration applies to the compiled CPU kernels")

# GEMV faster up to this many rows (fake timings), per dtype; none is a features-rule value.
WANT = {"float32": 32, "bfloat16": 4, "float16": 128}
REAL_TIME_PATHS = gc.time_paths


def fake_measure(calls=None, want=WANT):
    """``calibrate_gemv``'s timer: the GEMV takes ``rows`` s, the GEMM ``want + 0.5`` s."""
    def for_dtype(dtype):
        name = str(dtype).removeprefix("torch.")

        def measure(rows):
            if calls is not None:
                calls.append((name, rows))
            return float(rows), want[name] + 0.5
        return measure
    return for_dtype


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache dir, automatic calibration on (with fake timings), no overrides."""
    monkeypatch.setenv(gc.ENV_DIR, str(tmp_path))
    monkeypatch.setenv(gc.ENV_CALIBRATE, "1")
    monkeypatch.delenv("QLORA_KERNELS_GEMV_MAX_ROWS", raising=False)
    monkeypatch.setattr(mm, "GEMV_MAX_ROWS", {"cpu": None, "cuda": None})
    calls = []
    monkeypatch.setattr(gc, "time_paths", fake_measure(calls))
    monkeypatch.setattr(gc, "machine_busy", lambda: False)
    gc._forget()
    yield calls
    gc._forget()


def _setting_name():
    return f"{cpu_dispatch.cpu_isa()}/threads={torch.get_num_threads()}"


def _matmul(rows, dtype=torch.float32):
    packed, state = qk.quantize_4bit(torch.randn(24, 64), double_quant=True)
    return qk.matmul_4bit(torch.randn(rows, 64).to(dtype), packed, state)


@pytest.mark.parametrize("pattern,want,timed", [
    ("VVVVVVVV", 128, 8),   # GEMV always faster: every row count up to 128
    ("GG", 0, 2),           # GEMM from the first row: stop after two
    ("VVVGVGG", 16, 7),     # one GEMM win does not stop it; the later GEMV win counts
    ("VVVVGG", 8, 6),
])
def test_pick_threshold(pattern, want, timed):
    rows_timed = []

    def measure(rows):
        rows_timed.append(rows)
        return (1.0, 2.0) if pattern[len(rows_timed) - 1] == "V" else (2.0, 1.0)
    best, timings = gc.pick_threshold(measure)
    assert best == want
    assert rows_timed == [1, 2, 4, 8, 16, 32, 64, 128][:timed]
    assert [t[0] for t in timings] == rows_timed


@needs_ext
def test_cache_written_read_back_and_keyed(cache, tmp_path):
    entry = gc.calibrate_gemv()
    assert entry["gemv_max_rows"] == WANT
    path = tmp_path / "gemv_calibration.json"
    data = json.loads(path.read_text())
    assert data["schema"] == 1 and data["cpu"] == system_info.cpu_model()
    assert data["cpu_features"] == cpu_dispatch.cpu_features()
    assert data["torch"] == torch.__version__ and data["qlora_kernels"] == qk.__version__
    assert data["entries"][_setting_name()]["gemv_max_rows"] == WANT
    source = f"calibration cache {path}"
    assert mm.gemv_threshold("cpu", torch.float32) == (32, source)
    gc._forget()  # a new process: read from the file
    calls = len(cache)
    for name, rows in WANT.items():
        assert mm.gemv_threshold("cpu", getattr(torch, name), may_calibrate=True) == (rows, source)
    assert len(cache) == calls  # nothing measured again
    # another thread count is another setting: not calibrated yet, the features rule holds
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        assert mm.gemv_threshold("cpu", torch.float32) == (8, "features rule")
        gc.calibrate_gemv(fake_measure(want={"float32": 2, "bfloat16": 2, "float16": 2}))
        assert mm.gemv_max_rows("cpu", torch.float32) == 2
    finally:
        torch.set_num_threads(threads)
    data = json.loads(path.read_text())
    assert len(data["entries"]) == 2  # both settings kept in one file
    assert mm.gemv_max_rows("cpu", torch.float32) == 32


@needs_ext
def test_calibrates_once_on_the_first_ambiguous_cpu_matmul(cache, tmp_path):
    _matmul(1)  # one row is always the GEMV: nothing to decide
    assert cache == [] and not (tmp_path / "gemv_calibration.json").exists()
    _matmul(5)
    assert sorted({name for name, _ in cache}) == sorted(WANT)
    calls = len(cache)
    y = _matmul(6, torch.bfloat16)  # 6 > 4: the GEMM path; still correct
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert len(cache) == calls
    assert mm.gemv_threshold("cpu", torch.bfloat16)[0] == 4


@needs_ext
@pytest.mark.parametrize("why", ["env off", "backend override", "compiling", "override set",
                                 "busy machine"])
def test_no_automatic_calibration(cache, monkeypatch, why):
    if why == "busy machine":
        monkeypatch.setattr(gc, "machine_busy", lambda: True)
    elif why == "env off":
        monkeypatch.setenv(gc.ENV_CALIBRATE, "0")
    elif why == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    elif why == "override set":
        mm.set_gemv_max_rows(3, "cpu", torch.float32)
    if why == "backend override":
        with qk.use_backend("reference"):
            _matmul(5)
    else:
        _matmul(5)
    assert cache == []
    assert mm.gemv_threshold("cpu", torch.bfloat16)[1] == "features rule"


@needs_ext
def test_calibrate_gemv_refuses_a_backend_override(cache):
    with qk.use_backend("reference"), pytest.raises(RuntimeError, match="backend 'reference'"):
        gc.calibrate_gemv()


def _valid_file():
    gc.calibrate_gemv(fake_measure(want={"float32": 2, "bfloat16": 2, "float16": 2}))
    gc._forget()
    return json.loads(open(gc.cache_path()).read())


def _with(**fields):
    def make():
        data = _valid_file()
        data.update(fields)
        return json.dumps(data)
    return make


def _bad_value():
    data = _valid_file()
    data["entries"][_setting_name()]["gemv_max_rows"]["float32"] = 1000
    return json.dumps(data)


def _missing_dtype():
    data = _valid_file()
    del data["entries"][_setting_name()]["gemv_max_rows"]["float16"]
    return json.dumps(data)


BAD_FILES = {
    "not text": (lambda: b"\xff\xfe\x00garbage", "unreadable"),
    "not JSON": (lambda: "{\"schema\": 1, ", "not JSON"),
    "a list": (lambda: "[1, 2]", "schema 'list'"),
    "another schema": (_with(schema=99), "schema 99, expected 1"),
    "another CPU": (_with(cpu="Foreign CPU 9000"), "written for cpu 'Foreign CPU 9000'"),
    "another torch": (_with(torch="1.0.0"), "written for torch '1.0.0'"),
    "no entries": (_with(entries=[]), "no 'entries'"),
    "out of range": (_bad_value, "out-of-range value"),
    "dtype missing": (_missing_dtype, "no gemv_max_rows for"),
}


@needs_ext
@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_cache_warns_once_and_is_rebuilt(cache, kind):
    make, why = BAD_FILES[kind]
    content = make()
    path = gc.cache_path()
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    cache.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _matmul(5)
        _matmul(7)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            mm.gemv_max_rows("cpu", dtype)
    mine = [w for w in caught if "calibration cache" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in mine]
    assert path in str(mine[0].message) and why in str(mine[0].message)
    assert cache  # recalibrated
    data = json.loads(open(path).read())  # rebuilt: valid, this machine's, the new values
    assert data["cpu"] == system_info.cpu_model()
    assert data["entries"][_setting_name()]["gemv_max_rows"] == WANT
    gc._forget()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mm.gemv_threshold("cpu", torch.float32) == (32, f"calibration cache {path}")


@needs_ext
def test_bad_cache_without_calibration_warns_once_and_the_features_rule_holds(cache, monkeypatch):
    monkeypatch.setenv(gc.ENV_CALIBRATE, "0")
    path = gc.cache_path()
    with open(path, "w") as f:
        f.write("not json")
    with pytest.warns(RuntimeWarning, match="not JSON") as caught:
        _matmul(5)
        _matmul(5)
        assert mm.gemv_threshold("cpu", torch.float32) == (8, "features rule")
    assert len([w for w in caught if "calibration cache" in str(w.message)]) == 1
    assert open(path).read() == "not json" and cache == []


@needs_ext
def test_env_and_set_gemv_max_rows_win_over_the_calibration(cache, monkeypatch):
    gc.calibrate_gemv()
    assert mm.gemv_max_rows("cpu", torch.float32) == 32
    mm.set_gemv_max_rows(3, "cpu", torch.float32)
    assert mm.gemv_threshold("cpu", torch.float32) == (3, "set_gemv_max_rows")
    assert mm.gemv_max_rows("cpu", torch.bfloat16) == 4  # other dtypes keep the calibration
    mm.set_gemv_max_rows(5, "cpu")
    assert mm.gemv_max_rows("cpu", torch.bfloat16) == 5
    monkeypatch.setenv("QLORA_KERNELS_GEMV_MAX_ROWS", "11")
    assert mm.gemv_threshold("cpu", torch.float16) == (11, "env QLORA_KERNELS_GEMV_MAX_ROWS")


@needs_ext
def test_the_calibrated_switch_picks_the_path(cache, monkeypatch):
    gc.calibrate_gemv()
    taken = []
    monkeypatch.setattr(mm, "_gemv_path", lambda *a: taken.append("gemv") or torch.zeros(
        a[0].shape[0], a[5], dtype=a[0].dtype))
    monkeypatch.setattr(mm, "_gemm_path", lambda *a: taken.append("gemm") or torch.zeros(
        a[0].shape[0], a[5], dtype=a[0].dtype))
    for rows in (32, 33):  # float32 calibrated to 32 (the features rule says 8)
        _matmul(rows)
    for rows in (4, 5):  # bfloat16 calibrated to 4
        _matmul(rows, torch.bfloat16)
    assert taken == ["gemv", "gemm", "gemv", "gemm"]


@needs_ext
def test_info_shows_threshold_and_source(cache):
    out = io.StringIO()
    got = qk.info(file=out)
    assert got["gemv_max_rows_source"]["float32"] == "features rule"
    assert "qlora-kernels calibrate" in out.getvalue()
    gc.calibrate_gemv()
    out = io.StringIO()
    got = qk.info(file=out)
    assert got["gemv_max_rows"] == WANT
    source = f"calibration cache {gc.cache_path()}"
    assert set(got["gemv_max_rows_source"].values()) == {source}
    assert f"float32: 32 ({source})" in out.getvalue()
    mm.set_gemv_max_rows(6, "cpu", torch.float16)
    out = io.StringIO()
    qk.info(file=out)
    assert "float16: 6 (set_gemv_max_rows)" in out.getvalue()


@needs_ext
def test_cli_calibrate(cache, capsys, monkeypatch):
    from qlora_kernels.__main__ import main
    assert main(["calibrate", "--threads", str(torch.get_num_threads())]) == 0
    text = capsys.readouterr().out
    assert gc.cache_path() in text and "float32: GEMV up to 32 rows" in text
    assert json.loads(open(gc.cache_path()).read())["entries"][_setting_name()][
        "gemv_max_rows"] == WANT
    monkeypatch.setattr(gc, "machine_busy", lambda: True)  # still runs, and says so
    assert main(["calibrate"]) == 0
    assert "other work will be in the timings" in capsys.readouterr().err


@needs_ext
def test_real_calibration_keeps_the_random_stream(cache, monkeypatch):
    monkeypatch.setattr(gc, "time_paths", REAL_TIME_PATHS)
    monkeypatch.setattr(gc, "SHAPE", (64, 256))
    torch.manual_seed(7)
    want = torch.rand(3)
    torch.manual_seed(7)
    entry = gc.calibrate_gemv()
    assert torch.equal(torch.rand(3), want)
    rows = entry["gemv_max_rows"]
    assert set(rows) == set(WANT) and all(0 <= r <= 128 for r in rows.values())
    assert all(len(t) >= 2 for t in entry["timings_ms"].values())
    assert os.path.exists(gc.cache_path())


@needs_ext
def test_a_failed_calibration_warns_once_and_the_matmul_still_runs(cache, monkeypatch):
    tries = []

    def broken(dtype):
        tries.append(dtype)
        raise MemoryError("no room for the calibration weight")
    monkeypatch.setattr(gc, "time_paths", broken)
    with pytest.warns(RuntimeWarning, match="calibration failed") as caught:
        for rows in (5, 6, 7):
            assert _matmul(rows).shape == (rows, 24)
    assert len(tries) == 1 and len(caught) == 1  # tried once in this process
    assert mm.gemv_threshold("cpu", torch.float32) == (8, "features rule")
