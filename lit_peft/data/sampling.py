"""Resumable, rank-sharded shuffling.

* The order of epoch ``e`` depends on ``(seed, e)`` only, never on how many epochs this process has already iterated,
  so a run resumed from a checkpoint sees the same batches as an uninterrupted one. Lightning calls ``set_epoch`` on
  a loader's sampler at the start of every epoch.
* Under DDP/FSDP2 the sampler shards that one permutation itself (it is a ``DistributedSampler``, so Lightning does
  not wrap it in a reshuffling ``DistributedSamplerWrapper``): ``W`` processes with batch ``B`` train on exactly the
  global batches of one process with batch ``W·B``.
* :class:`ResumableLoader` also restores the position *inside* an epoch from a mid-epoch checkpoint (Lightning
  saves and restores the ``state_dict`` of a training loader that has one)."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class EpochShuffleSampler(DistributedSampler):
    """This rank's share of a random permutation of ``range(len(data_source))`` drawn from a generator seeded with
    ``seed + epoch``.

    Rank ``r`` of ``W`` (``num_replicas``/``rank`` default to torch.distributed's world size and rank when it is
    initialised, else 1 and 0) yields ``perm[r::W]``, padded first like ``DistributedSampler`` (``drop_last=False``)
    with the permutation's first ``W·ceil(N/W) - N`` indices when ``W`` does not divide ``N``, so all ranks run the
    same number of steps. Batch ``k`` of size ``B`` on rank ``r`` is then ``perm[(k·B + j)·W + r]``, ``j < B``, and
    the ranks' batches ``k`` together are ``perm[k·W·B : (k+1)·W·B]``: exactly the single process's batch ``k`` of
    size ``W·B`` (only the last batch of an epoch differs, by the padding samples). ``W = 1`` is a plain shuffle.

    :meth:`skip_once` makes the next iteration start further in (mid-epoch resume, see :class:`ResumableLoader`)."""

    def __init__(self, data_source: Sized, seed: int = 0, num_replicas: int | None = None, rank: int | None = None):
        initialised = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed),
                         drop_last=False)
        self._skip = 0

    def skip_once(self, n: int) -> None:
        """The next iteration (only) leaves out this rank's first ``n`` indices of the epoch."""
        self._skip = int(n)

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return islice(super().__iter__(), skip, None)


class ResumableLoader(DataLoader):
    """A training DataLoader over an :class:`EpochShuffleSampler` that Lightning can resume mid-epoch.

    It counts the batches it has handed out in the current pass over an epoch; :meth:`state_dict` records that
    count with the epoch, batch size, world size, seed and dataset size, and Lightning stores it in every checkpoint
    (``loops.fit_loop.state_dict.combined_loader``). On a mid-epoch resume Lightning calls :meth:`load_state_dict`
    before it creates the epoch's iterator, and ``set_epoch`` after: the iterator is lazy (it starts the underlying
    DataLoader iterator, hence the workers' index queue, at the first ``next``), and when the epoch it then draws is
    the recorded one, the sampler leaves out the samples already consumed (they are never loaded, also with
    ``num_workers > 0``), so the resumed epoch continues with the uninterrupted run's next batch. A recorded epoch
    that is not the one drawn (an epoch-end checkpoint) is ignored.

    The position is a number of global batches, so the global batch (``batch_size`` × world size) must be what it
    was: a different world size with the same global batch resumes exactly (the global batches are the same,
    see :class:`EpochShuffleSampler`); a different global batch, seed or dataset size raises ``ValueError``."""

    _epoch = 0  # epoch of the current (or last) pass
    _consumed = 0  # batches handed out in that pass
    _resume: dict | None = None  # state to continue from, for the next pass

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        sampler = self.sampler
        if not isinstance(sampler, EpochShuffleSampler):  # replaced by Lightning (overfit_batches): plain pass
            yield from super().__iter__()
            return
        resume, self._resume = self._resume, None
        self._epoch, self._consumed = sampler.epoch, 0
        if resume is not None and resume["epoch"] == sampler.epoch and resume["batches"] > 0:
            self._check_resumable(resume)
            self._consumed = resume["batches"]
            sampler.skip_once(self._consumed * self.batch_size)
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        if not isinstance(sampler, EpochShuffleSampler):
            return {}
        return {"epoch": self._epoch, "batches": self._consumed, "batch_size": self.batch_size,
                "num_replicas": sampler.num_replicas, "seed": sampler.seed, "dataset_size": len(sampler.dataset)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict) if state_dict.get("batches") else None

    def _check_resumable(self, state: dict[str, Any]) -> None:
        now = self.state_dict()
        then_global, now_global = state["batch_size"] * state["num_replicas"], now["batch_size"] * now["num_replicas"]
        problems = [f"{key} {state[key]} then, {now[key]} now" for key in ("seed", "dataset_size")
                    if state[key] != now[key]]
        if then_global != now_global:
            problems.append(f"global batch {then_global} then ({state['batch_size']} x {state['num_replicas']} "
                            f"processes), {now_global} now ({now['batch_size']} x {now['num_replicas']} processes)")
        if problems:
            raise ValueError(
                f"cannot resume the training data in the middle of epoch {state['epoch']} (after {state['batches']} "
                f"batches): the checkpoint's data order does not match this run's ({'; '.join(problems)}). Keep "
                "data.seed, the training set and the global batch size (batch_size x devices x num_nodes) as they "
                "were, or resume from a checkpoint written at the end of an epoch")


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0,
                collate_fn=None, drop_last: bool = False) -> DataLoader:
    """A DataLoader that never draws from the global RNG (its own generator also seeds the workers), so data
    loading cannot shift the random stream that dropout uses. Shuffled (training) loaders are a
    :class:`ResumableLoader` over an :class:`EpochShuffleSampler`: seeded per epoch, sharded over the ranks in the
    single-process order, resumable mid-epoch."""
    return (ResumableLoader if shuffle else DataLoader)(
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
