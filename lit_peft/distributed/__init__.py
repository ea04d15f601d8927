"""Distributed plumbing: which process keeps and writes what, reading FSDP2 shards whole, sharding a backbone with
FSDP2/FSDP1 and the Lightning hooks that do it. The adapters (``lit_peft.adapters``) accept sharded tensors but make
no rank decisions of their own: the callers here and in the Lightning layer do."""

from .ranks import global_rank, is_distributed, is_global_zero
from .sharding import (check_fsdp1_options, default_shard_units, fsdp1_auto_wrap_policy, fsdp1_full_weights,
                       fully_shard_model, is_fsdp1, load_whole_state, shard_svd_tensors)
from .tensors import full_tensor, is_sharded

__all__ = ["check_fsdp1_options", "default_shard_units", "fsdp1_auto_wrap_policy", "fsdp1_full_weights",
           "full_tensor", "fully_shard_model", "global_rank", "is_distributed", "is_fsdp1", "is_global_zero",
           "is_sharded", "load_whole_state", "shard_svd_tensors"]
