#!/usr/bin/env bash
# The GPU figures in one command: build for the GPU found, pytest -m gpu, compute-sanitizer,
# the GPU benchmarks; writes <out>/<gpu>.json and <out>/<gpu>.md within --budget seconds
# (default 480). All options are scripts/gpu_check.py's (--help), e.g.
#   bash scripts/gpu_check.sh --out "$OUT" --model /path/to/SmolLM2-135M-Instruct.Q4_1.gguf
# The interpreter: $PYTHON, else the first of python3 / python that imports torch.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  for cand in python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then
      PYTHON="$cand"
      break
    fi
  done
fi
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
