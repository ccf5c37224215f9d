"""The autograd Function behind ``torchmpnode.odeint``.

Forward: a fixed-grid solve with no autograd graph; only the states are kept.
Backward (discretize-then-optimize): walk the grid backwards, recompute each
step at its saved state under the same autocast, and take the step's
vector-Jacobian product, optionally on a dynamically scaled adjoint.
"""
import math
import weakref
from typing import NamedTuple, Optional, Tuple

import torch

from ._host import host_read
from .methods import Tableau, rk_increment


class GridSpec(NamedTuple):
    """What a field's whole-solve hook (``grid_solve`` / ``grid_solve_vjp``) is told
    about the grid. ``rows[i][k]`` is the row of ``grid_params`` that stage k of
    step i reads; ``low_dtype`` is the autocast dtype, or None without autocast."""

    method: str
    tab: Tableau
    h: Tuple[float, ...]  # step sizes, in double
    rows: Tuple[Tuple[int, ...], ...]
    low_dtype: Optional[torch.dtype]
    t_list: Tuple[float, ...]  # the grid times


class GridPlan(NamedTuple):
    """What a solve needs to know about its grid on the host, computed once per grid tensor."""

    t_list: Tuple[float, ...]  # the grid times
    h: Tuple[float, ...]  # step sizes, in double
    stage_times: torch.Tensor  # [t_0, interior stages of step 0, t_1, ..., t_N], on t's device
    rows: Tuple[Tuple[int, ...], ...]  # rows[i][k]: the stage_times index of stage k of step i
    specs: dict  # low dtype -> GridSpec, filled as solves ask


# grid tensor id -> (weak reference, (version, storage address), {method: GridPlan}).
# Reading a device grid's values costs a host sync; a training loop that passes the same
# grid tensor every iteration pays it once. A grid changed in place has a new version
# and gets a new plan. Grids that require grad are never cached.
_PLANS = {}


def grid_plan(t, method, tab):
    """The ``GridPlan`` of grid ``t`` for ``method``; raises ValueError unless t is strictly
    monotonic (one host sync the first time a grid tensor is seen)."""
    if t.requires_grad:  # gradcheck and friends perturb such grids through .data, unseen by _version
        return _make_plan(t.detach(), tab)
    stamp = (t._version, t.data_ptr())
    entry = _PLANS.get(id(t))
    if entry is None or entry[0]() is not t or entry[1] != stamp:
        key = id(t)

        def forget(ref, key=key):
            if _PLANS.get(key, (None,))[0] is ref:
                del _PLANS[key]

        entry = (weakref.ref(t, forget), stamp, {})
        _PLANS[key] = entry
    plans = entry[2]
    if method not in plans:
        plans[method] = _make_plan(t.detach(), tab)
    return plans[method]


def _make_plan(t, tab):
    t_list = tuple(host_read(t))  # the host sync
    h = tuple(b - a for a, b in zip(t_list[:-1], t_list[1:]))
    if not (all(x > 0 for x in h) or all(x < 0 for x in h)):
        raise ValueError("t must be strictly increasing or strictly decreasing")
    # Stage times of every step, laid out as [t_0, interior stages of step 0, t_1, ...,
    # t_N]; rk4 has 2N+1 distinct ones.
    cs = sorted({c for c in tab.c if c not in (0.0, 1.0)})
    m = 1 + len(cs)
    d = t[1:] - t[:-1]
    cols = [t[:-1]] + [t[:-1] + c * d for c in cs]
    stage_times = torch.cat([torch.stack(cols, 1).reshape(-1), t[-1:]])  # [N*m + 1]
    rows = tuple(
        tuple((i + 1) * m if c == 1.0 else i * m + (0 if c == 0.0 else 1 + cs.index(c)) for c in tab.c)
        for i in range(len(h))
    )
    return GridPlan(t_list, h, stage_times, rows, {})


class Problem:
    """Everything about one solve that is not a tensor input of the Function."""

    def __init__(self, func, method, tab, plan, tuple_input, params, scaler, device_type, low_dtype, autocast):
        self.func, self.tab, self.tuple_input = func, tab, tuple_input
        self.params, self.scaler = params, scaler
        self.device_type, self.low_dtype, self.autocast = device_type, low_dtype, autocast
        self.N = len(plan.h)
        self.t_list, self.h, self.stage_times, self.rows = plan.t_list, plan.h, plan.stage_times, plan.rows
        self.grid = callable(getattr(func, "grid_params", None)) and getattr(func, "grid_enabled", False)
        # probe: evaluate the first stage with grad on (generic path); reads_grad: its output
        # required grad although y and t do not, so func reads tensors that are not params
        self.probe, self.reads_grad = False, False
        # a field that solves the whole grid itself (e.g. a fused GPU kernel) says so by
        # grid_solve_enabled; then the forward and the grid backward go through its hooks
        self.fused = self.grid and callable(getattr(func, "grid_solve", None)) and getattr(func, "grid_solve_enabled", False)
        if self.fused:
            low = low_dtype if autocast else None
            if low not in plan.specs:  # one GridSpec object per grid and precision (kernels cache by it)
                plan.specs[low] = GridSpec(method, tab, plan.h, plan.rows, low, plan.t_list)
            self.spec = plan.specs[low]

    def autocast_ctx(self):
        return torch.autocast(self.device_type, dtype=self.low_dtype, enabled=self.autocast)

    def call(self, t, y):
        out = self.func(t, y if self.tuple_input else y[0])
        return tuple(out) if self.tuple_input else (out,)


def solve_forward(pb, y0):
    """The states at every grid time, with no graph. Returns a tuple of [N+1, ...]."""
    if pb.fused:
        with pb.autocast_ctx():
            P = pb.func.grid_params(pb.stage_times)
        return tuple(pb.func.grid_solve(P, y0, pb.spec))
    sol = tuple(torch.empty((pb.N + 1, *y.shape), dtype=y.dtype, device=y.device) for y in y0)
    for s, y in zip(sol, y0):
        s[0].copy_(y)
    y = tuple(s[0] for s in sol)
    with pb.autocast_ctx():
        if pb.grid:
            rows = _unbind_rows(pb.func.grid_params(pb.stage_times))
            field = lambda i: lambda k, Y: pb.func.grid_eval(rows[pb.rows[i][k]], Y)  # noqa: E731
        else:
            times = pb.stage_times.unbind(0)
            field = lambda i: lambda k, Y: (pb.call(times[pb.rows[i][k]], Y), None)  # noqa: E731
        for i in range(pb.N):
            inc = rk_increment(pb.tab, _probing(pb, field(i)) if i == 0 and pb.probe else field(i), pb.h[i], y)
            y = tuple(torch.add(yj, dj, out=s[i + 1]) for yj, dj, s in zip(y, inc, sol))
    return sol


def _probing(pb, field):
    """``field`` with its stage 0 evaluated with grad on, to set ``pb.reads_grad``; the
    stage's value is the same, detached (no extra evaluation)."""

    def f(k, Y):
        if k:
            return field(k, Y)
        with torch.enable_grad():
            K, extra = field(k, Y)
        pb.reads_grad = any(x.requires_grad for x in K)
        return tuple(x.detach() for x in K), extra

    return f


def _unbind_rows(P):
    """[S, ...] tensors -> list over S of tuples of per-row views."""
    return list(zip(*[p.unbind(0) for p in P]))


def _numel_per_sample(y):
    return sum(x[0].numel() if x.dim() > 0 and x.shape[0] > 0 else x.numel() for x in y)


def solve_backward(pb, t, sol, grads, need_t):
    """Adjoint sweep. ``grads``: incoming gradients per output, [N+1, ...] each.

    Returns (grad of each y0 component, grads of the params, grad of t or None).
    """
    if pb.fused and not need_t:
        return _solve_backward_fused(pb, sol, grads)
    a = tuple(g[pb.N].clone() for g in grads)  # the adjoint, in the state dtype
    gparams = [torch.zeros_like(p) for p in pb.params]
    gt = torch.zeros_like(t) if need_t else None
    scaler, per_sample = pb.scaler, _numel_per_sample(a)
    if scaler is not None:
        _anchor(scaler, a, grads, per_sample)
    use_grid = pb.grid and not need_t
    if use_grid:
        with torch.enable_grad(), pb.autocast_ctx():
            P = pb.func.grid_params(pb.stage_times)  # graph to the params, built once per sweep
        dP = [torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device) for p in P]
        dP_rows = _unbind_rows(dP)
        P_rows = _unbind_rows([p.detach() for p in P])
    for i in range(pb.N - 1, -1, -1):
        y_i = tuple(s[i] for s in sol)
        if scaler is not None:
            scaler.start_step()
        while True:
            S = 1.0 if scaler is None else scaler.scale
            cot = a if S == 1.0 else tuple(x * S for x in a)
            if use_grid:
                gy, gp = _step_vjp_grid(pb, i, y_i, cot, P_rows)
            else:
                gy, gp, g01 = _step_vjp_autograd(pb, i, t, y_i, cot, need_t)
            inv = 1.0 / S
            a_new = tuple(ai.add(gyi.to(ai.dtype), alpha=inv) if gyi is not None else ai for ai, gyi in zip(a, gy))
            a_new = tuple(x + g[i] for x, g in zip(a_new, grads))
            if scaler is None:
                break
            # one host sync per step: is everything this step produced finite, and how big is a?
            produced = [g for stage in gp for g in stage] if use_grid else [*gp, *(g01 or ())]
            finite, amax = _finite_and_amax(a_new, produced)
            if finite:
                scaler.maybe_grow(amax, per_sample)
                break
            scaler.on_overflow(i, pb.t_list[i])
        a = a_new
        if use_grid:
            for k, row in enumerate(pb.rows[i]):
                for acc, g in zip(dP_rows[row], gp[k]):
                    acc.add_(g, alpha=inv)
        else:
            for acc, g in zip(gparams, gp):
                if g is not None:
                    acc.add_(g, alpha=inv)
            if need_t:
                gt[i] += g01[0] * inv
                gt[i + 1] += g01[1] * inv
    if use_grid and pb.params:
        gparams = _grid_params_backward(pb, P, dP)
    return a, gparams, gt


def _anchor(scaler, a, grads, per_sample):
    """Anchor the scale on the adjoint entering the sweep (on the incoming gradients where
    that adjoint is zero: a loss that reads only earlier grid points)."""
    amax = max(float(host_read(x.abs().max())) if x.numel() else 0.0 for x in a)
    if amax == 0.0:
        amax = max(float(host_read(g.abs().max())) if g.numel() else 0.0 for g in grads)
    scaler.anchor(amax, per_sample)


def _solve_backward_fused(pb, sol, grads):
    """The adjoint sweep by the field's own hook: it returns the adjoint at t_0 and the
    float32 cotangents of the ``grid_params`` rows (and handles the scaler itself)."""
    with torch.enable_grad(), pb.autocast_ctx():
        P = pb.func.grid_params(pb.stage_times)  # graph to the params, built once per sweep
    a, dP = pb.func.grid_solve_vjp(tuple(p.detach() for p in P), tuple(sol), tuple(grads), pb.spec, pb.scaler)
    gparams = _grid_params_backward(pb, P, dP) if pb.params else []
    if pb.scaler is not None:
        pb.scaler.check()  # raises naming the failed step (already read with the gradients' check above)
    return tuple(a), gparams, None


def _finite_and_amax(a, produced):
    """(are a and every tensor in ``produced`` finite?, max |a|) with one device-to-host copy."""
    extra = [g.sum(dtype=torch.float32) for g in produced if g is not None]
    amax = [x.abs().amax().float() for x in a if x.numel()]
    ref = a[0]
    total = torch.stack(extra).sum() if extra else ref.new_zeros((), dtype=torch.float32)
    top = torch.stack(amax).amax() if amax else ref.new_zeros((), dtype=torch.float32)
    total, top = host_read(torch.stack([total, top]))
    return math.isfinite(total) and math.isfinite(top), top


def _grid_params_backward(pb, P, dP):
    """One backward pass through the time-only part of the field (the hypernetwork),
    for all stage times at once. Where P is in a low precision and a scaler is in
    use, the float32 cotangents dP are scaled into range first (and unscaled after).
    The scale stays on the device; with a scaler, one host read per attempt asks
    whether the gradients are finite (and, after a fused sweep, whether it failed)."""
    low = any(p.dtype in (torch.float16, torch.bfloat16) for p in P)
    scaler = pb.scaler
    S = 1.0
    if low and scaler is not None:
        amax = torch.stack([d.abs().amax().float() for d in dP]).amax()
        S = scaler.anchor_on_device(amax, max(p[0].numel() for p in P))  # exact power of 2, [] float64
    for _ in range(scaler.max_attempts if scaler is not None else 1):
        g = torch.autograd.grad(P, pb.params, [(d * S).to(p.dtype) for d, p in zip(dP, P)],
                                allow_unused=True, retain_graph=True)
        g = [torch.zeros_like(p) if gi is None else gi / S for gi, p in zip(g, pb.params)]
        if scaler is None or not g:
            return g
        (finite,) = scaler.check(torch.stack([torch.isfinite(gi).all() for gi in g]).all())
        if finite:
            return g
        scaler.count_overflows(1)
        S = S / 2.0
    raise RuntimeError("DynamicScaler: the gradient through the time-only part of the field is not finite")


def _step_vjp_autograd(pb, i, t, y_i, cot, need_t):
    """VJP of step i's increment by autograd through the recomputed step."""
    with torch.enable_grad(), pb.autocast_ctx():
        y = tuple(x.detach().requires_grad_() for x in y_i)
        if need_t:
            t0, t1 = t[i].detach().requires_grad_(), t[i + 1].detach().requires_grad_()
            h = t1 - t0
            field = lambda k, Y: (pb.call(t0 + pb.tab.c[k] * h, Y), None)  # noqa: E731
            inputs = (*y, *pb.params, t0, t1)
        else:
            h = pb.h[i]
            times = pb.stage_times
            field = lambda k, Y: (pb.call(times[pb.rows[i][k]], Y), None)  # noqa: E731
            inputs = (*y, *pb.params)
        inc = rk_increment(pb.tab, field, h, y)
        g = torch.autograd.grad(inc, inputs, cot, allow_unused=True)
    n = len(y)
    gp = g[n : n + len(pb.params)]
    return g[:n], gp, (g[-2:] if need_t else None)


def _step_vjp_grid(pb, i, y_i, cot, P_rows):
    """VJP of step i's increment through the tableau, with the field's own VJP.

    Stage k: Y_k = y + h sum_j a_kj K_j, K_k = f_k(Y_k), inc = h sum_k b_k K_k.
    Reverse: Kbar_k = h b_k cot + h sum_{m>k} a_mk Ybar_m, Ybar_k = f_k'^T Kbar_k,
    ybar = sum_k Ybar_k. A None cotangent component means zero (e.g. logp, which
    the field does not read). Returns (ybar, [param cotangents per stage]).
    """
    tab, h, rows, func = pb.tab, pb.h[i], pb.rows[i], pb.func
    with pb.autocast_ctx():
        _, Ys, extras = rk_increment(tab, lambda k, Y: func.grid_eval(P_rows[rows[k]], Y), h, y_i, keep=True)
        s = len(tab.c)
        Kbar = [tuple((h * tab.b[k]) * c for c in cot) for k in range(s)]
        ybar = None
        gp = [None] * s
        for k in range(s - 1, -1, -1):
            Ybar, gp[k] = func.grid_vjp(P_rows[rows[k]], Ys[k], extras[k], Kbar[k])
            for j, akj in enumerate(tab.a[k]):
                if akj != 0.0:
                    Kbar[j] = tuple(kb if yb is None else kb.add(yb, alpha=h * akj) for kb, yb in zip(Kbar[j], Ybar))
            ybar = Ybar if ybar is None else tuple(_add(u, v) for u, v in zip(ybar, Ybar))
    return ybar, gp


def _add(u, v):
    """u + v, a sum over stages, in at least float32 (as autograd sums the stages'
    contributions to the float32 state in the generic path); None stands for zero."""
    if u is None or v is None:
        return v if u is None else u
    acc = torch.promote_types(torch.promote_types(u.dtype, v.dtype), torch.float32)
    return u.to(acc) + v.to(acc)


class ODEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pb, t, n_y, *tensors):
        y0 = tensors[:n_y]
        sol = solve_forward(pb, y0)
        ctx.pb, ctx.n_y = pb, n_y
        ctx.save_for_backward(t, *sol)
        return sol

    @staticmethod
    def backward(ctx, *grads):
        pb, n_y = ctx.pb, ctx.n_y
        t, *sol = ctx.saved_tensors
        grads = tuple(torch.zeros_like(s) if g is None else g for g, s in zip(grads, sol))
        need_t = ctx.needs_input_grad[1]
        gy0, gparams, gt = solve_backward(pb, t, sol, grads, need_t)
        need_p = ctx.needs_input_grad[3 + n_y :]
        gparams = [g if need else None for g, need in zip(gparams, need_p)]
        gy0 = [g if need else None for g, need in zip(gy0, ctx.needs_input_grad[3 : 3 + n_y])]
        return (None, gt, None, *gy0, *gparams)
