"""precision.py: which loss scalers a run's flags turn on, and the autocast each precision
runs under on the CPU."""
import pytest
import torch

import precision

# (odeint, precision, flags) -> the scaler label the run must have; written out by hand
# from docs/cli.md ("Precision and loss scaling"), not derived from choices.scaler_flags
EXPECTED = {
    ("torchdiffeq", "float16", ()): "grad",
    ("torchdiffeq", "float16", ("no_grad_scaler",)): "none",
    ("torchdiffeq", "float16", ("no_dynamic_scaler",)): "grad",  # torchdiffeq has no DynamicScaler
    ("torchdiffeq", "float16", ("grad_scaler",)): "grad",
    ("torchmpnode", "float16", ()): "dynamic",
    ("torchmpnode", "float16", ("no_dynamic_scaler",)): "none",
    ("torchmpnode", "float16", ("grad_scaler",)): "grad+dynamic",
    ("torchmpnode", "float16", ("no_dynamic_scaler", "grad_scaler")): "grad",
    ("torchmpnode", "float16", ("no_grad_scaler",)): "dynamic",
    **{(o, p, f): "none" for o in ("torchdiffeq", "torchmpnode") for p in ("float32", "tfloat32", "bfloat16")
       for f in ((), ("grad_scaler",), ("no_grad_scaler",), ("no_dynamic_scaler",))},
}


@pytest.mark.parametrize("odeint,name,flags", list(EXPECTED))
def test_scalers_follow_the_flags(odeint, name, flags):
    """Every flag combination turns on exactly the scalers docs/cli.md lists (a flag that is
    ignored, or a scaler outside float16, fails here), in the label and in the objects."""
    kw = {f: True for f in flags}
    want = EXPECTED[(odeint, name, flags)]
    assert precision.scaler_label(odeint, name, **kw) == want
    s = precision.Scalers(odeint, precision.Precision(name, "cpu"), "cpu", **kw)
    assert s.label == want
    assert s.grad.is_enabled() == ("grad" in want)
    assert (s.dynamic is not None) == ("dynamic" in want)
    assert s.solver_scaler is (s.dynamic if "dynamic" in want else False)
    assert s.loss_scale() == (65536.0 if "grad" in want else 1.0)  # GradScaler's initial scale, else 1


AUTOCAST = {"float32": torch.float32, "tfloat32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def test_every_precision_and_solver_has_its_rows_here():
    """A precision added to choices.PRECISIONS (or a solver) fails here until its expected
    scalers and autocast dtype are written out above by hand."""
    import choices

    missing = [(o, p) for o in choices.SOLVERS for p in choices.PRECISIONS if (o, p, ()) not in EXPECTED]
    assert not missing, f"write the expected scalers of {missing} into EXPECTED"
    assert set(AUTOCAST) == set(choices.PRECISIONS), "write each precision's autocast dtype into AUTOCAST"


@pytest.mark.parametrize("name,dtype", list(AUTOCAST.items()))
def test_autocast_runs_the_precision_on_the_cpu(name, dtype):
    """A matmul under the precision's autocast comes out in that dtype on the CPU (CUDA's
    autocast on a CPU tensor would leave it float32 without a word)."""
    p = precision.Precision(name, "cpu")
    a = torch.randn(4, 4)
    with p.autocast():
        assert (a @ a).dtype == dtype
    assert ("plain float32" in p.note) == (name == "tfloat32")


def test_unknown_precision_lists_the_valid_ones():
    with pytest.raises(ValueError, match="float32, tfloat32, bfloat16, float16"):
        precision.Precision("float8", "cpu")
