"""The grid watch: val_loss_fine and grid_gap against their definition, and a model that
games a very coarse grid (RK4 on 3 grid points, lr 0.05) raising grid_exploited, with
--on_grid_exploit warn and stop, ckpt_valid.pth kept and evaluated."""
import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

import cnf
import experiment as ex
import metrics
import toy_data
from model import CNF, Integrator, log_prob
from test_cnf import TINY, run_inprocess, run_subprocess

# Gaming a 3-point grid takes a few dozen iterations at this learning rate: the first
# validation (iteration 10) is clean (grid_gap about -0.04), and by iteration 40 it is
# about -0.4 nats, so the flag rises in between with a margin on either side of 0.2.
GAME = ["--data", "checkerboard", "--method", "rk4", "--num_timesteps", "3", "--lr", "0.05", "--niters", "60",
        "--num_samples", "128", "--num_samples_val", "256", "--num_samples_test", "512", "--width", "16",
        "--hidden_dim", "16", "--test_freq", "10", "--ckpt_freq", "10", "--grid_gap_max", "0.2", "--no-figures"]


def _model(ckpt):
    state = ex.load_checkpoint(ckpt)
    c = state["config"]
    m = CNF(2, c["hidden_dim"], c["width"], c["trace"])
    m.load_state_dict(state["model"])
    return m, c, state


def test_fine_grid_nests_the_trained_grid_and_grid_gap_is_its_definition():
    integ = Integrator("torchmpnode", "euler", 5)
    fine = metrics.fine_integrator(integ)
    assert fine.num_timesteps == 17 and fine.method == "euler"
    t, tf = integ.grid("cpu"), fine.grid("cpu")
    assert torch.equal(tf[::4], t)  # every trained time point is on the fine grid
    torch.manual_seed(0)
    model = CNF(2, 8, 8)
    x = torch.from_numpy(toy_data.inf_train_gen("moons", 64, 0))
    from precision import Precision

    m = metrics.evaluate(model, integ, x, "moons", Precision("float32", torch.device("cpu")),
                         torch.Generator().manual_seed(1), fine)
    with torch.no_grad():
        want = -float(log_prob(model, x, Integrator("torchmpnode", "euler", 17)).mean())
    assert m["val_loss_fine"] == pytest.approx(want, rel=1e-6)
    assert m["grid_gap"] == m["val_loss"] - m["val_loss_fine"]
    # the flag's two criteria, on made-up rows
    H = toy_data.ENTROPY["moons"]
    row = dict(val_loss=H - 0.31, val_loss_se=0.1, grid_gap=0.0, val_loss_fine=H)
    assert "below the entropy" in metrics.grid_exploit_reason(row, H, 0.05)
    assert metrics.grid_exploit_reason({**row, "val_loss": H - 0.29}, H, 0.05) is None
    assert "grid_gap -0.0600" in metrics.grid_exploit_reason({**row, "val_loss": H, "grid_gap": -0.06}, H, 0.05)
    assert metrics.grid_exploit_reason({**row, "val_loss": H, "grid_gap": math.nan}, H, 0.05) is not None
    assert metrics.grid_exploit_reason({**row, "val_loss": H, "grid_gap": None}, H, 0.05) is None


def test_grid_watch_every_kth_validation(tmp_path):
    code, folder = run_inprocess(tmp_path, "--niters", "10", "--test_freq", "2", "--grid_watch", "2", "--no-figures")
    assert code == 0
    df = pd.read_csv(ex.RunDir(folder).csv)
    watched = df["grid_gap"].notna().tolist()
    assert watched == [False, True, False, True, True]  # iterations 4 and 8, and the last
    assert (df["grid_gap"] - (df["val_loss"] - df["val_loss_fine"])).abs().max() < 1e-12


def test_gaming_a_coarse_grid_raises_the_flag_and_keeps_the_last_unflagged_checkpoint(tmp_path):
    code, folder = run_inprocess(tmp_path, *GAME)
    assert code == 0  # warn: the run completes
    run = ex.RunDir(folder)
    df = pd.read_csv(run.csv)
    assert df["grid_exploited"].iloc[0] == 0 and df["grid_exploited"].any()
    first = int(df.loc[df["grid_exploited"] == 1, "iter"].iloc[0])
    assert 10 < first < 60
    assert (df.loc[df["iter"] < first, "grid_gap"].abs() <= 0.2).all()
    assert df.loc[df["iter"] == first, "grid_gap"].abs().iloc[0] > 0.2
    log = open(run.log).read()
    assert log.count("!!! GRID EXPLOITED") == 1 and f"GRID EXPLOITED at iteration {first}:" in log
    status = json.load(open(run.status))
    assert status["status"] == "completed" and status["grid_exploited"]["iter"] == first
    # ckpt_valid.pth: the checkpoint written before the flag rose, itself unflagged
    model, c, state = _model(run.ckpt_valid)
    assert state["iter"] == first - 10 == status["grid_exploited"]["ckpt_valid_iter"]
    assert state["grid_flag"] is None and _model(run.ckpt)[2]["grid_flag"]["iter"] == first
    # ... evaluated at the end: its val NLL is the CSV's at its iteration, its test NLL recomputed here
    models = status["models"]
    valid, latest = models["ckpt_valid.pth"], models["ckpt.pth"]
    assert "quote this one" in valid["label"] and "do not quote" in latest["label"]
    integ = Integrator(c["odeint"], c["method"], c["num_timesteps"], loss_scaler=False)
    x_val = torch.from_numpy(toy_data.inf_train_gen(c["data"], c["num_samples_val"], toy_data.seed_streams(0)["val"]))
    x_test = toy_data.inf_train_gen(c["data"], c["num_samples_test"], toy_data.seed_streams(0)["test"])
    x_test = torch.from_numpy(x_test)
    with torch.no_grad():
        val = -float(log_prob(model, x_val, integ).mean())
        test = -float(log_prob(model, x_test, integ).mean())
    assert valid["val_loss"] == pytest.approx(df.loc[df["iter"] == first - 10, "val_loss"].iloc[0], abs=1e-5)
    assert valid["val_loss"] == pytest.approx(val, abs=1e-5) and valid["test_loss"] == pytest.approx(test, abs=1e-5)
    assert valid["disc_gap"] == pytest.approx(valid["val_loss"] - valid["val_loss_exact"], abs=1e-9)
    assert latest["test_loss"] == pytest.approx(df["test_loss"].iloc[-1], rel=1e-12) and latest["iter"] == 60
    # the gamed model's trained-grid NLL is far from its exact one; the kept one's is not
    assert abs(latest["disc_gap"]) > 0.2 > abs(valid["disc_gap"])
    assf = f"[ckpt_valid.pth, iteration {first - 10}: the last checkpoint before the flag rose; quote this one]"
    assert assf in log
    # summarize.py marks the run in its per-run table and its cell's status
    import summarize
    import tables

    assert summarize.main([str(tmp_path), "--out", str(tmp_path / "sum")]) == 0
    md = open(tmp_path / "sum" / "summary.md").read()
    assert f"completed, **grid_exploited** at {first}" in md and "1 completed (1 grid_exploited)" in md
    runs = pd.read_csv(tmp_path / "sum" / "summary_runs.csv")
    assert runs["grid_exploited"].tolist() == [first]
    cells = pd.read_csv(tmp_path / "sum" / "summary.csv")
    assert cells["grid_exploited"].tolist() == [1]
    assert tables.FLAG_MARK in open(tmp_path / "sum" / "summary.tex").read()


def test_stop_ends_the_run_with_its_exit_code_and_keeps_both_checkpoints(tmp_path):
    proc = run_subprocess(*GAME, "--on_grid_exploit", "stop", "--results_dir", str(tmp_path))
    assert proc.returncode == ex.EXIT_GRID_EXPLOITED == 5, proc.stderr[-2000:]
    (folder,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    run = ex.RunDir(folder)
    status = json.load(open(run.status))
    first = status["grid_exploited"]["iter"]
    assert status["status"] == "grid_exploited" and status["iter"] == first and "on_grid_exploit stop" in status[
        "exit_reason"]
    df = pd.read_csv(run.csv)
    assert df["iter"].iloc[-1] == first and df["grid_exploited"].iloc[-1] == 1 and df["grid_exploited"].iloc[0] == 0
    assert _model(run.ckpt)[2]["iter"] == first  # the checkpoint is kept, at the stop
    assert _model(run.ckpt_valid)[2]["iter"] == first - 10
    assert set(status["models"]) == {"ckpt.pth", "ckpt_valid.pth"}
    assert all(math.isfinite(m["test_loss"]) and math.isfinite(m["val_loss_exact"]) for m in status["models"].values())
    assert os.path.isfile(run.test_logp) and np.isfinite(df["test_loss"].iloc[-1])
    # resumed with warn, the run goes on to its end: the flag's first rise and ckpt_valid.pth stay as they were
    kept = open(run.ckpt_valid, "rb").read()
    assert cnf.main(["--resume", folder, "--on_grid_exploit", "warn"]) == 0
    status = json.load(open(run.status))
    assert status["status"] == "completed" and status["iter"] == 60 and status["grid_exploited"]["iter"] == first
    assert open(run.ckpt_valid, "rb").read() == kept and open(run.log).read().count("!!! GRID EXPLOITED") == 1
    assert status["models"]["ckpt_valid.pth"]["iter"] == first - 10


@pytest.mark.parametrize("bad", [["--grid_watch", "-1"], ["--grid_gap_max", "0"], ["--grid_gap_max", "nan"],
                                 ["--on_grid_exploit", "ignore"]], ids=" ".join)
def test_bad_grid_watch_values_exit_2(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as e:
        cnf.main([*TINY, "--results_dir", str(tmp_path / "res"), *bad])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("cnf.py: error:"), err
    assert not os.path.exists(tmp_path / "res")
