"""The CNF model: the fast grid path equals the straightforward path, traces agree,
log_prob and sample are consistent."""
import math

import pytest
import torch
from torch import nn

from model import CNF, Integrator, flow_from_base, flow_snapshots, flow_to_base, log_prob, sample


class Plain(nn.Module):
    """Hides the grid protocol: the solver then calls func(t, y) every stage and
    differentiates it by autograd (the straightforward path)."""

    def __init__(self, cnf):
        super().__init__()
        self.cnf = cnf

    def forward(self, t, y):
        return self.cnf(t, y)


def _lp_and_grads(func, cnf, x, integ):
    logp0 = torch.zeros(x.shape[0], 1, dtype=x.dtype)
    xl = x.clone().requires_grad_()
    z, dl = integ.solve(func, (xl, logp0), integ.grid("cpu", reverse=True))
    lp = -0.5 * (2 * math.log(2 * math.pi) + (z[-1] ** 2).sum(1)) - dl[-1, :, 0]
    weights = torch.linspace(0.5, 1.5, x.shape[0], dtype=x.dtype)
    return lp, torch.autograd.grad((lp * weights).sum(), (xl, *cnf.parameters()))


@pytest.mark.parametrize("method", ["rk4", "euler"])
def test_fast_grid_path_equals_straightforward_path_float64(method):
    torch.manual_seed(0)
    cnf = CNF(2, 16, 24).double()
    x = torch.randn(40, 2, dtype=torch.float64) * 2
    integ = Integrator("torchmpnode", method, 9)
    assert cnf.grid_enabled
    lp_fast, g_fast = _lp_and_grads(cnf, cnf, x, integ)
    lp_slow, g_slow = _lp_and_grads(Plain(cnf), cnf, x, integ)
    torch.testing.assert_close(lp_fast, lp_slow, rtol=1e-6, atol=1e-10)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)


def test_gradcheck_of_log_prob_fast_path():
    torch.manual_seed(1)
    cnf = CNF(2, 4, 3).double()
    integ = Integrator("torchmpnode", "rk4", 4)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    params = list(cnf.parameters())

    def f(x, *p):
        return log_prob(cnf, x, integ)

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("odeint", ["torchmpnode", "torchdiffeq"])
def test_traces_agree(odeint):
    torch.manual_seed(0)
    exact = CNF(2, 8, 16).double()
    auto = CNF(2, 8, 16, trace="autograd").double()
    auto.load_state_dict(exact.state_dict())
    x = torch.randn(16, 2, dtype=torch.float64)
    integ = Integrator(odeint, "rk4", 6)
    torch.testing.assert_close(log_prob(exact, x, integ), log_prob(auto, x, integ), rtol=1e-10, atol=1e-10)
    hut = CNF(2, 8, 16, trace="hutchinson").double()
    hut.load_state_dict(exact.state_dict())
    xs = x.repeat(400, 1)
    est = log_prob(hut, xs, integ, generator=torch.Generator().manual_seed(0)).reshape(400, 16)
    se = est.std(0) / 20
    assert ((est.mean(0) - log_prob(exact, x, integ)).abs() <= 4 * se + 1e-9).all()


def test_sample_inverts_log_prob_and_density_is_normalised():
    torch.manual_seed(0)
    cnf = CNF(2, 8, 16).double()
    integ = Integrator("torchmpnode", "rk4", 64)
    z = torch.randn(50, 2, dtype=torch.float64)
    x = flow_from_base(cnf, z, integ)[0][-1]
    z_back = flow_to_base(cnf, x, integ)[0][-1]
    torch.testing.assert_close(z_back, z, rtol=0, atol=1e-6)
    # the model density integrates to ~1 over a box that holds its mass
    side = torch.linspace(-6, 6, 121, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(side, side, indexing="xy"), -1).reshape(-1, 2)
    mass = log_prob(cnf, grid, integ).exp().sum() * (side[1] - side[0]) ** 2
    assert abs(mass.item() - 1) < 0.02
    s = sample(cnf, 10, integ, "cpu", generator=torch.Generator().manual_seed(0))
    assert s.shape == (10, 2) and s.dtype == torch.float32
    # the samples are the generator's noise pushed to t=1: pulled back, they give that noise
    noise = torch.randn(10, 2, generator=torch.Generator().manual_seed(0)).double()
    assert (s.double() - noise).abs().max() > 0.01  # the flow moves them 1000 tolerances (else this checks nothing)
    torch.testing.assert_close(flow_to_base(cnf, s.double(), integ)[0][-1], noise, rtol=0, atol=1e-5)


def test_flow_frames_hold_the_model_density_at_both_ends():
    """flow_snapshots: frame 0 is the base density at the pulled-back grid and its samples
    the generator's noise; the last frame is log_prob on the grid itself."""
    torch.manual_seed(0)
    cnf = CNF(2, 8, 16).double()
    integ = Integrator("torchmpnode", "rk4", 16)
    snap = flow_snapshots(cnf, integ, 20, 5, "cpu", torch.Generator().manual_seed(1), grid_size=12, limit=3.0)
    assert snap["samples"].shape == (5, 20, 2) and snap["density_logp"].shape == (5, 144)
    assert (snap["samples"][0] == torch.randn(20, 2, generator=torch.Generator().manual_seed(1)).numpy()).all()
    grid = torch.from_numpy(snap["density_xy"][-1]).double()
    side = torch.linspace(-3.0, 3.0, 12, dtype=torch.float64)
    torch.testing.assert_close(grid, torch.stack(torch.meshgrid(side, side, indexing="xy"), -1).reshape(-1, 2),
                               rtol=0, atol=1e-6)
    want = log_prob(cnf, grid, Integrator("torchmpnode", "rk4", 5)).detach().numpy()  # the frames' own grid of times
    assert abs(snap["density_logp"][-1] - want).max() < 1e-5
    z0 = torch.from_numpy(snap["density_xy"][0]).double()
    base = -0.5 * (2 * math.log(2 * math.pi) + (z0**2).sum(1))
    assert abs(snap["density_logp"][0] - base.numpy()).max() < 1e-5
    # the flow changes the density by ~0.01 here: a sign error in between moves it 2000 tolerances
    assert abs(snap["density_logp"][-1] - snap["density_logp"][0]).max() > 0.005


def test_log_prob_is_float32_under_autocast():
    cnf = CNF(2, 8, 16)
    integ = Integrator("torchmpnode", "rk4", 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = log_prob(cnf, torch.randn(8, 2), integ)
    assert lp.dtype == torch.float32


def test_bad_choices():
    with pytest.raises(ValueError, match="exact, autograd, hutchinson"):
        CNF(trace="nope")
    with pytest.raises(ValueError, match="adjoint"):
        Integrator("torchmpnode", adjoint=True)
