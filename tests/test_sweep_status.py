"""sweep_status.py from a sweep's files alone, fast (no run needed): what each job log and
status.json mean for a cell. (tests/test_summarize.py lists a real sweep as it runs.)"""
import json
import os
import subprocess
import sys

import sweep_status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep(tmp_path, cells=("a_s0", "b_s0")):
    sweep = tmp_path / "sweep"
    (sweep / "slurm").mkdir(parents=True)
    (sweep / "runs").mkdir()
    (sweep / "cells.tsv").write_text("".join(f"{k}\t{name}\t--niters 5\n" for k, name in enumerate(cells)))
    return sweep


def test_a_job_that_dies_before_its_first_line_failed_to_start(tmp_path):
    """A job that ends before job_cnf.sbatch's first line (here, really: a task id with no cell)
    is *failed to start*, with the error line as its reason, never *running*: its log will
    never change again."""
    sweep = _sweep(tmp_path)
    log = open(sweep / "slurm" / "local_1.out", "w")
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "7", "KIT_DIR": ROOT, "CNF_PYTHON": sys.executable}
    rc = subprocess.run(["bash", os.path.join(ROOT, "job_cnf.sbatch"), str(sweep)], stdout=log, stderr=subprocess.STDOUT,
                        env=env, cwd=ROOT, timeout=120).returncode
    log.close()
    assert rc == 2 and "no cell 7" in (sweep / "slurm" / "local_1.out").read_text()
    rows = {r["task"]: r for r in sweep_status.sweep_status(str(sweep))}
    assert rows[0]["state"] == "pending"
    assert rows[1]["state"] == "failed to start", rows[1]
    assert "no cell 7" in rows[1]["reason"]
    text = sweep_status.format_status(list(rows.values()), str(sweep))
    assert "1 failed to start" in text and "running" not in text


def test_a_job_whose_log_is_still_empty_is_running(tmp_path):
    """The moment between a job's shell opening its log and job_cnf.sbatch's first line: the
    cell is *running* (starting), not *failed to start*; once the log has an error line and no
    start line, it is *failed to start*."""
    sweep = _sweep(tmp_path)
    (sweep / "slurm" / "local_1.out").write_text("")
    rows = sweep_status.sweep_status(str(sweep))
    assert [r["state"] for r in rows] == ["pending", "running"], rows
    assert "failed" not in sweep_status.format_status(rows, str(sweep))
    (sweep / "slurm" / "local_1.out").write_text("job_cnf.sbatch: no cell 1 in cells.tsv\n")
    assert [r["state"] for r in sweep_status.sweep_status(str(sweep))] == ["pending", "failed to start"]


def test_a_disk_full_cell_is_resumable(tmp_path):
    """cnf.py's disk-full exit (6): with its status.json, or without one (the disk was too full
    to write it), the cell is disk_full, and run_cnf.sh --resume resubmits it."""
    sweep = _sweep(tmp_path)
    for task, name in ((0, "a_s0"), (1, "b_s0")):
        (sweep / "runs" / name).mkdir()
        (sweep / "runs" / name / "ckpt.pth").write_bytes(b"x")
        (sweep / "slurm" / f"local_{task}.out").write_text(
            f"[2026-12-01T10:00:00+00:00] cell {task} {name} on host (job local, restart 0, CUDA_VISIBLE_DEVICES=unset)\n"
            "cnf.py: disk full: could not write ckpt.pth (0.03 MB): No space left on device; ...\n"
            "[2026-12-01T10:00:05+00:00] cnf.py exit code: 6\n")
    (sweep / "runs" / "a_s0" / "status.json").write_text(json.dumps({"status": "disk_full", "exit_reason": "full"}))
    rows = sweep_status.sweep_status(str(sweep))
    assert [r["state"] for r in rows] == ["disk_full", "disk_full"]
    assert "No space left on device" in rows[1]["reason"]
    proc = subprocess.run(["bash", "run_cnf.sh", "--resume", str(sweep), "--dry-run"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "CNF_PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 0 and "2 of 2 cells not finished: 0 1" in proc.stdout, proc.stdout + proc.stderr
