"""scripts/gpu_check.py, the one command for the GPU figures, checked on the CPU: argument
handling, the plan it would run on a GPU (the build targets the GPU's arch, pytest -m gpu,
the sanitizer only where it exists), stages that fail or run out of time are recorded and
the next one runs, and the results JSON and markdown are written after every stage.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gc = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gc  # dataclasses look their module up
_spec.loader.exec_module(gc)

GPU_VERSIONS = {"gpu_count": 1, "gpu": "NVIDIA H200", "capability": "9.0"}


def test_bad_arguments_are_refused(tmp_path, capsys):
    for argv in (["--stages", "versions,warp_drive"], ["--budget", "0"], ["--stages", ","],
                 ["--model", str(tmp_path / "missing.gguf")]):
        with pytest.raises(SystemExit):
            gc.parse_args(argv)
        assert "error" in capsys.readouterr().err
    args = gc.parse_args(["--stages", "smollm2,versions", "--out", "rel"])
    assert args.stages == ["versions", "smollm2"]  # run order, whatever the order given
    assert Path(args.out).is_absolute()


def test_gpu_plan_builds_for_the_gpu_found(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "find_compute_sanitizer", lambda: "/opt/cuda/bin/compute-sanitizer")
    args = gc.parse_args(["--out", str(tmp_path), "--model", str(tmp_path)])
    plan = {s.name: s for s in gc.build_plan(args, GPU_VERSIONS)}
    assert list(plan) == list(gc.STAGES)
    assert all(s.skip is None for s in plan.values())
    (_, argv, env), _check = plan["build"].cmds
    assert argv[-2:] == ["build_ext", "--inplace"]
    assert env["QLORA_KERNELS_CUDA_ARCHS"] == env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert int(env["MAX_JOBS"]) >= 1
    assert ["-m", "gpu"] == plan["pytest_gpu"].cmds[0][1][4:6]
    assert plan["sanitizer_racecheck"].cmds[0][1][:3] == ["/opt/cuda/bin/compute-sanitizer",
                                                          "--tool", "racecheck"]
    for _, argv, _ in plan["smollm2"].cmds:
        assert argv[argv.index("--device") + 1] == "cuda" and argv[-2:] == ["--model",
                                                                            str(tmp_path)]
    assert sum(s.cap for s in plan.values()) > args.budget  # the deadline, not the caps, binds


def test_plan_skips_what_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "find_compute_sanitizer", lambda: None)
    plan = {s.name: s for s in gc.build_plan(gc.parse_args(["--out", str(tmp_path)]),
                                             GPU_VERSIONS)}
    assert "not found" in plan["sanitizer_memcheck"].skip
    smoke = {s.name: s for s in gc.build_plan(gc.parse_args(["--cpu-smoke"]), {"gpu_count": 0})}
    assert smoke["build"].skip and smoke["pytest_gpu"].skip and smoke["sanitizer_memcheck"].skip
    assert "--quick" in smoke["bench_matmul"].cmds[0][1]


def _stage(name, code, cap=30.0, data=None):
    return gc.Stage(name, cap, [(name, [sys.executable, "-c", code], {})],
                    data_files={name: data} if data else {})


def test_a_stage_past_its_cap_is_killed_and_recorded(tmp_path):
    t0 = time.monotonic()
    rec = gc.run_stage(_stage("slow", "import time; time.sleep(60)", cap=2), time.monotonic() + 99,
                       tmp_path)
    assert rec["status"] == "timeout" and time.monotonic() - t0 < 30
    rec = gc.run_stage(_stage("late", "print(1)"), time.monotonic() + 2, tmp_path)
    assert rec["status"] == "skipped" and "budget" in rec["reason"]


def test_a_failed_stage_keeps_its_output_and_no_stale_figures(tmp_path):
    data = tmp_path / "tmp" / "fig.json"
    data.parent.mkdir()
    data.write_text('{"old": 1}')  # an earlier run's file must not be reported
    rec = gc.run_stage(_stage("bad", "import sys; print('boom'); sys.exit(3)", data=data),
                       time.monotonic() + 60, tmp_path)
    cmd = rec["commands"]["bad"]
    assert rec["status"] == "failed" and cmd["returncode"] == 3 and "boom" in cmd["tail"]
    assert "data" not in cmd and not data.exists()
    code = f"import json; json.dump({{'x': 2}}, open({str(data)!r}, 'w'))"
    rec = gc.run_stage(_stage("good", code, data=data), time.monotonic() + 60, tmp_path)
    assert rec["status"] == "ok" and rec["commands"]["good"]["data"] == {"x": 2}
    assert (tmp_path / rec["log"]).read_text().startswith("$ ")


def test_cpu_smoke_writes_results_after_every_stage(tmp_path, monkeypatch):
    written = []
    real = gc.write_results

    def spy(results, out, name):
        written.append((name, list(results["stages"])))
        return real(results, out, name)

    monkeypatch.setattr(gc, "write_results", spy)
    res = gc.main(["--cpu-smoke", "--out", str(tmp_path), "--stages", "bench_optim,pytest_gpu",
                   "--python", sys.executable])
    assert [w[1] for w in written] == [["versions"], ["versions", "pytest_gpu"],
                                       ["versions", "pytest_gpu", "bench_optim"]] + \
        [["versions", "pytest_gpu", "bench_optim"]]
    saved = json.loads((tmp_path / "cpu-smoke.json").read_text())
    assert saved["finished"] and saved["mode"] == "cpu-smoke"
    assert saved["versions"]["torch"] and "python" in saved["versions"]
    assert saved["stages"]["pytest_gpu"]["status"] == "skipped"
    optim = saved["stages"]["bench_optim"]
    assert optim["status"] == "ok", optim
    assert optim["commands"]["bench_optim"]["data"]["median_ms"]["qk_adamw"] > 0
    md = (tmp_path / "cpu-smoke.md").read_text()
    assert "| bench_optim | ok |" in md and "qk_adamw" in md
    assert res["stages"].keys() == saved["stages"].keys()
