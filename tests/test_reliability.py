"""Preemption, atomic checkpoints, safe checkpoint loading."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
import torch

import experiment as ex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num_samples", "32", "--num_samples_val", "32", "--num_samples_test", "256", "--num_timesteps", "4",
        "--width", "8", "--hidden_dim", "8", "--test_freq", "5", "--ckpt_freq", "1000", "--no-figures"]
# Seconds any one subprocess may take. A tiny run takes a few seconds on an idle
# machine; on a busy shared one it can take minutes, and a slow machine is not a bug.
TIMEOUT = 300  # a tiny run: seconds on a fast 2-core machine, about a minute on a slow one


def cnf(*args, **kw):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "cnf.py"), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def only_run(results):
    (d,) = [os.path.join(results, x) for x in os.listdir(results)]
    return ex.RunDir(d)


def wait_for_rows(run_parent, n, proc, timeout=TIMEOUT):
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        dirs = os.listdir(run_parent) if os.path.isdir(run_parent) else []
        if dirs:
            run = ex.RunDir(os.path.join(run_parent, dirs[0]))
            if os.path.isfile(run.csv) and len(open(run.csv).read().splitlines()) > n:
                return run
        time.sleep(0.05)
    raise TimeoutError


NITERS = 300
SIGNAL_ARGS = [*TINY, "--niters", str(NITERS), "--test_freq", "25"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run the interrupted ones must equal, trained once for the three signals."""
    results = tmp_path_factory.mktemp("full")
    full = cnf(*SIGNAL_ARGS, "--results_dir", str(results))
    _, err = full.communicate(timeout=TIMEOUT)
    assert full.returncode == 0, err[-2000:]
    return only_run(results)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_checkpoints_and_resume_is_bitwise(tmp_path, sig, uninterrupted):
    # the signal, sent at the second CSV row (iteration 50), must land before the run ends
    # even when a loaded CI machine delays this process: 250 iterations left (~1.2 s idle;
    # with 60 iterations and rows every 5, ~0.25 s were left)
    part = cnf(*SIGNAL_ARGS, "--results_dir", str(tmp_path / "part"))
    run = wait_for_rows(tmp_path / "part", 2, part)
    part.send_signal(sig)
    _, err = part.communicate(timeout=TIMEOUT)
    assert part.returncode == ex.EXIT_INTERRUPTED, err[-2000:]
    status = json.load(open(run.status))
    assert status["status"] == "interrupted" and signal.Signals(sig).name in status["exit_reason"]
    stopped_at = ex.load_checkpoint(run.ckpt)["iter"]
    assert 10 <= stopped_at < NITERS and status["iter"] == stopped_at
    assert "interrupted" in open(run.log).read()
    resumed = cnf("--resume", run.path, "--niters", str(NITERS))
    _, err = resumed.communicate(timeout=TIMEOUT)
    assert resumed.returncode == 0, err[-2000:]
    a, b = uninterrupted, only_run(tmp_path / "part")
    assert b.path == run.path  # continued in the same folder
    pa, pb = ex.load_checkpoint(a.ckpt)["model"], ex.load_checkpoint(b.ckpt)["model"]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    ra = pd.read_csv(a.csv).drop(columns=list(ex.TIMING_COLUMNS))
    rb = pd.read_csv(b.csv).drop(columns=list(ex.TIMING_COLUMNS))
    pd.testing.assert_frame_equal(ra, rb)
    assert json.load(open(b.status))["status"] == "completed"


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / "ckpt.pth"
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {ROOT!r})
        import experiment as ex
        ex.save_checkpoint({str(path)!r}, {{"config": {{"width": 8}}, "w": torch.ones(3), "iter": 1}})
        real = os.replace
        def die(src, dst):  # the new file is written and fsynced; die before the rename
            os.kill(os.getpid(), signal.SIGKILL)
        ex.os.replace = die
        ex.save_checkpoint({str(path)!r}, {{"config": {{"width": 8}}, "w": torch.zeros(3), "iter": 2}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    state = ex.load_checkpoint(path)
    assert state["iter"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_kill_mid_write_never_truncates(tmp_path):
    """A writer killed at random moments while rewriting the file: every read sees a whole file."""
    path = tmp_path / "status.json"
    ex.write_json(path, {"n": -1, "pad": "x" * 100000})
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import experiment as ex
        for n in range(10**9):
            ex.write_json({str(path)!r}, {{"n": n, "pad": "x" * 100000}})
            if n == 0:
                print("writing", flush=True)
    """)
    last = -1
    for delay in (0.0, 0.013, 0.05, 0.13, 0.21, 0.34):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "writing"  # killed while rewriting, not while importing
        time.sleep(delay)
        proc.kill()
        proc.wait()
        proc.stdout.close()
        data = json.load(open(path))  # never a partial file
        assert len(data["pad"]) == 100000 and data["n"] >= 0
        last = max(last, data["n"])
    assert last > 0  # the writer was rewriting the file in a loop when it was killed


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling this creates the marker file


def test_unsafe_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "run"
    bad.mkdir()
    torch.save({"format": ex.CKPT_FORMAT, "config": {}, "payload": _Evil(str(marker))}, bad / "ckpt.pth")
    with pytest.raises(ex.CheckpointError, match="refused"):
        ex.load_checkpoint(bad / "ckpt.pth")
    proc = cnf("--resume", str(bad))
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 2 and err.count("\n") == 1 and "refused" in err
    assert not marker.exists()


def test_corrupted_and_foreign_checkpoints_are_refused(tmp_path):
    good = tmp_path / "good.pth"
    ex.save_checkpoint(good, {"config": {"width": 8}, "w": torch.randn(100, 100)})
    raw = good.read_bytes()
    import random

    cases = {"truncated.pth": raw[: len(raw) // 2], "empty.pth": b"", "tail.pth": raw[100:]}
    cases.update({f"garbage{k}.pth": random.Random(k).randbytes(4096) for k in range(30)})
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ex.CheckpointError) as err:
            ex.load_checkpoint(tmp_path / name)
        # one whole sentence about the file, never the loader's internals ("pop from empty list")
        msg = str(err.value)
        assert msg.startswith(str(tmp_path / name)) and msg.endswith(".") and "\n" not in msg, msg
        assert msg[:-1].count(". ") == 0 and "Error" not in msg and "pop from" not in msg, msg
        assert any(w in msg for w in ("truncated", "damaged", "is empty", "is not a checkpoint")), msg
        want = {"truncated.pth": "is truncated: ", "empty.pth": "is empty", "tail.pth": "is damaged: "}
        with pytest.raises(ex.CheckpointError, match=want.get(name, "is not a checkpoint")):
            ex.load_checkpoint(tmp_path / name)
    torch.save({"model": {}}, tmp_path / "foreign.pth")
    with pytest.raises(ex.CheckpointError, match="not a checkpoint of this kit"):
        ex.load_checkpoint(tmp_path / "foreign.pth")
    for fmt in ({"format": ex.CKPT_FORMAT + 1}, {}):  # another format of this kit's layout, or none
        torch.save({**fmt, "config": {"width": 8}, "model": {}}, tmp_path / "other_format.pth")
        with pytest.raises(ex.CheckpointError, match=f"not a checkpoint of this kit \\(format {ex.CKPT_FORMAT}\\)"):
            ex.load_checkpoint(tmp_path / "other_format.pth")
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pth").write_bytes(raw[: len(raw) // 3])
    proc = cnf("--resume", str(run))
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 2 and err.count("\n") == 1 and "ckpt.pth is truncated: " in err, err


def test_periodic_checkpoints(tmp_path):
    proc = cnf(*TINY, "--niters", "7", "--ckpt_freq", "3", "--results_dir", str(tmp_path))
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0
    run = only_run(tmp_path)
    assert ex.load_checkpoint(run.ckpt)["iter"] == 7
    log = open(run.log).read()
    assert "completed" in log


def test_an_atomic_write_keeps_its_temporary_file_beside_the_target(tmp_path, monkeypatch):
    """The temporary file of an atomic write lives in its target's folder: a rename is atomic
    only within one filesystem, and a results folder is often on another one than /tmp."""
    renames = []
    real = os.replace

    def watching(src, dst):
        renames.append((os.path.dirname(os.path.abspath(src)), os.path.dirname(os.path.abspath(dst))))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", watching)
    for name in ("a.json", "sub/b.bin"):
        (tmp_path / os.path.dirname(name)).mkdir(exist_ok=True)
        ex.atomic_write(tmp_path / name, b"data")
    monkeypatch.undo()
    assert renames and all(src == dst for src, dst in renames), renames


def test_a_results_folder_on_another_filesystem_works(tmp_path):
    """A whole run, its checkpoints, CSV, status, arrays and figures, into a folder on another
    filesystem than /tmp and than the kit (a tmpfs mounted for the test, as root; as in CI)."""
    from test_busy_machine import leftovers, tmpfs

    with tmpfs(tmp_path / "fs", "64m") as fs:
        assert os.stat(fs).st_dev not in (os.stat("/tmp").st_dev, os.stat(ROOT).st_dev)
        proc = cnf(*TINY, "--niters", "10", "--figures", "--viz", "--viz_samples", "200", "--viz_timesteps", "3",
                   "--results_dir", str(fs))
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err[-2000:]
        run = only_run(fs)
        assert json.load(open(run.status))["status"] == "completed"
        assert os.path.isfile(run.file("cnf-viz.gif")) and os.path.isfile(run.test_logp) and not leftovers(fs)


# --- a Python without the requirements ------------------------------------------------------------------
@pytest.mark.parametrize("script,args", [("cnf.py", ["--niters", "2"]), ("bench.py", ["--quick"]),
                                         ("summarize.py", ["run"]), ("plots.py", ["run"])])
def test_a_python_without_the_requirements_is_one_line(tmp_path, script, args):
    """``python -S`` has no site-packages, so torch and numpy do not import: each entry point names
    the module and this Python in one line, exits with 2 (bad input) and writes nothing."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "args.csv").write_text("data\n")  # what plots.py's flag check looks for
    proc = subprocess.run([sys.executable, "-S", os.path.join(ROOT, script), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == ex.EXIT_BAD_INPUT and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{script}: this Python (") and "cannot import " in lines[0], lines[0]
    assert sorted(os.listdir(tmp_path)) == ["run"] and os.listdir(tmp_path / "run") == ["args.csv"]


def test_only_packages_from_outside_the_kit_count_as_missing_requirements():
    """A module of the kit that fails to import is a bug, and keeps its traceback."""
    assert ex.missing_requirement(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert ex.missing_requirement(ModuleNotFoundError("No module named 'scipy.stats'", name="scipy.stats"))
    assert not ex.missing_requirement(ModuleNotFoundError("No module named 'toy_data'", name="toy_data"))
    assert not ex.missing_requirement(ModuleNotFoundError("No module named 'torchmpnode.x'", name="torchmpnode.x"))
    assert not ex.missing_requirement(ImportError("cannot import name 'x' from 'torch'", name="torch"))
    assert not ex.missing_requirement(ValueError("torch"))
