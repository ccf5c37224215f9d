"""The learned density of a completed run, as arrays small enough to keep with every run
(``density.npz``, about 50 KB), so that overview figures never retrain or reload models;
and the arrays of its flow frames (``flow_arrays``), which ``plots.py`` draws.

    python density.py RUN_DIR [RUN_DIR ...]   # write density.npz of saved runs from their checkpoints

What ``density.npz`` holds (float32, computed without autocast, on the run's own grid and
solver, like the test NLL):

- ``logp`` [G, G]: the model's log-density at t = 1 on a regular G x G grid over the
  plotting box [-LIMIT, LIMIT]^2 (row y, column x, both ascending): one ``log_prob`` solve;
- ``samples`` [N, 2]: model samples at t = 1: one ``sample`` solve;
- ``limit``, ``iter``: the box and the iteration of the parameters used.

torch loads only when a density is computed, so this module's command line and ``load``
answer at once.
"""
import io
import os
import sys

import numpy as np

import experiment as ex
import toy_data

FILE = "density.npz"
LIMIT = 4.5  # the plotting box of every toy dataset (the flow frames use the same)
GRID = 96  # points per side: 96^2 float32 log-densities are 36 KB
SAMPLES = 2000


def density_arrays(cnf, integ, device, seed, grid=GRID, num_samples=SAMPLES, limit=LIMIT):
    """{logp [grid, grid], samples [num_samples, 2], limit} as float32 numpy arrays.
    The randomness (base samples, Hutchinson noise) comes from ``seed`` alone."""
    import torch

    from metrics import log_prob_batched
    from model import sample

    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 424_242)
        side = torch.linspace(-limit, limit, grid)
        xy = torch.stack(torch.meshgrid(side, side, indexing="xy"), -1).reshape(-1, 2)  # [g*g, 2], x fastest
        dtype = next(cnf.parameters()).dtype
        logp = log_prob_batched(cnf, xy.to(device, dtype), integ, generator=gen).float().reshape(grid, grid)
        x = sample(cnf, num_samples, integ, device, generator=gen)
    return {"logp": logp.cpu().numpy(), "samples": x.cpu().numpy().astype(np.float32),
            "limit": np.float32(limit)}


def flow_arrays(cnf, integ, config, device):
    """(target samples [m, 2], ``model.flow_snapshots``) for a run's flow frames: ``config``
    gives the data, the seed, ``viz_samples`` and ``viz_timesteps``. The randomness comes from
    the seed alone, so a run and its checkpoint give the same frames."""
    import torch

    from model import flow_snapshots

    seed = int(config["seed"])
    gen = torch.Generator().manual_seed(seed + 2)
    snaps = flow_snapshots(cnf, integ, int(config["viz_samples"]), int(config["viz_timesteps"]), device, gen)
    target = toy_data.inf_train_gen(config["data"], int(config["viz_samples"]), np.random.default_rng(seed + 3))
    return target, snaps


def _run_model(folder, device):
    """(model, its Integrator, config, iteration) of a run's ckpt.pth, read safely."""
    import torch

    from metrics import load_run_model, run_integrator

    run = ex.RunDir(folder)
    cnf, c, iteration = load_run_model(run.ckpt, torch.device(device))
    return cnf, run_integrator(c), c, iteration


def flow_arrays_from_checkpoint(folder, device="cpu"):
    """``flow_arrays`` of a saved run, from its checkpoint."""
    import torch

    cnf, integ, c, _ = _run_model(folder, device)
    return flow_arrays(cnf, integ, c, torch.device(device))


def save(run, arrays, iteration):
    """Write ``density.npz`` into the run folder atomically."""
    buf = io.BytesIO()
    np.savez_compressed(buf, iter=np.int64(iteration), **arrays)
    ex.atomic_write(run.file(FILE), buf.getvalue())


def load(folder):
    """The arrays of a run's density.npz; raise ValueError (one line) if absent or unreadable."""
    path = os.path.join(folder, FILE)
    try:
        with np.load(path) as z:
            out = {k: z[k] for k in ("logp", "samples", "limit", "iter")}
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except Exception as e:  # a damaged zip, a missing key: the file is not usable
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:100]})") from None
    if out["logp"].ndim != 2 or out["logp"].shape[0] != out["logp"].shape[1] or out["samples"].ndim != 2:
        raise ValueError(f"{path}: unexpected shapes {out['logp'].shape}, {out['samples'].shape}")
    return out


def from_checkpoint(folder, device="cpu"):
    """Compute and write density.npz of a saved run from its ckpt.pth (read safely).
    Writes only inside that run folder. Returns the path."""
    import torch

    cnf, integ, c, iteration = _run_model(folder, device)
    run = ex.RunDir(folder)
    save(run, density_arrays(cnf, integ, torch.device(device), int(c["seed"])), iteration)
    return run.file(FILE)


def build_parser():
    """density.py's flags (bad ones: one line, exit code 2)."""
    p = ex.OneLineParser(prog="density.py", description="Write density.npz (model density and samples at t = 1) "
                         "of saved runs from their checkpoints.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (each holds ckpt.pth)")
    return p


def main(argv=None):
    """Write density.npz of each run folder. Exit 0; 2 for a folder without a usable checkpoint."""
    p = build_parser()
    a = p.parse_args(argv)
    for folder in a.run_dirs:
        if not os.path.isfile(ex.RunDir(folder).ckpt):
            p.error(f"{folder!r} holds no ckpt.pth (a run folder's checkpoint)")
    for folder in a.run_dirs:
        try:
            print(f"wrote {from_checkpoint(folder)}")
        except ex.CheckpointError as e:
            p.error(str(e))
    return 0


if __name__ == "__main__":
    ex.quiet_exits("density.py")  # Ctrl-C or a full disk: one line and an exit code, never a traceback
    sys.exit(main())
