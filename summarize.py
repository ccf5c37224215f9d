"""Aggregate a sweep (or any folder of runs) into one table and one figure.

    python summarize.py results/sweep_.../ [--out DIR]

Reads every run folder's args.csv, CSV and status.json below the given folder,
prints a markdown table grouped by dataset, and writes summary.csv,
summary.md and summary.png (into the folder, or --out). Runs that diverged or
were interrupted are listed with their status; folders that are not runs are
skipped with a warning.
"""
import argparse
import glob
import io
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

import experiment as ex  # noqa: E402
import toy_data  # noqa: E402
from precision import scaler_label  # noqa: E402

COLUMNS = ["data", "solver", "precision", "scaler", "status", "iter", "val_nll", "nll_gap", "val_mmd",
           "ms_fwd", "ms_bwd", "peak_mb", "overflow_steps", "run"]


def _flag(args, key):
    return str(args.get(key, "False")) == "True"


def load_run(folder):
    """One summary row and the run's CSV, or raise ValueError if this is not a run folder."""
    run = ex.RunDir(folder)
    if not os.path.isfile(run.file("args.csv")):
        raise ValueError("no args.csv")
    args = ex.read_args(run.file("args.csv"))
    status = {"status": "unknown (no status.json: still running or killed)"}
    if os.path.isfile(run.status):
        with open(run.status) as f:
            status = json.load(f)
    df = pd.read_csv(run.csv) if os.path.isfile(run.csv) else pd.DataFrame(columns=ex.CSV_COLUMNS)
    last = df.iloc[-1] if len(df) else None
    get = lambda k: float(last[k]) if last is not None else float("nan")  # noqa: E731
    row = {
        "data": args.get("data"), "solver": args.get("odeint"), "precision": args.get("precision"),
        "scaler": scaler_label(args.get("odeint"), args.get("precision"), _flag(args, "no_grad_scaler"),
                               _flag(args, "no_dynamic_scaler"), _flag(args, "grad_scaler")),
        "status": status["status"], "iter": status.get("iter", int(last["iter"]) if last is not None else 0),
        "val_nll": get("val_loss"), "nll_gap": get("nll_gap"), "val_mmd": get("val_mmd"),
        # mean over the run of the per-row window averages
        "ms_fwd": 1e3 * float(df["time_fwd"].mean()) if len(df) else float("nan"),
        "ms_bwd": 1e3 * float(df["time_bwd"].mean()) if len(df) else float("nan"),
        "peak_mb": float(df["max_memory_mb"].max()) if len(df) else float("nan"),
        "overflow_steps": int(last["overflow_steps"]) if last is not None else 0,
        "run": os.path.relpath(folder),
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


def to_markdown(table):
    out = []
    for data, g in table.groupby("data", sort=True):
        floor = toy_data.ENTROPY.get(data, float("nan"))
        out.append(f"### {data} (true entropy {floor:.4f} nats)\n")
        out.append("| solver | precision | scaler | status | val NLL | NLL gap | val MMD | fwd ms/iter | bwd ms/iter "
                   "| peak MB | overflow steps |")
        out.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for _, r in g.sort_values(["solver", "precision", "scaler"]).iterrows():
            out.append(f"| {r.solver} | {r.precision} | {r.scaler} | {r.status} | {r.val_nll:.4f} | {r.nll_gap:+.4f} "
                       f"| {r.val_mmd:.2e} | {r.ms_fwd:.0f} | {r.ms_bwd:.0f} | {r.peak_mb:.0f} | {r.overflow_steps} |")
        out.append("")
    return "\n".join(out)


def plot(table, curves, out_png):
    datasets = sorted(table["data"].unique())
    n = len(datasets)
    fig, axes = plt.subplots(1, n + 2, figsize=(4.6 * (n + 2), 4 + 0.12 * len(table)), squeeze=False)
    axes = axes[0]
    for a, data in zip(axes, datasets):
        for _, r in table[table["data"] == data].iterrows():
            df = curves[r.run]
            if len(df):
                a.plot(df["iter"], df["val_loss"], "o-", ms=3, label=f"{r.solver} {r.precision} {r.scaler}"
                       + ("" if r.status == "completed" else f" ({r.status.split()[0]})"))
        a.axhline(toy_data.ENTROPY[data], color="k", ls=":", lw=1)
        a.set(title=f"{data}: val NLL", xlabel="iteration", ylabel="nats")
        a.legend(fontsize=6)
    labels = [f"{r.data} {r.solver}\n{r.precision} {r.scaler}" for _, r in table.iterrows()]
    y = range(len(table))
    axes[n].barh(y, table["ms_fwd"], label="forward")
    axes[n].barh(y, table["ms_bwd"], left=table["ms_fwd"], label="backward")
    axes[n].set(title="time per iteration", xlabel="ms")
    axes[n].set_yticks(list(y), labels, fontsize=6)
    axes[n].legend(fontsize=7)
    axes[n + 1].barh(y, table["peak_mb"], color="tab:green")
    axes[n + 1].set(title="peak memory", xlabel="MB")
    axes[n + 1].set_yticks(list(y), labels, fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    ex.atomic_write(out_png, buf.getvalue())


def main(argv=None):
    p = argparse.ArgumentParser(description="Aggregate a sweep into a table and a figure.")
    p.add_argument("folder", help="a sweep folder, or any folder holding run folders")
    p.add_argument("--out", default=None, help="where to write summary.* (default: the folder)")
    a = p.parse_args(argv)
    if not os.path.isdir(a.folder):
        p.error(f"{a.folder!r} is not a folder")
    rows, curves = find_runs(a.folder)
    if not rows:
        print(f"summarize.py: error: no run folders under {a.folder}", file=sys.stderr)
        return 1
    table = pd.DataFrame(rows, columns=COLUMNS).sort_values(["data", "solver", "precision", "scaler"])
    out = a.out or a.folder
    os.makedirs(out, exist_ok=True)
    md = to_markdown(table)
    ex.atomic_write(os.path.join(out, "summary.csv"), table.to_csv(index=False))
    ex.atomic_write(os.path.join(out, "summary.md"), md + "\n")
    plot(table, curves, os.path.join(out, "summary.png"))
    print(md)
    print(f"{len(table)} runs; wrote summary.csv, summary.md, summary.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
