"""A sweep at a glance: one row per cell of ``cells.tsv``, read from the sweep's files alone
(no SLURM command), so it works on a login node while the jobs run, and on a local sweep.

    python summarize.py SWEEP --status      (or: bash run_cnf.sh --status SWEEP)

Where each state comes from:

- the job logs ``slurm/<job>_<task>.out`` (SLURM) or ``slurm/local_<task>.out`` (local), which
  job_cnf.sbatch writes: a line ``[time] cell <task> <name> on <host> (job <id>, ...)`` when an
  attempt starts and ``[time] cnf.py exit code: <rc>`` when it ends. An attempt started and not
  ended is *running*; one that ended without the run writing its status is *failed to start*
  (or failed), with the error line of its log as the reason. A log that is still empty is a job
  starting (its shell opened the log; the first line comes next): *running*;
- the run's ``status.json`` (completed, diverged, interrupted, disk_full, or any status a newer kit
  writes); a job that exited with cnf.py's disk-full code (6) without a status is *disk_full* too:
  free space and ``run_cnf.sh --resume`` continues it;
- neither: *pending* (queued, or not yet submitted).

The last iteration and validation NLL come from the run's CSV, ms/iter from its last row
(forward + backward of the training step), and the ETA from the wall-clock rate of the current
attempt (args.csv is rewritten when an attempt starts, with ``resumed_at_iter``) times the
iterations left; a running cell at its last iteration is *evaluating* (test NLL,
exact likelihood, density.npz). "updated" is the age of the cell's newest file: a running cell
whose files stop changing may have been killed without a word (SIGKILL, a lost node).
"""
import csv
import datetime
import glob
import json
import math
import os
import re
import time

import experiment as ex

ORDER = ("completed", "running", "pending", "interrupted", "disk_full", "diverged", "failed to start", "failed")
EXIT_DISK_FULL = 6  # cnf.py's exit code for a full disk or quota: the cell is resumable
START = re.compile(r"^\[(?P<time>[^\]]+)\] cell (?P<task>\d+) (?P<name>\S+) on (?P<host>\S+) \(job (?P<job>[^,]+),")
END = re.compile(r"^\[(?P<time>[^\]]+)\] cnf\.py exit code: (?P<rc>-?\d+)")


class SweepError(ValueError):
    """A folder that is not a sweep, or a damaged cells.tsv; the message is one line."""


def read_cells(sweep):
    """[(task id, cell name, cnf.py arguments)] from the sweep's cells.tsv."""
    path = os.path.join(sweep, "cells.tsv")
    if not os.path.isfile(path):
        raise SweepError(f"{sweep}: not a sweep folder (no cells.tsv)")
    cells = []
    with open(path) as f:
        for k, line in enumerate(f, start=1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3 or not parts[0].isdigit():
                raise SweepError(f"{path} line {k}: expected <task id> TAB <cell name> TAB <arguments>")
            cells.append((int(parts[0]), parts[1], parts[2]))
    return cells


def _time(text):
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return math.nan


def read_log(path):
    """The last attempt in a job log: {job, start, end, rc, reason}; end and rc None while it runs."""
    with open(path, errors="replace") as f:
        lines = f.read().splitlines()
    starts = [k for k, ln in enumerate(lines) if START.match(ln)]
    if not starts and not any(ln.strip() for ln in lines):  # just opened: job_cnf.sbatch's first line comes next
        return {"job": None, "start": os.path.getmtime(path), "end": None, "rc": None, "reason": "starting",
                "attempts": 0, "starting": True}
    if not starts:  # the job failed before job_cnf.sbatch's first line (e.g. no such cell)
        return {"job": None, "start": os.path.getmtime(path), "end": os.path.getmtime(path), "rc": None,
                "reason": _reason(lines), "attempts": 0}
    m = START.match(lines[starts[-1]])
    attempt = lines[starts[-1] + 1:]
    end = next((END.match(ln) for ln in attempt if END.match(ln)), None)
    return {"job": m["job"], "start": _time(m["time"]), "end": _time(end["time"]) if end else None,
            "rc": int(end["rc"]) if end else None, "reason": _reason(attempt), "attempts": len(starts)}


def _reason(lines):
    """The line of a failed attempt's log that says why: an error line, else the last line of output."""
    text = [ln.strip() for ln in lines if ln.strip() and not END.match(ln)]
    errors = [ln for ln in text if re.search(r"error|Error|No such file|not found|Killed|CANCELLED", ln)]
    return (errors or text or ["(empty log)"])[-1][:160]


def _job_label(path, log):
    base = os.path.basename(path)
    if base.startswith("local_"):
        return "local"
    m = re.match(r"(\d+)_(\d+)\.out$", base)
    if m:
        return f"{m[1]}_{m[2]}"
    return log["job"] or "?"


def _last_row(path):
    """The last row of a run CSV as a dict of strings, or None (no file, no rows, unreadable)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return None
    return rows[-1] if rows else None


def _float(row, key):
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        return math.nan


def cell_status(sweep, task, name, now=None):
    """One row of the listing: a dict of the cell's state and progress."""
    now = time.time() if now is None else now
    run = ex.RunDir(os.path.join(sweep, "runs", name))
    logs = sorted(glob.glob(os.path.join(sweep, "slurm", f"*_{task}.out")), key=os.path.getmtime)
    log = read_log(logs[-1]) if logs else None
    status = None
    if os.path.isfile(run.status):
        try:
            with open(run.status) as f:
                status = json.load(f)
        except (OSError, json.JSONDecodeError):
            status = {"status": "unreadable status.json", "exit_reason": ""}
    row = {"task": task, "cell": name, "state": "pending", "reason": "", "iter": None, "niters": None,
           "val_nll": math.nan, "ms_iter": math.nan, "eta_s": math.nan, "job": _job_label(logs[-1], log) if log else "",
           "updated_s": math.nan}
    status_time = os.path.getmtime(run.status) if status else -math.inf
    if log is not None and log["rc"] is None and (log["attempts"] > 0 or log.get("starting")):
        row["state"] = "running"
    elif status is not None and not (log is not None and log["rc"] not in (None, 0) and log["start"] > status_time):
        row["state"] = str(status.get("status", "?"))
        if row["state"] != "completed":
            row["reason"] = str(status.get("exit_reason", ""))
    elif log is not None and log["rc"] == EXIT_DISK_FULL:
        row["state"] = "disk_full"  # status.json could not be written either; resumable (run_cnf.sh --resume)
        row["reason"] = log["reason"]
    elif log is not None:
        started = os.path.isfile(run.ckpt)
        row["state"] = "failed" if started else "failed to start"
        row["reason"] = f"exit {log['rc']}: {log['reason']}" if log["rc"] is not None else log["reason"]
    elif os.path.isfile(run.file("args.csv")):
        row["state"] = "running"  # run by hand, without a job log
    files = [p for p in (run.csv, run.log, run.status, logs[-1] if logs else None) if p and os.path.isfile(p)]
    if files:
        row["updated_s"] = now - max(os.path.getmtime(p) for p in files)
    args = {}
    if os.path.isfile(run.file("args.csv")):
        try:
            args = ex.read_args(run.file("args.csv"))
        except (OSError, KeyError, csv.Error, UnicodeDecodeError):
            args = {}
    try:
        row["niters"] = int(args["niters"])
    except (KeyError, ValueError):
        pass
    last = _last_row(run.csv)
    if last is not None:
        it = _float(last, "iter")
        row["iter"] = int(it) if math.isfinite(it) else None
        row["val_nll"] = _float(last, "val_loss")
        row["ms_iter"] = 1e3 * (_float(last, "time_fwd") + _float(last, "time_bwd"))
    if row["state"] == "running" and row["iter"] is not None and row["niters"]:
        # wall-clock rate of this attempt: from its args.csv (written as it started) to the CSV's last row
        t0, t1 = os.path.getmtime(run.file("args.csv")), os.path.getmtime(run.csv)
        done = row["iter"] - int(float(args.get("resumed_at_iter", 0) or 0))
        rate = (t1 - t0) / done if done > 0 and t1 > t0 else row["ms_iter"] / 1e3
        row["eta_s"] = max(0, row["niters"] - row["iter"]) * rate
    return row


def sweep_status(sweep, now=None):
    """The rows of every cell in cells.tsv, in task order. Raises SweepError."""
    return [cell_status(sweep, task, name, now) for task, name, _ in read_cells(sweep)]


def format_status(rows, sweep):
    """The listing as text: a header, one line per cell, and a total line."""
    table = [("task", "cell", "state", "iter", "val NLL", "ms/iter", "ETA", "job", "updated", "reason")]
    for r in rows:
        it = "—" if r["iter"] is None else f"{r['iter']}" + (f"/{r['niters']}" if r["niters"] else "")
        table.append((str(r["task"]), r["cell"], r["state"], it,
                      "—" if r["iter"] is None else f"{r['val_nll']:.4f}",  # nan is a diverging run's value
                      f"{r['ms_iter']:.1f}" if math.isfinite(r["ms_iter"]) else "—",
                      "evaluating" if r["state"] == "running" and r["iter"] is not None and r["niters"]
                      and r["iter"] >= r["niters"] else ex.duration(r["eta_s"]), r["job"] or "—",
                      ex.duration(r["updated_s"]) + " ago" if math.isfinite(r["updated_s"]) else "—", r["reason"]))
    widths = [max(len(t[k]) for t in table) for k in range(len(table[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(t[:-1], widths)) + "  " + t[-1] for t in table]
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    known = [s for s in ORDER if s in counts] + sorted(s for s in counts if s not in ORDER)  # new states too
    total = f"total: {len(rows)} cells: " + ", ".join(f"{counts[s]} {s}" for s in known)
    etas = [r["eta_s"] for r in rows if r["state"] == "running" and math.isfinite(r["eta_s"])]
    if etas:
        total += f"; the running cells end training in about {ex.duration(max(etas))}"
    jobs = sorted({r["job"].rsplit("_", 1)[0] for r in rows if r["job"] and r["job"] not in ("local", "?")})
    if jobs:
        total += f"; SLURM job(s) {', '.join(jobs)}"
    return "\n".join([f"sweep {sweep}", *[ln.rstrip() for ln in lines], total])
