"""Dynamic adjoint scaling for low-precision backward sweeps."""
import math

import torch

from ._host import host_read


class DynamicScaler:
    """A power-of-2 scale S on the adjoint during the solver's backward sweep.

    The adjoint's size can drift by orders of magnitude between the end and the
    start of a sweep, so no single loss scale avoids both underflow and
    overflow. Each step's VJP is taken on S*a in the low precision and its
    result divided by S in high precision (exact, S being a power of 2).

    - At the start of every sweep S is anchored on the first adjoint so that
      max|S*a| is near ``target = (1/eps) / sqrt(state size per sample)``.
    - A step whose VJP has an inf or NaN is retried with S halved; after
      ``max_attempts`` halvings a ``RuntimeError`` names the step.
    - When max|a| * S falls below target / 2, S is doubled (up to the target).

    ``scale`` (the scale in use at the end of the last sweep) and
    ``overflow_steps`` (total retries so far) carry over between iterations
    and are meant for logging; ``state_dict`` / ``load_state_dict`` save them.

    Where they live: the step-by-step sweeps decide every retry on the host, so
    they keep S as a Python float. A fused sweep (``record_blocks``) leaves S, its
    retry count and its failed step on the device, so that a training iteration
    need not wait for the device; reading ``scale`` or ``overflow_steps`` (for a
    CSV row) and ``check`` (once per sweep, by the solver) are the host reads.
    """

    def __init__(self, dtype=torch.float16, max_attempts=40):
        if not dtype.is_floating_point:
            raise ValueError(f"DynamicScaler needs a floating dtype, got {dtype}")
        self.dtype = dtype
        self.max_attempts = int(max_attempts)
        self._scale = 1.0  # a float, or a 0-dim float32 device tensor after a fused sweep
        self._overflow = 0  # retries counted on the host
        self._overflow_dev = None  # retries of fused sweeps not yet read: a 0-dim device tensor
        self._pending = None  # a fused sweep's (failed step per block, t_list), checked by ``check``

    @property
    def scale(self):
        if torch.is_tensor(self._scale):
            self._scale = float(host_read(self._scale))
        return self._scale

    @scale.setter
    def scale(self, value):
        self._scale = float(value)

    @property
    def overflow_steps(self):
        if self._overflow_dev is not None:
            self._overflow += int(host_read(self._overflow_dev))
            self._overflow_dev = None
        return self._overflow

    @overflow_steps.setter
    def overflow_steps(self, value):
        self._overflow, self._overflow_dev = int(value), None

    def count_overflows(self, k):
        """Add ``k`` retries: an int, or a device tensor (not read until ``overflow_steps`` is)."""
        if torch.is_tensor(k):
            k = k.to(torch.float64)
            self._overflow_dev = k if self._overflow_dev is None else self._overflow_dev + k
        else:
            self._overflow += int(k)

    def target(self, numel_per_sample):
        return (1.0 / torch.finfo(self.dtype).eps) / math.sqrt(max(numel_per_sample, 1))

    def anchor(self, amax, numel_per_sample):
        """Set S to the power of 2 that brings ``amax`` (a float) near the target."""
        if not math.isfinite(amax) or amax <= 0.0:
            self._scale = 1.0
        else:
            self._scale = 2.0 ** math.floor(math.log2(self.target(numel_per_sample) / amax))
        return self._scale

    def anchor_on_device(self, amax, numel_per_sample):
        """``anchor``'s power of 2 for a device tensor ``amax``, left on the device (float64,
        0-dim; 1 where amax is 0 or not finite). frexp gives floor(log2 x) exactly, so this
        is the same number as ``anchor`` computes on the host."""
        x = self.target(numel_per_sample) / amax.to(torch.float64)
        exponent = torch.frexp(x).exponent - 1  # x = m 2^e, m in [0.5, 1): floor(log2 x) = e - 1
        S = torch.ldexp(torch.ones_like(x), exponent)
        return torch.where(torch.isfinite(amax) & (amax > 0), S, torch.ones_like(x))

    def on_overflow(self, step, t):
        """Halve S after a non-finite VJP at ``step``; raise after too many tries."""
        self._overflow += 1
        self._scale = self.scale / 2.0
        self._attempts += 1
        if self._attempts >= self.max_attempts:
            raise RuntimeError(self._failure(step, t, f"(now {self._scale:.3g})"))

    def _failure(self, step, t, where):
        return (f"DynamicScaler: the VJP of step {step} (t={t:.6g}) stayed non-finite after "
                f"{self.max_attempts} halvings of the scale {where}; the gradient itself is not finite")

    def start_step(self):
        self._attempts = 0

    def maybe_grow(self, amax, numel_per_sample):
        """Double S while max|S*a| stays below half the target."""
        target = self.target(numel_per_sample)
        scale = self.scale
        while amax > 0.0 and amax * scale * 2.0 <= target:
            scale *= 2.0
        self._scale = scale
        return scale

    def record_blocks(self, scales, retries, failed, t_list):
        """What a fused sweep reports per block of samples, all device tensors: the final
        scales [B], the retries [B], and the step that failed (-1: none) [B]. S becomes the
        smallest scale; nothing is read here (``check`` reads the failure)."""
        self._scale = scales.min()
        self.count_overflows(retries.sum())
        self._pending = (failed.max(), t_list)

    def check(self, *flags):
        """The one host read of a fused sweep: raise naming the step if the last sweep
        failed; else return the values of ``flags`` (0-dim device tensors, read at once)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return tuple(host_read(torch.stack([f.to(torch.float64) for f in flags]))) if flags else ()
        failed, t_list = pending
        values = host_read(torch.stack([failed.to(torch.float64), *(f.to(torch.float64) for f in flags)]))
        step = int(values[0])
        if step >= 0:
            raise RuntimeError(self._failure(step, t_list[step], "in the fused backward"))
        return tuple(values[1:])

    def state_dict(self):
        return {"scale": float(self.scale), "overflow_steps": int(self.overflow_steps)}

    def load_state_dict(self, state):
        self.scale = float(state["scale"])
        self.overflow_steps = int(state["overflow_steps"])

    def __repr__(self):
        return f"DynamicScaler(dtype={self.dtype}, scale={self.scale:g}, overflow_steps={self.overflow_steps})"
