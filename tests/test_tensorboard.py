"""--tensorboard: the CSV rows' scalars as TensorBoard events, read back with TensorBoard's
own reader, through an interrupt and a resume; refused in one line where the package is missing."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import cnf
import experiment as ex
from test_cnf import ROOT, TINY

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _events(run):
    acc = EventAccumulator(os.path.join(run, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_events_are_the_csv(run):
    rows = ex.read_csv(ex.RunDir(run).csv)
    events = _events(run)
    expected = {}
    for r in rows:
        for k in ex.CSV_COLUMNS:
            if k != "iter" and r.get(k) is not None:
                expected.setdefault(k, []).append((r["iter"], float(np.float32(r[k]))))
    assert set(events) == set(expected)
    for tag, pairs in expected.items():
        assert events[tag] == pairs, tag  # the same steps, once each, and the same values
    return rows, events


def test_events_equal_the_csv_through_an_interrupt_and_a_resume(tmp_path):
    run = str(tmp_path / "run")
    args = [*TINY, "--niters", "5000", "--test_freq", "2", "--ckpt_freq", "2", "--no-figures", "--tensorboard",
            "--run_dir", run, "--threads", "1"]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "cnf.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        csv = os.path.join(run, "run.csv")
        if os.path.exists(csv) and len(ex.read_csv(csv)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == ex.EXIT_INTERRUPTED, out
    rows, _ = _assert_events_are_the_csv(run)
    stopped = ex.read_csv(ex.RunDir(run).csv)[-1]["iter"]
    assert cnf.main(["--resume", run, "--niters", str(stopped + 6)]) == 0
    rows, events = _assert_events_are_the_csv(run)
    assert rows[-1]["iter"] == stopped + 6 and rows[-1]["test_loss"] is not None
    assert events["val_loss"][-1][0] == stopped + 6 and "test_loss" in events
    assert sorted(os.listdir(os.path.join(run, "tensorboard"))) == [ex.EVENTS_FILE]  # one stream, no leftovers


def test_no_flag_no_events(tmp_path):
    assert cnf.main([*TINY, "--no-figures", "--results_dir", str(tmp_path)]) == 0
    (run,) = os.listdir(tmp_path)
    assert not os.path.exists(os.path.join(tmp_path, run, "tensorboard"))


def test_without_the_package_the_flag_is_one_line_and_the_run_still_works(tmp_path, monkeypatch, capsys):
    """In this process, with the package made unimportable (None in sys.modules makes every
    ``import tensorboard...`` fail, as it does where it is not installed)."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert not ex.tensorboard_available()
    with pytest.raises(SystemExit) as e:
        cnf.main([*TINY, "--tensorboard", "--results_dir", str(tmp_path / "r")])
    assert e.value.code == 2 and not os.path.exists(tmp_path / "r")
    assert capsys.readouterr().err.strip() == (
        "cnf.py: error: --tensorboard needs the tensorboard package, which does not import here: pip install tensorboard")
    assert cnf.main([*TINY, "--no-figures", "--results_dir", str(tmp_path / "r")]) == 0
