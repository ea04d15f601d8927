"""Rank vs error vs file size of ``lit_peft.adapters.export_lora`` on adapters trained by the comparison harness's
SmolLM2 task (rt-smollm2: 16 steps of 8 Rotten Tomatoes prompts, its learning rates), written to
``docs/lora_export.md``.

    python -m lit_peft.assets prepare smollm2-135m-instruct rt-sentiment
    python scripts/lora_export_table.py                       # BOFT m=2 b=8 and SVFT banded d=2, ~10 min on 2 cores
    python scripts/lora_export_table.py --methods boft-m2-b8 --out /tmp/lora.md

Each method is trained once through the CLI (``configs/compare/rt-smollm2.yaml`` with a ``MergeAdapters`` that
saves the adapter; the run is reused when its folder holds one), loaded onto a fresh SmolLM2 with
``load_adapter``, and exported at several tolerances and fixed ranks. For each export: the per-layer ranks, the
largest relative error of ``ΔW``, the relative difference of the logits on 8 held-out RT prompts of the model a
LoRA-only server builds (base + B·A) against the adapted model, the greedy answers that differ on 64 held-out
prompts, and the file size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))

SETTINGS = [("tolerance", 0.3), ("tolerance", 0.1), ("tolerance", 0.03), ("tolerance", 0.01), ("rank", 8),
            ("rank", 32)]
LRS = {"boft-m2-b8": 1e-3, "svft-banded-d2": 1e-2, "oft-b8": 1e-3, "svft-plain": 1e-2}  # the harness's (lr_llm)


def train(method: str, runs: Path) -> Path:
    """The adapter folder of ``method`` trained as in the harness (reused when present)."""
    import compare_methods as cm
    from lit_peft import assets

    folder = runs / method
    adapter = folder / "merged" / "adapter"
    if (adapter / "adapter_config.json").is_file():
        return adapter
    rt = assets.path("rt-sentiment")
    spec = cm.METHODS[method][0](cm.LLAMA_TARGETS, ["q_proj", "o_proj"])
    merge = {"class_path": "lit_peft.callbacks.MergeAdapters",
             "init_args": {"output_dir": str(folder / "merged"), "check": True}}
    cmd = [sys.executable, "-m", "lit_peft", "fit", "--config", "configs/compare/rt-smollm2.yaml",
           "--model.init_args.model_name_or_path", str(assets.path("smollm2-135m-instruct")),
           "--data.init_args.train_data", f"{rt}/instruction", "--data.init_args.eval_data", f"{rt}/instruction",
           "--seed_everything", "0", "--trainer.max_steps", "16", "--data.init_args.batch_size", "8",
           "--model.init_args.adapter", json.dumps(spec), "--model.init_args.optimizer.init_args.lr", str(LRS[method]),
           "--model.init_args.head_lr", "null", "--test_after_fit", "null", "--trainer.default_root_dir", str(folder),
           "--trainer.logger.init_args.save_dir", str(folder), "--trainer.callbacks", json.dumps([merge])]
    folder.mkdir(parents=True, exist_ok=True)
    print(f"training {method}: {shlex.join(cmd[1:])}", flush=True)
    with open(folder / "log.txt", "w") as log:
        subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    return adapter


def prompts(n: int) -> list[dict]:
    from lit_peft import assets

    rows = []
    with open(assets.path("rt-sentiment") / "instruction" / "test.jsonl") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["boft-m2-b8", "svft-banded-d2"], choices=sorted(LRS))
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "lora_export")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "lora_export.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    import peft
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_peft import assets
    from lit_peft.adapters import export_lora, load_adapter
    from lit_peft.files import atomic_write_text

    model_dir = assets.path("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    rows = prompts(64)
    from lit_peft.data import format_prompt

    texts = [format_prompt("alpaca", r["instruction"]) for r in rows]  # configs/compare/rt-smollm2.yaml's template
    batch = tokenizer(texts[:8], return_tensors="pt", padding=True)
    generate_batch = tokenizer(texts, return_tensors="pt", padding=True)

    def answers(model) -> list[str]:
        with torch.no_grad():
            out = model.generate(**generate_batch, max_new_tokens=3, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        return tokenizer.batch_decode(out[:, generate_batch["input_ids"].shape[1]:], skip_special_tokens=True)

    lines = ["# LoRA export of BOFT and SVFT adapters: rank vs error vs file size", "",
             "`lit_peft.adapters.export_lora` (and `MergeAdapters(lora_tolerance=…)`) writes any adapter as a peft "
             "LoRA for LoRA-only servers (vLLM, SGLang): a truncated SVD of each adapted layer's `ΔW = W' − W`. "
             "Adapters trained by the comparison harness's SmolLM2 task (16 steps of 8 Rotten Tomatoes prompts, "
             "all seven projections of the 30 layers; `docs/results/rt-smollm2.md`). Columns: the per-layer LoRA "
             "ranks (min–max, mean), the largest relative Frobenius error of `ΔW` over the layers, the relative "
             "max-abs difference of the logits of the served model (base + B·A, what peft computes) from the "
             "adapted model's on 8 held-out prompts, how many of 64 held-out greedy 3-token answers change, and the "
             "file size (float32). The merged model's and the adapter's own file sizes are given per method.", ""]
    for method in args.methods:
        adapter_dir = train(method, args.runs)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        load_adapter(model, adapter_dir)
        model.eval()
        own = sum(p.stat().st_size for p in adapter_dir.iterdir())
        merged = (adapter_dir.parent / "model.safetensors").stat().st_size
        reference = answers(model)
        lines += [f"## {method} (adapter file {own / 2**20:.1f} MiB; merged model {merged / 2**20:.0f} MiB)", "",
                  "| export | ranks (min–max, mean) | max ΔW error | logits difference | answers changed (of 64) | "
                  "file (MiB) |", "|---|---|--:|--:|--:|--:|"]
        for kind, value in SETTINGS:
            folder = args.runs / method / f"lora-{kind}-{value:g}"
            report = export_lora(model, folder, **{kind: value}, example=dict(batch), task_type="CAUSAL_LM")
            served = peft.PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), folder).eval()
            changed = sum(a != b for a, b in zip(answers(served), reference))
            ranks = [layer.rank for layer in report.layers.values()]
            lines.append(f"| {kind} {value:g} | {min(ranks)}–{max(ranks)}, {sum(ranks) / len(ranks):.1f} | "
                         f"{report.max_relative_error:.3f} | {report.output_relative_error:.2e} | {changed} | "
                         f"{report.file_bytes / 2**20:.1f} |")
            print(lines[-1], flush=True)
            del served
        lines.append("")
    command = "python scripts/lora_export_table.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines += ["## How this was made", "", f"- Command: `{command.strip()}`",
              f"- Date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, "
              f"{torch.get_num_threads()} threads, CPU",
              f"- torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "\n".join(lines))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
