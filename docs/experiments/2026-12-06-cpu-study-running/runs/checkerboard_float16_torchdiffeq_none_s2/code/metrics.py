"""Validation and end-of-run metrics: NLL (with its standard error) in float32 and
in the training precision, MMD, the test NLL, and the exact likelihood (docs/metrics.md).

    python metrics.py RUN_DIR [RUN_DIR ...]   # val_loss_exact and disc_gap of saved runs
"""
import math
import os
import re
import sys
import time

import experiment as ex


def build_parser():
    """metrics.py's flags (bad ones: one line, exit code 2)."""
    p = ex.OneLineParser(prog="metrics.py", description="Exact likelihood (val_loss_exact, disc_gap) "
                                "of saved runs, from their checkpoints.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (each holds ckpt.pth)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    return p


def parse(argv=None):
    """The flags, checked without torch: a bad one is one line and exit code 2."""
    p = build_parser()
    a = p.parse_args(argv)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", a.device):
        p.error(f"--device {a.device!r} is not a device (cpu, cuda or cuda:N)")
    for folder in a.run_dirs:
        if not os.path.isfile(ex.RunDir(folder).ckpt):
            p.error(f"{folder!r} holds no ckpt.pth (a run folder's checkpoint)")
    return a


if __name__ == "__main__":
    ex.quiet_exits("metrics.py")  # Ctrl-C or a full disk: one line and an exit code, never a traceback
    parse()  # a bad flag or --help is answered now, before torch loads; main() parses again

import torch  # noqa: E402  (after the flags are checked)
import toy_data
from model import CNF, Integrator, log_prob, sample

# Gaussian-kernel bandwidths for MMD: the toy data spans about [-4, 4]^2, and a
# sum over scales from fine structure to the whole support avoids tuning one.
MMD_BANDWIDTHS = (0.1, 0.2, 0.5, 1.0, 2.0)
# Points per solve in the end-of-run evaluations, so memory stays bounded at any test-set size.
EVAL_BATCH = 4096
# The test MMD compares as many model samples as test points, in this many disjoint blocks
# (2000 points each at the default 20 000), so it comes with a standard error over blocks.
MMD_BLOCKS = 10
# The reference solve for the exact likelihood: adaptive, float64, tight tolerances
# (rtol = atol), so its own error is far below any fixed grid's.
EXACT_METHOD, EXACT_TOL = "dopri5", 1e-8


def mmd2(x, y, bandwidths=MMD_BANDWIDTHS):
    """Unbiased MMD^2 between samples x [m,d] and y [n,d] with the kernel
    k(a,b) = sum_s exp(-|a-b|^2 / (2 s^2)). Computed in float32; returns a float."""
    x, y = x.float(), y.float()
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError("mmd2 needs at least 2 samples on each side")

    def k(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * s * s)) for s in bandwidths)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    nk = len(bandwidths)  # each diagonal entry is nk
    return float((kxx.sum() - nk * m) / (m * (m - 1)) + (kyy.sum() - nk * n) / (n * (n - 1)) - 2 * kxy.mean())


def nll_and_se(logp):
    """(mean NLL, its standard error sd/sqrt(n)) of per-point log-densities [n], as floats.
    Accumulated in float32, or float64 for float64 input."""
    nll = -logp.detach().to(torch.promote_types(logp.dtype, torch.float32))
    return float(nll.mean()), float(nll.std() / math.sqrt(nll.numel()))


# The grid watch solves on a grid with this many times the steps: same method, same points.
FINE_FACTOR = 4


def fine_integrator(integ):
    """The trained grid's solver with FINE_FACTOR times the steps (each step split in
    FINE_FACTOR, so the trained grid's times are among the fine grid's), for forward solves."""
    return Integrator(integ.odeint, integ.method, FINE_FACTOR * (integ.num_timesteps - 1) + 1, loss_scaler=False,
                      tol=integ.tol)


@torch.no_grad()
def evaluate(cnf, integ, x_val, data, precision, generator, fine_integ=None):
    """Metrics on the fixed validation set ``x_val``.

    val_loss: NLL (nats) in float32 with no autocast, on the trained grid;
    val_loss_se: its standard error over the validation points.
    val_loss_lowp: the same NLL under the training precision's autocast.
    val_mmd: MMD^2 between model samples and fresh data.
    train_mmd: MMD^2 between the pulled-back validation points z(0) and N(0, I).
    With ``fine_integ`` (see ``fine_integrator``) also
    val_loss_fine: the same NLL on the finer grid (the same Hutchinson noise, if any), and
    grid_gap = val_loss - val_loss_fine: how much of the NLL the trained grid's
    discretization error makes; a model that games its grid drives it below zero.
    ``generator`` (a CPU torch.Generator) drives all randomness here.
    """
    device = x_val.device
    noise_state = generator.get_state()  # the fine solve sees the noise the trained grid's saw
    logp, z0 = log_prob(cnf, x_val, integ, generator=generator, return_z=True)
    with precision.autocast():
        logp_low = log_prob(cnf, x_val, integ, generator=generator)
    n = x_val.shape[0]
    fresh = torch.from_numpy(toy_data.inf_train_gen(data, n, int(torch.randint(2**31, (1,), generator=generator))))
    model_x = sample(cnf, n, integ, device, generator=generator)
    base = torch.randn(n, x_val.shape[1], generator=generator).to(device)
    val_loss, val_loss_se = nll_and_se(logp)
    fine = {}
    if fine_integ is not None:
        fine_gen = torch.Generator().set_state(noise_state)
        val_loss_fine = nll_and_se(log_prob(cnf, x_val, fine_integ, generator=fine_gen))[0]
        fine = dict(val_loss_fine=val_loss_fine, grid_gap=val_loss - val_loss_fine)
    return dict(
        val_loss=val_loss,
        val_loss_se=val_loss_se,
        val_loss_lowp=-float(logp_low.float().mean()),
        nll_gap=val_loss - toy_data.ENTROPY[data],
        val_mmd=mmd2(model_x, fresh.to(device)),
        train_mmd=mmd2(z0, base),
        **fine,
    )


def grid_exploit_reason(row, entropy, gap_max):
    """Why a validation row shows a model gaming its time grid, or None.

    No density has an expected NLL below the data's entropy, so a validation NLL
    more than 3 standard errors below it can only be discretization error; and a
    |grid_gap| above ``gap_max`` says the trained grid's NLL is off by that much
    from the same model's on a finer grid.
    """
    why = []
    below = entropy - row["val_loss"]
    if below > 3 * row["val_loss_se"]:
        why.append(f"val NLL {row['val_loss']:.4f} is {below:.4f} below the entropy {entropy:.4f} "
                   f"(> 3 SE = {3 * row['val_loss_se']:.4f})")
    gap = row.get("grid_gap")
    if gap is not None and not abs(gap) <= gap_max:  # NaN raises it too
        why.append(f"grid_gap {gap:+.4f} (val NLL {row['val_loss']:.4f} on the trained grid, "
                   f"{row['val_loss_fine']:.4f} on {FINE_FACTOR}x the steps) is beyond +-{gap_max:g}")
    return "; ".join(why) or None


@torch.no_grad()
def log_prob_batched(cnf, x, integ, generator=None, batch=EVAL_BATCH):
    """log p(x) [n] like ``model.log_prob``, solved ``batch`` points at a time."""
    return torch.cat([log_prob(cnf, xb, integ, generator=generator) for xb in x.split(batch)])


@torch.no_grad()
def sample_batched(cnf, n, integ, device, generator=None, batch=EVAL_BATCH):
    """n model samples [n, 2] float32, like ``model.sample``, solved ``batch`` at a time."""
    sizes = [min(batch, n - i) for i in range(0, n, batch)]
    return torch.cat([sample(cnf, m, integ, device, generator=generator) for m in sizes])


def block_mmd(x, y, blocks=MMD_BLOCKS):
    """(mean, standard error) of the unbiased MMD^2 over disjoint blocks of x [n,d] and
    y [n,d], the i-th block of one against the i-th of the other; fewer blocks when
    n < 2 * blocks (each needs two points a side). The SE is nan for a single block."""
    k = max(1, min(blocks, x.shape[0] // 2, y.shape[0] // 2))
    vals = torch.tensor([mmd2(a, b) for a, b in zip(x.tensor_split(k), y.tensor_split(k))], dtype=torch.float64)
    se = float(vals.std() / math.sqrt(k)) if k > 1 else math.nan
    return float(vals.mean()), se


@torch.no_grad()
def test_metrics(cnf, integ, x_test, data, generator=None):
    """The test metrics of the trained model (float32, no autocast, on the trained grid).

    Returns ({test_loss, test_loss_se, test_gap, test_mmd, test_mmd_se}, per-point
    log-densities [n] float32 on the CPU). test_gap = test_loss - ENTROPY[data] is
    the final gap to quote. test_mmd: unbiased MMD^2 between n model samples and the
    n test points, the mean over MMD_BLOCKS disjoint blocks, with its standard error.
    """
    logp = log_prob_batched(cnf, x_test, integ, generator=generator).float()
    test_loss, test_loss_se = nll_and_se(logp)
    model_x = sample_batched(cnf, x_test.shape[0], integ, x_test.device, generator)
    test_mmd, test_mmd_se = block_mmd(model_x, x_test)
    return dict(test_loss=test_loss, test_loss_se=test_loss_se, test_gap=test_loss - toy_data.ENTROPY[data],
                test_mmd=test_mmd, test_mmd_se=test_mmd_se), logp.cpu()


def exact_field(cnf):
    """A float64 copy of ``cnf`` with the exact (closed-form) trace, whatever trace it trained with."""
    hyper = cnf.hyper_net
    field = CNF(hyper.dim, hyper.net[0].out_features, cnf.width, "exact")
    field.load_state_dict(cnf.state_dict())
    return field.to(device=next(cnf.parameters()).device, dtype=torch.float64)


@torch.no_grad()
def exact_log_prob(field, x, tol=EXACT_TOL):
    """log p(x) [n] float64 under ``field`` (any func(t, (z, logp)) in float64),
    solved by torchdiffeq's adaptive dopri5 with rtol = atol = ``tol``."""
    integ = Integrator("torchdiffeq", EXACT_METHOD, num_timesteps=2, tol=tol)
    return log_prob_batched(field, x.to(torch.float64), integ)


def exact_metrics(cnf, x_val, val_loss):
    """{val_loss_exact, disc_gap}: the validation NLL of the trained field without
    discretization error, and how far the trained grid's ``val_loss`` is from it."""
    exact, _ = nll_and_se(exact_log_prob(exact_field(cnf), x_val))
    return dict(val_loss_exact=exact, disc_gap=val_loss - exact)


# --- saved runs: the model of a checkpoint and its grid (python metrics.py, density.py, flow.py) ---
# What every use of a saved model needs from its run's config besides the model's size: its grid, data and seed.
RUN_KEYS = ("data", "seed", "odeint", "method", "num_timesteps", "precision")


def load_run_model(ckpt, device, backend="torch"):
    """(model, config, iteration) of a checkpoint file, on ``device``: the one loader of a
    saved model. A file that is not a checkpoint of this kit, or one whose model does not
    fit its config, raises ``ex.CheckpointError`` with one line."""
    state = ex.load_checkpoint(ckpt)
    c = state["config"]
    missing = [k for k in ("hidden_dim", "width", "trace", *RUN_KEYS) if k not in c] if isinstance(c, dict) else []
    if missing or not isinstance(c, dict):
        raise ex.CheckpointError(f"{ckpt} has this kit's checkpoint format, but its config lacks "
                                 f"{', '.join(missing) or 'everything'}, so it cannot be loaded.")
    try:
        cnf = CNF(2, c["hidden_dim"], c["width"], c["trace"], backend if c["trace"] == "exact" else "torch")
        cnf.load_state_dict(state["model"])
        it = int(state["iter"])
    except (KeyError, TypeError, ValueError, RuntimeError):  # the weights, their shapes or the iteration
        raise ex.CheckpointError(f"{ckpt} has this kit's checkpoint format, but its weights do not fit its "
                                 f"config (hidden_dim, width, trace), so it cannot be loaded.") from None
    return cnf.to(device), c, it


def final_noise(seed):
    """The generator of the Hutchinson noise of a run's end-of-run test metrics (and of
    ``checkpoint_metrics``): a fresh one, so the same points get the same noise."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 999_983)


def run_integrator(c):
    """The Integrator of a run's config ``c``: its solver, method and grid, unscaled (evaluation only)."""
    return Integrator(c["odeint"], c["method"], c["num_timesteps"], loss_scaler=False)


def _val_set(c, device):
    x = toy_data.inf_train_gen(c["data"], c["num_samples_val"], toy_data.seed_streams(c["seed"])["val"])
    return torch.from_numpy(x).to(device)


def run_exact(folder, device="cpu", ckpt=None):
    """(val_loss on the run's grid, exact metrics, seconds) for a run folder, from its
    checkpoint (``ckpt``, default the folder's ckpt.pth)."""
    cnf, c, _ = load_run_model(ckpt or ex.RunDir(folder).ckpt, device)
    x_val = _val_set(c, device)
    integ = run_integrator(c)
    gen = torch.Generator().manual_seed(c["seed"])  # Hutchinson noise, if the run used it
    val_loss, _ = nll_and_se(log_prob_batched(cnf, x_val, integ, generator=gen))
    t0 = time.perf_counter()
    m = exact_metrics(cnf, x_val, val_loss)
    return val_loss, m, time.perf_counter() - t0


def checkpoint_metrics(ckpt, device, backend="torch"):
    """The end-of-run metrics of the model in checkpoint file ``ckpt`` (a run's ckpt_valid.pth):
    {iter, val_loss, test_loss, test_loss_se, test_gap, test_mmd, test_mmd_se, val_loss_exact, disc_gap}, on the
    run's own validation and test sets and trained grid, as a completed run reports them."""
    cnf, c, it = load_run_model(ckpt, device, backend)
    x_val = _val_set(c, device)
    x_test = toy_data.inf_train_gen(c["data"], c["num_samples_test"], toy_data.seed_streams(c["seed"])["test"])
    integ = run_integrator(c)
    gen = final_noise(c["seed"])  # Hutchinson noise only
    val_loss, _ = nll_and_se(log_prob_batched(cnf, x_val, integ, generator=gen))
    test, _ = test_metrics(cnf, integ, torch.from_numpy(x_test).to(device), c["data"], gen)
    return {"iter": it, "val_loss": val_loss, **test, **exact_metrics(cnf, x_val, val_loss)}


def main(argv=None):
    """Print each run's val_loss, val_loss_exact and disc_gap (it only reads the folder)."""
    a = parse(argv)
    p = build_parser()
    if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device} requested but CUDA is not available")
    for folder in a.run_dirs:
        try:
            val_loss, m, secs = run_exact(folder, a.device)
        except ex.CheckpointError as e:
            p.error(str(e))
        print(f"{folder}: val_loss {val_loss:.6f} val_loss_exact {m['val_loss_exact']:.6f} "
              f"disc_gap {m['disc_gap']:+.2e} ({EXACT_METHOD} float64, tol {EXACT_TOL:g}, {secs:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
