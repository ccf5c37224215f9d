"""The fused Triton solve against its plain-torch twin (the torch grid path).

Without CUDA these run in Triton's interpreter on CPU tensors at tiny sizes
(conftest.py sets TRITON_INTERPRET=1). With CUDA, ``pytest -m cuda`` runs the
same checks compiled on the GPU at the standard size (batch 1024, width 128,
128 grid points), and at batch 1023 with width 100 so the sample and width masks
run compiled. REQUIRE_TRITON=1 turns a missing triton into a failure.

Bitwise and near-bitwise checks run in the interpreter only, where the two paths do
the same arithmetic by construction. Compiled, the kernels fuse multiply-adds and
take Triton's sigmoid while the torch path sums with cuBLAS: last-bit float32
differences flip a low-precision rounding now and then, so there the checks are
statistics against float64.
"""
import os
import subprocess
import sys

import pytest
import torch

import torchmpnode
from model import CNF, Integrator, flow_to_base, fused_self_test, resolve_backend
from torchmpnode import DynamicScaler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# "standard": on the CPU width 6 is not a power of 2, so the kernels' width masks are
# exercised, and n=40 spans two backward programs (32 samples each), so the cross-program
# sum is too; on CUDA the standard size of bench.py. "odd": a partial last block of samples
# and a masked width, on CUDA at full size (tiny on the CPU, where "standard" has both).
SIZES = {"cpu": dict(n=40, hidden=8, width=6, points=5), "cuda": dict(n=1024, hidden=32, width=128, points=128)}
ODD_SIZES = {"cpu": dict(n=7, hidden=8, width=5, points=4), "cuda": dict(n=1023, hidden=32, width=100, points=128)}
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def need_triton(interpreted=False):
    """Skip without triton (fail with REQUIRE_TRITON=1). With ``interpreted`` (a check that
    runs the kernels in Triton's interpreter when there is no GPU), also when this
    triton's interpreter cannot run them here, with the reason in one line."""
    try:
        import triton  # noqa: F401
    except ImportError:
        if os.environ.get("REQUIRE_TRITON") == "1":
            pytest.fail("REQUIRE_TRITON=1 but triton does not import")
        pytest.skip("triton is not installed")
    if interpreted and not torch.cuda.is_available():
        import cnf_kernels

        reason = cnf_kernels._interpreter_problem()
        if reason:
            (pytest.fail if os.environ.get("REQUIRE_TRITON") == "1" else pytest.skip)(reason)


def _kernel_device(kind):
    need_triton()
    if kind == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if kind == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        if not torch.cuda.is_available():  # conftest.py sets it without CUDA: the CPU checks must run
            pytest.fail("no CUDA and TRITON_INTERPRET is not 1: the kernel checks would not run")
        pytest.skip("TRITON_INTERPRET is off (CUDA present): these checks run on the GPU under -m cuda")
    if kind == "cpu":
        need_triton(interpreted=True)  # an old triton's interpreter: one line (REQUIRE_TRITON=1: fail)
    return torch.device(kind)


@pytest.fixture(params=[pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """The kernels interpreted on the CPU, and compiled on CUDA (marked ``cuda``)."""
    return _kernel_device(request.param)


@pytest.fixture
def interpreter():
    """The CPU with the kernels interpreted: for the checks that hold only where both paths
    do the same arithmetic."""
    return _kernel_device("cpu")


def make(device, seed=0, dtype=torch.float32, shape="standard"):
    sz = (ODD_SIZES if shape == "odd" else SIZES)[device.type]
    torch.manual_seed(seed)
    cnf = CNF(2, sz["hidden"], sz["width"]).to(device, dtype)
    x = (torch.randn(sz["n"], 2, generator=torch.Generator().manual_seed(seed + 100)) * 1.5).to(device, dtype)
    return cnf, x, sz["points"]


def solve(cnf, x, points, method="rk4", backend="torch", low=None, scaler=False):
    """States and logp at every grid point, and the gradients (x, every parameter) of a
    loss that reads every grid point, so incoming gradients reach every step."""
    cnf.backend = backend
    integ = Integrator("torchmpnode", method, points, loss_scaler=scaler)
    xl = x.detach().clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=low or torch.float32, enabled=low is not None):
        zs, ls = flow_to_base(cnf, xl, integ)
    g = torch.Generator().manual_seed(7)
    wz = torch.randn(zs.shape, generator=g, dtype=torch.float64).to(zs)
    wl = torch.randn(ls.shape, generator=g, dtype=torch.float64).to(ls)
    loss = (zs * wz).sum() / zs.shape[1] + (ls * wl).sum()
    grads = torch.autograd.grad(loss, (xl, *cnf.parameters()))
    return [zs.detach(), ls.detach(), *grads]


def rel(a, b):
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("shape", ["standard", "odd"])
@pytest.mark.parametrize("method", ["rk4", "euler"])
def test_float32_matches_torch_path_to_roundoff_and_float64_within_2x(device, method, shape):
    cnf, x, points = make(device, shape=shape)
    fused = solve(cnf, x, points, method, "triton")
    torch32 = solve(cnf, x, points, method, "torch")
    ref = solve(cnf.double(), x.double(), points, method, "torch")
    cnf.float()
    for name, f, t, r in zip(["z_t", "logp_t", "dx"] + ["param"] * (len(fused) - 3), fused, torch32, ref):
        assert f.dtype == torch.float32
        assert rel(f, t) < 2e-5, (name, rel(f, t))  # float32 roundoff of the same arithmetic
        assert rel(f, r) <= 2 * rel(t, r) + 1e-6, (name, rel(f, r), rel(t, r))  # as close to float64


def nrel(a, b):
    """||a - b|| / ||b|| over a list of tensors, in float64."""
    a = torch.cat([t.double().reshape(-1) for t in a])
    b = torch.cat([t.double().reshape(-1) for t in b])
    return ((a - b).norm() / b.norm()).item()


def differing(a, b, eps):
    """The fraction of values of a more than one low-precision rounding step (eps) away from
    b's, relative to |b| plus b's RMS."""
    a, b = a.double(), b.double()
    scale = b.abs() + b.pow(2).mean().sqrt()
    return ((a - b).abs() > eps * scale).double().mean().item()


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_reproduces_autocast_rounding_points_interpreted(interpreter, low):
    """The forward and the state cotangent agree with the autocast torch path to float32
    sum-order roundoff, far below one low-precision step: every rounding point is the
    torch path's. The parameter cotangents agree within two steps: the torch path rounds
    each stage's batch sum to the low precision, the kernels keep it float32 (documented)."""
    eps = EPS[low]
    for seed in range(3):
        cnf, x, points = make(interpreter, seed)
        z_f, l_f, dx_f, *p_f = solve(cnf, x, points, "rk4", "triton", low)
        z_t, l_t, dx_t, *p_t = solve(cnf, x, points, "rk4", "torch", low)
        assert rel(z_f, z_t) < 1e-5 and rel(l_f, l_t) < 1e-5, (rel(z_f, z_t), rel(l_f, l_t))
        assert rel(dx_f, dx_t) < eps / 4, rel(dx_f, dx_t)
        for a, b in zip(p_f, p_t):
            assert rel(a, b) < 2 * eps, rel(a, b)


@pytest.mark.parametrize("shape", ["standard", "odd"])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_error_vs_float64_at_most_2x_torch_path_and_few_values_differ(device, low, shape):
    """Over several seeds the fused path's error against float64 is at most twice the
    torch path's (states, log-densities, input gradient, parameter gradients), and at most
    one value in 1000 of the states, log-densities and input gradient is more than one
    rounding step from the torch path's. Compiled, last-bit float32 differences flip a
    rounding now and then; a flip moves the outputs by a fraction of a step (in the
    interpreter, moving every value by one float32 step before each rounding, at batch 256,
    width 128 and 64 steps, moved none by more than a third of a step). Garbage from a wrong
    sample or width mask (the partial block holds 3 of 1023 samples) fails the count."""
    eps = EPS[low]
    groups = ("z_t", "logp_t", "dx", "params")
    err = {(g, who): 0.0 for g in groups for who in ("fused", "torch")}
    seeds = range(3)
    for seed in seeds:
        cnf, x, points = make(device, seed, shape=shape)
        fused = solve(cnf, x, points, "rk4", "triton", low)
        torch_lp = solve(cnf, x, points, "rk4", "torch", low)
        ref = solve(cnf.double(), x.double(), points, "rk4", "torch")
        cnf.float()
        for g, f, t in zip(groups, fused[:3], torch_lp[:3]):
            assert differing(f, t, eps) <= 1e-3, (g, seed, differing(f, t, eps))
        parts = lambda s: ([s[0]], [s[1]], [s[2]], s[3:])  # noqa: E731
        for g, f, t, r in zip(groups, parts(fused), parts(torch_lp), parts(ref)):
            err[g, "fused"] += nrel(f, r) / len(seeds)
            err[g, "torch"] += nrel(t, r) / len(seeds)
    print("\nmean error vs float64 (fused / torch): " + ", ".join(
        f"{g} {err[g, 'fused']:.2e} / {err[g, 'torch']:.2e}" for g in groups))
    for g in groups:
        assert err[g, "torch"] > 1e-6, g  # it really ran in low precision
        assert err[g, "fused"] <= 2 * err[g, "torch"], (g, err[g, "fused"], err[g, "torch"])


def test_euler_bfloat16_is_bitwise_equal_interpreted(interpreter):
    """With one stage per row even the parameter cotangents match the torch path bit for bit
    (both round them to bfloat16 before the hypernetwork's backward): states, log-densities
    and every gradient."""
    cnf, x, points = make(interpreter, 3)
    fused = solve(cnf, x, points, "euler", "triton", torch.bfloat16)
    torch_lp = solve(cnf, x, points, "euler", "torch", torch.bfloat16)
    for name, a, b in zip(["z_t", "logp_t", "dx"] + ["param"] * (len(fused) - 3), fused, torch_lp):
        assert torch.equal(a, b), (name, rel(a, b))


def test_the_tests_faster_interpreter_computes_the_same_bits(interpreter, monkeypatch):
    """tests/fast_interpreter.py, which the tests run the kernels under for speed, sets triton's language up
    once per launch instead of once per helper call and skips the integer-overflow checks whose results
    nothing reads, and changes no bit: a float16 fused solve with its DynamicScaler (forward and backward, a
    partial block, a masked width) gives the same states, densities, gradients and scale under triton's own
    interpreter."""
    import fast_interpreter
    from triton.runtime import interpreter as interp

    if fast_interpreter.UNDO is None:  # the speed-up is optional: without it the tests run triton's own interpreter
        why = ("KIT_TEST_PLAIN_INTERPRETER=1" if os.environ.get("KIT_TEST_PLAIN_INTERPRETER") == "1"
               else "this triton's interpreter is laid out otherwise")
        pytest.skip(f"tests/fast_interpreter.py is not installed: {why}")
    setups, asserts = [], []
    real_builtin, real_assert = interp._patch_builtin, interp.interpreter_semantic.device_assert
    monkeypatch.setattr(interp, "_patch_builtin", lambda *a: setups.append(1) or real_builtin(*a))
    monkeypatch.setattr(interp.interpreter_semantic, "device_assert", lambda *a: asserts.append(1) or real_assert(*a))

    def run():
        setups.clear(), asserts.clear()
        cnf, x, points = make(interpreter, shape="odd")
        scaler = DynamicScaler()
        out = solve(cnf, x, points, "rk4", "triton", torch.float16, scaler)
        return out, scaler.scale, len(setups), len(asserts)

    fast, fast_scale, fast_setups, fast_checks = run()
    fast_interpreter.UNDO()
    try:
        plain, plain_scale, plain_setups, plain_checks = run()
    finally:
        fast_interpreter.install()
    assert fast_scale == plain_scale
    for i, (a, b) in enumerate(zip(fast, plain)):
        assert torch.equal(a, b), (i, rel(a, b))
    assert plain_setups > 20 * fast_setups > 0, (plain_setups, fast_setups)
    assert plain_checks > 0 and fast_checks == 0, (plain_checks, fast_checks)  # the overflow checks were skipped


# --- DynamicScaler in the fused backward ---------------------------------------------------------------
def contracting_cnf(k=30.0, eps=0.125, c=(1.0, 1.5), dtype=torch.float32, device="cpu"):
    """A CNF whose field is f_j(z) = -(k/eps) tanh(eps (z_j - c_j)) ~ -k (z_j - c_j): the state
    settles at c while the adjoint shrinks by e^-k over the backward sweep. The hypernetwork's
    output is held constant (zero last weights) at values exact in float16."""
    cnf = CNF(2, 4, 2).to(device, dtype)
    lin = cnf.hyper_net.net[-1]
    with torch.no_grad():
        lin.weight.zero_()
        eye = torch.eye(2, dtype=dtype)
        W, U, G = eps * eye, -(k / eps) * 2 * eye, torch.full((2, 2), 30.0, dtype=dtype)  # gate sigmoid(30) = 1
        B = -eps * torch.tensor(c, dtype=dtype)
        lin.bias.copy_(torch.cat([W.reshape(-1), U.reshape(-1), G.reshape(-1), B]).to(device))
    return cnf


def _solve_grad(cnf, z0, t, backend, low=None, scale=1.0, scaler=False):
    """dL/dz0 for L = scale * 1e-3 |z_N|^2 / 2, and the states at every grid point."""
    cnf.backend = backend
    z = z0.detach().clone().requires_grad_()
    logp = torch.zeros(z.shape[0], 1, dtype=z.dtype, device=z.device)
    with torch.autocast(z.device.type, dtype=low or torch.float32, enabled=low is not None):
        zs, _ = torchmpnode.odeint(cnf, (z, logp), t, loss_scaler=scaler)
    return torch.autograd.grad(scale * 1e-3 * (zs[-1] ** 2).sum() / 2, z)[0], zs.detach()


def _grad_z0(cnf, z0, t, backend, low=None, scaler=False):
    return _solve_grad(cnf, z0, t, backend, low, scaler=scaler)[0]


def _exact_adjoint_along(zs, t, device):
    """dL/dz0 by the float64 discrete adjoint of classical RK4 taken along the given states
    (each step recomputed in float64 from its stored state): what an exact backward sweep
    would return for the forward solve that produced ``zs``."""
    cnf = contracting_cnf(dtype=torch.float64, device=device)
    t = t.double()
    field = lambda s, z: cnf(s, (z, z.new_zeros(z.shape[0], 1)))[0]  # noqa: E731
    a = 1e-3 * zs[-1].double()
    for i in range(len(t) - 2, -1, -1):
        h = t[i + 1] - t[i]
        z = zs[i].double().requires_grad_()
        k1 = field(t[i], z)
        k2 = field(t[i] + h / 2, z + h / 2 * k1)
        k3 = field(t[i] + h / 2, z + h / 2 * k2)
        k4 = field(t[i + 1], z + h * k3)
        (a,) = torch.autograd.grad(z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), z, a)
    return a


def test_dynamic_scaler_over_adjoint_range_e_minus_30(device):
    z0 = torch.randn(64 if device.type == "cuda" else 16, 2, generator=torch.Generator().manual_seed(0),
                     dtype=torch.float64).to(device)
    t = torch.linspace(0.0, 1.0, 33, dtype=torch.float64, device=device)
    ref = _grad_z0(contracting_cnf(dtype=torch.float64, device=device), z0, t, "torch")
    err = lambda g, r=ref: ((g.double() - r).norm() / r.norm()).item()  # noqa: E731
    z32, t32 = z0.float(), t.float()
    scaler, torch_sc = DynamicScaler(), DynamicScaler()
    fused, fused_zs = _solve_grad(contracting_cnf(device=device), z32, t32, "triton", torch.float16, scaler=scaler)
    twin, twin_zs = _solve_grad(contracting_cnf(device=device), z32, t32, "torch", torch.float16, scaler=torch_sc)
    unscaled = _grad_z0(contracting_cnf(device=device), z32, t32, "triton", torch.float16, False)
    # the error split in two: the float16 forward solve alone (an exact float64 backward along
    # its states), and the float16 backward alone (against that exact backward)
    fused_fwd, twin_fwd = (_exact_adjoint_along(zs, t, device) for zs in (fused_zs, twin_zs))
    print(f"\n|dL/dz0| ~ {ref.abs().max().item():.1e}; float16 error vs float64: fused+DynamicScaler "
          f"{err(fused):.2e} (scale {scaler.scale:.3g}), torch+DynamicScaler {err(twin):.2e}, fused unscaled "
          f"{err(unscaled):.2e}\n  split: float16 forward alone {err(fused_fwd):.2e} (torch {err(twin_fwd):.2e}), "
          f"float16 backward alone {err(fused, fused_fwd):.2e} (torch {err(twin, twin_fwd):.2e})")
    assert err(unscaled) > 1e3  # without scaling the adjoint underflows and the gradient is lost
    # the scaler recovers it to float16's rounding floor of this field: the torch path's own
    # error (the rounding points are the same), ~2e-3 here; the 1e-3 target and why it is missed:
    # docs/experiments/2026-11-28-float16-e30-adjoint.md
    assert err(fused) < 5e-3
    assert err(fused) <= 1.05 * err(twin)
    assert err(fused, fused_fwd) <= 1.05 * err(twin, twin_fwd)
    assert scaler.scale > 2.0**60  # the scale followed the adjoint down from ~1e-3 by e^-30


class LowTargetScaler(DynamicScaler):
    """A DynamicScaler aiming 10 times below the usual target, so it picks other scales."""

    def target(self, numel_per_sample):
        return super().target(numel_per_sample) / 10


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dynamic_scaler_adds_no_rounding(device, backend):
    """The scale multiplies and divides exactly (powers of 2): scales 8-16 times smaller give
    the same float16 gradient bit for bit, and a loss 2^-60 times smaller (adjoints from ~1e-21
    down to ~1e-29, far below float16's range) gives it 2^-60 times smaller, bit for bit. So the
    float16 error is float16's arithmetic at the autocast rounding points, not the scaling.
    16 steps (the adjoint shrinks by ~4e-9 over them): the property does not depend on the count."""
    z0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.linspace(0.0, 1.0, 17, device=device)
    grad = lambda k, sc: _solve_grad(contracting_cnf(device=device), z0, t, backend, torch.float16,  # noqa: E731
                                     2.0**-k, sc)[0]
    base, low, tiny = DynamicScaler(), LowTargetScaler(), DynamicScaler()
    g0 = grad(0, base)
    assert torch.equal(grad(0, low), g0) and low.scale <= base.scale / 8
    assert torch.equal(grad(60, tiny) * 2.0**60, g0) and tiny.scale == base.scale * 2.0**60
    assert base.overflow_steps == low.overflow_steps == tiny.overflow_steps == 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy reports the float16 overflow
def test_overflowing_step_is_retried_at_half_scale(device):
    """A steep field makes the anchored scale overflow float16 inside the VJP: the kernel
    retries that step with the scale halved, and the gradient matches the torch path's."""
    cnf = contracting_cnf(k=4.0, eps=2.0**-8, device=device)  # Uw2T = -2048: S*cot*2048 > 65504
    z0 = torch.randn(40, 2, generator=torch.Generator().manual_seed(1)).to(device)
    t = torch.linspace(0.0, 1.0, 3, device=device)
    fused_sc, twin_sc = DynamicScaler(), DynamicScaler()
    fused = _grad_z0(cnf, z0, t, "triton", torch.float16, fused_sc)
    twin = _grad_z0(cnf, z0, t, "torch", torch.float16, twin_sc)
    assert fused_sc.overflow_steps >= 1 and twin_sc.overflow_steps >= 1
    assert torch.isfinite(fused).all()
    assert rel(fused, twin) < 1e-5  # near-bitwise: float32 sum order only


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_persistent_non_finite_raises_naming_the_step(device):
    cnf, x, points = make(device)
    cnf.backend = "triton"
    scaler = DynamicScaler(max_attempts=3)
    xl = x.clone().requires_grad_()
    logp = torch.zeros(x.shape[0], 1, device=device)
    with torch.autocast(device.type, dtype=torch.float16):
        zs, _ = torchmpnode.odeint(cnf, (xl, logp), torch.linspace(0.0, 1.0, points, device=device), loss_scaler=scaler)
    with pytest.raises(RuntimeError, match=rf"step {points - 2} .*3 halvings"):
        (zs[-1].sum() * float("nan")).backward()


# --- determinism, memory, refusals -----------------------------------------------------------------------
def test_identical_runs_give_identical_bits(device):
    cnf, x, points = make(device, 5)
    a = solve(cnf, x, points, "rk4", "triton", torch.float16, DynamicScaler())
    b = solve(cnf, x, points, "rk4", "triton", torch.float16, DynamicScaler())
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def _one_step_per_launch(monkeypatch):
    """Make every backward launch a single step (a partial buffer budget of ~0), for the
    rest of the test, and count the launches."""
    import cnf_kernels

    launches = []
    launch = cnf_kernels._launch

    def counting(name, *args, **kw):
        launches.append(name)
        return launch(name, *args, **kw)

    settings = cnf_kernels.launch_settings(partial_mb=1e-9)
    settings.__enter__()
    _undo.append(settings)
    monkeypatch.setattr(cnf_kernels, "_launch", counting)
    return launches


_undo = []  # launch settings entered by a test, left after it by the fixture below


@pytest.fixture(autouse=True)
def _restore_launch_settings():
    yield
    while _undo:
        _undo.pop().__exit__(None, None, None)


@pytest.mark.parametrize("method,low", [("rk4", None), ("euler", None), ("rk4", torch.float16)])
def test_backward_in_chunks_matches_one_launch(device, monkeypatch, method, low):
    """The sweep split into one launch per step (as a long grid or a small memory budget
    splits it): the adjoint and the scaler state pass between launches unchanged, so the
    input gradient is the same bit for bit; the parameter rows agree to float32 roundoff
    (torch sums smaller buffers over the programs, and rk4's row shared by two chunks in
    another order)."""
    cnf, x, points = make(device, 2)
    sc_one, sc_many = (DynamicScaler(), DynamicScaler()) if low else (False, False)
    one = solve(cnf, x, points, method, "triton", low, sc_one)
    launches = _one_step_per_launch(monkeypatch)
    many = solve(cnf, x, points, method, "triton", low, sc_many)
    assert launches.count("backward") == points - 1
    for a, b in zip(one[:3], many[:3]):  # states, logp, dL/dx
        assert torch.equal(a, b)
    for a, b in zip(one[3:], many[3:]):
        assert rel(b, a) < 1e-5, rel(b, a)
    if low:
        assert (sc_one.scale, sc_one.overflow_steps) == (sc_many.scale, sc_many.overflow_steps)


@pytest.mark.parametrize("method,low,scaled", [("rk4", torch.float16, True), ("euler", torch.bfloat16, False),
                                               ("rk4", None, False)])
def test_padded_parameter_rows_give_the_same_bits(interpreter, monkeypatch, method, low, scaled):
    """Padded parameter rows change where each row starts (a multiple of 16 floats), not what
    is computed: states, log-densities and every gradient are the same bits either way.
    (On a GPU ``python -m tools.kernel_sweep options`` compares the two settings as it times them.)"""
    import cnf_kernels

    cnf, x, points = make(interpreter, 4)
    plain = solve(cnf, x, points, method, "triton", low, DynamicScaler() if scaled else False)
    R = 2 * 2 * cnf.width + 2 * cnf.width + 2
    with cnf_kernels.launch_settings(pad_rows=True):
        assert R % 16 and cnf_kernels.row_stride(2, cnf.width) == R + 16 - R % 16  # the rows really move
        padded = solve(cnf, x, points, method, "triton", low, DynamicScaler() if scaled else False)
    assert cnf_kernels.row_stride(2, cnf.width) == R  # and back after the block
    for a, b in zip(plain, padded):
        assert torch.equal(a, b)


def test_partial_buffer_stays_within_budget():
    """The backward's partial buffer [programs, rows, R] float32 stays within its budget,
    ``Launch.partial_mb`` (or one step, if even that is larger), whatever the grid, in few
    even launches."""
    import cnf_kernels

    budget = cnf_kernels.launch().partial_mb * 2**20
    assert cnf_kernels._chunk_steps(127, 256, 770, 2) == 32  # the standard size: 4 launches, 51 MB
    for N in (1, 7, 127, 1000):
        for programs in (1, 128, 256, 4096):
            for per_step in (1, 2):
                steps = cnf_kernels._chunk_steps(N, programs, 770, per_step)
                size = programs * (per_step * steps + 1) * 770 * 4
                assert 1 <= steps <= N and (size <= budget or steps == 1), (N, programs, steps, size)
                launches = -(-N // steps)
                assert launches == 1 or programs * (per_step * -(-N // (launches - 1)) + 1) * 770 * 4 > budget


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_chunks_carry_retries_and_failures(device, monkeypatch):
    """A retried step, and a step that runs out of halvings, keep their effect across launches."""
    cnf = contracting_cnf(k=4.0, eps=2.0**-8, device=device)  # overflows float16 at the anchored scale
    z0 = torch.randn(40, 2, generator=torch.Generator().manual_seed(1)).to(device)
    t = torch.linspace(0.0, 1.0, 4, device=device)
    one_sc = DynamicScaler()
    one = _solve_grad(cnf, z0, t, "triton", torch.float16, scaler=one_sc)[0]
    _one_step_per_launch(monkeypatch)
    many_sc = DynamicScaler()
    many = _solve_grad(cnf, z0, t, "triton", torch.float16, scaler=many_sc)[0]
    assert one_sc.overflow_steps >= 1 and torch.equal(one, many)
    assert (one_sc.scale, one_sc.overflow_steps) == (many_sc.scale, many_sc.overflow_steps)
    with pytest.raises(RuntimeError, match=r"step 2 .*3 halvings"):  # the last step fails, in the first launch
        cnf_nan, x, _ = make(device)
        cnf_nan.backend = "triton"
        xl = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.float16):
            zs, _ = torchmpnode.odeint(cnf_nan, (xl, torch.zeros(x.shape[0], 1, device=device)), t,
                                       loss_scaler=DynamicScaler(max_attempts=3))
        (zs[-1].sum() * float("nan")).backward()


def test_saves_only_the_states(device):
    """What autograd keeps for the fused solve: the grid and the states, no activations."""
    cnf, x, points = make(device)
    cnf.backend = "triton"
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    integ = Integrator("torchmpnode", "rk4", points, loss_scaler=False)
    xl = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        zs, ls = flow_to_base(cnf, xl, integ)
    states = zs.numel() * 4 + ls.numel() * 4 + points * 4
    assert sum(saved) <= states, (sum(saved), states)


def test_per_grid_preparation_is_done_once(device):
    """A training loop pays the kernels' per-grid checks and coefficient copy (a host
    sync on a GPU) once, not at every solve."""
    import cnf_kernels

    cnf, x, points = make(device)
    cnf.backend = "triton"
    integ = Integrator("torchmpnode", "rk4", points, loss_scaler=False)
    cnf_kernels._prepared.cache_clear()
    for _ in range(3):
        zs, ls = flow_to_base(cnf, x.clone().requires_grad_(), integ)
        (zs[-1].sum() + ls[-1].sum()).backward()
    info = cnf_kernels._prepared.cache_info()
    assert (info.misses, info.hits) == (1, 5), info


def test_refusals():
    need_triton()

    cnf = CNF(2, 4, 3, backend="triton")
    z, t = torch.randn(5, 2, dtype=torch.float64), torch.linspace(0.0, 1.0, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32 states"):
        torchmpnode.odeint(cnf.double(), (z, torch.zeros(5, 1, dtype=torch.float64)), t)
    with pytest.raises(ValueError, match="exact trace"):
        CNF(2, 4, 3, trace="hutchinson", backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        CNF(2, 4, 3, backend="cuda")
    with pytest.raises(ValueError, match="--odeint torchdiffeq"):
        resolve_backend("triton", "cpu", "torchdiffeq", "exact")
    with pytest.raises(ValueError, match="--trace autograd"):
        resolve_backend("triton", "cpu", "torchmpnode", "autograd")
    assert resolve_backend("auto", "cpu") == ("torch", "")  # auto is triton on CUDA only
    assert resolve_backend("torch", "cpu") == ("torch", "")


def test_self_test_catches_a_broken_kernel(device, monkeypatch):
    """Before a run uses the kernels, a tiny solve must match the torch path: a kernel
    that fails to compile, or computes wrong gradients, is caught with a one-line reason."""
    import cnf_kernels

    assert fused_self_test(device, width=6) is None
    assert fused_self_test(device, width=6, low=torch.float16, scaled=True) is None
    assert resolve_backend("triton", device, probe=dict(width=6)) == ("triton", "fused kernels passed their self-test")
    right = cnf_kernels.solve_backward

    def wrong(*args, **kw):
        az, al, dP = right(*args, **kw)
        return az, al, tuple(1.5 * d for d in dP)

    monkeypatch.setattr(cnf_kernels, "solve_backward", wrong)
    assert "differs from the torch path" in fused_self_test(device, width=6)
    with pytest.raises(ValueError, match=r"^--backend triton: the fused kernels failed their self-test: hyper_net"):
        resolve_backend("triton", device, probe=dict(width=6))

    def broken(*args, **kw):
        raise cnf_kernels.KernelError("the fused forward kernel failed: CompilationError: at 12:4")

    monkeypatch.setattr(cnf_kernels, "solve_forward", broken)
    assert "CompilationError" in fused_self_test(device, width=6)
    if device.type == "cuda":  # auto falls back to torch and says why
        backend, note = resolve_backend("auto", device, probe=dict(width=6))
        assert backend == "torch" and "self-test" in note


def test_no_triton_or_no_gpu_is_one_line(monkeypatch):
    need_triton()
    import cnf_kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"^--backend triton: the Triton kernels need a CUDA GPU"):
        resolve_backend("triton", "cpu")
    monkeypatch.setattr(cnf_kernels, "triton", None)
    with pytest.raises(ValueError, match=r"^--backend triton: triton is not installed"):
        resolve_backend("triton", "cpu")
    if torch.cuda.is_available():
        backend, note = resolve_backend("auto", "cuda")
        assert backend == "torch" and "triton is not installed" in note


def test_kernels_compile_for_hopper():
    """The interpreter does not type-check like the compiler: compile every kernel variant
    to a cubin for sm_90 (H100/H200), which needs no GPU, at the standard width and at a
    masked one (width 100) with padded parameter rows. In a subprocess, since the test
    process has the kernels decorated for the interpreter: one (it starts cold), running the
    command line of ``python -m tools.kernel_report`` for both."""
    need_triton()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    both = ("from tools import kernel_report as k; k.main(['--compile', '90']); print('=' * 8, flush=True); "
            "k.main(['--compile', '90', '--width', '100', '--pad-rows'])")
    proc = subprocess.run([sys.executable, "-c", both], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    standard, masked = proc.stdout.split("=" * 8 + "\n")
    for out, mask_w in ((standard, 0), (masked, 12)):
        assert out.count("cubin") == 12 and out.count("'MASK_W': True") == mask_w, proc.stdout


# --- cnf.py with the fused backend -------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_cnf_runs_with_triton_backend(tmp_path, monkeypatch, precision, small_figure_grids):
    """A whole tiny run on the fused kernels (training, validation, sampling, density.npz, frames
    and GIF); without a GPU, in the interpreter (in this process, with small figure grids). The
    float32 run is then resumed: the self-test (a compile on a GPU) runs once, with the checkpoint's
    width, not also with the command line's defaults."""
    need_triton(interpreted=True)
    import cnf
    import model
    from test_cnf import check_complete, run_inprocess

    device = ["--device", "cuda"] if torch.cuda.is_available() else ["--device", "cpu"]
    code, folder = run_inprocess(tmp_path, "--backend", "triton", "--precision", precision, *device)
    assert code == 0
    check_complete(folder)
    import experiment as ex

    run = ex.RunDir(folder)
    assert ex.read_args(run.file("args.csv"))["backend"] == "triton"
    log = open(run.log).read()
    assert "backend triton" in log
    if precision == "float16":
        assert "scalers: dynamic" in log
        return
    widths = []
    real = model.fused_self_test
    monkeypatch.setattr(model, "fused_self_test", lambda dev, **kw: widths.append(kw["width"]) or real(dev, **kw))
    assert cnf.main(["--resume", folder, "--niters", "6", "--backend", "triton", "--no-figures", *device]) == 0
    assert widths == [8]  # TINY's width, from the checkpoint; once


def test_cnf_backend_bad_input_and_auto(tmp_path, monkeypatch, capsys):
    need_triton()
    import cnf
    from test_cnf import TINY, run_inprocess

    # flags the fused path cannot take are refused whatever runs the kernels; without a GPU and without the
    # interpreter, --backend triton is too (in this process: the flags and TRITON_INTERPRET are read when
    # the backend is resolved, before anything runs)
    bad = [["--backend", "triton", "--trace", "autograd"], ["--backend", "cuda"],
           ["--backend", "triton", "--trace", "hutchinson"], ["--backend", "triton", "--odeint", "torchdiffeq"]]
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        bad.append(["--backend", "triton"])
    for args in bad:
        with pytest.raises(SystemExit) as e:
            cnf.main([*TINY, *args, "--results_dir", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("cnf.py: error: ") and err.count("\n") == 1, (args, err)
        assert not (tmp_path / "bad").exists()
    if not torch.cuda.is_available():  # auto on the CPU is the torch backend, recorded as such
        code, folder = run_inprocess(tmp_path / "auto", "--no-figures")
        assert code == 0
        import experiment as ex

        assert ex.read_args(os.path.join(folder, "args.csv"))["backend"] == "torch"


def test_a_method_the_kernels_do_not_fuse_is_said_not_crashed():
    """The fused kernels implement classical rk4 and euler: --backend triton with midpoint or
    rk4_38 is one line naming the method, and auto takes the torch path and says why (on a GPU,
    before a self-test that would fail on the tableau)."""
    need_triton()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for method in ("midpoint", "rk4_38"):
        with pytest.raises(ValueError, match=rf"^--backend triton: it fuses euler, classical rk4, not --method {method}$"):
            resolve_backend("triton", device, method=method, probe=dict(width=6, method=method))
        if device == "cuda":
            backend, note = resolve_backend("auto", device, method=method, probe=dict(width=6, method=method))
            assert backend == "torch" and f"not --method {method}" in note
