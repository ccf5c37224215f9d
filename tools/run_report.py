"""One line on a cnf.py run: its status, the backend that ran, and its speed.

    python -m tools.run_report RESULTS_DIR_OR_RUN [--expect-backend triton] [--log-tail FILE]

Reads the run folder alone (status.json, the CSV, the log). ms/iter is the median over
the CSV rows of time_fwd + time_bwd (each row's mean since the previous row).
Exit 0, or 1 when the run did not complete or ran another backend than
``--expect-backend`` (the line then says why), 2 for a missing run.
"""
import glob
import json
import os
import statistics
import sys

import pandas as pd

import experiment as ex


def find_run(path):
    """``path`` itself if it holds status.json or args.csv, else its one run folder."""
    if any(os.path.isfile(os.path.join(path, f)) for f in ("status.json", "args.csv")):
        return path
    runs = sorted(d for d in glob.glob(os.path.join(path, "*")) if os.path.isdir(d))
    if len(runs) != 1:
        raise ValueError(f"{path}: expected one run folder, found {len(runs)}")
    return runs[0]


def report(run, expect_backend=None):
    """(line, ok)."""
    folder = ex.RunDir(run)
    if not os.path.isfile(folder.status):
        return f"cnf-run FAILED: {run} has no status.json: the run was stopped before it ended", False
    status = json.load(open(folder.status))
    backend, note = status.get("backend", "unknown"), status.get("backend_note", "")
    speed = ""
    if os.path.isfile(folder.csv):
        rows = pd.read_csv(folder.csv)
        if len(rows):
            ms = statistics.median(1e3 * (rows["time_fwd"] + rows["time_bwd"]))
            speed = f", {int(rows['iter'].iloc[-1])} iterations at {ms:.2f} ms/iter (median of {len(rows)} rows)"
    line = f"cnf run: {status['status']}, backend {backend}{speed}"
    problems = []
    if status["status"] != "completed":
        problems.append(f"{status['status']}: {status.get('exit_reason', '')}")
    if expect_backend and backend != expect_backend:
        problems.append(f"ran backend {backend}, not {expect_backend}" + (f" ({note})" if note else ""))
    if problems:
        line = "cnf-run FAILED " + line + "; " + "; ".join(problems)
    return line, not problems


def main(argv=None):
    """Print the line on a run; exit 0 (fine), 1 (did not complete, or another backend), 2 (no run)."""
    p = ex.OneLineParser(prog="python -m tools.run_report", description=__doc__.split("\n")[0])
    p.add_argument("path", help="a cnf.py run folder, or a --results_dir holding one")
    p.add_argument("--expect-backend", default=None, choices=("triton", "torch"),
                   help="a run on another backend is a failure (e.g. auto fell back to torch)")
    p.add_argument("--log-tail", default=None, metavar="FILE", help="also copy the log's last 40 lines here")
    p.add_argument("--lines", type=int, default=40, help="lines of the log's tail")
    args = p.parse_args(argv)
    try:
        run = find_run(args.path)
    except (ValueError, OSError) as e:
        print(f"cnf-run FAILED: {e}")
        return 2
    line, ok = report(run, args.expect_backend)
    print(line)
    if args.log_tail:
        log = ex.RunDir(run).log
        if os.path.isfile(log):
            with open(log) as f:
                tail = f.readlines()[-args.lines:]
            with open(args.log_tail, "w") as f:
                f.writelines(tail)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
