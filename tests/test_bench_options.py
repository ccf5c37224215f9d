"""bench.py's results as they come, and the CUDA-only options (CUDA graph, fused Adam).

On the CPU: rows reach the JSON and the table as each path finishes (a run stopped
after its first path keeps that path), and the CUDA options are refused with one line.
With CUDA: the captured iteration runs and equals the uncaptured one bit for bit, and
a ``cnf.py --fused_adam`` run resumed from its checkpoint continues bit for bit.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cnf
import experiment as ex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rows_are_written_as_each_path_finishes(tmp_path):
    out, table = tmp_path / "b.json", tmp_path / "b.md"
    proc = subprocess.Popen([sys.executable, "bench.py", "--quick", "--iters", "1", "--json", str(out), "--table",
                             str(table), "--paths", "torchmpnode", "original", "original", "original"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not out.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        first = json.loads(out.read_text())["rows"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # as a slot's time limit would
        proc.wait()
    assert [r["path"] for r in first] == ["torchmpnode"] and first[0]["ms_iter"] > 0
    lines = table.read_text().splitlines()
    assert lines[0].startswith("| path |") and lines[2].startswith("| torchmpnode | float32 |")
    assert json.loads(out.read_text())["rows"][0]["path"] == "torchmpnode"  # never half written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("argv,msg", [
    (["--paths", "triton+graph"], "+graph is a CUDA option"),
    (["--paths", "torchmpnode+fused_adam"], "+fused_adam is a CUDA option"),
    (["--device", "cpu", "--profile", "triton+graph"], "+graph is a CUDA option"),
    (["--paths", "triton+jit"], "unknown option +jit"),
    (["--paths", "tritonn"], "unknown path 'tritonn'; choose from: original"),
])
def test_bench_options_refused_on_the_cpu_in_one_line(argv, msg):
    proc = subprocess.run([sys.executable, "bench.py", *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and msg in proc.stderr, proc.stderr


def test_graph_refuses_float16():
    import bench

    assert "float16's scaler reads the host" in bench._check_path("triton-fp16+graph", "cuda")
    assert bench._check_path("triton-bf16+graph", "cuda") is None
    assert bench._check_path("torchmpnode-fp16+fused_adam", "cuda") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_fused_adam_needs_cuda(tmp_path):
    from test_cnf import TINY, run_subprocess

    proc = run_subprocess(*TINY, "--fused_adam", "--device", "cpu", "--results_dir", str(tmp_path / "res"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "--fused_adam is torch's fused CUDA Adam; it needs --device cuda" in proc.stderr
    assert not (tmp_path / "res").exists()


def test_fused_adam_is_off_by_default():
    args = cnf.build_parser().parse_args([])
    assert args.fused_adam is False


def _need_cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import cnf_kernels

    reason = cnf_kernels.unavailable_reason(torch.device("cuda"))
    if reason:
        pytest.skip(reason)


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["triton+graph", "triton-bf16+graph", "triton+fused_adam"])
def test_cuda_options_run(tmp_path, path):
    """The captured iteration replays and equals the uncaptured one bit for bit; fused Adam runs."""
    _need_cuda_kernels()
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "bench.py", "--device", "cuda", "--iters", "3", "--json", str(out),
                           "--paths", path], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["path"] == path and row["ms_iter"] > 0 and row["backend"] == "triton"
    if path.endswith("+graph"):
        assert row["graph_bitwise_vs_uncaptured"] is True


@pytest.mark.cuda
def test_cuda_fused_adam_resume_is_bitwise(tmp_path):
    _need_cuda_kernels()
    from test_cnf import TINY

    common = [*TINY, "--device", "cuda", "--fused_adam", "--no-figures", "--ckpt_freq", "2"]
    assert cnf.main([*common, "--niters", "6", "--results_dir", str(tmp_path / "a")]) == 0
    assert cnf.main([*common, "--niters", "4", "--results_dir", str(tmp_path / "b")]) == 0
    (part,) = [os.path.join(tmp_path / "b", d) for d in os.listdir(tmp_path / "b")]
    assert cnf.main(["--resume", part, "--niters", "6", "--device", "cuda"]) == 0
    (full,) = [os.path.join(tmp_path / "a", d) for d in os.listdir(tmp_path / "a")]
    a, b = ex.load_checkpoint(ex.RunDir(full).ckpt), ex.load_checkpoint(ex.RunDir(part).ckpt)
    assert a["config"]["fused_adam"] and b["config"]["fused_adam"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_speed_probe_is_one_honest_line(monkeypatch):
    """bench.py --probe prints one line: GFLOP/s of the 1024x128 @ 128x128 float32 matmul on one
    thread, consistent with the median time it prints (2 n k m flops), and leaves the caller's
    thread count as it was. The median of the timed calls, checked with a fake clock."""
    import re

    import runtime

    proc = subprocess.run([sys.executable, "bench.py", "--probe"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = proc.stdout.strip().splitlines()
    m = re.fullmatch(r"machine speed: ([\d.]+) GFLOP/s \(one 1024x128 @ 128x128 float32 matmul on 1 CPU thread, "
                     r"median of (\d+): ([\d.]+) ms\)", line)
    assert m, line
    gflops, ms = float(m[1]), float(m[3])
    assert gflops > 0 and abs(gflops * ms - 2 * 1024 * 128 * 128 / 1e6) < 0.01 * gflops * ms + 0.1
    before = torch.get_num_threads()
    readings = iter([0, 1, 10, 15, 20, 22, 30, 32, 40, 49])  # ms: calls of 1, 5, 2, 2 and 9 ms, median 2
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: next(readings) * 1e-3)
    p = runtime.speed_probe(reps=5)
    assert p["ms"] == pytest.approx(2.0) and p["gflops"] == pytest.approx(2 * 1024 * 128 * 128 / 2e6)
    assert torch.get_num_threads() == before
