"""The study's outputs from one real tiny sweep: summary.tex (compiled with pdflatex), the
overview figure from each run's density.npz, and the --status listing (mid-sweep and at the end),
with a diverged, an interrupted and a failed-to-start cell; bad input; the density data itself."""
import csv
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

import density
import experiment as ex
import plots
import summarize
import tables
import sweep_status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--niters", "20", "--num_timesteps", "4", "--num_samples", "64", "--num_samples_val", "64",
        "--num_samples_test", "256", "--width", "8", "--hidden_dim", "8", "--no-figures"]
TIMEOUT = 600  # a small local sweep: under a minute on a fast 2-core machine, a few on a slow one
DIVERGED = (2, 3)  # 8gaussians bfloat16, both seeds: rerun with --lr 1e30
INTERRUPTED = 5  # checkerboard float32 seed 1: rerun long, listed while running, then SIGTERM
FAILED = 8  # a cell appended to cells.tsv whose arguments cnf.py refuses


def _job(sweep, task, *extra):
    """Start one cell exactly as run_cnf.sh --local does (job_cnf.sbatch, log appended)."""
    log = open(os.path.join(sweep, "slurm", f"local_{task}.out"), "a")
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "KIT_DIR": ROOT, "OMP_NUM_THREADS": "1",
           "CNF_PYTHON": sys.executable}
    return subprocess.Popen(["bash", os.path.join(ROOT, "job_cnf.sbatch"), sweep, *extra], stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _listing(sweep):
    """The --status listing in this process (the polls stay cheap on a busy machine)."""
    return sweep_status.format_status(sweep_status.sweep_status(sweep), sweep)


def _status(sweep):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "summarize.py"), sweep, "--status"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _wait(what, check, timeout=TIMEOUT):
    t0 = time.time()
    while not check():
        assert time.time() - t0 < timeout, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


def _rows(listing):
    """{task: row dict} parsed from the listing's fixed-width lines (cell names have no spaces)."""
    lines = listing.splitlines()
    out = {}
    for ln in lines[2:-1]:
        m = re.match(r"(\d+)\s+(\S+)\s+(completed|running|pending|interrupted|diverged|failed to start|failed|\S+)"
                     r"\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+((?:\S+ ago)|—)\s*(.*)$", ln)
        assert m, ln
        out[int(m[1])] = dict(zip(("cell", "state", "iter", "val", "ms", "eta", "job", "updated", "reason"),
                                  m.groups()[1:]))
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """8 tiny cells (2 datasets x float32/bfloat16 x 2 seeds, torchmpnode) run by run_cnf.sh --local,
    listed while running; then a diverged cell, an interrupted cell (listed while it runs) and a
    cell that fails to start, all real runs of job_cnf.sbatch."""
    results = tmp_path_factory.mktemp("results")
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "run_cnf.sh"), "--local", "-j", "2", "--datasets",
                             "8gaussians,checkerboard", "--solvers", "torchmpnode", "--precisions", "float32,bfloat16",
                             "--seeds", "0,1", "--results-dir", str(results), "--", *TINY],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CNF_PYTHON": sys.executable})
    listings = {}

    def running_listing():
        found = glob.glob(os.path.join(results, "sweep_*", "cells.tsv"))
        if not found or proc.poll() is not None:
            return proc.poll() is not None
        text = _listing(os.path.dirname(found[0]))
        states = [r["state"] for r in _rows(text).values()]
        if "running" in states and "pending" in states:
            listings["start"] = text
            return True
        return False

    _wait("a listing with running and pending cells", running_listing)
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, out
    assert "start" in listings, "the sweep ended before a listing caught a running cell:\n" + out
    (d,) = glob.glob(os.path.join(results, "sweep_*"))
    cells = sweep_status.read_cells(d)
    assert len(cells) == 8
    names = {t: n for t, n, _ in cells}
    for t in (*DIVERGED, INTERRUPTED):
        shutil.rmtree(os.path.join(d, "runs", names[t]))
    with open(os.path.join(d, "cells.tsv"), "a") as f:  # a cell whose arguments cnf.py refuses
        f.write(f"{FAILED}\tmoons_float32_torchmpnode_none_s0\t--data moons {' '.join(TINY)} --width -1 --seed 0\n")
    long = _job(d, INTERRUPTED, "--niters", "100000", "--test_freq", "5")
    others = [_job(d, t, "--lr", "1e30", "--test_freq", "1") for t in DIVERGED] + [_job(d, FAILED)]
    csv_path = os.path.join(d, "runs", names[INTERRUPTED], f"{names[INTERRUPTED]}.csv")

    def long_cell_listed():
        if not os.path.isfile(csv_path) or long.poll() is not None:
            return long.poll() is not None
        text = _listing(d)
        row = _rows(text)[INTERRUPTED]
        if row["state"] == "running" and row["eta"] != "—":
            listings["running"] = text
            return True
        return False

    _wait("the long cell running with a CSV row", long_cell_listed)
    assert long.poll() is None, "the long cell ended before it was listed"
    long.send_signal(signal.SIGTERM)  # job_cnf.sbatch passes it on: checkpoint, status interrupted, exit 4
    assert long.wait(timeout=TIMEOUT) == ex.EXIT_INTERRUPTED
    assert [p.wait(timeout=TIMEOUT) for p in others] == [ex.EXIT_DIVERGED, ex.EXIT_DIVERGED, ex.EXIT_BAD_INPUT]
    listings["end"] = _status(d)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "summarize.py"), d], capture_output=True, text=True,
                          cwd=ROOT, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return {"dir": d, "names": names, "listings": listings, "summarize": proc}


# --- the listing -----------------------------------------------------------------------------
def test_status_mid_sweep_shows_running_and_pending_cells(sweep):
    rows = _rows(sweep["listings"]["start"])
    assert len(rows) == 8 and {r["state"] for r in rows.values()} <= {"completed", "running", "pending"}
    assert all(r["job"] == "local" for r in rows.values() if r["state"] == "running")
    assert all(r["iter"] == "—" and r["job"] == "—" for r in rows.values() if r["state"] == "pending")
    total = sweep["listings"]["start"].splitlines()[-1]
    counts = {s: sum(r["state"] == s for r in rows.values()) for s in ("completed", "running", "pending")}
    assert total.startswith("total: 8 cells: ") and all(f"{n} {s}" in total for s, n in counts.items() if n)


def test_status_of_a_long_running_cell_has_progress_and_eta(sweep):
    listing = sweep["listings"]["running"]
    row = _rows(listing)[INTERRUPTED]
    done, niters = map(int, row["iter"].split("/"))
    assert niters == 100000 and done >= 5 and done % 5 == 0
    assert math.isfinite(float(row["val"])) and float(row["ms"]) > 0
    assert re.fullmatch(r"\d+[smh]\S*", row["eta"]) and row["job"] == "local"
    assert "the running cells end training in about" in listing.splitlines()[-1]


def test_status_at_the_end_names_each_state_and_reason(sweep):
    listing = sweep["listings"]["end"]
    rows = _rows(listing)
    assert len(rows) == 9
    states = {t: r["state"] for t, r in rows.items()}
    assert states == {0: "completed", 1: "completed", 2: "diverged", 3: "diverged", 4: "completed",
                      5: "interrupted", 6: "completed", 7: "completed", 8: "failed to start"}
    assert "non-finite" in rows[2]["reason"] and "SIGTERM" in rows[INTERRUPTED]["reason"]
    assert rows[2]["val"] == "nan" and rows[2]["iter"].endswith("/20")  # the last CSV row, as it is
    assert rows[FAILED]["reason"] == "exit 2: cnf.py: error: --width must be positive, got -1"
    assert rows[0]["iter"] == "20/20" and rows[FAILED]["iter"] == "—"
    assert listing.splitlines()[-1] == ("total: 9 cells: 5 completed, 1 interrupted, 2 diverged, "
                                        "1 failed to start")
    # the same listing through run_cnf.sh
    proc = subprocess.run(["bash", os.path.join(ROOT, "run_cnf.sh"), "--status", sweep["dir"]], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, env={**os.environ, "CNF_PYTHON": sys.executable})
    assert proc.returncode == 0 and _rows(proc.stdout) == {t: {**r, "updated": _rows(proc.stdout)[t]["updated"]}
                                                           for t, r in rows.items()}


def test_status_lists_a_state_it_does_not_know(sweep, tmp_path):
    d = shutil.copytree(sweep["dir"], tmp_path / "copy", ignore=shutil.ignore_patterns("ckpt.pth"))
    st = os.path.join(d, "runs", sweep["names"][0], "status.json")
    data = json.load(open(st))
    data.update(status="grid_exploited", exit_reason="val NLL on a finer grid far above")
    json.dump(data, open(st, "w"))
    listing = _listing(str(d))
    assert _rows(listing)[0]["state"] == "grid_exploited"
    assert listing.splitlines()[-1].endswith("1 failed to start, 1 grid_exploited")


def test_status_names_slurm_jobs_and_a_requeued_attempt(sweep, tmp_path):
    """The same sweep as if SLURM ran it: logs slurm/<job>_<task>.out, job ids in their first lines;
    task 0 requeued and running its second attempt (a start line with no exit line yet)."""
    d = shutil.copytree(sweep["dir"], tmp_path / "copy", ignore=shutil.ignore_patterns("ckpt.pth"))
    for log in glob.glob(os.path.join(d, "slurm", "local_*.out")):
        task = os.path.basename(log)[len("local_"):-len(".out")]
        text = open(log).read().replace("(job local,", "(job 4242,")
        os.remove(log)
        open(os.path.join(d, "slurm", f"4242_{task}.out"), "w").write(text)
    with open(os.path.join(d, "slurm", "4242_0.out"), "a") as f:
        f.write(f"[2030-01-01T00:00:00+00:00] cell 0 {sweep['names'][0]} on node7 (job 4242, restart 1, "
                f"CUDA_VISIBLE_DEVICES=0)\n")
    listing = _listing(str(d))
    rows = _rows(listing)
    assert {t: r["job"] for t, r in rows.items()} == {t: f"4242_{t}" for t in range(9)}
    assert rows[0]["state"] == "running" and rows[1]["state"] == "completed"
    assert rows[FAILED]["state"] == "failed to start" and rows[INTERRUPTED]["state"] == "interrupted"
    assert listing.splitlines()[-1].endswith("; SLURM job(s) 4242")


# --- the table ---------------------------------------------------------------------------------
def _tex_rows(tex):
    """{(data, precision, scaler, solver): [cells]} of the table's body rows."""
    out, data, group = {}, None, None
    for ln in tex.splitlines():
        m = re.match(r"\\multicolumn\{8\}\{l\}\{\\textbf\{(.+?)\}", ln)
        if m:
            data = m[1].replace(r"\_", "_")
            continue
        if data is None or not ln.endswith(r"\\") or ln.startswith("\\"):
            continue
        parts = [p.strip() for p in ln[:-2].split(" & ")]
        if parts[0]:
            group = (parts[0], parts[1])
        out[(data, *group, parts[2])] = parts[3:]
    return out


def _number(text):
    return float(text.replace("$-$", "-"))


def test_table_numbers_equal_the_csv(sweep):
    d = sweep["dir"]
    cells = pd.read_csv(os.path.join(d, "summary.csv"))
    rows = _tex_rows(open(os.path.join(d, "summary.tex")).read())
    assert len(rows) == len(cells) == 4
    checked = 0
    for c in cells.itertuples():
        n, *metrics = rows[(c.data, c.precision, c.scaler, c.solver)]
        if c.n == 0:
            assert metrics == [r"\multicolumn{4}{c}{diverged}"] and c.diverged == c.runs == 2
            continue
        assert n == (str(c.n) if c.n == c.runs else f"{c.n}/{c.runs}")
        pairs = [(metrics[0].replace(tables.MARK, ""), c.test_nll_mean, c.test_nll_sd),
                 (metrics[2], c.ms_iter_mean, c.ms_iter_sd), (metrics[3], c.peak_mb_mean, c.peak_mb_sd)]
        for text, mean, sd in pairs:
            parts = text.split(r" $\pm$ ")
            d_ = len(parts[0].split(".")[1]) if "." in parts[0] else 0
            assert abs(_number(parts[0]) - mean) <= 0.5 * 10**-d_ + 1e-12, (text, mean)
            if c.n >= 2:
                assert abs(_number(parts[1]) - sd) <= 0.5 * 10**-d_ + 1e-12, (text, sd)
            else:
                assert len(parts) == 1  # one seed: no sd
            checked += 1
        gap = _number(metrics[1])
        assert abs(gap - c.test_gap_mean) <= 0.5 * 10 ** -len(metrics[1].split(".")[1]) + 1e-12
        # decimals follow the standard error over seeds (for one seed, the test set's)
        se = c.test_nll_sd / math.sqrt(c.n) if c.n >= 2 else c.test_nll_se_mean
        assert len(metrics[0].split(" ")[0].split(".")[1]) == tables.decimals(se)
        assert (tables.MARK in metrics[0]) == (c.ci_contains_0 == "no")
    assert checked == 9  # 3 completed cells x 3 numbers
    # the interrupted seed leaves its cell with one of two runs, the diverged cell has none
    partial = cells[(cells["data"] == "checkerboard") & (cells["precision"] == "float32")].iloc[0]
    assert (partial["n"], partial["runs"]) == (1, 2) and "1 interrupted" in partial["status"]


def _have_pdflatex():
    """True with pdflatex; without it False, or a failure under REQUIRE_LATEX=1 (as in .ci/run)."""
    if shutil.which("pdflatex") is None:
        if os.environ.get("REQUIRE_LATEX") == "1":
            pytest.fail("REQUIRE_LATEX=1 but pdflatex is not installed (bash .ci/latex-local.sh)")
        return False
    return True


def test_standalone_table_compiles_with_pdflatex(sweep, tmp_path):
    if not _have_pdflatex():
        pytest.skip("pdflatex not installed")
    shutil.copy(os.path.join(sweep["dir"], "summary_standalone.tex"), tmp_path)
    for _ in range(2):  # longtable settles its column widths on the second pass
        proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "summary_standalone.tex"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:]
    assert "Rerun" not in proc.stdout and "Overfull" not in proc.stdout
    with open(tmp_path / "summary_standalone.pdf", "rb") as f:
        assert f.read(5) == b"%PDF-"


def _fake_cells(labels):
    """A cells frame with hand-set statistics, one cell per (precision, scaler, solver) label."""
    rows = []
    for k, (prec, scaler, solver) in enumerate(labels):
        rows.append(dict(data="we_ird&%$#{data}~^\\", solver=solver, precision=prec, scaler=scaler, runs=3, n=3,
                         diverged=0, status="3 completed", test_nll_mean=3.14159 + k, test_nll_sd=0.0123,
                         test_nll_se_mean=0.01, test_gap_mean=-0.5, ms_iter_mean=12.345, ms_iter_sd=1.5,
                         peak_mb_mean=480.0, peak_mb_sd=37.0, ci_contains_0=["", "no", "yes"][k % 3],
                         ci_level=0.95, indicative=False, grid_exploited=0))
    return pd.DataFrame(rows)


def test_decimals_follow_the_standard_error():
    assert [tables.decimals(se) for se in (0.04, 0.013, 0.0099, 0.25, 3.0, 37.0, 1.2e-7)] == [2, 3, 3, 1, 0, 0, 6]
    assert tables.decimals(math.nan, 480.0) == 0 and tables.decimals(math.nan, 3.14159) == 2
    r = next(_fake_cells([("float16", "dynamic", "torchmpnode")]).itertuples())
    # SE 0.0123/sqrt(3) = 0.0071 -> 3 decimals; gap signed with a math minus; ms SE 0.87 -> 1; MB SE 21 -> 0
    assert tables.tex_cells(r) == [r"3.142 $\pm$ 0.012", r"$-$0.500", r"12.3 $\pm$ 1.5", r"480 $\pm$ 37"]
    # a cell with a seed that gamed its grid carries the flag's mark, documented in the caption
    cells = _fake_cells([("float16", "dynamic", "torchmpnode")]).assign(grid_exploited=1)
    flagged = next(cells.itertuples())
    assert tables.tex_cells(flagged)[0] == r"3.142 $\pm$ 0.012" + tables.FLAG_MARK
    assert tables.FLAG_MARK in tables.tex_caption(cells) and "grid\\_exploited" in tables.tex_caption(cells)


def test_labels_are_escaped_and_marks_documented(tmp_path):
    cells = _fake_cells([("float32", "none", "tor_ch"), ("float16", "grad+dynamic", "a&b"), ("bfloat16", "x%", "c")])
    tex = tables.to_latex(cells)
    assert r"we\_ird\&\%\$\#\{data\}\textasciitilde{}\textasciicircum{}\textbackslash{}" in tex
    assert r"tor\_ch" in tex and r"a\&b" in tex and r"x\%" in tex
    rows = _tex_rows(tex)
    marked = {k[1:] for k, v in rows.items() if tables.MARK in v[1]}
    assert marked == {("float16", "grad+dynamic", "a&b".replace("&", r"\&"))}
    assert tables.MARK in tables.tex_caption(cells) and "excludes 0" in tables.tex_caption(cells)
    plain = tables.tex_caption(_fake_cells([("float32", "none", "tor_ch")]))  # no cell marked: no mark explained
    assert not any(m in plain for m in (tables.MARK, tables.FLAG_MARK, tables.INDICATIVE_MARK))
    # order: precision (float32, bfloat16, float16), then scaler, then solver
    assert [k[1] for k in rows] == ["float32", "bfloat16", "float16"]
    if _have_pdflatex():  # the escaped labels really compile
        (tmp_path / "t.tex").write_text(tables.latex_standalone(tex))
        proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:]


# --- the overview ----------------------------------------------------------------------------
def test_overview_shows_diverged_partial_and_median_seed(sweep, monkeypatch):
    monkeypatch.chdir(ROOT)  # summary_runs.csv names runs relative to where summarize.py ran
    d = sweep["dir"]
    runs = pd.read_csv(os.path.join(d, "summary_runs.csv"))
    cells = pd.read_csv(os.path.join(d, "summary.csv"), dtype={"ci_contains_0": object})
    cells["ci_contains_0"] = cells["ci_contains_0"].fillna("")
    datasets, columns, panels = summarize.overview_panels(cells, runs)
    assert datasets == ["8gaussians", "checkerboard"]
    assert columns == ["target", "float32 · none\ntorchmpnode", "bfloat16 · none\ntorchmpnode"]
    assert panels[("8gaussians", columns[2])] == {"title": "", "text": "diverged\n(2 of 2 seeds)"}
    partial = panels[("checkerboard", columns[1])]
    assert partial["title"].endswith("(n=1/2)\nseed 0") and partial["image"].shape == (density.GRID,) * 2
    # the representative seed has the median test NLL: with two seeds, the lower one
    for data in datasets:
        mine = runs[(runs["data"] == data) & (runs["precision"] == "float32") & (runs["status"] == "completed")]
        best = mine.sort_values("test_nll").iloc[0]
        c = cells[(cells["data"] == data) & (cells["precision"] == "float32")].iloc[0]
        title = panels[(data, columns[1])]["title"]
        d_ = tables.decimals(c.test_nll_sd / math.sqrt(c.n) if c.n > 1 else c.test_nll_se_mean)
        assert title.startswith(tables.format_pm(c.test_nll_mean, c.test_nll_sd, d_))
        assert title.endswith(f"seed {int(best.seed)}")
        np.testing.assert_array_equal(panels[(data, columns[1])]["image"],
                                      density.load(best.run)["logp"])
    # the target of a closed-form dataset is its exact density; each panel is a density on the box
    assert panels[("checkerboard", "target")]["title"].endswith("exact density")
    for f in ("overview.png", "overview.pdf"):
        assert os.path.getsize(os.path.join(d, f)) > 10_000


def test_overview_stays_readable_at_the_full_grid(tmp_path):
    """8 datasets x (target + 11 cells), from fake density files: size and fonts stay sensible."""
    import matplotlib.image

    labels = [(p, s, v) for p, s, v in [("float32", "none", "torchdiffeq"), ("float32", "none", "torchmpnode"),
                                         ("tfloat32", "none", "torchdiffeq"), ("tfloat32", "none", "torchmpnode"),
                                         ("bfloat16", "none", "torchdiffeq"), ("bfloat16", "none", "torchmpnode"),
                                         ("float16", "none", "torchdiffeq"), ("float16", "grad", "torchdiffeq"),
                                         ("float16", "none", "torchmpnode"), ("float16", "grad", "torchmpnode"),
                                         ("float16", "dynamic", "torchmpnode")]]
    import toy_data

    side = np.linspace(-density.LIMIT, density.LIMIT, density.GRID)
    xx, yy = np.meshgrid(side, side, indexing="xy")
    cells, runs = [], []
    for i, data in enumerate(toy_data.DATASETS):
        for k, (p, s, v) in enumerate(labels):
            folder = tmp_path / f"{data}_{k}"
            folder.mkdir()
            logp = (-0.5 * ((xx - 0.2 * k) ** 2 + (yy - 0.3 * i) ** 2) - math.log(2 * math.pi)).astype(np.float32)
            density.save(ex.RunDir(folder), {"logp": logp, "samples": np.zeros((4, 2), np.float32),
                                             "limit": np.float32(density.LIMIT)}, 20)
            diverged = k == 6
            cells.append(dict(data=data, solver=v, precision=p, scaler=s, runs=3, n=0 if diverged else 3,
                              diverged=3 if diverged else 0, status="3 diverged" if diverged else "3 completed",
                              test_nll_mean=3.0 + 0.01 * k, test_nll_sd=0.02, test_nll_se_mean=0.01,
                              ci_contains_0="no" if k == 8 else "yes", grid_exploited=0, indicative=False))
            runs.append(dict(data=data, solver=v, precision=p, scaler=s, seed=0, used=True, test_nll=3.0,
                             status="diverged" if diverged else "completed", run=str(folder)))
    datasets, columns, panels = summarize.overview_panels(pd.DataFrame(cells), pd.DataFrame(runs))
    assert len(datasets) == 8 and len(columns) == 12
    assert panels[("moons", columns[7])]["text"].startswith("diverged")
    assert columns[7] == "float16 · none\ntorchdiffeq" and columns[8] == "float16 · none\ntorchmpnode"
    assert "†" in panels[("moons", columns[8])]["title"] and "†" not in panels[("moons", columns[9])]["title"]
    out = tmp_path / "overview.png"
    plots.plot_overview(datasets, columns, panels, str(out), str(tmp_path / "overview.pdf"),
                        caption=summarize.overview_caption(pd.DataFrame(cells)))
    h, w = matplotlib.image.imread(str(out)).shape[:2]
    # about 1.3 inches per panel at 100 dpi: a page-wide figure whose 6.5-7 pt text prints legibly
    assert 1500 <= w <= 1800 and 1200 <= h <= 1600, (w, h)
    assert os.path.getsize(out) < 3_000_000


# --- density.npz -----------------------------------------------------------------------------
def test_density_is_normalised_and_agrees_with_the_samples(sweep):
    d = sweep["dir"]
    z = density.load(os.path.join(d, "runs", sweep["names"][0]))
    logp, x = z["logp"].astype(np.float64), z["samples"].astype(np.float64)
    assert z["logp"].dtype == np.float32 and z["samples"].shape == (density.SAMPLES, 2) and int(z["iter"]) == 20
    h = 2 * float(z["limit"]) / (logp.shape[0] - 1)
    p = np.exp(logp) * h * h
    inside = np.all(np.abs(x) <= float(z["limit"]), axis=1).mean()
    # the mass on the box is at most 1, and matches the share of samples that fall in it
    assert 0.9 < p.sum() <= 1.01 and abs(p.sum() - inside) < 0.02
    side = np.linspace(-float(z["limit"]), float(z["limit"]), logp.shape[0])
    mean_grid = np.array([(p.sum(0) * side).sum(), (p.sum(1) * side).sum()]) / p.sum()
    xin = x[np.all(np.abs(x) <= float(z["limit"]), axis=1)]
    se = xin.std(0) / math.sqrt(len(xin))
    assert np.all(np.abs(xin.mean(0) - mean_grid) < 5 * se + 0.02), (xin.mean(0), mean_grid)


def test_backfill_from_the_checkpoint_reproduces_the_hook(sweep, tmp_path):
    src = os.path.join(sweep["dir"], "runs", sweep["names"][4])
    folder = tmp_path / "old_runs" / "run"
    shutil.copytree(src, folder)
    os.remove(folder / density.FILE)
    before = set(os.listdir(tmp_path / "old_runs"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "summarize.py"), str(tmp_path / "old_runs"),
                           "--backfill"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert set(os.listdir(tmp_path / "old_runs")) == before | {"summary.csv", "summary_runs.csv", "summary.md",
                                                               "summary.tex", "summary_standalone.tex",
                                                               "summary.png", "answer.png", "overview.png",
                                                               "overview.pdf"}
    new, old = density.load(folder), density.load(src)
    np.testing.assert_allclose(new["logp"], old["logp"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(new["samples"], old["samples"], rtol=0, atol=1e-5)


# --- bad input -------------------------------------------------------------------------------
class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _summarize(capsys, *args):
    """summarize.py's main in this process (an uncaught exception fails the test like a traceback)."""
    capsys.readouterr()
    try:
        code = summarize.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return _Result(code, out.out, out.err)


def _truncate(run_dir):
    path = ex.RunDir(run_dir).csv
    text = open(path).read()
    open(path, "w").write(text[: len(text) - 40])  # cut inside the last row


def test_bad_input_is_one_line_and_exit_2(sweep, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    (tmp_path / "empty").mkdir()
    for args, words in [((tmp_path / "empty",), "no run folders"), ((tmp_path / "nope",), "is not a folder"),
                        ((tmp_path / "empty", "--status"), "not a sweep folder (no cells.tsv)")]:
        proc = _summarize(capsys, *args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr
    run = shutil.copytree(os.path.join(sweep["dir"], "runs", sweep["names"][0]), tmp_path / "one_run")
    _truncate(run)
    proc = _summarize(capsys, run)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert re.search(r"truncated CSV: line \d+ has \d+ of \d+ fields", proc.stderr), proc.stderr


def test_unreadable_runs_are_listed_and_skipped(sweep, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    d = shutil.copytree(sweep["dir"], tmp_path / "sweep", ignore=shutil.ignore_patterns("ckpt.pth", "summary*",
                                                                                        "overview*", "answer*"))
    bad = os.path.join(d, "runs", sweep["names"][1])
    _truncate(bad)
    proc = _summarize(capsys, d, "--no-figures")  # the tables alone (the figures' own tests draw them)
    assert proc.returncode == 0, proc.stderr
    assert not [f for f in summarize.FIGURES if os.path.exists(os.path.join(d, f))] and "(no figures)" in proc.stdout
    assert f"skipping {os.path.relpath(bad, ROOT)}: " in proc.stderr and "truncated CSV" in proc.stderr
    md = open(os.path.join(d, "summary.md")).read()
    assert "could not be read (skipped)" in md and sweep["names"][1] in md
    runs = pd.read_csv(os.path.join(d, "summary_runs.csv"))
    assert len(runs) == 7 and not runs["run"].str.contains(sweep["names"][1]).any()
    with open(os.path.join(d, "summary.csv")) as f:
        assert len(list(csv.DictReader(f))) == 4
    # figures left from an earlier summary are named, since they may no longer match the tables
    open(os.path.join(d, "answer.png"), "wb").close()
    proc = _summarize(capsys, d, "--no-figures")
    assert proc.returncode == 0 and proc.stderr.splitlines()[-1] == (
        f"summarize.py: warning: figures of an earlier summary left in {d}: answer.png; run it without "
        "--no-figures to redraw them"), proc.stderr



def _published_studies():
    """docs/experiments/<page>/ folders that hold a summary and the runs it was made from."""
    return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(ROOT, "docs", "experiments", "*", "summary.md"))
                  if os.path.isdir(os.path.join(os.path.dirname(p), "runs")))


@pytest.mark.parametrize("folder", _published_studies(), ids=os.path.basename)
def test_a_published_study_is_redrawn_from_its_committed_runs(folder, tmp_path, capsys, monkeypatch):
    """summarize.py on the committed runs writes the committed summary.md, .csv, _runs.csv and .tex again,
    and every test-NLL figure of the page's tables is one of summary.md's. (Its figures are drawn by the
    same code as every summary's, which the sweep tests check; here only the tables are compared.)"""
    monkeypatch.chdir(ROOT)
    proc = _summarize(capsys, folder, "--out", tmp_path, "--no-figures")
    assert proc.returncode == 0, proc.stderr
    for name in ("summary.md", "summary.csv", "summary_runs.csv", "summary.tex"):
        with open(os.path.join(folder, name)) as committed, open(tmp_path / name) as again:
            assert again.read() == committed.read(), f"{name} differs from what its runs give: rerun summarize.py"
    page = open(folder + ".md").read()
    summary = open(os.path.join(folder, "summary.md")).read()
    quoted = re.findall(r"\| (\d\.\d{4} ± \d\.\d{4}) \|", page)
    assert quoted, "the page quotes no test NLL from its summary"
    assert not [q for q in quoted if f"| {q} |" not in summary], "a figure on the page is not in summary.md"
