"""Adapter-only checkpoints and exact resume, the checkpoint hooks of every :class:`~lit_peft.modules.AdaptedModule`.

- A checkpoint holds only what training changes: trainable parameters and the adapters' persistent buffers (e.g.
  SVFT's support); the frozen backbone is rebuilt from its own source on load (so loading is never strict).
- It also holds the random states (BOFT's multiplicative dropout and LoRA's dropout draw from them), so a resumed
  run continues with the same random stream as an uninterrupted one.
- On resume, the training loader gets its mid-epoch position back (:func:`lit_peft.compat.restore_loader_states`).
- Integrity: checkpoint files are written under a temporary name and renamed into place
  (:class:`AtomicCheckpointIO`, installed by the module when the strategy uses Lightning's plain file I/O), so a full
  disk or a kill never leaves a truncated file under the final name; each holds a SHA-256 digest of its tensors,
  checked on load (flipped bits are refused); and a checkpoint whose adapter tensors are not the ones this run's
  adapter has (another method, other targets or shapes) is refused on load, naming the differences; only the
  frozen base may be absent from it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ..adapters.base import unwrapped_name
from ..adapters.io import tensor_digest
from ..compat import restore_loader_states

#: The checkpoint key of the random states.
RNG_KEY = "lit_peft_rng_states"
#: The checkpoint key of the SHA-256 digest of its ``state_dict`` tensors.
DIGEST_KEY = "lit_peft_state_dict_sha256"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` writing each local checkpoint to a temporary name beside it, then renaming
    it into place: a reader (a resume) never sees a truncated file under the final name, and a failed write leaves
    the previous file and no temporary behind."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if "://" in str(path):  # remote file systems: Lightning's own (single-object) write
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def use_atomic_checkpoints(trainer) -> None:
    """Give ``trainer``'s strategy an :class:`AtomicCheckpointIO` if it uses Lightning's plain one (a user's own
    CheckpointIO, or a strategy's distributed checkpointing, is left alone)."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is not None and type(getattr(strategy, "_checkpoint_io", None)) in (type(None), TorchCheckpointIO):
        strategy.checkpoint_io = AtomicCheckpointIO()


def _plain_tensors(state: dict) -> dict | None:
    """The state's tensors if they are all plain local tensors (no DTensor shards: no digest without a gather)."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if any(type(v) is not torch.Tensor and not isinstance(v, torch.nn.Parameter) for v in tensors.values()):
        return None
    return tensors


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
        tensors = _plain_tensors(checkpoint.get("state_dict", {}))
        if tensors is not None:
            checkpoint[DIGEST_KEY] = tensor_digest(tensors)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict")
        if state is not None:
            self._verify_checkpoint_state(checkpoint, state)
        if RNG_KEY in checkpoint:
            set_rng_states(checkpoint[RNG_KEY])

    def _verify_checkpoint_state(self, checkpoint: dict, state: dict) -> None:
        """Refuse a damaged checkpoint (digest) or one whose trained tensors are not this run's (names, shapes)."""
        stored = checkpoint.get(DIGEST_KEY)
        tensors = _plain_tensors(state)
        if stored is not None and tensors is not None and tensor_digest(tensors) != stored:
            raise ValueError("the checkpoint's tensors do not match the checksum written with them: the file was "
                             "damaged after it was saved (bit rot, a partial copy); resume from another checkpoint")
        if self.fsdp1_root() is not None:
            return  # FSDP1's flat parameters: names differ from the module's; its own load checks them
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items() if isinstance(v, torch.Tensor)}
        saved = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
        missing = sorted(set(expected) - set(saved))
        unexpected = sorted(set(saved) - set(expected))
        shapes = [f"{k}: here {expected[k]}, checkpoint {saved[k]}" for k in sorted(set(expected) & set(saved))
                  if expected[k] != saved[k]]
        if missing or unexpected or shapes:
            adapter = type(getattr(self, "adapter", None)).__name__
            saved_adapter = (checkpoint.get("hyper_parameters") or {}).get("adapter")
            lines = [f"{len(missing)} trained tensor(s) of this run's adapter ({adapter}) are not in it: "
                     f"{missing[:4]}" if missing else "",
                     f"{len(unexpected)} tensor(s) in it that this run's adapter does not have: {unexpected[:4]}"
                     if unexpected else "",
                     f"{len(shapes)} shape(s) differ: {shapes[:4]}" if shapes else ""]
            raise ValueError("the checkpoint does not fit this run's model"
                             + (f" (it was saved with adapter {saved_adapter!r})" if saved_adapter else "") + ":\n  - "
                             + "\n  - ".join(line for line in lines if line)
                             + "\nResume with the config the checkpoint was trained with (only the frozen base may be "
                               "absent from a checkpoint)")

    def on_train_start(self) -> None:
        """Mid-epoch resume: hand the training loader its position from the checkpoint. Lightning does that when it
        creates the loader, but ``configure_optimizers`` creates it earlier (``trainer.estimated_stepping_batches``
        for the schedules), before the checkpoint is restored, and Lightning then drops the position (Lightning
        issue #20550). Here is early enough: the loader draws its first batch lazily, after this hook
        (``lit_peft.data.sampling.ResumableLoader``); a no-op when the states are already loaded or not resuming."""
        restore_loader_states(self.trainer)
