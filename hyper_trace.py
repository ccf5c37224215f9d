"""The divergence term of the hypernetwork CNF, exact and in closed form.

The field is f(x) = (1/w) * sum_j U_j * tanh(W_j^T x + B_j), so its Jacobian
trace is exactly

    tr(df/dx) = (1/w) * sum_j (1 - tanh^2(W_j^T x + B_j)) * (U_j . W_j).

``hyper_trace`` computes that value; it is *not* a stochastic (Hutchinson)
estimate. ``trace_autograd`` (exact, one backward pass per dimension) and
``trace_hutchinson`` (unbiased stochastic estimate) are references for general
vector fields.

``hyper_field_trace`` computes the field and its trace from one shared [n, w]
pre-activation, and ``hyper_field_trace_vjp`` is its hand-derived
vector-Jacobian product, used by the solver's fast backward pass.
"""
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


def hyper_field_trace(W, B, Uw, c, z):
    """Field and exact trace of the hypernetwork layer from one pre-activation.

    Args:
        W: [w, d] input weights.  B: [w] biases.
        Uw: [w, d] output weights already divided by the width w.
        c: [w] per-unit coefficients U_j . W_j (not divided by w).
        z: [n, d] points.

    Returns:
        f: [n, d] field, in the compute dtype (the autocast dtype if active).
        tr: [n, 1] exact trace; terms in the compute dtype, summed over the
            width in float32 (float64 for float64 inputs).
        h: [n, w] tanh activations, for ``hyper_field_trace_vjp``.
    """
    h = torch.tanh(torch.addmm(B, z, W.t()))  # [n, w]
    return torch.mm(h, Uw), _trace_from_activations(h, c), h  # f [n, d]


def _trace_from_activations(h, c):
    """(1/w) sum_j (1 - h_j^2) c_j: terms in h's dtype, the width-sum in float32."""
    terms = (1 - h * h) * c.to(h.dtype)  # [n, w]
    return terms.sum(1, keepdim=True, dtype=_acc_dtype(h.dtype)) / h.shape[1]  # [n, 1]


def hyper_field_trace_vjp(W, Uw, c, z, h, gf, gtr):
    """Hand-derived VJP of ``hyper_field_trace`` for cotangents ``gf`` [n,d] of f and
    ``gtr`` [n,1] of tr. Runs in the activations' dtype (the low precision under
    autocast); the width reductions for B and c accumulate in float32.

    Returns (gz [n,d], gW [w,d], gB [w], gUw [w,d], gc [w]).
    """
    w = W.shape[0]
    dt = h.dtype
    gf, gtr = gf.to(dt), gtr.to(dt)
    s = 1 - h * h  # [n, w] tanh'
    # d tr / d h = -2 h c / w ; d f / d h = Uw^T
    gh = torch.mm(gf, Uw.t().to(dt)) - (2.0 / w) * (h * gtr) * c.to(dt)  # [n, w]
    gpre = gh * s  # [n, w]
    gz = torch.mm(gpre, W.to(dt))  # [n, d]
    gW = torch.mm(gpre.t(), z.to(dt))  # [w, d]
    acc = _acc_dtype(dt)
    gB = gpre.sum(0, dtype=acc)  # [w]
    gUw = torch.mm(h.t(), gf)  # [w, d]
    gc = (s * gtr).sum(0, dtype=acc) / w  # [w]
    return gz, gW, gB, gUw, gc


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
        W2 = W.reshape(w, d).to(target_dtype)
        U2 = U.reshape(w, d).to(target_dtype)
        c = (U2 * W2).sum(1)  # [w], the d-sum is tiny (d = 2 here)
        h = torch.tanh(torch.addmm(B.reshape(w).to(target_dtype), x.to(target_dtype), W2.t()))  # [n, w]
        return _trace_from_activations(h, c)


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
    if kind == "rademacher":
        r = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
        return (2 * r - 1).to(like.dtype)
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    raise ValueError(f"unknown noise {kind!r}; choose one of: rademacher, gaussian")
