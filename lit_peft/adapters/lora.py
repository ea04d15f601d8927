"""LoRA (Hu et al., ICLR 2022, arXiv 2106.09685) and DoRA (Liu et al., ICML 2024, arXiv 2402.09353): the
baselines both papers compare against.

    LoRA:  W' = W + (α/r) B A                          A: r × in (Kaiming-uniform), B: out × r (zeros)
           y  = x Wᵀ + b + (α/r) · drop(x) Aᵀ Bᵀ

    DoRA:  W' = m ⊙ (W + (α/r) B A) / ‖W + (α/r) B A‖_row          m: (out,), init ‖W‖_row
           y  = (m / n) ⊙ (x Wᵀ + (α/r) · x Aᵀ Bᵀ) + b              n = ‖W + (α/r) B A‖_row, detached
           with dropout (training, p > 0), as peft and the DoRA authors' code, one mask d = drop(x) for both paths:
           y  = x Wᵀ + b + (m/n − 1) ⊙ d Wᵀ + (m/n) ⊙ (α/r) · d Aᵀ Bᵀ

``‖·‖_row`` is the norm of each output row of the ``(out, in)`` weight (DoRA's "column norm" of ``Wᵀ``); as in the
DoRA paper §4.3 it is detached from the graph, so it acts as a constant in the backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdaptedLinear, AdapterStrategy, adapter_tensor, compute_dtype
from .quantized import dense_weight, frozen_linear, is_quantized
from .targets import TargetSpec


class LowRankPart(nn.Module):
    """``A: (r, in)`` (Kaiming-uniform, as ``nn.Linear``) and ``B: (out, r)`` (zeros) of one part."""

    def __init__(self, in_features: int, out_features: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)


class LoRALinear(AdaptedLinear):
    """A frozen ``nn.Linear`` plus ``(α/r) B A`` per part."""

    def __init__(self, base: nn.Linear, parts: Mapping[str, tuple[int, int]], rank: int, alpha: float,
                 dropout: float = 0.0):
        super().__init__(base, parts)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype = compute_dtype(self.weight.dtype)
        for part, (start, stop) in self.parts.items():
            self.adapters[part] = LowRankPart(self.in_features, stop - start, rank, self.weight.device, dtype)

    def delta_weight(self, part: str, like: Tensor) -> Tensor:
        adapter = self.adapters[part]
        return self.scaling * (adapter_tensor(adapter.lora_B, like) @ adapter_tensor(adapter.lora_A, like))

    def low_rank_output(self, part: str, x: Tensor, dropped: bool = False) -> Tensor:
        """``(α/r) · drop(x) Aᵀ Bᵀ``; ``dropped``: ``x`` has had its dropout already."""
        adapter = self.adapters[part]
        h = F.linear(x if dropped else self.dropout(x), adapter.lora_A.to(x.dtype))
        return F.linear(h * self.scaling, adapter.lora_B.to(x.dtype))  # scale the rank-r intermediate, not (T, out)

    def adapted_rows(self, part, weight, bias, *, training):
        return weight + self.delta_weight(part, weight), bias

    def part_output(self, part, x, weight, bias):
        return frozen_linear(x, weight, bias) + self.low_rank_output(part, x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


class DoRALinear(LoRALinear):
    """LoRA's direction update with a trainable per-row magnitude ``m`` (see module docstring)."""

    def __init__(self, base: nn.Linear, parts: Mapping[str, tuple[int, int]], rank: int, alpha: float,
                 dropout: float = 0.0):
        super().__init__(base, parts, rank, alpha, dropout)
        weight = dense_weight(self.weight).detach()
        for part, (start, stop) in self.parts.items():
            norm = torch.linalg.vector_norm(weight[start:stop].to(compute_dtype(weight.dtype)), dim=1)
            self.adapters[part].magnitude = nn.Parameter(norm)

    def _norm_scale(self, part: str, weight: Tensor) -> Tensor:
        """``m / ‖W + ΔW‖_row`` with the norm detached (DoRA §4.3)."""
        adapter = self.adapters[part]
        if is_quantized(weight):
            with torch.no_grad():  # a quantized base: the norm (a constant) from the dequantized rows, then freed
                dense = dense_weight(weight, compute_dtype(adapter.magnitude.dtype))
                norm = torch.linalg.vector_norm(dense + self.delta_weight(part, dense), dim=1)
            return adapter_tensor(adapter.magnitude, norm) / norm
        norm = torch.linalg.vector_norm((weight + self.delta_weight(part, weight)).detach(), dim=1)
        return adapter_tensor(adapter.magnitude, weight) / norm

    def adapted_rows(self, part, weight, bias, *, training):
        return self._norm_scale(part, weight)[:, None] * (weight + self.delta_weight(part, weight)), bias

    def part_output(self, part, x, weight, bias):
        scale = self._norm_scale(part, weight).to(x.dtype)
        if self.training and isinstance(self.dropout, nn.Dropout):
            # peft / the DoRA authors: the magnitude's correction of the base path sees the dropped input too
            dropped = self.dropout(x)
            y = (frozen_linear(x, weight, bias) + (scale - 1) * frozen_linear(dropped, weight)
                 + scale * self.low_rank_output(part, dropped, dropped=True))
            return y
        y = scale * (frozen_linear(x, weight) + self.low_rank_output(part, x))
        return y if bias is None else y + bias


class LoRA(AdapterStrategy):
    """Low-rank adaptation.

    Args:
        rank: ``r`` of ``B A`` (LoRA §4.1).
        alpha: scaling numerator, the update is ``(α/r) B A``.
        dropout: dropout on the input of the low-rank path.
        target_modules, trainable_modules, fused_qkv: see :class:`~lit_peft.adapters.base.AdapterStrategy`.
    """

    layer_class = LoRALinear

    @property
    def tag(self) -> str:
        return f"{type(self).__name__.lower()}_r{self.rank}"

    def __init__(self, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 target_modules: TargetSpec = "all-linear", trainable_modules: list[str] | tuple[str, ...] = (),
                 fused_qkv: Literal["split", "joint"] = "split"):
        super().__init__(target_modules, trainable_modules, fused_qkv)
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.check_arguments(integers={"rank": 1}, fractions=["dropout"], positives=["alpha"])

    def make_layer(self, name, linear, parts, shared=None):
        return self.layer_class(linear, parts, self.rank, self.alpha, self.dropout)


class DoRA(LoRA):
    """Weight-decomposed low-rank adaptation; arguments as :class:`LoRA`."""

    layer_class = DoRALinear


__all__ = ["LoRA", "DoRA", "LoRALinear", "DoRALinear", "LowRankPart"]
