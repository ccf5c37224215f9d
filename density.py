"""The learned density of a completed run, saved small enough to keep with every run
(``density.npz``, about 50 KB) so that overview figures never retrain or reload models.

    python density.py RUN_DIR [RUN_DIR ...]   # write density.npz of saved runs from their checkpoints

What is saved (float32, computed without autocast, on the run's own grid and solver,
like the test NLL):

- ``logp`` [G, G]: the model's log-density at t = 1 on a regular G x G grid over the
  plotting box [-LIMIT, LIMIT]^2 (row y, column x, both ascending): one ``log_prob`` solve;
- ``samples`` [N, 2]: model samples at t = 1: one ``sample`` solve;
- ``limit``, ``iter``: the box and the iteration of the parameters used.
"""
import io
import os
import sys

import numpy as np
import torch

import experiment as ex
from metrics import load_run_model, log_prob_batched
from model import Integrator, sample

FILE = "density.npz"
LIMIT = 4.5  # the plotting box of every toy dataset (the flow frames use the same)
GRID = 96  # points per side: 96^2 float32 log-densities are 36 KB
SAMPLES = 2000


@torch.no_grad()
def density_arrays(cnf, integ, device, seed, grid=GRID, num_samples=SAMPLES, limit=LIMIT):
    """{logp [grid, grid], samples [num_samples, 2], limit} as float32 numpy arrays.
    The randomness (base samples, Hutchinson noise) comes from ``seed`` alone."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 424_242)
    side = torch.linspace(-limit, limit, grid)
    xy = torch.stack(torch.meshgrid(side, side, indexing="xy"), -1).reshape(-1, 2)  # [g*g, 2], x fastest
    dtype = next(cnf.parameters()).dtype
    logp = log_prob_batched(cnf, xy.to(device, dtype), integ, generator=gen).float().reshape(grid, grid)
    x = sample(cnf, num_samples, integ, device, generator=gen)
    return {"logp": logp.cpu().numpy(), "samples": x.cpu().numpy().astype(np.float32),
            "limit": np.float32(limit)}


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
    run = ex.RunDir(folder)
    cnf, c, iteration = load_run_model(run.ckpt, device)
    integ = Integrator(c["odeint"], c["method"], c["num_timesteps"], loss_scaler=False)
    save(run, density_arrays(cnf, integ, torch.device(device), int(c["seed"])), iteration)
    return run.file(FILE)


def main(argv=None):
    p = ex.OneLineParser(prog="density.py", description="Write density.npz (model density and samples at t = 1) "
                         "of saved runs from their checkpoints.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (each holds ckpt.pth)")
    a = p.parse_args(argv)
    for folder in a.run_dirs:
        try:
            print(f"wrote {from_checkpoint(folder)}")
        except ex.CheckpointError as e:
            p.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
