"""Export any adapter as a LoRA in Hugging Face ``peft``'s format (:func:`export_lora`), for LoRA-only servers.

Serving engines such as vLLM and SGLang load LoRA adapters only. Every lit_peft adapter changes each adapted layer
by ``ΔW = W' − W`` (and BOFT/OFT with ``train_bias`` the bias by ``Δb``); a truncated SVD
``ΔW ≈ U_r diag(s_r) V_rᵀ`` gives the LoRA pair ``B = U_r diag(√s_r)`` (``out × r``), ``A = diag(√s_r) V_rᵀ``
(``r × in``) with peft's ``scaling = lora_alpha / r = 1`` (``alpha_pattern`` = ``rank_pattern`` per layer). For a
LoRA adapter (rank ``r``) the export is exact at rank ``r``; for BOFT, OFT, SVFT, DoRA and VeRA ``ΔW`` usually has
full rank and the export is an approximation whose error is measured and written beside it.

Rank per layer: fixed (``rank``), or the smallest rank whose relative Frobenius error
``‖ΔW − ΔW_r‖ / ‖ΔW‖ = √(Σ_{i>r} s_i²) / ‖ΔW‖`` is at most ``tolerance``. A layer whose ``ΔW`` is zero gets no LoRA.
The SVD runs in float64 on the merged weight computed in float64; the LoRA tensors are written in float32.

The folder: ``adapter_config.json`` + ``adapter_model.safetensors`` (``peft.PeftModel.from_pretrained(base, folder)``
loads it), and ``lora_export.json``: per layer the rank, the relative error, ``‖ΔW‖`` and ``‖W‖``, and, when
``example`` inputs are given, the relative difference of the model's outputs with the exported LoRA against the
adapted model's (the error a LoRA-only server will show). A changed bias is written as the layer's full new bias
(``<layer>.base_layer.bias``, peft ``bias="lora_only"``); ``trainable_modules`` (a classification head) as
``modules_to_save``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..distributed import full_tensor
from ..files import atomic_write_folder
from .base import adapted_layers, get_strategy
from .quantized import dense_weight
from .peft_export import PEFT_WEIGHTS_FILE, PREFIX, _require_peft

REPORT_FILE = "lora_export.json"


@dataclass
class LayerExport:
    """One adapted layer's LoRA: its rank, the relative Frobenius error of ``ΔW`` at that rank, the norms."""

    rank: int
    relative_error: float
    delta_norm: float
    weight_norm: float
    bias_changed: bool


@dataclass
class LoraExport:
    """What :func:`export_lora` wrote: the folder, every layer's :class:`LayerExport`, the file size, and the
    relative output difference on the example inputs (``None`` without them)."""

    folder: Path
    layers: dict[str, LayerExport] = field(default_factory=dict)
    file_bytes: int = 0
    output_relative_error: float | None = None

    @property
    def max_relative_error(self) -> float:
        return max((layer.relative_error for layer in self.layers.values()), default=0.0)

    def summary(self) -> str:
        ranks = [layer.rank for layer in self.layers.values()]
        out = (f"LoRA export: {len(ranks)} layers, ranks {min(ranks, default=0)}–{max(ranks, default=0)} "
               f"(mean {sum(ranks) / max(1, len(ranks)):.1f}), max relative ΔW error {self.max_relative_error:.2e}, "
               f"{self.file_bytes / 2**20:.2f} MiB")
        if self.output_relative_error is not None:
            out += f", outputs vs the adapted model: relative difference {self.output_relative_error:.2e}"
        return f"{out} -> {self.folder}"


def _choose_rank(s: Tensor, rank: int | None, tolerance: float | None) -> tuple[int, float]:
    """``(r, relative error)`` for singular values ``s`` (descending)."""
    total = float((s * s).sum())
    if total == 0.0:
        return 0, 0.0
    tail = torch.flip(torch.cumsum(torch.flip(s * s, [0]), 0), [0]).tolist() + [0.0]  # tail[r] = Σ_{i>=r} s_i²
    if rank is not None:
        r = min(rank, len(s))
    else:
        r = next(r for r in range(len(s) + 1) if math.sqrt(max(tail[r], 0.0) / total) <= tolerance)
    return r, math.sqrt(max(tail[r], 0.0) / total)


def _outputs(model: nn.Module, example: Any) -> Tensor:
    with torch.no_grad():
        out = model(**example) if isinstance(example, Mapping) else model(example)
    out = getattr(out, "logits", out)
    return (out[0] if isinstance(out, (tuple, list)) else out).double()


def lora_factors(weight: Tensor, merged_weight: Tensor, bias: Tensor | None, merged_bias: Tensor | None,
                 rank: int | None, tolerance: float | None
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None, LayerExport]:
    """One layer's LoRA ``(B, A, new bias or None, LayerExport)`` from its base and adapted ``(W, b)`` (float64 SVD
    of ``ΔW``), at ``rank``, or else at the smallest rank within ``tolerance``; ``B`` and ``A`` are ``None`` when the
    layer is unchanged."""
    weight = weight.detach().double()
    delta = merged_weight.detach().double() - weight
    bias_changed = merged_bias is not None and (bias is None or not torch.equal(merged_bias.double(), bias.double()))
    U, s, Vh = torch.linalg.svd(delta, full_matrices=False)
    r, error = _choose_rank(s, rank, tolerance)
    layer = LayerExport(rank=r, relative_error=error, delta_norm=float(delta.norm()),
                        weight_norm=float(weight.norm()), bias_changed=bool(bias_changed))
    if r == 0 and not bias_changed:
        return None, None, None, layer
    r = max(r, 1)  # a bias-only change still needs a (zero) pair for peft to wrap the layer
    root = s[:r].sqrt()
    return (U[:, :r] * root, root[:, None] * Vh[:r], merged_bias.detach().double() if bias_changed else None,
            layer)


def _check_rank_args(rank: int | None, tolerance: float) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an integer >= 1 or None (chosen by tolerance), got {rank!r}")
    if rank is None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                         or not 0.0 < tolerance < 1.0):
        raise ValueError(f"tolerance must be a number in (0, 1), got {tolerance!r}")


def served_model(base: nn.Module, factors: Mapping[str, tuple[Tensor, Tensor, Tensor | None]]) -> nn.Module:
    """``base`` (a plain model, changed in place) with each layer of ``factors`` given ``W + B A`` (and the new
    bias): what a LoRA-only server computes from the export."""
    with torch.no_grad():
        for name, (B, A, new_bias) in factors.items():
            linear = base.get_submodule(name)
            linear.weight.copy_((linear.weight.double() + (B @ A).to(linear.weight.device)).to(linear.weight.dtype))
            if new_bias is not None:
                if linear.bias is None:
                    linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                           device=linear.weight.device), requires_grad=False)
                linear.bias.copy_(new_bias.to(linear.bias.dtype))
    return base


def write_lora(folder: str | os.PathLike, factors: Mapping[str, tuple[Tensor, Tensor, Tensor | None]],
               report: LoraExport, head_tensors: Mapping[str, Tensor] | None = None,
               head_modules: list[str] | None = None, rank: int | None = None, tolerance: float | None = None,
               base_model_name_or_path: str | None = None, task_type: str | None = None) -> Path:
    """Write the peft LoRA folder of ``factors`` (``adapter_config.json``, ``adapter_model.safetensors``) and the
    report (``lora_export.json``); ``head_tensors`` (``<module>.<tensor>``) go in as ``modules_to_save``. The
    folder is written under a temporary name and renamed into place. Sets ``report.file_bytes``."""
    peft = _require_peft()
    tensors: dict[str, Tensor] = {}
    for name, (B, A, new_bias) in factors.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A.float()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B.float()
        if new_bias is not None:
            tensors[f"{PREFIX}{name}.base_layer.bias"] = new_bias.float()
    for key, value in (head_tensors or {}).items():
        tensors[f"{PREFIX}{key}"] = value
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    report.file_bytes = sum(v.numel() * v.element_size() for v in tensors.values())
    ranks = {name: B.shape[1] for name, (B, _, _) in factors.items()}
    top = max(ranks.values())
    patterns = {re.escape(name): r for name, r in ranks.items()}
    config = peft.LoraConfig(r=top, lora_alpha=top, target_modules=sorted(factors), rank_pattern=patterns,
                             alpha_pattern=dict(patterns), lora_dropout=0.0, use_rslora=False,
                             bias="lora_only" if any(b is not None for _, _, b in factors.values()) else "none",
                             modules_to_save=head_modules or None, task_type=task_type,
                             base_model_name_or_path=base_model_name_or_path)

    def write(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        body = {"tolerance": None if rank is not None else tolerance, "rank": rank,
                "output_relative_error": report.output_relative_error, "file_bytes": report.file_bytes,
                "layers": {name: asdict(layer) for name, layer in report.layers.items()}}
        (tmp / REPORT_FILE).write_text(json.dumps(body, indent=2) + "\n")

    return atomic_write_folder(folder, write)


def export_lora(model: nn.Module, folder: str | os.PathLike, *, rank: int | None = None, tolerance: float = 1e-2,
                example: Any = None, base_model_name_or_path: str | None = None,
                task_type: str | None = None, outputs: Callable[[nn.Module], Tensor] | None = None) -> LoraExport:
    """Write ``model``'s adapter (any lit_peft strategy) as a peft LoRA folder; returns a :class:`LoraExport`.

    Args:
        model: the adapted model (the backbone itself, e.g. ``LlamaForCausalLM``, not a LightningModule; not
            sharded: call it on rank 0 of a gathered model, or use ``MergeAdapters(lora_tolerance=...)``).
        folder: output folder (written under a temporary name and renamed into place; replaces an existing one).
        rank: the LoRA rank of every layer (capped at the layer's size); ``None``: chosen per layer by ``tolerance``.
        tolerance: with ``rank=None``, the largest relative Frobenius error of each layer's ``ΔW`` (0 < tol < 1).
        example: inputs to measure the exported LoRA's output error on (a tensor, or a dict of keyword inputs for
            a Hugging Face model); ``None`` skips the measurement.
        base_model_name_or_path, task_type: recorded in ``adapter_config.json`` (peft's ``"CAUSAL_LM"``, …).
        outputs: instead of ``example``, a function giving a model's output tensor (e.g. a LightningModule's
            ``model_outputs`` on a batch); called on ``model`` and on the served LoRA model.
    """
    _check_rank_args(rank, tolerance)
    _require_peft()
    strategy = get_strategy(model)
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("the model has no adapted layers to export")
    report = LoraExport(folder=Path(folder))
    factors: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}
    for name, layer in layers.items():
        weight = dense_weight(layer.weight).detach().double()
        bias = None if layer.bias is None else full_tensor(layer.bias).detach().double()
        with torch.no_grad():
            merged_w, merged_b = layer._assemble(weight, bias, training=False)
        B, A, new_bias, report.layers[name] = lora_factors(weight, merged_w, bias, merged_b, rank, tolerance)
        if B is not None:
            factors[name] = (B, A, new_bias)
    if not factors:
        raise ValueError("every adapted layer is unchanged (ΔW = 0: the adapter is at its identity init); there is "
                         "nothing to export")
    head = strategy.trainable_module_names(model)
    head_tensors = {f"{module_name}.{key}": full_tensor(value).detach().cpu()
                    for module_name in head for key, value in model.get_submodule(module_name).state_dict().items()}
    if example is not None or outputs is not None:
        def run(m: nn.Module) -> Tensor:
            if outputs is None:
                return _outputs(m, example)
            with torch.no_grad():
                return outputs(m).double()

        reference = run(model)
        served = copy.deepcopy(model)
        for name, layer in adapted_layers(served).items():  # back to plain layers with the base weights
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              device=layer.weight.device, dtype=layer.weight.dtype)
            with torch.no_grad():
                plain.weight.copy_(dense_weight(layer.weight))
                if layer.bias is not None:
                    plain.bias.copy_(full_tensor(layer.bias))
            parent, _, leaf = name.rpartition(".")
            setattr(served.get_submodule(parent) if parent else served, leaf, plain.requires_grad_(False))
        got = run(served_model(served, factors).eval())
        del served
        report.output_relative_error = float((got - reference).abs().max() / reference.abs().max().clamp_min(1e-30))
    write_lora(folder, factors, report, head_tensors, head, rank, tolerance, base_model_name_or_path, task_type)
    return report


__all__ = ["LayerExport", "LoraExport", "export_lora", "lora_factors", "served_model", "write_lora"]
