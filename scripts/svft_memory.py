#!/usr/bin/env python3
"""SVFT's frozen ``U``, ``Σ``, ``V`` on SmolLM2-135M-Instruct: bytes per process at full rank and with ``svd_rank``,
in one process and per rank under FSDP2 (2 CPU processes, gloo), measured on the model.

For each setting the script applies SVFT to every projection of the 30 decoder layers (as the comparison harness's
rt-smollm2 task does), then adds up the ``U``/``S``/``V`` tensors each process holds: whole tensors in one process;
under FSDP2, after lit_peft's ``fully_shard_model`` (which turns them into frozen parameters that ``fully_shard``
shards with the base weights), the local shards (``DTensor.to_local()``). The frozen base's own linear weights are
given for scale. Accuracy of the truncated ranks: the harness rows ``svft-*-k64`` (docs/svft_memory.md).

    python scripts/svft_memory.py --out docs/svft_memory.md       # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_peft.files import atomic_write_text

LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(model_path: str, pattern: str, svd_rank: int | None, cache: str):
    from transformers import AutoModelForCausalLM

    from lit_peft.adapters import SVFT
    from lit_peft.callbacks import SVDCache

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    strategy = SVFT(pattern=pattern, off_diag=2, svd_rank=svd_rank, target_modules=LLM_TARGETS)
    strategy.apply(model, svd_provider=SVDCache(cache))
    return model


def svd_bytes(model) -> tuple[int, int]:
    """(bytes this process holds of every U, S, V, bytes of them whole)."""
    from lit_peft.adapters.svft import SVFTPart

    local = whole = 0
    for part in model.modules():
        if isinstance(part, SVFTPart):
            for name in SVFTPart.FROZEN_TENSORS:
                t = getattr(part, name)
                size = t.element_size()
                whole += t.numel() * size
                local += (t.to_local() if hasattr(t, "to_local") else t).numel() * size
    return local, whole


def linear_weight_bytes(model) -> int:
    """Bytes of the adapted layers' frozen weights (the 210 projections; not the tied embedding / lm_head)."""
    from lit_peft.adapters import adapted_layers

    return sum(layer.weight.numel() * layer.weight.element_size() for layer in adapted_layers(model).values())


def fsdp_worker(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    from lit_peft.distributed import default_shard_units, fully_shard_model

    rows = []
    for pattern, svd_rank in args.settings:
        model = build(args.model_path, pattern, svd_rank, args.cache)
        before, _ = svd_bytes(model)
        mesh = init_device_mesh("cpu", (world,))
        fully_shard_model(model, default_shard_units(model.model), mesh)
        local, whole = svd_bytes(model)
        rows.append({"pattern": pattern, "svd_rank": svd_rank, "rank": rank, "before": before, "local": local,
                     "whole": whole})
        del model
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        Path(out).write_text(json.dumps([r for per_rank in gathered for r in per_rank]))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 128], help="svd_rank values besides full rank")
    parser.add_argument("--patterns", nargs="+", default=["plain", "banded"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from lit_peft import assets

    args.model_path = str(assets.path("smollm2-135m-instruct"))
    args.settings = [(p, r) for p in args.patterns for r in [None, *args.ranks]]
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="svft-mem-") as tmp:
        args.cache = os.path.join(tmp, "svd")
        single = {}
        for pattern, svd_rank in args.settings:
            model = build(args.model_path, pattern, svd_rank, args.cache)
            single[(pattern, svd_rank)] = (svd_bytes(model)[0], linear_weight_bytes(model),
                                           sum(p.numel() for p in model.parameters() if p.requires_grad))
            del model
        out = os.path.join(tmp, "fsdp.json")
        mp.spawn(fsdp_worker, args=(2, free_port(), args, out), nprocs=2, join=True)
        fsdp = json.loads(Path(out).read_text())
    mib = 2 ** 20
    lines = [f"Command: `{command}`  ", f"Date: {time.strftime('%Y-%m-%d')}, {time.perf_counter() - start:.0f} s  ",
             "Model: SmolLM2-135M-Instruct, float32, SVFT on the 7 projections of 30 decoder layers; the 210 "
             f"linear weights hold {next(iter(single.values()))[1] / mib:.0f} MiB", "",
             "| pattern | svd_rank | trainable values | U, Σ, V: 1 process (MiB) | × the linear weights | "
             "FSDP2, 2 processes: per rank (MiB), rank 0 / rank 1 |", "|---|---|---:|---:|---:|---:|"]
    for pattern, svd_rank in args.settings:
        uv, weights, trainable = single[(pattern, svd_rank)]
        per_rank = sorted((r for r in fsdp if r["pattern"] == pattern and r["svd_rank"] == svd_rank),
                          key=lambda r: r["rank"])
        shards = " / ".join(f"{r['local'] / mib:.1f}" for r in per_rank)
        lines.append(f"| {pattern} | {'full (576)' if svd_rank is None else svd_rank} | {trainable:,} | "
                     f"{uv / mib:.1f} | {uv / weights:.2f}× | {shards} |")
    body = "\n".join(lines) + "\n"
    print(body)
    if args.out:
        atomic_write_text(args.out, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
