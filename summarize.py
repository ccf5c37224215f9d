"""Aggregate a sweep (or any folder of runs) into statistics over seeds, paired
comparisons against float32, one table and one figure.

    python summarize.py results/sweep_.../ [--out DIR]

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
per run) and summary.png (into the folder, or --out). Diverged and interrupted
runs are counted and listed, never dropped; folders that are not runs are
skipped with a warning. Several runs of the same cell and seed (two sweeps under
one folder, say) are not independent samples: the newest completed one is used,
the others are listed as ignored, with a warning.
"""
import argparse
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

import experiment as ex  # noqa: E402
import toy_data  # noqa: E402
from precision import scaler_label  # noqa: E402

CELL = ["data", "solver", "precision", "scaler"]
RUN_COLUMNS = [*CELL, "seed", "status", "iter", "test_nll", "test_nll_se", "test_gap", "val_nll", "val_nll_se",
               "nll_gap", "val_nll_exact", "disc_gap", "val_mmd", "ms_fwd", "ms_bwd", "peak_mb", "overflow_steps",
               "grid_exploited", "run", "used"]
# Aggregated over the completed seeds of a cell: mean and sd of each.
STATS = ["test_nll", "test_gap", "val_nll", "nll_gap", "val_nll_exact", "disc_gap", "val_mmd", "ms_fwd", "ms_bwd",
         "peak_mb"]
REFERENCE = ("float32", "none")  # the twin every cell is compared with: same data, solver and seed
CONFIDENCE = 0.95


def _flag(args, key):
    return str(args.get(key, "False")) == "True"


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
        with open(run.status) as f:
            status = json.load(f)
    df = pd.read_csv(run.csv) if os.path.isfile(run.csv) else pd.DataFrame(columns=ex.CSV_COLUMNS)
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
        # mean over the run of the per-row window averages
        "ms_fwd": 1e3 * float(df["time_fwd"].mean()) if len(df) else math.nan,
        "ms_bwd": 1e3 * float(df["time_bwd"].mean()) if len(df) else math.nan,
        "peak_mb": float(df["max_memory_mb"].max()) if len(df) else math.nan,
        "overflow_steps": int(last["overflow_steps"]) if last is not None else 0,
        # the iteration where the grid_exploited flag first rose (NaN: never): its NLLs game the grid
        "grid_exploited": (status.get("grid_exploited") or {}).get("iter", math.nan),
        "run": os.path.relpath(folder),
        "used": True,
        "_stamp": stamp,
    }
    return row, df


def find_runs(root):
    rows, curves = [], {}
    candidates = sorted({os.path.dirname(p) for p in glob.glob(os.path.join(root, "**", "args.csv"), recursive=True)})
    for d in sorted(glob.glob(os.path.join(root, "**", ""), recursive=True)):
        d = d.rstrip("/")
        if d == root.rstrip("/") or d in candidates or any(c.startswith(d + "/") for c in candidates):
            continue
        if os.path.basename(d) in ("slurm",):
            continue
        print(f"summarize.py: warning: skipping {d}: not a run folder (no args.csv)", file=sys.stderr)
    for d in candidates:
        try:
            row, df = load_run(d)
        except (ValueError, OSError, KeyError, pd.errors.ParserError) as e:
            print(f"summarize.py: warning: skipping {d}: {e}", file=sys.stderr)
            continue
        rows.append(row)
        curves[row["run"]] = df
    return rows, curves


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


def main(argv=None):
    p = argparse.ArgumentParser(description="Aggregate a sweep into statistics over seeds, a table and a figure.")
    p.add_argument("folder", help="a sweep folder, or any folder holding run folders")
    p.add_argument("--out", default=None, help="where to write summary.* (default: the folder)")
    a = p.parse_args(argv)
    if not os.path.isdir(a.folder):
        p.error(f"{a.folder!r} is not a folder")
    rows, curves = find_runs(a.folder)
    if not rows:
        print(f"summarize.py: error: no run folders under {a.folder}", file=sys.stderr)
        return 1
    runs = pd.DataFrame(rows, columns=[*RUN_COLUMNS, "_stamp"]).sort_values([*CELL, "seed", "run"]).reset_index(drop=True)
    runs = mark_duplicates(runs, warn=lambda m: print(m, file=sys.stderr)).drop(columns="_stamp")
    cells = cell_table(runs)
    out = a.out or a.folder
    os.makedirs(out, exist_ok=True)
    md = to_markdown(cells, runs)
    ex.atomic_write(os.path.join(out, "summary.csv"), cells.to_csv(index=False))
    ex.atomic_write(os.path.join(out, "summary_runs.csv"), runs.to_csv(index=False))
    ex.atomic_write(os.path.join(out, "summary.md"), md + "\n")
    plot(cells, runs, curves, os.path.join(out, "summary.png"))
    print(md)
    print(f"{len(runs)} runs in {len(cells)} cells; wrote summary.md, summary.csv, summary_runs.csv, summary.png "
          f"to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
