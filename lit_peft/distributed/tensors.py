"""Reading tensors that may be FSDP2 shards (``DTensor``), for code that must not care (the adapters, merge, save)."""

from __future__ import annotations

from torch import Tensor


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor, also when ``t`` is a DTensor shard (FSDP2); plain tensors come back unchanged. A shard kept
    whole on every rank (``Replicate``) is read locally; gathering a sharded one is a collective (every rank must
    call it)."""
    if not hasattr(t, "full_tensor"):
        return t
    return t.full_tensor()


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter or buffer), whose whole value needs :func:`full_tensor`."""
    return hasattr(t, "full_tensor")
