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


#: What a training loader does with an epoch's last, partial global batch (:class:`EpochShuffleSampler`)
LAST_BATCH_MODES = ("pad", "drop", "partial")


class EpochShuffleSampler(DistributedSampler):
    """This rank's share of a random permutation of ``range(len(data_source))`` drawn from a generator seeded with
    ``seed + epoch``.

    Rank ``r`` of ``W`` (``num_replicas``/``rank`` default to torch.distributed's world size and rank when it is
    initialised, else 1 and 0) yields ``perm[r::W]``, padded first like ``DistributedSampler`` (``drop_last=False``)
    with the permutation's first ``W·ceil(N/W) - N`` indices when ``W`` does not divide ``N``, so all ranks run the
    same number of steps. Batch ``k`` of size ``B`` on rank ``r`` is then ``perm[(k·B + j)·W + r]``, ``j < B``, and
    the ranks' batches ``k`` together are ``perm[k·W·B : (k+1)·W·B]``: exactly the single process's batch ``k`` of
    size ``W·B`` (only the last batch of an epoch differs, by the padding samples). ``W = 1`` is a plain shuffle.

    The epoch's last global batch, when ``W·B`` does not divide ``N``, is what ``last_batch`` says (``batch_size``
    ``B`` is needed for ``pad`` and ``drop``):

    * ``"pad"``: the permutation is extended with its own first indices to a whole number of global batches, so
      every batch is full and ``W`` processes train on exactly the batches of one process with batch ``W·B``
      (a few examples are seen twice in the epoch's last batch);
    * ``"drop"``: the permutation is cut to a whole number of global batches (the same batches for any ``W``; up
      to ``W·B − 1`` examples, different ones each epoch, are not seen in that epoch);
    * ``"partial"``: ``DistributedSampler``'s own rule (padded to a multiple of ``W`` only): one process has a
      short last batch, ``W`` processes have short last batches that together are not the single process's.

    :meth:`skip_once` makes the next iteration start further in (mid-epoch resume, see :class:`ResumableLoader`)."""

    def __init__(self, data_source: Sized, seed: int = 0, num_replicas: int | None = None, rank: int | None = None,
                 batch_size: int | None = None, last_batch: str = "partial"):
        initialised = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed),
                         drop_last=False)
        if last_batch not in LAST_BATCH_MODES:
            raise ValueError(f"last_batch must be one of {', '.join(LAST_BATCH_MODES)}, got {last_batch!r}")
        self.last_batch = last_batch
        if last_batch != "partial":
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"last_batch: {last_batch} needs the batch size (an integer >= 1), got {batch_size!r}")
            n, per_step = len(self.dataset), batch_size * self.num_replicas
            steps = -(-n // per_step) if last_batch == "pad" else n // per_step
            if steps == 0:
                raise ValueError(
                    f"the training set has {n} examples, fewer than one global batch of {per_step} (batch_size "
                    f"{batch_size} x {self.num_replicas} processes), so last_batch: drop leaves no batch; lower "
                    "batch_size or use last_batch: pad")
            self.total_size = steps * per_step
            self.num_samples = steps * batch_size
        self._skip = 0

    def _indices(self) -> list[int]:
        """This epoch's whole (padded or cut) permutation, before it is sharded over the ranks."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.dataset), generator=g).tolist()
        if self.total_size <= len(perm):
            return perm[:self.total_size]
        repeats = -(-(self.total_size - len(perm)) // len(perm))
        return (perm + perm * repeats)[:self.total_size]

    def skip_once(self, n: int) -> None:
        """The next iteration (only) leaves out this rank's first ``n`` indices of the epoch."""
        self._skip = int(n)

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        if self.last_batch == "partial":
            return islice(super().__iter__(), skip, None)
        return islice(iter(self._indices()[self.rank:self.total_size:self.num_replicas]), skip, None)


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
                collate_fn=None, drop_last: bool = False, last_batch: str = "partial") -> DataLoader:
    """A DataLoader that never draws from the global RNG (its own generator also seeds the workers), so data
    loading cannot shift the random stream that dropout uses. Shuffled (training) loaders are a
    :class:`ResumableLoader` over an :class:`EpochShuffleSampler`: seeded per epoch, sharded over the ranks in the
    single-process order, resumable mid-epoch, with ``last_batch`` (``pad``/``drop``/``partial``) deciding the
    epoch's last global batch."""
    return (ResumableLoader if shuffle else DataLoader)(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(dataset, seed, batch_size=batch_size, last_batch=last_batch) if shuffle else None,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate_fn,
        drop_last=drop_last,
    )
