"""The learning-rate schedules: closed forms, the CSV's lr column in real runs (and on
resume), bitwise resume for each schedule, and bad values."""
import math
import os
import signal

import pandas as pd
import pytest
import torch

import cnf
import experiment as ex
import schedule
from test_cnf import TINY, _params, _rows, run_dirs, run_inprocess, run_subprocess

LR = 0.01


def expected_lr(k, kind, niters, step=2, gamma=0.5, lr_min=1e-3, warmup=0):
    """The rate after k updates, written out independently of schedule.py."""
    if k < warmup:
        return LR * (k + 1) / warmup
    if kind == "constant":
        return LR
    if kind == "step":
        return LR * gamma ** (k // step)
    p = min(k - warmup, niters - warmup) / (niters - warmup)
    return lr_min + (LR - lr_min) * (1 + math.cos(math.pi * p)) / 2


def test_closed_forms():
    f = lambda k, **kw: schedule.lr_factor(k, lr=1.0, **kw)  # noqa: E731
    assert [f(k) for k in (0, 999, 1000, 1999, 2000)] == [1.0, 1.0, 0.1, 0.1, 0.1 * 0.1]  # the seed's StepLR
    assert f(0, schedule="cosine", lr_min=0.2, niters=10) == 1.0
    assert f(5, schedule="cosine", lr_min=0.2, niters=10) == pytest.approx(0.6, abs=1e-15)
    assert f(10, schedule="cosine", lr_min=0.2, niters=10) == pytest.approx(0.2, abs=1e-15)
    assert f(50, schedule="cosine", lr_min=0.2, niters=10) == pytest.approx(0.2, abs=1e-15)
    assert [f(k, schedule="constant", warmup=4) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # cosine after warm-up: planned over the remaining updates
    assert f(3, schedule="cosine", warmup=3, niters=7) == 1.0
    assert f(5, schedule="cosine", warmup=3, niters=7) == pytest.approx(0.5, abs=1e-15)
    # the seed's StepLR, to the last bits (it multiplies the rate itself, LambdaLR the base rate)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    ref = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)
    for k in range(1, 12):
        opt.step()
        ref.step()
        want = 0.01 * schedule.lr_factor(k, step=3, gamma=0.1, lr=0.01)
        assert ref.get_last_lr()[0] == pytest.approx(want, rel=1e-15)


SCHEDULES = {
    "step": ["--lr_schedule", "step", "--lr_step", "2", "--lr_gamma", "0.5"],
    "cosine": ["--lr_schedule", "cosine", "--lr_min", "1e-3"],
    "constant": ["--lr_schedule", "constant"],
    "cosine+warmup": ["--lr_schedule", "cosine", "--lr_min", "1e-3", "--warmup", "3"],
    "step+warmup": ["--lr_schedule", "step", "--lr_step", "2", "--lr_gamma", "0.5", "--warmup", "3"],
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_csv_lr_follows_the_schedule_and_resume_is_bitwise(tmp_path, name):
    """Every CSV row's lr is the schedule's value after that many updates, in a run and in
    the same run interrupted and resumed; the resumed run ends bitwise where the whole one does.
    (A scheduler stepped twice per iteration, or not restored on resume, fails this.)"""
    flags = [*SCHEDULES[name], "--lr", str(LR), "--niters", "8", "--test_freq", "1", "--ckpt_freq", "3", "--no-figures"]
    code, full = run_inprocess(tmp_path / "a", *flags)
    assert code == 0
    kind, warmup = SCHEDULES[name][1], 3 if "warmup" in name else 0
    df = pd.read_csv(ex.RunDir(full).csv)
    assert list(df["iter"]) == list(range(1, 9))
    want = [expected_lr(k, kind, 8, warmup=warmup) for k in df["iter"]]
    assert df["lr"].tolist() == pytest.approx(want, rel=1e-12, abs=0), (
        f"{name}: the CSV's lr column {df['lr'].tolist()} is not the schedule's value after each row's number of "
        f"updates {want}: the scheduler does not step exactly once per iteration")
    if kind != "constant":
        assert len(set(df["lr"])) > 2  # the test would see a scheduler stepped too often or too rarely

    part = _interrupted_at(tmp_path / "b", flags, 3)  # a resume restarts after iteration 3
    assert pd.read_csv(ex.RunDir(part).csv)["iter"].tolist() == [1, 2, 3]
    assert cnf.main(["--resume", part]) == 0
    resumed = pd.read_csv(ex.RunDir(part).csv)
    assert resumed["lr"].tolist() == pytest.approx(want, rel=1e-12, abs=0)
    pa, pb = _params(full), _params(part)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    pd.testing.assert_frame_equal(_rows(full), _rows(part))


def _interrupted_at(results, flags, at):
    """A run of ``flags`` stopped (as by SIGTERM) right after iteration ``at``."""
    real_step = cnf.Trainer.step

    def step(self):
        out = real_step(self)
        if self.iter == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    cnf.Trainer.step = step
    try:
        code, folder = run_inprocess(results, *flags)
    finally:
        cnf.Trainer.step = real_step
    assert code == ex.EXIT_INTERRUPTED
    return folder


def test_cosine_resume_with_another_niters_is_refused(tmp_path):
    code, folder = run_inprocess(tmp_path, "--lr_schedule", "cosine", "--niters", "4", "--no-figures")
    assert code == 0
    proc = run_subprocess("--resume", folder, "--niters", "8")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "cosine schedule is planned over --niters" in proc.stderr
    # step and constant schedules continue: their rate does not depend on --niters
    code, folder = run_inprocess(tmp_path / "s", "--niters", "4", "--no-figures")
    assert cnf.main(["--resume", folder, "--niters", "6"]) == 0


def test_schedule_is_recorded_in_args_csv(tmp_path):
    code, folder = run_inprocess(tmp_path, "--lr_schedule", "cosine", "--lr_min", "1e-4", "--warmup", "2", "--no-figures")
    assert code == 0
    saved = ex.read_args(ex.RunDir(folder).file("args.csv"))
    assert (saved["lr_schedule"], saved["lr_min"], saved["warmup"], saved["lr_step"], saved["lr_gamma"]) == (
        "cosine", "0.0001", "2", "1000", "0.1")


BAD = [["--lr_schedule", "linear"], ["--lr_step", "0"], ["--lr_gamma", "0"], ["--lr_gamma", "1.5"],
       ["--lr_gamma", "nan"], ["--lr_min", "-1"], ["--lr_min", "1"], ["--warmup", "-1"],
       ["--lr_schedule", "cosine", "--warmup", "4"]]


@pytest.mark.parametrize("bad", BAD, ids=" ".join)
def test_bad_schedule_values_exit_2_in_one_line(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as e:  # in-process: the parser's own exit
        cnf.main([*TINY, "--results_dir", str(tmp_path / "res"), *bad])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("cnf.py: error:"), err
    assert not run_dirs(tmp_path / "res")
