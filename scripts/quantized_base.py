#!/usr/bin/env python3
"""Every adapter over a full-precision, an NF4 and an int8 frozen base of SmolLM2, in one run: linear-weight
memory, peak training memory and step time; with ``--accuracy`` also the comparison harness's rt-smollm2 accuracy
of each scheme (``scripts/compare_methods.py --quantize``), written to ``docs/quantized_base.md``.

Each row is measured as in ``scripts/bench_adapters.py --model smollm2`` (its own forked process, the rt-smollm2
task's first training batch, the model's LM loss, median step time), after
``lit_peft.adapters.quantize_frozen_linears(model, scheme)`` for the quantized rows. Memory per row:

- linear weights: every ``nn.Linear`` weight as stored: the 210 decoder linears (float32, or quantized with their
  scales) plus ``lm_head``, which is tied to the input embedding and stays float32 (108 MiB in every row);
- step peak: the adapter's own tensors (SVFT's ``U``/``V`` included) plus the peak bytes live in torch's CPU
  allocator during one training step (saved activations, the dequantized weight of the layer being computed,
  gradients), from ``torch.profiler(profile_memory=True)``;
- total = linear weights + step peak: what training holds at its peak beyond the inputs (the embedding is
  ``lm_head``'s weight, counted once).

Examples::

    python scripts/quantized_base.py                               # about 10 min on 2 cores
    python scripts/quantized_base.py --accuracy /tmp/quant-results --out docs/quantized_base.md
    python scripts/quantized_base.py --quick                       # code path only (a tiny linear stack)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_adapters as bench  # noqa: E402

from lit_peft.files import atomic_write_text  # noqa: E402

SCHEMES = ("none", "nf4", "int8")
DEFAULT_METHODS = "^(lora|dora|vera|oft|boft-m2|svft-plain|svft-banded)$"
#: the harness rows of the accuracy table (compare_methods.py method names) and this script's row keys
HARNESS_ROWS = {"untrained": None, "lora-r8": "lora", "boft-m2-b8": "boft-m2", "svft-plain": "svft-plain"}


def with_quantized_base(row: bench.Method, scheme: str) -> bench.Method:
    """``row`` applied after storing the model's frozen linears in ``scheme`` (``"none"``: as it is)."""
    if scheme == "none":
        return dataclasses.replace(row, key=f"{row.key}|none")

    def build(model, args):
        from lit_peft.adapters import quantize_frozen_linears, resolve_targets
        targets = resolve_targets(model, bench.model_targets(args)[0], "split")  # q, k, v of a fused qkv: blocks
        report = quantize_frozen_linears(model, scheme, targets=targets)
        model, notes = row.build(model, args)
        return model, [f"{len(report.layers)} linears in {scheme}", *notes]

    return dataclasses.replace(row, key=f"{row.key}|{scheme}", build=build)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    p.add_argument("--methods", default=DEFAULT_METHODS, help="regex over bench_adapters.py row keys")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--accuracy", type=Path, default=None,
                   help="folder of compare_methods.py reports (rt-smollm2.json, rt-smollm2-nf4.json, "
                        "rt-smollm2-int8.json) for the accuracy table")
    p.add_argument("--out", type=Path, default=None, help="markdown file to write (default: print only)")
    p.add_argument("--quick", action="store_true", help="a tiny linear stack instead of SmolLM2: code path only")
    args = p.parse_args(argv)
    bench_argv = ["--batch", str(args.batch), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                  "--no-peft"]
    if args.threads:
        bench_argv += ["--threads", str(args.threads)]
    bench_argv += ["--quick"] if args.quick else ["--model", "smollm2"]
    bench_args = bench.parse_args(bench_argv)
    return args, bench_args


def _mib(n) -> str:
    return "—" if n is None else f"{n / 2**20:.1f}"


def _x(a, b) -> str:
    return f"{a / b:.2f}×" if a is not None and b else "—"


def memory_table(rows, results, schemes) -> list[str]:
    lines = ["| method | base | linear weights MiB | step peak MiB | total MiB | total × full precision | "
             "step ms | time × full precision |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        method = row.key.split("|")[0]
        ref = results.get(f"{method}|none", {})
        ref_total = (ref.get("linear_weight_bytes") or 0) + (ref.get("mem_bytes") or 0) if "error" not in ref else None
        ref_ms = bench._step_ms(ref) if "error" not in ref else None
        res = results[row.key]
        scheme = row.key.split("|")[1]
        if "error" in res:
            lines.append(f"| {row.method} | {scheme} | error: {res['error'][:80]} |||||||")
            continue
        total = res["linear_weight_bytes"] + (res.get("mem_bytes") or 0)
        ms = bench._step_ms(res)
        lines.append(f"| {row.method} | {'float32' if scheme == 'none' else scheme} | "
                     f"{_mib(res['linear_weight_bytes'])} | {_mib(res.get('mem_bytes'))} | {_mib(total)} | "
                     f"{_x(total, ref_total)} | {ms:.0f} | {_x(ms, ref_ms)} |")
    return lines


def accuracy_table(folder: Path) -> list[str]:
    reports = {}
    for scheme in SCHEMES:
        file = folder / ("rt-smollm2.json" if scheme == "none" else f"rt-smollm2-{scheme}.json")
        if file.is_file():
            reports[scheme] = json.loads(file.read_text())
    if "none" not in reports:
        return [f"(no rt-smollm2.json under {folder}: run scripts/compare_methods.py first)"]
    by = {scheme: {s["method"]: s for s in r["summary"]} for scheme, r in reports.items()}
    cols = [s for s in SCHEMES if s in reports]
    head = "| method | " + " | ".join("float32" if s == "none" else s for s in cols) + " | " + " | ".join(
        f"{s} − float32" for s in cols if s != "none") + " | forgetting (float32 / " + " / ".join(
        s for s in cols if s != "none") + ") |"
    lines = [head, "|---|" + "---:|" * (2 * len(cols) - 1) + "---|"]
    for method in HARNESS_ROWS:
        cells = [by[s].get(method, {}).get("mean") for s in cols]
        if all(c is None for c in cells):
            continue
        base = cells[0]
        deltas = [None if c is None or base is None else c - base for c in cells[1:]]
        forget = []
        for s in cols:
            f = by[s].get(method, {}).get("forgetting")
            forget.append("—" if not f else f"{f[0]:+.3f}")
        lines.append(f"| {method} | " + " | ".join("—" if c is None else f"{c:.3f}" for c in cells) + " | "
                     + " | ".join("—" if d is None else f"{d:+.3f}" for d in deltas) + " | " + " / ".join(forget)
                     + " |")
    commands = {r["command"] for r in reports.values()}
    lines += ["", "Harness commands (same protocol as docs/results/rt-smollm2.md: one lr per method family, one seed, "
              "16 steps, the first 64 test sentences, greedy answers):", ""]
    lines += [f"    {c}" for c in sorted(commands)]
    return lines


def main(argv=None) -> int:
    args, bench_args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    base_rows = [r for r in bench.methods(*bench.model_targets(bench_args)) if re.search(args.methods, r.key)]
    rows = [with_quantized_base(r, s) for r in base_rows for s in args.schemes]
    import lit_peft.adapters  # noqa: F401  (imported once; forked workers inherit it)
    results = {}
    start = time.perf_counter()
    for row in rows:
        res = bench.run_isolated(row, bench_args)
        results[row.key] = res
        status = res.get("error") or (f"{bench._step_ms(res):8.0f} ms, linear weights "
                                      f"{_mib(res['linear_weight_bytes'])} MiB, step peak {_mib(res.get('mem_bytes'))}"
                                      " MiB")
        print(f"[{time.perf_counter() - start:6.0f}s] {row.key:22s} {status}", file=sys.stderr, flush=True)
    model = "a 1-block linear stack (--quick)" if args.quick else (
        f"SmolLM2-135M-Instruct, float32, the rt-smollm2 task's first training batch ({bench_args.batch} prompts, "
        f"{bench_args.tokens} tokens), all seven projections of the 30 decoder layers adapted")
    lines = [f"Command: `{command}`  ", f"Date: {time.strftime('%Y-%m-%d')}, {bench.device_label(bench_args)}, "
             f"{bench_args.threads} threads  ", f"Model: {model}", "", *memory_table(rows, results, args.schemes)]
    if args.accuracy:
        lines += ["", "Accuracy (rt-smollm2 test accuracy, 64 sentences: one standard error ≈ ±0.06):", "",
                  *accuracy_table(args.accuracy)]
    body = "\n".join(lines) + "\n"
    print(body)
    if args.out:
        atomic_write_text(args.out, body)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
