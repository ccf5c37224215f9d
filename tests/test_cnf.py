"""Smoke, learning, resume, divergence and bad-input tests of the real cnf.py, at tiny sizes."""
import glob
import math
import os
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pandas as pd
import pytest
import torch

import cnf
import experiment as ex
import toy_data
from model import CNF, Integrator, log_prob

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num_samples", "32", "--num_samples_val", "32", "--num_samples_test", "256", "--num_timesteps", "4",
        "--width", "8", "--hidden_dim", "8", "--niters", "4", "--test_freq", "2", "--viz_samples", "200", "--viz_timesteps", "3"]


def run_dirs(results):
    return sorted(d for d in glob.glob(os.path.join(results, "*")) if os.path.isdir(d))


def run_inprocess(results, *args):
    code = cnf.main([*TINY, "--results_dir", str(results), *args])
    dirs = run_dirs(results)
    return code, dirs[-1] if dirs else None


def run_subprocess(*args, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "cnf.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, **kw)


def status_data(run):
    return ex.read_args(run.file("args.csv"))["data"]


FIGURES = ("optimization_stats.png", "mmd_plot.png", "cnf-viz.gif")


def check_complete(folder, frames=3, rows=(2, 4), figures=True):
    """A completed run's folder; ``figures=False``: one run with --no-figures, which has every
    file but the figures (they only read the CSV and the checkpoint, and are checked in the runs
    that draw them)."""
    run = ex.RunDir(folder)
    for f in (run.log, run.csv, run.ckpt, run.status, run.file("args.csv"), run.file("cnf.py"), run.file("code/model.py"),
              run.file("density.npz"), *(run.file(f) for f in FIGURES if figures)):
        assert os.path.isfile(f) and os.path.getsize(f) > 0, f
    if figures:
        assert len(glob.glob(run.file("cnf-viz-*.jpg"))) == frames
        assert len(imageio.mimread(run.file("cnf-viz.gif"))) == frames
    else:
        assert not glob.glob(run.file("*.png")) + glob.glob(run.file("cnf-viz*"))
        assert "no figures (--no-figures)" in open(run.log).read()
    df = pd.read_csv(run.csv)
    assert tuple(df.columns) == ex.CSV_COLUMNS
    assert tuple(df["iter"]) == rows
    periodic = df.drop(columns=[*ex.FINAL_COLUMNS, "kinetic", "jacobian"])  # penalties: empty unless on
    assert periodic.notna().all().all() and all(map(math.isfinite, periodic.to_numpy().ravel()))
    # the end-of-run columns: empty in earlier rows, finite in the last
    final = df[list(ex.FINAL_COLUMNS)]
    assert final.iloc[:-1].isna().all().all() and all(map(math.isfinite, final.iloc[-1]))
    import json

    status = json.load(open(run.status))
    assert status["status"] == "completed" and status["iter"] == rows[-1]
    last = df.iloc[-1]
    for k in (*ex.FINAL_COLUMNS, "val_loss_se"):
        assert status["final"][k] == pytest.approx(last[k], rel=1e-12), k
    assert last["test_gap"] == pytest.approx(last["test_loss"] - toy_data.ENTROPY[status_data(run)], abs=1e-9)
    assert last["disc_gap"] == pytest.approx(last["val_loss"] - last["val_loss_exact"], abs=1e-9)
    assert 0 < last["test_loss_se"] and 0 < last["val_loss_se"]
    logp = np.load(run.test_logp)
    assert logp.shape == (int(ex.read_args(run.file("args.csv"))["num_samples_test"]),)
    assert -logp.mean() == pytest.approx(last["test_loss"], abs=1e-5)
    assert logp.std(ddof=1) / math.sqrt(len(logp)) == pytest.approx(last["test_loss_se"], rel=1e-4)
    args = ex.read_args(run.file("args.csv"))
    assert {"torch_version", "device_name", "data", "width"} <= set(args)
    return df


# Figures are drawn where their solve is most likely to break (float16 overflow in the flow frames) and in
# one trace estimator; the other smoke runs are --no-figures: drawing the same CSV figures again tests nothing new.
@pytest.mark.parametrize("odeint", ["torchdiffeq", "torchmpnode"])
@pytest.mark.parametrize("precision", ["float32", "tfloat32", "bfloat16", "float16"])
def test_smoke_every_solver_and_precision(tmp_path, odeint, precision):
    figures = precision == "float16"
    code, folder = run_inprocess(tmp_path, "--odeint", odeint, "--precision", precision,
                                 *([] if figures else ["--no-figures"]))
    assert code == 0
    assert os.path.basename(folder).startswith(f"8gaussians_{precision}_{odeint}_rk4_nt_4_0_")
    df = check_complete(folder, figures=figures)
    low = precision in ("bfloat16", "float16")
    # the low-precision runs really ran in that precision on the CPU
    assert (df["val_loss_lowp"] != df["val_loss"]).any() == low
    scaled = precision == "float16"
    assert (df["loss_scale"] != 1.0).all() == scaled


@pytest.mark.parametrize("extra", [["--method", "euler"], ["--method", "euler", "--odeint", "torchdiffeq"],
                                   ["--trace", "autograd"], ["--trace", "hutchinson", "--odeint", "torchdiffeq"],
                                   ["--adjoint", "--odeint", "torchdiffeq"],
                                   ["--precision", "float16", "--no_dynamic_scaler", "--grad_scaler"]])
def test_smoke_methods_traces_and_scalers(tmp_path, extra):
    figures = "hutchinson" in extra
    code, folder = run_inprocess(tmp_path, *extra, "--data", "moons", *([] if figures else ["--no-figures"]))
    assert code == 0
    check_complete(folder, figures=figures)


def test_two_runs_in_the_same_second_do_not_collide(tmp_path):
    a = ex.RunDir.create_unique(tmp_path, "x")
    b = ex.RunDir.create_unique(tmp_path, "x")
    assert a.path != b.path and os.path.isdir(a.path) and os.path.isdir(b.path)


def test_learning_lowers_validation_nll(tmp_path):
    code, folder = run_inprocess(tmp_path, "--niters", "80", "--test_freq", "10", "--num_samples", "256",
                                 "--num_samples_val", "256", "--width", "32", "--hidden_dim", "16",
                                 "--num_timesteps", "8", "--no-figures")
    assert code == 0
    df = pd.read_csv(ex.RunDir(folder).csv)
    first, last = df["val_loss"].iloc[0], df["val_loss"].iloc[-1]
    print(f"val NLL {first:.3f} -> {last:.3f} (entropy floor 2.832)")
    assert last < first - 0.5


def _params(folder):
    return ex.load_checkpoint(ex.RunDir(folder).ckpt)["model"]


def _rows(folder):
    """The CSV rows without timing (a run resumed past an earlier end empties that end's
    columns, so its rows are an uninterrupted run's)."""
    return pd.read_csv(ex.RunDir(folder).csv).drop(columns=list(ex.TIMING_COLUMNS))


@pytest.mark.parametrize("extra", [["--precision", "float16"],
                                   ["--precision", "float16", "--odeint", "torchdiffeq", "--trace", "hutchinson"]])
def test_resume_continues_bitwise(tmp_path, extra):
    common = ["--niters", "6", "--ckpt_freq", "2", "--no-figures", *extra]
    code, full = run_inprocess(tmp_path / "a", *common)
    assert code == 0
    code, part = run_inprocess(tmp_path / "b", *common[:-len(extra) - 3], "--niters", "4", "--ckpt_freq", "2",
                               "--no-figures", *extra)
    assert code == 0
    assert ex.read_args(os.path.join(part, "args.csv"))["niters"] == "4"
    code = cnf.main(["--resume", part, "--niters", "6"])
    assert code == 0
    assert run_dirs(tmp_path / "b") == [part]  # same folder, no new one
    saved = ex.read_args(os.path.join(part, "args.csv"))  # the config the run has now
    assert (saved["niters"], saved["resumed_at_iter"]) == ("6", "4")
    pa, pb = _params(full), _params(part)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    pd.testing.assert_frame_equal(_rows(full), _rows(part))


def test_a_run_projects_its_training_time_once_within_its_first_iterations(tmp_path):
    """A run longer than 10 iterations prints one projected training time, after its 10th
    iteration (as the README promises); a resume projects what is left of it; a run of
    10 iterations or fewer prints none."""
    code, folder = run_inprocess(tmp_path / "long", "--niters", "12", "--test_freq", "4", "--no-figures")
    assert code == 0
    log = open(ex.RunDir(folder).log).read().splitlines()
    (k,) = [i for i, ln in enumerate(log) if ln.startswith("projected: training takes about")]
    assert "over iterations 2-10" in log[k] and "for each of its 3 validation rows" in log[k]
    after = [int(ln.split()[1]) for ln in log[k:] if ln.startswith("iter ")]
    assert after == [12]  # the rows of iterations 4 and 8 came before it
    code = cnf.main(["--resume", folder, "--niters", "24"])
    assert code == 0
    log = open(ex.RunDir(folder).log).read()
    assert log.count("projected: training takes about") == 2 and "over iterations 14-22" in log
    code, folder = run_inprocess(tmp_path / "short", "--niters", "10", "--no-figures")
    assert code == 0 and "projected" not in open(ex.RunDir(folder).log).read()


def test_resume_says_when_its_thread_count_changed(tmp_path):
    """A resume keeps its checkpoint's thread count; --threads changes it, and the log then
    says once that this segment will not continue bit for bit."""
    code, folder = run_inprocess(tmp_path, "--no-figures", "--niters", "2", "--threads", "1")
    assert code == 0
    proc = run_subprocess("--resume", folder, "--niters", "3", env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr
    log = open(ex.RunDir(folder).log).read()
    assert "threads 1 (the checkpoint's)" in log and "not continue bit for bit" not in log
    proc = run_subprocess("--resume", folder, "--niters", "4", "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    log = open(ex.RunDir(folder).log).read()
    assert "threads 2 (--threads)" in log and "runtime: 2 thread(s)" in log
    assert log.count("will not continue bit for bit") == 1  # the first segments had nothing to warn about
    assert ex.load_checkpoint(ex.RunDir(folder).ckpt)["config"]["threads"] == 2  # what the run uses now


def test_resume_refuses_a_mismatched_command_line(tmp_path):
    code, folder = run_inprocess(tmp_path, "--no-figures")
    proc = run_subprocess("--resume", folder, "--width", "16", "--niters", "8")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--width 8 in the checkpoint vs 16" in proc.stderr


def test_divergence_is_a_result(tmp_path):
    proc = run_subprocess(*TINY, "--results_dir", str(tmp_path), "--lr", "1e30", "--niters", "40",
                          "--test_freq", "1", "--data", "checkerboard")
    assert proc.returncode == ex.EXIT_DIVERGED, proc.stderr[-500:]
    (folder,) = run_dirs(tmp_path)
    run = ex.RunDir(folder)
    import json

    status = json.load(open(run.status))
    assert status["status"] == "diverged" and "non-finite" in status["exit_reason"]
    ckpt = ex.load_checkpoint(run.ckpt)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())  # the last good parameters
    assert os.path.isfile(run.csv) and os.path.isfile(run.file("optimization_stats.png"))
    assert "diverged" in open(run.log).read()


BAD = [
    ["--data", "nope"], ["--odeint", "scipy"], ["--precision", "float8"], ["--method", "dopri5"],
    ["--trace", "exactish"], ["--niters", "0"], ["--num_samples", "0"], ["--width", "-1"], ["--hidden_dim", "0"],
    ["--num_timesteps", "1"], ["--test_freq", "0"], ["--ckpt_freq", "0"], ["--lr", "-1"], ["--lr", "nan"],
    ["--niters", "abc"], ["--lr", "fast"], ["--adjoint"], ["--resume", "/no/such/run"], ["--device", "tpu"],
    ["--num_samples_val", "1"], ["--threads", "0"], ["--threads", "-2"], ["--threads", "two"],
]


@pytest.mark.parametrize("bad", BAD, ids=lambda b: " ".join(b))
def test_bad_input_one_line_exit_2_no_folder(tmp_path, bad):
    proc = run_subprocess(*TINY, "--results_dir", str(tmp_path / "res"), *bad)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("cnf.py: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "res") or not os.listdir(tmp_path / "res")


@pytest.mark.parametrize("env,flags,threads,how", [("1", [], 1, "OMP_NUM_THREADS"), ("2", ["--threads", "1"], 1, "--threads"),
                                                   (None, [], None, "one per idle core at the start")],
                         ids=["OMP_NUM_THREADS", "--threads", "default"])
def test_threads_are_set_logged_and_recorded(tmp_path, monkeypatch, env, flags, threads, how):
    """Without --threads a run honours OMP_NUM_THREADS; --threads wins over it; with neither it
    takes one thread per core idle at its start (at least one, at most the cores). The log says
    which and args.csv records the count. (In this process: a run reads the variable when it
    chooses, and torch's count is put back afterwards.)"""
    import runtime

    if env:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    else:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        code, folder = run_inprocess(tmp_path, "--no-figures", *flags)
    finally:
        torch.set_num_threads(before)
    assert code == 0
    run = ex.RunDir(folder)
    used = int(ex.read_args(run.file("args.csv"))["threads"])
    assert used == threads if threads else 1 <= used <= runtime.usable_cores()
    log = open(run.log).read()
    assert f"runtime: {used} thread(s)" in log and f"threads {used} ({how}" in log


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_bad_input(tmp_path):
    for flags in (["--device", "cuda"], ["--gpu", "0"]):
        proc = run_subprocess(*TINY, "--results_dir", str(tmp_path / "res"), *flags)
        assert proc.returncode == 2 and "CUDA is not available" in proc.stderr
    assert not os.path.exists(tmp_path / "res")


def test_results_dir_that_is_a_file_or_unwritable(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    for target in (str(f), str(f / "sub")):
        proc = run_subprocess(*TINY, "--results_dir", target)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "folder" in proc.stderr
    ro = next((p for p in ("/proc/sys/kernel", "/sys/kernel") if os.path.isdir(p) and not os.access(p, os.W_OK)), None)
    if ro is None:
        pytest.skip("no read-only folder to test an unwritable --results_dir (running as root)")
    proc = run_subprocess(*TINY, "--results_dir", os.path.join(ro, "cnfkit"))
    assert proc.returncode == 2 and "not writable" in proc.stderr


def test_no_figures_leaves_them_to_plots_py(tmp_path):
    """--no-figures: a completed run draws none of its figures, lists none as missing and says how
    to draw them; plots.py then draws them all from the folder alone (the flow frames from the checkpoint).
    A run that stops early (diverged) draws none either, and a resume given --figures draws them."""
    import json

    figures = ("optimization_stats.png", "mmd_plot.png", "cnf-viz-000.jpg", "cnf-viz-002.jpg", "cnf-viz.gif")
    code, folder = run_inprocess(tmp_path / "a", "--no-figures")
    assert code == 0
    run = ex.RunDir(folder)
    assert not [f for f in figures if os.path.exists(run.file(f))]
    status = json.load(open(run.status))
    assert (status["status"], status["exit_reason"], status["missing_figures"]) == ("completed", "trained 4 iterations",
                                                                                      [])
    assert open(run.log).read().splitlines()[-1] == ("completed: trained 4 iterations; no figures (--no-figures): draw "
                                                     f"them with: python plots.py {folder}")
    assert ex.read_args(run.file("args.csv"))["figures"] == "False"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "plots.py"), folder], capture_output=True, text=True,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert all(os.path.getsize(run.file(f)) > 1000 for f in figures)
    code, folder = run_inprocess(tmp_path / "b", "--no-figures", "--lr", "1e30", "--test_freq", "1", "--niters", "40",
                                 "--data", "checkerboard")
    assert code == ex.EXIT_DIVERGED and not glob.glob(os.path.join(folder, "*.png"))
    code, folder = run_inprocess(tmp_path / "c", "--no-figures", "--no-viz", "--niters", "2")
    assert cnf.main(["--resume", folder, "--niters", "4", "--figures"]) == 0
    assert os.path.isfile(ex.RunDir(folder).file("optimization_stats.png"))


def test_the_run_folder_keeps_the_code_that_ran(tmp_path):
    """The run folder's top holds cnf.py, byte for byte the kit's (as the run folder's
    specification says), and code/ byte copies of the other kit modules the run loaded, the
    solver package included, and none of the tests or tools; no temporary file is left."""
    proc = run_subprocess(*TINY, "--no-figures", "--niters", "5", "--results_dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (folder,) = run_dirs(tmp_path)
    assert open(os.path.join(folder, "cnf.py"), "rb").read() == open(os.path.join(ROOT, "cnf.py"), "rb").read()
    base = os.path.join(folder, "code")
    kept = sorted(os.path.relpath(os.path.join(d, f), base) for d, _, fs in os.walk(base) for f in fs)
    for rel in ("trainer.py", "model.py", "hyper_trace.py", "metrics.py", "experiment.py", "schedule.py", "choices.py",
                "toy_data.py", "plots.py", "density.py", os.path.join("torchmpnode", "_solver.py"),
                os.path.join("torchmpnode", "__init__.py")):
        assert rel in kept
    assert "cnf.py" not in kept  # at the top instead
    assert not [r for r in kept if "test" in r or r.startswith(("..", "tools"))]
    for rel in kept:
        assert open(os.path.join(base, rel), "rb").read() == open(os.path.join(ROOT, rel), "rb").read(), rel
    assert not [f for _, _, fs in os.walk(folder) for f in fs if ".tmp" in f]


def test_the_code_snapshot_leaves_out_a_virtual_environment_in_the_kit_folder(tmp_path, monkeypatch):
    """A virtual environment inside the kit's folder, whatever its name (`python -m venv venv` in the
    clone), holds none of the kit: the packages it loaded stay out of code/. The kit's own modules and
    every file of a kit package it loaded are kept; tests are not."""
    import types

    kit = tmp_path / "kit"
    files = ["mymod.py", "pkg/__init__.py", "pkg/part.py", "venv/lib/python3.11/site-packages/lib3/__init__.py",
             "venv/lib/python3.11/site-packages/lib3/core.py", "env/lib/python3/dist-packages/lib4.py",
             "tests/helper.py", "test_top.py"]
    for rel in files:
        (kit / rel).parent.mkdir(parents=True, exist_ok=True)
        (kit / rel).write_text(f"# {rel}\n")
    monkeypatch.setattr(ex, "KIT_DIR", str(kit))
    for i, rel in enumerate(["mymod.py", "pkg/__init__.py", files[3], files[5], "tests/helper.py", "test_top.py"]):
        monkeypatch.setitem(sys.modules, f"_kit_snapshot_{i}", types.SimpleNamespace(__file__=str(kit / rel)))
    kept = ex.kit_sources()
    assert sorted(kept) == sorted(os.path.join(*r.split("/")) for r in files[:3]), sorted(kept)
    assert kept[os.path.join("pkg", "part.py")] == b"# pkg/part.py\n"


def test_compare_runs_figure_and_its_bad_input(tmp_path):
    """plots.py --compare draws several runs' validation curves from their folders and prints the
    figure's path; runs of different datasets, a wrong number of labels, a folder that is no run and
    an output that is a folder (`--compare RUN_A RUN_B`, the output file forgotten) exit 2 with one
    line, leaving nothing behind."""
    a = run_inprocess(tmp_path / "a", "--no-figures", "--data", "checkerboard")[1]
    b = run_inprocess(tmp_path / "b", "--no-figures", "--data", "checkerboard", "--kinetic", "0.1")[1]
    c = run_inprocess(tmp_path / "c", "--no-figures", "--data", "moons")[1]
    plots = os.path.join(ROOT, "plots.py")

    def run(*argv):
        return subprocess.run([sys.executable, plots, *argv], capture_output=True, text=True, cwd=str(tmp_path))

    before = {d: sorted(os.listdir(d)) for d in (a, b, tmp_path)}
    for argv in (("--compare", a, b), ("--compare", str(tmp_path), a, b)):
        proc = run(*argv)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "is a folder, not the output file" in proc.stderr and "--compare OUT.png RUN_DIR" in proc.stderr
        assert {d: sorted(os.listdir(d)) for d in (a, b, tmp_path)} == before
    out = str(tmp_path / "cmp.png")
    proc = run(a, b, "--compare", out, "--labels", "plain,kinetic")
    assert proc.returncode == 0 and proc.stdout.strip() == f"wrote {out}", proc.stderr
    assert os.path.getsize(out) > 20000 and sorted(os.listdir(tmp_path)) == ["a", "b", "c", "cmp.png"]
    for argv, msg in (((a, c, "--compare", out), "different datasets"),
                      ((a, b, "--compare", out, "--labels", "one"), "1 labels for 2 runs"),
                      ((a, str(tmp_path), "--compare", out), "is not a run folder")):
        proc = run(*argv)
        assert proc.returncode == 2 and msg in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_compare_default_labels_name_what_differs():
    """Without --labels, --compare labels each run by the settings in which the runs differ
    (where and how a run executed is no difference); runs that differ in nothing, or in more
    settings than a legend holds, keep their folder names or a shortened list."""
    import plots

    base = {"data": "checkerboard", "lr": "0.01", "lr_schedule": "step", "threads": "1", "results_dir": "r"}
    cos = dict(base, lr_schedule="cosine", threads="2", results_dir="s", resumed_at_iter="166")
    assert plots.default_labels([base, cos], ["a", "b"]) == ["lr_schedule=step", "lr_schedule=cosine"]
    assert plots.default_labels([base, dict(base, threads="4")], ["a", "b"]) == ["a", "b"]
    assert plots.default_labels([base], ["a"]) == ["a"]
    extra = dict(base, kinetic="0.1")  # a setting the other run's args.csv lacks
    assert plots.default_labels([base, extra], ["a", "b"]) == ["kinetic=-", "kinetic=0.1"]
    many = dict(base, data="moons", lr="1", lr_schedule="cosine", kinetic="1", jacobian="1")
    assert plots.default_labels([base, many], ["a", "b"], most=2) == [
        "data=checkerboard, lr=0.01, ...", "data=moons, lr=1, ..."]


@pytest.mark.parametrize("odeint,event", [("torchdiffeq", "GradScaler scale 65536 -> 32768 (step skipped"),
                                          ("torchmpnode", "DynamicScaler retried")])
def test_scaler_events_are_logged(tmp_path, odeint, event):
    """A large learning rate makes float16 overflow: GradScaler halves its scale and skips
    the step, DynamicScaler retries solver steps; both say so in the log and the CSV."""
    code, folder = run_inprocess(tmp_path, "--odeint", odeint, "--precision", "float16", "--lr", "1",
                                 "--niters", "12", "--test_freq", "4", "--num_samples", "64", "--width", "16",
                                 "--num_timesteps", "8", "--no-figures")
    assert code == 0
    run = ex.RunDir(folder)
    assert event in open(run.log).read()
    df = pd.read_csv(run.csv)
    if odeint == "torchdiffeq":
        assert df["loss_scale"].iloc[-1] < 65536
    else:
        assert df["overflow_steps"].iloc[-1] > 0


def test_test_set_is_its_own_stream_and_shared_by_a_seed(tmp_path):
    """The test set comes from its own seed stream: it is not the validation set,
    it does not depend on the precision, and changing its size leaves training alone."""
    streams = toy_data.seed_streams(0)
    val = toy_data.inf_train_gen("8gaussians", 256, streams["val"])
    test = toy_data.inf_train_gen("8gaussians", 256, streams["test"])
    train = toy_data.inf_train_gen("8gaussians", 256, streams["train"])
    assert not np.isin(test, val).any() and not np.isin(test, train).any()
    code, a = run_inprocess(tmp_path / "a", "--no-figures", "--num_samples_test", "300")
    code2, b = run_inprocess(tmp_path / "b", "--no-figures", "--num_samples_test", "600")
    assert code == code2 == 0
    pd.testing.assert_frame_equal(_rows(a).drop(columns=list(ex.FINAL_COLUMNS)),
                                  _rows(b).drop(columns=list(ex.FINAL_COLUMNS)))
    # the saved log-densities are the final model's, on the test stream's points
    state = ex.load_checkpoint(ex.RunDir(a).ckpt)
    c = state["config"]
    model = CNF(2, c["hidden_dim"], c["width"], c["trace"])
    model.load_state_dict(state["model"])
    x = torch.from_numpy(toy_data.inf_train_gen(c["data"], 300, toy_data.seed_streams(c["seed"])["test"]))
    with torch.no_grad():
        logp = log_prob(model, x, Integrator(c["odeint"], c["method"], c["num_timesteps"], loss_scaler=False))
    np.testing.assert_allclose(np.load(ex.RunDir(a).test_logp), logp.numpy(), atol=1e-5)


def test_default_test_set_size_gives_a_small_standard_error(tmp_path):
    """The default --num_samples_test (20000) is what makes the final NLL quotable."""
    assert cnf.build_parser().parse_args([]).num_samples_test == 20000
    code, folder = run_inprocess(tmp_path, "--no-figures", "--num_samples_test", "20000")
    assert code == 0
    import json

    final = json.load(open(ex.RunDir(folder).status))["final"]
    # untrained, the NLL spreads more than a trained model's; still well under 0.05 nats
    assert final["test_loss_se"] < 0.05 and final["val_loss_se"] > 4 * final["test_loss_se"]


def test_a_renamed_run_folder_keeps_its_history(tmp_path):
    """Files named after the folder (the CSV, the log) are found after the folder is renamed:
    a resume continues them instead of starting new ones without the history."""
    code, folder = run_inprocess(tmp_path, "--niters", "4", "--no-figures")
    assert code == 0
    moved = str(tmp_path / "renamed_by_hand")
    os.rename(folder, moved)
    run = ex.RunDir(moved)
    assert os.path.basename(run.csv) == os.path.basename(folder) + ".csv"
    before = pd.read_csv(run.csv)
    assert cnf.main(["--resume", moved, "--niters", "8"]) == 0
    assert sorted(f for f in os.listdir(moved) if f.endswith((".csv", ".txt"))) == sorted(
        [os.path.basename(folder) + ".csv", os.path.basename(folder) + ".txt", "args.csv"])
    after = pd.read_csv(run.csv)
    assert list(after["iter"]) == [2, 4, 6, 8] and list(before["iter"]) == [2, 4]
    assert "# resumed renamed_by_hand at iteration 4" in open(run.log).read()


def test_a_resume_keeps_the_code_its_run_started_with(tmp_path):
    """code/ and cnf.py record the code a run started with: a resume leaves them as they are
    (here marked by hand), and writes only what is missing."""
    code, folder = run_inprocess(tmp_path, "--no-figures", "--niters", "2")
    assert code == 0
    model = os.path.join(folder, "code", "model.py")
    with open(model, "a") as f:
        f.write("# the first segment's\n")
    os.remove(os.path.join(folder, "cnf.py"))
    assert cnf.main(["--resume", folder, "--niters", "4"]) == 0
    assert open(model).read().endswith("# the first segment's\n")
    assert open(os.path.join(folder, "cnf.py"), "rb").read() == open(os.path.join(ROOT, "cnf.py"), "rb").read()
    assert "cnf.py or code/ was missing" in open(ex.RunDir(folder).log).read()
