"""The divergence term of the hypernetwork CNF, exact and in closed form.

The field is f(x) = (1/w) * sum_j U_j * tanh(W_j^T x + B_j), so its Jacobian
trace is exactly

    tr(df/dx) = (1/w) * sum_j (1 - tanh^2(W_j^T x + B_j)) * (U_j . W_j).

``hyper_trace`` computes that value; it is *not* a stochastic (Hutchinson)
estimate. ``trace_autograd`` (exact, one backward pass per dimension) and
``trace_hutchinson`` (unbiased stochastic estimate) are references for general
vector fields.

``hyper_field_trace`` computes the field and its trace from one shared [n, w]
pre-activation (in the ``fused_params`` layout), and ``hyper_field_trace_vjp``
is its hand-derived vector-Jacobian product, used by the solver's fast
backward pass.
"""
import contextlib

import torch


def _check_shapes(W, B, U, x):
    if x.dim() != 2 or W.dim() != 3 or B.dim() != 3 or U.dim() != 3:
        raise ValueError(
            f"expected W [w,d,1], B [w,1,1], U [w,1,d], x [n,d]; got W {tuple(W.shape)}, "
            f"B {tuple(B.shape)}, U {tuple(U.shape)}, x {tuple(x.shape)}"
        )
    w, d = W.shape[0], x.shape[1]
    if tuple(W.shape) != (w, d, 1) or tuple(B.shape) != (w, 1, 1) or tuple(U.shape) != (w, 1, d):
        raise ValueError(
            f"inconsistent shapes: W {tuple(W.shape)}, B {tuple(B.shape)}, U {tuple(U.shape)}, "
            f"x {tuple(x.shape)}; expected W [{w},{d},1], B [{w},1,1], U [{w},1,{d}]"
        )


def _acc_dtype(dtype):
    """Accumulation dtype: float32, or float64 when the inputs are float64."""
    return torch.promote_types(dtype, torch.float32)


def fused_params(W, B, U):
    """Per-time parameters in the layout the fused kernels want.

    Uses tanh(a) = 2*sigmoid(2a) - 1 (sigmoid is several times cheaper than tanh
    on CPUs) and puts the skinny dimension d first in every matrix product.

    Args: W [S,w,d], B [S,w], U [S,w,d] (U already gated).
    Returns (W2T [S,d,w] = 2W^T, B2 [S,w] = 2B, Uw2T [S,d,w] = (2/w) U^T,
    ub [S,d,1] = -(1/w) sum_j U_j, c4 [S,w] = (4/w) U_j . W_j).
    """
    w = W.shape[1]
    W2T = (2 * W).transpose(1, 2).contiguous()
    Uw2T = ((2.0 / w) * U).transpose(1, 2).contiguous()
    ub = -(U.sum(1, keepdim=True) / w).transpose(1, 2)
    c4 = (4.0 / w) * (U * W).sum(-1)
    return W2T, 2 * B, Uw2T, ub, c4


# Small-K products in float16 on a CPU. Without float16 arithmetic (no AVX512-FP16 or
# AMX-FP16), torch's float16 matrix product is a scalar loop: the [n, 2] @ [2, w] product of
# the activations takes 16x the float32 time (394 against 25 us for n=1024, w=128), and it is
# most of what float16 costs over float32. That loop forms each product of two float16 numbers
# in float32 (exact: 11 x 11 significant bits fit in 24), sums them from zero in order of k,
# adds the bias, and rounds the sum to float16 once. ``small_k_mm`` does the same in float32
# tensor operations, so every rounding is the one torch's product makes; ``_small_k_exact``
# checks that on this machine, once, and otherwise the product stays torch's own.
_SMALL_K = 3
_small_k_checked = {}
_small_k_native = [False]  # set by ``native_products`` only


@contextlib.contextmanager
def native_products():
    """Within: ``small_k_mm`` is torch's own product everywhere (``bench.py PATH+native_mm``
    times what the emulation saves; the results are the same bits)."""
    before = _small_k_native[0]
    _small_k_native[0] = True
    try:
        yield
    finally:
        _small_k_native[0] = before


def _small_k_emulated(bias, a, b):
    """bias + a @ b for float16 a [n,K], b [K,m], bias broadcastable to [n,m] or None: the
    products exact in float32, summed from +0 in order of k, the bias added last, one rounding."""
    af, bf = a.float(), b.float()
    acc = af[:, :1] * bf[:1]  # (a broadcast multiply: torch.addcmul broadcasts several times slower)
    for k in range(1, a.shape[1]):
        acc = acc.add_(af[:, k : k + 1] * bf[k : k + 1])
    acc = acc.add_(0.0)  # the sum starts from +0: a sum of -0 products is +0
    if bias is not None:
        acc = acc.add_(bias.float())
    return acc.to(a.dtype)


def _small_k_exact(device):
    """Whether ``_small_k_emulated`` gives torch's float16 product bit for bit on this device
    (finite values of every magnitude, subnormals, signed zeros, infinities and NaNs)."""
    key = str(device)
    if key not in _small_k_checked:
        g = torch.Generator().manual_seed(0)
        special = torch.tensor([0.0, -0.0, 65504.0, -65504.0, 6e-8, -6e-8, 1e-5, float("inf"), float("-inf"), float("nan")])
        ok = True
        with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
            for K in range(1, _SMALL_K + 1):
                a = torch.randn(257, K, generator=g) * 10.0 ** torch.randint(-6, 5, (257, K), generator=g)
                b = torch.randn(K, 67, generator=g) * 10.0 ** torch.randint(-6, 5, (K, 67), generator=g)
                a[:40] = special[torch.randint(0, len(special), (40, K), generator=g)]
                b[:, :12] = special[torch.randint(0, len(special), (K, 12), generator=g)]
                bias = torch.randn(67, generator=g) * 100
                bias[:4] = torch.tensor([-0.0, float("nan"), 65504.0, -6e-8])
                a, b, bias = (x.to(device=device, dtype=torch.float16) for x in (a, b, bias))
                for c in (None, bias):
                    ref = torch.mm(a, b) if c is None else torch.addmm(c, a, b)
                    got = _small_k_emulated(c, a, b)
                    nan = ref.isnan()
                    ok = ok and torch.equal(nan, got.isnan()) and torch.equal(
                        ref.view(torch.int16)[~nan], got.view(torch.int16)[~nan])
        _small_k_checked[key] = ok
    return _small_k_checked[key]


class _SmallKMM(torch.autograd.Function):
    """The emulated product, with the backward that torch's addmm and mm have (the same
    products, the same layouts; the bias's gradient summed by autograd as for addmm)."""

    @staticmethod
    def forward(ctx, bias, a, b):
        ctx.save_for_backward(a, b)
        with torch.autocast(a.device.type, enabled=False):
            return _small_k_emulated(bias, a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        ga = gb = None
        if ctx.needs_input_grad[1]:  # torch's mm_mat1_backward
            col = a.stride(0) == 1 and a.stride(1) == a.shape[0]
            ga = b.mm(grad.t()).t() if col else grad.mm(b.t())
        if ctx.needs_input_grad[2]:  # torch's mm_mat2_backward
            col = b.stride(0) == 1 and b.stride(1) == b.shape[0]
            gb = grad.t().mm(a).t() if col else a.t().mm(grad)
        return (grad if ctx.needs_input_grad[0] else None), ga, gb


def small_k_mm(a, b, bias=None):
    """``torch.addmm(bias, a, b)`` (``torch.mm(a, b)`` without a bias), with the same
    roundings and gradients; faster where that is a float16 product on a CPU with K ≤ 3
    (see ``_small_k_emulated``). Under autocast the inputs are cast as autocast casts them."""
    dev = a.device.type
    ts = (a, b) if bias is None else (bias, a, b)
    if dev == "cpu" and a.dim() == 2 and b.dim() == 2 and a.shape[1] <= _SMALL_K and not _small_k_native[0]:
        if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.float16:
            if all(x.dtype in (torch.float32, torch.float16, torch.bfloat16) for x in ts):
                ts = tuple(x.to(torch.float16) for x in ts)
        if all(x.dtype == torch.float16 for x in ts) and _small_k_exact(a.device):
            return _SmallKMM.apply(None, *ts) if bias is None else _SmallKMM.apply(*ts)
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


def _activations(W2T, B2, z):
    """s = sigmoid(2a) [n,w] and terms = s(1-s) = (1 - tanh(a)^2) / 4 [n,w]."""
    s = torch.sigmoid(small_k_mm(z, W2T, B2))
    return s, torch.addcmul(s, s, s, value=-1)


def _width_sum(terms, c4):
    """sum_j terms_j c4_j [n, 1]: terms in their own dtype, accumulated in float32
    (float64 for float64); a single matrix-vector product when already that wide."""
    acc = _acc_dtype(terms.dtype)
    if terms.dtype == acc:
        return torch.mv(terms, c4.to(acc)).unsqueeze(1)
    return (terms * c4.to(terms.dtype)).sum(1, keepdim=True, dtype=acc)


def hyper_field(p, z):
    """The field alone, f [n,d], from ``fused_params`` row ``p``."""
    W2T, B2, Uw2T, ub, _ = p
    return torch.addmm(ub, Uw2T, torch.sigmoid(torch.addmm(B2, z, W2T)).t()).t()


def hyper_field_trace(p, z):
    """Field and exact trace from one pre-activation, for one ``fused_params`` row.

    Returns f [n,d] (compute dtype: the autocast dtype if active), tr [n,1]
    (terms in the compute dtype, summed over the width in float32; float64 for
    float64), and (s, terms) for ``hyper_field_trace_vjp``.
    """
    W2T, B2, Uw2T, ub, c4 = p
    s, terms = _activations(W2T, B2, z)  # [n, w] each
    f = torch.addmm(ub, Uw2T, s.t()).t()  # [n, d]: a [d, n] product, viewed transposed
    return f, _width_sum(terms, c4), (s, terms)


def hyper_field_trace_vjp(p, z, saved, gf, gtr, gterms=None):
    """Hand-derived VJP of ``hyper_field_trace`` for cotangents gf [n,d] of f and
    gtr [n,1] of tr (and ``gterms`` [n,w] of the saved ``terms``, which the
    regularizers read). Runs in the activations' dtype (the low precision under
    autocast); the width reductions for B2 and c4 accumulate in float32.

    Returns (gz [n,d], (gW2T, gB2, gUw2T, gub, gc4)) shaped like ``p``.
    """
    W2T, B2, Uw2T, ub, c4 = p
    s, terms = saved
    dt = s.dtype
    gf, gtr = gf.to(dt), gtr.to(dt)
    O = gtr * c4.to(dt)  # [n, w]: the cotangent of terms from tr
    # d/ds: f gives gf Uw2T, tr gives gtr c4 (1 - 2s); both linear parts in one product
    gs = small_k_mm(torch.cat([gf, gtr], 1), torch.cat([Uw2T, c4[None]], 0).to(dt))  # [n, w]
    if gterms is not None:  # terms = s(1 - s): d/ds = 1 - 2s, like tr's part
        O = O + gterms.to(dt)
        gs = gs + gterms.to(dt)
    ga = torch.addcmul(gs, s, O, value=-2) * terms  # [n, w], sigmoid' = s(1-s)
    gz = torch.mm(W2T.to(dt), ga.t()).t()  # [n, d]
    acc = _acc_dtype(dt)
    grads = (
        torch.mm(z.to(dt).t(), ga),  # gW2T [d, w]
        ga.sum(0, dtype=acc),  # gB2 [w]
        torch.mm(gf.t(), s),  # gUw2T [d, w]
        gf.sum(0, dtype=acc).unsqueeze(1),  # gub [d, 1]
        torch.mm(gtr.t(), terms)[0],  # gc4 [w]
    )
    return gz, grads


def jacobian_basis(p):
    """K [w, d*d] with K[j, a*d + b] = Uw2T[a,j] W2T[b,j] = U_j[a] W_j[b] * 4/w, for one
    ``fused_params`` row: the Jacobian of the field is J = terms @ K (terms = (1 - tanh^2)/4)."""
    W2T, _, Uw2T, _, _ = p
    d, w = W2T.shape
    return (Uw2T.t()[:, :, None] * W2T.t()[:, None, :]).reshape(w, d * d)


def hyper_regularizers(p, f, terms):
    """The integrands of the kinetic and Jacobian penalties (Finlay et al. 2020), exactly:
    ||f||^2 [n,1] and ||df/dz||_F^2 [n,1], with

        df/dz = (1/w) sum_j (1 - tanh^2(a_j)) U_j W_j^T = terms @ K  (see ``jacobian_basis``).

    Both accumulate in float32 (float64 for float64) from the compute dtype's f and
    terms. Returns (kinetic, jacobian, J [n, d*d]) for ``hyper_regularizers_vjp``."""
    acc = _acc_dtype(terms.dtype)
    with torch.autocast(terms.device.type, enabled=False):  # autocast would round the products to low
        J = torch.mm(terms.to(acc), jacobian_basis(p).to(acc))  # [n, d*d]
        fa = f.to(acc)
        return (fa * fa).sum(1, keepdim=True), (J * J).sum(1, keepdim=True), J


def hyper_regularizers_vjp(p, z, saved, f, J, gf, gtr, gkin, gjac):
    """VJP of ``hyper_field_trace`` and ``hyper_regularizers`` together, for cotangents
    gf [n,d], gtr [n,1], gkin [n,1] (of ||f||^2) and gjac [n,1] (of ||J||_F^2).

    ||f||^2 adds 2 gkin f to f's cotangent; ||J||^2 = |terms @ K|^2 gives GJ = 2 gjac J,
    the cotangent GJ K^T of terms (handed to ``hyper_field_trace_vjp``), and terms^T GJ
    of K, which flows to Uw2T and W2T through K's outer products. Returns (gz, grads) like
    ``hyper_field_trace_vjp``; the K part of the grads in float32 (float64 for float64).
    """
    W2T, _, Uw2T, _, _ = p
    s, terms = saved
    acc = _acc_dtype(terms.dtype)
    d, w = W2T.shape
    with torch.autocast(terms.device.type, enabled=False):
        gf = gf.to(acc) + 2 * gkin.to(acc) * f.to(acc)
        GJ = 2 * gjac.to(acc) * J  # [n, d*d]
        K = jacobian_basis(p).to(acc)
        gterms = torch.mm(GJ, K.t())  # [n, w]
        gK = torch.mm(terms.to(acc).t(), GJ).reshape(w, d, d)  # [w, a, b]
        gUw2T_K = torch.einsum("jab,bj->aj", gK, W2T.to(acc))
        gW2T_K = torch.einsum("jab,aj->bj", gK, Uw2T.to(acc))
    gz, (gW2T, gB2, gUw2T, gub, gc4) = hyper_field_trace_vjp(p, z, saved, gf, gtr, gterms)
    return gz, (gW2T + gW2T_K, gB2, gUw2T + gUw2T_K, gub, gc4)


def hyper_trace(W, B, U, x, target_dtype=torch.float32):
    """Exact Jacobian trace of f(x) = (1/w) sum_j U_j tanh(W_j^T x + B_j).

    Shapes follow the torchdiffeq hypernetwork: W [w,d,1], B [w,1,1],
    U [w,1,d], x [n,d]. The terms are computed in ``target_dtype`` (float16,
    bfloat16, float32 or float64) whatever the ambient autocast state, and
    summed over the width in float32 (float64 for float64), so wide layers
    neither overflow nor drop small terms. Differentiable in W, B, U and x.

    Returns:
        [n, 1] tensor, float32 (float64 when ``target_dtype`` is float64).
    """
    _check_shapes(W, B, U, x)
    w, d = W.shape[0], x.shape[1]
    with torch.autocast(x.device.type, enabled=False):
        W2T, B2, _, _, c4 = fused_params(
            *(a.to(target_dtype) for a in (W.reshape(1, w, d), B.reshape(1, w), U.reshape(1, w, d)))
        )
        _, terms = _activations(W2T[0], B2[0], x.to(target_dtype))
        return _width_sum(terms, c4[0])


def trace_autograd(f, z):
    """Exact trace of df/dz by autograd: one backward pass per dimension.

    ``f`` [n, d] must have been computed from ``z`` [n, d] with grad enabled.
    The graph is kept (create_graph=True) so the result is differentiable.
    Returns [n, 1] in float32 (float64 for float64 inputs).
    """
    tr = torch.zeros(z.shape[0], 1, dtype=_acc_dtype(f.dtype), device=z.device)
    for i in range(z.shape[1]):
        g = torch.autograd.grad(f[:, i].sum(), z, create_graph=True)[0]
        tr = tr + g[:, i : i + 1].to(tr.dtype)
    return tr


def trace_hutchinson(f, z, noise):
    """Unbiased stochastic estimate of tr(df/dz): E[noise^T (df/dz) noise].

    ``noise`` [n, d] must have zero mean and identity covariance (Rademacher or
    Gaussian, see ``sample_noise``). One backward pass; differentiable.
    Returns [n, 1] in float32 (float64 for float64 inputs).
    """
    vjp = torch.autograd.grad(f, z, noise.to(f.dtype), create_graph=True)[0]
    return (vjp * noise).sum(1, keepdim=True, dtype=_acc_dtype(f.dtype))


def sample_noise(like, kind="rademacher", generator=None):
    """Noise for ``trace_hutchinson`` with the shape, dtype and device of ``like``."""
    dev = generator.device if generator is not None else like.device  # draw where the generator lives
    if kind == "rademacher":
        return (2 * torch.randint(0, 2, like.shape, generator=generator, device=dev) - 1).to(like)
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, device=dev).to(like)
    raise ValueError(f"unknown noise {kind!r}; choose one of: rademacher, gaussian")
