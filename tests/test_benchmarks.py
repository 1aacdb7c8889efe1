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
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib not installed: plots not written")
    assert any(f.endswith("-quantize.png") for f in files)
    assert any(f.endswith("-matmul.png") for f in files)
