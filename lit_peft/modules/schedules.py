"""Learning-rate schedules of the papers' recipes, stepped per optimiser step."""

from __future__ import annotations

import math
from collections.abc import Callable

#: The schedules ``AdaptedModule(lr_schedule=...)`` accepts.
SCHEDULES = ("cosine", "linear", "constant")


def warmup_lambda(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier per optimiser step: linear warm-up, then cosine or linear decay to 0, or constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1.0 - progress
        return 1.0

    return factor
