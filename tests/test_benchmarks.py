"""The benchmark harness runs end to end (--quick) and writes its result files."""
import json
import os

import pytest


def test_quick_harness_writes_results_and_plots(tmp_path):
    from benchmarks.__main__ import SECTIONS, main

    results = main(["--quick", "--out", str(tmp_path)])
    files = os.listdir(tmp_path)
    json_files = [f for f in files if f.endswith("-quick.json")]
    assert len(json_files) == 1
    saved = json.load(open(tmp_path / json_files[0]))
    assert set(saved["sections"]) == set(SECTIONS)
    assert saved["sections"]["ceilings"]["copy_GBps"] > 0
    rows = saved["sections"]["quantize"]["rows"]
    assert any(r["op"] == "dequantize" and r["x_copy"] > 0 for r in rows)
    assert saved["sections"]["matmul"]["rows"][0]["gemm_ms"] > 0
    assert results["quick"] is True
    # --only re-runs some sections and keeps the others' earlier results
    before = saved["sections"]["dq_codes"]
    main(["--quick", "--out", str(tmp_path), "--only", "ceilings"])
    again = json.load(open(tmp_path / json_files[0]))
    assert set(again["sections"]) == set(SECTIONS) and again["sections"]["dq_codes"] == before
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # no leftovers
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib not installed: plots not written")
    assert any(f.endswith("-quantize.png") for f in files)
    assert any(f.endswith("-matmul.png") for f in files)


def test_bitsandbytes_rows_when_installed(tmp_path, single_thread):
    """The optional bitsandbytes rows (matmul bnb_ms column, quantize/dequantize rows) are
    in the printed table's JSON, positive, on the quick shapes."""
    bnb = pytest.importorskip("bitsandbytes")
    from benchmarks import bench_matmul, bench_quantize
    from benchmarks.plots import plot_all

    mm_json, q_json = str(tmp_path / "mm.json"), str(tmp_path / "q.json")
    bench_matmul.main(["--quick", "--json", mm_json])
    bench_quantize.main(["--quick", "--json", q_json])
    mm, q = json.load(open(mm_json)), json.load(open(q_json))
    assert mm["info"]["bitsandbytes"] == q["info"]["bitsandbytes"] == bnb.__version__
    assert mm["rows"] and all(r["bnb_ms"] > 0 for r in mm["rows"])
    rows = {r["op"]: r for r in q["rows"] if r["backend"] == "bitsandbytes"}
    assert set(rows) == {"quantize", "quantize+DQ", "dequantize", "dequantize+DQ"}
    for r in rows.values():
        assert r["ms"] > 0 and r["GB/s"] > 0 and r["x_copy"] > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert plot_all({"sections": {"matmul": mm, "quantize": q}}, str(tmp_path), "bnb")


def test_bench_optim_times_every_optimizer_of_the_device():
    from benchmarks import bench_optim

    res = bench_optim.main(["--numel", "300000", "--rounds", "2", "--warmup", "1"])
    assert set(res["median_ms"]) == {"torch_fused", "torch_foreach", "qk_adamw", "qk_adamw8bit"}
    assert all(len(v) == 2 and min(v) > 0 for v in res["all_ms"].values())
    assert res["device"] == "cpu" and res["managed_states"] == {}  # paged rows: CUDA only


def test_bench_memory_tiny_shape_runs_every_child(tmp_path):
    pytest.importorskip("transformers")
    from benchmarks import bench_memory

    res = bench_memory.main(["--shape", "tiny", "--json", str(tmp_path / "m.json")])
    assert json.load(open(tmp_path / "m.json"))["shape"] == "tiny"
    for kind in ("load", "step", "step_full"):
        r = res[kind]
        assert "error" not in r, r
        assert r["peak"] >= r["runtime"] > 0 and r["model_bytes"] > 0 and r["seconds"] > 0
    # the default step keeps selective checkpointing's outputs: a larger estimate
    assert res["step"]["estimate_gib"] > res["step_full"]["estimate_gib"] > 0
    assert "error" not in res["rates"] and res["rates"]["disk_bytes_per_s"] > 0
    assert not [f for f in os.listdir(tmp_path) if f.startswith("qk-bench")]


def test_bench_dropout_quick_covers_every_path_and_dtype():
    from benchmarks import bench_dropout
    from qlora_kernels import cpu_dispatch

    rows = bench_dropout.main(["--quick"])
    paths = cpu_dispatch.ISA_NAMES[: cpu_dispatch.ISA_NAMES.index(cpu_dispatch.cpu_isa()) + 1]
    assert {(r["path"], r["dtype"]) for r in rows} == {(p, d) for p in paths
                                                        for d in ("float32", "bfloat16")}
    assert all(r["seeded_us"] > 0 and r["torch_dropout_over_seeded"] > 0 for r in rows)
