"""torchmpnode: this project's implementation of the published mixed-precision
neural-ODE method (published since as rampde): a fixed-grid solver whose
forward keeps no graph, whose backward recomputes each step
(discretize-then-optimize), and a dynamic power-of-2 adjoint scaler for float16."""
from .methods import METHODS
from ._solver import GridSpec
from .odeint import odeint
from .scaler import DynamicScaler

__all__ = ["odeint", "DynamicScaler", "GridSpec", "METHODS"]
