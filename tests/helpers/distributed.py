"""Distributed runs on the CPU with gloo: workers spawned without Lightning, and ``python -m lit_peft fit`` on the
tiny ViT (single process vs DDP vs FSDP2, with the shipped ``configs/strategy`` overlays) with a callback that
records every rank's losses and batches."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from helpers.cli import REPO, read_metrics, run_cli, write_config

#: skip a test (or, as ``pytestmark``, a file) where torch.distributed has no gloo
NEEDS_GLOO = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available() or sys.platform == "win32",
                                reason="needs torch.distributed with gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_workers(target, world: int, *args) -> None:
    """``target(rank, world, port, *args, errors)`` in ``world`` spawned processes (gloo needs a free port); fails with
    the tracebacks the workers put on ``errors``."""
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    port = free_port()
    processes = [context.Process(target=target, args=(r, world, port, *args, errors)) for r in range(world)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=600)
    for p in processes:
        if p.is_alive():
            p.kill()
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not messages, "\n".join(messages)
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]


#: the callbacks module a CLI run imports as ``recorder`` (written into its working folder)
RECORDER = '''
import json
from pathlib import Path

import lightning as L


class RecordSteps(L.Callback):
    """Per rank: the training loss of every step and a fingerprint of every sample of its batch (the sum of its
    pixels, or of its token ids for a text batch)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        samples = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        self.steps.append({"loss": float(outputs["loss"]),
                           "samples": [round(float(s), 2) for s in samples.double().flatten(1).sum(1)]})

    def on_train_end(self, trainer, pl_module):
        path = Path(self.folder) / f"steps-rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.steps))


class FailAfter(L.Callback):
    """Raises on every rank once `steps` training steps are done (and checkpointed), as a crashed job would."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.steps:
            raise RuntimeError(f"FailAfter: stopped after step {self.steps}")
'''

ADAPTERS = {
    "boft": {"class_path": "lit_peft.adapters.BOFT",
             "init_args": {"block_size": 8, "n_butterfly_factors": 2, "dropout": 0.1, "train_bias": True,
                           "target_modules": ["qkv", "proj", "fc1", "fc2"]}},
    "svft": {"class_path": "lit_peft.adapters.SVFT",
             "init_args": {"pattern": "banded", "off_diag": 1, "target_modules": ["qkv", "proj", "fc1", "fc2"]}},
}
#: name -> (extra CLI arguments, processes, per-process batch size); global batch 8 in all three: 2 steps per epoch
RUNS = {"single": ([], 1, 8),
        "ddp": (["--config", str(REPO / "configs" / "strategy" / "ddp.yaml")], 2, 4),
        "fsdp": (["--config", str(REPO / "configs" / "strategy" / "fsdp.yaml")], 2, 4)}


def fit(tmp: Path, data_root: Path, method: str, run: str, name: str = "", callbacks: tuple = (),
        args: tuple = ()) -> dict:
    """One ``fit`` run of the tiny ViT in ``tmp`` (which holds ``recorder.py``) with ``ADAPTERS[method]`` and
    ``RUNS[run]`` (``name`` defaults to ``<method>-<run>``; extra ``callbacks`` configs and CLI ``args``)."""
    extra, processes, batch_size = RUNS[run]
    name = name or f"{method}-{run}"
    record = tmp / name
    record.mkdir()
    callbacks = [{"class_path": "recorder.RecordSteps", "init_args": {"folder": str(record)}}, *callbacks]
    if method == "svft":
        callbacks.append({"class_path": "lit_peft.callbacks.SVDCache", "init_args": {"cache_dir": str(tmp / "svd")}})
    config = write_config(tmp, data_root, ADAPTERS[method], max_epochs=3, callbacks=callbacks, name=name)
    output = run_cli("fit", "--config", str(config), *extra, f"--trainer.devices={processes}",
                     "--trainer.accelerator=cpu", f"--data.init_args.batch_size={batch_size}", "--test_after_fit=null",
                     *args, cwd=tmp)
    ranks = [json.loads((record / f"steps-rank{r}.json").read_text()) for r in range(processes)]
    assert len({len(steps) for steps in ranks}) == 1, [len(s) for s in ranks]
    version = tmp / "runs" / name / "version_0"
    logged = sorted((int(r["step"]), float(r["train_loss"])) for r in read_metrics(version) if r.get("train_loss"))
    return {"output": output,
            "losses": [sum(rank[i]["loss"] for rank in ranks) / processes for i in range(len(ranks[0]))],
            "train_loss": [loss for _, loss in logged],
            "samples": [sorted(s for rank in ranks for s in rank[i]["samples"]) for i in range(len(ranks[0]))],
            "merged": load_file(version / "merged" / "model.safetensors"),
            "adapter": version / "merged" / "adapter" / "adapter.safetensors",
            "checkpoint": version / "checkpoints" / "last.ckpt"}
