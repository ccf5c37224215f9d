"""Speed and memory of one training iteration (forward, backward, optimizer step).

    python bench.py [--device cpu|cuda] [--iters N] [--quick] [--paths ...] [--json FILE]
    python bench.py --device cuda --profile triton     # where one iteration's time goes
    python bench.py --device cuda --kernel-sweep [PART ...]  # time the fused kernels' launch choices
    python bench.py --paths triton --no-kernels        # everything but the kernels (CPU too)

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
- torchmpnode-bf16 / -fp16: the torchmpnode path under autocast;
- triton[-bf16|-fp16|-tf32]: the same torchmpnode runs with the fused Triton
  solve (``cnf.py --backend triton``); by default on CUDA only (on the CPU they
  need TRITON_INTERPRET=1 and --paths, and time the interpreter, not a GPU).

Options, measured beside the default path, never switched on by it (CUDA only; the
CPU refuses them with one line):
- PATH+fused_adam: ``torch.optim.Adam(fused=True)`` (``cnf.py --fused_adam``);
- triton[-bf16|-tf32]+graph: the whole iteration (hypernetwork, kernels, hypernetwork
  backward, Adam with ``capturable=True``) captured once in a CUDA graph and replayed.
  The row also says whether the replayed run's parameters equal bit for bit those of
  the same iterations run uncaptured. float16 cannot be captured: its DynamicScaler
  decides each sweep's retries on the host.

The table's rows and the JSON are written as each path finishes (``--table``, ``--json``),
so a run stopped early keeps the paths it measured.
"""
import argparse
import contextlib
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

STANDARD = dict(batch=1024, width=128, hidden=32, num_timesteps=128)
QUICK = dict(batch=64, width=16, hidden=8, num_timesteps=8)
PATHS = ("original", "seed", "torchdiffeq", "torchmpnode", "torchmpnode-bf16", "torchmpnode-fp16")
CUDA_PATHS = ("torchmpnode-tf32", "torchdiffeq-fp16", "triton", "triton-tf32", "triton-bf16", "triton-fp16")
OPTIONS = ("fused_adam", "graph")  # PATH+OPTION, CUDA only
GRAPH_PATHS = ("triton", "triton-tf32", "triton-bf16")  # float16's scaler reads the host each sweep


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


def _stub_kernels(device):
    """Make the fused kernels' launches no-ops that only zero their outputs (scaler stats:
    scale 1, no retries, no failure), so an iteration times everything else: the host
    side of the triton paths. The results are meaningless."""
    import cnf_kernels

    def launch(name, kernel, grid, *args, **kw):
        if name == "backward":
            az, al, part, stats = args[5:9]
            for t in (az, al, part, stats):
                t.zero_()
            stats[:, 0].fill_(1.0)
            stats[:, 2].fill_(-1.0)

    cnf_kernels._launch = launch
    if device.type == "cpu":  # the kernels' availability check: nothing is interpreted, nothing runs
        os.environ["TRITON_INTERPRET"] = "1"


def run_worker(path, device, cfg, iters, no_kernels=False):
    import numpy as np
    import torchdiffeq

    import runtime
    import toy_data
    from model import CNF, Integrator, log_prob, standard_normal_logprob
    from precision import Precision, Scalers

    runtime.configure()
    device = torch.device(device)
    if no_kernels:
        _stub_kernels(device)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    path, _, option = path.partition("+")
    solver, _, prec_tag = path.partition("-")
    precision = {"": "float32", "bf16": "bfloat16", "fp16": "float16", "tf32": "tfloat32"}[prec_tag]
    prec = Precision(precision, device)
    if solver in ("original", "seed"):
        model = _RepeatedCNF(cfg["hidden"], cfg["width"], closed_form=solver == "seed").to(device)
        t = torch.linspace(1.0, 0.0, cfg["num_timesteps"], device=device)

        def nll(x):
            z, dl = torchdiffeq.odeint(model, (x, torch.zeros(x.shape[0], 1, device=device)), t, method="rk4")
            return -(standard_normal_logprob(z[-1]) - dl[-1, :, 0]).mean()

        scalers = Scalers("torchdiffeq", prec, device)
    else:
        backend = "triton" if solver == "triton" else "torch"
        odeint = "torchmpnode" if solver == "triton" else solver
        model = CNF(2, cfg["hidden"], cfg["width"], backend=backend).to(device)
        scalers = Scalers(odeint, prec, device)
        integ = Integrator(odeint, "rk4", cfg["num_timesteps"], loss_scaler=scalers.solver_scaler)

        def nll(x):
            return -log_prob(model, x, integ).mean()

    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True if option == "fused_adam" else None,
                           capturable=option == "graph")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else _rss_mb()

    def batch():  # a pinned host buffer: the copy to the GPU does not wait for the device
        x = torch.from_numpy(toy_data.inf_train_gen("8gaussians", cfg["batch"], rng))
        return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x

    if option == "graph":
        r = _graphed(model, lambda m, x: -log_prob(m, x, integ).mean(), opt, prec, batch, device, iters)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        return dict(path=f"{path}+{option}", precision=precision, backend=model.backend, peak_mb=peak,
                    growth_mb=peak - base_mb, **r)
    times = []
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
        if it >= 2:
            times.append((t1 - t0, t2 - t1))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = _peak_rss_mb()
    fwd, bwd = statistics.median(a for a, _ in times), statistics.median(b for _, b in times)
    return dict(path=path + (f"+{option}" if option else ""), precision=precision, backend=getattr(model, "backend", "torch"),
                ms_iter=1e3 * statistics.median(a + b for a, b in times),
                ms_fwd=1e3 * fwd, ms_bwd=1e3 * bwd, peak_mb=peak, growth_mb=peak - base_mb,
                loss=float(loss.detach()))


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


SWEEP_BLOCKS = (1, 2, 4, 8, 16)  # samples per program
SWEEP_WARPS = (1, 2, 4)  # warps per program
SWEEP_PARTIAL_MB = (16, 64, 1024)  # the backward's partial-buffer budget (1024: one launch at the standard size)
SWEEP_PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}  # float16 with a DynamicScaler
# A part is one kernel at one precision (15 compiles), or the options at all three (padded
# rows and partial-buffer budgets: 6 compiles), each sized for ~100 s on a cold Triton cache.
SWEEP_PARTS = tuple(f"{k}-{p}" for k in ("forward", "backward") for p in SWEEP_PRECISIONS) + ("options",)


def _sweep_problem(device, cfg, precision):
    """The fused kernels' inputs on one standard solve at ``precision``: closures running
    the forward and the backward kernels with the current settings of ``cnf_kernels``
    (the backward from the end of the grid, float16 with a fresh DynamicScaler), and the
    backward's (programs per block, R) bookkeeping inputs."""
    import cnf_kernels
    from model import CNF, Integrator, log_prob
    from torchmpnode import DynamicScaler

    device = torch.device(device)
    low = SWEEP_PRECISIONS[precision]
    torch.manual_seed(0)
    model = CNF(2, cfg["hidden"], cfg["width"], backend="triton").to(device)
    x = torch.randn(cfg["batch"], 2, device=device) * 1.5
    captured = {}
    solve = cnf_kernels.solve_forward

    def record(P, z0, logp0, spec):
        captured.update(P=P, z0=z0, logp0=logp0, spec=spec)
        return solve(P, z0, logp0, spec)

    cnf_kernels.solve_forward = record
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=low or torch.float32, enabled=low is not None):
            log_prob(model, x, Integrator("torchmpnode", "rk4", cfg["num_timesteps"]))
    finally:
        cnf_kernels.solve_forward = solve
    P, z0, logp0, spec = (captured[k] for k in ("P", "z0", "logp0", "spec"))
    zs, _ = solve(P, z0, logp0, spec)
    g = torch.Generator(device=device).manual_seed(1)
    gz = torch.zeros_like(zs)
    gl = torch.zeros(zs.shape[0], zs.shape[1], 1, device=device)
    gz[-1] = torch.randn(zs.shape[1:], generator=g, device=device) / zs.shape[1]
    gl[-1] = -1.0 / zs.shape[1]

    def fwd():
        return solve(P, z0, logp0, spec)

    def bwd():
        az, al, dP = cnf_kernels.solve_backward(P, zs, gz, gl, spec, DynamicScaler() if low == torch.float16 else None)
        return (az, al, *dP)

    return fwd, bwd, spec


def sweep_settings(kernel, block=None, warps=None, pad=None, partial_mb=None):
    """Apply one choice to ``cnf_kernels`` (the other kernel and the other knobs keep
    their defaults); returns a function restoring the defaults."""
    import cnf_kernels

    saved = dict(BLOCKS=dict(cnf_kernels.BLOCKS), NUM_WARPS=cnf_kernels.NUM_WARPS, PAD_ROWS=cnf_kernels.PAD_ROWS,
                 PARTIAL_MB=cnf_kernels.PARTIAL_MB)
    slot = 0 if kernel == "forward" else 1
    for dev in ("cuda", "cpu"):
        if block is not None:
            b = list(cnf_kernels.BLOCKS[dev])
            b[slot] = block
            cnf_kernels.BLOCKS[dev] = tuple(b)
    if warps is not None:
        w = list(cnf_kernels.NUM_WARPS)
        w[slot] = warps
        cnf_kernels.NUM_WARPS = tuple(w)
    if pad is not None:
        cnf_kernels.PAD_ROWS = pad
    if partial_mb is not None:
        cnf_kernels.PARTIAL_MB = partial_mb

    def restore():
        for k, v in saved.items():
            setattr(cnf_kernels, k, v)

    return restore


def _sweep_choices(part, cuda):
    """(precision, kernel, settings) of one part. On the CPU (the interpreter: a smoke
    test of the sweep, not a measurement) a few choices only."""
    if part == "options":
        pads = SWEEP_PRECISIONS if cuda else ("float32",)
        budgets = [(p, mb) for p in SWEEP_PRECISIONS for mb in SWEEP_PARTIAL_MB] if cuda else [("float16", 0.002), ("float16", 64)]
        return [(p, k, dict(pad=pad)) for p in pads for k in ("forward", "backward") for pad in (False, True)] \
            + [(p, "backward", dict(partial_mb=mb)) for p, mb in budgets]
    kernel, precision = part.split("-")
    blocks, warps = (SWEEP_BLOCKS, SWEEP_WARPS) if cuda else ((16,), (4,))
    return [(precision, kernel, dict(block=b, warps=w)) for b in blocks for w in warps]


@functools.lru_cache(maxsize=None)
def _cached_problem(device, cfg_items, precision):
    return _sweep_problem(device, dict(cfg_items), precision)


def _compile_choice(job):
    """In a worker process: run one choice once, so its kernel compiles into Triton's cache."""
    device, cfg_items, precision, kernel, settings = job
    fwd, bwd, _ = _cached_problem(device, cfg_items, precision)
    restore = sweep_settings(kernel, **settings)
    try:
        (fwd if kernel == "forward" else bwd)()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # reported when the main process runs it
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    finally:
        restore()
    return ""


def kernel_sweep(device, cfg, out=print, parts=SWEEP_PARTS, precompile=None):
    """The fused forward and backward kernels alone, on one standard solve, over their
    launch choices; one markdown table, a row appended (``out``) as each result comes.

    Parts (``SWEEP_PARTS``): ``forward-<precision>`` and ``backward-<precision>`` time 1, 2,
    4, 8 and 16 samples per program with 1, 2 and 4 warps per program (15 compiles each);
    ``options`` times parameter rows padded to 16 floats against not, for both kernels,
    and the backward's partial-buffer budgets, at every precision (6 compiles). Each part is
    sized for ~100 s on a cold Triton cache: on CUDA its kernels first compile in parallel
    processes (one per core, up to 8, the slowest first), then each choice runs once, is
    checked against the defaults' results (max rel. diff) and timed (median of
    ``triton.testing.do_bench``, ~0.3 s each). The compiles dominate: for sm_90 on two busy
    CPU cores the float16 backward's 15 variants took 3-82 s each (332 s in all; 16 samples
    with 1 warp the slowest), the float32 forward's 2.5-15 s (91 s). ``precompile``
    (default: on CUDA) switches the parallel compile step.

    On the CPU (the interpreter) a few choices stand in for each part and each runs once:
    a check that the sweep works, not a measurement."""
    import cnf_kernels

    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        from triton.testing import do_bench

        def timed(fn):
            return do_bench(fn, warmup=25, rep=200, return_mode="median")
    else:  # the interpreter: one run shows the choice works; its time means nothing for a GPU
        def timed(fn):
            t0 = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t0)

    defaults = dict(blocks=cnf_kernels.BLOCKS[device.type], warps=cnf_kernels.NUM_WARPS, pad_rows=cnf_kernels.PAD_ROWS,
                    partial_mb=cnf_kernels.PARTIAL_MB)
    out(f"| precision | kernel | samples/program | warps | padded rows | PARTIAL_MB: launches | ms (median) "
        f"| max rel. diff vs defaults {defaults} |")
    out("|---|---|---:|---:|---|---|---:|---:|")
    cfg_items = tuple(sorted(cfg.items()))
    for part in parts:
        choices = _sweep_choices(part, cuda)
        for precision in dict.fromkeys(p for p, _, _ in choices):
            fwd, bwd, spec = _cached_problem(str(device), cfg_items, precision)
            ref = {"forward": fwd(), "backward": bwd()}
            mine = [c for c in choices if c[0] == precision]
            if (cuda if precompile is None else precompile) and len(mine) > 1:
                import concurrent.futures
                import multiprocessing

                jobs = min(8, os.cpu_count() or 1, len(mine))
                with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
                    slowest_first = sorted(mine, key=lambda c: (-c[2].get("block", 0), c[2].get("warps", 0)))
                    list(ex.map(_compile_choice, [(str(device), cfg_items, p, k, s) for p, k, s in slowest_first]))
            for _, kernel, settings in mine:
                restore = sweep_settings(kernel, **settings)
                fn = fwd if kernel == "forward" else bwd
                try:
                    block = cnf_kernels.BLOCKS[device.type][kernel == "backward"]
                    warps = cnf_kernels.NUM_WARPS[kernel == "backward"]
                    launches = ""
                    if kernel == "backward":
                        programs = -(-cfg["batch"] // block)
                        R = cnf_kernels.row_stride(2, cfg["width"])
                        launches = f"{cnf_kernels.PARTIAL_MB:g}: {-(-len(spec.h) // cnf_kernels._chunk_steps(len(spec.h), programs, R, 2))}"
                    res = fn()
                    diff = max(((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
                               for a, b in zip(res, ref[kernel]))
                    ms = f"{timed(fn):.3f}"
                except Exception as e:  # out of resources, say: report it and go on
                    diff, ms = float("nan"), f"failed: {str(e).splitlines()[0][:80] if str(e) else type(e).__name__}"
                finally:
                    restore()
                out(f"| {precision} | {kernel} | {block} | {warps} | {'yes' if settings.get('pad', defaults['pad_rows']) else 'no'} "
                    f"| {launches} | {ms} | {diff:.2g} |")


# --- driver ----------------------------------------------------------------------
def _ms(x):
    if x is None:  # a CUDA graph replays forward and backward as one
        return ""
    return f"{x:.0f}" if x >= 100 else f"{x:.2f}"


def table_header(device):
    mem = "peak CUDA MB" if device == "cuda" else "peak RSS MB"
    return [f"| path | precision | ms/iter | fwd ms | bwd ms | speedup vs original | {mem} | growth MB |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]


def table_row(r, rows):
    """One path's line; the speedup is over ``original`` among ``rows`` (measured before it)."""
    if "error" in r:
        return f"| {r['path']} | | failed: {r['error']} | | | | | |"
    orig = next((o["ms_iter"] for o in rows if o["path"] == "original" and "ms_iter" in o), None)
    sp = f"{orig / r['ms_iter']:.1f}x" if orig else "n/a"
    if "graph_bitwise_vs_uncaptured" in r:
        sp += "; graph " + ("bitwise equal to" if r["graph_bitwise_vs_uncaptured"] else "DIFFERS from") + " uncaptured"
    return (f"| {r['path']} | {r['precision']} | {_ms(r['ms_iter'])} | {_ms(r['ms_fwd'])} | {_ms(r['ms_bwd'])} "
            f"| {sp} | {r['peak_mb']:.0f} | {r['growth_mb']:.0f} |")


def _write_json(out, args, cfg, rows):
    """The results so far, replacing the file in one step (never half written)."""
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(device=args.device, config=cfg, iters=args.iters, torch=torch.__version__, rows=rows), f, indent=1)
    os.replace(tmp, out)


def _check_path(path, device):
    """None, or why ``path`` is not a bench path on ``device`` (one line)."""
    base, _, option = path.partition("+")
    if base not in PATHS + CUDA_PATHS:
        return f"unknown path {base!r}; choose from: {', '.join(PATHS + CUDA_PATHS)}"
    if option and option not in OPTIONS:
        return f"unknown option +{option} in {path!r}; choose from: {', '.join('+' + o for o in OPTIONS)}"
    if option and not device.startswith("cuda"):
        return f"{path}: +{option} is a CUDA option; run it with --device cuda"
    if option == "graph" and base not in GRAPH_PATHS:
        return f"{path}: +graph applies to {', '.join(GRAPH_PATHS)} (float16's scaler reads the host each sweep)"
    return None


def parse_args(argv=None):
    from experiment import OneLineParser  # errors: one line, exit 2

    p = OneLineParser(prog="bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per path (after 2 warm-ups)")
    p.add_argument("--quick", action="store_true", help="tiny problem, for a smoke test")
    p.add_argument("--paths", nargs="+", default=None,
                   help=f"subset of {PATHS + CUDA_PATHS}, each optionally with +{' or +'.join(OPTIONS)} (CUDA)")
    p.add_argument("--json", default=None, help="output file (default results/bench_<device>_<time>.json)")
    p.add_argument("--table", default=None, metavar="FILE", help="also write the markdown table here, row by row")
    p.add_argument("--profile", default=None, metavar="PATH", help="profile one path's iterations (torch.profiler) instead")
    p.add_argument("--kernel-sweep", nargs="*", default=None, choices=SWEEP_PARTS, metavar="PART",
                   help=f"time the fused kernels alone over their launch choices: parts {', '.join(SWEEP_PARTS)} "
                        "(each ~100 s on a cold cache; none named: all)")
    p.add_argument("--no-kernels", action="store_true",
                   help="triton paths with the kernel launches made no-ops: the host-side cost alone (results meaningless)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.iters < 1:
        p.error("--iters must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    for path in args.paths or ():
        problem = _check_path(path, args.device)
        if problem:
            p.error(problem)
    if args.profile and _check_path(args.profile, args.device):
        p.error(_check_path(args.profile, args.device))
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = QUICK if args.quick else STANDARD
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.device, cfg, args.iters, args.no_kernels)))
        return 0
    if args.profile:
        profile(args.profile, args.device, cfg, args.iters)
        return 0
    if args.kernel_sweep is not None:
        kernel_sweep(args.device, cfg, out=lambda line: print(line, flush=True), parts=args.kernel_sweep or SWEEP_PARTS)
        return 0
    paths = args.paths or (PATHS + (CUDA_PATHS if args.device.startswith("cuda") else ()))
    device = args.device.split(":")[0]
    out = args.json or os.path.join("results", f"bench_{args.device.replace(':', '')}_{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    print(f"device={args.device} config={cfg} iters={args.iters} torch={torch.__version__} threads={torch.get_num_threads()}"
          + (" no-kernels (fused launches are no-ops: host-side cost only)" if args.no_kernels else ""), flush=True)
    header = table_header(device)
    print("\n".join(header), flush=True)
    if args.table:
        with open(args.table, "w") as f:
            f.write("\n".join(header) + "\n")
    rows = []
    for path in paths:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--device", args.device,
               "--iters", str(args.iters)] + (["--quick"] if args.quick else []) + (["--no-kernels"] if args.no_kernels else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        if proc.returncode == 0:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            err = (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]
            rows.append(dict(path=path, error=err[:120]))
        line = table_row(rows[-1], rows)
        print(line, flush=True)
        if args.table:
            with open(args.table, "a") as f:
                f.write(line + "\n")
        _write_json(out, args, cfg, rows)
    print(f"wrote {out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
