"""``OrthogonalityCheck``: watch ``max ‖QᵀQ − I‖_F`` over every BOFT/OFT block during training.

Exact Cayley blocks are orthogonal to rounding error; the check catches the Neumann series drifting (large
``‖A‖``), low-precision storage, or a bug. It reads the parameters outside ``forward``: FSDP2-sharded ones through
``full_tensor``, FSDP1's flat shards inside the module's ``full_weights()`` (every rank takes part in the gather).
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_peft.adapters import BOFTLinear, adapted_layers, orthogonality_error


class OrthogonalityError(RuntimeError):
    """Raised by ``OrthogonalityCheck(action="raise")``."""


class OrthogonalityCheck(L.Callback):
    """Every ``every_n_steps`` optimiser steps, log ``orthogonality_error`` and act if it exceeds ``tolerance`` or
    is not finite (NaN blocks are a violation, not a pass).

    Checks once per optimiser step (not per micro-batch under gradient accumulation). With several processes the
    ranks decide together, as ``EarlyStopping`` does: ``stop`` stops every rank or none.

    Args:
        every_n_steps: check period in optimiser steps.
        tolerance: largest acceptable ``max ‖QᵀQ − I‖_F``.
        action: ``"warn"`` (log a warning), ``"stop"`` (end training gracefully) or ``"raise"``.
    """

    def __init__(self, every_n_steps: int = 50, tolerance: float = 1e-4,
                 action: Literal["warn", "stop", "raise"] = "warn"):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if action not in ("warn", "stop", "raise"):
            raise ValueError(f"action must be 'warn', 'stop' or 'raise', got {action!r}")
        self.every_n_steps = every_n_steps
        self.tolerance = tolerance
        self.action = action
        self.active = True
        self.last_error: float | None = None
        self._last_checked_step: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_checked_step = trainer.global_step  # checks follow optimiser steps (also after a resume)
        if not any(isinstance(m, BOFTLinear) for m in adapted_layers(pl_module).values()):
            self.active = False
            adapter = type(getattr(pl_module, "adapter", None)).__name__
            rank_zero_info(f"OrthogonalityCheck: the adapter is {adapter}, which has no orthogonal blocks; not checking")

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        with getattr(pl_module, "full_weights", contextlib.nullcontext)():  # FSDP1: gathers the flat shards
            error = orthogonality_error(pl_module)
        self.last_error = error
        pl_module.log("orthogonality_error", error, on_step=True, on_epoch=False)
        violated = not math.isfinite(error) or error > self.tolerance
        if trainer.world_size > 1:  # the same decision on every rank (a collective: every rank checks alike)
            violated = trainer.strategy.reduce_boolean_decision(violated, all=False)
        if violated:
            what = f"{error:.3e} exceeds tolerance" if math.isfinite(error) else f"{error} (not finite) violates tolerance"
            message = (f"OrthogonalityCheck: max ‖QᵀQ − I‖ = {what} {self.tolerance:.1e} "
                       f"at step {trainer.global_step}")
            if self.action == "raise":
                raise OrthogonalityError(message)
            rank_zero_warn(message)
            if self.action == "stop":
                trainer.should_stop = True
        return error

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.active and step % self.every_n_steps == 0 and step != self._last_checked_step:
            self._last_checked_step = step
            self.check(trainer, pl_module)
