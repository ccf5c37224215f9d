"""Public entry point of the mixed-precision fixed-grid solver, and torchdiffeq's call
patterns where their meaning on a fixed grid is exact: ``options`` (``step_size``,
``grid_constructor``), ``adjoint_params`` and the ``odeint_adjoint`` name."""
import bisect
import math
import warnings
import weakref

import torch
from torch import nn

from ._host import host_read
from ._solver import ODEFunction, Problem, grid_plan
from .methods import get_method
from .scaler import DynamicScaler

_LOW = (torch.float16, torch.bfloat16)
# torchdiffeq's callbacks: func attributes (callback_step, ...) and their adjoint twins
_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")
_CALLBACK_ATTRS = _CALLBACKS + tuple(name + "_adjoint" for name in _CALLBACKS)
# options of torchdiffeq's fixed-grid solvers that this solver honours exactly (interp only
# matters between grid points, and every output time is a grid point here), and one that
# steers adaptive step control, which a fixed grid does not have
_OPTIONS = ("step_size", "grid_constructor", "interp", "perturb")
_IGNORED_OPTIONS = ("norm",)


def odeint(func, y0, t, *, rtol=None, atol=None, method="rk4", options=None, event_fn=None,
           adjoint_params=None, loss_scaler=None, **unsupported):
    """Solve dy/dt = func(t, y) on a fixed grid and return y at every t.

    Args:
        func: ``func(t, y) -> dy/dt`` (a tuple in gives a tuple out). When it is
            an ``nn.Module`` and ``adjoint_params`` is None, its parameters receive
            gradients.
        y0: a floating tensor or a tuple of them, e.g. ``(z, logp)``.
        t: 1-D, strictly increasing or strictly decreasing, on y0's device; the output
            times. Cast to y0's dtype first, as torchdiffeq evaluates func at times in
            y0's dtype (a t of another dtype is cast once per grid tensor). Without
            ``options`` it is also the grid. Its values are read to the host once per
            grid tensor (a sync on a GPU) and kept while the tensor lives, unless it
            requires grad; changing it in place is seen (its version counter moves),
            but not a change through ``.data`` or a shared numpy array. A one-point t
            returns ``y0[None]`` (a copy; gradients flow to y0).
        method: ``'euler'``, ``'midpoint'``, ``'rk4'`` or ``'rk4_38'``. ``'rk4'`` is
            **classical** RK4; torchdiffeq's fixed-grid ``'rk4'`` is the 3/8 rule, which
            is ``'rk4_38'`` here (equal to it to roundoff: ~1e-15 in float64).
        options: torchdiffeq's fixed-grid options, where exact:
            ``step_size=h`` (> 0) solves on torchdiffeq's grid from t[0] to t[-1] in steps
            of h (``arange(ceil(|t[-1]-t[0]|/h + 1)) * h`` from t[0], its last point set to
            t[-1], so the last step is shorter when h does not divide the span) and
            returns the states at t, which must lie on that grid; ``grid_constructor=
            fn(func, y0, t) -> grid`` does the same on the grid fn returns (it gets y0 as
            given, a tuple for tuple input, not torchdiffeq's flattened one). A grid
            point within 16 ulps of t's magnitude of an output time is that output time
            (so a last step that rounding in (t[-1]-t[0])/h made a few ulps long, or
            negative, is merged away); a point of t off the grid raises ValueError.
            ``interp`` ('linear' or 'cubic') changes nothing, since every output time is
            a grid point; ``perturb=False`` is the default. ``norm`` is ignored with a
            warning (no step control); any other key raises ValueError.
        event_fn: refused (ValueError): the solver stops only at t[-1].
        adjoint_params: tensors that receive gradients through the solve, as in
            torchdiffeq's ``odeint_adjoint``: for a plain function, the tensors it
            closes over; for an ``nn.Module``, exactly these instead of its parameters.
            Those that do not require grad are left out.
        loss_scaler: ``None`` (a fresh ``DynamicScaler`` when the low precision
            is float16, else no scaling), ``False`` (no scaling) or a
            ``DynamicScaler`` whose state carries over between calls.
        atol, rtol: accepted so torchdiffeq calls drop in; a fixed grid ignores them
            (with a warning).

    torchdiffeq's callbacks are refused with a ValueError, not ignored: the keywords
    ``callback_step``, ``callback_accept_step``, ``callback_reject_step``, and a func
    with one of these attributes (or their ``*_adjoint`` twins), as torchdiffeq reads them.

    Porting from torchdiffeq (torchdiffeq call -> here; the table is in docs/solver.md):

    - ``method='rk4'`` -> ``method='rk4_38'`` (our ``'rk4'`` is classical RK4);
      ``'euler'``, ``'midpoint'`` -> the same scheme; adaptive methods -> ValueError.
    - ``options=dict(step_size=h)`` or ``dict(grid_constructor=fn)`` -> the same grid;
      t must lie on it.
    - ``odeint_adjoint(f, y0, t, adjoint_params=ps)`` -> the same call, the exact
      discrete gradient to ps.
    - a plain-function field closing over tensors -> pass them as ``adjoint_params``.
    - ``rtol``, ``atol``, ``options['norm']`` -> ignored, with a warning.
    - ``event_fn``, callbacks, ``perturb=True``, other options -> ValueError.

    Precision: when autocast is enabled for y0's device type, func is evaluated
    in the autocast dtype; otherwise in y0's dtype. The state update
    y_{i+1} = y_i + increment runs in y0's dtype, and so does the output,
    shaped ``[len(t), *y0.shape]``.

    Gradients: the exact gradient of the discrete scheme (discretize-then-
    optimize), to y0, to func's parameters (or ``adjoint_params``) and, when
    ``t.requires_grad``, to t (with ``step_size``: through the grid built from t, whose
    points between output times move with t[0]). With ``step_size`` the solve and its
    backward run on the fine grid and the output is its rows at t.

    Lost gradients: a plain function (not an ``nn.Module``) that closes over tensors
    requiring grad gives them no gradient unless they are passed as ``adjoint_params``:
    the forward keeps no graph, and the backward differentiates only its inputs. When
    grad is enabled and no ``adjoint_params`` are given, the first field evaluation
    runs with grad on, at no extra cost in evaluations; if its output requires grad
    although y and t do not, func read such a tensor, and a UserWarning says so. This
    detection, rather than a warning for every plain function, keeps closure-free
    fields such as ``lambda t, y: -y`` quiet; it sees what the field reads at t[0]
    (a tensor read only at later times is missed). It runs on the generic path (a plain
    function does not implement the grid hooks). An ``nn.Module`` field's gradients
    go to its parameters only; a tensor it reads that is not a parameter needs
    ``adjoint_params``.

    The backward pass recomputes each step at its saved state under the same
    autocast, and takes its vector-Jacobian products in the low precision on
    the (optionally scaled) adjoint; adjoint and parameter gradients
    accumulate in the state's / parameters' dtype. Memory: the N+1 states plus
    one step's activations. Fields that implement ``grid_params`` /
    ``grid_eval`` / ``grid_vjp`` (and set ``grid_enabled``) take a fast path
    that evaluates their time-only part once per grid; see ``model.CNF``.
    Such a field may also solve the whole grid itself: with ``grid_solve_enabled``
    true, ``grid_solve(P, y0, spec)`` returns the states and
    ``grid_solve_vjp(P, sol, grads, spec, scaler)`` returns (adjoint at t_0,
    float32 cotangents of P), where P = ``grid_params`` of every stage time and
    ``spec`` is a ``GridSpec``; the backward through ``grid_params`` stays here.
    With a scaler, such a hook reports through ``DynamicScaler.record_blocks``
    (device tensors), and the backward reads the host once, in
    ``DynamicScaler.check``. Gradients to ``t`` always take the generic path.
    """
    _refuse_unsupported(func, event_fn, unsupported)
    tab = get_method(method)
    options = _check_options(options)
    if atol is not None or rtol is not None:
        warnings.warn("torchmpnode.odeint: atol/rtol are ignored by the fixed-grid solver", stacklevel=2)
    tuple_input = isinstance(y0, (tuple, list))
    ys = tuple(y0) if tuple_input else (y0,)
    _check_inputs(ys, t)
    if t.shape[0] == 1:  # no step: the state at t[0]
        out = tuple(y[None].clone() for y in ys)
        return out if tuple_input else out[0]
    grid, pos = _solver_grid(func, y0, t, ys[0].dtype, options)
    device_type = ys[0].device.type
    autocast = torch.is_autocast_enabled(device_type)
    low = torch.get_autocast_dtype(device_type) if autocast else ys[0].dtype
    scaler = _resolve_scaler(loss_scaler, low)
    params = _params(func, adjoint_params)
    plan = grid_plan(grid, method, tab)  # checks the grid's order; cached per grid tensor (one host sync per grid)
    pb = Problem(func, method, tab, plan, tuple_input, params, scaler, device_type, low, autocast)
    pb.probe = adjoint_params is None and not isinstance(func, nn.Module) and torch.is_grad_enabled()
    sol = ODEFunction.apply(pb, grid, len(ys), *ys, *params)
    if pb.reads_grad:
        warnings.warn("torchmpnode.odeint: func reads tensors that require grad but is not an nn.Module; they get "
                      "no gradient unless passed as adjoint_params=(...)", stacklevel=2)
    if pos is not None:
        sol = tuple(s.index_select(0, pos) for s in sol)
    return tuple(sol) if tuple_input else sol[0]


def odeint_adjoint(func, y0, t, *, rtol=None, atol=None, method="rk4", options=None, event_fn=None,
                   adjoint_rtol=None, adjoint_atol=None, adjoint_method=None, adjoint_options=None,
                   adjoint_params=None, loss_scaler=None):
    """torchdiffeq's ``odeint_adjoint`` under its name: the same solver as ``odeint``.

    Its backward already recomputes each step from the saved states (the memory of an
    adjoint method), and gives the exact gradient of the discrete forward scheme, not the
    solution of a continuous adjoint ODE. So the backward runs the forward's method on the
    forward's grid: ``adjoint_method`` must be None or equal ``method``, and
    ``adjoint_options`` None or equal ``options`` (up to ``norm``); ``adjoint_rtol`` /
    ``adjoint_atol`` are ignored with a warning, as ``rtol`` / ``atol`` are. Unlike
    torchdiffeq, a plain-function field without ``adjoint_params`` is not refused; it is
    treated as by ``odeint`` (a warning when it reads tensors that require grad).
    """
    if adjoint_method is not None and adjoint_method != method:
        raise ValueError(f"torchmpnode.odeint_adjoint: adjoint_method {adjoint_method!r} differs from method "
                         f"{method!r}; the backward differentiates the forward scheme, so leave it None")
    if adjoint_options is not None and not _same_options(adjoint_options, options or {}):
        raise ValueError("torchmpnode.odeint_adjoint: adjoint_options differ from options; the backward runs on "
                         "the forward's grid, so leave them None")
    if adjoint_rtol is not None or adjoint_atol is not None:
        warnings.warn("torchmpnode.odeint_adjoint: adjoint_atol/adjoint_rtol are ignored by the fixed-grid solver",
                      stacklevel=2)
    return odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options, event_fn=event_fn,
                  adjoint_params=adjoint_params, loss_scaler=loss_scaler)


def _resolve_scaler(loss_scaler, low):
    if loss_scaler is None:
        return DynamicScaler(low) if low == torch.float16 else None
    if loss_scaler is False:
        return None
    if isinstance(loss_scaler, DynamicScaler):
        return loss_scaler
    raise ValueError(f"loss_scaler must be None, False or a DynamicScaler, got {type(loss_scaler).__name__}")


def _check_inputs(ys, t):
    if not ys:
        raise ValueError("y0 is an empty tuple")
    for y in ys:
        if not isinstance(y, torch.Tensor) or not y.is_floating_point():
            raise TypeError(f"y0 must be floating-point tensors, got {getattr(y, 'dtype', type(y).__name__)}")
        if y.device != ys[0].device:
            raise ValueError(f"y0 components are on different devices: {y.device} and {ys[0].device}")
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.is_floating_point():
        raise ValueError("t must be a 1-D floating-point tensor")
    if t.shape[0] < 1:
        raise ValueError("t needs at least 1 point, got none")
    if t.device != ys[0].device:
        raise ValueError(f"t and y0 must be on the same device: t is on {t.device}, y0 on {ys[0].device}")


def _same_options(a, b):
    a = {k: v for k, v in a.items() if k not in _IGNORED_OPTIONS}
    b = {k: v for k, v in b.items() if k not in _IGNORED_OPTIONS}
    return a.keys() == b.keys() and all(a[k] is b[k] or bool(a[k] == b[k]) for k in a)


def _refuse_unsupported(func, event_fn, unsupported):
    for name in unsupported:
        if name in _CALLBACKS:
            raise ValueError(f"torchmpnode.odeint: {name} (a torchdiffeq callback) is not supported; "
                             "the fixed-grid solver calls no callbacks")
        raise TypeError(f"torchmpnode.odeint got an unexpected keyword argument {name!r}")
    if event_fn is not None:
        raise ValueError("torchmpnode.odeint: event_fn is not supported; the fixed-grid solver stops only at t[-1] "
                         "(solve on a grid and locate the event in the states)")
    for name in _CALLBACK_ATTRS:
        if getattr(func, name, None) is not None:
            raise ValueError(f"torchmpnode.odeint: func has a {name} attribute (a torchdiffeq callback), which the "
                             "fixed-grid solver would not call; remove it or use torchdiffeq")


def _check_options(options):
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    for key, value in options.items():
        if key in _IGNORED_OPTIONS:
            warnings.warn(f"torchmpnode.odeint: options[{key!r}] is ignored by the fixed-grid solver", stacklevel=3)
        elif key not in _OPTIONS:
            raise ValueError(f"torchmpnode.odeint: options[{key!r}] is not supported by the fixed-grid solver; "
                             f"it takes {', '.join(_OPTIONS)}")
        elif key == "interp" and value not in ("linear", "cubic"):
            raise ValueError(f"torchmpnode.odeint: options['interp'] must be 'linear' or 'cubic', got {value!r}")
        elif key == "perturb" and value:
            raise ValueError("torchmpnode.odeint: options['perturb']=True (stages one ulp inside the step's ends) "
                             "is not supported")
    step = options.get("step_size")
    if step is not None and options.get("grid_constructor") is not None:
        raise ValueError("torchmpnode.odeint: options step_size and grid_constructor are mutually exclusive")
    if step is not None and not (math.isfinite(float(step)) and float(step) > 0):
        raise ValueError(f"torchmpnode.odeint: options['step_size'] must be a finite number > 0, got {step}")
    return options


def _params(func, adjoint_params):
    """The tensors that get gradients: adjoint_params (those requiring grad, each once)
    when given, else an nn.Module's parameters."""
    if adjoint_params is None:
        return tuple(p for p in func.parameters() if p.requires_grad) if isinstance(func, nn.Module) else ()
    params, seen = [], set()
    for p in adjoint_params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"adjoint_params must be tensors, got {type(p).__name__}")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return tuple(params)


# source grid tensor id -> (weak reference, (version, storage address), {key: (grid, pos)}):
# the grid a solve runs on, derived from t (a cast, a step_size grid), built once per grid
# tensor so that grid_plan sees the same derived tensor (and reads the host once).
_DERIVED = {}


def _solver_grid(func, y0, t, dtype, options):
    """(grid, pos): the grid of the solve, in y0's dtype, and the rows of its states
    that are the outputs at t (None: every row, the grid is t)."""
    step, constructor = options.get("step_size"), options.get("grid_constructor")
    if step is None and constructor is None:
        if t.dtype == dtype:
            return t, None
        return _derived(t, ("cast", dtype), lambda: (t.to(dtype), None))
    if constructor is not None:  # a user function: called on every solve, as torchdiffeq does
        return _fine_grid(t, dtype, lambda t_vals: _constructed_grid(constructor(func, y0, t), t),
                          "options grid_constructor's grid")
    return _derived(t, ("step", float(step), dtype),
                    lambda: _fine_grid(t, dtype, lambda t_vals: _step_grid(t, t_vals, step),
                                       f"the grid of options step_size={step}"))


def _derived(t, key, make):
    if t.requires_grad:  # differentiable in t, so built on every solve (as grid_plan does)
        return make()
    stamp = (t._version, t.data_ptr())
    entry = _DERIVED.get(id(t))
    if entry is None or entry[0]() is not t or entry[1] != stamp:
        ident = id(t)

        def forget(ref, ident=ident):
            if _DERIVED.get(ident, (None,))[0] is ref:
                del _DERIVED[ident]

        entry = (weakref.ref(t, forget), stamp, {})
        _DERIVED[ident] = entry
    if key not in entry[2]:
        entry[2][key] = make()
    return entry[2][key]


def _step_grid(t, t_vals, step_size):
    """torchdiffeq's FixedGridODESolver._grid_constructor_from_step_size, op for op in t's
    dtype, on torchdiffeq's ascending time (it negates a decreasing t and solves forward).
    Returns (the grid on t's device, differentiable in t; its values, computed on the host)."""
    sign, step_size = (1.0 if t_vals[-1] > t_vals[0] else -1.0), float(step_size)  # a tensor step: its value
    tol = _tolerance(t, t_vals)
    if step_size <= 4 * tol:
        raise ValueError(f"torchmpnode.odeint: options step_size={step_size} is too small for t's magnitude")

    t0, t1 = (torch.tensor(v, dtype=t.dtype) for v in (t_vals[0], t_vals[-1]))  # host copies: no sync
    niters = torch.ceil((sign * t1 - sign * t0) / step_size + 1).item()

    def build(t0, t1, device):
        start, end = sign * t0, sign * t1
        grid = torch.arange(0, niters, dtype=t.dtype, device=device) * step_size + start
        return sign * torch.cat([grid[:-1], end.reshape(1)])  # t_infer[-1] = t[-1], out of place

    return build(t[0], t[-1], t.device), build(t0, t1, "cpu").tolist()


def _constructed_grid(grid, t):
    if not isinstance(grid, torch.Tensor) or grid.dim() != 1 or not grid.is_floating_point():
        raise ValueError("torchmpnode.odeint: options grid_constructor must return a 1-D floating-point tensor")
    grid = grid.to(t)  # t's device and dtype, as torchdiffeq's comparisons with t promote
    return grid, host_read(grid.detach())


def _tolerance(t, t_vals):
    """How far a grid point may be from an output time and still be it: 16 ulps of t's magnitude."""
    return 16 * torch.finfo(t.dtype).eps * max(abs(t_vals[0]), abs(t_vals[-1]))


def _fine_grid(t, dtype, build, what):
    """Merge the output times t into the grid ``build(t_vals)`` returns: every grid point
    within ``_tolerance`` of an output time becomes that time (the first such point; the
    others are dropped), and a point of t off the grid raises.
    Returns (the grid in y0's dtype, the grid row of each output time)."""
    t_vals = host_read(t.detach())  # the host sync (once per grid tensor when cached)
    grid, g_vals = build(t_vals)
    tol, sign = _tolerance(t, t_vals), (1.0 if t_vals[-1] > t_vals[0] else -1.0)
    tv, gv = [sign * v for v in t_vals], [sign * v for v in g_vals]  # ascending
    rep, drop, j = [None] * len(tv), set(), 0  # rep[j]: the grid index that becomes t[j]
    for k, g in enumerate(gv):
        while j < len(tv) and tv[j] < g - tol:
            if rep[j] is None:
                break
            j += 1
        if j < len(tv) and abs(g - tv[j]) <= tol:
            if rep[j] is None:
                rep[j] = k
            else:
                drop.add(k)
    for j, r in enumerate(rep):
        if r is None:
            raise ValueError(f"torchmpnode.odeint: t[{j}] = {t_vals[j]} is not on {what}; choose a step_size that "
                             "divides every interval of t, or pass the fine grid as t")
    if rep[0] != 0 or any(k not in drop for k in range(rep[-1] + 1, len(gv))):
        raise ValueError(f"torchmpnode.odeint: {what} must start at t[0] and end at t[-1]")
    keep = [k for k in range(len(gv)) if k not in drop]
    vals = dict(zip(rep, tv))
    asc = [vals.get(k, gv[k]) for k in keep]
    if any(b <= a for a, b in zip(asc[:-1], asc[1:])):
        raise ValueError(f"torchmpnode.odeint: {what} is not strictly monotonic in t's direction")
    row = {k: r for r, k in enumerate(keep)}
    at = torch.tensor([row[k] for k in rep], device=t.device)
    fine = grid.index_select(0, torch.tensor(keep, device=t.device)).index_put((at,), t)  # differentiable in t
    return fine.to(dtype), at
