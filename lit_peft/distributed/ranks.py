"""Which process this is, for the callers that decide who keeps or writes what (the adapters never decide)."""

from __future__ import annotations

import torch.distributed as dist


def is_distributed() -> bool:
    """``torch.distributed`` is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_rank() -> int:
    """This process's global rank (0 without ``torch.distributed``)."""
    return dist.get_rank() if is_distributed() else 0


def is_global_zero() -> bool:
    """This process is global rank 0, or the only process: the one that keeps gathered results and writes files."""
    return global_rank() == 0
