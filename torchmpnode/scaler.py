"""Dynamic adjoint scaling for low-precision backward sweeps."""
import math

import torch


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
    """

    def __init__(self, dtype=torch.float16, max_attempts=40):
        if not dtype.is_floating_point:
            raise ValueError(f"DynamicScaler needs a floating dtype, got {dtype}")
        self.dtype = dtype
        self.max_attempts = int(max_attempts)
        self.scale = 1.0
        self.overflow_steps = 0

    def target(self, numel_per_sample):
        return (1.0 / torch.finfo(self.dtype).eps) / math.sqrt(max(numel_per_sample, 1))

    def anchor(self, amax, numel_per_sample):
        """Set S to the power of 2 that brings ``amax`` (a float) near the target."""
        if not math.isfinite(amax) or amax <= 0.0:
            self.scale = 1.0
        else:
            self.scale = 2.0 ** math.floor(math.log2(self.target(numel_per_sample) / amax))
        return self.scale

    def on_overflow(self, step, t):
        """Halve S after a non-finite VJP at ``step``; raise after too many tries."""
        self.overflow_steps += 1
        self.scale /= 2.0
        self._attempts += 1
        if self._attempts >= self.max_attempts:
            raise RuntimeError(
                f"DynamicScaler: the VJP of step {step} (t={t:.6g}) stayed non-finite after "
                f"{self.max_attempts} halvings of the scale (now {self.scale:.3g}); the "
                "gradient itself is not finite"
            )

    def start_step(self):
        self._attempts = 0

    def maybe_grow(self, amax, numel_per_sample):
        """Double S while max|S*a| stays below half the target."""
        target = self.target(numel_per_sample)
        while amax > 0.0 and amax * self.scale * 2.0 <= target:
            self.scale *= 2.0
        return self.scale

    def state_dict(self):
        return {"scale": float(self.scale), "overflow_steps": int(self.overflow_steps)}

    def load_state_dict(self, state):
        self.scale = float(state["scale"])
        self.overflow_steps = int(state["overflow_steps"])

    def __repr__(self):
        return f"DynamicScaler(dtype={self.dtype}, scale={self.scale:g}, overflow_steps={self.overflow_steps})"
