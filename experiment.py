"""The run folder: its name, log, CSV, args, checkpoint and status.

Every file is written atomically (a temporary file in the same folder,
fsynced, then renamed over the target), so a crash or SIGKILL at any moment
leaves the previous good file or the new one, never a truncated one.
Checkpoints hold only tensors and plain Python values and are read with
``torch.load(weights_only=True)``: a checkpoint cannot execute code.
"""
import argparse
import csv
import io
import json
import os
import pickle
import resource
import signal
import sys
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

EXIT_OK, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_GRID_EXPLOITED = 0, 2, 3, 4, 5
CKPT_FORMAT = 1

# The one CSV schema: one row per --test_freq iterations (and the last one).
# FINAL_COLUMNS are filled at the end of a completed run, in its last row, and are empty
# in the rows before (a run continued past that end keeps them in that row).
# val_loss_fine and grid_gap are empty in the rows without a grid watch (--grid_watch);
# grid_exploited is 1 in a row whose validation raised the flag, else 0. kinetic and jacobian
# (the last training batch's mean penalty integrals) are empty unless --kinetic or --jacobian is on.
FINAL_COLUMNS = ("test_loss", "test_loss_se", "test_gap", "test_mmd", "test_mmd_se", "val_loss_exact", "disc_gap")
CSV_COLUMNS = (
    "iter", "lr", "running_loss", "val_loss", "val_loss_se", "val_loss_lowp", "nll_gap", "val_mmd", "train_mmd",
    "val_loss_fine", "grid_gap", "grid_exploited", "kinetic", "jacobian",
    "time_fwd", "time_bwd", "time_fwd_sum", "time_bwd_sum", "max_memory_mb", "loss_scale", "overflow_steps",
    *FINAL_COLUMNS,
)
# Columns that depend on the machine's speed, not on the computation.
TIMING_COLUMNS = ("time_fwd", "time_bwd", "time_fwd_sum", "time_bwd_sum", "max_memory_mb")


class CheckpointError(Exception):
    """A checkpoint that must not or cannot be used; the message is one line."""


# --- atomic files ------------------------------------------------------------------
def atomic_write(path, data):
    """Write bytes or str to ``path`` via a fsynced temporary file and a rename."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def write_csv(path, rows, columns=CSV_COLUMNS):
    """A missing or None value is written as an empty cell."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns))
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r[k] for k in columns})
    atomic_write(path, buf.getvalue())


def read_csv(path):
    """Rows of a run CSV as dicts of numbers, ints kept as ints and empty cells as
    None (so a resumed run rewrites its earlier rows byte for byte)."""
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _number(v):
    if v in ("", None):
        return None
    try:
        return int(v)
    except ValueError:
        return float(v)


# --- checkpoints ----------------------------------------------------------------------
def save_checkpoint(path, state):
    """The one checkpoint writer: ``state`` holds tensors and plain values only."""
    buf = io.BytesIO()
    torch.save({"format": CKPT_FORMAT, **state}, buf)
    atomic_write(path, buf.getvalue())


def load_checkpoint(path):
    """Load safely; raise CheckpointError (one line) for unsafe, corrupt or foreign files."""
    try:
        with warnings.catch_warnings():  # garbage can look like an odd pickle protocol
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), None)
        if culprit is None:  # the bytes are not a pickle the safe loader can even parse
            raise CheckpointError(f"{path}: truncated or corrupted checkpoint (not a valid torch file)") from None
        culprit = culprit.split("Unsupported global:")[-1].split(" was not")[0].strip()
        raise CheckpointError(
            f"{path}: refused: it holds arbitrary pickled objects ({culprit}), which the safe loader does not run"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as e:  # the safe unpickler runs no code; anything else it hits is damage
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint ({msg[:150]})") from None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT or "config" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this kit (format {CKPT_FORMAT})")
    return state


def config_differences(saved, wanted, keys):
    """Human-readable list of the keys whose values differ."""
    return [f"--{k} {saved.get(k)!r} in the checkpoint vs {wanted.get(k)!r} on the command line"
            for k in keys if saved.get(k) != wanted.get(k)]


# --- the run folder ----------------------------------------------------------------------
class RunDir:
    """Paths of one run's files. ``name`` is the folder's base name."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.name = os.path.basename(self.path.rstrip("/"))

    def file(self, name):
        return os.path.join(self.path, name)

    def _named(self, ext, other_files=()):
        """The run's own ``<folder name><ext>``. In a folder renamed after the run wrote
        it, the one file with that extension (``other_files`` aside) that it left, so a
        renamed run keeps its history (resume appends to it, summaries read it)."""
        own = self.file(f"{self.name}{ext}")
        if not os.path.exists(own) and os.path.isdir(self.path):
            left = [f for f in os.listdir(self.path) if f.endswith(ext) and f not in other_files]
            if len(left) == 1:
                return self.file(left[0])
        return own

    @property
    def log(self):
        return self._named(".txt")

    @property
    def csv(self):
        return self._named(".csv", other_files=("args.csv",))

    @property
    def ckpt(self):
        return self.file("ckpt.pth")

    @property
    def ckpt_valid(self):
        """The last checkpoint written before the grid_exploited flag first rose."""
        return self.file("ckpt_valid.pth")

    @property
    def status(self):
        return self.file("status.json")

    @property
    def test_logp(self):
        """Per-point test log-densities of a completed run (float32 .npy): runs of the
        same seed share the test set, so two runs can be compared point by point."""
        return self.file("test_logp.npy")

    @classmethod
    def create_unique(cls, results_dir, base):
        """Make results_dir/base_<timestamp>[-k]: mkdir is atomic, so two runs
        started in the same second get different folders."""
        os.makedirs(results_dir, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for k in range(1000):
            path = os.path.join(results_dir, f"{base}_{stamp}" + (f"-{k}" if k else ""))
            try:
                os.mkdir(path)
                return cls(path)
            except FileExistsError:
                continue
        raise RuntimeError(f"could not create a unique run folder under {results_dir}")


class RunLog:
    """Everything printed goes to the terminal (through tqdm, so the progress bar
    survives) and is appended to the run's log file. sys.stdout is left alone."""

    def __init__(self, path):
        self.file = open(path, "a", buffering=1)

    def print(self, *parts):
        msg = " ".join(str(p) for p in parts)
        tqdm.write(msg)
        self.file.write(msg + "\n")

    def flush(self):
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.flush()
        self.file.close()


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one stderr line and exit code 2 (bad input)."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_BAD_INPUT)


def write_npy(path, array):
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write(path, buf.getvalue())


def write_status(run, status, reason, iteration, metrics, grid_exploited=None, models=None, **extra):
    """``grid_exploited``: None, or where and why the flag first rose; ``models``: for a
    flagged run, the end-of-run metrics of each checkpoint, by file name, with a label;
    ``extra`` adds keys (cnf.py: the backend that ran, and why)."""
    write_json(run.status, {"status": status, "exit_reason": reason, "iter": iteration, "final": metrics,
                            "grid_exploited": grid_exploited, **({"models": models} if models else {}),
                            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})


def write_args(run, config, extra):
    rows = [{"key": k, "value": v} for k, v in sorted({**config, **extra}.items())]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["key", "value"])
    w.writeheader()
    w.writerows(rows)
    atomic_write(run.file("args.csv"), buf.getvalue())


KIT_DIR = os.path.dirname(os.path.abspath(__file__))


def snapshot_code(run):
    """Copy the kit's source files that this process has loaded (cnf.py, trainer.py,
    model.py, torchmpnode/, ...; tests aside) into ``run/code/``, keeping their paths
    relative to the kit, so the folder records the code that ran."""
    sources = set()
    for mod in list(sys.modules.values()):
        path = getattr(mod, "__file__", None)
        if not path or not os.path.isabs(path) or not path.endswith(".py") or not os.path.isfile(path):
            continue  # builtins, extension modules, and a few with a bare relative __file__
        rel = os.path.relpath(path, KIT_DIR)
        name = os.path.basename(rel)
        if rel.startswith("..") or rel.split(os.sep)[0] in ("tests", ".venv") or name.startswith(("test_", "conftest")):
            continue
        sources.add(rel)
    for rel in sorted(sources):
        with open(os.path.join(KIT_DIR, rel), "rb") as f:
            data = f.read()
        dest = run.file(os.path.join("code", rel))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        atomic_write(dest, data)


def read_args(path):
    with open(path, newline="") as f:
        return {r["key"]: r["value"] for r in csv.DictReader(f)}


def peak_memory_mb(device):
    """Peak so far: the CUDA allocator's on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 set ``received`` instead of killing the process,
    so training can finish its iteration, checkpoint and exit cleanly."""

    SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __init__(self):
        self.received = None
        self._old = {}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __enter__(self):
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
