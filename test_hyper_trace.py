"""Tests for hyper_trace.py. Run ``pytest test_hyper_trace.py -v`` or
``python test_hyper_trace.py`` for a readable report with a benchmark."""
import contextlib
import math
import time

import pytest
import torch

import hyper_trace as ht
from torch.utils.flop_counter import FlopCounterMode

from hyper_trace import (
    fused_params,
    hyper_field_trace,
    hyper_field_trace_vjp,
    hyper_trace,
    sample_noise,
    trace_autograd,
    trace_hutchinson,
)


def make(n, d, w, dtype=torch.float64, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(w, d, 1, generator=g, dtype=dtype) * scale
    B = torch.randn(w, 1, 1, generator=g, dtype=dtype) * scale
    U = torch.randn(w, 1, d, generator=g, dtype=dtype)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    return W, B, U, x


def example_field(W, B, U, x):
    """The field as the original torchdiffeq CNF example writes it: x repeated
    over the width, then batched matmuls on [w, n, d] tensors. Returns [n, d]."""
    w = W.shape[0]
    Z = x.unsqueeze(0).repeat(w, 1, 1)  # [w, n, d]
    h = torch.tanh(torch.bmm(Z, W) + B)  # [w, n, 1]
    return torch.bmm(h, U).mean(0)


def field(W, B, U, x):
    """The hypernetwork field itself, written the plain way: [n, d]."""
    w, d = W.shape[0], x.shape[1]
    return torch.tanh(x @ W.reshape(w, d).t() + B.reshape(w)) @ U.reshape(w, d) / w


def jacobian_trace(W, B, U, x):
    J = torch.autograd.functional.jacobian(lambda y: field(W, B, U, y), x)  # [n, d, n, d]
    n, d = x.shape
    idx = torch.arange(n)
    return torch.stack([J[idx, k, idx, k] for k in range(d)], 1).sum(1, keepdim=True)


def lowp_bound(W, B, U, x, dtype):
    """Per-sample error bound for hyper_trace in a low precision.

    Rounding W, B, U, x and each operation costs at most u = eps/2 relative.
    The pre-activation a_j = W_j.x + B_j then errs by <= (d+2) u A_j with
    A_j = sum_k |W_jk x_k| + |B_j|; tanh' is bounded by 1 and (1-h^2) by 1, so
    a term (1-h_j^2) c_j errs by <= |c|_j ((d+2) u A_j + 3u) + (d+1) u |c|_j,
    with |c|_j = sum_k |U_jk W_jk|. The float32 sum adds nothing comparable.
    We assert err <= 2 * (1/w) sum_j |c|_j ((d+2) u A_j + (d+4) u) (factor 2 for slack).
    """
    u = torch.finfo(dtype).eps / 2
    w, d = W.shape[0], x.shape[1]
    W2, U2 = W.reshape(w, d), U.reshape(w, d)
    A = x.abs() @ W2.abs().t() + B.reshape(w).abs()  # [n, w]
    cabs = (U2 * W2).abs().sum(1)  # [w]
    return 2 * (cabs * ((d + 2) * u * A + (d + 4) * u)).mean(1, keepdim=True)


SIZES = [(7, 2, 16), (3, 1, 8), (5, 5, 32), (4, 3, 1), (1, 2, 64)]


@pytest.mark.parametrize("n,d,w", SIZES)
def test_matches_jacobian_diagonal_float64(n, d, w):
    W, B, U, x = make(n, d, w)
    tr = hyper_trace(W, B, U, x, torch.float64)
    assert tr.shape == (n, 1) and tr.dtype == torch.float64
    torch.testing.assert_close(tr, jacobian_trace(W, B, U, x), rtol=0, atol=1e-10)


def test_float32_relative_error():
    W, B, U, x = make(256, 2, 128)
    ref = hyper_trace(W, B, U, x, torch.float64)
    tr = hyper_trace(W.float(), B.float(), U.float(), x.float(), torch.float32)
    assert tr.dtype == torch.float32
    rel = ((tr.double() - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-5, rel


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [False, True])
def test_low_precision_within_bound(dtype, autocast):
    W, B, U, x = make(256, 2, 128)
    ref = hyper_trace(W, B, U, x, torch.float64)
    args = [a.float() for a in (W, B, U, x)]
    if autocast:
        with torch.autocast("cpu", dtype=dtype):
            tr = hyper_trace(*args, dtype)
    else:
        tr = hyper_trace(*[a.to(dtype) for a in args], dtype)
    assert tr.dtype == torch.float32 and torch.isfinite(tr).all()
    err = (tr.double() - ref).abs()
    bound = lowp_bound(W, B, U, x, dtype)
    assert (err <= bound).all(), f"max err/bound {(err / bound).max().item():.3f}"
    # it really ran in the low precision: the error is well above float32's
    err32 = (hyper_trace(*args, torch.float32).double() - ref).abs().max()
    assert err.max() > 10 * err32


def test_saturated_tanh_is_finite():
    W, B, U, x = make(16, 2, 32, scale=1e4)
    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        tr = hyper_trace(W.to(dt), B.to(dt), U.to(dt), x.to(dt), dt)
        assert torch.isfinite(tr).all(), dt
    # saturated units contribute (1 - tanh^2) ~ 0
    assert hyper_trace(W, B, U, x, torch.float64).abs().max() < 1e-3


def test_wide_float16_does_not_overflow():
    n, d, w = 8, 2, 4096
    W = torch.full((w, d, 1), 6.0)
    U = torch.full((w, 1, d), 6.0)  # c_j = 72 per unit: the width-sum is ~3e5 > float16 max
    B = torch.zeros(w, 1, 1)
    x = torch.zeros(n, d)
    ref = hyper_trace(W.double(), B.double(), U.double(), x.double(), torch.float64)
    tr = hyper_trace(W.half(), B.half(), U.half(), x.half(), torch.float16)
    assert torch.isfinite(tr).all()
    torch.testing.assert_close(tr.double(), ref, rtol=1e-3, atol=0)
    # the same sum accumulated in float16 would overflow, so the float32 sum matters
    assert torch.isinf(torch.full((w,), 72.0, dtype=torch.float16).sum(dtype=torch.float16))


def test_gradcheck_float64():
    W, B, U, x = make(4, 2, 5)
    inputs = [a.clone().requires_grad_() for a in (W, B, U, x)]
    assert torch.autograd.gradcheck(lambda *a: hyper_trace(*a, torch.float64), inputs)


def test_fused_field_and_trace_float64():
    """The fused kernel (sigmoid form, transposed layout) is the same field and trace."""
    W, B, U, x = make(9, 2, 13)
    w, d = 13, 2
    p = [a[0] for a in fused_params(W.reshape(1, w, d), B.reshape(1, w), U.reshape(1, w, d))]
    f, tr, _ = hyper_field_trace(p, x)
    torch.testing.assert_close(f, field(W, B, U, x), rtol=0, atol=1e-13)
    torch.testing.assert_close(tr, jacobian_trace(W, B, U, x), rtol=0, atol=1e-12)


def test_hand_vjp_matches_autograd_float64():
    n, d, w = 6, 2, 9
    W, B, U, z = make(n, d, w, seed=3)
    g = torch.Generator().manual_seed(4)
    gf, gtr = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64)
    p = [a[0].detach().clone().requires_grad_() for a in fused_params(W.reshape(1, w, d), B.reshape(1, w), U.reshape(1, w, d))]
    zl = z.clone().requires_grad_()
    f, tr, _ = hyper_field_trace(p, zl)
    ref = torch.autograd.grad((f, tr), [zl, *p], (gf, gtr))
    _, _, saved = hyper_field_trace([a.detach() for a in p], z)
    gz, gp = hyper_field_trace_vjp([a.detach() for a in p], z, saved, gf, gtr)
    for got, want in zip((gz, *gp), ref):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_edge_cases():
    W, B, U, x = make(1, 1, 1)
    torch.testing.assert_close(hyper_trace(W, B, U, x, torch.float64), jacobian_trace(W, B, U, x))
    empty = hyper_trace(W, B, U, x[:0], torch.float64)
    assert empty.shape == (0, 1)


def test_bad_shapes_raise():
    W, B, U, x = make(4, 2, 8)
    with pytest.raises(ValueError, match="shapes"):
        hyper_trace(W, B, U, torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected W"):
        hyper_trace(W[:, :, 0], B, U, x)


def test_autograd_reference_is_exact():
    W, B, U, x = make(5, 3, 7)
    z = x.clone().requires_grad_()
    tr = trace_autograd(field(W, B, U, z), z)
    torch.testing.assert_close(tr, hyper_trace(W, B, U, x, torch.float64), rtol=0, atol=1e-12)
    z = x.clone().requires_grad_()
    tr = trace_autograd(example_field(W, B, U, z), z)
    torch.testing.assert_close(tr, hyper_trace(W, B, U, x, torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(kind):
    K = 4000  # noise draws per point
    W, B, U, x = make(3, 2, 16)
    xr = x.repeat_interleave(K, 0).requires_grad_()  # [3K, d], K copies of each point
    noise = sample_noise(xr, kind, torch.Generator().manual_seed(1))
    est = trace_hutchinson(field(W, B, U, xr), xr, noise).reshape(3, K)
    exact = hyper_trace(W, B, U, x, torch.float64)[:, 0]
    se = est.std(1) / math.sqrt(K)
    assert ((est.mean(1) - exact).abs() <= 4 * se).all(), (est.mean(1), exact, se)
    assert (se > 0).all()


@contextlib.contextmanager
def num_threads(n):
    """Run the block with ``torch.set_num_threads(n)``; restore the old value after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def trace_problem(n=1024, d=2, w=128):
    """The two ways to get a differentiable exact trace, forward + backward on the
    same float32 inputs: (closed_form, by_autograd), each a () -> trace function.
    ``by_autograd`` differentiates the field as the original torchdiffeq example
    builds it (``example_field``): that is the method hyper_trace replaces."""
    W, B, U, x = [a.float().requires_grad_() for a in make(n, d, w)]

    def closed_form():
        tr = hyper_trace(W, B, U, x)
        torch.autograd.grad(tr.sum(), (W, B, U, x))
        return tr

    def by_autograd():
        tr = trace_autograd(example_field(W, B, U, x), x)
        torch.autograd.grad(tr.sum(), (W, B, U, x))
        return tr

    return closed_form, by_autograd


def cost(fn):
    """What ``fn`` (forward + backward) costs, counted rather than timed, so that
    a busy machine cannot change it: (bytes saved for backward, matmul FLOPs).
    Saved tensors are counted once per storage; the FLOPs are those of the
    mm/addmm/bmm calls of the forward and the backward pass."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    flops = FlopCounterMode(display=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), flops:
        fn()
    return sum(saved.values()), flops.get_total_flops()


def _bits(t):
    return t.detach().view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("under_autocast", [False, True])
def test_small_k_product_is_torchs_bit_for_bit(K, with_bias, under_autocast):
    """small_k_mm's float16 emulation (CPU) gives torch's addmm/mm bits, forward and
    backward, with NaN, inf, signed zeros, overflow and a partial width (131)."""
    g = torch.Generator().manual_seed(K + 10 * with_bias)
    n, m = 257, 131
    a = torch.randn(n, K, generator=g) * 10.0 ** torch.randint(-4, 3, (n, K), generator=g)
    b = torch.randn(K, m, generator=g) * 10.0 ** torch.randint(-4, 3, (K, m), generator=g)
    bias = torch.randn(m, generator=g) * 50
    a[:6, 0] = torch.tensor([float("nan"), float("inf"), -0.0, 65504.0, -65504.0, 6e-8])
    a[2] = -0.0  # row 2, column 0: products of -0 whose sum is +0 (the sum starts from +0)
    b[:, 0] = 1.0
    bias[:3] = torch.tensor([-0.0, -1.0, 70000.0])
    # row 6, column 1: 1 + 2^-24 rounds to 1 before the bias -1 is added: 0, not 2^-24
    a[6], b[:, 1] = 0.0, 0.0
    a[6, 0], b[0, 1] = 1.0, 1.0
    if K > 1:
        a[6, 1], b[1, 1] = 2.0**-12, 2.0**-12
    if not under_autocast:
        a, b, bias = a.half(), b.half(), bias.half()
    gout = (torch.randn(n, m, generator=g) * 10).half()
    outs, grads = [], []
    for use_torch in (True, False):
        xs = [x.clone().requires_grad_() for x in (a, b, bias)]
        ctx = torch.autocast("cpu", dtype=torch.float16) if under_autocast else contextlib.nullcontext()
        with ctx, (ht.native_products() if use_torch else contextlib.nullcontext()):
            y = ht.small_k_mm(xs[0], xs[1], xs[2] if with_bias else None)
        # the emulation ran (a failed check against torch's product would fall back to it)
        assert use_torch == (type(y.grad_fn).__name__ != "_SmallKMMBackward")
        y.backward(gout)
        outs.append(y)
        grads.append([x.grad for x in xs])
    assert outs[0].dtype == outs[1].dtype == torch.float16
    assert torch.equal(outs[0].isnan(), outs[1].isnan()) and outs[0].isnan().any()
    assert torch.equal(_bits(outs[0]).masked_fill(outs[0].isnan(), 0), _bits(outs[1]).masked_fill(outs[1].isnan(), 0))
    assert outs[0].isinf().any()  # the overflow and the inf reach the output
    for g0, g1 in zip(*grads):
        assert (g0 is None) == (g1 is None)
        if g0 is not None:
            assert torch.equal(g0.isnan(), g1.isnan())
            assert torch.equal(_bits(g0).masked_fill(g0.isnan(), 0), _bits(g1).masked_fill(g1.isnan(), 0))


def test_small_k_product_is_checked_before_use(monkeypatch):
    """The emulation runs only where its check against torch's product passed on this
    device; otherwise (a failed check) torch's own product runs."""
    assert ht._small_k_exact("cpu")
    a, b = torch.randn(8, 2).half(), torch.randn(2, 5).half()
    with torch.enable_grad():
        y = ht.small_k_mm(a.requires_grad_(), b)
    assert type(y.grad_fn).__name__ == "_SmallKMMBackward"
    monkeypatch.setitem(ht._small_k_checked, "cpu", False)
    with torch.enable_grad():
        y = ht.small_k_mm(a, b)
    assert type(y.grad_fn).__name__ == "MmBackward0"
    # float32, bfloat16 and K > 3 never take it
    for x, w in ((a.float(), b.float()), (a.bfloat16(), b.bfloat16()), (torch.randn(8, 4).half(), torch.randn(4, 5).half())):
        monkeypatch.setitem(ht._small_k_checked, "cpu", True)
        assert type(ht.small_k_mm(x.requires_grad_(), w).grad_fn).__name__ == "MmBackward0"


@pytest.mark.parametrize("odeint", ["torchmpnode", "torchdiffeq"])
def test_float16_training_is_unchanged_by_the_emulation(odeint):
    """A few float16 training iterations (its scaler, the regularizers' states, a partial
    width) give the same losses and parameters bit for bit with torch's own products."""
    from model import CNF, Integrator, nll_and_penalties
    from precision import Precision, Scalers

    results = []
    for use_torch in (True, False):
        torch.manual_seed(0)
        cnf = CNF(2, 8, 19)
        prec = Precision("float16", "cpu")
        scalers = Scalers(odeint, prec, "cpu")
        integ = Integrator(odeint, "rk4", 5, loss_scaler=scalers.solver_scaler)
        opt = torch.optim.Adam(cnf.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        losses = []
        with ht.native_products() if use_torch else contextlib.nullcontext():
            for _ in range(3):
                x = torch.randn(37, 2, generator=g) * 2
                with prec.autocast():
                    nll, pen = nll_and_penalties(cnf, x, integ)
                    loss = nll + 0.01 * pen.sum()
                opt.zero_grad()
                scalers.grad.scale(loss).backward()
                scalers.grad.step(opt)
                scalers.grad.update()
                losses.append(loss.item())
        results.append((losses, [p.detach().clone() for p in cnf.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(p, q) for p, q in zip(results[0][1], results[1][1]))


def test_closed_form_is_cheaper_than_autograd():
    """The closed form saves at least 3x fewer bytes for backward and does at least
    3x fewer matmul FLOPs than trace_autograd on the example's field (measured:
    1.0 against 5.5 MB, 1.6 against 7.3 MFLOP). Counted, not timed: the wall-clock
    ratio is in docs/benchmarks.md and ``python test_hyper_trace.py``; on a loaded
    machine it can flip, these counts cannot."""
    closed_form, by_autograd = trace_problem()
    (b_exact, f_exact), (b_auto, f_auto) = cost(closed_form), cost(by_autograd)
    print(f"saved for backward: hyper_trace {b_exact / 2**20:.2f} MB, trace_autograd {b_auto / 2**20:.2f} MB; "
          f"matmul: {f_exact / 1e6:.2f} against {f_auto / 1e6:.2f} MFLOP")
    assert b_exact > 0 and f_exact > 0, "the counters saw nothing"
    assert b_auto >= 3 * b_exact, (b_exact, b_auto)
    assert f_auto >= 3 * f_exact, (f_exact, f_auto)


def test_cost_counts_what_runs():
    """The counter sees the work: twice the batch saves and computes about twice as much."""
    small, big = cost(trace_problem(n=256)[0]), cost(trace_problem(n=512)[0])
    assert 1.5 * small[0] < big[0] < 2.5 * small[0], (small, big)
    assert 1.5 * small[1] < big[1] < 2.5 * small[1], (small, big)


def benchmark(n=1024, d=2, w=128, reps=20, threads=None):
    """Best-of-``reps`` seconds of (closed form, autograd), forward + backward.
    The two run alternately (ABAB...) so that background load hits both alike;
    ``threads`` sets torch's thread count for the measurement."""
    closed_form, by_autograd = trace_problem(n, d, w)
    best = [float("inf"), float("inf")]
    with num_threads(threads or torch.get_num_threads()):
        closed_form(), by_autograd()  # warm-up
        for _ in range(reps):
            for i, fn in enumerate((closed_form, by_autograd)):
                t0 = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - t0)
    return tuple(best)


if __name__ == "__main__":
    import sys

    print("hyper_trace test report")
    print("=" * 60)
    tests = [(k, v) for k, v in sorted(globals().items()) if k.startswith("test_") and callable(v)]
    failed = 0
    for name, fn in tests:
        marks = getattr(fn, "pytestmark", [])
        cases = [{}]
        for m in marks:  # expand parametrize marks into keyword cases
            if m.name == "parametrize":
                names = [s.strip() for s in m.args[0].split(",")]
                vals = [v if len(names) > 1 else (v,) for v in m.args[1]]
                cases = [{**c, **dict(zip(names, v))} for c in cases for v in vals]
        for case in cases:
            label = name + (str(sorted(case.items())) if case else "")
            try:
                fn(**case)
                print(f"PASS  {label}")
            except Exception as e:  # report and continue
                failed += 1
                print(f"FAIL  {label}: {type(e).__name__}: {e}")
    print()
    print("Cost and speed (n=1024, w=128, d=2, forward+backward)")
    print("-" * 60)
    (b_exact, f_exact), (b_auto, f_auto) = (cost(fn) for fn in trace_problem())
    print(f"saved for backward: hyper_trace {b_exact / 2**20:6.2f} MB, trace_autograd {b_auto / 2**20:6.2f} MB")
    print(f"matmul FLOPs:       hyper_trace {f_exact / 1e6:6.2f} M,  trace_autograd {f_auto / 1e6:6.2f} M")
    for threads in (torch.get_num_threads(), 1):
        t_exact, t_auto = benchmark(threads=threads)
        print(f"{threads} thread(s), best of 20, interleaved: hyper_trace {t_exact * 1e3:.2f} ms, "
              f"trace_autograd (torchdiffeq example's field) {t_auto * 1e3:.2f} ms, {t_auto / t_exact:.1f}x")
    print()
    print(f"{len(tests)} test functions, {failed} failed case(s)")
    sys.exit(1 if failed else 0)
