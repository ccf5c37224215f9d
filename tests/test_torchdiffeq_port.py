"""torchdiffeq's call patterns in torchmpnode.odeint: the schemes that match torchdiffeq's
fixed-grid ones, options step_size / grid_constructor, adjoint_params and odeint_adjoint,
the refusals, t's dtype and a one-point t. CPU, float64, tiny sizes."""
import warnings

import pytest
import torch
import torchdiffeq
from torch import nn

import torchmpnode
from torchmpnode import odeint

F64 = torch.float64
GRIDS = {
    "uniform": [0.0, 0.25, 0.5, 0.75, 1.0],
    "non-uniform": [0.0, 0.1, 0.35, 0.4, 1.0, 1.7],
    "decreasing": [1.0, 0.6, 0.1, -0.5],
}


def make(seed=0, d=3, n=4):
    g = torch.Generator().manual_seed(seed)
    w = (0.5 * torch.randn(d, d, generator=g, dtype=F64)).requires_grad_()
    y0 = torch.randn(n, d, generator=g, dtype=F64).requires_grad_()
    return w, y0


def field(w):
    """A small nonlinear, time-dependent field closing over w (not an nn.Module)."""
    return lambda t, y: torch.tanh(y @ w) * torch.cos(3 * t) + 0.5 * y.sin()


def loss(out):
    return (out ** 2).sum() + out[1].sum()  # reads an interior output time too


def grads(out, *inputs):
    return torch.autograd.grad(loss(out), inputs)


# --- the schemes ------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ours, theirs", [("rk4_38", "rk4"), ("midpoint", "midpoint"), ("euler", "euler")])
def test_schemes_equal_torchdiffeqs(grid, ours, theirs):
    w, y0 = make()
    t = torch.tensor(GRIDS[grid], dtype=F64)
    a = odeint(field(w), y0, t, method=ours, adjoint_params=(w,))
    b = torchdiffeq.odeint(field(w), y0, t, method=theirs)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for ga, gb in zip(grads(a, y0, w), grads(b, y0, w)):  # backprop through torchdiffeq: the discrete gradient
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-12)


def test_torchdiffeqs_rk4_is_not_classical_rk4():
    """The names differ on purpose: classical 'rk4' is a different scheme from torchdiffeq's."""
    w, y0 = make()
    t = torch.tensor(GRIDS["non-uniform"], dtype=F64)
    b = torchdiffeq.odeint(field(w), y0, t, method="rk4")
    assert (odeint(field(w), y0, t, method="rk4", adjoint_params=(w,)) - b).abs().max() > 1e-6
    assert (odeint(field(w), y0, t, method="midpoint", adjoint_params=(w,)) - b).abs().max() > 1e-4


# --- options: step_size and grid_constructor --------------------------------------------------
@pytest.mark.parametrize("times, h", [
    ([0.0, 0.5, 1.0], 0.25),  # h divides every interval
    ([0.0, 0.6, 1.0], 0.3),  # a shorter last step
    ([0.0, 1.1], 0.1),  # 11 * 0.1 rounds past 1.1: torchdiffeq's grid overshoots by an ulp
    ([1.0, 0.5, -0.2], 0.1),  # decreasing
])
def test_step_size_matches_torchdiffeqs_grid(times, h):
    w, y0 = make()
    t = torch.tensor(times, dtype=F64)
    a = odeint(field(w), y0, t, method="rk4_38", options=dict(step_size=h), adjoint_params=(w,))
    b = torchdiffeq.odeint(field(w), y0, t, method="rk4", options=dict(step_size=h))
    assert a.shape == (len(times), *y0.shape)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for ga, gb in zip(grads(a, y0, w), grads(b, y0, w)):
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-11)


def test_step_size_is_the_solve_on_the_explicit_fine_grid():
    w, y0 = make()
    t = torch.tensor([0.0, 0.5, 1.5], dtype=F64)
    fine = torch.arange(7, dtype=F64) * 0.25  # 0, 0.25, ..., 1.5
    a = odeint(field(w), y0, t, options=dict(step_size=0.25), adjoint_params=(w,))
    b = odeint(field(w), y0, fine, adjoint_params=(w,))[[0, 2, 6]]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    for ga, gb in zip(grads(a, y0, w), grads(b, y0, w)):
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-14)
    # the same through grid_constructor, called as torchdiffeq calls it
    seen = []
    ctor = lambda f, y, tt: seen.append((y is y0, tt is t)) or fine  # noqa: E731
    c = odeint(field(w), y0, t, options=dict(grid_constructor=ctor), adjoint_params=(w,))
    assert seen == [(True, True)]
    torch.testing.assert_close(c, b, rtol=0, atol=1e-15)
    # and the fine grid really is finer: the plain solve on t differs
    assert (odeint(field(w), y0, t, adjoint_params=(w,)) - b).abs().max() > 1e-6


def test_a_point_of_t_off_the_fine_grid_is_refused_in_one_line():
    w, y0 = make()
    t = torch.tensor([0.0, 0.55, 1.0], dtype=F64)
    with pytest.raises(ValueError, match=r"t\[1\] = 0.55 is not on the grid of options step_size=0.25") as e:
        odeint(field(w), y0, t, options=dict(step_size=0.25), adjoint_params=(w,))
    assert "\n" not in str(e.value) and "divides" in str(e.value)
    off = lambda f, y, tt: torch.tensor([0.0, 0.5, 1.0], dtype=F64)  # noqa: E731
    with pytest.raises(ValueError, match=r"t\[1\] = 0.55 is not on options grid_constructor's grid"):
        odeint(field(w), y0, t, options=dict(grid_constructor=off), adjoint_params=(w,))
    beyond = lambda f, y, tt: torch.tensor([0.0, 0.55, 1.0, 1.2], dtype=F64)  # noqa: E731
    with pytest.raises(ValueError, match="end at t"):
        odeint(field(w), y0, t, options=dict(grid_constructor=beyond), adjoint_params=(w,))


@pytest.mark.parametrize("options, match", [
    (dict(first_step=0.1), r"options\['first_step'\] is not supported"),
    (dict(max_num_steps=10), r"options\['max_num_steps'\] is not supported"),
    (dict(step_size=0.25, grid_constructor=lambda f, y, t: t), "mutually exclusive"),
    (dict(step_size=-0.25), "must be a finite number > 0"),
    (dict(perturb=True), "perturb"),
    (dict(interp="quadratic"), "interp"),
])
def test_options_the_fixed_grid_cannot_honour_are_refused(options, match):
    w, y0 = make()
    with pytest.raises(ValueError, match=match):
        odeint(field(w), y0, torch.tensor([0.0, 0.5, 1.0], dtype=F64), options=options, adjoint_params=(w,))


def test_options_that_change_nothing_are_accepted():
    w, y0 = make()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    ref = odeint(field(w), y0, t, options=dict(step_size=0.25), adjoint_params=(w,))
    for extra in (dict(interp="cubic"), dict(interp="linear", perturb=False)):
        out = odeint(field(w), y0, t, options=dict(step_size=0.25, **extra), adjoint_params=(w,))
        assert torch.equal(out, ref)
    with pytest.warns(UserWarning, match=r"options\['norm'\] is ignored"):
        odeint(field(w), y0, t, options=dict(norm=lambda x: x.abs().max()), adjoint_params=(w,))


# --- refusals ---------------------------------------------------------------------------------
def test_events_and_callbacks_are_refused_in_one_line():
    w, y0 = make()
    t = torch.tensor([0.0, 1.0], dtype=F64)
    f = field(w)
    with pytest.raises(ValueError, match="event_fn is not supported") as e:
        odeint(f, y0, t, event_fn=lambda s, y: y.sum(), adjoint_params=(w,))
    assert "\n" not in str(e.value)
    for name in ("callback_step", "callback_accept_step", "callback_reject_step"):
        with pytest.raises(ValueError, match=f"{name} .*not supported"):
            odeint(f, y0, t, adjoint_params=(w,), **{name: lambda *a: None})

    class WithCallback(nn.Module):
        def forward(self, s, y):
            return -y

        def callback_step(self, t0, y0, dt):
            pass

    with pytest.raises(ValueError, match="callback_step attribute"):
        odeint(WithCallback(), y0, t)
    with pytest.raises(TypeError, match="unexpected keyword argument 'rtoll'"):
        odeint(f, y0, t, rtoll=1e-3)


# --- gradients --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["midpoint", "rk4_38"])
def test_gradcheck_of_the_new_methods(method):
    w, y0 = make(n=2, d=2)
    t = torch.tensor([0.0, 0.3, 0.45, 1.0], dtype=F64)
    fn = lambda y, w: odeint(field(w), y, t, method=method, adjoint_params=(w,))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (y0, w))


def test_gradcheck_of_the_step_size_path():
    w, y0 = make(n=2, d=2)
    t = torch.tensor([0.0, 0.5, 0.75], dtype=F64)
    fn = lambda y, w: odeint(field(w), y, t, options=dict(step_size=0.25), adjoint_params=(w,))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (y0, w))
    # and to the end points of t: t[0] moves the grid, t[-1] the shorter last step (0.75 -> 0.9)
    t2 = torch.tensor([0.0, 0.9], dtype=F64, requires_grad=True)
    fn2 = lambda y, w, t: odeint(field(w), y, t, options=dict(step_size=0.25), adjoint_params=(w,))  # noqa: E731
    assert torch.autograd.gradcheck(fn2, (y0, w, t2))


def test_a_closure_gets_the_gradient_torchdiffeq_gives_it():
    """A plain function closing over w: adjoint_params=(w,) gives w its gradient. It equals
    backprop through torchdiffeq's rk4 (the exact discrete gradient), and torchdiffeq's
    odeint_adjoint (rk4, same grid) where that is exact too: a field affine in y with w additive."""
    w, y0 = make()
    t = torch.tensor(GRIDS["non-uniform"], dtype=F64)
    ours = grads(odeint(field(w), y0, t, method="rk4_38", adjoint_params=(w,)), w)[0]
    theirs = grads(torchdiffeq.odeint(field(w), y0, t, method="rk4"), w)[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
    same = grads(torchmpnode.odeint_adjoint(field(w), y0, t, method="rk4_38", adjoint_params=(w,)), w)[0]
    assert torch.equal(same, ours)

    A = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    b = torch.randn(3, dtype=F64, requires_grad=True)
    affine = lambda s, y: y @ A + b * torch.cos(2 * s)  # noqa: E731
    ours = grads(odeint(affine, y0, t, method="rk4_38", adjoint_params=(b,)), y0, b)
    adj = grads(torchdiffeq.odeint_adjoint(affine, y0, t, method="rk4", adjoint_params=(b,)), y0, b)
    for a, c in zip(ours, adj):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-10)


def test_a_module_with_adjoint_params_differentiates_exactly_those():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)
    f = lambda s, y: net(y)  # noqa: E731
    m = nn.Module()
    m.forward = lambda s, y: net(y)
    m.net = net
    y0 = torch.randn(4, 3, dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    first = net[0].weight
    full = grads(odeint(m, y0, t), *net.parameters())
    only = torch.autograd.grad(loss(odeint(m, y0, t, adjoint_params=(first, first))), list(net.parameters()),
                               allow_unused=True)
    assert all(g is None for g in only[1:])  # the other parameters were not given
    torch.testing.assert_close(only[0], full[0], rtol=0, atol=1e-14)  # and the given one is counted once
    via_closure = grads(odeint(f, y0, t, adjoint_params=tuple(net.parameters())), *net.parameters())
    for a, c in zip(via_closure, full):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-14)


def test_a_closure_without_adjoint_params_warns_and_nothing_else_does():
    w, y0 = make()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    calls = []
    counted = lambda s, y: calls.append(1) or field(w)(s, y)  # noqa: E731
    with pytest.warns(UserWarning, match="adjoint_params") as rec:
        out = odeint(counted, y0, t)
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    probed = len(calls)
    odeint(counted, y0, t, adjoint_params=(w,))
    assert probed == len(calls) // 2 == 2 * 4  # the probe costs no extra evaluation
    out.sum().backward()
    assert w.grad is None and y0.grad is not None  # the gradient the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        odeint(lambda s, y: -y, y0, t)  # closes over nothing
        odeint(field(w), y0, t, adjoint_params=(w,))
        odeint(field(w.detach()), y0, t)
        with torch.no_grad():
            odeint(field(w), y0, t)


def test_odeint_adjoint_takes_torchdiffeqs_adjoint_keywords_where_they_mean_something():
    w, y0 = make()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    opts = dict(step_size=0.25)
    ref = odeint(field(w), y0, t, options=opts, adjoint_params=(w,))
    out = torchmpnode.odeint_adjoint(field(w), y0, t, method="rk4", options=opts, adjoint_method="rk4",
                                     adjoint_options=dict(step_size=0.25), adjoint_params=(w,))
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="adjoint_method 'euler' differs from method 'rk4'"):
        torchmpnode.odeint_adjoint(field(w), y0, t, adjoint_method="euler", adjoint_params=(w,))
    with pytest.raises(ValueError, match="adjoint_options differ"):
        torchmpnode.odeint_adjoint(field(w), y0, t, options=opts, adjoint_options=dict(step_size=0.5),
                                   adjoint_params=(w,))
    with pytest.warns(UserWarning, match="adjoint_atol/adjoint_rtol are ignored"):
        torchmpnode.odeint_adjoint(field(w), y0, t, adjoint_rtol=1e-6, adjoint_params=(w,))


# --- t ----------------------------------------------------------------------------------------
def test_float32_y0_with_float64_t_runs_in_float32():
    w, y0 = make()
    w32, y32 = w.detach().float().requires_grad_(), y0.detach().float().requires_grad_()
    seen = []
    f = lambda s, y: seen.append(s.dtype) or field(w32)(s, y)  # noqa: E731
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    out = odeint(f, y32, t, adjoint_params=(w32,))
    assert out.dtype == torch.float32 and set(seen) == {torch.float32}
    torch.testing.assert_close(out, odeint(f, y32, t.float(), adjoint_params=(w32,)), rtol=0, atol=0)
    torch.testing.assert_close(out.double(), odeint(field(w), y0, t, adjoint_params=(w,)), rtol=0, atol=1e-5)
    out = odeint(f, y32, t, options=dict(step_size=0.1), adjoint_params=(w32,))  # also on a fine grid
    assert out.dtype == torch.float32 and out.shape == (3, *y32.shape)
    grads(out, y32, w32)


def test_a_one_point_t_returns_y0():
    w, y0 = make()
    t = torch.tensor([0.3], dtype=F64)
    out = odeint(field(w), y0, t, adjoint_params=(w,))
    assert out.shape == (1, *y0.shape) and torch.equal(out[0], y0)
    assert out.data_ptr() != y0.data_ptr()  # a copy, as torchdiffeq returns
    (g,) = torch.autograd.grad((3 * out).sum(), y0)
    assert torch.equal(g, torch.full_like(y0, 3.0))
    z = torch.zeros(4, 1, dtype=F64, requires_grad=True)
    a, b = odeint(lambda s, y: (y[0], y[1]), (y0, z), t)
    assert a.shape == (1, 4, 3) and b.shape == (1, 4, 1) and torch.equal(b[0], z)
    (gz,) = torch.autograd.grad(b.sum(), z)
    assert torch.equal(gz, torch.ones_like(z))


def test_the_kits_integrator_gives_both_solvers_the_same_3_8_scheme():
    """model.Integrator with method 'rk4_38' runs torchdiffeq's 'rk4' (the same tableau) and
    torchmpnode's rk4_38: equal to 1e-9 in float64 on a CNF field (the CNF's time-only part is
    evaluated once per grid, its stage times formed apart from torchdiffeq's; a plain field agrees
    to the last bits, above), a hundred times closer than torchmpnode's classical 'rk4' is; and
    cnf.py's --method choices are the solver's METHODS."""
    import cnf
    from model import CNF, Integrator, flow_to_base

    model = CNF(2, 8, 8).double()
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = {}
    for odeint_name, method in (("torchdiffeq", "rk4_38"), ("torchmpnode", "rk4_38"), ("torchmpnode", "rk4")):
        integ = Integrator(odeint_name, method, 5, loss_scaler=False)
        out[odeint_name, method] = flow_to_base(model, x, integ)[0][-1]
    same = (out["torchdiffeq", "rk4_38"] - out["torchmpnode", "rk4_38"]).abs().max()
    assert same < 1e-9 and (out["torchdiffeq", "rk4_38"] - out["torchmpnode", "rk4"]).abs().max() > 100 * same
    choices = next(a for a in cnf.build_parser()._actions if a.dest == "method").choices
    assert tuple(choices) == tuple(torchmpnode.METHODS)
