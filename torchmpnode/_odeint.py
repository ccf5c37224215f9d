"""Public entry point of the mixed-precision fixed-grid solver."""
import warnings

import torch
from torch import nn

from ._solver import ODEFunction, Problem, grid_plan
from .methods import get_method
from .scaler import DynamicScaler

_LOW = (torch.float16, torch.bfloat16)


def odeint(func, y0, t, *, method="rk4", loss_scaler=None, atol=None, rtol=None):
    """Solve dy/dt = func(t, y) on the fixed grid ``t`` and return y at every t.

    Args:
        func: ``func(t, y) -> dy/dt`` (a tuple in gives a tuple out). When it is
            an ``nn.Module``, its parameters receive gradients.
        y0: a floating tensor or a tuple of them, e.g. ``(z, logp)``.
        t: 1-D, strictly increasing or strictly decreasing, ``len(t) >= 2``, on
            y0's device. The grid is also the output times. Its values are read to
            the host once per grid tensor (a sync on a GPU) and kept while the tensor
            lives, unless it requires grad; changing it in place is seen (its version
            counter moves), but not a change through ``.data`` or a shared numpy array.
        method: ``'euler'`` or ``'rk4'`` (classical RK4).
        loss_scaler: ``None`` (a fresh ``DynamicScaler`` when the low precision
            is float16, else no scaling), ``False`` (no scaling) or a
            ``DynamicScaler`` whose state carries over between calls.
        atol, rtol: accepted so torchdiffeq calls drop in; a fixed grid ignores them.

    Precision: when autocast is enabled for y0's device type, func is evaluated
    in the autocast dtype; otherwise in y0's dtype. The state update
    y_{i+1} = y_i + increment runs in y0's dtype, and so does the output,
    shaped ``[len(t), *y0.shape]``.

    Gradients: the exact gradient of the discrete scheme (discretize-then-
    optimize), to y0, to func's parameters and, when ``t.requires_grad``, to t.
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
    tab = get_method(method)
    if atol is not None or rtol is not None:
        warnings.warn("torchmpnode.odeint: atol/rtol are ignored by the fixed-grid solver", stacklevel=2)
    tuple_input = isinstance(y0, (tuple, list))
    ys = tuple(y0) if tuple_input else (y0,)
    _check_inputs(ys, t)
    device_type = ys[0].device.type
    autocast = torch.is_autocast_enabled(device_type)
    low = torch.get_autocast_dtype(device_type) if autocast else ys[0].dtype
    scaler = _resolve_scaler(loss_scaler, low)
    params = tuple(p for p in func.parameters() if p.requires_grad) if isinstance(func, nn.Module) else ()
    plan = grid_plan(t, method, tab)  # checks t's order; cached per grid tensor (one host sync per grid)
    pb = Problem(func, method, tab, plan, tuple_input, params, scaler, device_type, low, autocast)
    sol = ODEFunction.apply(pb, t, len(ys), *ys, *params)
    return tuple(sol) if tuple_input else sol[0]


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
    if t.shape[0] < 2:
        raise ValueError(f"t needs at least 2 points, got {t.shape[0]}")
    if t.device != ys[0].device:
        raise ValueError(f"t and y0 must be on the same device: t is on {t.device}, y0 on {ys[0].device}")
