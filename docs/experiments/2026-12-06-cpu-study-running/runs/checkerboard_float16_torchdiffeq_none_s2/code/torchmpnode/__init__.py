"""torchmpnode: this project's implementation of the published mixed-precision
neural-ODE method (published since as rampde): a fixed-grid solver whose
forward keeps no graph, whose backward recomputes each step
(discretize-then-optimize), and a dynamic power-of-2 adjoint scaler for float16.

    from torchmpnode import odeint, DynamicScaler

``odeint_adjoint`` is the same solver under torchdiffeq's name (its backward already
recomputes the steps). ``METHODS`` (the fixed-grid schemes) is plain data; ``odeint``,
``odeint_adjoint``, ``DynamicScaler`` and ``GridSpec`` import torch, so they load on
first use: a command line can list the methods without waiting for torch.
"""
import importlib

from .methods import METHODS

__version__ = "0.1.0"
__all__ = ["odeint", "odeint_adjoint", "DynamicScaler", "GridSpec", "METHODS", "__version__"]
_LAZY = {"odeint": "._odeint", "odeint_adjoint": "._odeint", "DynamicScaler": ".scaler", "GridSpec": "._solver"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
