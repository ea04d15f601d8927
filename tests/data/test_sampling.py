"""The training sampler and loader of ``lit_peft.data.sampling``: rank sharding in the single-process order, the
per-epoch seeding, and mid-epoch resume (state_dict / load_state_dict), alone and through a Lightning Trainer."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import Dataset, DistributedSampler, TensorDataset

from lit_peft.data.sampling import EpochShuffleSampler, ResumableLoader, make_loader


def rank_loader(n: int, batch_size: int, world: int, rank: int, seed: int = 0, num_workers: int = 0):
    data = TensorDataset(torch.arange(n))
    return ResumableLoader(data, batch_size=batch_size, sampler=EpochShuffleSampler(data, seed, world, rank),
                           num_workers=num_workers)


def batches(loader, epoch: int = 0, limit: int | None = None) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    out = []
    for (batch,) in loader:
        out.append(batch.tolist())
        if len(out) == limit:
            break
    return out


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [24, 25])
def test_ranks_together_are_the_single_process_batches(world, n):
    per_rank = 2
    single = batches(rank_loader(n, world * per_rank, 1, 0), epoch=1)
    ranks = [batches(rank_loader(n, per_rank, world, r), epoch=1) for r in range(world)]
    assert len({len(r) for r in ranks}) == 1  # same number of steps on every rank
    assert len(ranks[0]) == len(single)
    for k, expected in enumerate(single):
        together = sorted(i for rank in ranks for i in rank[k])
        if k < len(single) - 1 or n % world == 0:
            assert together == sorted(expected), k
        else:  # the last batch: padded with the epoch's first samples so every rank has as many samples
            assert together == sorted(expected + single[0][:-n % world]), k


def mode_loader(n: int, batch_size: int, world: int, rank: int, last_batch: str, seed: int = 0):
    data = TensorDataset(torch.arange(n))
    sampler = EpochShuffleSampler(data, seed, world, rank, batch_size=batch_size, last_batch=last_batch)
    return ResumableLoader(data, batch_size=batch_size, sampler=sampler)


@pytest.mark.parametrize("last_batch", ["pad", "drop"])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [24, 25, 29])
def test_pad_and_drop_give_every_world_size_the_single_process_batches(last_batch, world, n):
    """With ``pad`` or ``drop``, W processes of batch B train on exactly the batches of one process of batch W·B,
    the epoch's last batch included (the demo's 537 images under DDP: the losses match to the end)."""
    per_rank = 2
    single = batches(mode_loader(n, world * per_rank, 1, 0, last_batch), epoch=1)
    ranks = [batches(mode_loader(n, per_rank, world, r, last_batch), epoch=1) for r in range(world)]
    assert all(len(r) == len(single) for r in ranks)
    assert all(len(b) == world * per_rank for b in single)  # every batch full
    for k, expected in enumerate(single):
        assert sorted(i for rank in ranks for i in rank[k]) == sorted(expected), k
    seen = [i for b in single for i in b]
    perm = [i for b in batches(rank_loader(n, n, 1, 0), epoch=1) for i in b]
    global_batch = world * per_rank
    if last_batch == "pad":  # every example once, then the permutation's first ones again to fill the last batch
        assert len(single) == -(-n // global_batch) and seen == (perm + perm)[:len(seen)]
    else:  # a whole number of global batches of the permutation
        assert len(single) == n // global_batch and seen == perm[:len(seen)]


def test_pad_and_drop_resume_mid_epoch_and_refuse_too_small_data():
    loader = mode_loader(25, 4, 1, 0, "pad")
    full = batches(loader, epoch=2)
    resumed = mode_loader(25, 4, 1, 0, "pad")
    resumed.load_state_dict({**loader.state_dict(), "epoch": 2, "batches": 3})
    assert batches(resumed, epoch=2) == full[3:]
    assert len(batches(mode_loader(5, 4, 2, 0, "pad"))) == 1  # a set smaller than a global batch: padded
    with pytest.raises(ValueError, match=r"5 examples, fewer than one global batch of 8 \(batch_size 4 x 2 "
                                         r"processes\), so last_batch: drop leaves no batch"):
        mode_loader(5, 4, 2, 0, "drop")
    with pytest.raises(ValueError, match="last_batch must be one of pad, drop, partial, got 'keep'"):
        mode_loader(5, 4, 1, 0, "keep")


def test_padding_repeats_the_first_samples():
    perm = [i for b in batches(rank_loader(10, 10, 1, 0)) for i in b]
    shards = [[i for b in batches(rank_loader(10, 4, 3, r)) for i in b] for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert [shards[k % 3][k // 3] for k in range(12)] == perm + perm[:2]


def test_order_depends_on_seed_and_epoch_only():
    walked = rank_loader(12, 4, 2, 1)
    for epoch in range(3):
        last = batches(walked, epoch)
    assert last == batches(rank_loader(12, 4, 2, 1), epoch=2)
    assert batches(rank_loader(12, 4, 2, 1), epoch=1) != last
    assert batches(rank_loader(12, 4, 2, 1, seed=1), epoch=2) != last


def test_world_size_comes_from_torch_distributed(monkeypatch):
    data = TensorDataset(torch.arange(10))
    loader = make_loader(data, batch_size=2, shuffle=True, seed=0)
    assert isinstance(loader, ResumableLoader) and isinstance(loader.sampler, DistributedSampler)
    assert (loader.sampler.num_replicas, loader.sampler.rank) == (1, 0)
    assert type(make_loader(data, batch_size=2, shuffle=False, seed=0)) is torch.utils.data.DataLoader
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 2)
    sampler = make_loader(data, batch_size=2, shuffle=True, seed=0).sampler
    assert (sampler.num_replicas, sampler.rank, len(sampler)) == (3, 2, 4)


class Recording(Dataset):
    """``arange(n)`` (as 1-tuples) that remembers which items were loaded (in this process)."""

    def __init__(self, n: int):
        self.n, self.loaded = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.loaded.append(i)
        return (torch.tensor(i),)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_dict_resumes_mid_epoch(num_workers):
    full = batches(make_loader(TensorDataset(torch.arange(20)), 3, True, seed=5), epoch=1)
    first = make_loader(TensorDataset(torch.arange(20)), 3, True, seed=5)
    assert batches(first, epoch=1, limit=4) == full[:4]
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 4, "batch_size": 3, "num_replicas": 1, "seed": 5, "dataset_size": 20}

    data = Recording(20)
    resumed = make_loader(data, 3, True, seed=5, num_workers=num_workers)
    resumed.load_state_dict(state)
    iterator = iter(resumed)  # Lightning creates the iterator first, then sets the epoch
    resumed.sampler.set_epoch(1)
    assert [b.tolist() for (b,) in iterator] == full[4:]
    if num_workers == 0:
        assert sorted(data.loaded) == sorted(i for b in full[4:] for i in b)  # skipped samples are never loaded
    assert resumed.state_dict()["batches"] == len(full)  # the count goes on from the restored position
    assert batches(resumed, epoch=1) == full  # the skip applies to one pass only
    # a state from another epoch (an epoch-end checkpoint) is ignored
    resumed.load_state_dict(state)
    assert batches(resumed, epoch=2) == batches(make_loader(TensorDataset(torch.arange(20)), 3, True, seed=5), 2)


def test_resume_with_another_world_size_and_the_same_global_batch():
    single = rank_loader(21, 4, 1, 0)
    full = batches(single, epoch=0)
    batches(single, epoch=0, limit=2)
    state = single.state_dict()
    ranks = [rank_loader(21, 2, 2, r) for r in range(2)]
    rest = []
    for loader in ranks:
        loader.load_state_dict(state)
        rest.append(batches(loader, epoch=0))
    assert [sorted(a + b) for a, b in zip(*rest)][:-1] == [sorted(b) for b in full[2:-1]]


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 2}, r"global batch 6 then \(3 x 2 processes\), 4 now \(2 x 2 processes\)"),
    ({"seed": 1}, "seed 0 then, 1 now"),
    ({"n": 19}, "dataset_size 20 then, 19 now"),
])
def test_mismatched_state_is_a_clear_error(change, message):
    first = rank_loader(20, 3, 2, 0)
    batches(first, epoch=0, limit=2)
    setup = {"n": 20, "batch_size": 3, "world": 2, "rank": 0, "seed": 0, **change}
    other = rank_loader(**setup)
    other.load_state_dict(first.state_dict())
    other.sampler.set_epoch(0)
    with pytest.raises(ValueError, match="cannot resume the training data in the middle of epoch 0 "
                                         r"\(after 2 batches\).*" + message):
        next(iter(other))


# -- through Lightning ------------------------------------------------------------------------------------------

class Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        self.seen.append((self.current_epoch, batch_idx, x.tolist()))
        return self.layer(x.float()[:, None]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Data(L.LightningDataModule):
    def __init__(self, num_workers: int):
        super().__init__()
        self.num_workers = num_workers

    def train_dataloader(self):
        return make_loader(Recording(14), 3, True, seed=2, num_workers=self.num_workers)


class Crash(Callback):
    """Fails after the 7th step, after the checkpoint of the 6th (Lightning runs ModelCheckpoint last)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 7:
            raise RuntimeError("crash")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_lightning_resumes_mid_epoch(tmp_path, num_workers, recwarn):
    def trainer(*callbacks):
        return L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks))

    reference = Linear()
    trainer().fit(reference, Data(num_workers))
    assert len(reference.seen) == 15  # 5 batches per epoch
    crashed = Linear()
    checkpoints = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    with pytest.raises(RuntimeError, match="crash"):
        trainer(checkpoints, Crash()).fit(crashed, Data(num_workers))
    resumed = Linear()
    trainer().fit(resumed, Data(num_workers), ckpt_path=tmp_path / "ckpt" / "step=6.ckpt")
    assert resumed.seen[0][:2] == (1, 1)  # step 6 was epoch 1's first batch
    assert crashed.seen[:6] + resumed.seen == reference.seen
    assert not [w for w in recwarn if "not resumable" in str(w.message)]
