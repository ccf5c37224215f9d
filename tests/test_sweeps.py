"""run_cnf.sh, job_cnf.sbatch and summarize.py: locally and against a real SLURM."""
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest

import experiment as ex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--niters", "4", "--test_freq", "2", "--num_samples", "32", "--num_samples_val", "32",
        "--num_samples_test", "256", "--num_timesteps", "4", "--width", "8", "--hidden_dim", "8", "--viz_samples", "200", "--viz_timesteps", "3"]


# Seconds a sweep or job may take. Tiny cells take seconds on an idle machine; on a
# busy shared one, minutes. A slow machine is not a bug, so these are generous.
TIMEOUT = 600  # a tiny sweep: under a minute on a fast 2-core machine, a few on a slow one


def with_python(env=None):
    """``env`` (default: this process's) with CNF_PYTHON set to the interpreter running the
    tests, so the job scripts run cnf.py with it whether or not a venv is activated."""
    return {**(os.environ if env is None else env), "CNF_PYTHON": sys.executable}


def sweep(*args, timeout=TIMEOUT, env=None):
    return subprocess.run(["bash", os.path.join(ROOT, "run_cnf.sh"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=with_python(env))


def sweep_dir(results):
    (d,) = glob.glob(os.path.join(results, "sweep_*"))
    return d


def statuses(d):
    out = {}
    for name in sorted(os.listdir(os.path.join(d, "runs"))):
        st = os.path.join(d, "runs", name, "status.json")
        out[name] = json.load(open(st))["status"] if os.path.isfile(st) else None
    return out


def summarize(d, figures=False):
    """summarize.py on ``d``; the tables only unless ``figures`` (the tests of the statistics need no figure)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "summarize.py"), d, *([] if figures else ["--no-figures"])],
                          capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    drawn = ("summary.png", "answer.png", "overview.png") if figures else ()
    for f in ("summary.csv", "summary_runs.csv", "summary.md", *drawn):
        assert os.path.getsize(os.path.join(d, f)) > 0
    return pd.read_csv(os.path.join(d, "summary.csv")), proc


def test_dry_run_lists_the_published_grid():
    # a GPU machine (one named by CUDA_VISIBLE_DEVICES; SLURM nodes have theirs): the whole grid
    proc = sweep("--dry-run", env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    assert proc.returncode == 0
    # per dataset: torchdiffeq 3 + fp16 {none, grad}; torchmpnode 3 + fp16 {none, grad, dynamic}; x 3 seeds
    assert proc.stdout.strip().endswith("264 cells (slurm)") or proc.stdout.strip().endswith("264 cells (local)")
    assert "--no_dynamic_scaler --grad_scaler" in proc.stdout
    for r in (0, 1, 2):
        assert f"8gaussians_float16_torchmpnode_dynamic_s{r}\t--data 8gaussians" in proc.stdout
        assert re.search(rf"_s{r}\t.*--seed {r}( |$)", proc.stdout, re.M)
    # without sbatch on the PATH the launcher falls back to local mode by itself (here: no GPU
    # either, so the tfloat32 cells, float32 on a CPU, are left out)
    nosb = subprocess.run(["/bin/bash", os.path.join(ROOT, "run_cnf.sh"), "--dry-run"], capture_output=True,
                          text=True, env={"PATH": "/nonexistent", "CNF_PYTHON": sys.executable})
    assert nosb.returncode == 0 and nosb.stdout.strip().endswith("216 cells (local)"), nosb.stderr
    narrow = sweep("--dry-run", "--datasets", "moons", "--precisions", "float16", "--", "--niters", "5")
    cells = [l for l in narrow.stdout.splitlines() if "--data moons" in l]
    assert len(cells) == 15 and all(l.rstrip().endswith("--niters 5") for l in cells)
    seeds = sweep("--dry-run", "--datasets", "moons", "--precisions", "float32", "--seeds", "4,7")
    cells = [l for l in seeds.stdout.splitlines() if "--data moons" in l]
    assert len(cells) == 4 and seeds.stdout.strip().splitlines()[-1] in ("4 cells (slurm)", "4 cells (local)")
    assert sorted(re.findall(r"_s(\d+)\t.*--seed (\d+)", seeds.stdout)) == [("4", "4")] * 2 + [("7", "7")] * 2


def test_the_paper_study_lists_exactly_its_grid():
    """--study paper: the published study's 3 datasets x 2 solvers x {float32, tfloat32 (CUDA),
    bfloat16, float16 with its solver's scaler, float16 unscaled} x 3 seeds, each cell with the
    published recipe written out; on a CPU without tfloat32; options after it narrow it; an
    unknown study is one line."""
    recipe = ("--method rk4 --num_timesteps 128 --niters 2000 --num_samples 1024 --lr 1e-2 --lr_schedule step "
              "--lr_step 1000 --lr_gamma 0.1")
    scaled = {"torchdiffeq": ("grad", ""), "torchmpnode": ("dynamic", "")}
    unscaled = {"torchdiffeq": "--no_grad_scaler", "torchmpnode": "--no_dynamic_scaler"}
    expected = {}
    for d in ("2spirals", "8gaussians", "checkerboard"):
        for s in ("torchdiffeq", "torchmpnode"):
            for p, v, flags in (("float32", "none", ""), ("tfloat32", "none", ""), ("bfloat16", "none", ""),
                                ("float16", *scaled[s]), ("float16", "none", unscaled[s])):
                for r in (0, 1, 2):
                    args = f"--data {d} --odeint {s} --precision {p} {flags} {recipe} --seed {r}"
                    expected[f"{d}_{p}_{s}_{v}_s{r}"] = " ".join(args.split())
    proc = sweep("--study", "paper", "--dry-run", env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    assert proc.returncode == 0, proc.stderr
    listed = dict(re.findall(r"^ *\d+  (\S+)\t(.*)$", proc.stdout, re.M))
    assert listed == expected and re.search(r"^90 cells \((slurm|local)\)$", proc.stdout, re.M)
    cpu = subprocess.run(["/bin/bash", os.path.join(ROOT, "run_cnf.sh"), "--study", "paper", "--dry-run"],
                         capture_output=True, text=True, env={"PATH": "/nonexistent", "CNF_PYTHON": sys.executable})
    cells = dict(re.findall(r"^ *\d+  (\S+)\t(.*)$", cpu.stdout, re.M))
    assert cells == {k: v for k, v in expected.items() if "_tfloat32_" not in k} and "72 cells (local)" in cpu.stdout
    narrow = sweep("--study", "paper", "--datasets", "2spirals", "--seeds", "0", "--dry-run",
                   env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    assert "10 cells" in narrow.stdout and "--data 8gaussians" not in narrow.stdout
    bad = sweep("--study", "nope", "--dry-run")
    assert bad.returncode == 2 and bad.stderr.strip() == "run_cnf.sh: error: unknown study 'nope' (choose from: paper, cpu)"


def test_the_cpu_study_lists_exactly_its_grid():
    """--study cpu: the paper study's grid and seeds at the measured CPU recipe (32 points, batch
    256, cosine 1e-2, both penalties 1e-3, one thread) with each dataset's iterations; on a CPU
    without tfloat32."""
    recipe = ("--method rk4 --num_timesteps 32 --num_samples 256 --lr 1e-2 --lr_schedule cosine "
              "--kinetic 0.001 --jacobian 0.001 --threads 1")
    niters = {"2spirals": 3000, "8gaussians": 1500, "checkerboard": 10000}
    scaled = {"torchdiffeq": ("grad", ""), "torchmpnode": ("dynamic", "")}
    unscaled = {"torchdiffeq": "--no_grad_scaler", "torchmpnode": "--no_dynamic_scaler"}
    expected = {}
    for d in ("2spirals", "8gaussians", "checkerboard"):
        for s in ("torchdiffeq", "torchmpnode"):
            for p, v, flags in (("float32", "none", ""), ("bfloat16", "none", ""),
                                ("float16", *scaled[s]), ("float16", "none", unscaled[s])):
                for r in (0, 1, 2):
                    args = f"--data {d} --odeint {s} --precision {p} {flags} --niters {niters[d]} {recipe} --seed {r}"
                    expected[f"{d}_{p}_{s}_{v}_s{r}"] = " ".join(args.split())
    cpu = subprocess.run(["/bin/bash", os.path.join(ROOT, "run_cnf.sh"), "--study", "cpu", "--dry-run"],
                         capture_output=True, text=True, env={"PATH": "/nonexistent", "CNF_PYTHON": sys.executable})
    assert cpu.returncode == 0, cpu.stderr
    cells = dict(re.findall(r"^ *\d+  (\S+)\t(.*)$", cpu.stdout, re.M))
    assert cells == expected and "72 cells (local)" in cpu.stdout


@pytest.mark.parametrize("bad", [["--datasets", "nope"], ["--precisions", "float8"], ["--frobnicate"], ["-j", "0"],
                                 ["--seeds", "0,x"], ["--seeds", "1,1"], ["--seeds", "-1"],
                                 ["--local", "--per-gpu", "0"],
                                 ["--", "--seed", "3"]])
def test_bad_options(bad):
    proc = sweep(*bad, "--dry-run")
    assert proc.returncode == 2 and "run_cnf.sh: error" in proc.stderr


def test_local_sweep_and_summary_statistics(tmp_path):
    """Three seeds, two precisions: mean ± sd over seeds, and a paired t interval against float32."""
    proc = sweep("--local", "-j", "2", "--datasets", "8gaussians", "--solvers", "torchmpnode",
                 "--precisions", "float32,bfloat16", "--results-dir", str(tmp_path), "--", *TINY, "--no-figures")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = sweep_dir(tmp_path)
    assert statuses(d) == {f"8gaussians_{p}_torchmpnode_none_s{r}": "completed"
                           for p in ("bfloat16", "float32") for r in (0, 1, 2)}
    os.makedirs(os.path.join(d, "not_a_run"))
    table, out = summarize(d, figures=True)
    assert "skipping" in out.stderr and "not_a_run" in out.stderr
    runs = pd.read_csv(os.path.join(d, "summary_runs.csv"))
    assert len(runs) == 6 and sorted(runs["seed"]) == [0, 0, 1, 1, 2, 2]
    assert len(table) == 2 and list(table["n"]) == [3, 3] and set(table["status"]) == {"3 completed"}
    for _, c in table.iterrows():
        mine = runs[runs["precision"] == c["precision"]]
        assert c["test_nll_mean"] == pytest.approx(mine["test_nll"].mean(), rel=1e-9)
        assert c["test_nll_sd"] == pytest.approx(mine["test_nll"].std(ddof=1), rel=1e-9)
        assert c["disc_gap_mean"] == pytest.approx(mine["disc_gap"].mean(), rel=1e-9)
    bf, f32 = (table[table["precision"] == p].iloc[0] for p in ("bfloat16", "float32"))
    assert f32["pairs"] == 0 and pd.isna(f32["diff_ci_low"])  # the reference itself
    diffs = (runs[runs["precision"] == "bfloat16"].set_index("seed")["test_nll"]
             - runs[runs["precision"] == "float32"].set_index("seed")["test_nll"])
    import scipy.stats  # the reference quantile, from scipy's distribution (summarize.py calls stdtrit)

    half = scipy.stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3)
    assert bf["pairs"] == 3 and bf["diff_mean"] == pytest.approx(diffs.mean(), abs=1e-12)
    assert (bf["diff_ci_low"], bf["diff_ci_high"]) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    assert bf["ci_contains_0"] == ("yes" if bf["diff_ci_low"] <= 0 <= bf["diff_ci_high"] else "no")
    # the runs of a seed share the test set, so the mean per-point difference is the difference of the means
    assert bf["point_diff_seeds"] == 3 and bf["point_diff_mean"] == pytest.approx(diffs.mean(), abs=1e-5)
    assert 0 < bf["point_diff_se"]
    md = open(os.path.join(d, "summary.md")).read()
    assert "### 8gaussians" in md and "| torchmpnode | bfloat16 | none | 3 | 3 completed |" in md
    assert f"[{bf['diff_ci_low']:+.4f}, {bf['diff_ci_high']:+.4f}]" in md
    assert f"{f32['test_nll_mean']:.4f} ± {f32['test_nll_sd']:.4f}" in md

    # a diverged seed is counted and shown, and drops out of the statistics and the pairs
    st = os.path.join(d, "runs", "8gaussians_bfloat16_torchmpnode_none_s1", "status.json")
    data = json.load(open(st))
    data["status"] = "diverged"
    json.dump(data, open(st, "w"))
    table, _ = summarize(d)
    bf = table[table["precision"] == "bfloat16"].iloc[0]
    assert (bf["runs"], bf["n"], bf["diverged"], bf["pairs"]) == (3, 2, 1, 2)
    assert bf["status"] in ("2 completed, 1 diverged", "1 diverged, 2 completed")
    assert bf["diff_mean"] == pytest.approx(diffs.drop(1).mean(), abs=1e-12)
    assert "diverged" in open(os.path.join(d, "summary.md")).read()

    # a second run of a (cell, seed), e.g. from a rerun into the same folder, is not another sample:
    # the newest completed one is used, the other is listed as ignored, with a warning
    src = os.path.join(d, "runs", "8gaussians_float32_torchmpnode_none_s0")
    dup = os.path.join(d, "runs", "8gaussians_float32_torchmpnode_none_s0_again")
    shutil.copytree(src, dup)
    csv = pd.read_csv(ex.RunDir(src).csv)  # the CSV is named after its folder
    csv.loc[csv.index[-1], "test_loss"] += 1.0
    csv.to_csv(ex.RunDir(dup).csv, index=False)
    old = os.path.getmtime(os.path.join(src, "status.json"))
    os.utime(os.path.join(dup, "status.json"), (old - 100, old - 100))  # the copy is older: ignored
    table, out = summarize(d)
    f32 = table[table["precision"] == "float32"].iloc[0]
    assert (f32["runs"], f32["n"]) == (3, 3) and "ignoring" in out.stderr and "_s0_again" in out.stderr
    assert f32["test_nll_mean"] == pytest.approx(runs[runs["precision"] == "float32"]["test_nll"].mean(), rel=1e-9)
    used = pd.read_csv(os.path.join(d, "summary_runs.csv")).set_index("run")["used"]
    assert [r for r, u in used.items() if not u] == [r for r in used.index if r.endswith("_s0_again")]
    assert "*ignored*" in open(os.path.join(d, "summary.md")).read()
    os.utime(os.path.join(dup, "status.json"), (old + 100, old + 100))  # now the copy is the newest: used
    table, _ = summarize(d)
    f32 = table[table["precision"] == "float32"].iloc[0]
    assert f32["n"] == 3 and f32["test_nll_mean"] == pytest.approx(
        runs[runs["precision"] == "float32"]["test_nll"].mean() + 1.0 / 3, rel=1e-9)


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
                 "float32,float16", "--seeds", "0", "--results-dir", str(tmp_path), "--", *TINY, "--no-figures")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = sweep_dir(tmp_path)
    names = sorted(statuses(d))
    assert len(names) == 4 and all(n.endswith("_s0") for n in names)
    first_logs = {f: open(f).read() for f in glob.glob(os.path.join(d, "slurm", "local_*.out"))}
    _break(d, (names[1], names[3]))
    table, _ = summarize(d)  # unfinished runs are listed, not dropped
    runs = pd.read_csv(os.path.join(d, "summary_runs.csv"))
    assert len(runs) == 4 and "interrupted" in set(runs["status"])
    assert any(s.startswith("unknown") for s in runs["status"])
    assert {"1 interrupted", "1 unknown"} <= set(table["status"])
    proc = sweep("--local", "--resume", d)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cells = {l.split("\t")[1]: l.split("\t")[0] for l in open(os.path.join(d, "cells.tsv")).read().splitlines()}
    expect = sorted(int(cells[names[i]]) for i in (1, 3))
    assert re.search(rf"2 of 4 cells not finished: {expect[0]} {expect[1]}", proc.stdout), proc.stdout
    assert set(statuses(d).values()) == {"completed"}
    assert len(os.listdir(os.path.join(d, "runs"))) == 4  # same folders, none added
    for f, first in first_logs.items():  # a rerun cell's log keeps its first attempt
        assert open(f).read().startswith(first)
    # one seed: n = 1 and no interval rather than a fake one
    table, _ = summarize(d)
    fp16 = table[table["precision"] == "float16"]
    assert len(fp16) == 3 and set(fp16["n"]) == {1} and set(fp16["pairs"]) == {1}
    assert fp16["diff_ci_low"].isna().all() and fp16["test_nll_sd"].isna().all()
    assert fp16["ci_contains_0"].isna().all()  # empty cells
    md = open(os.path.join(d, "summary.md")).read()
    row = r"\| torchmpnode \| float16 \| dynamic \| 1 \| "
    assert re.search(row + r"1 completed \| \d\.\d{4} \| [+-]\d\.\d{4} \|", md), md  # no "±" for one seed
    assert re.search(row + r"[+-]\d\.\d{4} \| — \| — \| [+-]\d\.\d{4} ± ", md), md  # no interval


FAKE_SMI = "#!/bin/sh\necho 'GPU 0: NVIDIA Fake (UUID: GPU-aaaa)'\necho 'GPU 1: NVIDIA Fake (UUID: GPU-bbbb)'\n"


def fake_gpu_env(tmp_path, **extra):
    """nvidia-smi on the PATH that lists two GPUs; no CUDA_VISIBLE_DEVICES."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir(exist_ok=True)
    (bindir / "nvidia-smi").write_text(FAKE_SMI)
    (bindir / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return {**env, "PATH": f"{bindir}:{env['PATH']}", **extra}


def test_gpu_detection(tmp_path):
    args = ("--local", "--dry-run", "--datasets", "moons", "--precisions", "float32", "--solvers", "torchmpnode")
    found = sweep(*args, env=fake_gpu_env(tmp_path))
    assert "local devices: GPU(s) 0 1, at most 1 cell(s) per GPU, 2 at a time" in found.stdout, found.stdout
    capped = sweep(*args, "-j", "9", "--per-gpu", "3", env=fake_gpu_env(tmp_path))
    assert "-j 9 capped at 6" in capped.stdout and "GPU(s) 0 1, at most 3 cell(s) per GPU, 6 at a time" in capped.stdout
    # an existing CUDA_VISIBLE_DEVICES wins over nvidia-smi, read as CUDA reads it
    honoured = sweep(*args, env=fake_gpu_env(tmp_path, CUDA_VISIBLE_DEVICES="5,GPU-x,-1,7"))
    assert "local devices: GPU(s) 5 GPU-x, at most 1" in honoured.stdout, honoured.stdout
    for hidden in ("", "-1"):
        none = sweep(*args, env=fake_gpu_env(tmp_path, CUDA_VISIBLE_DEVICES=hidden))
        assert "local devices: CPU (no GPU found), 1 at a time" in none.stdout
    nosmi = sweep(*args, env={k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"})
    assert "local devices: CPU" in nosmi.stdout or "local devices: GPU" in nosmi.stdout  # whatever this machine has


FAKE_CNF = """#!/bin/sh
# cnf.py's stand-in for the launcher test: notes the GPU it was given and holds its slot, cells 1
# and 2 (float32 s1, s2) for 3 s and the others for 1 s, so cells 4 and 5 start in the slots of
# cells 0 and 3 while 1 and 2 still hold theirs
case "$1" in */cnf.py) ;; *) exec {python} "$@" ;; esac
shift
while [ $# -gt 0 ]; do [ "$1" = --run_dir ] && dir=$2; shift; done
mkdir -p "$dir" && echo "$CUDA_VISIBLE_DEVICES" > "$dir/gpu"
case "$dir" in *_float32_*_s[12]) sleep 3 ;; *) sleep 1 ;; esac
"""


def test_local_cells_are_spread_over_gpus_at_most_k_each(tmp_path):
    """Two fake GPUs, --per-gpu 2: each running cell sees one GPU through CUDA_VISIBLE_DEVICES,
    round robin, and no GPU ever runs more than two cells at once. The launcher is what is
    tested: each cell's cnf.py is a stand-in that notes its GPU and holds the slot for a set time
    (real local cells: test_local_sweep_and_summary_statistics)."""
    fake = tmp_path / "fakebin" / "python-fake"
    env = fake_gpu_env(tmp_path)
    fake.write_text(FAKE_CNF.format(python=sys.executable))
    fake.chmod(0o755)
    proc = subprocess.run(["bash", os.path.join(ROOT, "run_cnf.sh"), "--local", "-j", "8", "--per-gpu", "2",
                           "--datasets", "8gaussians", "--solvers", "torchmpnode", "--precisions", "float32,bfloat16",
                           "--results-dir", str(tmp_path), "--", *TINY, "--no-figures"], capture_output=True, text=True,
                          cwd=ROOT, timeout=TIMEOUT, env={**env, "CNF_PYTHON": str(fake)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "-j 8 capped at 4" in proc.stdout
    d = sweep_dir(tmp_path)
    busy, peak, got = {"0": 0, "1": 0}, {"0": 0, "1": 0}, {}
    for line in proc.stdout.splitlines():  # the launcher's own order of events
        m = re.match(r"cell (\d+): (start|ok) on GPU (\d)$", line)
        if m:
            cell, what, gpu = m.groups()
            busy[gpu] += 1 if what == "start" else -1
            peak[gpu] = max(peak[gpu], busy[gpu])
            assert 0 <= busy[gpu] <= 2, proc.stdout
            if what == "start":
                got[int(cell)] = gpu
    assert busy == {"0": 0, "1": 0} and peak == {"0": 2, "1": 2}, proc.stdout
    assert sorted(got) == list(range(6))
    assert [got[i] for i in range(4)] == ["0", "1", "0", "1"]  # the first slots, round robin
    assert sorted([got[4], got[5]]) == ["0", "1"]  # the slots cells 0 and 3 handed back, one per GPU
    names = dict(ln.split("\t")[:2] for ln in open(os.path.join(d, "cells.tsv")).read().splitlines())
    for cell, gpu in got.items():
        log = open(os.path.join(d, "slurm", f"local_{cell}.out")).read()
        assert f"CUDA_VISIBLE_DEVICES={gpu})" in log and "cnf.py exit code: 0" in log
        assert open(os.path.join(d, "runs", names[str(cell)], "gpu")).read().strip() == gpu  # what cnf.py saw


def _require_slurm():
    """Skip without a SLURM that answers (fail with REQUIRE_SLURM=1): sbatch on the PATH
    and a controller that responds to sinfo."""
    why = None
    if shutil.which("sbatch") is None:
        why = "no sbatch on the PATH"
    else:
        try:
            ok = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if not ok:
            why = "sbatch is on the PATH but the SLURM controller does not answer sinfo"
    if why:
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail(f"REQUIRE_SLURM=1 but {why} (did .ci/slurm-local.sh up run?)")
        pytest.skip(f"{why} (start one with: bash .ci/slurm-local.sh up)")


SLURM_OPTS = ["--wait", "--gpus", "0", "--cpus", "1", "--mem", "1G", "--time", "00:10:00"]


@pytest.mark.slurm
def test_real_slurm_sweep_summary_and_resume(tmp_path):
    _require_slurm()
    # one dataset: the four configurations of float32 and float16 (a sweep over datasets: the local tests);
    # figures drawn in a SLURM task: the requeue test's
    proc = sweep(*SLURM_OPTS, "--datasets", "moons", "--solvers", "torchmpnode",
                 "--precisions", "float32,float16", "--seeds", "0", "--results-dir", str(tmp_path), "--", *TINY,
                 "--no-figures")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"submitted array job \d+ \(4 tasks\)", proc.stdout)
    d = sweep_dir(tmp_path)
    assert set(statuses(d).values()) == {"completed"} and len(statuses(d)) == 4
    logs = glob.glob(os.path.join(d, "slurm", "*_*.out"))
    assert len(logs) == 4 and all("cnf.py exit code: 0" in open(f).read() for f in logs)
    for run in glob.glob(os.path.join(d, "runs", "*")):
        name = os.path.basename(run)
        for f in (f"{name}.csv", f"{name}.txt", "args.csv", "ckpt.pth", "cnf.py", "code/model.py", "density.npz"):
            assert os.path.isfile(os.path.join(run, f)), (run, f)
    table, _ = summarize(d)
    assert len(table) == 4 and set(table["scaler"]) == {"none", "grad", "dynamic"}
    # resubmit exactly the unfinished cells through SLURM
    names = sorted(statuses(d))
    _break(d, (names[0], names[3]))
    proc = sweep(*SLURM_OPTS, "--resume", d)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 of 4 cells not finished" in proc.stdout and re.search(r"\(2 tasks\)", proc.stdout)
    assert set(statuses(d).values()) == {"completed"}


@pytest.mark.slurm
def test_real_slurm_failing_task_fails_the_array(tmp_path):
    _require_slurm()
    proc = sweep(*SLURM_OPTS, "--datasets", "moons", "--solvers", "torchmpnode", "--precisions", "float32",
                 "--seeds", "0", "--results-dir", str(tmp_path), "--", *TINY, "--lr", "1e30", "--test_freq", "1",
                 "--no-figures")
    assert proc.returncode == 3, proc.stdout + proc.stderr  # the diverged task's exit code reaches sbatch --wait
    d = sweep_dir(tmp_path)
    assert statuses(d) == {"moons_float32_torchmpnode_none_s0": "diverged"}


def _wait_for(what, check, timeout):
    t0 = time.time()
    while not check():
        assert time.time() - t0 < timeout, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.25)


@pytest.mark.slurm
def test_real_slurm_requeued_task_keeps_both_attempts_in_its_log(tmp_path):
    """The warning signal makes the task checkpoint and requeue itself; the requeued
    task resumes, and its log (open-mode=append) still holds the first attempt. The run
    then draws its figures inside the SLURM task."""
    _require_slurm()
    # 200 iterations leave room for the signal: sent once iteration 10 is logged, it arrived by iteration 20
    # with two training runs on the same 2 cores (measured), of 200
    proc = sweep(*SLURM_OPTS[1:], "--datasets", "moons", "--solvers", "torchmpnode", "--precisions", "float32",
                 "--seeds", "0", "--results-dir", str(tmp_path), "--", *TINY, "--niters", "200",
                 "--test_freq", "5", "--ckpt_freq", "1000")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    task = re.search(r"submitted array job (\d+)", proc.stdout).group(1) + "_0"
    d = sweep_dir(tmp_path)
    run = os.path.join(d, "runs", "moons_float32_torchmpnode_none_s0")
    csv = os.path.join(run, "moons_float32_torchmpnode_none_s0.csv")

    def training():
        assert not os.path.isfile(os.path.join(run, "status.json")), "the task ended before it could be signalled"
        return os.path.isfile(csv) and len(open(csv).read().splitlines()) > 2

    _wait_for("the first rows of the CSV", training, 300)
    subprocess.run(["scancel", "--signal=USR1", "--batch", task], check=True, timeout=60)
    log = os.path.join(d, "slurm", f"{task}.out")
    _wait_for("the requeue", lambda: "requeued; the task will resume" in open(log).read(), 120)
    def state():
        return subprocess.run(["squeue", "-h", "-j", task, "-o", "%T"], capture_output=True, text=True,
                              timeout=60).stdout.strip()

    pending_since = []

    def finished():
        # SLURM holds a requeued task for about two minutes (BeginTime). Start it sooner, but not
        # in the second its first attempt ended: slurmd refuses a job credential issued by then.
        st = state()
        if st == "PENDING":
            pending_since.append(pending_since[0] if pending_since else time.time())
            if time.time() - pending_since[0] > 3:
                subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], capture_output=True,
                               timeout=60)
        done = os.path.isfile(os.path.join(run, "status.json")) and \
            json.load(open(os.path.join(run, "status.json")))["status"] == "completed"
        return done and st == ""

    _wait_for("the requeued task to complete", finished, 400)
    text = open(log).read()
    marks = ["restart 0", "cnf.py exit code: 4", "requeued; the task", "restart 1",
             "resumed moons_float32_torchmpnode_none_s0",
             "cnf.py exit code: 0"]
    at = [text.find(m) for m in marks]
    assert -1 not in at and at == sorted(at), (at, text[-3000:])
    assert json.load(open(os.path.join(run, "status.json")))["status"] == "completed"
    for f in ("cnf-viz.gif", "optimization_stats.png", "mmd_plot.png"):
        assert os.path.getsize(os.path.join(run, f)) > 1000, f


def test_job_script_forwards_warning_signal_requeues_and_resumes(tmp_path):
    """SLURM's --signal=B:USR1 reaches the batch shell; it must pass it on to cnf.py
    (which checkpoints and exits 4), requeue its own array task, and the requeued
    task must continue in the same run folder."""
    import signal
    import time

    sw = tmp_path / "sweep"
    (sw / "runs").mkdir(parents=True)
    args = " ".join(TINY[:-4] + ["--no-figures", "--niters", "400", "--test_freq", "5", "--ckpt_freq", "1000"])
    (sw / "cells.tsv").write_text(f"0\tmoons_cell\t--data moons {args}\n")
    (sw / "env_setup.sh").write_text("")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.calls\n")
    (bindir / "scontrol").chmod(0o755)
    env = {**with_python(), "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "0",
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


def test_sweep_runs_with_a_bare_interpreter_path(tmp_path):
    """No venv on the PATH: CNF_PYTHON (here this interpreter, given relative to the working
    folder) is the only way to torch. The PATH's python and python3 are decoys that fail, so
    a job that falls back to the PATH cannot pass. A CNF_PYTHON that is not an executable
    is a one-line error before anything runs."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for decoy in ("python", "python3"):
        (bindir / decoy).write_text("#!/bin/sh\necho 'the PATH python ran instead of CNF_PYTHON' >&2\nexit 97\n")
        (bindir / decoy).chmod(0o755)
    # the test run's other variables stay (OMP_NUM_THREADS=1, the warm interpreter's: its cells start warm)
    env = {**{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONHOME")},
           "PATH": f"{bindir}:/usr/bin:/bin", "CNF_PYTHON": os.path.relpath(sys.executable, tmp_path)}
    proc = subprocess.run(["bash", os.path.join(ROOT, "run_cnf.sh"), "--local", "--datasets", "moons", "--solvers",
                           "torchmpnode", "--precisions", "float32", "--seeds", "0", "--results-dir", str(tmp_path),
                           "--", *TINY, "--no-figures"], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=TIMEOUT)
    d = sweep_dir(tmp_path)
    log = "".join(open(f).read() for f in glob.glob(os.path.join(d, "slurm", "*.out")))
    assert proc.returncode == 0, proc.stdout + proc.stderr + log[-2000:]
    assert statuses(d) == {"moons_float32_torchmpnode_none_s0": "completed"}
    assert "PATH python" not in log and "cnf.py exit code: 0" in log
    # the command it suggests for the summary names the same interpreter, as an absolute path
    suggested = proc.stdout.strip().splitlines()[-1].split()[2]  # "summarize with: PYTHON summarize.py DIR"
    assert os.path.isabs(suggested) and os.path.samefile(suggested, sys.executable)
    for bad in ("/nonexistent/python", "no-such-python", str(tmp_path)):
        proc = subprocess.run(["bash", os.path.join(ROOT, "run_cnf.sh"), "--local", "--dry-run"], capture_output=True,
                              text=True, cwd=tmp_path, env={**env, "CNF_PYTHON": bad}, timeout=TIMEOUT)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "CNF_PYTHON" in proc.stderr, proc.stderr


def test_resume_skips_finished_cells_and_dry_run_only_lists(tmp_path):
    """--resume reruns what is not finished: a cell stopped by --on_grid_exploit stop is
    finished (resumed, it would stop again after one validation), like a completed one;
    --dry-run lists the cells and submits nothing."""
    sweep = tmp_path / "sweep"
    states = {"a": "completed", "b": "grid_exploited", "c": "interrupted", "d": "diverged", "e": None}
    lines = []
    for i, (name, state) in enumerate(states.items()):
        lines.append(f"{i}\t{name}\t--data 8gaussians --seed {i}")
        (sweep / "runs" / name).mkdir(parents=True)
        if state:
            ex.write_status(ex.RunDir(sweep / "runs" / name), state, "test", 4, {})
    (sweep / "cells.tsv").write_text("\n".join(lines) + "\n")
    proc = subprocess.run(["bash", os.path.join(ROOT, "run_cnf.sh"), "--local", "--resume", str(sweep), "--dry-run"],
                          capture_output=True, text=True, env=with_python(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"3 of 5 cells not finished: 2 3 4$", proc.stdout.strip(), re.M), proc.stdout
    assert not (sweep / "slurm").exists() or not os.listdir(sweep / "slurm")  # nothing ran


def test_a_python_without_torch_is_refused_and_a_resume_keeps_the_env_setup(tmp_path):
    """Local cells whose Python cannot import torch would each fail with a traceback: the
    launcher says so in one line and writes nothing. A resume without --env-setup runs the
    sweep's own env setup line (and keeps it), so its cells find the Python it names."""
    decoys, good = tmp_path / "decoys", tmp_path / "good"
    decoys.mkdir()
    good.mkdir()
    for name in ("python", "python3"):  # this Python without site-packages: choices.py runs, torch is not there
        (decoys / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
        (decoys / name).chmod(0o755)
    (good / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (good / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CNF_PYTHON"}
    env["PATH"] = f"{decoys}:/usr/bin:/bin"
    proc = subprocess.run(["bash", os.path.join(ROOT, "run_cnf.sh"), "--local", "--datasets", "moons", "--seeds", "0",
                           "--results-dir", str(tmp_path / "results")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stdout + proc.stderr
    assert "cannot import torch" in proc.stderr and str(decoys / "python") in proc.stderr, proc.stderr
    assert not (tmp_path / "results").exists()

    sw = tmp_path / "sweep"
    (sw / "runs").mkdir(parents=True)
    (sw / "slurm").mkdir()
    (sw / "cells.tsv").write_text("0\tmoons_cell\t--data moons " + " ".join(TINY) + " --no-figures\n")
    setup = f'export PATH="{good}:$PATH"'
    (sw / "env_setup.sh").write_text(setup + "\n")
    proc = subprocess.run(["bash", os.path.join(ROOT, "run_cnf.sh"), "--local", "--resume", str(sw)],
                          capture_output=True, text=True, env=env, timeout=TIMEOUT)
    log = (sw / "slurm" / "local_0.out").read_text() if (sw / "slurm" / "local_0.out").exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + log[-2000:]
    assert json.load(open(sw / "runs" / "moons_cell" / "status.json"))["status"] == "completed"
    assert (sw / "env_setup.sh").read_text() == setup + "\n"
