#!/usr/bin/env python3
"""Cold vs warm ``SVDCache`` on the linears SVFT adapts in a ViT, through the callback's own ``setup``.

The model is ``timm.create_model(--model, pretrained=False)`` (random weights: an SVD costs the same whatever
the values) and the adapter ``SVFT(target_modules=["qkv", "proj", "fc1", "fc2"])`` with the fused ``qkv`` split
into q, k, v, so ViT-B gives 12 blocks × (3 + 1 + 1 + 1) = 72 SVDs.

* cold: an empty cache folder; ``SVDCache.setup`` computes every canonical SVD (``torch.linalg.svd`` in
  ``--svd-dtype``) and writes each entry (temporary name, then rename);
* warm: a new ``SVDCache`` on the same folder; ``setup`` hashes each weight, reads its entry and verifies it
  (metadata repeats the key and shapes, ``U diag(S) Vᵀ`` reproduces the weight) — no SVD.

Both runs go through ``SVDCache.setup`` with a minimal stand-in trainer (single process: rank 0, no-op barrier),
timed with ``time.perf_counter`` around the call. The warm run reads files the cold run has just written, so they
are in the OS page cache (a warm run after a reboot also pays the disk read). Prints a markdown table.

Examples::

    python scripts/bench_svd_cache.py                                   # ViT-B, float32, temporary cache
    python scripts/bench_svd_cache.py --svd-dtype float64 --cache-dir /tmp/svd
    python scripts/bench_svd_cache.py --model vit_small_patch16_224
"""

from __future__ import annotations

import argparse
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import timm
import torch

from lit_peft.adapters import SVFT
from lit_peft.callbacks import SVDCache

TARGETS = ["qkv", "proj", "fc1", "fc2"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--cache-dir", default=None,
                        help="cache folder, empty or missing (default: a temporary folder, removed afterwards)")
    parser.add_argument("--svd-dtype", default="float32", choices=["float32", "float64"], help="SVD precision")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return parser.parse_args(argv)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_setup(cache_dir: Path, model: torch.nn.Module, svd_dtype: str) -> tuple[float, SVDCache]:
    """One ``SVDCache.setup`` on a fresh callback (and a fresh, un-adapted strategy); returns (seconds, cache)."""
    cache = SVDCache(cache_dir=str(cache_dir))
    adapter = SVFT(target_modules=TARGETS, svd_dtype=svd_dtype)
    module = SimpleNamespace(model=model, adapter=adapter)
    trainer = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda name=None: None))
    start = time.perf_counter()
    cache.setup(trainer, module, "fit")
    return time.perf_counter() - start, cache


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()

    temporary = args.cache_dir is None
    cache_dir = Path(tempfile.mkdtemp(prefix="svd_cache_bench_")) if temporary else Path(args.cache_dir)
    if not temporary and cache_dir.exists() and any(cache_dir.iterdir()):
        sys.exit(f"--cache-dir {cache_dir} is not empty; the cold run needs an empty folder")
    try:
        cold_s, cold = run_setup(cache_dir, model, args.svd_dtype)
        warm_s, warm = run_setup(cache_dir, model, args.svd_dtype)
        entries = sorted(cache_dir.glob("*.safetensors"))
        size_mib = sum(p.stat().st_size for p in entries) / 2**20
    finally:
        if temporary:
            shutil.rmtree(cache_dir, ignore_errors=True)

    if cold.misses != len(entries) or cold.hits or warm.misses or warm.hits != len(entries):
        sys.exit(f"unexpected cache behaviour: cold {cold.misses} computed / {cold.hits} loaded, warm "
                 f"{warm.misses} computed / {warm.hits} loaded, {len(entries)} entries")

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else
                                                                           sys.argv[1:])])
    print(f"`{command}`  ")
    print(f"model {args.model} (random weights), SVFT targets {'/'.join(TARGETS)} (qkv split into q, k, v), "
          f"SVD in {args.svd_dtype}; torch {torch.__version__}, timm {timm.__version__}, "
          f"{torch.get_num_threads()} intra-op threads, {cpu_name()}\n")
    print("| SVDs | cold: compute + write (s) | warm: load + verify (s) | speed-up | cache size (MiB) |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {len(entries)} | {cold_s:.2f} | {warm_s:.2f} | {cold_s / warm_s:.1f}× | {size_mib:.1f} |")


if __name__ == "__main__":
    main()
