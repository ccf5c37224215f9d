"""Fixed-grid explicit Runge-Kutta methods as Butcher tableaux, and one increment
function that serves the forward pass, the backward recompute, and the
hand-derived backward of ``_solver``. Adding a method is one registry line."""
from typing import NamedTuple, Tuple


class Tableau(NamedTuple):
    c: Tuple[float, ...]  # stage time offsets, fractions of h
    a: Tuple[Tuple[float, ...], ...]  # a[k][j]: weight of stage j in stage k's input (j < k)
    b: Tuple[float, ...]  # weights of the stages in the increment


METHODS = {
    "euler": Tableau(c=(0.0,), a=((),), b=(1.0,)),
    # classical RK4 (the published method's scheme); torchdiffeq's fixed-grid
    # 'rk4' is the 3/8-rule variant, which differs by O(h^5) per step.
    "rk4": Tableau(
        c=(0.0, 0.5, 0.5, 1.0),
        a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    ),
    # explicit midpoint, as torchdiffeq's 'midpoint': y + h f(t + h/2, y + h/2 f(t, y))
    "midpoint": Tableau(c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0)),
    # Kutta's 3/8 rule: torchdiffeq's fixed-grid 'rk4' (rk4_alt_step_func), stage for stage
    "rk4_38": Tableau(
        c=(0.0, 1 / 3, 2 / 3, 1.0),
        a=((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
        b=(1 / 8, 3 / 8, 3 / 8, 1 / 8),
    ),
}


def get_method(name):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def axpy(y, alpha, x):
    """y + alpha * x for tuples of tensors; alpha a Python float or a 0-d tensor.
    The result takes y's dtype when x is lower precision (type promotion)."""
    if isinstance(alpha, float):
        return tuple(yi.add(xi, alpha=alpha) for yi, xi in zip(y, x))
    return tuple(yi + alpha * xi for yi, xi in zip(y, x))


def rk_increment(tab, f, h, y, keep=False):
    """One explicit RK increment h * sum_k b_k K_k with K_k = f(k, Y_k).

    ``f(k, Y)`` evaluates the field for stage k and returns ``(K, extra)``.
    ``y`` is a tuple of tensors. The stage combinations run in the state's
    dtype (float32 for a float32 state) whatever dtype f returns.
    With ``keep=True`` also returns the stage inputs and extras, for a VJP.
    """
    K, Ys, extras = [], [], []
    for k in range(len(tab.c)):
        Y = y
        for j, akj in enumerate(tab.a[k]):
            if akj != 0.0:
                Y = axpy(Y, h * akj, K[j])
        Kk, extra = f(k, Y)
        K.append(Kk)
        if keep:
            Ys.append(Y)
            extras.append(extra)
    inc = None
    for k, bk in enumerate(tab.b):
        if bk == 0.0:
            continue
        if inc is None:
            inc = tuple((h * bk) * Ki.to(yi.dtype) for Ki, yi in zip(K[k], y))
        else:
            inc = axpy(inc, h * bk, K[k])
    return (inc, Ys, extras) if keep else inc
