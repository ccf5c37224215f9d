"""A DynamicScaler changes no gradient at float32 compute, on every solver path.

With no autocast every operation of the backward sweep is float32, where multiplying by a
power of 2 and dividing by it again is exact (nothing here comes near float32's range
limits). So the gradients to the input, to every parameter and to the grid times must equal
those of the same solve without a scaler, bit for bit, whatever the scale. The scales
checked are far from 1 (2^20 and 2^-22 here), so a cotangent that is not divided by
the scale changes a gradient by a factor of a million and cannot pass unnoticed.

The paths: ``generic`` (autograd through each recomputed step; also the only one that
gives the grid-time gradient), ``grid`` (the exact-trace CNF's hand-written VJP,
model.CNF's grid protocol) and ``fused`` (cnf_kernels, in Triton's interpreter on the CPU;
skipped where triton is not installed, while the other two still run).
"""
import math
import os

import pytest
import torch

import torchmpnode
from model import CNF
from torchmpnode import DynamicScaler

# loss weight -> the scale a DynamicScaler(float32) anchors on: its target, 2^23 / sqrt(3)
# for the state (z [2], logp [1]), over the adjoint's size (about 2 for weight 1)
WEIGHTS = {"scale ~2^20": 1.0, "scale ~2^-22": 2.0**42}
PATHS = ("generic", "grid", "fused")
WHERE = {
    "generic": "torchmpnode's generic path (autograd through each recomputed step, torchmpnode/_solver.py)",
    "grid": "torchmpnode's grid fast path (the CNF's grid_vjp, torchmpnode/_solver.py)",
    "fused": "the fused Triton backward (cnf_kernels.py)",
}


def field(path):
    """A small exact-trace CNF whose hypernetwork is strong enough that every gradient is O(1)."""
    torch.manual_seed(0)
    cnf = CNF(2, 8, 6)
    with torch.no_grad():
        cnf.hyper_net.net[4].weight.mul_(4.0)
    if path == "generic":
        cnf.grid_enabled = False  # no grid protocol: autograd through each recomputed step
    elif path == "fused":
        # as in test_cnf_kernels.py: a skip, or a failure under REQUIRE_TRITON=1
        miss = pytest.fail if os.environ.get("REQUIRE_TRITON") == "1" else pytest.skip
        try:
            import triton  # noqa: F401
        except ImportError:
            miss("triton is not installed")
        if os.environ.get("TRITON_INTERPRET") != "1":  # conftest.py sets it where there is no CUDA
            pytest.skip("CPU tensors run the kernels only in Triton's interpreter (TRITON_INTERPRET=1)")
        import cnf_kernels

        why = cnf_kernels._interpreter_problem()
        if why:
            miss(why)
        cnf.backend = "triton"
    return cnf


def gradients(path, method, weight, scaler, need_t):
    """Gradients of a loss that reads every grid point (so incoming gradients reach every
    step) to (x, t or None, every parameter), and the solver's output."""
    cnf = field(path)
    x = (torch.randn(40, 2, generator=torch.Generator().manual_seed(1)) * 1.5).requires_grad_()
    logp = torch.zeros(40, 1)
    t = torch.linspace(1.0, 0.0, 5).requires_grad_(need_t)
    zs, ls = torchmpnode.odeint(cnf, (x, logp), t, method=method, loss_scaler=scaler)
    g = torch.Generator().manual_seed(7)
    loss = weight * ((zs * torch.randn(zs.shape, generator=g)).sum() + (ls * torch.randn(ls.shape, generator=g)).sum())
    params = list(cnf.parameters())
    inputs = [x, *([t] if need_t else []), *params]
    grads = torch.autograd.grad(loss, inputs)
    names = ["input x", *(["grid times t"] if need_t else []), *(f"parameter {n}" for n, _ in cnf.named_parameters())]
    return dict(zip(names, grads)), (zs.detach(), ls.detach())


def explain(name, scaled, plain, scale, path):
    """Why two gradients differ, in words: a factor near the scale is a missing unscale."""
    ratio = (scaled.double().norm() / plain.double().norm()).item()
    diff = ((scaled.double() - plain.double()).abs().max() / plain.double().abs().max()).item()
    head = f"{WHERE[path]}: the {name} gradient with a DynamicScaler (scale {scale:g} = 2^{math.log2(scale):.0f}) "
    if abs(math.log2(ratio)) > 1:
        return (head + f"is 2^{math.log2(ratio):.1f} times the one without: its cotangents were not divided by "
                       "the scale (a missing unscale)")
    return head + f"differs from the one without by {diff:.2e} (relative), though power-of-2 scaling is exact"


@pytest.mark.parametrize("weight", WEIGHTS.values(), ids=WEIGHTS.keys())
@pytest.mark.parametrize("method", ["rk4", "euler"])
@pytest.mark.parametrize("path", PATHS)
def test_scaled_gradients_equal_unscaled(path, method, weight):
    need_t = path == "generic"  # a gradient to t always takes the generic path
    plain, sol = gradients(path, method, weight, False, need_t)
    scaler = DynamicScaler(torch.float32)
    scaled, sol_scaled = gradients(path, method, weight, scaler, need_t)
    scale = float(scaler.scale)
    # the scale really is far from 1, on the side this case means
    assert abs(math.log2(scale)) >= 16 and (scale > 1) == (weight == 1.0), scale
    assert int(scaler.overflow_steps) == 0
    assert all(torch.equal(a, b) for a, b in zip(sol, sol_scaled))  # the forward solve ignores the scaler
    for name, g in plain.items():
        assert g.abs().max() > 0, f"{WHERE[path]}: the {name} gradient is zero; the test would not see a scale"
        assert torch.equal(scaled[name], g), explain(name, scaled[name], g, scale, path)


class Decay(torch.nn.Module):
    """dy/dt = -k y: the adjoint shrinks by e^-k over the backward sweep. Records the
    largest cotangent each recomputed step receives, so a test sees the scale in use
    without reading the scaler."""

    def __init__(self, k):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(float(k)))
        self.cotangents = []

    def forward(self, t, y):
        out = -self.k * y
        if out.requires_grad:  # the backward's recompute
            out.register_hook(lambda g: self.cotangents.append(float(g.abs().max())))
        return out


def test_the_scale_follows_a_shrinking_adjoint_and_stays_below_the_target():
    """DynamicScaler's contract: max |S a| starts the sweep, and ends each step, in
    (target / 2, target]. The adjoint shrinks by e^-12 ~ 2^-17 over the sweep; the scale
    must follow it up without passing the target (one doubling too many sits above it)."""
    y = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    scaler, f = DynamicScaler(torch.float16), Decay(12.0)
    with torch.autocast("cpu", dtype=torch.float16):
        sol = torchmpnode.odeint(f, y, torch.linspace(0.0, 1.0, 33), method="euler", loss_scaler=scaler)
    (g,) = torch.autograd.grad(0.7 * sol[-1].sum(), y)
    scale, target = float(scaler.scale), scaler.target(4)
    # the first step: the field's cotangent is h S a_N with h = 1/32 and a_N = 0.7 (anchored)
    first = f.cotangents[0] * 32
    assert target / 2 < first <= target, (
        f"max |S a| = {first:.4g} at the anchor, outside (target/2, target] = ({target / 2:.4g}, {target:.4g}]")
    assert g.abs().max() < 1e-4  # the adjoint at t_0 is e^-12 ~ 6e-6
    assert target / 2 < scale * float(g.abs().max()) <= target, (
        f"max |S a| = {scale * float(g.abs().max()):.4g} after the sweep, outside (target/2, target] = "
        f"({target / 2:.4g}, {target:.4g}]: the scale did not track the adjoint to its target")


@pytest.mark.parametrize("low,scaled", [(torch.float16, True), (torch.bfloat16, False), (torch.float32, False)])
def test_automatic_scaler_only_for_float16(low, scaled):
    """loss_scaler=None scales the adjoint in float16 only (bfloat16 has float32's range).
    Scaling changes no gradient bit, so the test looks at what the field's VJP receives:
    a cotangent far above the adjoint (~1e-3 here) only when a scaler is at work."""
    y = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    f = Decay(0.1)
    with torch.autocast("cpu", dtype=low, enabled=low != torch.float32):
        sol = torchmpnode.odeint(f, y, torch.linspace(0.0, 1.0, 5), loss_scaler=None)
    torch.autograd.grad(1e-3 * sol[-1].sum(), y)
    biggest = max(f.cotangents)
    if scaled:
        assert biggest > 1.0, f"float16 without an explicit scaler: the VJP saw cotangents of {biggest:.3g} (unscaled)"
    else:
        assert biggest < 1e-2, f"{low}: the VJP saw cotangents of {biggest:.3g}: an automatic scaler scaled them"


class HugeTarget(DynamicScaler):
    """A DynamicScaler aiming just below float32's largest number: a step's parameter
    cotangents (sums over the batch) overflow at the anchored scale, so sweeps retry steps
    at halved scales."""

    def target(self, numel_per_sample):
        return 1.9 * 2.0**127


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy reports the overflows
@pytest.mark.parametrize("path", ["grid", "fused"])
def test_retries_accumulate_over_solves_and_change_no_gradient(path):
    """overflow_steps counts every retry since the scaler was made (it is logged per run):
    two identical solves retry equally often, so the count doubles; the retried steps give
    the gradient of a solve without a scaler, bit for bit."""
    scaler = HugeTarget(torch.float32)
    plain = gradients(path, "rk4", 1.0, False, False)[0]
    first = gradients(path, "rk4", 1.0, scaler, False)[0]
    once = int(scaler.overflow_steps)
    gradients(path, "rk4", 1.0, scaler, False)
    assert once > 0, f"{WHERE[path]}: no step overflowed at a 1.9 * 2^127 target; the test would not see retries"
    assert int(scaler.overflow_steps) == 2 * once, (
        f"{WHERE[path]}: overflow_steps is {int(scaler.overflow_steps)} after two identical solves, {once} after "
        "one: the retries of a solve are not added to the count")
    for name, g in plain.items():
        assert torch.equal(first[name], g), explain(name, first[name], g, float(scaler.scale), path)
    # as in training, where the count is read only when a CSV row is written: the fused path
    # then keeps it on the device, and each solve's retries must add to the unread ones
    unread = HugeTarget(torch.float32)
    for _ in range(3):
        gradients(path, "rk4", 1.0, unread, False)
    assert int(unread.overflow_steps) == 3 * once, (
        f"{WHERE[path]}: overflow_steps is {int(unread.overflow_steps)} when first read after three identical "
        f"solves, {once} after one: retries counted but not yet read are lost by the next solve")


def test_fused_reports_the_smallest_block_scale():
    """The fused backward scales each block of samples on its own; the scaler then reports
    the smallest final block scale, the one that bounds every block's range. Two blocks
    (40 samples, 32 per program on the CPU) whose adjoints differ by 2^10 get scales 2^10
    apart; the scale reported for the whole batch is the smaller, and equals a solve of
    that block alone."""
    cnf = field("fused")
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(1)) * 1.5
    weight = torch.ones(40, 1)
    weight[32:] = 2.0**-10  # the second block's adjoint is 2^10 times smaller

    def scale_of(rows):
        scaler = DynamicScaler(torch.float32)
        xl = x[rows].clone().requires_grad_()
        zs, ls = torchmpnode.odeint(cnf, (xl, torch.zeros(len(xl), 1)), torch.linspace(1.0, 0.0, 5), loss_scaler=scaler)
        torch.autograd.grad((zs[-1] * weight[rows]).sum(), xl)
        return float(scaler.scale)

    big, small, both = scale_of(slice(0, 32)), scale_of(slice(32, 40)), scale_of(slice(0, 40))
    assert small >= 2.0**8 * big  # the blocks' own scales are far apart
    assert both == big, (f"the fused backward reported scale {both:g}; its blocks' scales are {big:g} and {small:g}: "
                         "the reported scale must be the smallest block scale")


# --- the failure path: a backward that stays non-finite ---------------------------------------------------
def _persistent_failure_at_step_0(path, max_attempts):
    """A float16 solve on 4 grid points whose loss reads the first grid point (z at t = 0)
    with weight NaN: the adjoint after step 0 is non-finite whatever the scale, and nothing
    before it is. Returns (the error or None, the scaler, dL/dx, the parameter gradients)."""
    cnf = field(path)
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(3)) * 1.5  # one block of samples when fused
    xl = x.clone().requires_grad_()
    scaler = DynamicScaler(max_attempts=max_attempts)
    with torch.autocast("cpu", dtype=torch.float16):
        zs, _ = torchmpnode.odeint(cnf, (xl, torch.zeros(len(x), 1)), torch.linspace(0.0, 1.0, 4), loss_scaler=scaler)
    w = torch.ones_like(zs)
    w[0] = float("nan")
    try:
        (zs * w).sum().backward()
    except RuntimeError as e:
        return e, scaler, xl.grad, [p.grad for p in cnf.parameters()]
    return None, scaler, xl.grad, [p.grad for p in cnf.parameters()]


@pytest.mark.parametrize("path", PATHS)
def test_a_persistent_failure_at_step_0_raises_naming_the_step(path):
    """Step 0 (t = 0) is the sweep's last step: a failure there must raise like any other,
    naming the step, never return a non-finite input gradient beside finite parameter
    gradients as if all were well."""
    err, scaler, gx, gp = _persistent_failure_at_step_0(path, 3)
    assert err is not None, (f"{WHERE[path]}: no error, dL/dx finite: {bool(torch.isfinite(gx).all())}, "
                             f"parameter gradients finite: {[bool(torch.isfinite(g).all()) for g in gp if g is not None]}")
    assert "the VJP of step 0 (t=0) stayed non-finite after 3 halvings" in str(err), str(err)


@pytest.mark.parametrize("max_attempts", [1, 3, 6])
def test_the_number_of_halvings_is_max_attempts_on_every_path(max_attempts):
    """A persistent failure is retried exactly ``max_attempts`` times (each halving the scale)
    before the error, which names that number; the torch paths and the fused kernels agree on
    the count and on the scale they end at."""
    seen = {}
    for path in PATHS:
        try:
            err, scaler, _, _ = _persistent_failure_at_step_0(path, max_attempts)
        except pytest.skip.Exception:
            continue
        assert err is not None and f"after {max_attempts} halvings" in str(err), (path, err)
        seen[path] = (scaler.overflow_steps, scaler.scale)
        assert scaler.overflow_steps == max_attempts, (WHERE[path], scaler.overflow_steps)
    assert len(set(seen.values())) == 1, seen  # one count, one final scale
