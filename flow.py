"""A trained flow, from Python: a run folder's checkpoint as an object that gives
log-densities, samples and the density on the caller's points (docs/python-api.md).

    import torch
    from flow import load_flow

    flow = load_flow("results/<run>/")
    logp = flow.log_prob(x)               # [n] float32: the run's solver, method and grid, as its test_logp.npy
    exact = flow.log_prob(x, exact=True)  # [n] float64: adaptive dopri5, no discretization error
    xs = flow.sample(1000, generator=torch.Generator().manual_seed(0))  # [n, 2], reproducible

Every solve is the kit's own, as a run makes it: ``model.log_prob`` and ``model.sample``
on the run's ``Integrator`` (``metrics.run_integrator``), in the batches of the end-of-run
metrics (``metrics.log_prob_batched``, ``metrics.sample_batched``), under the autocast of
``precision.Precision``; the exact solve is ``metrics.exact_log_prob``, the one behind
``val_loss_exact``. The checkpoint is read by ``metrics.load_run_model`` (``torch.load``
with ``weights_only=True``: a checkpoint cannot execute code).
"""
import numbers
import os

import torch

import experiment as ex
import metrics
from choices import PRECISIONS, SOLVERS
from model import resolve_backend
from precision import Precision, autocast_dtype
from torchmpnode import METHODS

CHECKPOINTS = ("ckpt.pth", "ckpt_valid.pth")  # a run's model, and the last one before grid_exploited rose


def metrics_precision(trained):
    """The precision a run that trained in ``trained`` computed its val_loss, test NLL and
    test_logp.npy in: float32 without autocast, whatever it trained in (a tfloat32 run with
    the TF32 matmuls its training turned on, on CUDA)."""
    return trained if PRECISIONS[trained].autocast is None else "float32"


def load_flow(run, device="cpu", checkpoint="ckpt.pth", precision=None, backend="torch"):
    """The trained flow of the run folder ``run``.

    ``checkpoint``: ``ckpt.pth`` (the run's latest model) or ``ckpt_valid.pth`` (a run
    whose grid_exploited flag rose: the last model before it did). ``precision``: the
    precision its solves run in (a name of ``choices.PRECISIONS``); None: that of the
    run's metrics (``metrics_precision``: float32 without autocast, also for a bfloat16
    or float16 run, so ``log_prob`` of the test set gives its test_logp.npy); the run's
    own low precision is ``precision=flow.config["precision"]`` (its val_loss_lowp).
    ``backend``: ``torch``, or ``triton`` (the fused kernels, CUDA) or ``auto`` for
    torchmpnode runs with the exact trace. On CUDA, ``tfloat32`` turns TF32 matmuls on
    for the process (and another precision off), as a run does.

    Bad arguments raise ValueError; a folder without that checkpoint, or a damaged or
    foreign file, raises ``experiment.CheckpointError``; each message is one line.
    """
    if not isinstance(checkpoint, str) or checkpoint not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {checkpoint!r}; choose one of: {', '.join(CHECKPOINTS)}")
    try:
        run = os.fspath(run)
    except TypeError:
        raise ValueError(f"run must be a path to a run folder, got {type(run).__name__}") from None
    if not os.path.isdir(run):
        raise ValueError(f"{run!r} is not a folder (a run folder of cnf.py holds its ckpt.pth)")
    path = os.path.join(run, checkpoint)
    if not os.path.isfile(path):
        why = "only a run whose grid_exploited flag rose has one" if checkpoint == "ckpt_valid.pth" else \
            "it is not a run folder of cnf.py, or its run never wrote a checkpoint"
        raise ex.CheckpointError(f"{run} holds no {checkpoint}: {why}.")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{device!r} is not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    if precision is not None:
        if not isinstance(precision, str):
            raise ValueError(f"precision must be a name, one of: {', '.join(PRECISIONS)}; got {precision!r}")
        autocast_dtype(precision)  # an unknown name: ValueError listing the valid ones, before the file is read
    cnf, config, iteration = metrics.load_run_model(path, device)
    _check_config(config, path)
    try:  # the torch path, or the fused kernels where they can run this field (checked as a run checks them)
        cnf.backend, _ = resolve_backend(backend, device, config["odeint"], config["trace"], method=config["method"])
    except ValueError as e:
        raise ValueError(str(e).replace("--backend", "backend")) from None
    prec = Precision(metrics_precision(config["precision"]) if precision is None else precision, device)
    return Flow(cnf, config, iteration, prec, path)


def _check_config(c, path):
    """A config whose solver, grid, precision or seed no run can have is a damaged checkpoint."""
    allowed = {"odeint": SOLVERS, "method": tuple(METHODS), "precision": tuple(PRECISIONS)}
    for key, names in allowed.items():
        if not isinstance(c[key], str) or c[key] not in names:
            raise ex.CheckpointError(f"{path} has this kit's checkpoint format, but its config's {key} {c[key]!r} "
                                     f"is none of {', '.join(names)}, so it cannot be loaded.")
    for key, least, what in (("num_timesteps", 2, "a grid (an integer >= 2)"), ("seed", 0, "a seed (an integer >= 0)")):
        v = c[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ex.CheckpointError(f"{path} has this kit's checkpoint format, but its config's {key} {v!r} "
                                     f"is not {what}, so it cannot be loaded.")


class Flow:
    """A trained CNF and the grid it was trained on. ``config``: the run's configuration
    (a dict, as in its args.csv); ``precision``: the precision its solves run in; ``iter``:
    the iteration of its parameters; ``checkpoint``: the file they came from; ``model``:
    the ``model.CNF`` itself; ``device``: where it and every result live."""

    def __init__(self, cnf, config, iteration, precision, checkpoint):
        self.model, self.config, self.iter, self.checkpoint = cnf, dict(config), iteration, checkpoint
        self._prec = precision
        self.precision = precision.name
        self.device = next(cnf.parameters()).device
        self._integ = metrics.run_integrator(config)
        self._exact = None  # the float64 copy of the field, made on the first exact solve

    def __repr__(self):
        c = self.config
        prec = self.precision if self.precision == c["precision"] else f"{self.precision}, trained in {c['precision']}"
        return (f"Flow({self.checkpoint!r}: {c.get('data')}, {c.get('odeint')} {c.get('method')} "
                f"{c.get('num_timesteps')} points, iteration {self.iter}, {prec})")

    def _tensor(self, x):
        try:
            x = torch.as_tensor(x, device=self.device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"points must be a tensor or array of numbers, got {type(x).__name__}") from None
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"points must be real numbers, got {x.dtype}")
        return x

    def log_prob(self, x, exact=False, generator=None):
        """log p(x) [n] of points x [n, 2] (a tensor or array) under the model at t = 1, on
        this flow's device.

        By default on the run's own grid and solver, in this flow's precision: float32
        [n]. With the default precision (float32, no autocast, as the run's metrics) these
        are the values of the run's test_logp.npy and val_loss; with the run's low
        precision (``precision=config["precision"]``), those of its val_loss_lowp. The
        points are cast to the model's float32.
        ``exact=True``: the same trained field solved adaptively in float64 (dopri5,
        rtol = atol = metrics.EXACT_TOL, exact trace), without the grid's discretization
        error: float64 [n], the solve of val_loss_exact (``generator`` is not used).
        ``generator``: the Hutchinson noise of a ``--trace hutchinson`` run (a CPU
        torch.Generator); None: a fresh one seeded as the run seeded its test metrics'
        (``metrics.final_noise``), so the test set gives its test_logp.npy.
        """
        x = self._tensor(x)
        if x.ndim != 2 or x.shape[1] != 2 or x.shape[0] < 1:
            raise ValueError(f"points must have shape [n, 2] with n >= 1, got {list(x.shape)}")
        if exact:
            if self._exact is None:
                self._exact = metrics.exact_field(self.model)
            return metrics.exact_log_prob(self._exact, x)
        if generator is None:
            generator = metrics.final_noise(self.config["seed"])
        with self._prec.autocast():
            return metrics.log_prob_batched(self.model, x.float(), self._integ, generator=generator).float()

    def sample(self, n, generator=None):
        """n samples of the model [n, 2] float32 on its device: base noise pushed from t = 0 to
        t = 1 on the run's grid, in this flow's precision. The noise comes from ``generator``
        (a torch.Generator; None: torch's global one), so a seeded one gives the same samples
        every time."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        with self._prec.autocast():
            return metrics.sample_batched(self.model, int(n), self._integ, self.device, generator=generator)

    def density(self, points, exact=False, generator=None):
        """The model density p(x) at ``points`` [..., 2] (any leading shape, e.g. a mesh grid
        stacked on the last axis): exp of ``log_prob``, shaped [...] (float32, float64 with
        ``exact``), on this flow's device."""
        points = self._tensor(points)
        if points.ndim < 1 or points.shape[-1] != 2 or points.numel() == 0:
            raise ValueError(f"points must have shape [..., 2] and hold a point, got {list(points.shape)}")
        return self.log_prob(points.reshape(-1, 2), exact=exact, generator=generator).exp().reshape(points.shape[:-1])
