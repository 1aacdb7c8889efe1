"""pytest --doctest-modules: this package needs transformers (and its PEFT examples peft);
without them its modules are not collected rather than failing to import."""
import importlib.util

collect_ignore_glob = [] if all(importlib.util.find_spec(m) for m in ("transformers", "peft")) \
    else ["*.py"]
