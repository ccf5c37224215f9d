"""Precision, resolved once before the training loop: an autocast context for the
run's device type, and which loss scaler (if any) is on."""
import contextlib

import torch

import torchmpnode

# name -> autocast dtype (None: no autocast, plain float32)
PRECISIONS = {"float32": None, "tfloat32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Precision:
    """``autocast()`` gives the context to run the model in; ``note`` says what a
    precision means on this device (e.g. tfloat32 on CPU is plain float32)."""

    def __init__(self, name, device):
        if name not in PRECISIONS:
            raise ValueError(f"unknown precision {name!r}; choose one of: {', '.join(PRECISIONS)}")
        self.name, self.device_type, self.low = name, torch.device(device).type, PRECISIONS[name]
        self.note = ""
        if name == "tfloat32":
            if self.device_type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
                self.note = "TF32 matmuls enabled"
            else:
                self.note = "tfloat32 is a CUDA matmul mode; on CPU this runs plain float32"
        elif self.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False

    def autocast(self):
        if self.low is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.low)


def scaler_flags(odeint, precision, no_grad_scaler=False, no_dynamic_scaler=False, grad_scaler=False):
    """(GradScaler on?, DynamicScaler on?) for a run's flags: the one place this is decided."""
    fp16 = PRECISIONS[precision] == torch.float16
    use_grad = fp16 and ((odeint == "torchdiffeq" and not no_grad_scaler) or grad_scaler)
    use_dynamic = fp16 and odeint == "torchmpnode" and not no_dynamic_scaler
    return use_grad, use_dynamic


def scaler_label(*args, **kw):
    """'none', 'grad', 'dynamic' or 'grad+dynamic'."""
    use_grad, use_dynamic = scaler_flags(*args, **kw)
    return "+".join(n for n, on in (("grad", use_grad), ("dynamic", use_dynamic)) if on) or "none"


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
