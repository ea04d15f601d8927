"""Compare every fine-tuning method on real models and data through the CLI a user runs (project issue #10).

    python scripts/compare_methods.py --suite cpu                      # every task (see SUITES for steps/grids)
    python scripts/compare_methods.py --suite cpu --tasks mnist-vit    # one task
    python scripts/compare_methods.py --suite smoke --out /tmp/res     # one task, two methods, a few steps
    python scripts/compare_methods.py --suite cpu --tasks bbc-minilm --methods lora-r8 boft-m2-b8 --seeds 2

Each run is ``python -m lit_peft fit --config configs/compare/<task>.yaml`` plus command-line overrides (the
adapter as a ``class_path``/``init_args`` JSON value, the learning rate, the seed, the step count, the asset paths),
in a subprocess, exactly what a user types. Protocol per task: a fixed number of optimiser steps and batch size;
each method's learning rate is chosen from a small grid on the validation split with seed 0; then ``--seeds`` seeds
are trained at that lr and tested. Every run's command, wall time, peak RSS and metrics are kept in
``<runs>/<task>/<method>/<phase>/result.json`` (a later invocation with the same command reuses it).

Writes (atomically) ``<out>/<task>.md`` (the table, the protocol, the command, the date, the machine, the library
versions), ``<out>/<task>.json`` (every number), ``<out>/<task>_params.png`` (test metric vs trainable parameters,
log x, as the SVFT paper's Fig. 1) and ``<out>/<task>_loss.png`` (training loss of each method, seed 0). A run that
fails is a row marked ``failed`` with the last line of its error, never dropped.

Two classes here are loaded *by the subprocesses* (the harness puts ``scripts/`` on their ``PYTHONPATH``):
:class:`FullFineTuning`, an adapter strategy that trains every weight (``AdaptedModule`` expresses "head only" with
``adapter: null`` but has no switch for "everything"), and :class:`RunStats`, a callback that times the steps,
counts images/tokens and, for the LLM task, measures forgetting (the LM loss on held-out BBC articles before and
after fine-tuning).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl

from lit_peft.adapters.base import AdapterStrategy

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------------------
# Loaded inside the `python -m lit_peft fit` subprocesses
# ---------------------------------------------------------------------------------------------------------------
class FullFineTuning(AdapterStrategy):
    """Full fine-tuning as an adapter strategy: no adapter layers, every parameter of the model trainable."""

    def __init__(self, target_modules="all-linear", trainable_modules=(), fused_qkv="split"):
        super().__init__(target_modules, trainable_modules, fused_qkv)

    def apply(self, model, *, svd_provider=None):
        for param in model.parameters():
            param.requires_grad_(True)
        return model


class RunStats(pl.Callback):
    """Writes ``out`` (JSON): median seconds per optimiser step (the first ``skip`` steps left out), items per
    second (``unit``: images = batch size, tokens = attention-mask sum), trainable parameters, and with
    ``forgetting_data`` (a JSON-lines file with a ``text`` field) the mean per-token LM loss of the first
    ``forgetting_n`` texts (truncated to ``forgetting_max_length`` tokens) at fit start and at fit end.
    ``forgetting_before``: a JSON file caching the fit-start loss, which is the same for every run of a task (the
    pretrained model, before any step): read when its key (model, texts, n, length) matches, else measured and
    written; saves one pass over the texts per run."""

    def __init__(self, out: str, unit: str = "images", skip: int = 2, forgetting_data: str | None = None,
                 forgetting_n: int = 16, forgetting_max_length: int = 256, forgetting_before: str | None = None):
        self.out, self.unit, self.skip = out, unit, skip
        self.forgetting_before = forgetting_before
        self.forgetting_data, self.forgetting_n, self.forgetting_max_length = (forgetting_data, forgetting_n,
                                                                               forgetting_max_length)
        self.times: list[float] = []
        self.items: list[int] = []
        self.lm_before = self.lm_after = None
        self._t0 = 0.0

    def _lm_loss(self, module) -> float:
        import torch
        texts = []
        with open(self.forgetting_data) as f:
            for line in f:
                if line.strip():
                    texts.append(json.loads(line)["text"])
                if len(texts) >= self.forgetting_n:
                    break
        model, tok = module.model, module.tokenizer
        was = model.training
        model.eval()
        total = count = 0.0
        with torch.no_grad():
            for text in texts:
                enc = tok(text, return_tensors="pt", truncation=True, max_length=self.forgetting_max_length)
                enc = {k: v.to(module.device) for k, v in enc.items()}
                out = model(**enc, labels=enc["input_ids"])
                n = enc["input_ids"].shape[1] - 1
                total += float(out.loss) * n
                count += n
        model.train(was)
        return total / max(1.0, count)

    def on_fit_start(self, trainer, pl_module):
        if not self.forgetting_data:
            return
        key = json.dumps([str(getattr(pl_module.hparams, "model_name_or_path", "")), self.forgetting_data,
                          self.forgetting_n, self.forgetting_max_length])
        cache = Path(self.forgetting_before) if self.forgetting_before else None
        if cache is not None and cache.is_file():
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                self.lm_before = cached["lm_loss"]
                return
        self.lm_before = self._lm_loss(pl_module)
        if cache is not None:
            from lit_peft.files import atomic_write_text
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache, json.dumps({"key": key, "lm_loss": self.lm_before}) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)
        if isinstance(batch, dict) and "attention_mask" in batch:
            self.items.append(int(batch["attention_mask"].sum()))
        elif isinstance(batch, dict) and "input_ids" in batch:
            self.items.append(int(batch["input_ids"].numel()))
        else:
            first = batch[0] if isinstance(batch, (list, tuple)) else batch
            self.items.append(int(first.shape[0]))

    def on_fit_end(self, trainer, pl_module):
        if self.forgetting_data:
            self.lm_after = self._lm_loss(pl_module)
        times, items = self.times[self.skip:] or self.times, self.items[self.skip:] or self.items
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in pl_module.parameters())
        stats = {"steps": len(self.times), "step_time_s": statistics.median(times) if times else None,
                 "items_per_s": (sum(items) / sum(times)) if times and sum(times) > 0 else None,
                 "unit": self.unit, "trainable_params": trainable, "total_params": total,
                 "lm_loss_before": self.lm_before, "lm_loss_after": self.lm_after}
        try:  # this process's own resident-set high-water mark (VmHWM: per address space, so not the parent's)
            with open("/proc/self/status") as f:
                hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            stats.update(peak_rss_mib=hwm / 1024, peak_rss_source="VmHWM at fit end")
        except (OSError, StopIteration, ValueError):
            pass
        if trainer.is_global_zero:
            from lit_peft.files import atomic_write_text
            atomic_write_text(self.out, json.dumps(stats, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Methods and tasks
# ---------------------------------------------------------------------------------------------------------------
def _adapter(cls: str, **init_args) -> dict:
    return {"class_path": cls, "init_args": init_args}


#: method -> (adapter factory(targets, square_targets) or None for head only, lr-grid family)
METHODS: dict[str, tuple] = {
    # the model before fine-tuning (LoRA at its identity init, 0 steps): the floor of a task with no new head
    "untrained": (lambda t, sq: _adapter("lit_peft.adapters.LoRA", rank=8, alpha=16.0, target_modules=t), "lora"),
    "head-only": (lambda t, sq: None, "head"),
    "full-ft": (lambda t, sq: _adapter("compare_methods.FullFineTuning"), "full"),
    "lora-r8": (lambda t, sq: _adapter("lit_peft.adapters.LoRA", rank=8, alpha=16.0, target_modules=t), "lora"),
    "dora-r8": (lambda t, sq: _adapter("lit_peft.adapters.DoRA", rank=8, alpha=16.0, target_modules=t), "lora"),
    "vera-r256": (lambda t, sq: _adapter("lit_peft.adapters.VeRA", rank=256, target_modules=t), "vera"),
    "oft-b8": (lambda t, sq: _adapter("lit_peft.adapters.OFT", block_size=8, target_modules=t), "oft"),
    "boft-m2-b8": (lambda t, sq: _adapter("lit_peft.adapters.BOFT", block_size=8, n_butterfly_factors=2,
                                          target_modules=t), "oft"),
    "svft-plain": (lambda t, sq: _adapter("lit_peft.adapters.SVFT", pattern="plain", target_modules=t), "svft"),
    "svft-banded-d2": (lambda t, sq: _adapter("lit_peft.adapters.SVFT", pattern="banded", off_diag=2,
                                              target_modules=t), "svft"),
    "svft-random-d2": (lambda t, sq: _adapter("lit_peft.adapters.SVFT", pattern="random", off_diag=2,
                                              target_modules=t), "svft"),
    "svft-top-k-d2": (lambda t, sq: _adapter("lit_peft.adapters.SVFT", pattern="top_k", off_diag=2,
                                             target_modules=sq), "svft"),
    # truncated SVD (the top 64 singular triplets of each weight): run when named with --methods
    "svft-plain-k64": (lambda t, sq: _adapter("lit_peft.adapters.SVFT", pattern="plain", svd_rank=64,
                                              target_modules=t), "svft"),
    "svft-banded-d2-k64": (lambda t, sq: _adapter("lit_peft.adapters.SVFT", pattern="banded", off_diag=2,
                                                  svd_rank=64, target_modules=t), "svft"),
}
#: Methods a run includes only when --methods names them.
OPT_IN = ("svft-plain-k64", "svft-banded-d2-k64")

#: Rows not run, with the reason printed in the table.
NOT_RUN = {
    "peft-lora-r8": "not run: the CLI path applies lit_peft's adapters only; peft's LoRA/BOFT are checked equal to "
                    "ours (tests/adapters, MergeAdapters' peft export), so their rows would repeat ours",
    "peft-boft-m2-b8": "not run: as peft-lora-r8",
}


@dataclass
class Task:
    name: str
    config: str
    title: str
    metric: str                      # the column of metrics.csv reported ("test_acc" / "test_accuracy")
    unit: str                        # images or tokens
    targets: list[str]
    square_targets: list[str]
    steps: int
    batch: int
    lr_grid: dict[str, list[float]]
    head_lr: float | None = None     # fixed head lr for every method but head-only (None: the adapter lr)
    extra: list[str] = field(default_factory=list)            # overrides of every run
    grid_extra: list[str] = field(default_factory=list)       # overrides of the lr-choice runs
    final_extra: list[str] = field(default_factory=list)      # overrides of the reported runs
    forgetting: bool = False
    grid_metric: str | None = None   # the metrics.csv column the lr is chosen on (default: val_<metric>)
    skip_methods: dict[str, str] = field(default_factory=dict)
    timeout_s: int = 1200
    notes: str = ""
    seeds: int | None = None         # seeds of the reported runs (None: the suite's)
    untrained: bool = False          # run the "untrained" row (tasks without a new head: the causal LM)
    cost: bool = False               # also measure speed and memory with scripts/bench_adapters.py (peft rows)


def asset(name: str) -> str:
    from lit_peft import assets
    return str(assets.path(name))


VIT_TARGETS = ["qkv", "proj", "fc1", "fc2"]
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

VAL_ONCE = ["--trainer.limit_val_batches", "1.0", "--trainer.check_val_every_n_epoch", "null",
            "--test_after_fit", "null"]


def make_tasks(suite: str, only: list[str] | None = None) -> dict[str, Task]:
    """The tasks of ``suite`` ("cpu" or "smoke"); asset paths are resolved here (AssetNotPrepared if missing).
    ``only``: the tasks that will run (the Fashion-MNIST backbone is pretrained only if mnist-vit is one)."""
    smoke = suite == "smoke"
    lr_vision = {"head": [3e-3, 1e-2], "full": [3e-4, 1e-3], "lora": [1e-3, 3e-3], "vera": [3e-3, 1e-2],
                 "oft": [1e-3, 3e-3], "svft": [1e-2, 5e-2]}
    # moved up after a first grid (rt-minilm at 40 steps): 5e-4 (LoRA, OFT), 5e-3 (SVFT) and all of VeRA's
    # 3e-3..1e-2 stayed at chance
    lr_text = {"head": [1e-3, 3e-3], "full": [1e-4, 3e-4], "lora": [2e-3, 5e-3], "vera": [2e-2, 5e-2],
               "oft": [3e-3, 1e-2], "svft": [2e-2, 5e-2]}
    # the LLM: one lr per family (no grid: 6 s per step on 2 cores), LoRA's measured 1e-3 and the papers' ratios
    lr_llm = {"full": [5e-5], "lora": [1e-3], "vera": [1e-2], "oft": [1e-3], "svft": [1e-2]}
    tasks: dict[str, Task] = {}

    def add(task: Task):
        tasks[task.name] = task

    steps = 120 if not smoke else 4
    if only is not None and "mnist-vit" not in only:
        backbone = []
    elif smoke:
        # random init and 128 test digits: plumbing only
        backbone = ["--model.init_args.checkpoint_path", "null", "--trainer.limit_test_batches", "4"]
    else:
        sys.path.insert(0, str(SCRIPTS))
        import pretrain_fashion_vit
        backbone = ["--model.init_args.checkpoint_path", str(pretrain_fashion_vit.pretrain())]
    mnist = asset("mnist-5k")
    add(Task("mnist-vit", "configs/compare/mnist-vit.yaml",
             "Small ViT (Fashion-MNIST-pretrained) → MNIST digits (VTAB-1k: 1,000 training images)",
             "test_acc", "images", VIT_TARGETS, ["qkv", "proj"], steps, 32,
             {k: v[:1] for k, v in lr_vision.items()} if smoke else lr_vision, head_lr=3e-3,
             extra=backbone + ["--data.init_args.data_root", mnist],
             grid_extra=["--data.init_args.final", "false", "--trainer.val_check_interval", str(steps)] + VAL_ONCE,
             final_extra=["--data.init_args.final", "true"], timeout_s=300,
             notes="lr chosen on val200 after training on train800; reported runs train on train800val200 "
                   "and test on the 4,000 held-out digits (the VTAB-1k protocol)."))
    if smoke:
        return tasks
    # bbc-minilm: 24 steps and the first 64 tokens of each article (headline and lead) keep the task under 20
    # minutes on 2 cores; at 30 steps and 96 tokens it took 36 (the same ordering, accuracies within ~0.02)
    for name, data_asset, task_name, maxlen, text_steps, title, eval_note in (
            ("bbc-minilm", "bbc-news", "bbc_news", 64, 24, "all-MiniLM-L6-v2 → BBC News topics (5 classes)",
             "the 224 validation articles"),
            ("rt-minilm", "rt-sentiment", "sst2", 64, 30, "all-MiniLM-L6-v2 → Rotten Tomatoes sentence sentiment",
             "the 917 validation sentences")):
        add(Task(name, f"configs/compare/{name}.yaml", title, "test_accuracy", "tokens", BERT_TARGETS,
                 ["query", "key", "value", "attention.output.dense"], text_steps, 16, lr_text, head_lr=3e-3,
                 extra=["--model.init_args.model_name_or_path", asset("minilm"),
                        "--data.init_args.data", f"{asset(data_asset)}/classification",
                        "--data.init_args.max_length", str(maxlen)],
                 grid_extra=["--data.init_args.test_split", "validation"], grid_metric="test_accuracy",
                 final_extra=["--data.init_args.test_split", "test"], timeout_s=900,
                 notes=f"lr chosen on {eval_note} (the validation split), the reported runs scored on the data's "
                       f"held-out test split (GLUEDataModule `test_split: test`)."))
    rt = asset("rt-sentiment")
    add(Task("rt-smollm2", "configs/compare/rt-smollm2.yaml",
             "SmolLM2-135M-Instruct → Rotten Tomatoes sentiment (instruction style, greedy generation)",
             "test_acc", "tokens", LLAMA_TARGETS, ["q_proj", "o_proj"], 16, 8, lr_llm,
             extra=["--model.init_args.model_name_or_path", asset("smollm2-135m-instruct"),
                    "--data.init_args.train_data", f"{rt}/instruction", "--data.init_args.eval_data",
                    f"{rt}/instruction"],
             grid_extra=["--data.init_args.eval_split", "validation"],
             # testing uses every eval example: 4 batches of 16 keep it to the first 64 test sentences
             final_extra=["--data.init_args.eval_split", "test", "--trainer.limit_test_batches", "4"],
             forgetting=True, timeout_s=1200, seeds=1,
             cost=True, untrained=True,
             skip_methods={"head-only": "n/a: a causal LM has no new head (lm_head is tied to the embeddings)"},
             notes="one lr per method family and one seed (no grid, no further seeds: about 8 s per optimiser "
                   "step with two runs sharing 2 cores, and 3 seeds of 10 methods would take an hour), 64 test sentences "
                   "(4 test batches of 16), 3 new tokens; forgetting = LM loss on 16 held-out BBC articles "
                   "(256 tokens each) after fine-tuning minus before (positive = forgot). The `untrained` row is the "
                   "model before fine-tuning, under the same protocol (0 steps)."))
    return tasks


REPORT_ONLY = False              # --report-only: tables from finished runs, nothing started
THREAD_ENV: dict[str, str] = {}   # OMP_NUM_THREADS for the subprocesses (--threads)

SUITE_DEFAULTS = {"cpu": {"seeds": 3}, "smoke": {"seeds": 1, "methods": ["head-only", "lora-r8"]}}


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------
def run_one(task: Task, method: str, lr: float, seed: int, phase: str, runs: Path) -> dict:
    """One ``python -m lit_peft fit`` subprocess; its result dict (status ok/failed, metrics, stats)."""
    factory, family = METHODS[method]
    adapter = factory(task.targets, task.square_targets)
    folder = runs / task.name / method / f"{phase}-lr{lr:g}-seed{seed}"
    stats_file = folder / "stats.json"
    callback = {"class_path": "compare_methods.RunStats",
                "init_args": {"out": str(stats_file), "unit": task.unit}}
    if task.forgetting:
        callback["init_args"]["forgetting_data"] = f"{asset('bbc-news')}/classification/test.jsonl"
        callback["init_args"]["forgetting_before"] = str(runs / task.name / "forgetting_before.json")
    cmd = [sys.executable, "-m", "lit_peft", "fit", "--config", task.config, *task.extra,
           *(task.grid_extra if phase == "grid" else task.final_extra),
           "--seed_everything", str(seed), "--trainer.max_steps", str(0 if method == "untrained" else task.steps),
           "--data.init_args.batch_size", str(task.batch),
           "--model.init_args.adapter", json.dumps(adapter),
           "--model.init_args.optimizer.init_args.lr", str(lr),
           "--trainer.default_root_dir", str(folder), "--trainer.logger.init_args.save_dir", str(folder),
           "--trainer.callbacks", json.dumps([callback])]
    if method == "head-only" or task.head_lr is None:
        cmd += ["--model.init_args.head_lr", "null"]
    else:
        cmd += ["--model.init_args.head_lr", str(task.head_lr)]
    key = hashlib.sha256(json.dumps(cmd[1:]).encode()).hexdigest()[:16]
    result_file = folder / "result.json"
    if result_file.is_file():
        old = json.loads(result_file.read_text())
        if old.get("key") == key and old.get("status") == "ok":
            return old
    if REPORT_ONLY:
        return {"key": key, "task": task.name, "method": method, "lr": lr, "seed": seed, "phase": phase,
                "status": "failed", "error": "not run (--report-only and no finished run)", "metric": None,
                "train_loss": [], "cmd": " ".join(shlex.quote(c) for c in cmd[1:])}
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (stats_file, *folder.rglob("metrics.csv")):
        stale.unlink(missing_ok=True)
    env = dict(os.environ, **THREAD_ENV, PYTHONPATH=os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep))
    start = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {task.name} {method} {phase} lr={lr:g} seed={seed} ...", flush=True)
    with open(folder / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        timer = threading.Timer(task.timeout_s, proc.kill)
        timer.start()
        try:
            _, status, rusage = os.wait4(proc.pid, 0)   # wait4: this child's own peak RSS
        finally:
            timer.cancel()
    wall = time.perf_counter() - start
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc
    result = {"key": key, "task": task.name, "method": method, "lr": lr, "seed": seed, "phase": phase,
              "cmd": " ".join(shlex.quote(c) for c in cmd[1:]), "wall_s": wall, "returncode": rc,
              "peak_rss_mib": (rusage.ru_maxrss / 1024) if rusage is not None else None}
    metrics = read_metrics(folder)
    result["train_loss"] = metrics["train_loss"]
    result["final"] = metrics["final"]
    if stats_file.is_file():
        result.update(json.loads(stats_file.read_text()))
    wanted = (task.grid_metric or "val_" + task.metric[len("test_"):]) if phase == "grid" else task.metric
    result["metric"] = metrics["final"].get(wanted)
    if rc == 0 and result["metric"] is not None:
        result["status"] = "ok"
    else:
        tail = (folder / "log.txt").read_text(errors="replace").strip().splitlines()[-1:] or [""]
        why = f"timed out after {task.timeout_s}s" if rc in (-9, 137) else f"exit {rc}"
        result["status"] = "failed"
        result["error"] = f"{why}: {tail[0][:200]}" if rc != 0 else f"no {wanted} in metrics.csv"
    from lit_peft.files import atomic_write_text
    atomic_write_text(result_file, json.dumps(result, indent=2) + "\n")
    print(f"    -> {result['status']} {wanted}={result['metric']} ({wall:.0f}s)", flush=True)
    return result


#: scripts/bench_adapters.py rows of a task's speed/memory table, and the issue's targets (× lit_peft LoRA r=8)
COST_ROWS = "lora$|lora-peft|boft-m2$|boft-peft|svft-banded$"
COST_TARGETS = (("boft-m2", "BOFT m=2 b=8", 1.2, 1.1), ("svft-banded", "SVFT banded d=2", 1.5, 1.3))


def run_cost(task: Task, runs: Path) -> dict | None:
    """Speed and peak memory of LoRA, BOFT and SVFT (lit_peft and peft) on the task's model and a real training
    batch: ``scripts/bench_adapters.py --model smollm2`` in a subprocess, run while nothing else runs."""
    folder = runs / task.name / "cost"
    out = folder / "bench.json"
    cmd = [sys.executable, str(SCRIPTS / "bench_adapters.py"), "--model", "smollm2", "--batch", str(task.batch),
           "--methods", COST_ROWS, "--warmup", "1", "--repeats", "3", "--json", str(out)]
    key = hashlib.sha256(json.dumps(cmd[1:]).encode()).hexdigest()[:16]
    stamp = folder / "key.txt"
    if out.is_file() and stamp.is_file() and stamp.read_text().strip() == key:
        return json.loads(out.read_text())
    if REPORT_ONLY:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {task.name} speed and memory (bench_adapters.py) ...", flush=True)
    start = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=3600).returncode
    if rc != 0 or not out.is_file():
        print(f"    -> failed (exit {rc}; see {folder / 'log.txt'})", flush=True)
        return {"error": f"exit {rc}: see {folder / 'log.txt'}"}
    from lit_peft.files import atomic_write_text
    atomic_write_text(stamp, key + "\n")
    print(f"    -> ok ({time.perf_counter() - start:.0f}s)", flush=True)
    return json.loads(out.read_text())


def cost_section(cost: dict | None) -> list[str]:
    lines = ["## Speed and memory (same model, same batch)", ""]
    if not cost or "error" in cost:
        return lines + [f"Not measured: {cost['error'] if cost else 'no finished measurement (--report-only)'}", ""]
    rows = cost["rows"]

    def ms(key):
        times = rows.get(key, {}).get("times")
        return statistics.median(times) if times else None

    lora_ms, lora_mem = ms("lora"), rows.get("lora", {}).get("mem_bytes")
    lines += ["| method | time × LoRA r=8 | target | memory × LoRA r=8 | target | met |", "|---|--:|--:|--:|--:|---|"]
    for key, name, t_target, m_target in COST_TARGETS:
        t, m = ms(key), rows.get(key, {}).get("mem_bytes")
        if not (t and m and lora_ms and lora_mem):
            lines.append(f"| {name} | — | ≤ {t_target}× | — | ≤ {m_target}× | not measured |")
            continue
        tr, mr = t / lora_ms, m / lora_mem
        verdict = ("yes" if tr <= t_target and mr <= m_target else
                   "time: " + ("yes" if tr <= t_target else "**no**") + ", memory: " + ("yes" if mr <= m_target else "**no**"))
        lines.append(f"| {name} | {tr:.2f}× | ≤ {t_target}× | {mr:.2f}× | ≤ {m_target}× | {verdict} |")
    lines += ["", "Measured by the harness with `scripts/bench_adapters.py` (one forked process per row, before the "
              "task's training runs, nothing else running); its table:", "", cost["table"].replace(f"{REPO}/", "")]
    return lines


def read_metrics(folder: Path) -> dict:
    """train_loss per step and the last value of every other column of the run's metrics.csv."""
    out = {"train_loss": [], "final": {}}
    files = sorted(folder.rglob("metrics.csv"))
    if not files:
        return out
    with open(files[0]) as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            for k, v in row.items():
                if v in ("", None) or k in ("step", "epoch"):
                    continue
                if k == "train_loss":
                    out["train_loss"].append((int(float(step)), float(v)))
                else:
                    out["final"][k] = float(v)
    return out


def run_task(task: Task, methods: list[str], seeds: int, runs: Path, jobs: int = 1) -> dict:
    """Every method's lr-grid runs (seed 0, validation), then its ``seeds`` reported runs at the chosen lr;
    ``jobs`` subprocesses at a time."""
    from concurrent.futures import ThreadPoolExecutor
    start = time.perf_counter()
    cost = run_cost(task, runs) if task.cost else None
    rows: dict[str, dict] = {}
    todo = []
    for method in methods:
        if method == "untrained" and not task.untrained:
            continue
        if method in task.skip_methods:
            rows[method] = {"status": "skipped", "why": task.skip_methods[method]}
        else:
            todo.append(method)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        grids = {m: task.lr_grid[METHODS[m][1]] for m in todo}
        grid_futures = {m: [pool.submit(run_one, task, m, lr, 0, "grid", runs) for lr in grids[m]]
                        for m in todo if len(grids[m]) > 1 and m != "untrained"}
        chosen = {}
        for m in todo:
            if m in grid_futures:
                results = [f.result() for f in grid_futures[m]]
                ok = [r for r in results if r["status"] == "ok"]
                chosen[m] = (max(ok, key=lambda r: r["metric"])["lr"] if ok else grids[m][0],
                             [{"lr": r["lr"], "val": r["metric"], "status": r["status"],
                               "wall_s": r.get("wall_s")} for r in results])
            else:
                chosen[m] = (grids[m][0], [])
        # seed-major: every method's seed 0 first, so a run stopped early still has each method once
        final_futures = {m: [] for m in todo}
        for seed in range(seeds):
            for m in todo:
                final_futures[m].append(pool.submit(run_one, task, m, chosen[m][0], seed, "final", runs))
        for m in todo:
            finals = [f.result() for f in final_futures[m]]
            rows[m] = {"status": "ok" if all(r["status"] == "ok" for r in finals) else "failed",
                       "lr": chosen[m][0], "grid": chosen[m][1], "runs": finals}
    ordered = {m: rows[m] for m in methods if m in rows}
    return {"task": task.name, "rows": ordered, "wall_s": time.perf_counter() - start, "jobs": jobs, "cost": cost}


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------
def machine() -> dict:
    import importlib.metadata as md
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("lit_peft", "torch", "lightning", "timm", "transformers", "peft"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(), "versions": versions}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(result: dict) -> list[dict]:
    """One summary dict per method (mean/std of the metric, parameters, speed, memory, forgetting)."""
    out = []
    for method, row in result["rows"].items():
        s = {"method": method, "status": row["status"]}
        if row["status"] == "skipped":
            s["why"] = row["why"]
            out.append(s)
            continue
        runs = row["runs"]
        ok = [r for r in runs if r["status"] == "ok"]
        s.update(lr=row["lr"], grid=row.get("grid", []), n_ok=len(ok), n=len(runs),
                 errors=[r.get("error", "") for r in runs if r["status"] != "ok"])
        if ok:
            s["mean"], s["std"] = _mean_std([r["metric"] for r in ok])
            for k in ("trainable_params", "step_time_s", "items_per_s"):
                vals = [r[k] for r in ok if r.get(k) is not None]
                s[k] = statistics.median(vals) if vals else None
            # the run's own VmHWM (earlier harness versions took wait4's ru_maxrss, which on Linux includes the
            # parent's resident set at fork time: those runs show no figure)
            vals = [r["peak_rss_mib"] for r in ok if r.get("peak_rss_source") and r.get("peak_rss_mib") is not None]
            s["peak_rss_mib"] = statistics.median(vals) if vals else None
            s["unit"] = ok[0].get("unit")
            forget = [r["lm_loss_after"] - r["lm_loss_before"] for r in ok
                      if r.get("lm_loss_before") is not None and r.get("lm_loss_after") is not None]
            s["forgetting"] = _mean_std(forget) if forget else None
            s["lm_loss_before"] = ok[0].get("lm_loss_before")
            s["train_loss"] = ok[0]["train_loss"]
        out.append(s)
    return out


def _fmt_params(n) -> str:
    return f"{int(n):,}" if n is not None else "–"


def write_report(task: Task, result: dict, summary: list[dict], out: Path, command: str, seeds: int,
                 suite: str) -> None:
    from lit_peft.files import atomic_write_text
    info = machine()
    metric = task.metric.removeprefix("test_")
    unit = "tokens/s" if task.unit == "tokens" else "images/s"
    head = ["method", f"test {metric} (mean ± std)", "seeds ok", "lr (val per grid lr)", "trainable params",
            "step time (s)", unit, "peak RSS (MiB)"]
    if task.forgetting:
        head.append("forgetting (Δ LM loss)")
    run_walls = [g.get("wall_s") or 0.0 for row in result["rows"].values() for g in row.get("grid", [])]
    run_walls += [r.get("wall_s") or 0.0 for row in result["rows"].values() for r in row.get("runs", [])]
    lines = [f"# {task.name}: {task.title}", "",
             f"Suite `{suite}`: {task.steps} optimiser steps of batch {task.batch} per run, "
             f"lr chosen per method on validation with seed 0 from its grid, then {seeds} seed(s) at that lr. "
             f"{task.notes}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        if s["status"] == "skipped":
            cells = [s["method"], s["why"]] + [""] * (len(head) - 2)
        elif s.get("n_ok", 0) == 0:
            grid = ", ".join(f"{g['lr']:g}: {g['val']:.3f}" if g["val"] is not None else f"{g['lr']:g}: failed"
                             for g in s["grid"])
            if s["errors"] and all(e.startswith("not run") for e in s["errors"]):
                what = "not run yet (the harness was stopped before this method's reported runs)"
            else:
                what = "**failed**: " + (s["errors"][0] if s["errors"] else "")
            cells = [s["method"], what, f"0/{s['n']}", f"{s['lr']:g}" + (f" ({grid})" if grid else "")]
            cells += [""] * (len(head) - len(cells))
        else:
            grid = ", ".join(f"{g['lr']:g}: {g['val']:.3f}" if g["val"] is not None else f"{g['lr']:g}: failed"
                             for g in s["grid"])
            mark = "" if s["n_ok"] == s["n"] else " (**some seeds failed**: " + "; ".join(s["errors"])[:200] + ")"
            cells = [s["method"], f"{s['mean']:.3f} ± {s['std']:.3f}{mark}", f"{s['n_ok']}/{s['n']}",
                     f"{s['lr']:g}" + (f" ({grid})" if grid else ""), _fmt_params(s.get("trainable_params")),
                     f"{s['step_time_s']:.3f}" if s.get("step_time_s") else "–",
                     f"{s['items_per_s']:,.0f}" if s.get("items_per_s") else "–",
                     f"{s['peak_rss_mib']:,.0f}" if s.get("peak_rss_mib") else "–"]
            if task.forgetting:
                f = s.get("forgetting")
                cells.append(f"{f[0]:+.3f} ± {f[1]:.3f} (before {s['lm_loss_before']:.3f})" if f else "–")
        lines.append("| " + " | ".join(cells) + " |")
    for method, why in NOT_RUN.items():
        if task.cost:
            why = ("accuracy not run: the CLI applies lit_peft's adapters, which equal peft's to ~1e-14 "
                   "(tests/adapters); its speed and memory are in the table below")
        lines.append("| " + " | ".join([method, why] + [""] * (len(head) - 2)) + " |")
    lines += ["",
              "Trainable parameters include the task head where the model has one. Step time: median wall seconds "
              "of one training step (forward, backward, optimiser) after the first two, from a callback in the run; "
              f"{unit}: items trained per second of step time. Peak RSS: the resident-set high-water mark of the "
              "`python -m lit_peft fit` process at the end of fit (`VmHWM`: model, data and loaders included), not "
              "the torch allocator; – where a run predates that measurement.", "",
              f"![{task.name}: metric vs parameters]({task.name}_params.png)",
              f"![{task.name}: training loss]({task.name}_loss.png)", "",
              *(cost_section(result.get("cost")) if task.cost else []),
              f"- Command: `{command}` ("
              + ("this table rebuilt from the finished runs with `--report-only`; " if REPORT_ONLY else
                 f"this invocation: {result['wall_s'] / 60:.1f} min; ")
              + f"the task's "
              f"{len(run_walls)} runs took {sum(run_walls) / 60:.1f} min of run wall time in all; "
              f"{result.get('jobs', 1)} run(s) at a time, OMP_NUM_THREADS="
              f"{THREAD_ENV.get('OMP_NUM_THREADS', 'unset')} each: step times and throughput are per run under "
              f"that sharing of the cores)",
              f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
              f"- Machine: {info['cpus']} CPUs, {info['cpu_model']}; Python {info['python']}",
              "- Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
              f"- Each run: `python -m lit_peft fit --config {task.config}` + overrides; the exact command of every "
              f"run is in `{task.name}.json`.", ""]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{task.name}.md", "\n".join(lines))
    atomic_write_text(out / f"{task.name}.json", json.dumps(
        {"task": task.name, "suite": suite, "command": command, "machine": info, "summary": summary,
         "result": result}, indent=2, default=str) + "\n")
    plot(task, summary, out)


def plot(task: Task, summary: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lit_peft.files import atomic_write

    floor = next((s for s in summary if s["method"] == "untrained" and s.get("n_ok")), None)
    ok = [s for s in summary if s.get("n_ok") and s.get("trainable_params") and s["method"] != "untrained"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {s["method"]: plt.cm.tab20(i % 20) for i, s in enumerate(summary)}
    if floor is not None:  # trains nothing: a level, not a point at some parameter count
        ax.axhline(floor["mean"], color="grey", ls="--", lw=1)
        ax.annotate("untrained model", (0.01, floor["mean"]), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(2, 4), fontsize=8, color="grey")
    for s in ok:
        ax.errorbar(s["trainable_params"], s["mean"], yerr=s["std"], fmt="o", capsize=3, color=colours[s["method"]])
        ax.annotate(s["method"], (s["trainable_params"], s["mean"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(task.metric)
    ax.set_title(f"{task.name}: {task.metric} vs trainable parameters")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    atomic_write(out / f"{task.name}_params.png", lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in ok:
        curve = s.get("train_loss") or []
        if curve:
            ax.plot([c[0] for c in curve], [c[1] for c in curve], label=s["method"], lw=1.2,
                    color=colours[s["method"]])
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss (logged every 5 steps)")
    ax.set_title(f"{task.name}: training loss, seed 0")
    ax.grid(True, alpha=0.3)
    if ok:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(out / f"{task.name}_loss.png", lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITE_DEFAULTS), default="cpu")
    parser.add_argument("--tasks", nargs="+", default=None, help="default: every task of the suite")
    parser.add_argument("--methods", nargs="+", default=None, choices=sorted(METHODS),
                        help="default: every method but " + ", ".join(OPT_IN) + " (smoke: head-only and lora-r8)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default: cpu 3, smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="override every task's step count")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of each run (default: torch's own, all cores)")
    parser.add_argument("--no-cost", action="store_true",
                        help="skip the speed/memory measurement (scripts/bench_adapters.py) of tasks that have one")
    parser.add_argument("--report-only", action="store_true",
                        help="write the tables and plots from the finished runs under --runs; start nothing")
    parser.add_argument("--quantize", choices=["nf4", "int8"], default=None,
                        help="train every method on a quantized frozen base (model.init_args.quantize); the task's "
                             "runs and report are named <task>-<scheme> (no speed/memory section: see "
                             "scripts/quantized_base.py)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "compare")
    args = parser.parse_args(argv)
    defaults = SUITE_DEFAULTS[args.suite]
    global REPORT_ONLY
    REPORT_ONLY = args.report_only
    if args.threads:
        THREAD_ENV["OMP_NUM_THREADS"] = str(args.threads)
    methods = args.methods or defaults.get("methods") or [m for m in METHODS if m not in OPT_IN]
    tasks = make_tasks(args.suite, args.tasks)
    names = args.tasks or list(tasks)
    unknown = [n for n in names if n not in tasks]
    if unknown:
        parser.error(f"unknown task(s) {unknown} for suite {args.suite}; valid: {list(tasks)}")
    shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = "python scripts/compare_methods.py " + " ".join(shlex.quote(a) for a in shown)
    failed = 0
    for name in names:
        task = tasks[name]
        if args.steps:
            task.steps = args.steps
        if args.no_cost:
            task.cost = False
        if args.quantize:
            task.name = f"{name}-{args.quantize}"
            task.title += f", on a {args.quantize} base"
            task.extra = [*task.extra, "--model.init_args.quantize", args.quantize]
            task.cost = False
        seeds = args.seeds or task.seeds or defaults["seeds"]
        result = run_task(task, methods, seeds, args.runs.resolve(), args.jobs)
        summary = summarise(result)
        write_report(task, result, summary, args.out, command, seeds, args.suite)
        failed += sum(1 for s in summary if s["status"] == "failed")
        print(f"{task.name}: {result['wall_s'] / 60:.1f} min -> {args.out / (task.name + '.md')}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
