"""Resumable shuffling: the order of epoch ``e`` depends on ``(seed, e)`` only, never on how many epochs this
process has already iterated, so a run resumed from a checkpoint sees the same batches as an uninterrupted one.
Lightning calls ``set_epoch`` on a loader's sampler at the start of every epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of ``range(len(data_source))`` drawn from a generator seeded with ``seed + epoch``."""

    def __init__(self, data_source: Sized, seed: int = 0):
        self.data_source = data_source
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())

    def __len__(self) -> int:
        return len(self.data_source)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0,
                collate_fn=None, drop_last: bool = False) -> DataLoader:
    """A DataLoader that never draws from the global RNG (its own generator also seeds the workers), so data
    loading cannot shift the random stream that dropout uses; training order from :class:`EpochShuffleSampler`."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(dataset, seed) if shuffle else None,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate_fn,
        drop_last=drop_last,
    )
