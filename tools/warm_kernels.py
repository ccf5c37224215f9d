"""Compile the fused kernels' variants ahead of the GPU checks, in parallel processes.

    python -m tools.warm_kernels --device cuda [--jobs 8] [--tune]

Triton compiles a kernel once per variant (its constexprs: width, samples and warps
per program, method, precision, scaling; and its integer arguments' divisibility by
16) and keeps the binary in its per-user cache (~/.triton/cache), which every later
process reuses. Each variant here runs one real solve and its backward through the
production path (``log_prob`` through ``torchmpnode.odeint``), so exactly the launches
of a training iteration are compiled. The steps of gpu_check.sh after this one then
time steady state, not compilation. ``--tune`` adds the block and warp choices of
``python -m tools.kernel_sweep`` (``cnf_kernels.SWEEP``) at the standard size.

Prints one line per variant (with its seconds) and exits 1 if any failed.
"""
import itertools
import multiprocessing as mp
import sys
import time

from choices import PRECISIONS

# What gpu_check.sh's later steps launch: bench.py and cnf.py at the standard size
# (batch 1024, width 128, 128 points; validation, test and sampling batches are also
# multiples of 16, the same variants), and pytest -m cuda's partial block (batch 1023) at the
# standard width and at an odd one (width 100: the masked padding columns).
SHAPES = ((128, 1024), (128, 1023), (100, 1023))  # (width, batch)
METHODS = ("rk4", "euler")
# One variant per autocast dtype of choices.PRECISIONS (float32: none), and float16 once more
# with the DynamicScaler (its own kernel variant)
KERNEL_PRECISIONS = tuple(dict.fromkeys(spec.autocast or "float32" for spec in PRECISIONS.values()))
VARIANTS = KERNEL_PRECISIONS + ("float16+scaler",)
POINTS = 128
HIDDEN = 32
# the kernel sweep's variants compiled with --tune: its float32 and scaled float16 parts
SWEEP_VARIANTS = ("float32", "float16+scaler")


def variants(tune=False):
    """(name, settings) pairs; settings go to ``compile_one``."""
    out = [(f"width {w}, batch {n}, {m}, {p}", dict(width=w, n=n, method=m, precision=p))
           for (w, n), m, p in itertools.product(SHAPES, METHODS, VARIANTS)]
    if tune:
        import cnf_kernels

        sweep = cnf_kernels.SWEEP
        for p, kernel, b, nw in itertools.product(SWEEP_VARIANTS, ("forward", "backward"), sweep["blocks"], sweep["warps"]):
            out.append((f"sweep {p} {kernel}: {b} samples, {nw} warps",
                        dict(width=SHAPES[0][0], n=SHAPES[0][1], method="rk4", precision=p, kernel=kernel, block=b, warps=nw)))
    return out


def compile_one(device, width, n, method, precision, kernel=None, block=None, warps=None):
    """One forward solve and its backward on the fused path with these settings (``kernel``,
    ``block``, ``warps``: one launch choice of the sweep, as ``cnf_kernels.launch_settings``)."""
    import torch

    import cnf_kernels
    from model import CNF, Integrator, log_prob
    from torchmpnode import DynamicScaler

    device = torch.device(device)
    with cnf_kernels.launch_settings(kernel, block=block, warps=warps):
        torch.manual_seed(0)
        model = CNF(2, HIDDEN, width, backend="triton").to(device)
        x = torch.randn(n, 2, device=device)
        dtype = precision.split("+")[0]
        low = None if dtype == "float32" else getattr(torch, dtype)
        scaler = DynamicScaler() if precision.endswith("+scaler") else False
        with torch.autocast(device.type, dtype=low or torch.float32, enabled=low is not None):
            loss = -log_prob(model, x, Integrator("torchmpnode", method, POINTS, loss_scaler=scaler)).mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _worker(job):
    device, name, settings = job
    t0 = time.perf_counter()
    try:
        compile_one(device, **settings)
        return name, time.perf_counter() - t0, None
    except Exception as e:  # report and go on: the step that needs it will say more
        return name, time.perf_counter() - t0, f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:160]}"


def main(argv=None):
    """Compile every variant in parallel processes; exit 1 if one failed, 2 for bad input."""
    from experiment import OneLineParser  # errors: one line, exit 2

    p = OneLineParser(prog="python -m tools.warm_kernels", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda or cuda:N (cpu: Triton's interpreter, nothing to compile)")
    p.add_argument("--jobs", type=int, default=8, help="parallel processes")
    p.add_argument("--tune", action="store_true", help="also the block and warp choices of tools.kernel_sweep")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    todo = variants(args.tune)
    if args.list:
        for name, _ in todo:
            print(name)
        return 0
    import torch

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    t0 = time.perf_counter()
    failed = 0
    # spawn: a forked child cannot use CUDA; each child keeps its compiled kernels in the shared cache
    with mp.get_context("spawn").Pool(min(args.jobs, len(todo))) as pool:
        for name, secs, err in pool.imap_unordered(_worker, [(args.device, n, s) for n, s in todo]):
            failed += err is not None
            print(f"{'FAILED' if err else 'ok':6s} {secs:6.1f} s  {name}" + (f": {err}" if err else ""), flush=True)
    print(f"{len(todo) - failed}/{len(todo)} variants in {time.perf_counter() - t0:.1f} s with {args.jobs} processes")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
