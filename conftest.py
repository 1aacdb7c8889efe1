"""Collection rules for the README's test command (``pytest --doctest-modules qlora_kernels
tests``): the modules of the optional Hugging Face integration import transformers at import
time, so without it their doctests are not collected (their tests in tests/ skip)."""
import importlib.util

collect_ignore_glob = []
if importlib.util.find_spec("transformers") is None:
    collect_ignore_glob.append("qlora_kernels/hf/*")
