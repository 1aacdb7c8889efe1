#!/usr/bin/env bash
# The design card's install, as a new user does it: a fresh venv holding only the pinned
# torch (and numpy), then `pip install .` with no flags; the extension must be built against
# that torch, load, and run a kernel. Usage: bash scripts/check_install.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-$(mktemp -d)/venv}"
PY="${PYTHON:-python3}"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q $(grep -E '^(torch|numpy)==' requirements.txt)
"$VENV/bin/python" -m pip install -q .
# Run from outside the checkout, so the installed package (not the source tree) is imported.
(cd "$(dirname "$VENV")" && "$VENV/bin/python" - <<'PY'
import torch, qlora_kernels as qk
from qlora_kernels import _extension
assert qk.EXTENSION_LOADED, f"extension not loaded: {_extension.LOAD_ERROR}"
assert _extension.BUILD_INFO["torch"] == torch.__version__, _extension.BUILD_INFO
w = torch.randn(300, 129)
packed, state = qk.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
err = (qk.dequantize_4bit(packed, state) - w).abs().max().item()
assert err < 0.2 * w.abs().max().item(), err
print(f"install check: qlora_kernels from {qk.__file__}, built against torch "
      f"{_extension.BUILD_INFO['torch']}, NF4 round trip max error {err:.3f}")
PY
)
