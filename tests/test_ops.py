"""The op registry: Python's fallback schemas mirror csrc/ops.cpp, and every op has a fake."""
import pytest
import torch

import qlora_kernels  # noqa: F401  (registers fakes and fallbacks)
from qlora_kernels import _extension
from qlora_kernels.ops import SCHEMAS


@pytest.mark.skipif(not _extension.EXTENSION_LOADED, reason="compiled extension not built")
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_python_schema_equals_cpp_schema(name):
    declared = getattr(torch.ops.qlora_kernels, name).default._schema
    assert torch._C.parse_schema("qlora_kernels::" + SCHEMAS[name]) == declared


def test_every_registered_op_is_mirrored():
    ops = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
           if n.startswith("qlora_kernels::")}
    ops.discard("format_table")  # exports the header's tables to the tests; no fallback needed
    assert ops == set(SCHEMAS)
