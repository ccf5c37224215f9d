"""torchmpnode: exact discrete gradients, convergence orders, low precision,
the dynamic scaler, memory, and input checks. CPU only."""
import math

import pytest
import torch
import torchdiffeq
from torch import nn

from torchmpnode import DynamicScaler, odeint


class MLP(nn.Module):
    """A small time-dependent field; works with tensor or (a, b) tuple states."""

    def __init__(self, d=3, hidden=16, dtype=torch.float64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(d + 1, hidden), nn.Tanh(), nn.Linear(hidden, d)).to(dtype)

    def forward(self, t, y):
        if isinstance(y, tuple):
            a, b = y
            full = torch.cat([a, b], 1)
            out = self.net(torch.cat([full, t.expand(full.shape[0], 1).to(full.dtype)], 1))
            return out[:, : a.shape[1]], out[:, a.shape[1] :] * a.sum(1, keepdim=True)
        return self.net(torch.cat([y, t.expand(y.shape[0], 1).to(y.dtype)], 1))


def unrolled(func, y0, t, method):
    """The same scheme written out plainly and differentiated by autograd:
    the discretize-then-optimize reference."""
    tup = isinstance(y0, tuple)
    y = y0 if tup else (y0,)
    f = (lambda s, v: func(s, v)) if tup else (lambda s, v: (func(s, v[0]),))
    out = [y]
    for i in range(len(t) - 1):
        t0, h = t[i], t[i + 1] - t[i]
        if method == "euler":
            inc = tuple(h * k for k in f(t0, y))
        else:
            k1 = f(t0, y)
            k2 = f(t0 + h / 2, tuple(a + h / 2 * b for a, b in zip(y, k1)))
            k3 = f(t0 + h / 2, tuple(a + h / 2 * b for a, b in zip(y, k2)))
            k4 = f(t0 + h, tuple(a + h * b for a, b in zip(y, k3)))
            inc = tuple(h / 6 * (a + 2 * b + 2 * c + d) for a, b, c, d in zip(k1, k2, k3, k4))
        y = tuple(a + b for a, b in zip(y, inc))
        out.append(y)
    sol = tuple(torch.stack(c) for c in zip(*out))
    return sol if tup else sol[0]


def _loss(sol):
    sol = sol if isinstance(sol, tuple) else (sol,)
    w = [torch.linspace(0.5, 1.5, s.shape[0], dtype=s.dtype).reshape(-1, *[1] * (s.dim() - 1)) for s in sol]
    return sum((wi * torch.sin(s)).sum() for wi, s in zip(w, sol))


# --- gradcheck ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_gradcheck_float64(method):
    f = MLP(d=2, hidden=5)
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    params = list(f.parameters())
    assert torch.autograd.gradcheck(lambda y, tt, *p: odeint(f, y, tt, method=method), (y0, t, *params))


def test_gradcheck_tuple_state():
    f = MLP(d=3, hidden=4)
    a = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 1, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(1.0, 0.0, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, tt: odeint(f, (a, b), tt), (a, b, t))


# --- parity with the unrolled scheme ------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("method", ["euler", "rk4"])
@pytest.mark.parametrize("case", ["tensor", "tuple_descending"])
def test_parity_with_unrolled_autograd(dtype, tol, method, case):
    f = MLP(d=3, dtype=dtype)
    if case == "tensor":
        y0 = torch.randn(5, 3, dtype=dtype)
        t = torch.linspace(0.0, 1.0, 9, dtype=dtype)
    else:
        y0 = (torch.randn(5, 2, dtype=dtype), torch.randn(5, 1, dtype=dtype))
        t = torch.linspace(1.0, 0.0, 9, dtype=dtype)
    results = []
    for solve in (odeint, unrolled):
        leaves = tuple(y.clone().requires_grad_() for y in (y0 if isinstance(y0, tuple) else (y0,)))
        tt = t.clone().requires_grad_()
        sol = solve(f, leaves if isinstance(y0, tuple) else leaves[0], tt, method=method) if solve is odeint else \
            solve(f, leaves if isinstance(y0, tuple) else leaves[0], tt, method)
        grads = torch.autograd.grad(_loss(sol), (*leaves, tt, *f.parameters()))
        results.append((sol if isinstance(sol, tuple) else (sol,), grads))
    (s1, g1), (s2, g2) = results
    for a, b in zip(s1 + g1, s2 + g2):
        assert a.dtype == b.dtype
        assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item()), (a - b).abs().max()


def test_matches_torchdiffeq_euler():
    f = MLP(d=3)
    y0 = torch.randn(4, 3, dtype=torch.float64)
    t = torch.linspace(0.0, 2.0, 11, dtype=torch.float64)
    out = []
    for solve in (lambda *a: odeint(*a, method="euler"), lambda *a: torchdiffeq.odeint(*a, method="euler")):
        y = y0.clone().requires_grad_()
        sol = solve(f, y, t)
        out.append((sol, *torch.autograd.grad(_loss(sol), (y, *f.parameters()))))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_rk4_is_classical_not_torchdiffeq_three_eighths():
    """torchdiffeq's fixed-grid rk4 is the 3/8 rule: close to ours, but not equal."""
    f = MLP(d=3)
    y0 = torch.randn(4, 3, dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)
    ours, theirs = odeint(f, y0, t), torchdiffeq.odeint(f, y0, t, method="rk4")
    diff = (ours - theirs).abs().max().item()
    assert 0 < diff < 1e-4
    torch.testing.assert_close(ours, unrolled(f, y0, t, "rk4"), rtol=1e-13, atol=1e-13)


# --- convergence order --------------------------------------------------------------
class Linear(nn.Module):
    def __init__(self, A):
        super().__init__()
        self.A = nn.Parameter(A)

    def forward(self, t, y):
        return y @ self.A.t()


@pytest.mark.parametrize("method,order,grids", [("euler", 1, (256, 512, 1024)), ("rk4", 4, (16, 32, 64))])
def test_convergence_order_on_linear_ode(method, order, grids):
    A = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=torch.float64)
    y0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    exact = y0 @ torch.linalg.matrix_exp(A * 2.0).t()
    errs = []
    for n in grids:
        sol = odeint(Linear(A), y0, torch.linspace(0.0, 2.0, n + 1, dtype=torch.float64), method=method)
        errs.append((sol[-1] - exact).norm().item())
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(o - order) < 0.15 for o in orders), orders


# --- low precision under CPU autocast -------------------------------------------------
def _grads(f, y0, t, dtype=None, **kw):
    y = y0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        sol = odeint(f, y, t, **kw)
    assert sol.dtype == y0.dtype
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(_loss(sol), (y, *f.parameters()))])


# Bounds: ~ 6 eps of the dtype relative to the gradient norm (eps: bf16 7.8e-3, fp16 9.8e-4);
# the reference is the float64 solve of the same scheme.
@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 5e-2), (torch.float16, 6e-3)])
def test_low_precision_gradient_error(dtype, bound):
    f64 = MLP(d=3, hidden=32)
    f32 = MLP(d=3, hidden=32, dtype=torch.float32)
    y0 = torch.randn(64, 3, dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, 17, dtype=torch.float64)
    ref = _grads(f64, y0, t)
    got = _grads(f32, y0.float(), t.float(), dtype).double()
    err = ((got - ref).norm() / ref.norm()).item()
    print(f"{dtype}: relative gradient error {err:.2e} (bound {bound})")
    assert err < bound
    assert err > 1e-6  # it really ran in low precision


class Contracting(nn.Module):
    """f(y) = -k (y - c) as a matmul, so autocast runs it in low precision.
    The state settles at c (O(1), fine in float16) while the adjoint shrinks by
    e^{-k} over the backward sweep: far beyond float16's range for k = 30."""

    def __init__(self, d=4, k=30.0, dtype=torch.float32):
        super().__init__()
        self.lin = nn.Linear(d, d).to(dtype)
        with torch.no_grad():
            self.lin.weight.copy_(-k * torch.eye(d))
            self.lin.bias.copy_(k * torch.linspace(0.5, 1.0, d))

    def forward(self, t, y):
        return self.lin(y)


def adjoint_range_errors():
    """Relative error of dL/dy0 for float16 without scaling, torchdiffeq with
    GradScaler, and torchmpnode with DynamicScaler, against float64."""
    y0 = torch.randn(64, 4, dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, 33, dtype=torch.float64)
    loss = lambda s: 1e-3 * (s[-1] ** 2).sum() / s.shape[1]  # noqa: E731

    def grad_y0(solve, dtype, scale=1.0, fdtype=torch.float32):
        f = Contracting(dtype=fdtype)
        y = y0.to(fdtype).clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16, enabled=dtype is not None):
            sol = solve(f, y, t.to(fdtype))
        (g,) = torch.autograd.grad(loss(sol) * scale, (y,))
        return g.double() / scale

    ref = grad_y0(lambda f, y, tt: odeint(f, y, tt), None, fdtype=torch.float64)
    ref_tdq = grad_y0(lambda f, y, tt: torchdiffeq.odeint(f, y, tt, method="rk4"), None, fdtype=torch.float64)
    err = lambda g, r: ((g - r).norm() / r.norm()).item()  # noqa: E731
    unscaled = grad_y0(lambda f, y, tt: odeint(f, y, tt, loss_scaler=False), torch.float16)
    # GradScaler's whole effect on the backward pass is one constant factor on the loss (2^16 at start)
    gradscaler = grad_y0(lambda f, y, tt: torchdiffeq.odeint(f, y, tt, method="rk4"), torch.float16, scale=2.0**16)
    scaler = DynamicScaler()
    dynamic = grad_y0(lambda f, y, tt: odeint(f, y, tt, loss_scaler=scaler), torch.float16)
    return err(unscaled, ref), err(gradscaler, ref_tdq), err(dynamic, ref), ref.abs().max().item(), scaler


def test_dynamic_scaler_recovers_gradient_over_huge_adjoint_range():
    e_none, e_grad, e_dyn, gmax, scaler = adjoint_range_errors()
    print(f"\nadjoint-range problem (|dL/dy0| ~ {gmax:.1e}): relative error of dL/dy0 vs float64")
    print(f"  float16, no scaling          : {e_none:.3e}")
    print(f"  torchdiffeq + GradScaler 2^16: {e_grad:.3e}")
    print(f"  torchmpnode + DynamicScaler  : {e_dyn:.3e}  (final scale {scaler.scale:.3g})")
    # the gradient is lost: once the scaled VJP underflows, the adjoint stops shrinking
    assert e_none > 0.5 and e_grad > 0.5
    assert e_dyn < 1e-2  # stated bound: ~10 eps of float16


# --- the scaler itself ------------------------------------------------------------------
class Injector(nn.Module):
    """A linear field whose gradient is inf on ``times`` backward-recompute calls,
    starting at call ``first``. With euler each attempt of a step is one call, and
    the sweep visits steps N-1, ..., 0, so call c of a clean sweep is step N-1-c."""

    def __init__(self, scaler, first, times):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.scaler, self.first, self.times = scaler, first, times
        self.scales = []  # the scale in use at each recompute call

    def forward(self, t, y):
        out = self.lin(y)
        if torch.is_grad_enabled():
            self.scales.append(self.scaler.scale)
            if len(self.scales) - 1 >= self.first and self.times > 0:
                self.times -= 1
                out.register_hook(lambda g: g * float("inf"))
        return out


def _injected_run(first, times, max_attempts=40):
    torch.manual_seed(0)
    scaler = DynamicScaler(torch.float16, max_attempts=max_attempts)
    f = Injector(scaler, first, times)
    y = torch.randn(4, 3, requires_grad=True)
    sol = odeint(f, y, torch.linspace(0, 1, 6), method="euler", loss_scaler=scaler)  # 5 steps
    g = torch.autograd.grad(sol[-1].sum(), (y, *f.parameters()))
    return g, f, scaler


def test_injected_inf_halves_scale_and_retries():
    g_clean, _, _ = _injected_run(first=2, times=0)
    g, f, scaler = _injected_run(first=2, times=1)  # step 2's first attempt overflows
    assert scaler.overflow_steps == 1
    assert len(f.scales) == 5 + 1  # five steps, one of them tried twice
    assert f.scales[3] == f.scales[2] / 2  # the retry ran at half the scale
    for a, b in zip(g, g_clean):  # and gives the same gradient (power-of-2 scaling is exact)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_persistent_inf_raises_naming_the_step():
    with pytest.raises(RuntimeError, match=r"step 3 .*5 halvings"):
        _injected_run(first=1, times=10**6, max_attempts=5)


def test_shrinking_adjoint_grows_the_scale():
    scaler = DynamicScaler()
    f = Contracting(k=10.0)
    y = torch.randn(8, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        sol = odeint(f, y, torch.linspace(0.0, 1.0, 17), loss_scaler=scaler)
    g_T = torch.full_like(sol, 0.0)
    g_T[-1] = 1.0
    sol.backward(g_T)
    anchor = 2.0 ** math.floor(math.log2(scaler.target(4) / 1.0))
    # a shrinks by e^-10 ~ 2^-14.4 over the sweep; the scale follows it up
    assert scaler.scale >= anchor * 2**12, (scaler.scale, anchor)
    assert scaler.overflow_steps == 0


def test_scaling_is_exact():
    """Powers of 2 scale exactly: a scaler aiming 10 times lower gives the same float16
    gradient bit for bit, and a loss 2^-60 times smaller gives it 2^-60 times smaller, bit
    for bit, far below float16's range. The scaler adds no rounding of its own."""

    class LowTarget(DynamicScaler):
        def target(self, numel_per_sample):
            return super().target(numel_per_sample) / 10

    f = Contracting(k=30.0)
    y = torch.randn(8, 4, generator=torch.Generator().manual_seed(3), requires_grad=True)
    t = torch.linspace(0.0, 1.0, 33)

    def grad(k, scaler):
        with torch.autocast("cpu", dtype=torch.float16):
            sol = odeint(f, y, t, loss_scaler=scaler)
        return torch.autograd.grad(2.0**-k * 1e-3 * (sol[-1] ** 2).sum(), y)[0]

    base, low, tiny = DynamicScaler(), LowTarget(), DynamicScaler()
    g0 = grad(0, base)
    assert torch.equal(grad(0, low), g0) and low.scale <= base.scale / 8
    assert torch.equal(grad(60, tiny) * 2.0**60, g0) and tiny.scale == base.scale * 2.0**60


def test_auto_scaler_only_for_float16():
    f = Contracting(k=30.0)
    y = torch.randn(8, 4, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 33)

    def grad(dtype, scaler):
        with torch.autocast("cpu", dtype=dtype):
            return torch.autograd.grad(1e-3 * (odeint(f, y, t, loss_scaler=scaler)[-1] ** 2).sum(), y)[0]

    assert torch.equal(grad(torch.float16, None), grad(torch.float16, DynamicScaler()))
    assert not torch.allclose(grad(torch.float16, None), grad(torch.float16, False))
    assert torch.equal(grad(torch.bfloat16, None), grad(torch.bfloat16, False))


def test_scaler_state_dict_round_trip():
    s = DynamicScaler()
    s.scale, s.overflow_steps = 2.0**20, 7
    s2 = DynamicScaler()
    s2.load_state_dict(s.state_dict())
    assert (s2.scale, s2.overflow_steps) == (2.0**20, 7)


# --- memory and side effects ------------------------------------------------------------------
def _saved_bytes(width):
    f = MLP(d=3, hidden=width, dtype=torch.float32)
    y = torch.randn(32, 3, requires_grad=True)
    total = []

    def pack(x):
        total.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        sol = odeint(f, y, torch.linspace(0, 1, 21))
    sol.sum().backward()
    return sum(total), sol


def test_saved_tensors_are_only_the_trajectory():
    narrow, sol = _saved_bytes(4)
    wide, _ = _saved_bytes(1024)
    assert narrow == wide  # independent of the field's width
    traj = sol.numel() * sol.element_size()
    assert traj <= narrow <= traj + 21 * 8  # the states, plus the time grid


def test_parameters_are_not_mutated():
    f = MLP(d=3, dtype=torch.float32)
    before = [p.detach().clone() for p in f.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        odeint(f, torch.randn(4, 3, requires_grad=True), torch.linspace(0, 1, 5)).sum().backward()
    for p, b in zip(f.parameters(), before):
        assert p.dtype == torch.float32 and torch.equal(p.detach(), b)


# --- input checks --------------------------------------------------------------------------
def test_bad_inputs():
    f = MLP(d=3, dtype=torch.float32)
    y = torch.randn(2, 3)
    with pytest.raises(ValueError, match="euler, rk4"):
        odeint(f, y, torch.linspace(0, 1, 3), method="dopri5")
    with pytest.raises(ValueError, match="monotone|increasing"):
        odeint(f, y, torch.tensor([0.0, 0.5, 0.2]))
    assert torch.equal(odeint(f, y, torch.tensor([0.0]))[0], y)  # one point: y0[None], as torchdiffeq
    with pytest.raises(ValueError, match="1-D"):
        odeint(f, y, torch.tensor(0.0))
    with pytest.raises(TypeError, match="floating"):
        odeint(f, torch.ones(2, 3, dtype=torch.long), torch.linspace(0, 1, 3))
    with pytest.raises(ValueError, match="device"):
        odeint(f, y, torch.linspace(0, 1, 3, device="meta"))
    with pytest.warns(UserWarning, match="ignored"):
        odeint(f, y, torch.linspace(0, 1, 3), atol=1e-5, rtol=1e-5)


# --- the grid plan cache ----------------------------------------------------------------------
def test_grid_values_are_read_once_per_grid_tensor_and_changes_are_seen(monkeypatch):
    import torchmpnode._solver as solver

    reads = []
    make = solver._make_plan
    monkeypatch.setattr(solver, "_make_plan", lambda t, tab: reads.append(1) or make(t, tab))
    f = MLP(d=3, dtype=torch.float64)
    y = torch.randn(4, 3, dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, 6, dtype=torch.float64)
    first = odeint(f, y, t)
    assert torch.equal(odeint(f, y, t), first) and len(reads) == 1  # the same grid tensor: read once
    odeint(f, y, t, method="euler")
    assert len(reads) == 2  # another method: its own plan
    with torch.no_grad():
        t.mul_(0.5)  # in place: a new version, so a new plan, and the solve follows the new grid
    moved = odeint(f, y, t)
    assert len(reads) == 3
    assert torch.allclose(moved, odeint(f, y, torch.linspace(0.0, 0.5, 6, dtype=torch.float64)), atol=1e-12)
    assert not torch.allclose(moved[-1], first[-1])
    tg = torch.linspace(0.0, 1.0, 6, dtype=torch.float64, requires_grad=True)
    odeint(f, y, tg)
    odeint(f, y, tg)
    assert len(reads) == 6  # (4 after the fresh grid above) grids that require grad are read every time (gradcheck perturbs .data)
    with torch.no_grad():
        t.copy_(torch.tensor([0.0, 0.2, 0.1, 0.3, 0.4, 0.5]))
    with pytest.raises(ValueError, match="increasing"):
        odeint(f, y, t)  # a cached grid made non-monotonic in place is refused
