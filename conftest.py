"""Collection rules for the README's test command (``pytest --doctest-modules qlora_kernels
tests``): the modules of the optional Hugging Face integration import transformers at import
time, so without it their doctests are not collected (their tests in tests/ skip).

The GEMV/GEMM calibration (qlora_kernels/gemv_calibration.py) is off in a test session and
its cache is a fresh temporary directory: the thresholds are the features rule, which the
tests of the switch assert, no matmul pays for a calibration, and nothing is written under
the user's home (tests/test_gemv_calibration.py turns it on with its own directory)."""
import atexit
import importlib.util
import os
import shutil
import tempfile

os.environ["QLORA_KERNELS_CALIBRATION_DIR"] = tempfile.mkdtemp(prefix="qlora-kernels-test-cache-")
os.environ["QLORA_KERNELS_CALIBRATE"] = "0"
atexit.register(shutil.rmtree, os.environ["QLORA_KERNELS_CALIBRATION_DIR"], True)

collect_ignore_glob = []
if importlib.util.find_spec("transformers") is None:
    collect_ignore_glob.append("qlora_kernels/hf/*")
