"""The run folder: its name, log, CSV, args, checkpoint and status; and how the kit's
programs end (exit codes, one-line errors).

Every file is written atomically (a temporary file in the same folder,
fsynced, then renamed over the target), so a crash or SIGKILL at any moment
leaves the previous good file or the new one, never a truncated one; a write
that fails (a full disk, say) removes its temporary file and leaves the target
as it was. Checkpoints hold only tensors and plain Python values and are read
with ``torch.load(weights_only=True)``: a checkpoint cannot execute code.

This module imports no torch at import time (only the checkpoint functions load
it), so the entry points can check their flags before torch loads.
"""
import argparse
import contextlib
import csv
import errno
import io
import json
import math
import os
import pickle
import resource
import shutil
import signal
import sys
import time
import warnings
import zipfile

# Exit codes of cnf.py (the other entry points use 0, 1, 2, 6 and 130 the same way).
EXIT_OK, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_GRID_EXPLOITED = 0, 2, 3, 4, 5
EXIT_DISK_FULL = 6  # ENOSPC or EDQUOT: what could not be written is named; nothing written before is lost
EXIT_CTRL_C = 130  # Ctrl-C before anything was written (128 + SIGINT, as a shell reports it)
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
CKPT_FORMAT = 1

# The one CSV schema: one row per --test_freq iterations (and the last one).
# FINAL_COLUMNS are filled at the end of a completed run, in its last row, and are empty
# in the rows before (a run resumed past an earlier end empties them there: its log keeps them).
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


class DiskFull(OSError):
    """A write that failed for want of space (ENOSPC) or quota (EDQUOT). ``filename`` is the
    file that could not be written and ``needed`` the bytes it needed (None: unknown)."""

    def __init__(self, path, needed, cause):
        super().__init__(cause.errno, cause.strerror, os.fspath(path))
        self.needed = needed

    def line(self):
        """'could not write PATH (1.2 MB): No space left on device'"""
        size = f" ({megabytes(self.needed)})" if self.needed else ""
        return f"could not write {self.filename}{size}: {self.strerror}"


def is_disk_full(e):
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


def megabytes(n):
    return f"{n / 2**20:.2f} MB" if n < 10 * 2**20 else f"{n / 2**20:.0f} MB"


# --- atomic files ------------------------------------------------------------------
def duration(s):
    """A duration in seconds as a short text: 42s, 5m44s, 1h13m; an unknown (non-finite) one as —."""
    if not math.isfinite(s):
        return "—"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def atomic_write(path, data):
    """Write bytes or str to ``path`` via a fsynced temporary file in the same folder
    (``PATH.tmp-PID``: a rename within one filesystem is atomic) and a rename. On any
    failure, Ctrl-C included, the temporary file is removed and ``path`` is left as it
    was; a full disk or quota raises ``DiskFull`` naming ``path``."""
    path = os.fspath(path)
    data = data.encode() if isinstance(data, str) else data
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if is_disk_full(e) and not isinstance(e, DiskFull):
            raise DiskFull(path, len(data), e) from None
        raise
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def atomic_copytree(files, dest):
    """Write ``files`` ({relative path: bytes}) as the new folder ``dest``: into a temporary
    sibling folder, each file fsynced, then one rename, so ``dest`` is complete or absent. On
    failure the temporary folder is removed (a full disk raises ``DiskFull``)."""
    tmp = f"{dest.rstrip(os.sep)}.tmp-{os.getpid()}"
    try:
        for rel, data in files.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            with open(os.path.join(tmp, rel), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, dest)  # never over an existing folder: the code that ran is not replaced
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e) and not isinstance(e, DiskFull):
            raise DiskFull(dest, sum(len(d) for d in files.values()), e) from None
        raise


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


def tensorboard_available():
    """Whether the tensorboard package (its event protobufs and record writer) imports."""
    try:
        import tensorboard.compat.proto.event_pb2  # noqa: F401
        import tensorboard.summary.writer.record_writer  # noqa: F401
    except ImportError:
        return False
    return True


EVENTS_FILE = "events.out.tfevents.cnf"  # TensorBoard reads the files whose names hold "tfevents"


def write_events(folder, rows, columns=CSV_COLUMNS):
    """The CSV rows as one TensorBoard event file in ``folder``: each numeric cell a scalar
    tagged with its column at step ``iter``. The file is rewritten whole from the rows, and
    atomically, at every row, so a resumed run (whose rows are the CSV's up to its checkpoint)
    continues the same stream with no duplicate step. Its bytes depend on the rows alone: each
    event's wall time is the run's training seconds so far (time_fwd_sum + time_bwd_sum), so a
    rewrite keeps the bytes TensorBoard has read and its "relative" axis is training time."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    buf = io.BytesIO()
    out = RecordWriter(buf)
    out.write(event_pb2.Event(wall_time=0.0, file_version="brain.Event:2").SerializeToString())
    for r in rows:
        wall = (r.get("time_fwd_sum") or 0.0) + (r.get("time_bwd_sum") or 0.0)
        values = [summary_pb2.Summary.Value(tag=k, simple_value=float(r[k])) for k in columns
                  if k != "iter" and isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
        out.write(event_pb2.Event(wall_time=wall, step=int(r["iter"]),
                                  summary=summary_pb2.Summary(value=values)).SerializeToString())
    os.makedirs(folder, exist_ok=True)
    pending = os.path.join(folder, "pending")  # no "tfevents" in its name: TensorBoard skips it
    atomic_write(pending, buf.getvalue())
    try:
        os.replace(pending, os.path.join(folder, EVENTS_FILE))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(pending)
        raise


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
    import torch

    buf = io.BytesIO()
    torch.save({"format": CKPT_FORMAT, **state}, buf)
    atomic_write(path, buf.getvalue())


def load_checkpoint(path):
    """Load safely; raise CheckpointError for unsafe, corrupt or foreign files, with one
    whole sentence that says what is wrong with the file (never the loader's internals)."""
    import torch

    try:
        with warnings.catch_warnings():  # garbage can look like an odd pickle protocol
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist.") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a checkpoint.") from None
    except pickle.UnpicklingError as e:
        culprit = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), None)
        if culprit is None:  # the bytes are not a pickle the safe loader can even parse
            raise CheckpointError(_damage(path)) from None
        culprit = culprit.split("Unsupported global:")[-1].split(" was not")[0].strip()
        raise CheckpointError(f"{path} was refused: it holds arbitrary pickled objects ({culprit}), which the safe "
                              f"loader does not run, so it is not a checkpoint of this kit.") from None
    except Exception:  # the safe unpickler runs no code; anything else it hits is damage
        raise CheckpointError(_damage(path)) from None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT or "config" not in state:
        raise CheckpointError(f"{path} is a torch file but not a checkpoint of this kit (format {CKPT_FORMAT}).")
    return state


def _damage(path):
    """The sentence for a file the safe loader cannot read."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    if size == 0:
        return f"{path} is empty (0 bytes): the write that made it never finished; use another checkpoint."
    if zipfile.is_zipfile(path):
        return f"{path} is damaged: torch cannot read its archive ({size} bytes), so it was truncated or corrupted."
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":  # the start of the zip archive torch writes, without its end
        return f"{path} is truncated: it begins like a torch checkpoint but its end is missing ({size} bytes)."
    return f"{path} is not a checkpoint: its {size} bytes are not the zip archive torch writes (nor a truncated one)."


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
    def tensorboard(self):
        """The folder of the run's TensorBoard events (``--tensorboard``)."""
        return self.file("tensorboard")

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
    survives) and is appended to the run's log file, a line at a time (the log is a
    journal, appended to, not replaced). sys.stdout is left alone."""

    def __init__(self, path):
        self.path = path
        self.file = self._guard(lambda: open(path, "a", buffering=1), 0)

    def _guard(self, do, size):
        """Run a write; a full disk becomes ``DiskFull`` naming the log."""
        try:
            return do()
        except OSError as e:
            if is_disk_full(e) and not isinstance(e, DiskFull):
                raise DiskFull(self.path, size, e) from None
            raise

    def print(self, *parts):
        from tqdm import tqdm  # here, not at the top: the entry points import this module before torch

        msg = " ".join(str(p) for p in parts)
        tqdm.write(msg)
        self._guard(lambda: self.file.write(msg + "\n"), len(msg) + 1)

    def flush(self):
        self._guard(lambda: (self.file.flush(), os.fsync(self.file.fileno())), 0)

    def close(self):
        try:
            self.flush()
        finally:
            with contextlib.suppress(OSError):
                self.file.close()


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one stderr line and exit code 2 (bad input)."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_BAD_INPUT)


def write_npy(path, array):
    import numpy as np

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


def read_status(run):
    """A run's status.json as a dict ({} when it is missing or unreadable)."""
    try:
        with open(run.status) as f:
            status = json.load(f)
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def write_args(run, config, extra):
    rows = [{"key": k, "value": v} for k, v in sorted({**config, **extra}.items())]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["key", "value"])
    w.writeheader()
    w.writerows(rows)
    atomic_write(run.file("args.csv"), buf.getvalue())


KIT_DIR = os.path.dirname(os.path.abspath(__file__))
SCRIPT = "cnf.py"  # the training script: at the top of every run folder, the other sources in code/


def kit_sources():
    """{path relative to the kit: bytes} of the kit's source files this process has loaded
    (cnf.py, trainer.py, model.py, ...; tests and tools aside), and every file of a kit package
    it has loaded (torchmpnode/ loads its solver on first use, so all of it is kept)."""
    def kit_file(path):  # strings only, no file system: most of the thousands of loaded modules are torch's & co.
        norm = os.path.normpath(path)
        if not norm.startswith(KIT_DIR + os.sep):
            return False
        rel = norm[len(KIT_DIR) + 1:]
        return not (rel.split(os.sep)[0] in ("tests", "tools", ".venv")
                    or os.path.basename(rel).startswith(("test_", "conftest")))

    paths = set()
    for mod in list(sys.modules.values()):
        path = getattr(mod, "__file__", None)
        if (not path or not os.path.isabs(path) or not path.endswith(".py") or not kit_file(path)
                or not os.path.isfile(path)):
            continue  # not the kit's; builtins, extension modules, and a few with a bare relative __file__
        paths.add(path)
        if os.path.basename(path) == "__init__.py":
            folder = os.path.dirname(path)
            paths.update(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".py"))
    sources = {}
    for path in sorted(p for p in paths if kit_file(p)):
        with open(path, "rb") as f:
            sources[os.path.relpath(path, KIT_DIR)] = f.read()
    return sources


def snapshot_code(run):
    """Record the code that ran: the kit's ``cnf.py`` at the top of the run folder (byte
    for byte), and every other kit source file this process has loaded in ``run/code/``,
    at its path in the kit. Both are written atomically (code/ as one folder rename), and
    only where missing: a resume never replaces what its first segment recorded. Returns
    whether anything was written."""
    wrote = False
    if not os.path.isfile(run.file(SCRIPT)):
        with open(os.path.join(KIT_DIR, SCRIPT), "rb") as f:
            atomic_write(run.file(SCRIPT), f.read())
        wrote = True
    if not os.path.isdir(run.file("code")):
        atomic_copytree({rel: data for rel, data in sorted(kit_sources().items()) if rel != SCRIPT}, run.file("code"))
        wrote = True
    return wrote


def folder_bytes(path):
    """Bytes of the files under ``path`` (0 for a missing folder)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


def read_args(path):
    with open(path, newline="") as f:
        return {r["key"]: r["value"] for r in csv.DictReader(f)}


def peak_memory_mb(device):
    """Peak so far: the CUDA allocator's on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quiet_exits(prog, interrupted="interrupted; nothing half written was left", signals=True):
    """How an entry point ends on Ctrl-C, a full disk or a missing requirement: one line on stderr
    and a documented exit code, never a traceback. Ctrl-C (KeyboardInterrupt reaching the top):
    ``interrupted`` and exit code 130; ENOSPC/EDQUOT: what could not be written and exit code 6;
    a package the kit needs that this Python lacks (torch, say): which one and exit code 2. Every
    other error keeps Python's traceback (it is a bug to report). Call it first thing under
    ``if __name__ == "__main__":``, before the heavy imports, so it covers them too.

    ``signals``: SIGINT and SIGTERM raise KeyboardInterrupt whatever the process inherited
    (a background job of a non-interactive shell starts with SIGINT ignored; SIGTERM's
    default kills before any clean-up), so both end the same way: the temporary file of an
    atomic write in progress removed, one line, exit code 130. cnf.py passes False: its
    runtime.StopSignals has them from its first line."""
    default = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            line, code = f"{prog}: {interrupted}", EXIT_CTRL_C
        elif missing_requirement(value):
            line = (f"{prog}: this Python ({sys.executable}) cannot import {value.name}: install the requirements "
                    "(torch first, then pip install -r requirements.txt: README, Quick start)")
            code = EXIT_BAD_INPUT
        elif is_disk_full(value):
            what = value.line() if isinstance(value, DiskFull) else f"{value.filename or 'a file'}: {value.strerror}"
            line, code = f"{prog}: disk full: {what}; free some space and run it again", EXIT_DISK_FULL
        else:
            return default(kind, value, tb)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        os._exit(code)

    sys.excepthook = hook
    if signals:
        for name in ("SIGINT", "SIGTERM"):
            signal.signal(getattr(signal, name), _raise_interrupt)


def missing_requirement(error):
    """Whether ``error`` is an import of a package from outside the kit that this Python lacks: an
    environment to set up, not a bug (a module of the kit itself that fails to import is one)."""
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return False
    top = error.name.split(".")[0]
    here = os.path.dirname(os.path.abspath(__file__))
    return not (os.path.exists(os.path.join(here, top + ".py")) or os.path.isdir(os.path.join(here, top)))


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)
