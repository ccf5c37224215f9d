"""Precision, resolved once before the training loop: an autocast context for the
run's device type, and the run's loss scalers. The table of precisions and the rule
that picks the scalers from the flags are plain data in ``choices.py``."""
import contextlib

import torch

import torchmpnode
from choices import PRECISIONS, scaler_flags, scaler_label  # the rule that picks the scalers


def autocast_dtype(name):
    """The torch dtype precision ``name`` runs the model in under autocast; None: no autocast."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose one of: {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[name].autocast
    return None if dtype is None else getattr(torch, dtype)


class Precision:
    """``autocast()`` gives the context to run the model in; ``note`` says what a
    precision means on this device (e.g. tfloat32 on CPU is plain float32)."""

    def __init__(self, name, device):
        self.name, self.device_type, self.low = name, torch.device(device).type, autocast_dtype(name)
        self.note = ""
        spec = PRECISIONS[name]
        if spec.tf32:
            if self.device_type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
                self.note = "TF32 matmuls enabled"
            else:
                self.note = f"{name} is a CUDA matmul mode; on CPU this runs plain {spec.cpu_twin or 'float32'}"
        elif self.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False

    def autocast(self):
        if self.low is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.low)


class Scalers:
    """The loss scalers of a run.

    - GradScaler (PyTorch's, one loss scale): on for float16 with torchdiffeq
      unless ``no_grad_scaler``; on for torchmpnode only when ``grad_scaler``.
    - DynamicScaler (torchmpnode's adjoint scaling): on for float16 with
      torchmpnode unless ``no_dynamic_scaler``.
    Both are off in every other precision.
    """

    def __init__(self, odeint, precision, device, no_grad_scaler=False, no_dynamic_scaler=False, grad_scaler=False):
        flags = (odeint, precision.name, no_grad_scaler, no_dynamic_scaler, grad_scaler)
        use_grad, use_dynamic = scaler_flags(*flags)
        self.grad = torch.amp.GradScaler(torch.device(device).type, enabled=use_grad)
        self.dynamic = torchmpnode.DynamicScaler(torch.float16) if use_dynamic else None
        self.label = scaler_label(*flags)

    @property
    def solver_scaler(self):
        """What torchmpnode.odeint gets: the DynamicScaler, or False (no scaling)."""
        return self.dynamic if self.dynamic is not None else False

    def loss_scale(self):
        """The scale in use: GradScaler's, else DynamicScaler's, else 1."""
        if self.grad.is_enabled():
            return float(self.grad.get_scale())
        return float(self.dynamic.scale) if self.dynamic is not None else 1.0

    def overflow_steps(self):
        return self.dynamic.overflow_steps if self.dynamic is not None else 0
