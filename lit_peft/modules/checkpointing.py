"""Adapter-only checkpoints and exact resume, the checkpoint hooks of every :class:`~lit_peft.modules.AdaptedModule`.

- A checkpoint holds only what training changes: trainable parameters and the adapters' persistent buffers (e.g.
  SVFT's support); the frozen backbone is rebuilt from its own source on load (so loading is never strict).
- It also holds the random states (BOFT's multiplicative dropout and LoRA's dropout draw from them), so a resumed
  run continues with the same random stream as an uninterrupted one.
- On resume, the training loader gets its mid-epoch position back (:func:`lit_peft.compat.restore_loader_states`).
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch

from ..adapters.base import unwrapped_name
from ..compat import restore_loader_states

#: The checkpoint key of the random states.
RNG_KEY = "lit_peft_rng_states"


def rng_states() -> dict:
    """The random states of torch (CPU and CUDA), numpy and Python, as tensors and plain Python values only, so a
    checkpoint holding them still loads with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


class AdapterCheckpointMixin(L.LightningModule):
    """Checkpoint hooks: adapter-only ``state_dict``, random states, the loader position on resume. Under FSDP1 the
    root wrapper's state-dict hooks need every key, so there :meth:`on_save_checkpoint` drops the frozen ones."""

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if self.fsdp1_root() is None:
            self._drop_frozen(state, kwargs.get("prefix", args[1] if len(args) > 1 else ""))
        return state

    def _drop_frozen(self, state: dict, prefix: str = "") -> None:
        # FSDP1's wrapped blocks: named_parameters says blocks.0._fsdp_wrapped_module.…, its state dict blocks.0.…
        keep = {prefix + unwrapped_name(name) for name, p in self.named_parameters() if p.requires_grad}
        keep |= {prefix + unwrapped_name(name) for name, _ in self.named_buffers() if ".adapters." in name}
        for key in list(state):
            if key.startswith(prefix) and key not in keep:
                del state[key]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[RNG_KEY] = rng_states()
        if self.fsdp1_root() is not None and "state_dict" in checkpoint:
            self._drop_frozen(checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if RNG_KEY in checkpoint:
            set_rng_states(checkpoint[RNG_KEY])

    def on_train_start(self) -> None:
        """Mid-epoch resume: hand the training loader its position from the checkpoint. Lightning does that when it
        creates the loader, but ``configure_optimizers`` creates it earlier (``trainer.estimated_stepping_batches``
        for the schedules), before the checkpoint is restored, and Lightning then drops the position (Lightning
        issue #20550). Here is early enough: the loader draws its first batch lazily, after this hook
        (``lit_peft.data.sampling.ResumableLoader``); a no-op when the states are already loaded or not resuming."""
        restore_loader_states(self.trainer)
