"""Host reads in a training iteration: what waits for the device on a GPU.

A steady-state iteration of cnf.py reads nothing from the device in float32 and
bfloat16, and once in float16 with the DynamicScaler (the fused backward's failure and
gradient check). The CPU tests count every Python-level read of a tensor's values
(``item``, ``tolist``, ``bool``, ``float``, ``int``, ``numpy``, ``cpu``, formatting);
the CUDA test runs the same iterations under ``torch.cuda.set_sync_debug_mode``, which
also sees reads made inside torch itself. The losses, the scaler's scale and its retry
count are read at the CSV rows instead, and a run that defers its finiteness checks to
the rows gives the same rows, checkpoints and failures as one that checks every iteration.
"""
import math
import os
import sys
import warnings

import pandas as pd
import pytest
import torch

import cnf
import experiment as ex
import trainer as trainer_module
from torchmpnode import DynamicScaler

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu", "__format__")
TINY = ["--num_samples", "8", "--width", "8", "--hidden_dim", "8", "--num_timesteps", "4", "--threads", "1"]


class HostReads:
    """Counts reads of tensor values from Python while active. Adam's ``step`` counters
    are left out: they are CPU tensors on a GPU too (unless capturable or fused)."""

    def __init__(self, exclude=()):
        self.exclude = {id(t) for t in exclude}
        self.calls = []

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in READS}
        for name, orig in self.saved.items():
            setattr(torch.Tensor, name, self._counting(name, orig))
        return self

    def __exit__(self, *exc):
        for name, orig in self.saved.items():
            setattr(torch.Tensor, name, orig)

    def _counting(self, name, orig):
        def read(t, *args, **kw):
            if id(t) not in self.exclude:
                frame = sys._getframe(1)
                self.calls.append(f"{name} at {os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}")
            return orig(t, *args, **kw)

        return read


def trainer(backend, precision, device="cpu", extra=()):
    args = cnf.build_parser().parse_args([*TINY, "--backend", backend, "--precision", precision,
                                          "--device", device, *extra])
    cnf.validate(args, self_test=False)
    return cnf.Trainer(args, torch.device(args.device))


def adam_steps(tr):
    return [s["step"] for s in tr.opt.state.values() if "step" in s]


def need_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the fused kernels on the CPU need Triton's interpreter (TRITON_INTERPRET=1)")
    import cnf_kernels

    reason = cnf_kernels.unavailable_reason(torch.device("cpu"))
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("backend,precision,reads", [
    ("triton", "float32", 0), ("triton", "bfloat16", 0), ("triton", "float16", 1),
    ("torch", "float32", 0), ("torch", "bfloat16", 0),
])
def test_steady_state_iteration_reads(backend, precision, reads):
    """After the first iteration (which reads the grid once), each iteration reads the
    device ``reads`` times: float16's one is the DynamicScaler's check."""
    if backend == "triton":
        need_interpreter()
    tr = trainer(backend, precision)
    assert tr.step()[2] is None  # warm-up: the grid plan, Adam's state
    with HostReads(exclude=adam_steps(tr)) as h:
        for _ in range(3):
            assert tr.step()[2] is None
    assert len(h.calls) == 3 * reads, h.calls
    with HostReads() as h:
        assert tr.settle() is None  # a CSV row's reads: the losses and flags of the three, at once
    assert len(h.calls) == (3 if precision == "float16" else 1), h.calls  # float16: and the scaler's count and scale
    assert tr.iter == 4 and math.isfinite(tr.running)


def test_dynamic_scaler_reads_only_when_asked():
    """A fused sweep's report stays on the device until the scale or the retry count is
    read; the failure check is one read and names the failed step."""
    s = DynamicScaler()
    s.overflow_steps = 3
    with HostReads() as h:
        s.record_blocks(torch.tensor([2.0**20, 2.0**18, 2.0**19]), torch.tensor([1.0, 0.0, 2.0]),
                        torch.tensor([-1.0, -1.0, -1.0]), (0.0, 0.5, 1.0))
        assert h.calls == []
        assert s.check(torch.tensor(True)) == (1.0,)
        assert len(h.calls) == 1
    assert (s.scale, s.overflow_steps) == (2.0**18, 6)
    state = s.state_dict()
    assert state == {"scale": 2.0**18, "overflow_steps": 6}
    assert all(type(v) in (float, int) for v in state.values())
    s2 = DynamicScaler()
    s2.load_state_dict(state)
    assert (s2.scale, s2.overflow_steps) == (2.0**18, 6)
    s.record_blocks(torch.tensor([4.0, 2.0]), torch.tensor([40.0, 3.0]), torch.tensor([-1.0, 1.0]), (0.0, 0.25, 1.0))
    with pytest.raises(RuntimeError, match=r"step 1 \(t=0.25\) .*40 halvings .*fused backward"):
        s.check()
    assert s.check() == ()  # the failure is reported once


def test_device_anchor_is_the_host_anchor():
    """The scale the hypernetwork's backward takes on the device is the power of 2 the
    host formula gives, at and around powers of 2, for tiny and huge maxima, and 1 for
    0, inf and NaN."""
    s = DynamicScaler()
    n = 770
    target = s.target(n)
    values = [1.0, 3.0, 1e-3, 1e-30, 1e-44, 1e30, 3e38, target, target / 2, target * 2]
    values += [math.ldexp(1.0, k) * f for k in range(-140, 120, 7) for f in (1.0, 1 - 2**-24, 1 + 2**-23)]
    for v in values:
        amax = torch.tensor(v, dtype=torch.float32)
        host = DynamicScaler().anchor(float(amax), n)
        assert float(s.anchor_on_device(amax, n)) == host, v
    for v in (0.0, math.inf, math.nan):
        assert float(s.anchor_on_device(torch.tensor(v), n)) == 1.0


def _run(tmp_path, monkeypatch, checked, *flags):
    with monkeypatch.context() as m:  # undone after this run alone (the test's other patches stay)
        if checked:  # every iteration checked, as a GradScaler run is
            real = cnf.Trainer.__init__

            def init(self, *a, **kw):
                real(self, *a, **kw)
                self.checked = True

            m.setattr(cnf.Trainer, "__init__", init)
        code = cnf.main([*TINY, "--num_samples_val", "32", "--num_samples_test", "64", "--no-figures",
                         "--results_dir", str(tmp_path), *flags])
    (folder,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    run = ex.RunDir(folder)
    import json

    status = json.load(open(run.status))
    rows = pd.read_csv(run.csv).drop(columns=list(ex.TIMING_COLUMNS)) if os.path.exists(run.csv) else None
    return code, status, rows, ex.load_checkpoint(run.ckpt), open(run.log).read()


@pytest.mark.parametrize("flags", [
    ["--lr", "1e30", "--data", "checkerboard", "--niters", "40", "--test_freq", "10", "--ckpt_freq", "20"],
    ["--precision", "float16", "--lr", "1", "--niters", "12", "--test_freq", "4", "--num_samples", "64",
     "--width", "16", "--num_timesteps", "8"],
    ["--backend", "triton", "--precision", "float16", "--niters", "6", "--test_freq", "3", "--ckpt_freq", "6"],
], ids=["diverges", "float16-overflows", "fused-float16"])
def test_deferred_checks_match_checking_every_iteration(tmp_path, monkeypatch, flags, small_figure_grids):
    """Checks deferred to the rows (rolled back and replayed on a failure) give the rows,
    the status, and the checkpoint (parameters, optimizer, scaler, RNG) of a run that
    checks every iteration, including where it diverges; on the fused path too, whose
    scaler state waits on the device until a row reads it."""
    if "triton" in flags:
        need_interpreter()
    lazy = _run(tmp_path / "lazy", monkeypatch, False, *flags)
    each = _run(tmp_path / "each", monkeypatch, True, *flags)
    assert lazy[0] == each[0]
    assert {k: lazy[1][k] for k in ("status", "exit_reason", "iter")} == {k: each[1][k] for k in ("status", "exit_reason", "iter")}
    pd.testing.assert_frame_equal(lazy[2], each[2])
    a, b = lazy[3], each[3]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["iter"] == b["iter"] and a["running_loss"] == b["running_loss"]
    assert a["dynamic_scaler"] == b["dynamic_scaler"] and a["rng"]["numpy"] == b["rng"]["numpy"]
    assert torch.equal(a["rng"]["noise"], b["rng"]["noise"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    if "1e30" in flags:
        assert lazy[1]["status"] == "diverged" and "non-finite" in lazy[1]["exit_reason"]
        assert all(torch.isfinite(v).all() for v in a["model"].values())
    elif "triton" in flags:
        assert lazy[0] == 0 and "backend triton" in lazy[4] and a["dynamic_scaler"]["scale"] > 1
    else:
        assert lazy[0] == 0 and lazy[2]["overflow_steps"].iloc[-1] > 0
        assert "DynamicScaler retried" in lazy[4]


class _NanGradient(torch.autograd.Function):
    """The identity forward; a NaN gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * math.nan


def test_a_nan_gradient_under_a_finite_loss_is_rolled_back(tmp_path, monkeypatch):
    """Without GradScaler a non-finite gradient is a failure even when the loss is finite:
    the deferred checks roll back to the iteration before it and stop there, as a run that
    checks every iteration does (an update with it would make every parameter NaN)."""
    real = cnf.Trainer.objective

    # the 8th iteration's gradient is NaN, its loss is not; the row at 8 settles it (a failure
    # earlier in a row's window would also show as the NaN losses that follow it)
    def objective(self, x):
        loss = real(self, x)
        return _NanGradient.apply(loss) if self.iter == 7 else loss

    flags = ["--niters", "12", "--test_freq", "4", "--ckpt_freq", "12"]
    out = []
    for name, checked in (("lazy", False), ("each", True)):
        monkeypatch.setattr(cnf.Trainer, "objective", objective)
        out.append(_run(tmp_path / name, monkeypatch, checked, *flags))  # undoes the patches
    (lazy, each) = out
    for code, status, rows, ckpt, log in out:
        assert code != 0 and status["status"] == "diverged", status
        assert status["exit_reason"].startswith("iteration 8: non-finite gradient") and ckpt["iter"] == 7
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    a, b = lazy[3], each[3]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    pd.testing.assert_frame_equal(lazy[2], each[2])


@pytest.mark.cuda
@pytest.mark.parametrize("precision,syncs", [("float32", 0), ("bfloat16", 0), ("float16", 1)])
def test_cuda_iteration_syncs(monkeypatch, precision, syncs):
    """On the GPU, with the fused kernels: a steady-state iteration under
    ``set_sync_debug_mode`` makes ``syncs`` synchronizing calls. The timing's own
    ``torch.cuda.synchronize`` (the per-iteration time columns) is taken out here."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import cnf_kernels

    reason = cnf_kernels.unavailable_reason(torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    monkeypatch.setattr(trainer_module, "_sync", lambda device: None)
    tr = trainer("triton", precision, "cuda", ["--num_samples", "1024", "--width", "128", "--hidden_dim", "32",
                                               "--num_timesteps", "128"])
    for _ in range(2):  # compile, grid plan, Adam's state, pinned buffers
        assert tr.step()[2] is None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                assert tr.step()[2] is None
    finally:
        torch.cuda.set_sync_debug_mode("default")
    found = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(found) == 3 * syncs, found
    if syncs == 0:  # and "error" mode agrees: nothing raises
        torch.cuda.set_sync_debug_mode("error")
        try:
            assert tr.step()[2] is None
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert tr.settle() is None and math.isfinite(tr.running)
