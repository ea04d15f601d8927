#!/usr/bin/env python3
"""Scaling figures for the README's "Scaling out" section: training throughput of 1 process vs 2 processes (DDP,
FSDP2) through the real CLI, and the memory each adapter adds per parameter of the base model.

``throughput``: for each adapter config (``configs/vtab_{lora,boft,svft}.yaml``, the paper settings) and each
strategy, one ``python -m lit_peft fit`` run on generated VTAB-layout images (no download) with a randomly
initialised timm backbone (``--backbone``, default ``vit_small_patch16_224`` at ``--img-size`` 112 on the CPU).
The global batch is the same in every run (``--global-batch``: 1 process × B, or 2 processes × B/2 with
``configs/strategy/ddp.yaml`` / ``fsdp.yaml``), so the figures are strong scaling: samples per second of the
whole job, from rank 0's wall time per optimiser step over the steps after ``--warmup`` (median). On the CPU the
cores are split between the processes (``OMP_NUM_THREADS`` = cores / processes), so 2 processes use the same
hardware as 1 and the ratio shows what data parallelism costs or gains there; on a GPU machine pass
``--accelerator gpu`` (2 processes then need 2 GPUs).

``memory``: apply each adapter with the paper settings to a randomly initialised model and count, per parameter
of the frozen base model, the bytes of training state the adapter adds: its trainable parameters with their
float32 gradient and AdamW's two float32 moments (16 bytes each), plus the adapter's frozen tensors (SVFT's
``U``, ``Σ``, ``V``; VeRA's shared ``A``, ``B``). Activation memory is per token, not per parameter: see
docs/benchmarks.md. Under FSDP2 the parameters, gradients and optimiser state are sharded (divided by the
number of processes), and so are SVFT's ``U``/``Σ``/``V`` (held as frozen parameters by ``fully_shard_model``;
scripts/svft_memory.py measures it).

Examples::

    python scripts/bench_scaling.py throughput --out docs/scaling.md        # CPU, about 10 minutes on 2 cores
    python scripts/bench_scaling.py memory --out docs/scaling.md            # about 2 minutes (SVDs)
    python scripts/bench_scaling.py throughput --accelerator gpu --backbone vit_large_patch14_dinov2 \\
        --img-size 224 --global-batch 64 --precision bf16-mixed --out docs/scaling.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
TASK = "patch_camelyon"

TIMER = '''
import json
import time
from pathlib import Path

import lightning as L


class StepTimer(L.Callback):
    """Rank 0: wall time of every optimiser step (batch start to batch end, the data loading included)."""

    def __init__(self, out: str):
        self.out = out
        self.times = []
        self.start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self.start)

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            Path(self.out).write_text(json.dumps({"times": self.times, "world_size": trainer.world_size}))
'''

METHODS = {"lora": "vtab_lora.yaml", "boft": "vtab_boft.yaml", "svft": "vtab_svft.yaml"}
STRATEGIES = {"single": (None, 1), "ddp": ("ddp.yaml", 2), "fsdp": ("fsdp.yaml", 2)}


def make_images(root: Path, n: int, size: int) -> Path:
    """A VTAB-1k prepared folder for TASK with ``n`` random training images of ``size`` pixels."""
    import numpy as np
    from PIL import Image

    folder = root / TASK
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        name = f"images/train_{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / name)
        rows.append(f"{name} {i % 2}")
    for split in ("train800", "val200", "test", "train800val200"):
        (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def throughput_run(args, work: Path, method: str, strategy: str, data_root: Path) -> dict:
    overlay, processes = STRATEGIES[strategy]
    out = work / f"{method}-{strategy}.json"
    batch = args.global_batch // processes
    command = [sys.executable, "-m", "lit_peft", "fit", "--config", str(CONFIGS / METHODS[method])]
    if overlay:
        command += ["--config", str(CONFIGS / "strategy" / overlay)]
    command += [
        f"--trainer.accelerator={args.accelerator}", f"--trainer.devices={processes}",
        f"--trainer.precision={args.precision}", f"--trainer.max_steps={args.warmup + args.steps}",
        "--trainer.max_epochs=-1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false", "--trainer.logger=false", f"--trainer.default_root_dir={work / 'runs'}",
        "--trainer.callbacks+=" + json.dumps({"class_path": "timer.StepTimer", "init_args": {"out": str(out)}}),
        f"--model.init_args.backbone={args.backbone}", "--model.init_args.pretrained=false",
        "--model.init_args.num_classes=2", f"--model.init_args.img_size={args.img_size}",
        f"--data.init_args.data_root={data_root}", f"--data.init_args.task={TASK}",
        f"--data.init_args.img_size={args.img_size}", f"--data.init_args.batch_size={batch}",
        "--data.init_args.num_workers=0", "--test_after_fit=null",
    ]
    threads = max(1, (os.cpu_count() or 1) // processes) if args.accelerator == "cpu" else 1
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method}/{strategy} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    record = json.loads(out.read_text())
    times = record["times"][args.warmup:]
    step = statistics.median(times)
    return {"method": method, "strategy": strategy, "processes": record["world_size"], "per_process_batch": batch,
            "threads": threads, "step_s": step, "samples_per_s": args.global_batch / step}


def throughput(args) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "timer.py").write_text(TIMER)
        data_root = make_images(work / "vtab", args.global_batch * (args.warmup + args.steps), args.img_size)
        rows = []
        for method in args.methods:
            for strategy in args.strategies:
                row = throughput_run(args, work, method, strategy, data_root)
                print(json.dumps(row), flush=True)
                rows.append(row)
    lines = ["| adapter | strategy | processes × batch | threads / process | s / step (median) | samples / s | "
             "vs 1 process |", "|---|---|---|---|---|---|---|"]
    single = {r["method"]: r["samples_per_s"] for r in rows if r["strategy"] == "single"}
    for r in rows:
        ratio = f"{r['samples_per_s'] / single[r['method']]:.2f}×" if r["method"] in single else "–"
        lines.append(f"| {r['method']} | {r['strategy']} | {r['processes']} × {r['per_process_batch']} | "
                     f"{r['threads']} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | {ratio} |")
    return "\n".join(lines)


VISION_CONFIGS = ("vtab_lora", "vtab_boft", "vtab_oft", "vtab_svft", "fewshot_svft_plain", "fewshot_svft_random",
                  "fewshot_vera")
LANGUAGE_CONFIGS = ("math_lora", "math_dora", "math_boft", "math_svft_plain", "math_svft_banded", "math_svft_random")


def memory_rows(model_name: str, build, configs: tuple[str, ...]) -> list[str]:
    """One row per shipped config: its adapter (the paper setting) applied to ``build()``."""
    import importlib

    import torch
    import yaml

    rows = []
    for config in configs:
        spec = yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())["model"]["init_args"]["adapter"]
        model = build()
        base = sum(p.numel() for p in model.parameters())
        base_buffers = {id(b) for b in model.buffers()}
        module_name, _, class_name = spec["class_path"].rpartition(".")
        init = dict(spec["init_args"])
        init["trainable_modules"] = []
        strategy = getattr(importlib.import_module(module_name), class_name)(**init)
        strategy.apply(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        seen, frozen_bytes = set(), 0
        for buffer in model.buffers():
            if id(buffer) not in base_buffers and id(buffer) not in seen:
                seen.add(id(buffer))
                frozen_bytes += buffer.numel() * buffer.element_size()
        state = 16 * trainable
        rows.append(f"| {model_name} | {config} | {trainable:,} ({100 * trainable / base:.3f}%) | "
                    f"{state / base:.3f} | {frozen_bytes / base:.3f} | {(state + frozen_bytes) / base:.3f} |")
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def memory(args) -> str:
    import timm
    import torch

    torch.manual_seed(0)
    vit = lambda: timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)  # noqa: E731

    def llama_layer():
        """One decoder layer of Llama-2-7B's shape (hidden 4096, MLP 11008): per-parameter figures of a whole
        7B model are those of its layers (embeddings and head are not adapted)."""
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                             num_key_value_heads=32)
        holder = torch.nn.Module()
        holder.layers = torch.nn.ModuleList([LlamaDecoderLayer(config, 0)])
        return holder

    lines = ["| base model | adapter config | trainable parameters | training state (B / base param) | "
             "frozen adapter tensors (B / base param) | total (B / base param) |", "|---|---|---|---|---|---|"]
    lines += memory_rows("ViT-B/16 (86M)", vit, VISION_CONFIGS)
    if args.llama:
        lines += memory_rows("Llama-2-7B layer (202M)", llama_layer, LANGUAGE_CONFIGS)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    run = sub.add_parser("throughput")
    run.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    run.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    run.add_argument("--backbone", default="vit_small_patch16_224")
    run.add_argument("--img-size", type=int, default=112)
    run.add_argument("--global-batch", type=int, default=16)
    run.add_argument("--warmup", type=int, default=2)
    run.add_argument("--steps", type=int, default=6)
    run.add_argument("--accelerator", default="cpu")
    run.add_argument("--precision", default="32-true")
    mem = sub.add_parser("memory")
    mem.add_argument("--llama", action=argparse.BooleanOptionalAction, default=True,
                     help="also a Llama-2-7B-shaped decoder layer (about 1 GB of float32 weights and its SVDs)")
    for p in (run, mem):
        p.add_argument("--out", type=Path, help="append the table, with the command, to this markdown file")
    args = parser.parse_args()
    if args.what == "throughput" and args.global_batch % 2:
        parser.error(f"--global-batch must be even (split over 2 processes), got {args.global_batch}")
    table = throughput(args) if args.what == "throughput" else memory(args)
    print(table)
    if args.out:
        stamp = datetime.date.today().isoformat()
        command = "python scripts/bench_scaling.py " + shlex.join(sys.argv[1:])
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        block = f"\n### {args.what} ({stamp}, {machine})\n\n`{command}`\n\n{table}\n"
        with open(args.out, "a") as f:
            f.write(block)


if __name__ == "__main__":
    main()
