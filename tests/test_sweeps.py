"""run_cnf.sh, job_cnf.sbatch and summarize.py: locally and against a real SLURM."""
import glob
import json
import os
import re
import shutil
import subprocess

import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--niters", "4", "--test_freq", "2", "--num_samples", "32", "--num_samples_val", "32",
        "--num_timesteps", "4", "--width", "8", "--hidden_dim", "8", "--viz_samples", "200", "--viz_timesteps", "3"]


# Seconds a sweep or job may take. Tiny cells take seconds on an idle machine; on a
# busy shared one, minutes. A slow machine is not a bug, so these are generous.
TIMEOUT = 1800


def sweep(*args, timeout=TIMEOUT):
    return subprocess.run(["bash", os.path.join(ROOT, "run_cnf.sh"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def sweep_dir(results):
    (d,) = glob.glob(os.path.join(results, "sweep_*"))
    return d


def statuses(d):
    out = {}
    for name in sorted(os.listdir(os.path.join(d, "runs"))):
        st = os.path.join(d, "runs", name, "status.json")
        out[name] = json.load(open(st))["status"] if os.path.isfile(st) else None
    return out


def summarize(d):
    proc = subprocess.run(["python", os.path.join(ROOT, "summarize.py"), d], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for f in ("summary.csv", "summary.md", "summary.png"):
        assert os.path.getsize(os.path.join(d, f)) > 0
    return pd.read_csv(os.path.join(d, "summary.csv")), proc


def test_dry_run_lists_the_published_grid():
    proc = sweep("--dry-run")
    assert proc.returncode == 0
    # per dataset: torchdiffeq 3 + fp16 {none, grad}; torchmpnode 3 + fp16 {none, grad, dynamic}
    assert proc.stdout.strip().endswith("88 cells (slurm)") or proc.stdout.strip().endswith("88 cells (local)")
    assert "--no_dynamic_scaler --grad_scaler" in proc.stdout
    # without sbatch on the PATH the launcher falls back to local mode by itself
    nosb = subprocess.run(["/bin/bash", os.path.join(ROOT, "run_cnf.sh"), "--dry-run"], capture_output=True,
                          text=True, env={"PATH": "/nonexistent"})
    assert nosb.returncode == 0 and nosb.stdout.strip().endswith("88 cells (local)")
    narrow = sweep("--dry-run", "--datasets", "moons", "--precisions", "float16", "--", "--niters", "5")
    cells = [l for l in narrow.stdout.splitlines() if "--data moons" in l]
    assert len(cells) == 5 and all(l.rstrip().endswith("--niters 5") for l in cells)


@pytest.mark.parametrize("bad", [["--datasets", "nope"], ["--precisions", "float8"], ["--frobnicate"], ["-j", "0"]])
def test_bad_options(bad):
    proc = sweep(*bad, "--dry-run")
    assert proc.returncode == 2 and "run_cnf.sh: error" in proc.stderr


def test_local_sweep_and_summary(tmp_path):
    proc = sweep("--local", "-j", "2", "--datasets", "8gaussians", "--solvers", "torchmpnode",
                 "--precisions", "float32,bfloat16", "--results-dir", str(tmp_path), "--", *TINY)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = sweep_dir(tmp_path)
    assert statuses(d) == {"8gaussians_bfloat16_torchmpnode_none": "completed",
                           "8gaussians_float32_torchmpnode_none": "completed"}
    os.makedirs(os.path.join(d, "not_a_run"))
    table, out = summarize(d)
    assert len(table) == 2 and set(table["status"]) == {"completed"}
    assert "skipping" in out.stderr and "not_a_run" in out.stderr
    assert "### 8gaussians" in open(os.path.join(d, "summary.md")).read()


def _break(d, names):
    """Make cells unfinished: one interrupted, one with no status at all."""
    interrupted, missing = names
    st = os.path.join(d, "runs", interrupted, "status.json")
    data = json.load(open(st))
    data["status"] = "interrupted"
    json.dump(data, open(st, "w"))
    os.remove(os.path.join(d, "runs", missing, "status.json"))


def test_local_sweep_resume_reruns_exactly_the_unfinished_cells(tmp_path):
    proc = sweep("--local", "-j", "2", "--datasets", "moons", "--solvers", "torchmpnode", "--precisions",
                 "float32,float16", "--results-dir", str(tmp_path), "--", *TINY, "--no-viz")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = sweep_dir(tmp_path)
    names = sorted(statuses(d))
    assert len(names) == 4
    _break(d, (names[1], names[3]))
    table, _ = summarize(d)  # unfinished runs are listed, not dropped
    assert len(table) == 4 and "interrupted" in set(table["status"])
    assert any(s.startswith("unknown") for s in table["status"])
    proc = sweep("--local", "--resume", d)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cells = {l.split("\t")[1]: l.split("\t")[0] for l in open(os.path.join(d, "cells.tsv")).read().splitlines()}
    expect = sorted(int(cells[names[i]]) for i in (1, 3))
    assert re.search(rf"2 of 4 cells not completed: {expect[0]} {expect[1]}", proc.stdout), proc.stdout
    assert set(statuses(d).values()) == {"completed"}
    assert len(os.listdir(os.path.join(d, "runs"))) == 4  # same folders, none added


def _require_slurm():
    if shutil.which("sbatch") is None:
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail("REQUIRE_SLURM=1 but sbatch is not on the PATH (did .ci/slurm-local.sh up run?)")
        pytest.skip("no sbatch on the PATH (start one with: bash .ci/slurm-local.sh up)")


SLURM_OPTS = ["--wait", "--gpus", "0", "--cpus", "1", "--mem", "1G", "--time", "00:10:00"]


@pytest.mark.slurm
def test_real_slurm_sweep_summary_and_resume(tmp_path):
    _require_slurm()
    proc = sweep(*SLURM_OPTS, "--datasets", "8gaussians,moons", "--solvers", "torchmpnode",
                 "--precisions", "float32,float16", "--results-dir", str(tmp_path), "--", *TINY)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"submitted array job \d+ \(8 tasks\)", proc.stdout)
    d = sweep_dir(tmp_path)
    assert set(statuses(d).values()) == {"completed"} and len(statuses(d)) == 8
    logs = glob.glob(os.path.join(d, "slurm", "*_*.out"))
    assert len(logs) == 8 and all("cnf.py exit code: 0" in open(f).read() for f in logs)
    for run in glob.glob(os.path.join(d, "runs", "*")):
        name = os.path.basename(run)
        for f in (f"{name}.csv", f"{name}.txt", "args.csv", "ckpt.pth", "cnf.py", "cnf-viz.gif",
                  "optimization_stats.png", "mmd_plot.png"):
            assert os.path.isfile(os.path.join(run, f)), (run, f)
    table, _ = summarize(d)
    assert len(table) == 8 and set(table["scaler"]) == {"none", "grad", "dynamic"}
    # resubmit exactly the unfinished cells through SLURM
    names = sorted(statuses(d))
    _break(d, (names[0], names[5]))
    proc = sweep(*SLURM_OPTS, "--resume", d)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 of 8 cells not completed" in proc.stdout and re.search(r"\(2 tasks\)", proc.stdout)
    assert set(statuses(d).values()) == {"completed"}


@pytest.mark.slurm
def test_real_slurm_failing_task_fails_the_array(tmp_path):
    _require_slurm()
    proc = sweep(*SLURM_OPTS, "--datasets", "moons", "--solvers", "torchmpnode", "--precisions", "float32",
                 "--results-dir", str(tmp_path), "--", *TINY, "--lr", "1e30", "--test_freq", "1")
    assert proc.returncode == 3, proc.stdout + proc.stderr  # the diverged task's exit code reaches sbatch --wait
    d = sweep_dir(tmp_path)
    assert statuses(d) == {"moons_float32_torchmpnode_none": "diverged"}


def test_job_script_forwards_warning_signal_requeues_and_resumes(tmp_path):
    """SLURM's --signal=B:USR1 reaches the batch shell; it must pass it on to cnf.py
    (which checkpoints and exits 4), requeue its own array task, and the requeued
    task must continue in the same run folder."""
    import signal
    import time

    sw = tmp_path / "sweep"
    (sw / "runs").mkdir(parents=True)
    args = " ".join(TINY[:-4] + ["--no-viz", "--niters", "400", "--test_freq", "5", "--ckpt_freq", "1000"])
    (sw / "cells.tsv").write_text(f"0\tmoons_cell\t--data moons {args}\n")
    (sw / "env_setup.sh").write_text("")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.calls\n")
    (bindir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "0",
           "SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": "70", "KIT_DIR": ROOT}
    job = subprocess.Popen(["bash", os.path.join(ROOT, "job_cnf.sbatch"), str(sw)], env=env, cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    csv = sw / "runs" / "moons_cell" / "moons_cell.csv"
    t0 = time.time()
    while not (csv.exists() and len(csv.read_text().splitlines()) > 2):
        assert job.poll() is None and time.time() - t0 < TIMEOUT, job.communicate()[0][-2000:]
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=TIMEOUT)
    assert job.returncode == 4, out[-2000:]
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "70_0"]
    status = json.load(open(sw / "runs" / "moons_cell" / "status.json"))
    assert status["status"] == "interrupted" and "SIGUSR1" in status["exit_reason"]
    again = subprocess.run(["bash", os.path.join(ROOT, "job_cnf.sbatch"), str(sw)], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=TIMEOUT)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "resumed moons_cell at iteration" in again.stdout
    assert json.load(open(sw / "runs" / "moons_cell" / "status.json"))["status"] == "completed"
    assert os.listdir(sw / "runs") == ["moons_cell"]
