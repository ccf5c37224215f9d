"""Test-session setup for tests/.

- Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors;
  that mode is fixed when ``cnf_kernels`` is imported, so it is set where tests run
  (pytest_configure), before any test module loads. Subprocesses (cnf.py smoke runs)
  inherit it. xdist's controller, which runs no test, loads neither torch nor triton.
- One CPU thread per run, unless OMP_NUM_THREADS says otherwise. A run's default
  thread count follows the machine's load at its start (one per idle core), so
  two runs that a test starts side by side and compares bit for bit could choose
  different counts, and with them different roundings. The thread tests
  (tests/test_busy_machine.py, tests/test_cnf.py) remove or set it themselves.
"""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _kernels_interpreted_without_cuda():
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("TRITON_INTERPRET") == "1":
        import fast_interpreter

        fast_interpreter.install()  # the interpreter's language set-up once per launch, not per helper call


# --- two or more tests at a time (pytest-xdist; pytest.ini passes -n auto --dist loadfile) --------------------
# Every test runs on one thread (above), so one worker per usable core keeps the cores busy. A file's tests
# stay in one worker, so a module's shared fixtures (a trained run, a sweep) are made once, and the tests
# that submit to the one local SLURM node (tests/test_sweeps.py) run one after another.
@pytest.hookimpl(optionalhook=True)  # also without pytest-xdist (pytest -p no:xdist)
def pytest_xdist_auto_num_workers(config):
    import runtime

    return runtime.usable_cores()  # the affinity and a cgroup quota, not the host's core count


# The files that take longest are handed out first (pytest.ini: --no-loadscope-reorder; xdist's own order
# is by number of tests), so that no worker is left with a long file while the others have finished.
# Longest first, as measured on an idle 2-core machine (docs/testing.md); a stale order costs only balance.
SLOW_FILES = ("tests/test_cnf_kernels.py", "tests/test_sweeps.py", "tests/test_busy_machine.py", "tests/test_cnf.py",
              "tests/test_summarize.py", "tests/test_gpu_check.py", "tests/test_warm_python.py", "tests/test_host_syncs.py",
              "tests/test_bench.py", "tests/test_reliability.py", "tests/test_kernel_nonfinite.py", "tests/test_plots.py",
              "tests/test_scaling.py", "tests/test_toy_data.py", "tests/test_schedule.py", "tests/test_grid_watch.py",
              "tests/test_packaging.py")


def pytest_collection_modifyitems(config, items):
    rank = {f: i for i, f in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.partition("::")[0], len(rank)))  # stable: the rest keep their order


# --- subprocesses start warm (tests/warm_python.py) -----------------------------------------------------------
# Where tests run (each xdist worker, or the one process without xdist), a server loads torch and the kit once,
# and sys.executable becomes a client that forks the subprocess from it (one started while the server loads
# waits for it). Wherever a fork could differ from a cold start, the client runs the real interpreter.
# KIT_TEST_COLD=1: off.
_warm = {}


def pytest_configure(config):
    try:
        workers = config.getoption("numprocesses")
    except ValueError:  # -p no:xdist
        workers = None
    if workers and not hasattr(config, "workerinput"):
        return  # xdist's controller, which runs no test
    _kernels_interpreted_without_cuda()
    if os.environ.get("KIT_TEST_COLD") == "1":
        return
    import warm_python

    real, folder = sys.executable, tempfile.mkdtemp(prefix="kitwarm")
    client, env, server = warm_python.start(real, folder)
    _warm.update(folder=folder, real=real, server=server)
    os.environ.update(env)
    sys.executable = client


def pytest_unconfigure(config):
    if _warm:
        sys.executable = _warm["real"]
        _warm["server"].kill()
        _warm["server"].wait()
        shutil.rmtree(_warm["folder"], ignore_errors=True)
        _warm.clear()


# --- figures at a small size, where the interpreter makes them the cost of a run -----------------------------
@pytest.fixture
def small_figure_grids(monkeypatch):
    """In this process, a run's density.npz on 12 points per side instead of 96 and with 50 samples
    instead of 2 000, and its flow frames' density on 12 points per side instead of 100. In Triton's
    interpreter those solves (9 216, 2 000 and 10 000 points) were most of a tiny fused run's time; the
    code paths are the same at these sizes (50 leaves a partial block). Without CUDA only."""
    import functools

    import torch

    import density
    import model

    if not torch.cuda.is_available():
        monkeypatch.setattr(density, "density_arrays", functools.partial(density.density_arrays, grid=12, num_samples=50))
        monkeypatch.setattr(model, "flow_snapshots", functools.partial(model.flow_snapshots, grid_size=12))


# --- a hung subprocess fails fast and says where it was --------------------------------------------------
# Every subprocess a test starts has a timeout of a small multiple of what it needs on a slow machine
# (docs/testing.md). When one expires, the failure names the command and its last lines of output: for
# cnf.py, the last log line (which iteration, the projection, the test metrics, the figures) is the
# phase it was in.
def _last_lines(out, n=3):
    if out is None:
        return []
    text = out.decode(errors="replace") if isinstance(out, bytes) else out
    return [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()][-n:]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except subprocess.TimeoutExpired as e:
        cmd = " ".join(map(str, e.cmd)) if isinstance(e.cmd, (list, tuple)) else str(e.cmd)
        last = _last_lines(e.stdout) + _last_lines(e.stderr)
        raise pytest.fail.Exception(f"timed out after {e.timeout:g} s: {cmd[:300]}; it was at: "
                                    + (" | ".join(last)[-600:] if last else "(no output yet)"), pytrace=False) from None
