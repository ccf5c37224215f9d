"""Speed and memory of one training iteration (forward, backward, optimizer step).

    python bench.py [--device cpu|cuda] [--iters N] [--quick] [--paths ...] [--json FILE]
    python bench.py --paths torchmpnode --threads 1,2,idle --load 2 --num_timesteps 32
    python bench.py --batch 256 --num_timesteps 32 --threads 1 --paths torchmpnode torchdiffeq-bf16   # a study cell
    python bench.py --device cuda --profile triton     # where one iteration's time goes
    python bench.py --paths triton --no-kernels        # everything but the kernels (CPU too)
    python bench.py --probe                            # this machine's speed figure (GFLOP/s)

Each path runs in a fresh subprocess: warm-up, then the median over --iters
iterations. Peak memory is that process's: peak RSS on CPU (also shown as the
growth over the RSS before the first iteration), the CUDA allocator peak on GPU.
Prints a markdown table with the speedup over ``original`` from the same run and
writes it to a JSON file.

Paths:
- original: the torchdiffeq CNF example's field (x repeated over the width,
  batched matmuls) with the trace by autograd, solved by torchdiffeq rk4;
- seed: the well-known mixed-precision successor of that script: the same
  repeated field with a closed-form trace by batched matmuls, torchdiffeq rk4;
- torchdiffeq / torchmpnode: what ``cnf.py --odeint ...`` runs;
- torchdiffeq-<tag>: torchdiffeq under autocast, one per low precision (by default on
  CUDA only; a CPU runs them with --paths);
- torchmpnode-<tag>: the torchmpnode path under autocast, one per precision of
  ``choices.PRECISIONS`` (bf16, fp16; tf32 on CUDA only, where it differs from float32);
- triton[-<tag>]: the same torchmpnode runs with the fused Triton solve
  (``cnf.py --backend triton``); by default on CUDA only (on the CPU they
  need TRITON_INTERPRET=1 and --paths, and time the interpreter, not a GPU).

Options, measured beside the default path, never switched on by it (all but native_mm
CUDA only; the CPU refuses them with one line):
- PATH+native_mm: the float16 products with K <= 3 through torch's own matmul instead of
  ``hyper_trace.small_k_mm``'s float32 emulation (the same roundings: the JSON's
  ``losses`` and ``params_sha256`` of the two rows are equal); what the emulation saves;
- PATH+fused_adam: ``torch.optim.Adam(fused=True)`` (``cnf.py --fused_adam``);
- triton[-bf16|-tf32]+graph: the whole iteration (hypernetwork, kernels, hypernetwork
  backward, Adam with ``capturable=True``) captured once in a CUDA graph and replayed.
  The row also says whether the replayed run's parameters equal bit for bit those of
  the same iterations run uncaptured. float16 cannot be captured: its DynamicScaler
  decides each sweep's retries on the host.

Threads on a busy machine: ``--threads 1,2,idle`` runs every path once per thread count
(``idle``: the kit's default, one per core idle at the start, ``runtime.default_threads``),
and ``--load N`` keeps N other CPU-bound processes (one busy Python loop each) running
while it measures. The fused kernels' launch choices are timed by ``python -m
tools.kernel_sweep``.

The table's rows and the JSON are written as each path finishes (``--table``, ``--json``),
so a run stopped early keeps the paths it measured. A bad flag is refused before torch loads.
"""
import argparse
import contextlib
import copy
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

import experiment as ex
import runtime
from choices import PRECISIONS, cpu_precisions


def _path(solver, precision):
    tag = PRECISIONS[precision].tag
    return solver + (f"-{tag}" if tag else "")


STANDARD = dict(batch=1024, width=128, hidden=32, num_timesteps=128)
# --quick: a smoke test. Small enough for Triton's interpreter (its time grows with programs x steps), and
# 20 samples leave every block size a partial block.
QUICK = dict(batch=20, width=16, hidden=8, num_timesteps=5)
PATHS = ("original", "seed", "torchdiffeq", *(_path("torchmpnode", p) for p in cpu_precisions()))
# the study's other cells (torchdiffeq under autocast); by default on CUDA only, on a CPU with --paths
CUDA_PATHS = (*(_path("torchmpnode", p) for p in PRECISIONS if p not in cpu_precisions()),
              *(_path("torchdiffeq", p) for p, spec in PRECISIONS.items() if spec.tag),
              *(_path("triton", p) for p in PRECISIONS))
OPTIONS = ("fused_adam", "graph", "native_mm")  # PATH+OPTION; all but native_mm CUDA only
# float16's DynamicScaler reads the host each sweep: no CUDA graph
GRAPH_PATHS = tuple(_path("triton", p) for p, spec in PRECISIONS.items() if spec.autocast != "float16")
BY_TAG = {spec.tag: name for name, spec in PRECISIONS.items()}


def build_parser():
    """bench.py's flags (bad ones: one line, exit code 2)."""
    p = ex.OneLineParser(prog="bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per path (after 2 warm-ups)")
    p.add_argument("--quick", action="store_true", help="tiny problem, for a smoke test")
    p.add_argument("--num_timesteps", type=int, default=None, help="grid points (default: the configuration's)")
    p.add_argument("--batch", type=int, default=None, help="training points per iteration (default: the configuration's)")
    p.add_argument("--paths", nargs="+", default=None,
                   help=f"subset of {PATHS + CUDA_PATHS}, each optionally with +{' or +'.join(OPTIONS)} (CUDA)")
    p.add_argument("--threads", default=None, metavar="LIST",
                   help="comma-separated CPU thread counts, each path once per count; 'idle': the kit's default "
                        "(one per core idle at the start). Default: the kit's default")
    p.add_argument("--load", type=int, default=0, metavar="N",
                   help="keep N other CPU-bound processes running while measuring (a busy machine)")
    p.add_argument("--json", default=None, help="output file (default results/bench_<device>_<time>.json)")
    p.add_argument("--table", default=None, metavar="FILE", help="also write the markdown table here, row by row")
    p.add_argument("--profile", default=None, metavar="PATH", help="profile one path's iterations (torch.profiler) instead")
    p.add_argument("--no-kernels", action="store_true",
                   help="triton paths with the kernel launches made no-ops: the host-side cost alone (results meaningless)")
    p.add_argument("--probe", action="store_true",
                   help="print this machine's speed figure (runtime.speed_probe, GFLOP/s on one thread) and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-threads", default=None, help=argparse.SUPPRESS)
    return p


def _check_path(path, device):
    """None, or why ``path`` is not a bench path on ``device`` (one line)."""
    base, _, option = path.partition("+")
    if base not in PATHS + CUDA_PATHS:
        return f"unknown path {base!r}; choose from: {', '.join(PATHS + CUDA_PATHS)}"
    if option and option not in OPTIONS:
        return f"unknown option +{option} in {path!r}; choose from: {', '.join('+' + o for o in OPTIONS)}"
    if option and option != "native_mm" and not device.startswith("cuda"):
        return f"{path}: +{option} is a CUDA option; run it with --device cuda"
    if option == "graph" and base not in GRAPH_PATHS:
        return f"{path}: +graph applies to {', '.join(GRAPH_PATHS)} (float16's scaler reads the host each sweep)"
    return None


def parse_args(argv=None):
    """The flags, checked without torch: a bad one is one line and exit code 2."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.iters < 1:
        p.error("--iters must be >= 1")
    if args.num_timesteps is not None and args.num_timesteps < 2:
        p.error("--num_timesteps needs at least 2 grid points")
    if args.batch is not None and args.batch < 1:
        p.error("--batch must be >= 1")
    if args.load < 0:
        p.error("--load must be >= 0")
    try:
        args.thread_list = _thread_list(args.threads)
    except ValueError as e:
        p.error(str(e))
    for path in args.paths or ():
        problem = _check_path(path, args.device)
        if problem:
            p.error(problem)
    if args.profile and _check_path(args.profile, args.device):
        p.error(_check_path(args.profile, args.device))
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        p.error(f"--device {args.device!r}: choose cpu, cuda or cuda:N")
    return args


def _thread_list(text):
    """[None] (the kit's default) or the counts of --threads ('idle' is None)."""
    if text is None:
        return [None]
    out = []
    for item in text.split(","):
        if item == "idle":
            out.append(None)
        elif item.isdigit() and int(item) > 0:
            out.append(int(item))
        else:
            raise ValueError(f"--threads takes positive counts or 'idle', comma-separated; got {item!r}")
    return out


if __name__ == "__main__":
    ex.quiet_exits("bench.py")  # Ctrl-C: one line and exit code 130, never a traceback
    parse_args()  # a bad flag or --help is answered now, before torch loads; main() parses again

import torch  # noqa: E402  (after the flags are checked)
from torch import nn  # noqa: E402


# --- reference fields, written as the two predecessor scripts build them -----------
class _RepeatedHyperNet(nn.Module):
    def __init__(self, hidden, width, d=2):
        super().__init__()
        self.width, self.d = width, d
        self.fc1, self.fc2 = nn.Linear(1, hidden), nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 3 * width * d + width)

    def forward(self, t):
        p = self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(t.reshape(1, 1)))))).reshape(-1)
        w, d, n = self.width, self.d, self.width * self.d
        W = p[:n].reshape(w, d, 1)
        U = p[n : 2 * n].reshape(w, 1, d) * torch.sigmoid(p[2 * n : 3 * n].reshape(w, 1, d))
        B = p[3 * n :].reshape(w, 1, 1)
        return W, B, U


class _RepeatedCNF(nn.Module):
    """z repeated over the width into [w, n, d] and batched matmuls; the trace
    by autograd (original) or in closed form on the repeated tensors (seed)."""

    def __init__(self, hidden, width, closed_form):
        super().__init__()
        self.hyper_net, self.closed_form = _RepeatedHyperNet(hidden, width), closed_form

    def forward(self, t, states):
        z = states[0]
        with torch.enable_grad():
            z = z if z.requires_grad else z.requires_grad_()
            W, B, U = self.hyper_net(t)
            Z = z.unsqueeze(0).repeat(W.shape[0], 1, 1)  # [w, n, d]
            h = torch.tanh(torch.bmm(Z, W) + B)  # [w, n, 1]
            dz = torch.bmm(h, U).mean(0)  # [n, d]
            if self.closed_form:
                tr = ((1 - h * h) * torch.bmm(U, W)).mean(0)  # [n, 1]
            else:
                tr = sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(z.shape[1]))
                tr = tr.reshape(-1, 1)
        return dz, -tr


# --- one path, in a worker process ------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def run_worker(path, device, cfg, iters, no_kernels=False, threads=None):
    """One path's iterations in this process: a dict of its timings (ms), memory (MB), the
    backend that ran and the last loss. ``no_kernels``: the fused launches are no-ops (the
    host side alone); ``threads``: the CPU thread count (None: the kit's default)."""
    runtime.configure(threads if threads is not None else runtime.default_threads()[0])
    device = torch.device(device)
    with contextlib.ExitStack() as stack:
        if no_kernels:
            import cnf_kernels

            if device.type == "cpu":  # the availability check: nothing is interpreted, nothing runs
                os.environ["TRITON_INTERPRET"] = "1"
            stack.enter_context(cnf_kernels.launch_settings(stub=True))
        return dict(_iterations(path, device, cfg, iters), threads=torch.get_num_threads())


def _build(solver, prec, device, cfg):
    """(model, its mean NLL as a function of a batch, its scalers) for one path's solver."""
    import torchdiffeq

    from model import CNF, Integrator, log_prob, standard_normal_logprob
    from precision import Scalers

    torch.manual_seed(0)
    if solver in ("original", "seed"):
        model = _RepeatedCNF(cfg["hidden"], cfg["width"], closed_form=solver == "seed").to(device)
        t = torch.linspace(1.0, 0.0, cfg["num_timesteps"], device=device)

        def nll(x):
            z, dl = torchdiffeq.odeint(model, (x, torch.zeros(x.shape[0], 1, device=device)), t, method="rk4")
            return -(standard_normal_logprob(z[-1]) - dl[-1, :, 0]).mean()

        return model, nll, Scalers("torchdiffeq", prec, device)
    backend = "triton" if solver == "triton" else "torch"
    odeint = "torchmpnode" if solver == "triton" else solver
    model = CNF(2, cfg["hidden"], cfg["width"], backend=backend).to(device)
    scalers = Scalers(odeint, prec, device)
    integ = Integrator(odeint, "rk4", cfg["num_timesteps"], loss_scaler=scalers.solver_scaler)

    def nll(x, m=model):
        return -log_prob(m, x, integ).mean()

    return model, nll, scalers


def _iterations(path, device, cfg, iters):
    """The timed iterations of one path (after two warm-ups): its row of the table."""
    import numpy as np

    import hyper_trace
    import toy_data
    from precision import Precision

    rng = np.random.default_rng(0)
    path, _, option = path.partition("+")
    solver, _, prec_tag = path.partition("-")
    precision = BY_TAG[prec_tag]
    prec = Precision(precision, device)
    model, nll, scalers = _build(solver, prec, device, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True if option == "fused_adam" else None,
                           capturable=option == "graph")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else _rss_mb()

    def batch():  # a pinned host buffer: the copy to the GPU does not wait for the device
        x = torch.from_numpy(toy_data.inf_train_gen("8gaussians", cfg["batch"], rng))
        return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x

    if option == "graph":
        r = _graphed(model, lambda m, x: nll(x, m), opt, prec, batch, device, iters)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        return dict(path=f"{path}+{option}", precision=precision, backend=model.backend, peak_mb=peak,
                    growth_mb=peak - base_mb, **r)
    times, losses = [], []
    with hyper_trace.native_products() if option == "native_mm" else contextlib.nullcontext():
        for it in range(iters + 2):  # two warm-up iterations
            x = batch()
            _sync(device)
            t0 = time.perf_counter()
            with prec.autocast():
                loss = nll(x)
            _sync(device)
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            scalers.grad.scale(loss).backward()
            scalers.grad.step(opt)
            scalers.grad.update()
            _sync(device)
            t2 = time.perf_counter()
            losses.append(float(loss.detach()))
            if it >= 2:
                times.append((t1 - t0, t2 - t1))
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mb()
    fwd, bwd = statistics.median(a for a, _ in times), statistics.median(b for _, b in times)
    return dict(path=path + (f"+{option}" if option else ""), precision=precision, backend=getattr(model, "backend", "torch"),
                batch=int(x.shape[0]), ms_iter=1e3 * statistics.median(a + b for a, b in times),
                ms_fwd=1e3 * fwd, ms_bwd=1e3 * bwd, peak_mb=peak, growth_mb=peak - base_mb,
                loss=float(loss.detach()), losses=losses, params_sha256=digest[:16])


def _graphed(model, loss_fn, opt, prec, batch, device, iters):
    """The whole iteration captured in one CUDA graph (PyTorch's whole-network recipe:
    warm-up on a side stream, grads set to None before the capture so the graph owns
    them) and replayed on fresh batches copied into its static input. An uncaptured
    twin (same state after the warm-up, same batches) checks the replay bit for bit."""
    autocast = (torch.autocast(device.type, dtype=prec.low, cache_enabled=False) if prec.low is not None
                else contextlib.nullcontext())  # the autocast cache does not survive a capture

    def iteration(m, o, x, loss_fn):
        o.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(m, x)
        loss.backward()
        o.step()
        return loss

    static_x = batch()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):  # compile, grid plan, Adam's state, on a side stream as capture needs
            iteration(model, opt, static_x, loss_fn)
    torch.cuda.current_stream(device).wait_stream(side)
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=opt.defaults["lr"], capturable=True)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own moments, not views of the graph's
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = iteration(model, opt, static_x, loss_fn)
    times = []
    for _ in range(iters):
        x = batch()
        _sync(device)
        t0 = time.perf_counter()
        static_x.copy_(x)
        graph.replay()
        _sync(device)
        times.append(time.perf_counter() - t0)
        iteration(twin, twin_opt, x, loss_fn)
    bitwise = all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    return dict(ms_iter=1e3 * statistics.median(times), ms_fwd=None, ms_bwd=None, loss=float(static_loss.detach()),
                graph_bitwise_vs_uncaptured=bitwise)


def profile(path, device, cfg, iters, top=25):
    """One path under torch.profiler: its top operations by device (or CPU) time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run_worker(path, device, cfg, 2)  # compile and warm up outside the trace
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        r = run_worker(path, device, cfg, iters)
    key = "self_cuda_time_total" if torch.device(device).type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top))
    print(json.dumps(r))


# --- driver ----------------------------------------------------------------------
def _ms(x):
    if x is None:  # a CUDA graph replays forward and backward as one
        return ""
    return f"{x:.0f}" if x >= 100 else f"{x:.2f}"


def table_header(device):
    """The markdown table's two header lines (peak RSS on a CPU, the CUDA allocator's peak on a GPU)."""
    mem = "peak CUDA MB" if device == "cuda" else "peak RSS MB"
    return [f"| path | precision | threads | ms/iter | fwd ms | bwd ms | speedup vs original | {mem} | growth MB |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|"]


def table_row(r, rows):
    """One path's line; the speedup is over ``original`` among ``rows`` (measured before it)."""
    if "error" in r:
        return f"| {r['path']} | | {r.get('threads_asked', '')} | failed: {r['error']} | | | | | |"
    orig = next((o["ms_iter"] for o in rows if o["path"] == "original" and "ms_iter" in o), None)
    sp = f"{orig / r['ms_iter']:.1f}x" if orig else "n/a"
    if "graph_bitwise_vs_uncaptured" in r:
        sp += "; graph " + ("bitwise equal to" if r["graph_bitwise_vs_uncaptured"] else "DIFFERS from") + " uncaptured"
    threads = f"{r['threads']}" + (" (idle)" if r.get("threads_asked") == "idle" else "")
    return (f"| {r['path']} | {r['precision']} | {threads} | {_ms(r['ms_iter'])} | {_ms(r['ms_fwd'])} | {_ms(r['ms_bwd'])} "
            f"| {sp} | {r['peak_mb']:.0f} | {r['growth_mb']:.0f} |")


def _write_json(out, args, cfg, rows, speed):
    """The results so far, replacing the file in one step (never half written); ``speed``: the
    machine's ``runtime.speed_probe`` before the first path."""
    ex.write_json(out, dict(device=args.device, config=cfg, iters=args.iters, load=args.load, torch=torch.__version__,
                            cpus=os.cpu_count(), machine_gflops=round(speed["gflops"], 1), rows=rows))


def _config(args):
    cfg = dict(QUICK if args.quick else STANDARD)
    for key in ("num_timesteps", "batch"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    return cfg


@contextlib.contextmanager
def competing_load(n):
    """N other CPU-bound processes (a busy Python loop each) while the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        if procs:
            time.sleep(1.0)  # let them take their cores before anything is measured
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def main(argv=None):
    """Run each path (per thread count) in its own process; the table, row by row, and the JSON."""
    args = parse_args(argv)
    if args.probe:
        print(runtime.probe_line(runtime.speed_probe()))
        return 0
    cfg = _config(args)
    if args.worker:
        threads = None if args.worker_threads in (None, "idle") else int(args.worker_threads)
        print(json.dumps(run_worker(args.worker, args.device, cfg, args.iters, args.no_kernels, threads)))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        build_parser().error("--device cuda requested but CUDA is not available")
    if args.profile:
        profile(args.profile, args.device, cfg, args.iters)
        return 0
    paths = args.paths or (PATHS + (CUDA_PATHS if args.device.startswith("cuda") else ()))
    device = args.device.split(":")[0]
    out = args.json or os.path.join("results", f"bench_{args.device.replace(':', '')}_{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    speed = runtime.speed_probe()
    print(runtime.probe_line(speed), flush=True)
    print(f"device={args.device} config={cfg} iters={args.iters} torch={torch.__version__} cpus={os.cpu_count()}"
          f" load={args.load}" + (" no-kernels (fused launches are no-ops: host-side cost only)" if args.no_kernels else ""),
          flush=True)
    table = table_header(device)
    print("\n".join(table), flush=True)
    rows = []
    with competing_load(args.load):
        for path in paths:
            for threads in args.thread_list:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--device", args.device,
                       "--iters", str(args.iters), "--worker-threads", str(threads or "idle")]
                cmd += (["--quick"] if args.quick else []) + (["--no-kernels"] if args.no_kernels else [])
                cmd += ["--num_timesteps", str(cfg["num_timesteps"]), "--batch", str(cfg["batch"])]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
                if proc.returncode == 0:
                    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                    rows[-1]["threads_asked"] = threads or "idle"
                else:
                    err = (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]
                    rows.append(dict(path=path, error=err[:120], threads_asked=threads or "idle"))
                table.append(table_row(rows[-1], rows))
                print(table[-1], flush=True)
                if args.table:
                    ex.atomic_write(args.table, "\n".join(table) + "\n")
                _write_json(out, args, cfg, rows, speed)
    print(f"wrote {out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
