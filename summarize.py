"""Aggregate a sweep (or any folder of runs) into statistics over seeds and paired
comparisons against float32: the loading and the statistics live here, the tables'
formatting in ``tables.py`` and the figures in ``plots.py``.

    python summarize.py results/sweep_.../ [--out DIR] [--backfill]
    python summarize.py results/sweep_.../ --status      # one line per cell of a (running) sweep

Reads every run folder's args.csv, CSV, status.json and test_logp.npy below the
given folder. For each dataset x solver x precision x scaler ("cell") it reports
the mean and standard deviation over the completed seeds, and compares every
cell with the float32 run of the same dataset, solver and seed (its "twin"):

- across seeds: the mean difference in test NLL with a 95 % Student-t interval
  over the seed pairs, and whether that interval contains 0 (with fewer than
  three pairs the interval is marked *indicative*);
- point by point: the runs of one seed share their test set, so the per-point
  NLL differences give a mean and standard error conditional on the trained
  models, far tighter than the spread over seeds.

Writes summary.md, summary.csv (one row per cell), summary_runs.csv (one row
per run), summary.png, answer.png (per dataset the paired differences beside time and
memory relative to float32), summary.tex (a booktabs table for a paper; every number
in it is formatted from summary.csv's row), summary_standalone.tex (the same as
a complete document) and overview.png/.pdf (each cell's learned density, from
the runs' density.npz; --backfill first writes it from the checkpoints of runs
that lack it) into the folder, or --out, each atomically, the numbers before the
figures. A folder without runs, or a single run whose files are damaged, is a
one-line error with exit code 2; a full disk, one line naming what was and was not
written, exit code 6. Diverged and interrupted runs are counted and listed, never
dropped; folders that are not runs, and runs that cannot be read, are skipped with
a warning. Several runs of the same cell and seed (two sweeps under one folder,
say) are not independent samples: the newest completed one is used, the others
are listed as ignored, with a warning.
"""
import csv
import glob
import json
import math
import os
import sys

import experiment as ex


FIGURES = ("summary.png", "answer.png", "overview.png", "overview.pdf")  # what --no-figures leaves undrawn


def build_parser():
    """summarize.py's flags (bad ones: one line, exit code 2)."""
    p = ex.OneLineParser(prog="summarize.py",
                         description="Aggregate a sweep into statistics over seeds, tables and figures.")
    p.add_argument("folder", help="a sweep folder, or any folder holding run folders")
    p.add_argument("--out", default=None, help="where to write summary.* and overview.* (default: the folder)")
    p.add_argument("--status", action="store_true",
                   help="list every cell of the sweep (cells.tsv) with its state and progress, and exit")
    p.add_argument("--backfill", action="store_true",
                   help="first write density.npz, from their checkpoints, for completed runs that lack it")
    p.add_argument("--no-figures", dest="figures", action="store_false",
                   help="write the tables only (summary.md, .csv, _runs.csv, .tex); run it again without this "
                        "flag for the figures")
    return p


if __name__ == "__main__":
    ex.quiet_exits("summarize.py")  # Ctrl-C or a full disk: one line and an exit code, never a traceback
    build_parser().parse_args()  # a bad flag or --help is answered now, before the heavy imports; main() parses again

import numpy as np  # noqa: E402  (after the flags are checked)
import pandas as pd  # noqa: E402
from scipy import special  # noqa: E402  (stdtrit: Student-t quantiles; scipy.stats, which calls it, loads ~1 s more)

import density  # noqa: E402
import plots  # noqa: E402
import sweep_status  # noqa: E402
import tables  # noqa: E402
import toy_data  # noqa: E402
from choices import scaler_label  # noqa: E402

CELL = ["data", "solver", "precision", "scaler"]
RUN_COLUMNS = [*CELL, "seed", "status", "iter", "test_nll", "test_nll_se", "test_gap", "val_nll", "val_nll_se",
               "nll_gap", "val_nll_exact", "disc_gap", "val_mmd", "test_mmd", "test_mmd_se", "ms_fwd", "ms_bwd",
               "ms_iter", "peak_mb", "overflow_steps", "grid_exploited", "run", "used"]
# Aggregated over the completed seeds of a cell: mean and sd of each.
STATS = ["test_nll", "test_nll_se", "test_gap", "val_nll", "nll_gap", "val_nll_exact", "disc_gap", "val_mmd",
         "test_mmd", "ms_fwd", "ms_bwd", "ms_iter", "peak_mb"]
REFERENCE = ("float32", "none")  # the twin every cell is compared with: same data, solver and seed
CONFIDENCE = 0.95
MIN_SEEDS = 3  # fewer seed pairs than this: the paired interval is marked indicative (docs/sweeps.md)


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
    half = special.stdtrit(n - 1, 0.5 + confidence / 2) * sd / math.sqrt(n)
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
    """'2 completed, 1 diverged': how many runs ended in each status (its first word)."""
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
                   ci_contains_0="" if not math.isfinite(lo) else ("yes" if lo <= 0 <= hi else "no"),
                   ci_level=CONFIDENCE, indicative=bool(math.isfinite(lo) and len(pairs) < MIN_SEEDS))
        row["point_diff_mean"], row["point_diff_se"], row["point_diff_seeds"] = pointwise_difference(
            [(r.run, t.run) for r, t in pairs])
        row["reference"] = is_ref
        out.append(row)
    return pd.DataFrame(out)


# --- the overview figure's panels (plots.plot_overview draws them) -------------------------
TARGET_SAMPLES = 1_000_000  # the target panel: a histogram of this many data points on the density grid


def column_label(r):
    """An overview column's header: precision · scaler, then the solver."""
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
    cells = tables.cell_order(cells)
    datasets = sorted(cells["data"].unique())
    order = tables.cell_order(cells.drop_duplicates(["precision", "scaler", "solver"]).assign(data=""))
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
        d = tables.decimals(tables.standard_error(r.test_nll_sd, r.n, r.test_nll_se_mean))
        n = f"n={r.n}" if r.n == r.runs else f"n={r.n}/{r.runs}"
        rep = representative_run(runs, r)
        title = f"{tables.format_pm(r.test_nll_mean, r.test_nll_sd, d)}{overview_marks(r)} ({n})\nseed {int(rep.seed)}"
        try:
            arrays = density.load(rep.run)
        except ValueError as e:
            print(f"summarize.py: warning: {e} (write it with: python summarize.py FOLDER --backfill)",
                  file=sys.stderr)
            panels[(r.data, label)] = {"title": title, "text": "no density.npz\n(--backfill)"}
            continue
        panels[(r.data, label)] = {"title": title, "image": arrays["logp"], "limit": float(arrays["limit"])}
    return datasets, columns, panels


def overview_marks(r):
    """The table's marks as plain characters: †, ‡ and § (see ``tables.tex_marks``)."""
    return (("†" if r.ci_contains_0 == "no" else "") + ("‡" if getattr(r, "grid_exploited", 0) else "")
            + ("§" if getattr(r, "indicative", False) else ""))


def overview_caption(cells):
    """The overview figure's caption; each mark is explained only when a panel carries it."""
    done = cells[cells["n"] > 0]
    text = ("Model density at t = 1 of each cell's representative seed (the completed seed with the median "
            "test NLL; the lower middle one for an even count), each panel on its own colour scale from 0.\n"
            "Titles: test NLL in nats, mean ± sd over the completed seeds (n; n/m when only n of m runs "
            "completed), and the seed shown.")
    if (done["ci_contains_0"] == "no").any():
        text += f" †: the {CONFIDENCE:.0%} paired interval against float32 excludes 0 (as in summary.tex)."
    if (done["grid_exploited"] > 0).any():
        text += " ‡: a completed seed raised grid_exploited (its NLL games the time grid)."
    if done["indicative"].any():
        text += f" §: indicative only: the paired interval rests on fewer than {MIN_SEEDS} seed pairs."
    return text


def write_overview(cells, runs, out):
    """overview.png and overview.pdf of the cells into ``out`` (``plots.plot_overview``)."""
    datasets, columns, panels = overview_panels(cells, runs)
    plots.plot_overview(datasets, columns, panels, os.path.join(out, "overview.png"), os.path.join(out, "overview.pdf"),
                        caption=overview_caption(cells))


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
    """Summarize a folder of runs (or list a sweep's cells with --status). Exit 0, 2 for bad
    input, 6 when the disk fills (what was written and what was not are named)."""
    p = build_parser()
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
    md = tables.to_markdown(cells, runs)
    if skipped:
        md += "\n\n#### Run folders that could not be read (skipped)\n\n" + "\n".join(
            f"- `{d}`: {why}" for d, why in skipped)
    tex = tables.to_latex(cells)
    # the numbers first, then the figures: a full disk keeps every file it finished, whole
    outputs = [("summary.csv", lambda path: ex.atomic_write(path, cells.to_csv(index=False))),
               ("summary_runs.csv", lambda path: ex.atomic_write(path, runs.to_csv(index=False))),
               ("summary.md", lambda path: ex.atomic_write(path, md + "\n")),
               ("summary.tex", lambda path: ex.atomic_write(path, tex)),
               ("summary_standalone.tex", lambda path: ex.atomic_write(path, tables.latex_standalone(tex)))]
    if a.figures:
        outputs += [("summary.png", lambda path: plots.plot_summary(cells, runs, curves, path)),
                    ("answer.png", lambda path: plots.plot_answer(cells, path)),
                    ("overview.png and .pdf", lambda path: write_overview(cells, runs, out))]
    for k, (name, write) in enumerate(outputs):
        try:
            write(os.path.join(out, name))
        except ex.DiskFull as e:
            done = ", ".join(n for n, _ in outputs[:k]) or "nothing"
            print(f"summarize.py: disk full: {e.line()}; written whole: {done}; not written: "
                  f"{', '.join(n for n, _ in outputs[k:])}; "
                  f"free some space and run it again", file=sys.stderr)
            return ex.EXIT_DISK_FULL
    print(md)
    wrote = ".png, summary_runs.csv, answer.png, overview.png, .pdf" if a.figures else "summary_runs.csv (no figures)"
    print(f"{len(runs)} runs in {len(cells)} cells" + (f" ({len(skipped)} run folders skipped)" if skipped else "")
          + f"; wrote summary.md, .csv, .tex, _standalone.tex, {wrote} to {out}")
    stale = [f for f in FIGURES if not a.figures and os.path.exists(os.path.join(out, f))]
    if stale:  # figures drawn from an earlier state of the runs, beside tables of the present one
        print(f"summarize.py: warning: figures of an earlier summary left in {out}: {', '.join(stale)}; "
              "run it without --no-figures to redraw them", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
