"""The GPU figures in one command (scripts/gpu_check.sh runs this).

On a machine with a CUDA GPU: versions, the CUDA build for the GPU found, ``pytest -m gpu``,
compute-sanitizer (memcheck, racecheck) on scripts/gpu_kernel_smoke.py where it exists,
then the GPU benchmarks: quantize/dequantize against a copy, GEMV/GEMM against cuBLAS
(dense F.linear in fp16/bf16/fp32) at 1-2048 rows, AdamW against torch's fused one and
paged in/out (states pushed to host memory by prefetching and back, never oversubscribed),
a SmolLM2-135M training step against PEFT (+ bitsandbytes when installed), and the
synthetic LLaMA-block training step.

Every stage runs in its own process with a time limit (its cap, and never past the overall
``--budget``), a failure or timeout is recorded and the next stage runs, and the results
file ``<out>/<gpu>.json`` plus a markdown summary ``<out>/<gpu>.md`` are rewritten after
every stage, so whatever has run is on disk even if the machine goes away. Logs of each
stage are in ``<out>/logs/``.

``--cpu-smoke`` runs the same stages' Python on the CPU with tiny sizes (for tests of this
script on machines without a GPU); ``--dry-run`` prints the plan and runs nothing.

Example:
    >>> plan = build_plan(parse_args(["--dry-run", "--cpu-smoke", "--stages", "versions"]), {})
    >>> [stage.name for stage in plan]
    ['versions']
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> seconds at most (GPU run). Order is run order: correctness first, then figures.
STAGE_CAPS = {
    "versions": 60,
    "build": 270,
    "pytest_gpu": 150,
    "bench_quantize": 45,
    "bench_matmul": 120,
    "bench_optim": 60,
    "smollm2": 90,
    "sanitizer_memcheck": 75,
    "sanitizer_racecheck": 60,
    "bench_train_step": 60,
}
STAGES = tuple(STAGE_CAPS)
SMOLLM2_VARIANTS = ("qk", "peft", "peft_bnb")
VERSIONS_SCRIPT = r"""
import json, os, platform, shutil, subprocess, sys, importlib
out = {"python": platform.python_version(), "platform": platform.platform(),
       "cpus": os.cpu_count()}
for mod in ("torch", "triton", "transformers", "peft", "bitsandbytes", "gguf", "numpy",
            "accelerate"):
    try:
        out[mod] = importlib.import_module(mod).__version__
    except Exception as exc:
        out[mod] = None
import torch
out["torch_cuda"] = torch.version.cuda
out["gpu_count"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
if out["gpu_count"]:
    p = torch.cuda.get_device_properties(0)
    out["gpu"] = p.name
    out["capability"] = "%d.%d" % (p.major, p.minor)
    out["gpu_memory_bytes"] = p.total_memory
def run(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return r.stdout.strip() or None
    except Exception:
        return None
out["driver"] = run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
nvcc = shutil.which("nvcc") or next((p for p in (os.path.join(os.environ.get("CUDA_HOME", ""),
        "bin", "nvcc"), "/usr/local/cuda/bin/nvcc") if os.path.isfile(p)), None)
v = run([nvcc, "--version"]) if nvcc else None
out["nvcc"] = v.splitlines()[-1] if v else None
out["ninja"] = shutil.which("ninja")  # without it torch's BuildExtension compiles serially
out["compute_sanitizer"] = shutil.which("compute-sanitizer")
print(json.dumps(out))
"""


@dataclass
class Stage:
    name: str
    cap: float
    cmds: list  # one or more (label, argv, extra env) run in turn
    skip: str | None = None  # reason not to run
    data_files: dict = field(default_factory=dict)  # label -> JSON file the command writes


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                    help="directory for <gpu>.json, <gpu>.md and logs/")
    ap.add_argument("--budget", type=float, default=480.0,
                    help="seconds for all stages together (default 480: 8 minutes)")
    ap.add_argument("--stages", help="comma-separated subset of: " + ",".join(STAGES))
    ap.add_argument("--model", help="SmolLM2 .gguf file or transformers model directory "
                                    "(default: the SmolLM2-135M architecture, random weights)")
    ap.add_argument("--skip-build", action="store_true", help="use the extension as built")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run the stages' Python on the CPU with tiny sizes (no GPU needed)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the stages")
    args = ap.parse_args(argv)
    if args.budget <= 0:
        ap.error("--budget must be positive")
    if args.stages:
        chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = sorted(set(chosen) - set(STAGES))
        if unknown or not chosen:
            ap.error(f"--stages: unknown {unknown}; choose from {','.join(STAGES)}")
        args.stages = [s for s in STAGES if s in chosen]
    else:
        args.stages = list(STAGES)
    args.out = str(Path(args.out).resolve())  # the stages run from the repository root
    if args.model is not None and not (os.path.isfile(args.model) or os.path.isdir(args.model)):
        ap.error(f"--model: {args.model} is neither a file nor a directory")
    return args


def find_compute_sanitizer() -> str | None:
    cands = [shutil.which("compute-sanitizer"),
             os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "compute-sanitizer"),
             "/usr/local/cuda/bin/compute-sanitizer",
             *sorted(glob.glob("/usr/local/cuda-*/bin/compute-sanitizer"), reverse=True)]
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def build_plan(args, versions: dict) -> list:
    """The stages to run, with their commands (``versions``: what the versions stage found;
    the build targets its GPU's arch)."""
    py, out = args.python, Path(args.out)
    tmp = out / "tmp"
    smoke = args.cpu_smoke
    dev = "cpu" if smoke else "cuda"
    gpu = bool(versions.get("gpu_count")) if versions else not smoke
    no_gpu = None if (gpu and not smoke) else "no GPU (--cpu-smoke or none found)"
    plan = []
    for name in args.stages:
        cap = STAGE_CAPS[name]
        if name == "versions":
            plan.append(Stage(name, cap, [("versions", [py, "-c", VERSIONS_SCRIPT], {})]))
        elif name == "build":
            arch = versions.get("capability") if versions else None
            env = {"MAX_JOBS": str(os.cpu_count() or 4)}
            skip = "--skip-build" if args.skip_build else None
            if arch and not smoke:
                env.update(QLORA_KERNELS_CUDA_ARCHS=arch, TORCH_CUDA_ARCH_LIST=arch)
            elif skip is None:
                skip = "no GPU to build for (--cpu-smoke or none found)"
            check = ("import qlora_kernels as qk, json; print(json.dumps({'extension': "
                     "qk.EXTENSION_LOADED, 'cuda_kernels': qk._extension.cuda_kernels_built()}))")
            plan.append(Stage(name, cap, [
                ("build_ext", [py, "setup.py", "build_ext", "--inplace"], env),
                ("check", [py, "-c", check], {})], skip=skip))
        elif name == "pytest_gpu":
            xml = out / "pytest-gpu.xml"
            plan.append(Stage(name, cap, [("pytest", [py, "-m", "pytest", "-q", "-m", "gpu", "-p",
                                                      "no:cacheprovider", f"--junitxml={xml}",
                                                      "tests"], {})],
                              skip=no_gpu, data_files={"junit": xml}))
        elif name.startswith("sanitizer_"):
            tool = name.split("_", 1)[1]
            cs = find_compute_sanitizer()
            skip = no_gpu or (None if cs else "compute-sanitizer not found")
            argv = [cs or "compute-sanitizer", "--tool", tool, "--error-exitcode", "9",
                    "--print-limit", "20", py, "scripts/gpu_kernel_smoke.py"]
            # the caching allocator hides out-of-bounds accesses inside its pooled blocks
            plan.append(Stage(name, cap, [(tool, argv, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})],
                              skip=skip))
        elif name in ("bench_quantize", "bench_matmul", "bench_optim", "bench_train_step"):
            script = f"benchmarks/{name}.py"
            extra = {"bench_quantize": ["--quick"] if smoke else [],
                     "bench_matmul": ["--quick"] if smoke else [],
                     "bench_optim": (["--numel", "100000", "--rounds", "2", "--warmup", "1"]
                                     if smoke else ["--rounds", "10"]),
                     "bench_train_step": ["--quick"] if smoke else []}[name]
            js = tmp / f"{name}.json"
            plan.append(Stage(name, cap, [(name, [py, script, "--device", dev, "--json", str(js),
                                                  *extra], {})], data_files={name: js}))
        elif name == "smollm2":
            cmds, files = [], {}
            size = (["--layers", "1", "--batch", "1", "--seq", "8", "--reps", "1", "--vocab",
                     "256"] if smoke else [])
            for variant in SMOLLM2_VARIANTS:
                js = tmp / f"smollm2-{variant}.json"
                argv = [py, "benchmarks/bench_smollm2_step.py", "--variant", variant, "--device",
                        dev, "--json", str(js), *size]
                if args.model:
                    argv += ["--model", args.model]
                cmds.append((variant, argv, {}))
                files[variant] = js
            plan.append(Stage(name, cap, cmds, data_files=files))
    return plan


def _run(argv, env_extra, timeout, log) -> tuple:
    """(status, returncode, seconds, stdout tail); the process group is killed on timeout."""
    env = dict(os.environ, **env_extra)
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, argv))}\n")
        f.flush()
        proc = subprocess.Popen([str(a) for a in argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=max(1.0, timeout))
            status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # ninja/nvcc children too
            output, _ = proc.communicate()
            status = "timeout"
        f.write(output or "")
    return status, proc.returncode, time.monotonic() - t0, (output or "")[-4000:]


def _junit_counts(path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                                  "skipped")}
    counts["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}"
                              for c in root.iter("testcase")
                              if c.find("failure") is not None or c.find("error") is not None][:50]
    return counts


def _sanitizer_counts(text: str) -> dict:
    m = re.search(r"(ERROR|RACECHECK) SUMMARY: (\d+) (error|hazard)", text)
    return {"summary": m.group(0)} if m else {}


def run_stage(stage: Stage, deadline: float, out: Path) -> dict:
    """Run one stage's commands in turn (stopping at the first that does not succeed),
    never past ``deadline`` (time.monotonic()). Returns its record for the results."""
    if stage.skip:
        return {"status": "skipped", "reason": stage.skip}
    left = deadline - time.monotonic()
    if left < 5:
        return {"status": "skipped", "reason": "time budget spent"}
    log = out / "logs" / f"{stage.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    for path in stage.data_files.values():  # never report an earlier run's figures
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).unlink(missing_ok=True)
    stop = time.monotonic() + min(stage.cap, left)
    rec = {"status": "ok", "seconds": 0.0, "log": str(log.relative_to(out)), "commands": {}}
    for label, argv, env in stage.cmds:
        remaining = stop - time.monotonic()
        if remaining < 1:
            rec["commands"][label] = {"status": "timeout", "reason": "stage time cap reached"}
            rec["status"] = "timeout"
            break
        status, rc, secs, tail = _run(argv, env, remaining, log)
        rec["seconds"] += secs
        cmd = {"status": status, "returncode": rc, "seconds": round(secs, 1), "tail": tail[-1500:]}
        path = stage.data_files.get(label)
        if path is not None and Path(path).is_file():
            try:
                cmd["data"] = (_junit_counts(path) if label == "junit" or str(path).endswith(".xml")
                               else json.loads(Path(path).read_text()))
            except (ValueError, ET.ParseError) as exc:
                cmd["data_error"] = str(exc)
        if stage.name.startswith("sanitizer_"):
            cmd.update(_sanitizer_counts(tail))
        if label == "versions" and status == "ok":
            try:
                cmd["data"] = json.loads(tail.strip().splitlines()[-1])
            except (ValueError, IndexError) as exc:
                cmd["data_error"] = str(exc)
        if label == "check" and status == "ok":
            try:
                cmd["data"] = json.loads(tail.strip().splitlines()[-1])
            except (ValueError, IndexError):
                pass
        rec["commands"][label] = cmd
        if status != "ok":
            rec["status"] = status
            # the SmolLM2 variants are independent: one failing does not stop the others
            if stage.name != "smollm2":
                break
    if "junit" in stage.data_files:  # pytest's counts, whatever its exit status
        path = stage.data_files["junit"]
        if Path(path).is_file():
            try:
                rec["pytest"] = _junit_counts(path)
            except ET.ParseError as exc:
                rec["pytest_error"] = str(exc)
    rec["seconds"] = round(rec["seconds"], 1)
    return rec


def slug(name: str) -> str:
    """A file name for a GPU name.

    Example:
        >>> slug("NVIDIA H200")
        'NVIDIA-H200'
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "device"


def write_results(results: dict, out: Path, name: str) -> tuple:
    """Write ``<name>.json`` and ``<name>.md`` atomically (temporary file, then rename)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / f"{name}.json", out / f"{name}.md")
    for path, text in zip(paths, (json.dumps(results, indent=1, default=str),
                                  markdown(results))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths


def markdown(results: dict) -> str:
    v = results.get("versions") or {}
    lines = [f"# GPU check: {v.get('gpu') or 'no GPU'}", "",
             f"Started {results['started']}, mode {results['mode']}, budget {results['budget_s']} s"
             + (f", finished {results['finished']}" if results.get("finished") else
                " (not finished)"), ""]
    keys = ("python", "torch", "torch_cuda", "triton", "transformers", "peft", "bitsandbytes",
            "nvcc", "driver", "gpu", "capability", "cpus", "ninja")
    lines.append("Versions: " + ", ".join(f"{k} {v.get(k)}" for k in keys if k in v))
    lines += ["", "| stage | status | seconds | note |", "|---|---|---|---|"]
    for name, rec in results["stages"].items():
        note = rec.get("reason", "")
        if "pytest" in rec:
            p = rec["pytest"]
            note = (f"{p['tests']} tests, {p['failures']} failed, {p['errors']} errors, "
                    f"{p['skipped']} skipped")
        for cmd in rec.get("commands", {}).values():
            if "summary" in cmd:
                note = cmd["summary"]
        lines.append(f"| {name} | {rec['status']} | {rec.get('seconds', '')} | {note} |")
    for name, rec in results["stages"].items():
        for label, cmd in rec.get("commands", {}).items():
            if name.startswith("bench") or name in ("smollm2",) or cmd.get("status") != "ok":
                tail = "\n".join(cmd.get("tail", "").strip().splitlines()[-30:])
                if tail:
                    lines += ["", f"## {name} / {label} ({cmd.get('status')})", "", "```", tail,
                              "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    t_start = time.monotonic()
    deadline = t_start + args.budget
    results = {"schema": 1, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "budget_s": args.budget, "argv": list(argv if argv is not None else sys.argv[1:]),
        "versions": None, "stages": {}, "finished": None}
    if args.dry_run:
        for stage in build_plan(args, {"capability": "<arch>", "gpu_count": 1} if
                                not args.cpu_smoke else {}):
            print(f"{stage.name:22s} cap {stage.cap:5.0f} s" +
                  (f"  skipped: {stage.skip}" if stage.skip else ""))
            for label, argv_, env in stage.cmds:
                shown = " ".join(a if len(a) < 100 else a[:40].strip() + "..." for a in map(str, argv_))
                print(f"    {label}: {shown}" + (f"  env {env}" if env else ""))
        return results
    name = "cpu-smoke" if args.cpu_smoke else "gpu-check"
    versions: dict = {}
    stages = list(args.stages)
    if "versions" not in stages:  # the build needs the arch and the file needs the GPU name
        stages.insert(0, "versions")
    args.stages = stages
    for stage_name in stages:
        plan = build_plan(argparse.Namespace(**{**vars(args), "stages": [stage_name]}), versions)
        stage = plan[0]
        print(f"== {stage.name} (cap {min(stage.cap, max(0, deadline - time.monotonic())):.0f} s)",
              flush=True)
        rec = run_stage(stage, deadline, out)
        results["stages"][stage.name] = rec
        if stage.name == "versions":
            versions = rec.get("commands", {}).get("versions", {}).get("data") or {}
            results["versions"] = versions
            if versions.get("gpu") and not args.cpu_smoke:
                name = slug(versions["gpu"])
        note = rec.get("reason") or ""
        if "pytest" in rec:
            p = rec["pytest"]
            note = f"{p['tests']} tests, {p['failures']} failed, {p['errors']} errors, {p['skipped']} skipped"
        print(f"   {rec['status']} {rec.get('seconds', '')} s {note}", flush=True)
        write_results(results, out, name)
    results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results["total_s"] = round(time.monotonic() - t_start, 1)
    json_path, md_path = write_results(results, out, name)
    print(f"wrote {json_path} and {md_path} ({results['total_s']} s)")
    for rec_name, rec in results["stages"].items():
        print(f"  {rec_name:22s} {rec['status']}")
    return results


if __name__ == "__main__":
    main()
