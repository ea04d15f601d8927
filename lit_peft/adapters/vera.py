"""VeRA: vector-based random matrix adaptation (Kopiczko et al., ICLR 2024, arXiv 2310.11454).

    W' = W + Λ_b B Λ_d A           A: r × in, B: out × r   frozen, random, shared by every adapted layer
    y  = x Wᵀ + b + b_vec ⊙ ((d ⊙ (drop(x) Aᵀ)) Bᵀ)        Λ_d = diag(d) (init d_init), Λ_b = diag(b_vec) (init 0)

One pair ``A: (r, max_in)``, ``B: (max_out, r)`` is drawn from ``seed`` (Kaiming-uniform, as the reference and
``peft``) at the largest width among the targets; each layer uses the top-left slice. ``apply`` draws the pair
into one non-persistent submodule shared by every adapted layer (``layer.projections``, moved once by ``.to()``);
it is written into the adapter file, so a saved adapter never depends on the random generator of another torch
version.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdaptedLinear, AdapterStrategy, adapted_layers, adapter_tensor, compute_dtype
from .quantized import frozen_linear
from .targets import TargetSpec


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Kaiming-uniform (gain √2, fan-in = ``shape[1]``), drawn from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen random pair shared by all layers of one model: ``A: (r, max_in)``, ``B: (max_out, r)``."""

    def __init__(self, rank: int, max_in: int, max_out: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("A", kaiming_uniform((rank, max_in), gen), persistent=False)
        self.register_buffer("B", kaiming_uniform((max_out, rank), gen), persistent=False)


class VeRAPart(nn.Module):
    """Trainable ``lambda_d: (r,)`` (init ``d_init``) and ``lambda_b: (out,)`` (init 0) of one part."""

    def __init__(self, out_features: int, rank: int, d_init: float, device=None, dtype=None):
        super().__init__()
        self.lambda_d = nn.Parameter(torch.full((rank,), float(d_init), device=device, dtype=dtype))
        self.lambda_b = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))


class VeRALinear(AdaptedLinear):
    """A frozen ``nn.Linear`` plus ``Λ_b B Λ_d A`` per part, ``A`` and ``B`` shared (see module docstring)."""

    def __init__(self, base: nn.Linear, parts: Mapping[str, tuple[int, int]], projections: VeRAProjections,
                 rank: int, d_init: float, dropout: float = 0.0):
        super().__init__(base, parts)
        self.rank = rank
        self.projections = projections
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype = compute_dtype(self.weight.dtype)
        for part, (start, stop) in self.parts.items():
            self.adapters[part] = VeRAPart(stop - start, rank, d_init, self.weight.device, dtype)

    def _pair(self, part: str, like: Tensor) -> tuple[Tensor, Tensor]:
        start, stop = self.parts[part]
        return (self.projections.A[:, : self.in_features].to(like.dtype),
                self.projections.B[: stop - start].to(like.dtype))

    def adapted_rows(self, part, weight, bias, *, training):
        adapter = self.adapters[part]
        A, B = self._pair(part, weight)
        d, b = adapter_tensor(adapter.lambda_d, weight), adapter_tensor(adapter.lambda_b, weight)
        return weight + b[:, None] * (B * d) @ A, bias

    def part_output(self, part, x, weight, bias):
        adapter = self.adapters[part]
        A, B = self._pair(part, x)
        h = adapter.lambda_d.to(x.dtype) * F.linear(self.dropout(x), A)
        return frozen_linear(x, weight, bias) + adapter.lambda_b.to(x.dtype) * F.linear(h, B)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


class VeRA(AdapterStrategy):
    """Vector-based random matrix adaptation.

    Args:
        rank: ``r`` of the shared random pair (VeRA §3; the SVFT paper's ViT runs use 256).
        d_init: initial value of every ``λ_d`` entry (VeRA §3.2 uses 0.1).
        dropout: dropout on the input of the adapter path.
        seed: seeds the shared random pair.
        target_modules, trainable_modules, fused_qkv: see :class:`~lit_peft.adapters.base.AdapterStrategy`.
    """

    @property
    def tag(self) -> str:
        return f"vera_r{self.rank}"

    def __init__(self, rank: int = 256, d_init: float = 0.1, dropout: float = 0.0, seed: int = 0,
                 target_modules: TargetSpec = "all-linear", trainable_modules: list[str] | tuple[str, ...] = (),
                 fused_qkv: Literal["split", "joint"] = "split"):
        super().__init__(target_modules, trainable_modules, fused_qkv)
        self.rank = rank
        self.d_init = d_init
        self.dropout = dropout
        self.seed = seed
        self.check_arguments(integers={"rank": 1, "seed": 0}, fractions=["dropout"], finites=["d_init"])

    def prepare(self, model, targets, *, svd_provider=None):
        """The random pair every layer of ``model`` shares, drawn at the largest target widths."""
        modules = dict(model.named_modules())
        max_in = max(modules[name].in_features for name in targets)
        max_out = max(stop - start for parts in targets.values() for start, stop in parts.values())
        device = modules[next(iter(targets))].weight.device
        return VeRAProjections(self.rank, max_in, max_out, self.seed).to(device)

    def make_layer(self, name, linear, parts, shared=None):
        return VeRALinear(linear, parts, shared, self.rank, self.d_init, self.dropout)

    def extra_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        """The shared pair, saved with the adapter."""
        projections = shared_projections(model)
        return {"vera_projections.A": projections.A, "vera_projections.B": projections.B}

    def load_extra_tensors(self, model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
        projections = shared_projections(model)
        for key in ("A", "B"):
            saved = tensors[f"vera_projections.{key}"]
            current = getattr(projections, key)
            if saved.shape != current.shape:
                raise ValueError(f"vera_projections.{key}: saved shape {tuple(saved.shape)} differs from this "
                                 f"model's {tuple(current.shape)}")
            current.copy_(saved)


def shared_projections(model: nn.Module) -> VeRAProjections:
    """The random pair that ``model``'s VeRA layers share (``ValueError`` if it has no VeRA layer)."""
    for layer in adapted_layers(model).values():
        if isinstance(layer, VeRALinear):
            return layer.projections
    raise ValueError(f"{type(model).__name__} has no VeRA layers")


__all__ = ["VeRA", "VeRALinear", "VeRAPart", "VeRAProjections", "shared_projections"]
