"""tools/gpu_check.sh's plumbing, with stubs in place of the GPU and its steps.

GPU_CHECK_STUBS=DIR runs DIR/probe instead of the CUDA probe and DIR/<step> instead of
each step's command, with the same arguments; GPU_CHECK_TIME_SCALE shrinks every limit,
so a stub that sleeps past its limit times out in a second. What is checked: the step
limits fit the slot, a failed and a timed-out step are recorded and do not stop the
next, a cnf run on the torch backend is a failed step with its reason, the result
folder's files, the archive without checkpoints, the Python choice, and the one-line
exit 2 without a GPU or without a Python that imports torch.
"""
import json
import os
import re
import stat
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
SMALL_FILES = {"summary.txt", "versions.txt", "bench_table.md", "bench.json", "cnf_log_tail.txt", "sweep_table.md",
               "profile.txt"}


def _script(path, body):
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _arg(name):  # bash: the value after flag $name among "$@"
    return f'v=; prev=; for a in "$@"; do [ "$prev" = {name} ] && v=$a; prev=$a; done\n'


def make_stubs(tmp_path, backend="triton", probe_rc=0):
    d = tmp_path / "stubs"
    d.mkdir()
    _script(d / "probe", f"exit {probe_rc}\n")
    _script(d / "compile", 'echo "compiled $*"\n')
    _script(d / "pytest", 'echo "1 failed, 20 passed"; exit 1\n')
    _script(d / "bench", _arg("--json") + 'json=$v\n' + _arg("--table") + 'table=$v\n'
            'echo "| path | ms/iter |" > "$table"; echo "| triton | 2.5 |" >> "$table"\n'
            'echo \'{"rows": [{"path": "triton", "ms_iter": 2.5}]}\' > "$json"\n')
    note = "" if backend == "triton" else "backend auto -> torch: the fused kernels failed their self-test: z differs"
    status = json.dumps({"status": "completed", "exit_reason": "trained 4 iterations", "iter": 4, "final": {},
                         "backend": backend, "backend_note": note})
    _script(d / "cnf", _arg("--results_dir") + 'run=$v/r1; mkdir -p "$run"; echo "triton cache $TRITON_CACHE_DIR"\n'
            f"echo '{status}' > \"$run/status.json\"\n"
            'printf "iter,time_fwd,time_bwd\\n2,0.001,0.002\\n4,0.001,0.003\\n" > "$run/r1.csv"\n'
            'for i in $(seq 1 60); do echo "log line $i"; done > "$run/r1.txt"\n'
            'head -c 1000 /dev/zero > "$run/ckpt.pth"; head -c 10 /dev/zero > "$run/ckpt.pth.tmp"\n')
    _script(d / "sweep", 'echo "| float32 | forward | 4 | 4 | 0.1 | 0 |"; sleep 30\n')
    _script(d / "profile", 'echo "Self CUDA time total"\n')
    return d


def run(tmp_path, stubs, *, tune=True, out="out", extra_env=None):
    env = {**os.environ, "GPU_CHECK_STUBS": str(stubs), "GPU_CHECK_TIME_SCALE": "0.03",
           "GPU_CHECK_TUNE": "1" if tune else "0", "PYTHON": sys.executable, **(extra_env or {})}
    return subprocess.run(["bash", SCRIPT, str(tmp_path / out)], capture_output=True, text=True, env=env, timeout=300)


def summary(tmp_path, out="out"):
    lines = open(tmp_path / out / "summary.txt").read().splitlines()
    steps = {}
    for line in lines:
        m = re.match(r"(\w+)\s+(ok|FAILED|TIMEOUT)\s+rc=(\d+)\s+wall=\s*([\d.]+)s limit=(\d+)s", line)
        if m:
            steps[m[1]] = (m[2], int(m[3]), int(m[5]))
    return lines, steps


def test_steps_failures_timeouts_and_results(tmp_path):
    proc = run(tmp_path, make_stubs(tmp_path))
    assert proc.returncode == 1, proc.stderr
    lines, steps = summary(tmp_path)
    assert list(steps) == ["compile", "pytest", "bench", "cnf", "sweep", "profile"]
    assert steps["compile"][:2] == ("ok", 0) and steps["bench"][:2] == ("ok", 0)
    assert steps["pytest"][:2] == ("FAILED", 1)  # a failed step is recorded, and the next steps still run
    assert steps["sweep"][:2] == ("TIMEOUT", 124)  # a timed-out step too
    assert steps["profile"][:2] == ("ok", 0)
    cnf_line = next(l for l in lines if l.startswith("cnf run:"))
    assert "backend triton" in cnf_line and "4 iterations at 3.50 ms/iter" in cnf_line
    assert lines[-1].startswith("gpu_check: a step failed")
    # the limits: compile includes the sweep's variants when tuning; the total fits 8 minutes
    assert sum(limit for _, _, limit in steps.values()) <= 480
    out = tmp_path / "out"
    files = set(os.listdir(out))
    assert files == SMALL_FILES | {"everything.tar.gz"}, files
    assert "| triton | 2.5 |" in (out / "bench_table.md").read_text()
    assert json.loads((out / "bench.json").read_text())["rows"][0]["path"] == "triton"
    assert (out / "sweep_table.md").read_text().startswith("| float32 | forward |")  # what the sweep printed before its limit
    assert (out / "cnf_log_tail.txt").read_text().splitlines()[-1] == "log line 60"
    assert "python " + sys.executable in (out / "versions.txt").read_text()
    with tarfile.open(out / "everything.tar.gz") as tar:
        names = tar.getnames()
    assert {"./compile.log", "./pytest.log", "./bench.log", "./cnf.log", "./sweep.log", "./profile.log"} <= set(names)
    assert "./runs/r1/status.json" in names and not [n for n in names if "ckpt" in n], names
    with tarfile.open(out / "everything.tar.gz") as tar:  # the cnf run had an empty Triton cache of its own
        assert "cold_triton_cache" in tar.extractfile("./cnf.log").read().decode()


def test_a_fallback_to_torch_is_a_failed_step_with_its_reason(tmp_path):
    stubs = make_stubs(tmp_path, backend="torch")
    _script(stubs / "pytest", "exit 0\n")
    proc = run(tmp_path, stubs, tune=False)
    assert proc.returncode == 1
    lines, steps = summary(tmp_path)
    assert all(v[0] == "ok" for v in steps.values())
    line = next(l for l in lines if "cnf run:" in l)
    assert line.startswith("cnf-run FAILED") and "ran backend torch, not triton" in line
    assert "failed their self-test: z differs" in line


def test_every_step_passing_exits_0(tmp_path):
    stubs = make_stubs(tmp_path)
    _script(stubs / "pytest", "exit 0\n")
    _script(stubs / "sweep", 'echo "| float32 | forward | 4 | 4 | 0.1 | 0 |"\n')
    proc = run(tmp_path, stubs)
    assert proc.returncode == 0, open(tmp_path / "out" / "summary.txt").read()
    assert open(tmp_path / "out" / "summary.txt").read().splitlines()[-1] == "gpu_check: every step passed"


def test_no_gpu_stops_at_once_with_one_line(tmp_path):
    proc = run(tmp_path, make_stubs(tmp_path, probe_rc=1))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no CUDA GPU" in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "out").exists()


def test_default_steps_fit_six_minutes_and_the_python_choice(tmp_path):
    """Without --tune the steps are compile, pytest, bench and cnf, in at most 6 minutes. Without
    PYTHON the first of python3, python that imports torch runs the steps; PYTHON overrides; none
    that imports torch is exit 2 with one line. (Each whole run starts two interpreters cold, as
    the script unsets TRITON_INTERPRET: one run checks both.)"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "python3", "exit 1\n")  # a python3 without torch
    _script(bin_dir / "python", f'exec {sys.executable} "$@"\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": ""}
    stubs = make_stubs(tmp_path)
    proc = run(tmp_path, stubs, tune=False, extra_env=env)
    assert proc.returncode == 1, proc.stderr  # the stub pytest fails
    _, steps = summary(tmp_path)
    assert list(steps) == ["compile", "pytest", "bench", "cnf"]
    assert sum(limit for _, _, limit in steps.values()) <= 360
    assert not (tmp_path / "out" / "sweep_table.md").exists()
    assert f"python {bin_dir}/python" in (tmp_path / "out" / "versions.txt").read_text()
    proc = run(tmp_path, stubs, tune=False, out="out2", extra_env={**env, "PYTHON": str(bin_dir / "python3")})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "imports torch" in proc.stderr
    os.remove(bin_dir / "python")
    proc = run(tmp_path, stubs, tune=False, out="out3", extra_env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "set PYTHON" in proc.stderr
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_results_are_never_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.txt").write_text("an earlier check\n")
    proc = run(tmp_path, make_stubs(tmp_path))
    assert proc.returncode == 2 and "already holds results" in proc.stderr
    assert (tmp_path / "out" / "summary.txt").read_text() == "an earlier check\n"


@pytest.mark.parametrize("cmd", [["-m", "tools.warm_kernels"], ["-m", "tools.run_report"], ["-m", "tools.kernel_sweep"],
                                 ["-m", "tools.kernel_report"], ["bench.py"]])
def test_step_tools_parse(cmd):
    """Each tool runs from the kit's root as the script calls it, with no install and no sys.path edit."""
    proc = subprocess.run([sys.executable, *cmd, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


def test_gpu_check_from_anywhere_without_a_gpu(tmp_path):
    """Called by its path from another folder, on a machine without CUDA: one line, exit 2, nothing written."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("GPU_CHECK_STUBS", None)
    proc = subprocess.run(["bash", SCRIPT, "out"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no CUDA GPU" in proc.stderr, proc.stderr
    assert proc.stdout == "" and not os.listdir(tmp_path)


def test_warm_kernels_variants_run(monkeypatch):
    """The compile step's variants: what the later steps launch, and with --tune the
    sweep's 5 block sizes x 3 warp counts per kernel and precision. Each runs the
    production solve and backward (here in Triton's interpreter, at a tiny size)."""
    from tools import warm_kernels

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels in Triton's interpreter")
    import cnf_kernels

    if cnf_kernels.unavailable_reason("cpu"):
        pytest.skip(cnf_kernels.unavailable_reason("cpu"))
    base, tuned = warm_kernels.variants(), warm_kernels.variants(tune=True)
    assert len(base) == 3 * 2 * 4 and len(tuned) == len(base) + 2 * 2 * 15  # shapes x methods x precisions
    assert len({name for name, _ in tuned}) == len(tuned)
    monkeypatch.setattr(warm_kernels, "POINTS", 3)
    monkeypatch.setattr(warm_kernels, "HIDDEN", 4)
    for settings in (dict(width=6, n=5, method="rk4", precision="float16+scaler"),
                     dict(width=6, n=5, method="euler", precision="bfloat16"),
                     dict(width=6, n=5, method="rk4", precision="float32", kernel="backward", block=2, warps=1)):
        name, secs, err = warm_kernels._worker(("cpu", "tiny", settings))
        assert err is None, err
    assert cnf_kernels.launch() == cnf_kernels.DEFAULT_LAUNCH  # the sweep's settings do not leak


def test_run_report_on_a_real_run(tmp_path):
    """status.json says which backend ran; tools.run_report reads it with the CSV's speed,
    and a run on another backend than expected fails with the log's reason."""
    import cnf
    from tools import run_report
    from test_cnf import TINY

    assert cnf.main([*TINY, "--no-figures", "--device", "cpu", "--results_dir", str(tmp_path)]) == 0
    run = run_report.find_run(str(tmp_path))
    status = json.load(open(os.path.join(run, "status.json")))
    assert status["backend"] == "torch" and status["backend_note"] == ""
    line, ok = run_report.report(run)
    assert ok and line.startswith("cnf run: completed, backend torch, 4 iterations at ") and "(median of 2 rows)" in line
    line, ok = run_report.report(run, expect_backend="triton")
    assert not ok and line.startswith("cnf-run FAILED") and "ran backend torch, not triton" in line
    tail = tmp_path / "tail.txt"
    assert run_report.main([str(tmp_path), "--log-tail", str(tail)]) == 0
    assert "completed: trained 4 iterations" in tail.read_text()
    assert run_report.main([str(tmp_path / "none")]) == 2
    os.remove(os.path.join(run, "status.json"))  # a run stopped by its time limit: the log's tail still comes back
    tail.unlink()
    assert run_report.main([str(tmp_path), "--log-tail", str(tail)]) == 1
    assert tail.read_text() and "no status.json" in run_report.report(run)[0]
