"""Validation metrics: NLL in float32 and in the training precision, and MMD."""
import torch

import toy_data
from model import log_prob, sample

# Gaussian-kernel bandwidths for MMD: the toy data spans about [-4, 4]^2, and a
# sum over scales from fine structure to the whole support avoids tuning one.
MMD_BANDWIDTHS = (0.1, 0.2, 0.5, 1.0, 2.0)


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


@torch.no_grad()
def evaluate(cnf, integ, x_val, data, precision, generator):
    """Metrics on the fixed validation set ``x_val``.

    val_loss: NLL (nats) in float32 with no autocast, on the trained grid.
    val_loss_lowp: the same NLL under the training precision's autocast.
    val_mmd: MMD^2 between model samples and fresh data.
    train_mmd: MMD^2 between the pulled-back validation points z(0) and N(0, I).
    ``generator`` (a CPU torch.Generator) drives all randomness here.
    """
    device = x_val.device
    logp, z0 = log_prob(cnf, x_val, integ, generator=generator, return_z=True)
    with precision.autocast():
        logp_low = log_prob(cnf, x_val, integ, generator=generator)
    n = x_val.shape[0]
    fresh = torch.from_numpy(toy_data.inf_train_gen(data, n, int(torch.randint(2**31, (1,), generator=generator))))
    model_x = sample(cnf, n, integ, device, generator=generator)
    base = torch.randn(n, x_val.shape[1], generator=generator).to(device)
    val_loss = -float(logp.float().mean())
    return dict(
        val_loss=val_loss,
        val_loss_lowp=-float(logp_low.float().mean()),
        nll_gap=val_loss - toy_data.ENTROPY[data],
        val_mmd=mmd2(model_x, fresh.to(device)),
        train_mmd=mmd2(z0, base),
    )
