"""Learning-rate and sparsity-coefficient schedules: pure functions of the step.

Being pure functions of the step (no state), they resume exactly from a checkpoint.
"""

from __future__ import annotations

import math

from .errors import ConfigError

DECAY_SHAPES = ("constant", "linear", "cosine")


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, decay_start: float = 0.9,
              decay: str = "linear", final_fraction: float = 0.0,
              anchor: tuple[int, float] | None = None) -> float:
    """Multiplier of the base LR at `step` (0-based): linear warmup over `warmup_steps`, flat,
    then from `decay_start` (a fraction of total_steps) a `decay` to `final_fraction`.

    anchor = (step0, factor0): the decay was already under way at step0 (a run extended on
    resume): from step0 on it goes from factor0 to final_fraction over [step0, total_steps]
    instead of starting again from the top."""
    if decay not in DECAY_SHAPES:
        raise ConfigError(f"lr decay {decay!r} is unknown: use one of {', '.join(DECAY_SHAPES)}")
    if anchor is not None and step >= anchor[0]:
        start, top = int(anchor[0]), float(anchor[1])
    else:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        start, top = max(int(decay_start * total_steps), warmup_steps), 1.0
        if step < start or total_steps <= start:
            return 1.0
    if decay == "constant":
        return top
    t = min(1.0, (step - start) / max(1, total_steps - start))
    shape = 1.0 - t if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
    return final_fraction + (top - final_fraction) * shape


def sparsity_factor(step: int, warmup_steps: int = 0) -> float:
    """Multiplier of the sparsity penalty: linear ramp from ~0 to 1 over `warmup_steps` (lets
    latents form before L1/L0 pushes them to zero, as in Anthropic's and SAELens's recipes)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps
