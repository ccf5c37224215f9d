"""The learning-rate schedule: one pure function of the iteration.

``lr_factor(k, ...)`` is the factor on ``--lr`` for update k+1 (k updates done),
so a run, its resume and a test all get the same value from the iteration alone.
The optimizer follows it through a ``LambdaLR`` stepped once per update, which is
why the CSV's ``lr`` column after k updates reads ``lr * lr_factor(k)``: the rate
of the next update.

    step      x gamma every ``step`` updates (the seed's StepLR(1000, 0.1) by default)
    cosine    from 1 down to ``lr_min / lr`` over ``niters`` updates (half a cosine period)
    constant  1

``warmup`` > 0 ramps the first ``warmup`` updates linearly, (k+1)/warmup, and then
hands over to the schedule; the cosine is then planned over the ``niters - warmup``
updates that follow, while step counts its steps from update 0.
"""
import math

SCHEDULES = ("step", "cosine", "constant")


def lr_factor(k, schedule="step", step=1000, gamma=0.1, lr=1.0, lr_min=0.0, warmup=0, niters=1):
    """Factor on the base rate ``lr`` for the update after ``k`` updates (k >= 0)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if k < warmup:
        return (k + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** (k // step)
    span = max(niters - warmup, 1)
    progress = min(k - warmup, span) / span
    floor = lr_min / lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check(schedule, step, gamma, lr, lr_min, warmup, niters):
    """Raise ValueError (one line) for values no schedule can use."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown --lr_schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if step < 1:
        raise ValueError(f"--lr_step must be positive, got {step}")
    if not (math.isfinite(gamma) and 0 < gamma <= 1):
        raise ValueError(f"--lr_gamma must be in (0, 1], got {gamma}")
    if not (math.isfinite(lr_min) and 0 <= lr_min <= lr):
        raise ValueError(f"--lr_min must be in [0, --lr {lr:g}], got {lr_min}")
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    if schedule == "cosine" and warmup >= niters:
        raise ValueError(f"--warmup {warmup} leaves no iteration of the cosine schedule (--niters {niters})")
