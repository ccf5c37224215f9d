"""Train a hypernetwork CNF on a 2D toy density by maximum likelihood.

    python cnf.py --data 8gaussians --odeint torchmpnode --precision float16

Parses and checks the flags, builds a ``trainer.Trainer``, runs its loop and writes a
self-contained run folder (see README). Exit codes: 0 completed, 2 bad input,
3 diverged, 4 interrupted (SIGTERM/SIGINT/SIGUSR1; resumable), 5 stopped by
``--on_grid_exploit stop``.
"""
import argparse
import math
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

import density
import experiment as ex
import metrics
import plots
import runtime
import schedule
import toy_data
from model import BACKENDS, SOLVERS, TRACES, flow_snapshots, resolve_backend
from precision import PRECISIONS, scaler_flags
from torchmpnode import METHODS
from trainer import Trainer

# Flags that may change when resuming; every other explicit flag must match the checkpoint.
RESUME_OVERRIDES = ("niters", "test_freq", "ckpt_freq", "viz", "viz_samples", "viz_timesteps", "device",
                    "gpu", "threads", "backend", "results_dir", "resume", "run_dir", "num_samples_test",
                    "grid_watch", "grid_gap_max", "on_grid_exploit")


# |grid_gap| in nats that raises grid_exploited: see the README's Metrics section for the measurements.
GRID_GAP_MAX = 0.01

# Where and how the run happens is the command line's business, never the checkpoint's.
NEVER_FROM_CHECKPOINT = ("device", "gpu", "threads", "backend", "results_dir", "resume", "run_dir")


def build_parser():
    p = ex.OneLineParser(prog="cnf.py", description="Train a hypernetwork CNF on a 2D toy density.")
    a = p.add_argument
    a("--data", default="8gaussians", choices=toy_data.DATASETS, help="toy dataset")
    a("--odeint", default="torchmpnode", choices=SOLVERS, help="ODE solver")
    a("--method", default="rk4", choices=tuple(METHODS), help="fixed-grid scheme (rk4 is classical RK4 in torchmpnode)")
    a("--num_timesteps", type=int, default=128, help="grid points from t=0 to t=1 (>= 2)")
    a("--precision", default="float32", choices=tuple(PRECISIONS), help="training precision (autocast dtype)")
    a("--no_grad_scaler", action="store_true", help="disable GradScaler (torchdiffeq, float16)")
    a("--no_dynamic_scaler", action="store_true", help="disable DynamicScaler (torchmpnode, float16)")
    a("--grad_scaler", action="store_true", help="force GradScaler on for float16 (e.g. torchmpnode without DynamicScaler)")
    a("--adjoint", action="store_true", help="torchdiffeq's adjoint method (torchdiffeq only)")
    a("--hidden_dim", type=int, default=32, help="hypernetwork hidden size")
    a("--width", type=int, default=128, help="width w of the field")
    a("--trace", default="exact", choices=TRACES, help="divergence: closed form, autograd, or Hutchinson")
    a("--backend", default="auto", choices=("auto", *BACKENDS),
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
      help=f"every K-th validation (and the last) also solves on {metrics.FINE_FACTOR}x the grid's steps: "
           "val_loss_fine, grid_gap; 0: never")
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
      help="CPU threads for torch (default: OMP_NUM_THREADS if set, else one per core); 1 on a busy shared machine. "
           "Not taken from a resumed run's checkpoint: pass it again")
    a("--viz", action=argparse.BooleanOptionalAction, default=True, help="flow frames and GIF at the end")
    a("--viz_samples", type=int, default=30000, help="samples in the flow frames")
    a("--viz_timesteps", type=int, default=41, help="frames (time points) in the flow animation")
    a("--resume", default=None, help="a run folder or its ckpt.pth: continue that run in its folder")
    return p


def explicit_flags(argv):
    """The dests given on the command line (not defaulted)."""
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


def validate(args, self_test=True):
    """Raise ValueError with a one-line message for bad values. Resolves --device
    and --backend in place; returns a note on the backend for the log. Without
    ``self_test`` the fused kernels' self-test waits for the run's final config."""
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
    if args.threads is None:
        args.threads = torch.get_num_threads()  # torch's default: OMP_NUM_THREADS, else one per core
    if args.threads < 1:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    if args.adjoint and args.odeint != "torchdiffeq":
        raise ValueError("--adjoint is torchdiffeq's adjoint method; it does not apply to --odeint torchmpnode")
    if args.gpu is not None:
        args.device = f"cuda:{args.gpu}"
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device!r}: choose auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    if args.fused_adam and dev.type != "cuda":
        raise ValueError(f"--fused_adam is torch's fused CUDA Adam; it needs --device cuda, not {args.device}")
    use_dynamic = scaler_flags(args.odeint, args.precision, args.no_grad_scaler, args.no_dynamic_scaler,
                               args.grad_scaler)[1]
    probe = dict(width=args.width, method=args.method, low=PRECISIONS[args.precision], scaled=use_dynamic)
    args.backend, note = resolve_backend(args.backend, dev, args.odeint, args.trace, probe if self_test else None,
                                         regularized=args.kinetic > 0 or args.jacobian > 0)
    if args.backend == "triton" and args.precision == "tfloat32":
        note += "; tfloat32: the fused kernels have no matmul, so they run plain float32"
    if args.resume is None and args.run_dir is None:
        _check_writable_dir(args.results_dir, "--results_dir")
    return note


def _check_writable_dir(path, flag):
    """The folder, or its nearest existing ancestor, must be a writable folder."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{flag} {path!r}: {probe!r} exists and is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path!r} is not writable")


def resolve_run(args, explicit):
    """(run folder or None for a new one, checkpoint state or None). Raises ValueError."""
    if args.resume is not None:
        if not os.path.exists(args.resume):
            raise ValueError(f"--resume {args.resume!r} does not exist")
        folder = args.resume if os.path.isdir(args.resume) else os.path.dirname(os.path.abspath(args.resume))
        ckpt = os.path.join(folder, "ckpt.pth") if os.path.isdir(args.resume) else args.resume
        if not os.path.isfile(ckpt):
            raise ValueError(f"--resume {args.resume!r}: no ckpt.pth in that folder")
        return ex.RunDir(folder), ex.load_checkpoint(ckpt)
    if args.run_dir is not None:
        if os.path.exists(args.run_dir) and not os.path.isdir(args.run_dir):
            raise ValueError(f"--run_dir {args.run_dir!r} exists and is not a folder")
        run = ex.RunDir(args.run_dir)
        if os.path.isfile(run.ckpt):
            return run, ex.load_checkpoint(run.ckpt)
        if os.path.isdir(run.path) and os.listdir(run.path) and not _same_run_started(run, args):
            raise ValueError(f"--run_dir {args.run_dir!r} holds files but no checkpoint of this run; refusing to overwrite it")
        _check_writable_dir(os.path.dirname(run.path) or ".", "--run_dir")
        return run, None
    return None, None


def _same_run_started(run, args):
    """A run killed before its first checkpoint left args.csv with this very config."""
    try:
        saved = ex.read_args(run.file("args.csv"))
    except OSError:
        return False
    return all(saved.get(k) == str(v) for k, v in vars(args).items() if k not in NEVER_FROM_CHECKPOINT)


def merge_resumed_config(args, explicit, state):
    """Take the run's config from the checkpoint; explicit flags must agree with it."""
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
    return f"{a.data}_{a.precision}_{a.odeint}_{a.method}_nt_{a.num_timesteps}_{a.seed}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    requested_backend = args.backend
    # a run that may resume takes its config (width, precision, ...) from its checkpoint:
    # the kernels' self-test (a compile on a GPU) waits for that config
    deferred = args.resume is not None or args.run_dir is not None
    try:
        backend_note = validate(args, self_test=not deferred)
        explicit = explicit_flags(argv)
        run, state = resolve_run(args, explicit)
        if state is not None:
            args.backend = requested_backend  # resolved afresh on this machine
            backend_note = merge_resumed_config(args, explicit, state)
        elif deferred:
            args.backend = requested_backend
            backend_note = validate(args)
    except (ValueError, ex.CheckpointError) as e:
        parser.error(str(e))
    if run is None:
        run = ex.RunDir.create_unique(args.results_dir, run_base_name(args))
    else:
        os.makedirs(run.path, exist_ok=True)
    return train(args, run, state, backend_note)


def train(args, run, state, backend_note=""):
    device = torch.device(args.device)
    log = ex.RunLog(run.log)
    config = {k: v for k, v in vars(args).items() if k != "resume"}
    tuned = runtime.configure(args.threads)
    tr = Trainer(args, device)
    rows = []
    saved_at = [0]  # the iteration of the checkpoint on disk

    def checkpoint():
        ex.save_checkpoint(run.ckpt, tr.state_dict(config))
        saved_at[0] = tr.iter
    if state is None:
        log.print(f"# run {run.name}")
        ex.write_args(run, config, {"torch_version": torch.__version__, "device_name": _device_name(device)})
        ex.snapshot_code(run)
        checkpoint()  # from now on the folder can always be resumed
    else:
        tr.load_state_dict(state)
        saved_at[0] = tr.iter  # the checkpoint it resumes from
        rows = [r for r in ex.read_csv(run.csv) if r["iter"] <= tr.iter] if os.path.exists(run.csv) else []
        log.print(f"# resumed {run.name} at iteration {tr.iter} (to {args.niters})")
        # args.csv holds the config the run has now (--niters, --backend, ... may have changed);
        # the log keeps every segment's
        ex.write_args(run, config, {"torch_version": torch.__version__, "device_name": _device_name(device),
                                    "resumed_at_iter": tr.iter})
    log.print("config: " + " ".join(f"--{k} {v}" for k, v in sorted(config.items())))
    before = (state or {}).get("config", {}).get("threads")
    if before is not None and before != args.threads:  # threads belong to the machine, not to the run
        tuned += f" (the run's previous segment used {before}; --threads sets it)"
    log.print(f"device {_device_name(device)}, torch {torch.__version__}, runtime: {tuned}"
              + (f"; {tr.prec.note}" if tr.prec.note else ""))
    log.print(f"scalers: {tr.scalers.label}; solver {args.odeint} {args.method}, {args.num_timesteps} grid points; "
              f"backend {args.backend}" + (f" ({backend_note})" if backend_note else ""))
    log.print(f"model:\n{tr.cnf}\nparameters: {sum(p.numel() for p in tr.cnf.parameters())}")

    def finish(status, reason, code, models=None):
        ex.write_csv(run.csv, rows)
        if rows:
            plots.plot_optimization(run.csv, run.file("optimization_stats.png"), toy_data.ENTROPY[args.data], run.name)
            plots.plot_mmd(run.csv, run.file("mmd_plot.png"))
        final = {k: v for k, v in rows[-1].items() if k not in ex.TIMING_COLUMNS} if rows else {}
        ex.write_status(run, status, reason, tr.iter, final, tr.grid_flag, models, backend=args.backend,
                        backend_note=backend_note)
        log.print(f"{status}: {reason}")
        log.close()
        return code

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if tr.iter >= args.niters:
        log.print(f"nothing to train: the checkpoint is at iteration {tr.iter} and --niters is {args.niters}")
    window = [0.0, 0.0, 0]
    with ex.StopSignals() as stop:
        bar = tqdm(total=args.niters, initial=tr.iter, desc=run.name[:40], dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
        tr.settle()  # the state to roll back to
        while tr.iter < args.niters:
            t_fwd, t_bwd, failure = tr.step()
            row_due = tr.iter % args.test_freq == 0 or tr.iter == args.niters
            if failure is not None or row_due or tr.iter % args.ckpt_freq == 0 or stop.received:
                failure = tr.settle(failure)
            for e in tr.events:
                log.print(e)
            tr.events = []
            if failure:
                bar.close()
                checkpoint()  # the last good iteration
                return finish("diverged", f"iteration {tr.iter + 1}: {failure}", ex.EXIT_DIVERGED)
            window = [window[0] + t_fwd, window[1] + t_bwd, window[2] + 1]
            bar.update(1)
            if row_due:
                bar.set_postfix(loss=f"{tr.running:.3f}", refresh=False)
                row = tr.evaluate(window)
                exploit = row.pop("grid_exploit_reason")
                rows.append(row)
                window = [0.0, 0.0, 0]
                ex.write_csv(run.csv, rows)
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
                if exploit and args.on_grid_exploit == "stop":
                    bar.close()
                    checkpoint()
                    models = _final_report(tr, rows, run, log, device)
                    return finish("grid_exploited", f"iteration {tr.iter}: {exploit} (--on_grid_exploit stop)",
                                  ex.EXIT_GRID_EXPLOITED, models)
            if tr.iter % args.ckpt_freq == 0 or stop.received:
                checkpoint()
            if stop.received:
                bar.close()
                return finish("interrupted", f"{stop.received} after iteration {tr.iter}; resume with --resume "
                              f"{run.path}", ex.EXIT_INTERRUPTED)
        bar.close()
    checkpoint()
    models = _final_report(tr, rows, run, log, device)
    if rows:
        density.save(run, density.density_arrays(tr.cnf, tr.integ, device, args.seed), tr.iter)  # for overviews
    if args.viz:
        _visualize(tr.cnf, tr.integ, args, run, device, log)
    return finish("completed", f"trained {args.niters} iterations", ex.EXIT_OK, models)


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


def _final_report(tr, rows, run, log, device):
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
             **metrics.checkpoint_metrics(run.ckpt_valid, device, a.backend)}
    log.print(f"test NLL {valid['test_loss']:.4f} ± {valid['test_loss_se']:.4f} (gap {valid['test_gap']:+.4f}; "
              f"MMD {valid['test_mmd']:.2e} ± {valid['test_mmd_se']:.1e}) | "
              f"exact val NLL {valid['val_loss_exact']:.4f}, disc_gap {valid['disc_gap']:+.2e} "
              f"[ckpt_valid.pth, iteration {valid['iter']}: the last checkpoint before the flag rose; quote this one]")
    return {"ckpt.pth": latest, "ckpt_valid.pth": valid}


def _visualize(cnf, integ, args, run, device, log):
    gen = torch.Generator().manual_seed(args.seed + 2)
    snaps = flow_snapshots(cnf, integ, args.viz_samples, args.viz_timesteps, device, gen)
    target = toy_data.inf_train_gen(args.data, args.viz_samples, np.random.default_rng(args.seed + 3))
    frames = plots.save_flow_frames(run.path, target, snaps)
    log.print(f"wrote {len(frames)} frames and cnf-viz.gif")


def _device_name(device):
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"


if __name__ == "__main__":
    sys.exit(main())
