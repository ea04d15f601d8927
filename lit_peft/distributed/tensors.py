"""Reading tensors that may be FSDP2 shards (``DTensor``), for code that must not care (the adapters, merge, save)."""

from __future__ import annotations

from torch import Tensor


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor, also when ``t`` is a DTensor shard (FSDP2); plain tensors come back unchanged. Gathering a
    shard is a collective (every rank must call it). A shard kept in host memory by FSDP2's CPU offload is gathered
    on its mesh's device (NCCL gathers GPU tensors only)."""
    if not is_sharded(t):
        return t
    if t.device.type != t.device_mesh.device_type:
        t = t.to(t.device_mesh.device_type)
    return t.full_tensor()


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter or buffer), whose whole value needs :func:`full_tensor`."""
    return hasattr(t, "full_tensor")
