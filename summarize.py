"""Aggregate a sweep (or any folder of runs) into statistics over seeds, paired
comparisons against float32, one table and one figure.

    python summarize.py results/sweep_.../ [--out DIR] [--backfill]
    python summarize.py results/sweep_.../ --status      # one line per cell of a (running) sweep

Reads every run folder's args.csv, CSV, status.json and test_logp.npy below the
given folder. For each dataset x solver x precision x scaler ("cell") it reports
the mean and standard deviation over the completed seeds, and compares every
cell with the float32 run of the same dataset, solver and seed (its "twin"):

- across seeds: the mean difference in test NLL with a 95 % Student-t interval
  over the seed pairs, and whether that interval contains 0;
- point by point: the runs of one seed share their test set, so the per-point
  NLL differences give a mean and standard error conditional on the trained
  models, far tighter than the spread over seeds.

Writes summary.md, summary.csv (one row per cell), summary_runs.csv (one row
per run), summary.png, summary.tex (a booktabs table for a paper; every number
in it is formatted from summary.csv's row), summary_standalone.tex (the same as
a complete document) and overview.png/.pdf (each cell's learned density, from
the runs' density.npz; --backfill first writes it from the checkpoints of runs
that lack it) into the folder, or --out. A folder without runs, or a single run
whose files are damaged, is a one-line error with exit code 2. Diverged and
interrupted runs are counted and listed, never dropped; folders that are not
runs, and runs that cannot be read, are skipped with a warning. Several runs of the same cell and seed (two sweeps under
one folder, say) are not independent samples: the newest completed one is used,
the others are listed as ignored, with a warning.
"""
import csv
import glob
import io
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

import density  # noqa: E402
import experiment as ex  # noqa: E402
import plots  # noqa: E402
import sweep_status  # noqa: E402
import toy_data  # noqa: E402
from precision import PRECISIONS, scaler_label  # noqa: E402

CELL = ["data", "solver", "precision", "scaler"]
RUN_COLUMNS = [*CELL, "seed", "status", "iter", "test_nll", "test_nll_se", "test_gap", "val_nll", "val_nll_se",
               "nll_gap", "val_nll_exact", "disc_gap", "val_mmd", "test_mmd", "test_mmd_se", "ms_fwd", "ms_bwd",
               "ms_iter", "peak_mb", "overflow_steps", "grid_exploited", "run", "used"]
# Aggregated over the completed seeds of a cell: mean and sd of each.
STATS = ["test_nll", "test_nll_se", "test_gap", "val_nll", "nll_gap", "val_nll_exact", "disc_gap", "val_mmd",
         "test_mmd", "ms_fwd", "ms_bwd", "ms_iter", "peak_mb"]
REFERENCE = ("float32", "none")  # the twin every cell is compared with: same data, solver and seed
CONFIDENCE = 0.95


def _flag(args, key):
    return str(args.get(key, "False")) == "True"


# Columns every row of a run CSV has (filled); newer kits may add others, which are kept.
REQUIRED_CSV = ("iter", "val_loss", "time_fwd", "time_bwd", "time_fwd_sum", "time_bwd_sum", "max_memory_mb")


def read_run_csv(path):
    """A run's CSV as a DataFrame; raise ValueError (one line) for a truncated or foreign one:
    a row with fewer fields than the header, a missing column, or an empty required cell."""
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    name = os.path.basename(path)
    if not lines:
        raise ValueError(f"{name} is empty")
    header = lines[0]
    missing = [c for c in REQUIRED_CSV if c not in header]
    if missing:
        raise ValueError(f"{name}: truncated or not a run CSV (no column {', '.join(missing)})")
    need = [header.index(c) for c in REQUIRED_CSV]
    for k, row in enumerate(lines[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{name}: truncated CSV: line {k} has {len(row)} of {len(header)} fields")
        if any(row[i] == "" for i in need):  # "nan" is a value (a diverging run's); empty is damage
            raise ValueError(f"{name}: truncated CSV: line {k} has empty required fields")
    return pd.read_csv(path)


def load_run(folder):
    """One summary row and the run's CSV, or raise ValueError if this is not a run folder."""
    run = ex.RunDir(folder)
    if not os.path.isfile(run.file("args.csv")):
        raise ValueError("no args.csv")
    args = ex.read_args(run.file("args.csv"))
    status = {"status": "unknown (no status.json: still running or killed)"}
    stamp = os.path.getmtime(run.file("args.csv"))
    if os.path.isfile(run.status):
        stamp = os.path.getmtime(run.status)
        try:
            with open(run.status) as f:
                status = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"unreadable status.json ({e})") from None
        if not isinstance(status, dict) or "status" not in status:
            raise ValueError("status.json holds no status")
    df = read_run_csv(run.csv) if os.path.isfile(run.csv) else pd.DataFrame(columns=ex.CSV_COLUMNS)
    last = df.iloc[-1] if len(df) else None
    # columns a run of an older kit lacks read as NaN
    get = lambda k: float(last[k]) if last is not None and k in last.index else math.nan  # noqa: E731
    row = {
        "data": args.get("data"), "solver": args.get("odeint"), "precision": args.get("precision"),
        "scaler": scaler_label(args.get("odeint"), args.get("precision"), _flag(args, "no_grad_scaler"),
                               _flag(args, "no_dynamic_scaler"), _flag(args, "grad_scaler")),
        "seed": int(args.get("seed", 0)),
        "status": status["status"], "iter": status.get("iter", int(last["iter"]) if last is not None else 0),
        "test_nll": get("test_loss"), "test_nll_se": get("test_loss_se"), "test_gap": get("test_gap"),
        "val_nll": get("val_loss"), "val_nll_se": get("val_loss_se"), "nll_gap": get("nll_gap"),
        "val_nll_exact": get("val_loss_exact"), "disc_gap": get("disc_gap"), "val_mmd": get("val_mmd"),
        "test_mmd": get("test_mmd"), "test_mmd_se": get("test_mmd_se"),
        # mean over the run of the per-row window averages
        "ms_fwd": 1e3 * float(df["time_fwd"].mean()) if len(df) else math.nan,
        "ms_bwd": 1e3 * float(df["time_bwd"].mean()) if len(df) else math.nan,
        "peak_mb": float(df["max_memory_mb"].max()) if len(df) else math.nan,
        "ms_iter": 1e3 * float(df["time_fwd"].mean() + df["time_bwd"].mean()) if len(df) else math.nan,
        "overflow_steps": int(last["overflow_steps"]) if last is not None else 0,
        # the iteration where the grid_exploited flag first rose (NaN: never): its NLLs game the grid
        "grid_exploited": (status.get("grid_exploited") or {}).get("iter", math.nan),
        "run": os.path.relpath(folder),
        "used": True,
        "_stamp": stamp,
    }
    return row, df


def find_runs(root):
    """(summary rows, {run: CSV}, [(folder, reason)] of run folders that could not be read)."""
    rows, curves, skipped = [], {}, []
    candidates = sorted({os.path.dirname(p) for p in glob.glob(os.path.join(root, "**", "args.csv"), recursive=True)})
    for d in sorted(glob.glob(os.path.join(root, "**", ""), recursive=True)):
        d = d.rstrip("/")
        # a run, a folder above runs, or a run's own sub-folder (code/)
        if (d == root.rstrip("/") or d in candidates
                or any(c.startswith(d + "/") or d.startswith(c + "/") for c in candidates)):
            continue
        if os.path.basename(d) in ("slurm",):
            continue
        print(f"summarize.py: warning: skipping {d}: not a run folder (no args.csv)", file=sys.stderr)
    for d in candidates:
        try:
            row, df = load_run(d)
        except (ValueError, OSError, KeyError, UnicodeDecodeError, csv.Error, pd.errors.ParserError,
                pd.errors.EmptyDataError) as e:
            skipped.append((os.path.relpath(d), str(e)))
            continue
        rows.append(row)
        curves[row["run"]] = df
    return rows, curves, skipped


def mark_duplicates(runs, warn=print):
    """One run per (cell, seed) enters the statistics: several runs of the same seed are
    not independent samples. Keeps the newest completed one (by status.json time), or
    the newest of any status when none completed; the others get ``used`` False."""
    runs = runs.copy()
    for key, g in runs.groupby([*CELL, "seed"], sort=True):
        if len(g) < 2:
            continue
        done = g[g["status"] == "completed"]
        keep = (done if len(done) else g).sort_values(["_stamp", "run"]).index[-1]
        runs.loc[g.index.drop(keep), "used"] = False
        warn(f"summarize.py: warning: {len(g)} runs of {' '.join(map(str, key[:-1]))} seed {key[-1]}: using "
             f"{runs.loc[keep, 'run']}, ignoring {', '.join(runs.loc[g.index.drop(keep), 'run'])}")
    return runs


# --- statistics ----------------------------------------------------------------------------
def mean_sd(values):
    """(mean, sample sd, n) of the finite values; sd is NaN for n < 2."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def t_interval(diffs, confidence=CONFIDENCE):
    """(mean, sd, low, high) of paired differences, with the Student-t interval over
    the pairs; low and high are NaN for fewer than two pairs (no interval, not a fake one)."""
    mean, sd, n = mean_sd(diffs)
    if n < 2:
        return mean, sd, math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def _test_logp(run):
    path = ex.RunDir(run).test_logp
    return np.load(path).astype(np.float64) if os.path.isfile(path) else None


def pointwise_difference(pairs):
    """Per-point test-NLL difference (cell - twin) over the shared test points of each
    seed: (mean over seeds of the per-seed means, its standard error, seeds used).
    Seeds have independent test sets, so their standard errors add in quadrature."""
    means, ses = [], []
    for run, twin in pairs:
        a, b = _test_logp(run), _test_logp(twin)
        if a is None or b is None or a.shape != b.shape or len(a) < 2:
            continue
        d = b - a  # NLL(cell) - NLL(twin) = logp(twin) - logp(cell)
        means.append(d.mean())
        ses.append(d.std(ddof=1) / math.sqrt(len(d)))
    if not means:
        return math.nan, math.nan, 0
    k = len(means)
    return float(np.mean(means)), float(math.sqrt(sum(s * s for s in ses)) / k), k


def status_counts(statuses):
    counts = pd.Series([s.split()[0] for s in statuses]).value_counts()
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def _flagged(g):
    """Runs whose grid_exploited flag rose, besides those it stopped (their status says so)."""
    n = int((g["grid_exploited"].notna() & (g["status"] != "grid_exploited")).sum())
    return f" ({n} grid_exploited)" if n else ""


def cell_table(runs):
    """One row per cell: counts, mean and sd over completed seeds, and the paired comparisons
    (runs marked unused by ``mark_duplicates`` left out)."""
    runs = runs[runs["used"]]
    done = runs[runs["status"] == "completed"]
    ref = done[(done["precision"] == REFERENCE[0]) & (done["scaler"] == REFERENCE[1])]
    twins = {(r.data, r.solver, r.seed): r for r in ref.itertuples()}
    out = []
    for key, g in runs.groupby(CELL, sort=True):
        ok = g[g["status"] == "completed"]
        row = dict(zip(CELL, key), runs=len(g), n=len(ok), diverged=int((g["status"] == "diverged").sum()),
                   status=status_counts(g["status"]) + _flagged(g), seeds=" ".join(str(s) for s in sorted(g["seed"])))
        for m in STATS:
            row[f"{m}_mean"], row[f"{m}_sd"], _ = mean_sd(ok[m])
        row["overflow_steps_mean"] = float(ok["overflow_steps"].mean()) if len(ok) else math.nan
        # completed seeds whose grid_exploited flag rose: their final numbers come from a model
        # that games its time grid (status.json's ckpt_valid.pth numbers are the ones to quote)
        row["grid_exploited"] = int(ok["grid_exploited"].notna().sum())
        is_ref = (key[2], key[3]) == REFERENCE
        pairs = [] if is_ref else [(r, twins[(r.data, r.solver, r.seed)]) for r in ok.itertuples()
                                   if (r.data, r.solver, r.seed) in twins]
        pairs = [(r, t) for r, t in pairs if math.isfinite(r.test_nll) and math.isfinite(t.test_nll)]
        diffs = [r.test_nll - t.test_nll for r, t in pairs]
        mean, sd, lo, hi = t_interval(diffs)
        row.update(pairs=len(pairs), diff_mean=mean, diff_sd=sd, diff_ci_low=lo, diff_ci_high=hi,
                   ci_contains_0="" if not math.isfinite(lo) else ("yes" if lo <= 0 <= hi else "no"))
        row["point_diff_mean"], row["point_diff_se"], row["point_diff_seeds"] = pointwise_difference(
            [(r.run, t.run) for r, t in pairs])
        row["reference"] = is_ref
        out.append(row)
    return pd.DataFrame(out)


# --- the table --------------------------------------------------------------------------------
def _pm(mean, sd, fmt, signed=False):
    if not math.isfinite(mean):
        return "—"
    s = format(mean, ("+" if signed else "") + fmt)
    return s if not math.isfinite(sd) else f"{s} ± {format(sd, fmt)}"


def to_markdown(cells, runs):
    out = [f"Mean ± sd over the completed seeds (n). Paired: each cell minus the float32 run of the same solver and "
           f"seed, in test NLL (nats); the interval is {CONFIDENCE:.0%} Student-t over the seed pairs (none for one "
           f"pair); per point: mean ± SE of the NLL difference over the shared test points.\n"]
    for data, g in cells.groupby("data", sort=True):
        floor = toy_data.ENTROPY.get(data, math.nan)
        out.append(f"### {data} (true entropy {floor:.4f} nats)\n")
        out.append("| solver | precision | scaler | n | status | test NLL | test gap | val NLL | NLL gap | val NLL exact "
                   "| disc_gap | val MMD | fwd ms/iter | bwd ms/iter | peak MB |")
        out.append("|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for _, r in g.iterrows():
            out.append(
                f"| {r.solver} | {r.precision} | {r.scaler} | {r.n} | {r.status} "
                f"| {_pm(r.test_nll_mean, r.test_nll_sd, '.4f')} | {_pm(r.test_gap_mean, r.test_gap_sd, '.4f', True)} "
                f"| {_pm(r.val_nll_mean, r.val_nll_sd, '.4f')} | {_pm(r.nll_gap_mean, r.nll_gap_sd, '.4f', True)} "
                f"| {_pm(r.val_nll_exact_mean, r.val_nll_exact_sd, '.4f')} "
                f"| {_pm(r.disc_gap_mean, r.disc_gap_sd, '.1e', True)} | {_pm(r.val_mmd_mean, r.val_mmd_sd, '.2e')} "
                f"| {_pm(r.ms_fwd_mean, r.ms_fwd_sd, '.0f')} | {_pm(r.ms_bwd_mean, r.ms_bwd_sd, '.0f')} "
                f"| {_pm(r.peak_mb_mean, r.peak_mb_sd, '.0f')} |")
        out.append("")
        others = g[~g["reference"]]
        if len(others):
            out.append("Paired with float32 (same solver and seed), test NLL difference:\n")
            out.append("| solver | precision | scaler | pairs | mean diff ± sd | 95% CI (seeds) | CI contains 0 "
                       "| per point: mean ± SE |")
            out.append("|---|---|---|---:|---:|---|---|---:|")
            for _, r in others.iterrows():
                ci = f"[{r.diff_ci_low:+.4f}, {r.diff_ci_high:+.4f}]" if math.isfinite(r.diff_ci_low) else "—"
                out.append(f"| {r.solver} | {r.precision} | {r.scaler} | {r.pairs} "
                           f"| {_pm(r.diff_mean, r.diff_sd, '.4f', True)} | {ci} | {r.ci_contains_0 or '—'} "
                           f"| {_pm(r.point_diff_mean, r.point_diff_se, '.4f', True)} |")
            out.append("")
    ignored = runs[~runs["used"]]
    out.append("#### Runs\n")
    if len(ignored):
        out.append(f"{len(ignored)} run(s) repeat a (cell, seed) that has a newer or completed run and are left out "
                   f"of the statistics (marked *ignored*).\n")
    out.append("| data | solver | precision | scaler | seed | status | iter | test NLL ± SE | val NLL ± SE "
               "| disc_gap | overflow steps |")
    out.append("|---|---|---|---|---:|---|---:|---:|---:|---:|---:|")
    for _, r in runs.iterrows():
        status = r.status if r.used else f"{r.status}, *ignored*"
        if math.isfinite(r.grid_exploited):
            status += f", **grid_exploited** at {int(r.grid_exploited)}"
        out.append(f"| {r.data} | {r.solver} | {r.precision} | {r.scaler} | {r.seed} | {status} | {r.iter} "
                   f"| {_pm(r.test_nll, r.test_nll_se, '.4f')} | {_pm(r.val_nll, r.val_nll_se, '.4f')} "
                   f"| {_pm(r.disc_gap, math.nan, '.1e', True)} | {r.overflow_steps} |")
    return "\n".join(out)


# --- the LaTeX table ---------------------------------------------------------------------------
# The order a paper groups cells in: precision and scaler, then solver.
SCALER_ORDER = ("none", "grad", "dynamic", "grad+dynamic")
MARK = r"$^\dagger$"
FLAG_MARK = r"$^\ddagger$"  # a completed seed of the cell raised grid_exploited


def cell_order(cells):
    """``cells`` sorted by dataset, then precision (PRECISIONS order) and scaler, then solver;
    unknown names go last, alphabetically."""
    prec = {p: k for k, p in enumerate(PRECISIONS)}
    scal = {s: k for k, s in enumerate(SCALER_ORDER)}
    key = lambda col, rank: col.map(lambda v: (rank.get(v, len(rank)), str(v)))  # noqa: E731
    order = sorted(range(len(cells)), key=lambda i: (
        str(cells["data"].iloc[i]), key(cells["precision"], prec).iloc[i], key(cells["scaler"], scal).iloc[i],
        str(cells["solver"].iloc[i])))
    return cells.iloc[order].reset_index(drop=True)


def decimals(se, value=math.nan):
    """Decimals that show a number down to the digit its standard error ``se`` affects: the
    SE rounded to one significant digit, two when its first digit is 1 (0.013 -> 3, 0.04 -> 2,
    37 -> 0). Without an SE: three significant digits of ``value``."""
    if math.isfinite(se) and se > 0:
        e = math.floor(math.log10(se))
        d = -e + (1 if f"{se:e}"[0] == "1" else 0)
    elif math.isfinite(value) and value != 0:
        d = 2 - math.floor(math.log10(abs(value)))
    else:
        d = 2
    return max(0, min(6, d))


def standard_error(sd, n, fallback=math.nan):
    """sd / sqrt(n) over seeds; ``fallback`` (e.g. a single run's own SE) when n < 2."""
    return sd / math.sqrt(n) if n >= 2 and math.isfinite(sd) else fallback


def tex_number(x, d, signed=False):
    s = format(x, f"{'+' if signed else ''}.{d}f")
    return s.replace("-", "$-$", 1) if s.startswith("-") else s


def tex_pm(mean, sd, d):
    """'mean $\\pm$ sd' with d decimals; the mean alone without an sd."""
    return format_pm(mean, sd, d, pm=r" $\pm$ ", minus="$-$") if math.isfinite(mean) else "---"


def tex_escape(text):
    """Text safe in LaTeX's text mode (every special character escaped)."""
    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(special.get(c, c) for c in str(text))


def tex_cells(r):
    """The four metric cells of one table row: test NLL (mean $\\pm$ sd, marked), test gap,
    ms/iter and peak MB, each to the decimals its standard error over seeds supports."""
    if r.n == 0:
        what = "diverged" if r.diverged == r.runs else f"no completed seed ({r.status})"
        return [rf"\multicolumn{{4}}{{c}}{{{tex_escape(what)}}}"]
    d = decimals(standard_error(r.test_nll_sd, r.n, r.test_nll_se_mean))
    mark = (MARK if r.ci_contains_0 == "no" else "") + (FLAG_MARK if getattr(r, "grid_exploited", 0) else "")
    dm = decimals(standard_error(r.ms_iter_sd, r.n), r.ms_iter_mean)
    dp = decimals(standard_error(r.peak_mb_sd, r.n), r.peak_mb_mean)
    return [tex_pm(r.test_nll_mean, r.test_nll_sd, d) + mark,
            tex_number(r.test_gap_mean, d, signed=True) if math.isfinite(r.test_gap_mean) else "---",
            tex_pm(r.ms_iter_mean, r.ms_iter_sd, dm), tex_pm(r.peak_mb_mean, r.peak_mb_sd, dp)]


def tex_caption():
    return (r"Final test NLL (nats) as mean $\pm$ sd over the completed seeds, the test gap (test NLL minus the "
            r"dataset's true entropy, mean), training time per iteration (forward + backward, ms, mean $\pm$ sd) "
            r"and peak memory (MB, mean $\pm$ sd). Decimals follow the standard error over seeds (for one seed, "
            r"the test set's). $n$: completed seeds; $n$/$m$ when only $n$ of $m$ runs completed. "
            + MARK + rf": the {CONFIDENCE:.0%} Student-$t$ interval over seed pairs of the test-NLL difference to "
            r"the float32 run of the same solver and seed excludes 0. " + FLAG_MARK + r": the grid\_exploited flag "
            r"rose in at least one completed seed (its validation NLL fell 3 SE below the entropy or moved from the "
            r"NLL on 4$\times$ the grid's steps), so these numbers include a model that games its time grid."
            ).replace("%", r"\%")


def to_latex(cells):
    """The table body (a booktabs ``longtable``, so the full grid breaks across pages):
    datasets as row groups, precision and scaler then solver as row headers."""
    cols = r"lllrrrrr"
    head = [r"\multicolumn{3}{l}{cell} & & \multicolumn{2}{c}{test NLL (nats)} & \multicolumn{2}{c}{cost} \\",
            r"\cmidrule(lr){1-3}\cmidrule(lr){5-6}\cmidrule(lr){7-8}",
            r"precision & scaler & solver & $n$ & mean $\pm$ sd & gap & ms/iter & peak MB \\"]
    out = [rf"\begin{{longtable}}{{{cols}}}",
           rf"\caption{{{tex_caption()}}}\label{{tab:cnf-summary}}\\",
           r"\toprule", *head, r"\midrule", r"\endfirsthead",
           r"\toprule", *head, r"\midrule", r"\endhead",
           r"\bottomrule", r"\endlastfoot"]
    cells = cell_order(cells)
    for k, (data, g) in enumerate(cells.groupby("data", sort=False)):
        if k:
            out.append(r"\midrule")
        floor = toy_data.ENTROPY.get(data, math.nan)
        out.append(rf"\multicolumn{{8}}{{l}}{{\textbf{{{tex_escape(data)}}} (true entropy {floor:.4f} nats)}} \\*")
        last = None
        for r in g.itertuples():
            group = (r.precision, r.scaler)
            if last is not None and group != last:
                out.append(r"\addlinespace[2pt]")
            first = [tex_escape(r.precision), tex_escape(r.scaler)] if group != last else ["", ""]
            last = group
            n = f"{r.n}" if r.n == r.runs else f"{r.n}/{r.runs}"
            out.append(" & ".join([*first, tex_escape(r.solver), n, *tex_cells(r)]) + r" \\")
    out.append(r"\end{longtable}")
    return "\n".join(out) + "\n"


def latex_standalone(body):
    """A complete document around the table: pdflatex with booktabs and longtable (tools)."""
    return "\n".join([r"\documentclass[10pt]{article}", r"\usepackage[margin=1.5cm]{geometry}",
                      r"\usepackage{booktabs}", r"\usepackage{longtable}", r"\begin{document}", r"\small",
                      body.rstrip("\n"), r"\end{document}", ""])


# --- the overview figure -------------------------------------------------------------------------
TARGET_SAMPLES = 1_000_000  # the target panel: a histogram of this many data points on the density grid


def format_pm(mean, sd, d, pm=" ± ", minus="-"):
    """'mean ± sd' with d decimals (the mean alone without an sd); the table and the figure share it."""
    if not math.isfinite(mean):
        return "—"
    f = lambda x: format(x, f".{d}f").replace("-", minus, 1)  # noqa: E731
    return f(mean) + (f"{pm}{f(sd)}" if math.isfinite(sd) else "")


def column_label(r):
    return f"{r.precision} · {r.scaler}\n{r.solver}"


def representative_run(runs, r):
    """The used, completed run of cell ``r`` with the median test NLL (the lower middle one
    for an even count), or None."""
    mine = runs[(runs["data"] == r.data) & (runs["solver"] == r.solver) & (runs["precision"] == r.precision)
                & (runs["scaler"] == r.scaler) & runs["used"] & (runs["status"] == "completed")
                & np.isfinite(runs["test_nll"].astype(float))]
    if not len(mine):
        return None
    mine = mine.sort_values(["test_nll", "seed"])
    return mine.iloc[(len(mine) - 1) // 2]


def target_log_density(data, grid=density.GRID, limit=density.LIMIT):
    """(log-density [grid, grid] of the true distribution on the density grid, how it was
    obtained): closed form where toy_data has it, else a histogram of TARGET_SAMPLES points."""
    side = np.linspace(-limit, limit, grid)
    try:
        xy = np.stack(np.meshgrid(side, side, indexing="xy"), -1).reshape(-1, 2)
        return toy_data.log_density(data, xy).reshape(grid, grid), "exact density"
    except ValueError:
        pass
    x = toy_data.inf_train_gen(data, TARGET_SAMPLES, np.random.default_rng(12345))
    edges = np.linspace(-limit - (side[1] - side[0]) / 2, limit + (side[1] - side[0]) / 2, grid + 1)  # centred on side
    hist = np.histogram2d(x[:, 1], x[:, 0], bins=(edges, edges), density=True)[0]
    with np.errstate(divide="ignore"):
        return np.log(hist), f"histogram, {TARGET_SAMPLES:.0e} points"


def overview_panels(cells, runs):
    """(datasets, column labels, {(dataset, label): panel}) for ``plots.plot_overview``: the
    target, then one column per solver x precision x scaler, in the table's order. Each
    cell's title is its test NLL mean ± sd, with the table's decimals and mark."""
    cells = cell_order(cells)
    datasets = sorted(cells["data"].unique())
    order = cell_order(cells.drop_duplicates(["precision", "scaler", "solver"]).assign(data=""))
    columns = ["target"] + [column_label(r) for r in order.itertuples()]
    panels = {}
    for data in datasets:
        logp, how = target_log_density(data)
        panels[(data, "target")] = {"image": logp, "limit": density.LIMIT,
                                    "title": f"entropy {toy_data.ENTROPY.get(data, math.nan):.3f}\n{how}"}
    for r in cells.itertuples():
        label = column_label(r)
        if r.n == 0:
            text = (f"diverged\n({r.diverged} of {r.runs} seeds)" if r.diverged == r.runs
                    else f"no completed seed\n({r.status})")
            panels[(r.data, label)] = {"title": "", "text": text}
            continue
        d = decimals(standard_error(r.test_nll_sd, r.n, r.test_nll_se_mean))
        n = f"n={r.n}" if r.n == r.runs else f"n={r.n}/{r.runs}"
        mark = ("†" if r.ci_contains_0 == "no" else "") + ("‡" if getattr(r, "grid_exploited", 0) else "")
        rep = representative_run(runs, r)
        title = f"{format_pm(r.test_nll_mean, r.test_nll_sd, d)}{mark} ({n})\nseed {int(rep.seed)}"
        try:
            arrays = density.load(rep.run)
        except ValueError as e:
            print(f"summarize.py: warning: {e} (write it with: python summarize.py FOLDER --backfill)",
                  file=sys.stderr)
            panels[(r.data, label)] = {"title": title, "text": "no density.npz\n(--backfill)"}
            continue
        panels[(r.data, label)] = {"title": title, "image": arrays["logp"], "limit": float(arrays["limit"])}
    return datasets, columns, panels


OVERVIEW_CAPTION = ("Model density at t = 1 of each cell's representative seed (the completed seed with the median "
                    "test NLL; the lower middle one for an even count), each panel on its own colour scale from 0.\n"
                    "Titles: test NLL in nats, mean ± sd over the completed seeds (n; n/m when only n of m runs "
                    "completed), and the seed shown. † as in summary.tex: the {:.0%} paired interval against float32 "
                    "excludes 0; ‡: a seed raised grid_exploited.".format(CONFIDENCE))


def write_overview(cells, runs, out):
    datasets, columns, panels = overview_panels(cells, runs)
    plots.plot_overview(datasets, columns, panels, os.path.join(out, "overview.png"), os.path.join(out, "overview.pdf"),
                        caption=OVERVIEW_CAPTION)


# --- the figure --------------------------------------------------------------------------------
def _label(r):
    return f"{r.solver} {r.precision} {r.scaler}"


def _curve_stats(dfs):
    """Validation NLL per iteration over runs: (iters, mean, sd, n); sd is 0 where n == 1."""
    long = pd.concat([d[["iter", "val_loss"]] for d in dfs if len(d)], ignore_index=True)
    g = long.groupby("iter")["val_loss"]
    return g.mean().index.to_numpy(), g.mean().to_numpy(), g.std(ddof=1).fillna(0.0).to_numpy(), g.count().to_numpy()


def plot(cells, runs, curves, out_png):
    """Per dataset: learning curves (mean ± sd over seeds), final test NLL (mean ± sd),
    paired test-NLL difference to float32 (95 % t interval). Then time and memory (± sd)."""
    datasets = sorted(cells["data"].unique())
    height = max(3.6, 0.9 + 0.28 * cells.groupby("data").size().max())
    fig, axes = plt.subplots(len(datasets) + 1, 3, figsize=(17, height * (len(datasets) + 1)), squeeze=False)
    for row, data in zip(axes, datasets):
        g = cells[cells["data"] == data].reset_index(drop=True)
        floor = toy_data.ENTROPY[data]
        a = row[0]
        for k, r in g.iterrows():
            mine = runs[(runs[CELL] == list(r[CELL])).all(axis=1) & runs["used"]]
            dfs = [curves[p] for p in mine["run"]]
            if not any(len(d) for d in dfs):
                continue
            it, mean, sd, n = _curve_stats(dfs)
            a.errorbar(it, mean, yerr=sd, fmt="o-", ms=3, capsize=2, lw=1,
                       label=f"{_label(r)} (n={n.max()}{', ' + r.status if r.n < r.runs else ''})")
        a.axhline(floor, color="k", ls=":", lw=1, label="true entropy")
        a.set(title=f"{data}: validation NLL (mean ± sd over seeds)", xlabel="iteration", ylabel="nats")
        top = np.nanmax(np.r_[g["val_nll_mean"].to_numpy() + np.nan_to_num(g["val_nll_sd"].to_numpy()), floor + 0.1])
        a.set_ylim(floor - 0.05, floor + 3 * (top - floor))
        a.legend(fontsize=7)
        y = np.arange(len(g))
        labels = [f"{_label(r)} (n={r.n})" for r in g.itertuples()]
        a = row[1]
        a.errorbar(g["test_nll_mean"], y, xerr=g["test_nll_sd"].fillna(0.0), fmt="o", capsize=4)
        a.axvline(floor, color="k", ls=":", lw=1)
        a.set_yticks(y, labels, fontsize=7)
        a.set(title=f"{data}: final test NLL (mean ± sd over seeds)", xlabel="nats", ylim=(-0.6, len(g) - 0.4))
        a = row[2]
        has_ci = g["diff_ci_low"].notna()
        half_lo = (g["diff_mean"] - g["diff_ci_low"]).where(has_ci, 0.0)
        half_hi = (g["diff_ci_high"] - g["diff_mean"]).where(has_ci, 0.0)
        a.errorbar(g["diff_mean"], y, xerr=[half_lo, half_hi], fmt="o", capsize=4, label="seeds: 95% t interval")
        a.errorbar(g["point_diff_mean"], y + 0.2, xerr=g["point_diff_se"].fillna(0.0) * 1.96, fmt="s", ms=3,
                   capsize=3, color="tab:orange", label="per point: ±1.96 SE")
        a.axvline(0.0, color="k", lw=1)
        a.set_yticks(y, [f"{_label(r)} ({r.pairs} pairs)" if not r.reference else f"{_label(r)} (reference)"
                         for r in g.itertuples()], fontsize=7)
        a.set(title=f"{data}: test NLL minus float32 twin", xlabel="nats", ylim=(-0.6, len(g) - 0.2))
        a.legend(fontsize=7)
    labels = [f"{r.data}\n{_label(r)}" for r in cells.itertuples()]
    y = np.arange(len(cells))
    a = axes[-1][0]
    a.barh(y, cells["ms_fwd_mean"], xerr=cells["ms_fwd_sd"].fillna(0.0), capsize=3, label="forward")
    a.barh(y, cells["ms_bwd_mean"], left=cells["ms_fwd_mean"], xerr=cells["ms_bwd_sd"].fillna(0.0), capsize=3,
           label="backward")
    a.set(title="time per iteration (mean ± sd)", xlabel="ms")
    a.set_yticks(y, labels, fontsize=7)
    a.legend(fontsize=7)
    a = axes[-1][1]
    a.barh(y, cells["peak_mb_mean"], xerr=cells["peak_mb_sd"].fillna(0.0), capsize=3, color="tab:green")
    a.set(title="peak memory (mean ± sd)", xlabel="MB")
    a.set_yticks(y, labels, fontsize=7)
    axes[-1][2].axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    ex.atomic_write(out_png, buf.getvalue())


def backfill(root):
    """Write density.npz, from its checkpoint, into every completed run under ``root`` that
    lacks one (runs from before the kit saved it). Each file goes into its own run folder."""
    done = 0
    for folder in sorted({os.path.dirname(p) for p in glob.glob(os.path.join(root, "**", "args.csv"), recursive=True)}):
        run = ex.RunDir(folder)
        if os.path.isfile(run.file(density.FILE)) or not os.path.isfile(run.ckpt):
            continue
        try:
            with open(run.status) as f:
                if json.load(f).get("status") != "completed":
                    continue
            density.from_checkpoint(folder)
        except (OSError, ValueError, KeyError, RuntimeError, ex.CheckpointError) as e:
            print(f"summarize.py: warning: no density.npz for {os.path.relpath(folder)}: {e}", file=sys.stderr)
            continue
        done += 1
        print(f"wrote {os.path.relpath(run.file(density.FILE))}", file=sys.stderr)
    return done


def main(argv=None):
    p = ex.OneLineParser(prog="summarize.py",
                         description="Aggregate a sweep into statistics over seeds, tables and figures.")
    p.add_argument("folder", help="a sweep folder, or any folder holding run folders")
    p.add_argument("--out", default=None, help="where to write summary.* and overview.* (default: the folder)")
    p.add_argument("--status", action="store_true",
                   help="list every cell of the sweep (cells.tsv) with its state and progress, and exit")
    p.add_argument("--backfill", action="store_true",
                   help="first write density.npz, from their checkpoints, for completed runs that lack it")
    a = p.parse_args(argv)
    if not os.path.isdir(a.folder):
        p.error(f"{a.folder!r} is not a folder")
    if a.status:
        try:
            print(sweep_status.format_status(sweep_status.sweep_status(a.folder), a.folder))
        except sweep_status.SweepError as e:
            p.error(str(e))
        return 0
    if a.backfill:
        backfill(a.folder)
    rows, curves, skipped = find_runs(a.folder)
    if not rows:
        if skipped:
            p.error(f"no readable run under {a.folder}: " + "; ".join(f"{d}: {why}" for d, why in skipped))
        p.error(f"no run folders under {a.folder} (a run folder holds args.csv)")
    for d, why in skipped:
        print(f"summarize.py: warning: skipping {d}: {why}", file=sys.stderr)
    runs = pd.DataFrame(rows, columns=[*RUN_COLUMNS, "_stamp"]).sort_values([*CELL, "seed", "run"]).reset_index(drop=True)
    runs = mark_duplicates(runs, warn=lambda m: print(m, file=sys.stderr)).drop(columns="_stamp")
    cells = cell_table(runs)
    out = a.out or a.folder
    os.makedirs(out, exist_ok=True)
    md = to_markdown(cells, runs)
    if skipped:
        md += "\n\n#### Run folders that could not be read (skipped)\n\n" + "\n".join(
            f"- `{d}`: {why}" for d, why in skipped)
    tex = to_latex(cells)
    ex.atomic_write(os.path.join(out, "summary.csv"), cells.to_csv(index=False))
    ex.atomic_write(os.path.join(out, "summary_runs.csv"), runs.to_csv(index=False))
    ex.atomic_write(os.path.join(out, "summary.md"), md + "\n")
    ex.atomic_write(os.path.join(out, "summary.tex"), tex)
    ex.atomic_write(os.path.join(out, "summary_standalone.tex"), latex_standalone(tex))
    plot(cells, runs, curves, os.path.join(out, "summary.png"))
    write_overview(cells, runs, out)
    print(md)
    print(f"{len(runs)} runs in {len(cells)} cells" + (f" ({len(skipped)} run folders skipped)" if skipped else "")
          + f"; wrote summary.md, .csv, .tex, _standalone.tex, .png, summary_runs.csv, overview.png, .pdf to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
