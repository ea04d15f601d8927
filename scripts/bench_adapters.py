#!/usr/bin/env python3
"""Forward+backward time and peak memory of every adapter on a stack of ViT-shaped linears, side by side.

One run measures, on the same model shapes and the same input, the frozen base (floor), full fine-tuning
(reference), ``lit_peft``'s LoRA / DoRA / VeRA / OFT / BOFT / SVFT and ``peft``'s implementation of the same
method where ``peft`` has one, and prints a markdown table with ratios to ``lit_peft`` LoRA r=8 and to ``peft``.

Model: ``--blocks`` blocks shaped like ViT-B blocks (``--width`` 768)::

    q, k, v = attn.qkv(x).chunk(3)         # 768 -> 2304 (lit_peft splits it into q, k, v parts by default)
    x = x + attn.proj(q + k + v)           # 768 -> 768  (q + k + v stands in for attention: shapes chain,
                                           #              no token mixing, so every row pays the same for it)
    x = x + mlp.fc2(gelu(mlp.fc1(x)))      # 768 -> 3072 -> 768

Every linear (``qkv``, ``proj``, ``fc1``, ``fc2``) is frozen and adapted. One step is: forward, loss =
``out.float().pow(2).mean()``, backward, zero grads. The input ``(batch, tokens, width)`` requires grad in every
row (as the input of a block deep inside a network does), so every row runs the whole input-gradient chain and
the frozen row is the floor (``--no-input-grad`` turns that off for adapter rows).

Each row runs in its own forked process (the parent imports torch, peft and lit_peft once).

Timing: seeded model and input, ``--warmup`` steps, then the median of ``--repeats`` timed steps
(``time.perf_counter``, or with ``--clock process`` the process's CPU time, steadier on a shared machine with
``--threads 1``; ``torch.cuda.synchronize`` around each step on CUDA). A method stops early after ``--budget``
seconds of timed steps once it has 3. On a busy machine ``--rounds N`` runs the whole list N times (fresh
processes, interleaved) and pools each row's steps, and ``--stat min`` reports the least-disturbed step.

Memory ("peak memory"): the bytes of the adapter's own tensors and buffers (everything in the model that the
frozen base model does not have, e.g. SVFT's U and V) plus the peak bytes live in torch's allocator during one
extra step above what was live before it (saved activations, temporaries, gradients): on CPU from the
allocation events of ``torch.profiler(profile_memory=True)``, on CUDA from ``torch.cuda.max_memory_allocated``.
Base weights and the input are the same in every row and are left out. On CPU the table also gives "RSS Δ",
the process's resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) over the warm-up
and timed steps minus the resident set of the built base model: what the OS saw, allocator slack and library
workspaces included (noisier).

Examples::

    python scripts/bench_adapters.py                          # full CPU run (3-5 min on 2 quiet cores)
    python scripts/bench_adapters.py --quick                  # smoke run (about 30 s, half of it imports)
    python scripts/bench_adapters.py --rounds 3 --stat min --warmup 1 --repeats 3   # on a busy machine
    python scripts/bench_adapters.py --device cuda --dtype bfloat16 --batch 64 --out docs/benchmarks.md
    python scripts/bench_adapters.py --methods 'lora$|boft-m2$' --profile boft-m2   # where BOFT's time goes
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import multiprocessing as mp
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lit_peft.files import atomic_write_text

TARGETS = ["qkv", "proj", "fc1", "fc2"]
SQUARE_TARGETS = ["qkv", "proj"]  # with fused_qkv="split" the q, k, v parts are width x width
# --model smollm2: every linear of the decoder layers (the comparison harness's rt-smollm2 task adapts the same)
LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLM_SQUARE_TARGETS = ["q_proj", "o_proj"]  # k_proj, v_proj are 576 -> 192 (grouped-query attention)


def model_targets(args) -> tuple[list[str], list[str]]:
    return (LLM_TARGETS, LLM_SQUARE_TARGETS) if args.model == "smollm2" else (TARGETS, SQUARE_TARGETS)


def real_batch(args) -> dict:
    """``--model smollm2``: the first training batch of the harness's rt-smollm2 task (RT sentiment prompts in the
    alpaca template, answer-only labels), built by lit_peft's InstructionDataModule from the prepared assets."""
    from lit_peft import assets
    from lit_peft.data import InstructionDataModule

    rt = assets.path("rt-sentiment")
    dm = InstructionDataModule(train_data=f"{rt}/instruction", query_field="instruction", response_field="output",
                               template="alpaca", tokenizer=args.model_path, max_length=256,
                               batch_size=args.batch, seed=42)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}


def build_model(args):
    """The benchmarked model (seeded) and its step input."""
    if args.model == "smollm2":
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
        model.config.use_cache = False
        return model, {k: v.to(args.device) for k, v in args.llm_batch.items()}
    torch.manual_seed(0)
    model = LinearStack(args.width, args.blocks)
    gen = torch.Generator().manual_seed(1)
    return model, torch.randn(args.batch, args.tokens, args.width, generator=gen)


# -- the model -------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(q + k + v)


class Mlp(nn.Module):
    def __init__(self, width: int, ratio: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(width, ratio * width)
        self.fc2 = nn.Linear(ratio * width, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.attn = Attention(width)
        self.mlp = Mlp(width)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class LinearStack(nn.Module):
    """``blocks`` ViT-shaped blocks of linears (no head, no norms)."""

    def __init__(self, width: int, blocks: int):
        super().__init__()
        self.blocks = nn.Sequential(*(Block(width) for _ in range(blocks)))

    def forward(self, x):
        return self.blocks(x)


# -- the methods -----------------------------------------------------------------------------------------------
@dataclass
class Method:
    key: str                     # row id (for --methods / --profile)
    method: str                  # what is computed, e.g. "BOFT m=2 b=8"
    impl: str                    # "lit_peft", "peft", "torch"
    build: Callable              # (model, args) -> (model, notes: list[str])
    peft_ref: str | None = None  # key of peft's row for the same method
    ref_note: str = ""           # footnote on the peft comparison
    notes: list[str] = field(default_factory=list)


def _lit_rows(strategy_factory, targets):
    def build(model, args):
        from lit_peft.adapters import SVFT

        strategy = strategy_factory(args, targets)
        cached = isinstance(strategy, SVFT) and getattr(args, "svd_cache", None)
        strategy.apply(model, svd_provider=_cached_svd(args.svd_cache) if cached else None)
        return model, _side_notes(model, args)
    return build


def _cached_svd(directory: str):
    """An SVFT ``svd_provider`` that keeps each SVD in ``directory`` (lit_peft's SVDCache): every row uses the same
    seeded base model, so the rows after the first SVFT row skip the SVDs (building a model is not timed)."""
    from lit_peft.callbacks import SVDCache

    return SVDCache(directory)


def _side_notes(model, args) -> list[str]:
    """Which side ``side="auto"`` picks for the benchmark's input, per adapted layer."""
    from lit_peft.adapters import adapted_layers
    picks = {}
    for layer in adapted_layers(model).values():
        if layer.side != "auto":
            continue
        x = torch.empty(args.batch, args.tokens, layer.in_features, device="meta")
        with torch.enable_grad():
            side = "weight" if layer.use_weight_side(x) else "activation"
        picks[side] = picks.get(side, 0) + 1
    if not picks:
        return []
    return ["auto → " + ", ".join(f"{side} ×{n}" for side, n in sorted(picks.items()))]


def _peft(config_factory):
    def build(model, args):
        from peft import get_peft_model
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = get_peft_model(model, config_factory(args))
        notes = []
        if any("CUDA extension" in str(w.message) for w in caught):
            notes.append("CUDA extension unavailable")
        for module in model.modules():
            if hasattr(module, "boft_R") and "default" in getattr(module, "boft_R", {}):
                notes.append(f"peft ran m={module.boft_R['default'].shape[0]}")
                break
        return model, notes
    return build


def _frozen(model, args):
    model.requires_grad_(False)
    return model, ["no adapter; only the input gradient"]


def _full(model, args):
    model.requires_grad_(True)
    return model, ["all weights trainable"]


def methods(targets: list[str] | None = None, square_targets: list[str] | None = None) -> list[Method]:
    """Every row; ``targets`` / ``square_targets`` (default: the linear stack's) name the adapted linears of the
    benchmarked model (``square_targets``: the square ones, for SVFT top_k)."""
    from lit_peft.adapters import BOFT, OFT, SVFT, DoRA, LoRA, VeRA

    targets = list(targets or TARGETS)
    square_targets = list(square_targets or SQUARE_TARGETS)

    def _lit(strategy_factory, targets=targets):
        return _lit_rows(strategy_factory, targets)

    def peft_cfg(name, **kw):
        def make(args):
            import peft
            return getattr(peft, name)(target_modules=list(targets), **kw)
        return make

    rows = [
        Method("frozen", "frozen base (floor)", "torch", _frozen),
        Method("full", "full fine-tuning", "torch", _full),
        Method("lora", "LoRA r=8", "lit_peft", _lit(lambda a, t: LoRA(rank=8, alpha=16, target_modules=t)),
               peft_ref="lora-peft",
               ref_note="lit_peft splits qkv into q, k, v (3 pairs); peft: one pair" if "qkv" in targets else ""),
        Method("lora-joint", "LoRA r=8, qkv joint", "lit_peft",
               _lit(lambda a, t: LoRA(rank=8, alpha=16, target_modules=t, fused_qkv="joint")),
               peft_ref="lora-peft", notes=["fused_qkv='joint' (as peft)"]),
        Method("lora-peft", "LoRA r=8", "peft", _peft(peft_cfg("LoraConfig", r=8, lora_alpha=16))),
        Method("dora", "DoRA r=8", "lit_peft", _lit(lambda a, t: DoRA(rank=8, alpha=16, target_modules=t)),
               peft_ref="dora-peft"),
        Method("dora-peft", "DoRA r=8", "peft", _peft(peft_cfg("LoraConfig", r=8, lora_alpha=16, use_dora=True))),
        Method("vera", "VeRA r=256", "lit_peft", _lit(lambda a, t: VeRA(rank=256, target_modules=t)),
               peft_ref="vera-peft"),
        Method("vera-peft", "VeRA r=256", "peft", _peft(peft_cfg("VeraConfig", r=256, projection_prng_key=0))),
        Method("oft", "OFT b=16", "lit_peft", _lit(lambda a, t: OFT(block_size=16, target_modules=t)),
               peft_ref="oft-peft", ref_note="peft uses Cayley–Neumann (5 terms), lit_peft the exact solve",
               notes=["exact Cayley"]),
        Method("oft-peft", "OFT b=16", "peft",
               _peft(peft_cfg("OFTConfig", r=0, oft_block_size=16)), notes=["Cayley–Neumann, 5 terms"]),
        Method("boft-m2", "BOFT m=2 b=8", "lit_peft",
               _lit(lambda a, t: BOFT(block_size=8, n_butterfly_factors=2, target_modules=t)),
               peft_ref="boft-peft", ref_note="† peft row ran m=1 (see its notes): not the same m"),
        Method("boft-m2-act", "BOFT m=2 b=8, side=activation", "lit_peft",
               _lit(lambda a, t: BOFT(block_size=8, n_butterfly_factors=2, side="activation", target_modules=t)),
               peft_ref="boft-peft", ref_note="†"),
        Method("boft-m2-weight", "BOFT m=2 b=8, side=weight", "lit_peft",
               _lit(lambda a, t: BOFT(block_size=8, n_butterfly_factors=2, side="weight", target_modules=t)),
               peft_ref="boft-peft", ref_note="†"),
        Method("boft-m2-joint", "BOFT m=2 b=8, qkv joint", "lit_peft",
               _lit(lambda a, t: BOFT(block_size=8, n_butterfly_factors=2, fused_qkv="joint", target_modules=t)),
               peft_ref="boft-peft", ref_note="†", notes=["fused_qkv='joint' (as peft)"]),
        Method("boft-m1", "BOFT m=1 b=8", "lit_peft",
               _lit(lambda a, t: BOFT(block_size=8, n_butterfly_factors=1, target_modules=t)),
               peft_ref="boft-peft"),
        Method("boft-peft", "BOFT m=2 b=8 requested", "peft",
               _peft(peft_cfg("BOFTConfig", boft_block_size=8, boft_n_butterfly_factor=2))),
        Method("svft-plain", "SVFT plain", "lit_peft", _lit(lambda a, t: SVFT("plain", target_modules=t))),
        Method("svft-plain-act", "SVFT plain, side=activation", "lit_peft",
               _lit(lambda a, t: SVFT("plain", side="activation", target_modules=t))),
        Method("svft-plain-weight", "SVFT plain, side=weight", "lit_peft",
               _lit(lambda a, t: SVFT("plain", side="weight", target_modules=t))),
        Method("svft-banded", "SVFT banded d=2", "lit_peft",
               _lit(lambda a, t: SVFT("banded", off_diag=2, target_modules=t))),
        Method("svft-banded-act", "SVFT banded d=2, side=activation", "lit_peft",
               _lit(lambda a, t: SVFT("banded", off_diag=2, side="activation", target_modules=t))),
        Method("svft-banded-weight", "SVFT banded d=2, side=weight", "lit_peft",
               _lit(lambda a, t: SVFT("banded", off_diag=2, side="weight", target_modules=t))),
        Method("svft-plain-k64", "SVFT plain, svd_rank=64", "lit_peft",
               _lit(lambda a, t: SVFT("plain", svd_rank=64, target_modules=t))),
        Method("svft-banded-k64", "SVFT banded d=2, svd_rank=64", "lit_peft",
               _lit(lambda a, t: SVFT("banded", off_diag=2, svd_rank=64, target_modules=t))),
        Method("svft-random", "SVFT random d=2", "lit_peft",
               _lit(lambda a, t: SVFT("random", off_diag=2, target_modules=t))),
        Method("svft-topk", "SVFT top_k d=2", "lit_peft",
               _lit(lambda a, t: SVFT("top_k", off_diag=2, target_modules=t), targets=square_targets),
               notes=[", ".join(square_targets) + " only: top_k needs square W; the others frozen"]),
    ]
    return rows


# -- measuring one method --------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _storages(model: nn.Module) -> dict[int, int]:
    """``{storage address: bytes}`` of every parameter and buffer (shared tensors counted once)."""
    from lit_peft.adapters.quantized import is_quantized

    out = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if is_quantized(t):  # a quantized base weight (scripts/quantized_base.py counts those on their own)
            continue
        storage = t.untyped_storage()
        out[storage.data_ptr()] = storage.nbytes()
    return out


def _cpu_step_peak(step) -> int | None:
    """Peak bytes live in torch's CPU allocator during one ``step()`` above what was live before it.

    Read from ``torch.profiler(profile_memory=True)`` allocation events (``total_allocated``); ``None`` if this
    torch's profiler does not expose them.
    """
    from torch.profiler import ProfilerActivity, profile
    try:
        from torch._C._profiler import _EventType
    except ImportError:
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        allocations = []
        while stack:
            event = stack.pop()
            stack.extend(event.children)
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
                allocations.append(event)
    except (AttributeError, RuntimeError):
        return None
    if not allocations:
        return None
    allocations.sort(key=lambda e: e.start_time_ns)
    first = allocations[0].extra_fields
    baseline = first.total_allocated - first.alloc_size
    return max(e.extra_fields.total_allocated for e in allocations) - baseline


def measure(method: Method, args) -> dict:
    """Build the model, apply the method, time the steps, measure memory; runs in a child process."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    model, x = build_model(args)
    model = model.to(device)
    base_storages = _storages(model)
    _trim_heap()
    base_rss = (_proc_status_kib("VmRSS") or 0) * 1024

    model, notes = method.build(model, args)
    from lit_peft.adapters.quantized import base_weight_bytes

    linear_weight_bytes = base_weight_bytes(model)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    static_bytes = sum(n for ptr, n in _storages(model).items() if ptr not in base_storages)
    params = [p for p in model.parameters() if p.requires_grad]
    llm = isinstance(x, dict)
    if not llm:
        x = x.to(device)
        if method.key == "frozen" or args.input_grad:
            x.requires_grad_(True)
    if not (not llm and x.requires_grad) and not params:
        raise RuntimeError("nothing requires grad")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step():
        with autocast:
            if llm:
                loss = model(**x).loss           # the model's own LM loss on the answer tokens
            else:
                loss = model(x).float().pow(2).mean()
        loss.backward()
        for p in params:
            p.grad = None
        if not llm:
            x.grad = None

    _trim_heap()
    rss_peak_reset = not cuda and _reset_peak_rss()
    for _ in range(args.warmup):
        step()
    times = []
    timed = 0.0
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = clock()
        step()
        if cuda:
            torch.cuda.synchronize()
        dt = clock() - t0
        times.append(dt)
        timed += dt
        if len(times) >= 3 and timed > args.budget:
            break

    rss_delta = None
    if rss_peak_reset:
        rss_delta = (_proc_status_kib("VmHWM") or 0) * 1024 - base_rss
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        step_peak = torch.cuda.max_memory_allocated() - before
    else:
        step_peak = _cpu_step_peak(step)

    result = {"key": method.key, "trainable": trainable, "times": times, "notes": notes,
              "static_bytes": static_bytes, "step_peak_bytes": step_peak,
              "mem_bytes": None if step_peak is None else static_bytes + step_peak, "rss_bytes": rss_delta,
              "linear_weight_bytes": linear_weight_bytes}
    if args.profile == method.key:
        result["profile"] = profile_steps(step, args, cuda)
    return result


def profile_steps(step, args, cuda: bool, steps: int = 3) -> str:
    """``torch.profiler`` tables (by op, and by op + input shapes) over ``steps`` more steps."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
            if cuda:
                torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    by_op = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=50)
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by=sort, row_limit=30, max_name_column_width=40, max_shapes_column_width=70)
    return (f"profile over {steps} steps (totals are for {steps} steps)\n\n-- by op --\n{by_op}\n"
            f"-- by op and input shapes --\n{by_shape}")


def _child(conn, method, args):
    try:
        conn.send(measure(method, args))
    except BaseException as err:  # report, never hang the parent
        conn.send({"key": method.key, "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc()})
    finally:
        conn.close()


def run_isolated(method: Method, args) -> dict:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, method, args))
    proc.start()
    child.close()
    result = None
    try:
        if parent.poll(args.timeout):
            result = parent.recv()
    except EOFError:
        pass
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result is None:
        result = {"key": method.key, "error": f"worker died or timed out (exit code {proc.exitcode})"}
    return result


# -- reporting -------------------------------------------------------------------------------------------------
STAT = {"median": statistics.median, "min": min}


def _step_ms(result, stat: str = "median") -> float | None:
    """The row's step time in ms: median (default) or min of all its timed steps."""
    times = result.get("times")
    return STAT[stat](times) * 1e3 if times else None


def _ratio(a, b) -> str:
    return f"{a / b:.2f}×" if a is not None and b else "—"


def _mib(nbytes) -> float:
    return nbytes / 2**20


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(args) -> str:
    if args.device == "cuda":
        return f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cuda"
    return f"cpu ({cpu_name()})"


def render(rows: list[Method], results: dict[str, dict], args, command: str) -> str:
    import lit_peft
    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    width = args.width
    cpu = args.device == "cpu"
    if args.model == "smollm2":
        shapes = (f"SmolLM2-135M-Instruct (30 decoder layers, width 576; `{', '.join(LLM_TARGETS)}` adapted), "
                  f"float32 weights; input: the rt-smollm2 task's first training batch ({args.batch} RT sentiment "
                  f"prompts, padded to {args.tokens} tokens), loss: the model's LM loss on the answer tokens")
    else:
        shapes = (f"{args.blocks} block(s) × [qkv {width}→{3 * width}, proj {width}→{width}, "
                  f"fc1 {width}→{4 * width}, fc2 {4 * width}→{width}], input ({args.batch}, {args.tokens}, {width})")
    if args.device == "cuda":
        peak_what = "torch.cuda.max_memory_allocated() over one step minus what was allocated before it"
    else:
        peak_what = "torch.profiler(profile_memory=True) allocation events over one step"
    mem_what = (f"adapter tensors and buffers + peak bytes live during one step ({peak_what}: saved activations, "
                f"temporaries, gradients); base weights and input excluded")
    rss_what = ("RSS Δ: process resident-set high-water mark (VmHWM) over the warm-up and timed steps minus the RSS "
                "of the built base model (includes allocator slack and library workspaces)")
    lines = [
        f"Command: `{command}`  ",
        f"torch {torch.__version__}, peft {peft_version}, lit_peft {getattr(lit_peft, '__version__', '?')}, "
        f"Python {platform.python_version()}; device: {device_label(args)}; threads: {args.threads}; "
        f"dtype: {args.dtype}{' (autocast)' if args.dtype == 'bfloat16' else ''}  ",
        f"Shapes: {shapes}"
        + ("" if args.model == "smollm2" else
           f"; input requires grad: {'all rows' if args.input_grad else 'frozen row only'}") + "  ",
        f"Time: {args.stat} of up to {args.repeats * args.rounds} steps (forward, loss, backward, zero grads; "
        f"{args.repeats} per process after {args.warmup} warm-up steps"
        + (f", {args.rounds} rounds over all rows" if args.rounds > 1 else "") + "), "
        + ("wall clock (time.perf_counter)" if args.clock == "wall" else
           "CPU time of the process (time.process_time; all threads' time summed)")
        + "; every row in its own forked process  ",
        f"Peak memory: {mem_what}. {rss_what if args.device == 'cpu' else ''}  ",
        f"Run: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}"
        + (f"; 1-min load average at start: {args.load_average:.1f} on {os.cpu_count()} CPUs"
           if getattr(args, "load_average", None) is not None else ""),
        "",
        "| method | implementation | trainable params | time / step (ms) | time × lit_peft LoRA r=8 | "
        "time × peft same method | peak memory (MiB) | memory × LoRA r=8 | " + ("RSS Δ (MiB) | " if cpu else "")
        + "notes |",
        "|---|---|--:|--:|--:|--:|--:|--:|" + ("--:|" if cpu else "") + "---|",
    ]
    lora = results.get("lora", {})
    lora_ms, lora_mem = _step_ms(lora, args.stat), lora.get("mem_bytes")
    footnotes = []
    for row in rows:
        res = results.get(row.key)
        if res is None:
            continue
        if "error" in res:
            lines.append(f"| {row.method} | {row.impl} | — | — | — | — | — | — | {'— | ' if cpu else ''}"
                         f"error: {res['error'][:160]} |")
            continue
        ms = _step_ms(res, args.stat)
        ref = results.get(row.peft_ref) if row.peft_ref else None
        ref_ms = _step_ms(ref, args.stat) if ref and "error" not in ref else None
        vs_peft = _ratio(ms, ref_ms) if ref_ms else "—"
        if ref_ms and row.ref_note.startswith("†"):
            vs_peft += " †"
        notes = list(row.notes) + list(res.get("notes", []))
        if row.ref_note and not row.ref_note.startswith("†"):
            notes.append(row.ref_note)
        elif ref_ms and row.ref_note and row.ref_note not in footnotes and len(row.ref_note) > 1:
            footnotes.append(row.ref_note)
        n = len(res["times"])
        if n < args.repeats * args.rounds:
            notes.append(f"{n} timed steps")
        mem, rss = res.get("mem_bytes"), res.get("rss_bytes")
        rss_cell = ("—" if rss is None else f"{_mib(rss):,.1f}") + " | " if cpu else ""
        lines.append(
            f"| {row.method} | {row.impl} | {res['trainable']:,} | {ms:,.1f} | {_ratio(ms, lora_ms)} | {vs_peft} | "
            f"{'—' if mem is None else f'{_mib(mem):,.1f}'} | {_ratio(mem, lora_mem) if mem and lora_mem else '—'} | "
            f"{rss_cell}{'; '.join(notes)} |")
    lines.append("")
    if footnotes:
        lines += [f"{note}  " for note in footnotes] + [""]
    lines.append("peft's BOFT needs its CUDA extension for more than one butterfly factor; without it (any CPU run) "
                 "it warns and silently runs m=1 whatever was requested. lit_peft rows adapt q, k and v as separate "
                 "parts (the papers' count) unless marked 'qkv joint'; peft adapts the fused qkv as one matrix.")
    return "\n".join(lines) + "\n"


INTRO = """# Adapter benchmarks

Forward+backward time and peak memory of each adapter method on a stack of ViT-B-shaped linears (per block:
`qkv` 768→2304, `proj` 768→768, `fc1` 768→3072, `fc2` 3072→768; every linear frozen and adapted), next to
LoRA r=8 and next to `peft`'s implementation of the same method where `peft` has one, all in one run of
[`scripts/bench_adapters.py`](../scripts/bench_adapters.py).

* **Time**: median over timed steps (forward, `loss = out.float().pow(2).mean()`, backward, zero grads) after
  warm-up steps, seeded model and input, `time.perf_counter` (with `torch.cuda.synchronize` on CUDA). The
  input requires grad in every row, as a block's input deep inside a network does. The *frozen* row (no
  adapter, only the input gradient) is the floor; *full fine-tuning* is the reference. On a shared machine,
  `--rounds N --stat min` (every row run N times, interleaved, least-disturbed step reported) or
  `--threads 1 --clock process` (CPU time of one thread) give steadier figures.
* **Peak memory**: the adapter's own tensors and buffers plus the peak bytes live in torch's allocator during
  one step (saved activations, temporaries, gradients; from `torch.profiler(profile_memory=True)` allocation
  events on CPU, `torch.cuda.max_memory_allocated()` on CUDA); base weights and input, the same in every row,
  are left out. On CPU, *RSS Δ* is the process's resident-set high-water mark during the steps minus the RSS of
  the built base model (what the OS saw; includes allocator slack and library workspaces, noisier). Each row runs
  in its own forked process.
* **Ratios**: time and memory relative to lit_peft LoRA r=8 (q, k, v adapted as separate parts), and time
  relative to `peft`'s row for the same method.

Reproduce (each run replaces its own section of this file: one per device, dtype and, on CPU, thread count):

```bash
python scripts/bench_adapters.py --out docs/benchmarks.md                       # CPU, float32, 3-5 min on 2 quiet cores
python scripts/bench_adapters.py --quick                                        # 30-second smoke run
python scripts/bench_adapters.py --rounds 3 --stat min --warmup 1 --repeats 3   # on a busy machine
python scripts/bench_adapters.py --device cuda --dtype bfloat16 --batch 64 --out docs/benchmarks.md
python scripts/bench_adapters.py --methods 'lora$|boft-m2$' --profile boft-m2   # torch.profiler tables for one row
```
"""


def write_section(path: str, key: str, title: str, body: str) -> None:
    """Replace (or append) the section of ``path`` marked with ``key``; write a temp file, then rename."""
    begin, end = f"<!-- bench:{key}:begin -->", f"<!-- bench:{key}:end -->"
    section = f"{begin}\n## {title}\n\n{body}{end}\n"
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = INTRO
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text)


# -- main ------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", choices=["linear-stack", "smollm2"], default="linear-stack",
                   help="linear-stack: ViT-B-shaped linears, random input (default); smollm2: the prepared "
                        "SmolLM2-135M-Instruct asset on a real batch of the rt-smollm2 task (python -m "
                        "lit_peft.assets prepare smollm2-135m-instruct rt-sentiment)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16 runs under torch.autocast (weights stay float32)")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: usable CPUs)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--clock", choices=["wall", "process"], default="wall",
                   help="wall: time.perf_counter (default); process: time.process_time, CPU time of all threads "
                        "(steadier on a shared machine with --threads 1)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole list of rows this many times (fresh processes), pooling each row's steps: "
                        "spreads slow drifts of a shared machine's load over all rows")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="statistic of the pooled step times (min: least-disturbed step, for a busy machine)")
    p.add_argument("--budget", type=float, default=8.0,
                   help="stop timing a method after this many seconds of timed steps once it has 3")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per method before giving up")
    p.add_argument("--methods", default=None, help="regex over row keys (see --list)")
    p.add_argument("--list", action="store_true", help="list the row keys and exit")
    p.add_argument("--no-input-grad", dest="input_grad", action="store_false",
                   help="only the frozen row's input requires grad")
    p.add_argument("--no-peft", action="store_true", help="skip peft's rows")
    p.add_argument("--no-isolate", action="store_true",
                   help="run every row in this process (no memory figures worth reading)")
    p.add_argument("--profile", default=None, metavar="KEY", help="print torch.profiler tables for this row")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: width 256, 1 block, batch 2, 64 tokens, 1 warm-up + 2 timed steps")
    p.add_argument("--out", default=None, help="markdown file whose device section to replace or append")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write every row's numbers and the rendered table to this JSON file")
    p.add_argument("--note", default=None, help="a line to put above the table in --out (e.g. 'Preliminary')")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.blocks, args.batch, args.tokens = 256, 1, 2, 64
        args.warmup, args.repeats = 1, 2
    if args.model == "smollm2":
        from lit_peft import assets
        args.model_path = str(assets.path("smollm2-135m-instruct"))   # AssetNotPrepared says what to run
        args.llm_batch = real_batch(args)
        args.tokens = int(args.llm_batch["input_ids"].shape[1])
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    rows = methods(*model_targets(args))
    if args.model == "smollm2":
        rows = [r for r in rows if r.key != "frozen"]   # no input to take a gradient of: the floor is undefined
    if args.list:
        for row in rows:
            print(f"{row.key:22s} {row.impl:9s} {row.method}")
        return 0
    if args.no_peft:
        rows = [r for r in rows if r.impl != "peft"]
    if args.methods:
        pattern = re.compile(args.methods)
        rows = [r for r in rows if pattern.search(r.key) or r.key == "lora" or r.key == args.profile]
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    if any(r.impl == "peft" for r in rows):
        try:
            import peft  # noqa: F401  (imported once here; forked workers inherit it)
        except ImportError:
            print("peft is not installed: skipping its rows", file=sys.stderr)
            rows = [r for r in rows if r.impl != "peft"]
    import lit_peft.adapters  # noqa: F401

    if args.device == "cpu":
        # The profiler's first use imports a lot (seconds); pay it once here rather than in every worker.
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
            pass
    # Forked workers would otherwise touch (and copy) every object of the imported libraries in gc.collect().
    gc.collect()
    gc.freeze()
    results = {}
    start = time.perf_counter()
    args.load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    svd_dir = tempfile.TemporaryDirectory(prefix="bench-svd-")
    args.svd_cache = svd_dir.name
    for round_, row in ((r, row) for r in range(args.rounds) for row in rows):
        t0 = time.perf_counter()
        run_args = args if round_ == 0 else argparse.Namespace(**{**vars(args), "profile": None})
        res = measure_in_process(row, run_args) if args.no_isolate else run_isolated(row, run_args)
        if round_ > 0 and "error" not in res and "error" not in results.get(row.key, {"error": ""}):
            results[row.key]["times"] += res["times"]  # memory and notes from the first round
            res = results[row.key]
        elif round_ == 0:
            results[row.key] = res
        if "error" in res:
            status = "ERROR " + res["error"]
            if res.get("traceback"):
                print(res["traceback"], file=sys.stderr)
        else:
            mem = res.get("mem_bytes")
            mem_text = "—" if mem is None else f"{_mib(mem):.1f}"
            status = (f"{_step_ms(res, args.stat):9.1f} ms  {mem_text:>8s} MiB  "
                      f"{res['trainable']:>10,} params  {len(res['times'])} steps")
        label = f"{row.key} r{round_ + 1}" if args.rounds > 1 else row.key
        print(f"[{time.perf_counter() - start:6.1f}s] {label:23s} {status}  ({time.perf_counter() - t0:.1f}s)",
              file=sys.stderr, flush=True)
        if res.get("profile"):
            print(res.pop("profile"), file=sys.stderr, flush=True)

    svd_dir.cleanup()
    body = render(rows, results, args, command)
    print(body)
    lora_ms = _step_ms(results.get("lora", {}), args.stat)
    boft_ms = _step_ms(results.get("boft-m2", {}), args.stat)
    if lora_ms and boft_ms:
        ratio = boft_ms / lora_ms
        print(f"lit_peft BOFT(m=2, b=8) / LoRA r=8 time: {ratio:.2f}× (target ≤ 1.30×: "
              f"{'met' if ratio <= 1.3 else 'NOT met'})")
    if args.json:
        import json
        atomic_write_text(args.json, json.dumps({
            "command": command, "table": body, "stat": args.stat,
            "rows": {r.key: {"method": r.method, "impl": r.impl, **{k: v for k, v in results.get(r.key, {}).items()
                                                                   if k != "traceback"}} for r in rows}},
            indent=2, default=str) + "\n")
    if args.out:
        key = (("smollm2-" if args.model == "smollm2" else "") + f"{args.device}-{args.dtype}"
               + (f"-{args.threads}threads" if args.device == "cpu" else ""))
        title = (("SmolLM2-135M, " if args.model == "smollm2" else "") + f"{device_label(args)}, {args.dtype}"
                 + (f", {args.threads} thread(s)" if args.device == "cpu" else ""))
        write_section(args.out, key, title, (f"> {args.note}\n\n" if args.note else "") + body)
        print(f"wrote section '{key}' of {args.out}", file=sys.stderr)
    return 0


def measure_in_process(row, args) -> dict:
    try:
        return measure(row, args)
    except Exception as err:
        return {"key": row.key, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}


if __name__ == "__main__":
    sys.exit(main())
