"""Time the fused kernels alone over their launch choices, on one standard solve.

    python -m tools.kernel_sweep --device cuda [PART ...] [--quick]

Parts: ``forward-<precision>`` and ``backward-<precision>`` (one per autocast dtype of
``choices.PRECISIONS``; float16's backward with a DynamicScaler) time every pair of
samples per program and warps per program in ``cnf_kernels.SWEEP`` (15 compiles each);
``options`` times parameter rows padded to 16 floats against not, for both kernels, and
the backward's partial-buffer budgets, at every precision (6 compiles). Each part is sized
for ~100 s on a cold Triton cache: on CUDA its kernels first compile in parallel processes
(one per core, up to 8, the slowest first), then each choice runs once, is checked against
the defaults' results (max relative difference) and timed (median of
``triton.testing.do_bench``, ~0.3 s each). The compiles dominate: for sm_90 on two busy CPU
cores the float16 backward's 15 variants took 3-82 s each (332 s in all; 16 samples with
1 warp the slowest), the float32 forward's 2.5-15 s (91 s).

On the CPU (Triton's interpreter, ``TRITON_INTERPRET=1``) a few choices stand in for each
part and each runs once: a check that the sweep works, not a measurement.

Prints one markdown table, a row as each result comes. The choices are applied with
``cnf_kernels.launch_settings``; the defaults are ``cnf_kernels.DEFAULT_LAUNCH``.
"""
import functools
import os
import sys
import time

from bench import QUICK, STANDARD  # bench.py's problem sizes
from choices import PRECISIONS

# One sweep precision per autocast dtype (float32: none), in the order of the table.
SWEEP_PRECISIONS = tuple(dict.fromkeys(spec.autocast or "float32" for spec in PRECISIONS.values()))
PARTS = tuple(f"{k}-{p}" for k in ("forward", "backward") for p in SWEEP_PRECISIONS) + ("options",)


def sweep_problem(device, cfg, precision):
    """The fused kernels' inputs on one standard solve at ``precision``: closures running the
    forward and the backward kernels under the launch choices in force (the backward from the
    end of the grid, float16 with a fresh DynamicScaler), and the solve's grid spec."""
    import torch

    import cnf_kernels
    from model import CNF, Integrator, log_prob
    from torchmpnode import DynamicScaler

    class Recording(CNF):  # keeps the inputs of the forward solve it hands to the kernels
        def grid_solve(self, P, y, spec):
            self.captured = (P, y[0], y[1], spec)
            return super().grid_solve(P, y, spec)

    device = torch.device(device)
    low = None if precision == "float32" else getattr(torch, precision)
    torch.manual_seed(0)
    model = Recording(2, cfg["hidden"], cfg["width"], backend="triton").to(device)
    x = torch.randn(cfg["batch"], 2, device=device) * 1.5
    with torch.no_grad(), torch.autocast(device.type, dtype=low or torch.float32, enabled=low is not None):
        log_prob(model, x, Integrator("torchmpnode", "rk4", cfg["num_timesteps"]))
    P, z0, logp0, spec = model.captured
    zs, _ = cnf_kernels.solve_forward(P, z0, logp0, spec)
    g = torch.Generator(device=device).manual_seed(1)
    gz = torch.zeros_like(zs)
    gl = torch.zeros(zs.shape[0], zs.shape[1], 1, device=device)
    gz[-1] = torch.randn(zs.shape[1:], generator=g, device=device) / zs.shape[1]
    gl[-1] = -1.0 / zs.shape[1]

    def fwd():
        return cnf_kernels.solve_forward(P, z0, logp0, spec)

    def bwd():
        scaler = DynamicScaler() if low == torch.float16 else None
        az, al, dP = cnf_kernels.solve_backward(P, zs, gz, gl, spec, scaler)
        return (az, al, *dP)

    return fwd, bwd, spec


def choices_of(part, cuda):
    """(precision, kernel, launch_settings keywords) of one part. On the CPU a few only."""
    import cnf_kernels

    if part == "options":
        pads = SWEEP_PRECISIONS if cuda else ("float32",)
        budgets = ([(p, mb) for p in SWEEP_PRECISIONS for mb in cnf_kernels.SWEEP["partial_mb"]] if cuda
                   else [("float16", 0.002), ("float16", 64)])
        return [(p, k, dict(pad_rows=pad)) for p in pads for k in ("forward", "backward") for pad in (False, True)] \
            + [(p, "backward", dict(partial_mb=mb)) for p, mb in budgets]
    kernel, precision = part.split("-")
    blocks, warps = (cnf_kernels.SWEEP["blocks"], cnf_kernels.SWEEP["warps"]) if cuda else ((16,), (4,))
    return [(precision, kernel, dict(block=b, warps=w)) for b in blocks for w in warps]


@functools.lru_cache(maxsize=None)
def _cached_problem(device, cfg_items, precision):
    return sweep_problem(device, dict(cfg_items), precision)


def _compile_choice(job):
    """In a worker process: run one choice once, so its kernel compiles into Triton's cache."""
    import torch

    import cnf_kernels

    device, cfg_items, precision, kernel, settings = job
    fwd, bwd, _ = _cached_problem(device, cfg_items, precision)
    try:
        with cnf_kernels.launch_settings(kernel, **settings):
            (fwd if kernel == "forward" else bwd)()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # reported when the main process runs it
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    return ""


def kernel_sweep(device, cfg, out=print, parts=PARTS, precompile=None):
    """The sweep of the module docstring; one markdown table, a row appended (``out``) as
    each result comes. ``precompile`` (default: on CUDA) switches the parallel compile step."""
    import torch

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

    d = cnf_kernels.DEFAULT_LAUNCH
    defaults = dict(blocks=d.blocks[device.type], warps=d.warps, pad_rows=d.pad_rows, partial_mb=d.partial_mb)
    out(f"| precision | kernel | samples/program | warps | padded rows | partial_mb: launches | ms (median) "
        f"| max rel. diff vs defaults {defaults} |")
    out("|---|---|---:|---:|---|---|---:|---:|")
    cfg_items = tuple(sorted(cfg.items()))
    for part in parts:
        choices = choices_of(part, cuda)
        for precision in dict.fromkeys(p for p, _, _ in choices):
            fwd, bwd, spec = _cached_problem(str(device), cfg_items, precision)
            ref = {"forward": fwd(), "backward": bwd()}
            mine = [c for c in choices if c[0] == precision]
            if (cuda if precompile is None else precompile) and len(mine) > 1:
                import concurrent.futures
                import multiprocessing

                jobs = min(8, os.cpu_count() or 1, len(mine))
                with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                    slowest_first = sorted(mine, key=lambda c: (-c[2].get("block", 0), c[2].get("warps", 0)))
                    list(pool.map(_compile_choice, [(str(device), cfg_items, p, k, s) for p, k, s in slowest_first]))
            for _, kernel, settings in mine:
                out(_timed_row(device, cfg, precision, kernel, settings, spec, ref, fwd, bwd, timed))


def _timed_row(device, cfg, precision, kernel, settings, spec, ref, fwd, bwd, timed):
    """One choice: run it, compare with the defaults' results, time it; its table row."""
    import cnf_kernels

    with cnf_kernels.launch_settings(kernel, **settings) as launch:
        slot = kernel == "backward"
        block, warps = launch.blocks[device.type][slot], launch.warps[slot]
        try:
            launches = ""
            if kernel == "backward":
                programs = -(-cfg["batch"] // block)
                R = cnf_kernels.row_stride(2, cfg["width"])
                steps = cnf_kernels._chunk_steps(len(spec.h), programs, R, 2)
                launches = f"{launch.partial_mb:g}: {-(-len(spec.h) // steps)}"
            fn = fwd if kernel == "forward" else bwd
            res = fn()
            diff = max(((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
                       for a, b in zip(res, ref[kernel]))
            ms = f"{timed(fn):.3f}"
        except Exception as e:  # out of resources, say: report it and go on
            diff, ms = float("nan"), f"failed: {str(e).splitlines()[0][:80] if str(e) else type(e).__name__}"
        pad = "yes" if launch.pad_rows else "no"
    return f"| {precision} | {kernel} | {block} | {warps} | {pad} | {launches} | {ms} | {diff:.2g} |"


def main(argv=None):
    """Parse the parts and the device, then run the sweep. Exit 0, or 2 for bad input."""
    from experiment import OneLineParser  # errors: one line, exit 2

    p = OneLineParser(prog="python -m tools.kernel_sweep", description=__doc__.split("\n")[0])
    p.add_argument("parts", nargs="*", choices=PARTS, metavar="PART",
                   help=f"{', '.join(PARTS)} (each ~100 s on a cold cache; none named: all)")
    p.add_argument("--device", default="cuda", help="cuda or cuda:N (cpu: the interpreter, a smoke test)")
    p.add_argument("--quick", action="store_true", help="a tiny problem, for a smoke test")
    args = p.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda requested but CUDA is not available")
    kernel_sweep(args.device, QUICK if args.quick else STANDARD, out=lambda line: print(line, flush=True),
                 parts=args.parts or PARTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
