"""``RichProgress``: Lightning's rich progress bar, plus one printed line per epoch with its metrics.

The bar (``lightning.pytorch.callbacks.RichProgressBar``) is redrawn in place and disappears from a terminal's
scrollback and from redirected logs; the line stays:

    epoch 3/15 · step 132 · 4.1 s · train_loss 0.412 · val_acc 0.912 · val_loss 0.338

It is printed at the end of every training epoch (with the validation that ran at its end), and after a validation
that ran in the middle of an epoch (step-based ``val_check_interval``, the language-model configs), through rich's
console, so it lands above the live bar. Only the global rank 0 prints.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def metrics_line(metrics: dict[str, Any]) -> str:
    """``name value`` pairs of the scalar ``metrics``: training metrics first, then validation, then the rest, each
    group sorted. The copies Lightning keeps of a metric logged both per step and per epoch (``x_step``, and
    ``x_epoch`` beside ``x``, which holds the epoch value) are left out."""
    values = {k: v for k, v in ((k, _number(v)) for k, v in metrics.items()) if v is not None}
    values = {k: v for k, v in values.items()
              if not k.endswith("_step") and not (k.endswith("_epoch") and k[:-len("_epoch")] in values)}

    def group(name: str) -> int:
        return 0 if name.startswith("train") else 1 if name.startswith("val") else 2

    parts = []
    for name in sorted(values, key=lambda n: (group(n), n)):
        v = values[name]
        text = "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
        parts.append(f"{name} {text}")
    return " · ".join(parts)


class RichProgress(RichProgressBar):
    """:class:`~lightning.pytorch.callbacks.RichProgressBar` that also prints each epoch's metrics as a line.

    Args:
        refresh_rate: redraw the bar every this many batches (0 hides the bar; the epoch lines are still printed).
        leave: keep each epoch's finished bar on screen.
        epoch_lines: print the per-epoch metric line.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False, epoch_lines: bool = True) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self.epoch_lines = epoch_lines
        self._epoch_start = time.perf_counter()

    def _print(self, trainer: L.Trainer, head: str) -> None:
        if not (self.epoch_lines and trainer.is_global_zero):
            return
        from rich import get_console

        line = metrics_line(trainer.callback_metrics)
        get_console().print(f"{head} · {line}" if line else head, highlight=False, markup=False, soft_wrap=True)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        self._print(trainer, f"epoch {trainer.current_epoch + 1}{total} · step {trainer.global_step} · "
                             f"{time.perf_counter() - self._epoch_start:.1f} s")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # a validation at the end of an epoch is reported by that epoch's line
        if trainer.state.fn == "fit" and not trainer.sanity_checking and not trainer.is_last_batch:
            self._print(trainer, f"step {trainer.global_step} (epoch {trainer.current_epoch + 1}) · validation")
