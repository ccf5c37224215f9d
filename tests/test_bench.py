"""bench.py runs end to end (quick mode) and writes its table; timings live in docs/benchmarks.md."""
import json
import os
import subprocess
import sys

from test_cnf_kernels import need_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600  # about 5x what bench.py --quick takes on a slow 2-core machine (16 GFLOP/s), under load


def test_bench_quick(tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "bench.py", "--quick", "--iters", "1", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    paths = [r["path"] for r in data["rows"]]
    assert paths == ["original", "seed", "torchdiffeq", "torchmpnode", "torchmpnode-bf16", "torchmpnode-fp16"]
    for r in data["rows"]:
        assert r["ms_iter"] > 0 and r["peak_mb"] > 0 and r["loss"] == r["loss"]
    assert "| torchmpnode | float32 |" in proc.stdout and "speedup vs original" in proc.stdout


def test_bench_rejects_bad_input():
    for bad in (["--iters", "0"], ["--batch", "0"], ["--paths", "torchdiffeq-fp8"]):
        proc = subprocess.run([sys.executable, "bench.py", *bad], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2 and proc.stderr.count("\n") <= 2 and "Traceback" not in proc.stderr, bad


def test_bench_times_a_study_cell(tmp_path):
    """--batch sets the training batch of every path, and torchdiffeq-bf16 is torchdiffeq under
    bfloat16 autocast: the same losses as torchdiffeq's float32 to about bfloat16's precision, not to the bit."""
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "bench.py", "--quick", "--batch", "48", "--iters", "1", "--threads", "1",
                           "--json", str(out), "--paths", "torchdiffeq", "torchdiffeq-bf16"],
                          capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    f32, bf16 = data["rows"]
    assert data["config"]["batch"] == f32["batch"] == bf16["batch"] == 48
    assert (f32["precision"], bf16["precision"]) == ("float32", "bfloat16")
    diffs = [abs(a - b) for a, b in zip(f32["losses"], bf16["losses"])]
    assert 0 < max(diffs) < 0.05 * abs(f32["losses"][0]), diffs


def test_bench_triton_paths_run(tmp_path):
    """The fused paths in bench.py (in Triton's interpreter without a GPU: correctness, not speed)."""
    need_triton(interpreted=True)
    out = tmp_path / "b.json"
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    proc = subprocess.run([sys.executable, "bench.py", "--quick", "--iters", "1", "--json", str(out), "--paths",
                           "torchmpnode-fp16", "triton", "triton-fp16"], capture_output=True, text=True, cwd=ROOT,
                          timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["path"], r["backend"]) for r in rows] == [("torchmpnode-fp16", "torch"), ("triton", "triton"),
                                                           ("triton-fp16", "triton")]
    # same model, same data, same seed: the fused fp16 loss is the torch fp16 loss
    assert abs(rows[0]["loss"] - rows[2]["loss"]) < 1e-4 * abs(rows[0]["loss"])


def test_bench_tools_for_a_gpu_slot(tmp_path):
    """--no-kernels (the host side alone), tools.kernel_sweep and --profile run end to end
    (on the CPU: the interpreter, tiny sizes), so a GPU slot is not spent finding their bugs."""
    need_triton(interpreted=True)
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "bench.py", "--quick", "--iters", "1", "--json", str(out), "--paths",
                           "triton", "triton-fp16", "--no-kernels"], capture_output=True, text=True, cwd=ROOT,
                          timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["backend"] for r in json.loads(out.read_text())["rows"]] == ["triton", "triton"]
    assert "no-kernels" in proc.stdout
    sweep = subprocess.run([sys.executable, "-m", "tools.kernel_sweep", "--device", "cpu", "--quick", "forward-float32",
                            "backward-float16", "options"], capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT,
                           env=env)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    # | precision | kernel | samples/program | warps | padded rows | partial_mb: launches | ms | max rel. diff |
    rows = [[c.strip() for c in l.split("|")[1:-1]] for l in sweep.stdout.splitlines() if l.startswith(("| float", "| bfloat"))]
    assert len(rows) == 8 and all(float(r[6]) > 0 and float(r[7]) < 1e-5 for r in rows), sweep.stdout
    assert rows[0][:4] == ["float32", "forward", "16", "4"] and rows[1][:4] == ["float16", "backward", "16", "4"]
    assert [r[4] for r in rows[2:6]] == ["no", "yes", "no", "yes"], sweep.stdout  # padded rows off and on
    # the 4 steps of bench.QUICK: 2 steps per launch in a 0.002 MB budget, and all in one launch in 64 MB
    assert [r[5] for r in rows[6:]] == ["0.002: 2", "64: 1"], sweep.stdout
    bad = subprocess.run([sys.executable, "-m", "tools.kernel_sweep", "sideways"], capture_output=True, text=True,
                         cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "forward-float32" in bad.stderr
    prof = subprocess.run([sys.executable, "bench.py", "--quick", "--profile", "triton", "--iters", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT, env=env)
    assert prof.returncode == 0 and "Self CPU" in prof.stdout, prof.stderr[-2000:]
