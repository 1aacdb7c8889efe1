"""compute_dtype: "auto" resolved in one place, accepted by every entry point, at the same
position in each."""
import inspect
from unittest import mock

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import compute_dtype as cd


def test_auto_follows_the_measurement():
    assert cd.resolve_compute_dtype("auto", "cuda") == torch.bfloat16
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        with mock.patch.object(cd, "cpu_computes_bf16_natively", lambda native=native: native):
            assert cd.resolve_compute_dtype("auto", torch.device("cpu")) == want
    assert cd.resolve_compute_dtype(torch.float16, "cpu") == torch.float16
    assert cd.resolve_compute_dtype(None, "cpu") is None
    with pytest.raises(ValueError, match="compute_dtype"):
        cd.resolve_compute_dtype("fast", "cpu")
    with pytest.raises(ValueError, match="floating-point"):
        cd.resolve_compute_dtype(torch.int8, "cpu")


def test_auto_everywhere_and_default_of_prepare_model(rng):
    want = cd.resolve_compute_dtype("auto", "cpu")
    assert qk.Linear4bit(64, 32, compute_dtype="auto").compute_dtype == want
    lin = torch.nn.Linear(64, 32)
    assert qk.Linear4bit.from_linear(lin, compute_dtype="auto").compute_dtype == want
    model = qk.prepare_model(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)),
                             target_modules=["0"], r=2, verbose=False)
    assert model[0].base_layer.compute_dtype == want and model[0].lora_A.weight.dtype == want
    assert inspect.signature(qk.prepare_model).parameters["compute_dtype"].default == "auto"


def test_compute_dtype_comes_right_before_quant_type():
    for fn in (qk.Linear4bit.__init__, qk.Linear4bit.from_linear, qk.prepare_model):
        names = list(inspect.signature(fn).parameters)
        assert names.index("quant_type") == names.index("compute_dtype") + 1, fn.__qualname__
