"""Train a hypernetwork CNF on a 2D toy density by maximum likelihood.

    python cnf.py --data 8gaussians --odeint torchmpnode --precision float16

Reads top to bottom: the flags (``build_parser``; ``check_flags`` refuses bad ones before
torch loads), the machine (device, backend, threads), the run folder (new or resumed),
then ``train``: start the folder, loop (iterate, validate, checkpoint), and end the run
(final metrics and status first, then the figures). The model, solver, metrics, figures
and files live in their own modules (docs/contributing.md says which).

Exit codes (docs/cli.md): 0 completed, 2 bad input, 3 diverged, 4 interrupted
(SIGTERM/SIGINT/SIGUSR1; resumable), 5 stopped by ``--on_grid_exploit stop``, 6 disk full
or over quota (nothing lost; resumable), 130 Ctrl-C before the run folder existed.
"""
import experiment as ex  # light (no torch, no numpy): the stop signals are caught before anything slow
import runtime

INTERRUPTED_EARLY = "interrupted before the run started; nothing was written"
if __name__ == "__main__":  # a stop signal from the first line on is answered, never lost (runtime.StopSignals)
    runtime.StopSignals(f"cnf.py: {INTERRUPTED_EARLY}", ex.EXIT_CTRL_C).install()
    ex.quiet_exits("cnf.py", interrupted=INTERRUPTED_EARLY, signals=False)

import argparse  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import choices  # noqa: E402
import schedule  # noqa: E402
import toy_data  # noqa: E402
from torchmpnode import METHODS  # noqa: E402  (plain data: the package loads torch on first use)

# Flags that may change when resuming; every other explicit flag must match the checkpoint.
RESUME_OVERRIDES = ("niters", "test_freq", "ckpt_freq", "figures", "viz", "viz_samples", "viz_timesteps", "tensorboard",
                    "device", "gpu", "threads", "backend", "results_dir", "resume", "run_dir", "num_samples_test",
                    "grid_watch", "grid_gap_max", "on_grid_exploit")

# |grid_gap| in nats that raises grid_exploited: see docs/metrics.md for the measurements.
GRID_GAP_MAX = 0.01

# Where and how the run happens is the command line's business, never the checkpoint's. (The
# thread count is the exception: a resume takes the checkpoint's unless --threads is given, since
# the run's bits depend on it.)
NEVER_FROM_CHECKPOINT = ("device", "gpu", "backend", "results_dir", "resume", "run_dir")


def build_parser():
    """Every flag of a run, with its default and help: the one place they are defined."""
    p = ex.OneLineParser(prog="cnf.py", description="Train a hypernetwork CNF on a 2D toy density.")
    a = p.add_argument
    a("--data", default="8gaussians", choices=toy_data.DATASETS, help="toy dataset")
    a("--odeint", default="torchmpnode", choices=choices.SOLVERS, help="ODE solver")
    a("--method", default="rk4", choices=tuple(METHODS), help="fixed-grid scheme (rk4 is classical RK4 in torchmpnode)")
    a("--num_timesteps", type=int, default=128, help="grid points from t=0 to t=1 (>= 2)")
    a("--precision", default="float32", choices=tuple(choices.PRECISIONS), help="training precision (autocast dtype)")
    a("--no_grad_scaler", action="store_true", help="disable GradScaler (torchdiffeq, float16)")
    a("--no_dynamic_scaler", action="store_true", help="disable DynamicScaler (torchmpnode, float16)")
    a("--grad_scaler", action="store_true", help="force GradScaler on for float16 (e.g. torchmpnode without DynamicScaler)")
    a("--adjoint", action="store_true", help="torchdiffeq's adjoint method (torchdiffeq only)")
    a("--hidden_dim", type=int, default=32, help="hypernetwork hidden size")
    a("--width", type=int, default=128, help="width w of the field")
    a("--trace", default="exact", choices=choices.TRACES, help="divergence: closed form, autograd, or Hutchinson")
    a("--backend", default="auto", choices=("auto", *choices.BACKENDS),
      help="who runs torchmpnode's solve of the exact-trace field: the fused Triton kernels, or torch step by step; "
           "auto = triton on CUDA when it can run, else torch")
    a("--kinetic", type=float, default=0.0,
      help="weight of the kinetic-energy penalty int_0^1 ||f||^2 dt in the loss (0: off)")
    a("--jacobian", type=float, default=0.0,
      help="weight of the Jacobian penalty int_0^1 ||df/dz||_F^2 dt in the loss (0: off)")
    a("--niters", type=int, default=2000, help="training iterations")
    a("--lr", type=float, default=1e-2, help="Adam learning rate (the base of --lr_schedule)")
    a("--lr_schedule", default="step", choices=schedule.SCHEDULES,
      help="step: x lr_gamma every lr_step iterations; cosine: down to lr_min over --niters; constant")
    a("--lr_step", type=int, default=1000, help="iterations between the steps of --lr_schedule step")
    a("--lr_gamma", type=float, default=0.1, help="factor of each step of --lr_schedule step, in (0, 1]")
    a("--lr_min", type=float, default=0.0, help="the rate --lr_schedule cosine ends at, at --niters")
    a("--warmup", type=int, default=0, help="iterations of linear warm-up to --lr before the schedule")
    a("--fused_adam", action="store_true",
      help="torch's fused (single-kernel) Adam; CUDA only, --device cpu refuses it (exit 2)")
    a("--num_samples", type=int, default=1024, help="training batch size")
    a("--num_samples_val", type=int, default=1024, help="validation set size (fixed, drawn once from the seed)")
    a("--num_samples_test", type=int, default=20000,
      help="test set size: drawn from its own seed stream, evaluated once at the end of a completed run")
    a("--test_freq", type=int, default=20, help="validate and write a CSV row every N iterations")
    a("--ckpt_freq", type=int, default=100, help="checkpoint every N iterations")
    a("--grid_watch", type=int, default=1,
      help="every K-th validation (and the last) also solves on a finer grid: val_loss_fine, grid_gap; 0: never")
    a("--grid_gap_max", type=float, default=GRID_GAP_MAX,
      help="|grid_gap| (nats) above this raises the grid_exploited flag")
    a("--on_grid_exploit", default="warn", choices=("warn", "stop"),
      help="when the grid_exploited flag rises: warn (log, CSV, status) or stop the run (exit 5)")
    a("--results_dir", default="./results", help="parent of the run folder")
    a("--run_dir", default=None, help="use exactly this run folder (resumed if it holds a checkpoint); for sweeps")
    a("--seed", type=int, default=0, help="random seed (model init, data, validation set)")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--gpu", type=int, default=None, help="alias for --device cuda:N")
    a("--threads", type=int, default=None,
      help="CPU threads for torch (default: OMP_NUM_THREADS if set, else one per core idle at the start; "
           "a resume keeps its checkpoint's count)")
    a("--figures", action=argparse.BooleanOptionalAction, default=True,
      help="draw the figures at the end (the CSV figures, and with --viz the flow frames and GIF); --no-figures "
           "leaves them to: python plots.py RUN (many cells, where matplotlib's seconds per run count)")
    a("--viz", action=argparse.BooleanOptionalAction, default=True, help="flow frames and GIF at the end")
    a("--viz_samples", type=int, default=30000, help="samples in the flow frames")
    a("--viz_timesteps", type=int, default=41, help="frames (time points) in the flow animation")
    a("--tensorboard", action=argparse.BooleanOptionalAction, default=False,
      help="also write the CSV rows' scalars as TensorBoard events in RUN/tensorboard/ (needs the "
           "tensorboard package); view a sweep with: tensorboard --logdir SWEEP")
    a("--resume", default=None, help="a run folder or its ckpt.pth: continue that run in its folder")
    return p


def explicit_flags(argv):
    """The dests given on the command line (not defaulted)."""
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


def check_flags(args):
    """Raise ValueError with a one-line message for bad values; needs no torch, so a typo is
    refused at once. What depends on the machine (CUDA, the backend) is ``resolve_machine``'s."""
    positive = ("num_timesteps", "hidden_dim", "width", "niters", "num_samples", "num_samples_val",
                "num_samples_test", "test_freq", "ckpt_freq", "viz_samples", "viz_timesteps")
    for k in positive:
        if getattr(args, k) < 1:
            raise ValueError(f"--{k} must be positive, got {getattr(args, k)}")
    if args.grid_watch < 0:
        raise ValueError(f"--grid_watch must be >= 0 (0: never), got {args.grid_watch}")
    if not (math.isfinite(args.grid_gap_max) and args.grid_gap_max > 0):
        raise ValueError(f"--grid_gap_max must be a positive number, got {args.grid_gap_max}")
    if args.num_timesteps < 2 or args.viz_timesteps < 2:
        raise ValueError("--num_timesteps and --viz_timesteps need at least 2 grid points")
    if args.num_samples_val < 2 or args.num_samples_test < 2:
        raise ValueError("--num_samples_val and --num_samples_test must be >= 2 (MMD and standard errors need two)")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    schedule.check(args.lr_schedule, args.lr_step, args.lr_gamma, args.lr, args.lr_min, args.warmup, args.niters)
    for k in ("kinetic", "jacobian"):
        if not (math.isfinite(getattr(args, k)) and getattr(args, k) >= 0):
            raise ValueError(f"--{k} must be a number >= 0, got {getattr(args, k)}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    if args.adjoint and args.odeint != "torchdiffeq":
        raise ValueError("--adjoint is torchdiffeq's adjoint method; it does not apply to --odeint torchmpnode")
    if args.gpu is not None:
        if args.gpu < 0:
            raise ValueError(f"--gpu must be >= 0, got {args.gpu}")
        args.device = f"cuda:{args.gpu}"
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        raise ValueError(f"--device {args.device!r}: choose auto, cpu, cuda or cuda:N")
    if args.fused_adam and args.device == "cpu":
        raise ValueError(f"--fused_adam is torch's fused CUDA Adam; it needs --device cuda, not {args.device}")
    if args.resume is not None and not os.path.exists(args.resume):
        raise ValueError(f"--resume {args.resume!r} does not exist")
    if args.run_dir is not None and os.path.exists(args.run_dir) and not os.path.isdir(args.run_dir):
        raise ValueError(f"--run_dir {args.run_dir!r} exists and is not a folder")
    if args.resume is None and args.run_dir is None:
        _check_writable_dir(args.results_dir, "--results_dir")
    if args.tensorboard and not ex.tensorboard_available():
        raise ValueError("--tensorboard needs the tensorboard package, which does not import here: pip install tensorboard")


def _check_writable_dir(path, flag):
    """The folder, or its nearest existing ancestor, must be a writable folder."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{flag} {path!r}: {probe!r} exists and is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path!r} is not writable")


def parse(argv):
    """The parsed and checked flags (bad ones: one line on stderr, exit code 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_flags(args)
    except ValueError as e:
        parser.error(str(e))
    return args


if __name__ == "__main__":
    parse(sys.argv[1:])  # a bad flag or --help is answered now, before torch loads; main() parses again

import torch  # noqa: E402  (after the flags are checked)

import density  # noqa: E402
import metrics  # noqa: E402
import plots  # noqa: E402
from model import resolve_backend  # noqa: E402
from precision import autocast_dtype  # noqa: E402
from trainer import Trainer  # noqa: E402


def resolve_machine(args, self_test=True):
    """Resolve --device and --backend on this machine, in place (ValueError: one line).
    Returns a note on the backend for the log. Without ``self_test`` the fused kernels'
    self-test waits for the run's final config."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    if args.fused_adam and dev.type != "cuda":
        raise ValueError(f"--fused_adam is torch's fused CUDA Adam; it needs --device cuda, not {args.device}")
    use_dynamic = choices.scaler_flags(args.odeint, args.precision, args.no_grad_scaler, args.no_dynamic_scaler,
                                       args.grad_scaler)[1]
    probe = dict(width=args.width, method=args.method, low=autocast_dtype(args.precision), scaled=use_dynamic)
    args.backend, note = resolve_backend(args.backend, dev, args.odeint, args.trace, probe if self_test else None,
                                         regularized=args.kinetic > 0 or args.jacobian > 0, method=args.method)
    if args.backend == "triton" and choices.PRECISIONS[args.precision].tf32:
        note += f"; {args.precision}: the fused kernels have no matmul, so they run plain float32"
    return note


def validate(args, self_test=True):
    """``check_flags`` and ``resolve_machine`` together; returns the backend note."""
    check_flags(args)
    return resolve_machine(args, self_test)


def resolve_run(args):
    """(run folder or None for a new one, checkpoint state or None). Raises ValueError."""
    if args.resume is not None:
        folder = args.resume if os.path.isdir(args.resume) else os.path.dirname(os.path.abspath(args.resume))
        ckpt = os.path.join(folder, "ckpt.pth") if os.path.isdir(args.resume) else args.resume
        if not os.path.isfile(ckpt):
            raise ValueError(f"--resume {args.resume!r}: no ckpt.pth in that folder")
        return ex.RunDir(folder), ex.load_checkpoint(ckpt)
    if args.run_dir is not None:
        run = ex.RunDir(args.run_dir)
        if os.path.isfile(run.ckpt):
            return run, ex.load_checkpoint(run.ckpt)
        if os.path.isdir(run.path) and os.listdir(run.path) and not _same_run_started(run, args):
            raise ValueError(f"--run_dir {args.run_dir!r} holds files but no checkpoint of this run; refusing to overwrite it")
        _check_writable_dir(os.path.dirname(run.path) or ".", "--run_dir")
        return run, None
    return None, None


def _same_run_started(run, args):
    """A run stopped before its first checkpoint left args.csv with this very config."""
    try:
        saved = ex.read_args(run.file("args.csv"))
    except OSError:
        return False
    skip = (*NEVER_FROM_CHECKPOINT, "threads")
    return all(saved.get(k) == str(v) for k, v in vars(args).items() if k not in skip)


def merge_resumed_config(args, explicit, state):
    """Take the run's config from the checkpoint; explicit flags must agree with it. The
    thread count too, unless --threads is given."""
    saved = state["config"]
    keys = sorted(k for k in explicit if k not in RESUME_OVERRIDES and k in saved)
    diffs = ex.config_differences(saved, vars(args), keys)
    if saved.get("lr_schedule") == "cosine" and "niters" in explicit and args.niters != saved["niters"]:
        diffs.append(f"--niters {args.niters} vs {saved['niters']} in the checkpoint: the cosine schedule is planned "
                     f"over --niters, so it cannot be extended; start a new run")
    if diffs:
        raise ValueError("checkpoint does not match the command line: " + "; ".join(diffs))
    for k, v in saved.items():
        if k in RESUME_OVERRIDES and (k in explicit or k in NEVER_FROM_CHECKPOINT):
            continue
        setattr(args, k, v)
    return validate(args)


def run_base_name(a):
    """The run folder's name before its timestamp: data, precision, solver, method, grid points, seed."""
    return f"{a.data}_{a.precision}_{a.odeint}_{a.method}_nt_{a.num_timesteps}_{a.seed}"


def main(argv=None):
    """Parse, resolve the machine and the run folder, train. Returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    parser = build_parser()
    requested_backend = args.backend
    # a run that may resume takes its config (width, precision, ...) from its checkpoint:
    # the kernels' self-test (a compile on a GPU) waits for that config
    deferred = args.resume is not None or args.run_dir is not None
    with runtime.StopSignals() as stop:  # from here on a stop signal is a request: the run ends cleanly
        if stop.received:  # taken by an outer StopSignals (cnf.py as a script exits at once instead)
            sys.stderr.write(f"cnf.py: {INTERRUPTED_EARLY}\n")
            return ex.EXIT_CTRL_C
        try:
            backend_note = resolve_machine(args, self_test=not deferred)
            explicit = explicit_flags(argv)
            run, state = resolve_run(args)
            previous = None
            if state is not None:
                args.backend = requested_backend  # resolved afresh on this machine
                backend_note = merge_resumed_config(args, explicit, state)
                previous = state["config"].get("threads")
            elif deferred:
                args.backend = requested_backend
                backend_note = resolve_machine(args)
        except (ValueError, ex.CheckpointError) as e:
            parser.error(str(e))
        args.threads, how, note = runtime.choose_threads(args.threads if "threads" in explicit else None, previous)
        threads = (f"{args.threads} ({how})", note)
        if stop.received:
            sys.stderr.write(f"cnf.py: {INTERRUPTED_EARLY}\n")
            return ex.EXIT_CTRL_C
        created = run is None or not os.path.isdir(run.path)
        if run is None:
            run = ex.RunDir.create_unique(args.results_dir, run_base_name(args))
        else:
            os.makedirs(run.path, exist_ok=True)
        try:
            return train(args, run, state, backend_note, stop, threads)
        except ex.DiskFull as e:
            return _disk_full(e, run, args, created)


def train(args, run, state, backend_note, stop, threads):
    """One run in its folder: start (or resume) it, loop, end it. Returns the exit code.
    ``stop``: the StopSignals whose request ends the run cleanly (exit 4); ``threads``:
    (how the thread count was chosen, a note for the log or '')."""
    device = torch.device(args.device)
    config = {k: v for k, v in vars(args).items() if k != "resume"}
    tuned = runtime.configure(args.threads)
    tr = Trainer(args, device)
    try:
        return _train(tr, run, state, config, backend_note, stop, threads, tuned)
    except ex.DiskFull as e:
        e.trainer_iter = tr.iter
        raise


def _train(tr, run, state, config, backend_note, stop, threads, tuned):
    args, device = tr.args, tr.device
    log, rows, saved_at = _start(tr, run, state, config)
    log.print(f"device {_device_name(device)}, torch {torch.__version__}, threads {threads[0]}, runtime: {tuned}"
              + (f"; {tr.prec.note}" if tr.prec.note else ""))
    if threads[1]:
        log.print(f"note: {threads[1]}")
    log.print(f"scalers: {tr.scalers.label}; solver {args.odeint} {args.method}, {args.num_timesteps} grid points; "
              f"backend {args.backend}" + (f" ({backend_note})" if backend_note else ""))
    log.print(f"model:\n{tr.cnf}\nparameters: {sum(p.numel() for p in tr.cnf.parameters())}")
    end = Ending(tr, run, log, rows, backend_note)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if tr.iter >= args.niters:
        log.print(f"nothing to train: the checkpoint is at iteration {tr.iter} and --niters is {args.niters}")
    outcome = _loop(tr, run, log, rows, saved_at, stop)
    if outcome is not None:
        return end.stop(*outcome)
    if stop.received:  # between the last iteration and the end-of-run work
        return end.interrupted(stop.received)
    return end.complete(stop)


def _start(tr, run, state, config):
    """Open the run folder: for a new run the first checkpoint (iteration 0: from then on the
    folder can be resumed), args.csv and the sources; for a resumed one the checkpoint's state,
    its CSV rows up to that iteration, and args.csv as the run is now. Returns (log, rows,
    [iteration of the checkpoint on disk])."""
    a = tr.args
    meta = {"torch_version": torch.__version__, "device_name": _device_name(tr.device)}
    if state is None:
        ex.save_checkpoint(run.ckpt, tr.state_dict(config))
        ex.write_args(run, config, meta)
        ex.snapshot_code(run)
        log, rows = ex.RunLog(run.log), []
        log.print(f"# run {run.name}")
    else:
        tr.load_state_dict(state)
        rows = [r for r in ex.read_csv(run.csv) if r["iter"] <= tr.iter] if os.path.exists(run.csv) else []
        if tr.iter < a.niters:  # trained further, an earlier end's metrics are not the end's: the log keeps them
            rows = [{**r, **dict.fromkeys(ex.FINAL_COLUMNS)} for r in rows]
        # args.csv holds the config the run has now (--niters, --backend, ... may have changed);
        # the log keeps every segment's
        ex.write_args(run, config, {**meta, "resumed_at_iter": tr.iter})
        log = ex.RunLog(run.log)
        if ex.snapshot_code(run):  # its first segment stopped before writing them (a full disk, say)
            log.print(f"# {ex.SCRIPT} or code/ was missing: written from the kit as it is now")
        log.print(f"# resumed {run.name} at iteration {tr.iter} (to {a.niters})")
    log.print("config: " + " ".join(f"--{k} {v}" for k, v in sorted(config.items())))
    return log, rows, [tr.iter]


def _loop(tr, run, log, rows, saved_at, stop):
    """Train to --niters: an iteration, its checks, a CSV row every --test_freq iterations, a
    checkpoint every --ckpt_freq. Returns None when done, or (status, reason, exit code) for a
    run that ends early (diverged, grid_exploited with --on_grid_exploit stop, interrupted)."""
    from tqdm import tqdm

    a = tr.args
    window = [0.0, 0.0, 0]
    projection = _Projection(tr.iter, a.niters, a.test_freq)
    bar = tqdm(total=a.niters, initial=tr.iter, desc=run.name[:40], dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    try:
        tr.settle()  # the state to roll back to
        while tr.iter < a.niters:
            t_fwd, t_bwd, failure = tr.step()
            row_due = tr.iter % a.test_freq == 0 or tr.iter == a.niters
            if failure is not None or row_due or tr.iter % a.ckpt_freq == 0 or stop.received:
                failure = tr.settle(failure)
            for e in tr.events:
                log.print(e)
            tr.events = []
            if failure:
                _checkpoint(tr, run, saved_at)  # the last good iteration
                return "diverged", f"iteration {tr.iter + 1}: {failure}", ex.EXIT_DIVERGED
            window = [window[0] + t_fwd, window[1] + t_bwd, window[2] + 1]
            bar.update(1)
            if row_due:
                bar.set_postfix(loss=f"{tr.running:.3f}", refresh=False)
                t_row = time.perf_counter()
                exploit = _validate(tr, run, log, rows, window, saved_at)
                projection.row_took(time.perf_counter() - t_row)
                window = [0.0, 0.0, 0]
                if exploit and a.on_grid_exploit == "stop":
                    _checkpoint(tr, run, saved_at)
                    return "grid_exploited", f"iteration {tr.iter}: {exploit} (--on_grid_exploit stop)", \
                        ex.EXIT_GRID_EXPLOITED
            if (line := projection.after_iteration(tr.iter)) is not None:  # after this iteration's row, if any
                log.print(line)
            if tr.iter % a.ckpt_freq == 0 or stop.received:
                _checkpoint(tr, run, saved_at)
            if stop.received:
                return "interrupted", f"{stop.received} after iteration {tr.iter}; resume with --resume {run.path}", \
                    ex.EXIT_INTERRUPTED
        return None
    finally:
        bar.close()


class _Projection:
    """The one line that says, within a run's first PROJECT_AFTER iterations, how long its
    training will take: the wall time of the iterations after the first (which pays the
    warm-up) times the iterations, plus the validation rows (--test_freq), each at the time
    the first one took. When no row came yet, the line says the rows come on top instead of
    guessing them. Counted from the iterations this process runs, so a resume projects what
    is left of it."""

    def __init__(self, start, niters, test_freq):
        self.start, self.niters, self.test_freq = start, niters, test_freq
        self.t1, self.done, self.rows = None, False, []

    def row_took(self, seconds):
        if not self.done:
            self.rows.append(seconds)

    def after_iteration(self, it):
        if self.done or self.niters - self.start <= PROJECT_AFTER:  # a run this short needs no projection
            return None
        if it == self.start + 1:
            self.t1, self.rows = time.perf_counter(), []
        measured = it - self.start - 1  # iterations timed after the first
        if self.t1 is None or measured < PROJECT_AFTER - 1:
            return None
        self.done = True
        per = (time.perf_counter() - self.t1 - sum(self.rows)) / measured
        n_rows = self.niters // self.test_freq - self.start // self.test_freq + (self.niters % self.test_freq != 0)
        span = f"{per * 1e3:.0f} ms per iteration over iterations {self.start + 2}-{it}"
        if self.rows:
            row = self.rows[0]
            total = per * (self.niters - self.start) + row * n_rows
            return (f"projected: training takes about {ex.duration(total)} ({span} and {row:.1f} s for each of its "
                    f"{n_rows} validation rows, wall clock), then the end-of-run metrics and figures")
        total = per * (self.niters - self.start)
        return (f"projected: training takes about {ex.duration(total)} for its iterations ({span}, wall clock), "
                f"plus its {n_rows} validation rows (--test_freq {self.test_freq}), then the end-of-run metrics "
                f"and figures")


PROJECT_AFTER = 10  # iterations after which the projected training time is printed


def _checkpoint(tr, run, saved_at):
    ex.save_checkpoint(run.ckpt, tr.state_dict({k: v for k, v in vars(tr.args).items() if k != "resume"}))
    saved_at[0] = tr.iter


def _write_rows(tr, run, rows):
    """The run's CSV and, with --tensorboard, the same rows as its TensorBoard events."""
    ex.write_csv(run.csv, rows)
    if getattr(tr.args, "tensorboard", False):  # (runs from before the flag lack it)
        ex.write_events(run.tensorboard, rows)


def _validate(tr, run, log, rows, window, saved_at):
    """A CSV row: validate, write the CSV, log the line, raise the grid flag when due.
    Returns why the grid is exploited, or None."""
    row = tr.evaluate(window)
    exploit = row.pop("grid_exploit_reason")
    rows.append(row)
    _write_rows(tr, run, rows)
    fine = f", grid_gap {row['grid_gap']:+.1e}" if row.get("grid_gap") is not None else ""
    if row.get("kinetic") is not None:
        fine += f"; kinetic {row['kinetic']:.3g}, jacobian {row['jacobian']:.3g}"
    log.print(f"iter {row['iter']:5d} | loss {row['running_loss']:.4f} | val NLL {row['val_loss']:.4f} "
              f"(lowp {row['val_loss_lowp']:.4f}, gap {row['nll_gap']:+.4f}{fine}) | "
              f"MMD {row['val_mmd']:.2e} | {1e3 * row['time_fwd']:.0f}+{1e3 * row['time_bwd']:.0f} ms/iter "
              f"| {row['max_memory_mb']:.0f} MB | scale {row['loss_scale']:g}"
              + (" | GRID EXPLOITED" if exploit else ""))
    if exploit and tr.grid_flag is None:
        _raise_grid_flag(tr, run, log, exploit, saved_at[0])
    return exploit


def _raise_grid_flag(tr, run, log, reason, saved_at):
    """The flag's first rise: record it, keep the checkpoint on disk (written before this
    validation) as ckpt_valid.pth, and say so loudly, once."""
    a = tr.args
    with open(run.ckpt, "rb") as f:
        ex.atomic_write(run.ckpt_valid, f.read())
    tr.grid_flag = {"iter": tr.iter, "reason": reason, "ckpt_valid_iter": saved_at}
    log.print(f"!!! GRID EXPLOITED at iteration {tr.iter}: {reason}. The model is gaming its {a.num_timesteps}-point "
              f"{a.method} grid, so its NLL is no longer a likelihood. Use more grid points (--num_timesteps), a lower "
              f"learning rate (--lr, --lr_schedule), or regularization (--kinetic, --jacobian); --on_grid_exploit "
              f"stop ends such a run. "
              f"The last checkpoint before the flag rose (iteration {saved_at}) is kept as {run.ckpt_valid}; "
              f"quote its numbers, evaluated at the end of the run.")


class Ending:
    """How a run ends. Whatever the outcome, the CSV and status.json are written first; a run
    that trained to the end then gets its final metrics (test NLL, exact likelihood, test_logp.npy,
    density.npz) before its status, and its figures after it, so a figure that fails (a full
    disk) leaves a completed run whose status names the missing figures."""

    def __init__(self, tr, run, log, rows, backend_note):
        self.tr, self.run, self.log, self.rows, self.backend_note = tr, run, log, rows, backend_note
        self.disk_full = None  # the DiskFull that stopped the figures, if one did

    def _status(self, status, reason, models=None, **extra):
        final = {k: v for k, v in self.rows[-1].items() if k not in ex.TIMING_COLUMNS} if self.rows else {}
        ex.write_status(self.run, status, reason, self.tr.iter, final, self.tr.grid_flag, models,
                        backend=self.tr.args.backend, backend_note=self.backend_note, **extra)

    def _close(self, status, reason, code):
        try:
            self.log.print(f"{status}: {reason}")
            self.log.close()
        except ex.DiskFull:
            if not self.disk_full:  # status.json holds the outcome; the log's last line is a courtesy
                raise
        return code

    def stop(self, status, reason, code):
        """An early end: diverged, stopped by the grid flag (with its final report), interrupted."""
        models = _final_report(self.tr, self.rows, self.run, self.log) if status == "grid_exploited" else None
        _write_rows(self.tr, self.run, self.rows)
        self._status(status, reason, models)
        missing = self._figures(plots.csv_figures(self.run.path)) if self.rows and self.tr.args.figures else []
        return self._close(status, reason + self._note(missing), code)

    def interrupted(self, signal_name):
        _checkpoint(self.tr, self.run, [0])
        return self.stop("interrupted", f"{signal_name} after iteration {self.tr.iter}; resume with --resume "
                         f"{self.run.path}", ex.EXIT_INTERRUPTED)

    def complete(self, stop):
        """Trained to --niters: the final metrics, the status, then the figures. A Ctrl-C
        during the final metrics ends as interrupted (a resume redoes them)."""
        tr, run, a = self.tr, self.run, self.tr.args
        _checkpoint(tr, run, [0])
        models = _final_report(tr, self.rows, run, self.log)
        if self.rows:
            density.save(run, density.density_arrays(tr.cnf, tr.integ, tr.device, a.seed), tr.iter)  # for overviews
        _write_rows(tr, run, self.rows)
        if stop.received:
            return self.interrupted(stop.received)
        figures = plots.csv_figures(run.path) if self.rows and a.figures else {}
        undrawn = []  # flow frames that could not even be drawn in memory
        if a.viz and a.figures:
            frames = self._flow_frames()
            if frames is None:
                undrawn = [plots.frame_name(k) for k in range(a.viz_timesteps)] + [plots.GIF]
            else:
                figures.update(frames)
        reason = f"trained {a.niters} iterations"
        self._status("completed", reason, models, missing_figures=[*figures, *undrawn])  # until they are drawn
        missing = self._figures(figures, stop) + undrawn
        try:  # the figures it could draw no longer count as missing
            self._status("completed", reason, models, missing_figures=missing)
        except ex.DiskFull:
            pass  # status.json keeps listing them all: never more drawn than it says
        if stop.received:  # the run is completed; the figures it did not draw are listed, and a resume draws them
            return self._close("completed", f"{reason}; {stop.received} while drawing the figures"
                               + self._note(missing), ex.EXIT_INTERRUPTED)
        if missing and self.disk_full:
            self._close("completed", reason + self._note(missing), ex.EXIT_OK)
            sys.stderr.write(f"cnf.py: disk full while drawing the figures: {self.disk_full.line()}; the run is "
                             f"completed (status.json) without {_names(missing)}; free some space and draw "
                             f"them with: python plots.py {run.path}\n")
            return ex.EXIT_DISK_FULL
        return self._close("completed", reason + self._note(missing), ex.EXIT_OK)

    def _note(self, missing):
        """The end of the last log line: the figures missing, or none asked for (--no-figures)."""
        if not self.tr.args.figures and self.rows:
            return f"; no figures (--no-figures): draw them with: python plots.py {self.run.path}"
        if not missing:
            return ""
        return f"; figures missing: {_names(missing)} (draw them with: python plots.py {self.run.path})"

    def _figures(self, figures, stop=None):
        """Draw each figure ({name: draw}); returns the names not drawn. After a full disk the
        rest are not tried (they would fail the same way), nor after a stop signal."""
        missing = []
        for name, draw in figures.items():
            if self.disk_full is not None or (stop is not None and stop.received):
                missing.append(name)
                continue
            try:
                draw()
            except ex.DiskFull as e:
                self.disk_full = e
                missing.append(name)
            except Exception as e:  # a figure is optional: the run's numbers are already written
                self.log.print(f"figure {name} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                missing.append(name)
        return missing

    def _flow_frames(self):
        """{file name: write} of the flow frames and the GIF, drawn in memory first (one solve
        each way); None, with the reason in the log, when they cannot be drawn."""
        tr = self.tr
        try:
            target, snaps = density.flow_arrays(tr.cnf, tr.integ, vars(tr.args), tr.device)
            files = plots.flow_frames(target, snaps)
        except Exception as e:  # optional, like every figure: the run's numbers are already written
            self.log.print(f"the flow frames failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return None
        self.log.print(f"drawing {len(files) - 1} frames and {plots.GIF}")
        return {name: functools.partial(ex.atomic_write, self.run.file(name), data) for name, data in files.items()}


def _names(missing):
    """The missing figures in a few words: a run of frames is counted, not listed."""
    frames = [n for n in missing if n.startswith("cnf-viz-")]
    rest = [n for n in missing if n not in frames]
    if len(frames) > 3:
        rest.insert(0, f"{len(frames)} flow frames ({frames[0]} to {frames[-1]})")
    else:
        rest = frames + rest
    return ", ".join(rest)


def _final_report(tr, rows, run, log):
    """The end-of-run metrics of the trained model into the last row (and test_logp.npy);
    for a flagged run also those of ckpt_valid.pth. Returns status.json's ``models``
    (None for an unflagged run)."""
    a = tr.args
    if not rows:
        return None
    final, logp, secs = tr.final_evaluation(rows[-1]["val_loss"])
    rows[-1].update(final)
    ex.write_npy(run.test_logp, logp.numpy())
    flagged = tr.grid_flag is not None
    label = f" [ckpt.pth, iteration {tr.iter}: trained past the grid_exploited flag]" if flagged else ""
    log.print(f"test NLL {final['test_loss']:.4f} ± {final['test_loss_se']:.4f} (SE, {a.num_samples_test} "
              f"points, gap {final['test_gap']:+.4f}; MMD {final['test_mmd']:.2e} ± {final['test_mmd_se']:.1e}; "
              f"{secs[0]:.1f} s) | exact val NLL "
              f"{final['val_loss_exact']:.4f} ({metrics.EXACT_METHOD} float64, tol {metrics.EXACT_TOL:g}; "
              f"{secs[1]:.1f} s), disc_gap {final['disc_gap']:+.2e}{label}")
    if not flagged:
        return None
    latest = {"label": "latest model, trained past the grid_exploited flag: do not quote", "iter": tr.iter,
              "val_loss": rows[-1]["val_loss"], **final}
    valid = {"label": "last checkpoint before the grid_exploited flag rose: quote this one",
             **metrics.checkpoint_metrics(run.ckpt_valid, tr.device, a.backend)}
    log.print(f"test NLL {valid['test_loss']:.4f} ± {valid['test_loss_se']:.4f} (gap {valid['test_gap']:+.4f}; "
              f"MMD {valid['test_mmd']:.2e} ± {valid['test_mmd_se']:.1e}) | "
              f"exact val NLL {valid['val_loss_exact']:.4f}, disc_gap {valid['disc_gap']:+.2e} "
              f"[ckpt_valid.pth, iteration {valid['iter']}: the last checkpoint before the flag rose; quote this one]")
    return {"ckpt.pth": latest, "ckpt_valid.pth": valid}


# Bytes a finished run writes besides its checkpoint, rounded up from the quick start's run
# folder (2026-12-01: cnf.py and code/ 202 KB, the two PNGs 182 KB, 41 frames of 29 KB and a
# 4.3 MB GIF): the sources, the PNGs, and per flow frame its JPG and its share of the GIF.
SOURCES_BYTES, PNG_BYTES, FRAME_BYTES = 250_000, 250_000, 140_000


def space_to_finish(run, args, ckpt_bytes):
    """Bytes of free space the run needs to finish, about: a checkpoint is written beside the
    old one before it replaces it; then the CSV, the end-of-run arrays and the figures."""
    need = ckpt_bytes + 4 * args.num_samples_test + 64_000 + 300 * (args.niters // args.test_freq + 2)
    need += PNG_BYTES if args.figures else 0
    if not os.path.isdir(run.file("code")):
        need += SOURCES_BYTES
    if args.viz and args.figures:
        need += FRAME_BYTES * args.viz_timesteps
    return need


def _disk_full(e, run, args, created):
    """One line for a full disk (or quota) during a run, and exit code 6. A run with a
    checkpoint is resumable; one without (the very first write failed) has trained nothing,
    and the folder it created, empty, is removed."""
    ckpt = os.path.getsize(run.ckpt) if os.path.isfile(run.ckpt) else (e.needed or 0)
    need = ex.megabytes(space_to_finish(run, args, ckpt))
    if os.path.isfile(run.ckpt):
        what = (f"the run folder holds {ex.megabytes(ex.folder_bytes(run.path))} and needs about {need} more to finish; "
                f"nothing is lost: free some space, then resume with: python cnf.py --resume {run.path}")
    else:
        if created:
            try:
                os.rmdir(run.path)  # only if empty: it holds nothing of the run
            except OSError:
                pass
        what = f"nothing was trained; the run needs about {need} free: free some space and run the command again"
    if os.path.isfile(run.ckpt):
        try:  # a small file, and the failed write's space is free again: --status and sweeps read it
            ex.write_status(run, "disk_full", f"{e.line()}; {what}", getattr(e, "trainer_iter", None), {})
        except OSError:
            pass  # the job log's exit code 6 says it (sweep_status.py)
    sys.stderr.write(f"cnf.py: disk full: {e.line()}; {what}\n")
    return ex.EXIT_DISK_FULL


def _device_name(device):
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"


if __name__ == "__main__":
    sys.exit(main())
