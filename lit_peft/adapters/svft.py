"""SVFT: singular-vector fine-tuning (Lingam et al., "SVFT: Parameter-Efficient Fine-Tuning with Singular
Vectors", NeurIPS 2024, arXiv 2405.19597).

For a linear with ``W: (out, in)`` and its thin SVD ``W = U Σ Vᵀ`` (``U: out × r``, ``V: in × r``,
``r = min(in, out)``)::

    W' = U (Σ + M) Vᵀ = W + U M Vᵀ            M: r × r, trainable only on a fixed support Ω

    plain        banded(d=1)     random(d=1)     top_k(d=1)
    ■ · · ·      ■ ■ · ·         · ■ · ■         by |u_iᵀ v_j|
    · ■ · ·      ■ ■ ■ ·         ■ · · ·         (square W only)
    · · ■ ·      · ■ ■ ■         · · ■ ■
    · · · ■      · · ■ ■         ■ · ■ ·

``|Ω|`` is ``r`` for plain and ``r(2d+1) − d(d+1)`` for the others (random and top-k take as many entries as
banded). ``U``, ``Σ``, ``V`` are frozen, non-persistent buffers: the adapter file stores ``M``'s values and its
support, and the SVD is recomputed (or loaded from a cache) on load. Singular vectors are defined up to sign, so
every SVD is put in a canonical sign (largest-magnitude entry of each ``u_i`` positive, ``v_i`` flipped with it):
a saved ``M`` means the same update on any machine. The base ``W`` is kept, so the base function stays exact
whatever precision ``U`` and ``V`` are stored in.

Forward: the weight side forms ``W + (U M) Vᵀ`` once per call (batch-independent) and runs one GEMM; the
activation side adds ``((x V) Mᵀ) Uᵀ``. ``side="auto"`` picks the cheaper for the call's token count; with a
backward pass the weight side wins from about ``T > r/3`` tokens. No sparse-tensor library is involved: ``M`` is
materialised as a dense ``r × r`` (``r²`` floats) from its values.

Initialisation (the paper is silent): ``"zero"`` starts ``M = 0`` (exactly the pretrained function);
``"gated"`` follows the reference code, ``M = sigmoid(g) · M₀`` with ``M₀ ~ N(0, 2/|Ω|)`` on Ω and a trainable
per-layer gate ``g = 0``, so the model does *not* start at the pretrained function.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from .base import SIDES, AdaptedLinear, AdapterStrategy, Side, adapter_tensor, compute_dtype
from .quantized import dense_weight, frozen_linear
from .targets import TargetSpec, part_label

Pattern = Literal["plain", "banded", "random", "top_k"]
PATTERNS = ("plain", "banded", "random", "top_k")
SVD = tuple[Tensor, Tensor, Tensor]


class SVDProvider(Protocol):
    """Supplies the SVD of a weight instead of SVFT computing it: ``provider(name, weight, dtype) -> (U, S, V)``.

    ``name`` labels the part (``"blocks.0.attn.qkv.q"``; a whole layer's name for an unsplit layer), ``weight`` is
    the part's ``(out, in)`` base weight (whole, on the model's device) and ``dtype`` the SVD precision
    (``SVFT.svd_dtype``). Returns the thin SVD ``weight = U diag(S) Vᵀ``: ``U: (out, r)``, ``S: (r,)``,
    ``V: (in, r)`` (``V``, not ``Vᵀ``), ``r = min(out, in)``, signs arbitrary (SVFT makes them canonical).
    :class:`lit_peft.callbacks.SVDCache` is one; pass it as ``strategy.apply(model, svd_provider=...)``.
    """

    def __call__(self, name: str, weight: Tensor, dtype: torch.dtype) -> SVD: ...


def canonical_signs(U: Tensor, S: Tensor, V: Tensor) -> SVD:
    """Flip each pair ``(u_i, v_i)`` so that the largest-magnitude entry of ``u_i`` is positive."""
    pivot = U.abs().argmax(dim=0, keepdim=True)
    sign = torch.sign(torch.gather(U, 0, pivot))
    sign[sign == 0] = 1
    return U * sign, S, V * sign


def canonical_svd(weight: Tensor, dtype: torch.dtype = torch.float32) -> SVD:
    """Thin SVD ``weight = U diag(S) Vᵀ`` in ``dtype`` (at least the weight's), with canonical signs.

    Returns ``U: (out, r)``, ``S: (r,)``, ``V: (in, r)``.
    """
    work = torch.promote_types(weight.dtype, dtype)
    U, S, Vh = torch.linalg.svd(weight.detach().to(work), full_matrices=False)
    return canonical_signs(U, S, Vh.mT)


def support_size(rank: int, pattern: str, off_diag: int) -> int:
    """``|Ω|``: ``r`` for plain, ``r(2d+1) − d(d+1)`` for banded, random and top-k."""
    return rank if pattern == "plain" else rank * (2 * off_diag + 1) - off_diag * (off_diag + 1)


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that depends on the layer's name only (stable across processes and runs)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def make_support(pattern: str, rank: int, off_diag: int, seed: int = 0, U: Tensor | None = None,
                 V: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Row and column indices of Ω, sorted row-major, as ``int64`` tensors (on CPU).

    ``random`` draws ``|Ω|`` *distinct* positions from a generator seeded with ``seed`` (the reference draws with
    replacement, so it can train fewer entries than it counts). ``top_k`` keeps the pairs with the largest
    ``|u_iᵀ v_j|`` and needs ``U`` and ``V`` of a square weight.
    """
    if pattern == "plain":
        idx = torch.arange(rank)
        return idx, idx.clone()
    k = support_size(rank, pattern, off_diag)
    if pattern == "banded":
        i, j = torch.meshgrid(torch.arange(rank), torch.arange(rank), indexing="ij")
        keep = (i - j).abs() <= off_diag
        return i[keep], j[keep]
    if pattern == "random":
        gen = torch.Generator().manual_seed(seed)
        flat = torch.randperm(rank * rank, generator=gen)[:k].sort().values
    elif pattern == "top_k":
        alignment = (U.mT @ V).abs().flatten().cpu()
        flat = torch.topk(alignment, k, sorted=False).indices.sort().values
    else:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    return flat // rank, flat % rank


class SVFTPart(nn.Module):
    """One part's SVD buffers (``U``, ``S``, ``V``; not saved; in ``dtype``), support (``rows``, ``cols``; saved) and
    trainable ``values`` (in at least float32, like every adapter parameter).

    Args:
        svd: ``(U, S, V)`` of the part's base rows, canonical signs.
        rows, cols: the support Ω.
        init: ``"zero"`` or ``"gated"`` (see the module docstring).
        seed: seeds the gated initial values.
        diagonal: Ω is the diagonal (the plain pattern): ``M`` is applied as a scaling.
    """

    def __init__(self, svd: SVD, rows: Tensor, cols: Tensor, init: str = "zero", seed: int = 0,
                 dtype: torch.dtype | None = None, diagonal: bool = False):
        super().__init__()
        U, S, V = svd
        dtype = dtype or U.dtype
        self.register_buffer("U", U.to(dtype), persistent=False)
        self.register_buffer("S", S.to(dtype), persistent=False)
        self.register_buffer("V", V.to(dtype), persistent=False)
        self.register_buffer("rows", rows.to(U.device))
        self.register_buffer("cols", cols.to(U.device))
        # Decided by the pattern, not by the indices: a loaded support (top_k with d=0 from another base) may
        # have r entries off the diagonal.
        self.diagonal = diagonal
        k = len(rows)
        trainable = {"device": U.device, "dtype": compute_dtype(dtype)}
        if init == "gated":
            gen = torch.Generator().manual_seed(seed)
            values = torch.randn(k, generator=gen, dtype=torch.float64) * math.sqrt(2.0 / k)
            self.values = nn.Parameter(values.to(**trainable))
            # shape (1,), not a scalar: FSDP2's fully_shard refuses 0-d parameters
            self.gate = nn.Parameter(torch.zeros(1, **trainable))
        else:
            self.values = nn.Parameter(torch.zeros(k, **trainable))
            self.gate = None

    #: the SVD tensors: frozen, never saved (recomputed or taken from an SVD cache on load)
    FROZEN_TENSORS = ("U", "S", "V")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        gate = state_dict.get(prefix + "gate")
        if gate is not None and gate.dim() == 0:  # adapter files written before the gate became 1-d
            state_dict[prefix + "gate"] = gate.reshape(1)
        if self.svd_as_parameters:  # not in any file: load them onto themselves
            for name in self.FROZEN_TENSORS:
                state_dict.setdefault(prefix + name, getattr(self, name).detach())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self.FROZEN_TENSORS:  # frozen parameters under FSDP2, but never part of an adapter's state
            destination.pop(prefix + name, None)

    @property
    def svd_as_parameters(self) -> bool:
        return "U" in self._parameters

    def svd_to_parameters(self) -> None:
        """Hold ``U``, ``S``, ``V`` as frozen parameters instead of buffers, so that FSDP2's ``fully_shard`` shards
        them with the frozen base weights (it leaves buffers whole on every rank) and gathers them for the forward
        pass of their unit like any weight. They stay out of state dicts and parameter counts either way."""
        for name in self.FROZEN_TENSORS:
            if name in self._buffers:
                tensor = self._buffers.pop(name)
                self._non_persistent_buffers_set.discard(name)
                self.register_parameter(name, nn.Parameter(tensor.contiguous(), requires_grad=False))

    @property
    def rank(self) -> int:
        return self.S.numel()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, support={len(self.rows)}, gated={self.gate is not None}"


class SVFTLinear(AdaptedLinear):
    """A frozen ``nn.Linear`` with ``W' = W + U M Vᵀ`` per part (see module docstring)."""

    def __init__(self, base: nn.Linear, parts: Mapping[str, tuple[int, int]], part_modules: Mapping[str, SVFTPart],
                 side: Side = "auto"):
        super().__init__(base, parts)
        self.side = side
        for part, module in part_modules.items():
            self.adapters[part] = module

    def coefficients(self, part: str, like: Tensor) -> Tensor:
        """The effective values on Ω (gate applied), in ``like``'s dtype."""
        adapter = self.adapters[part]
        values = adapter_tensor(adapter.values, like)
        if adapter.gate is not None:
            values = torch.sigmoid(adapter_tensor(adapter.gate, like)) * values
        return values

    def dense_m(self, part: str, like: Tensor) -> Tensor:
        """``M`` as a dense ``r × r`` matrix."""
        adapter = self.adapters[part]
        r = adapter.rank
        M = like.new_zeros(r, r)
        return M.index_put((adapter.rows, adapter.cols), self.coefficients(part, like))

    def _times_m(self, part: str, left: Tensor, transpose: bool) -> Tensor:
        """``left @ M`` (or ``left @ Mᵀ``); a diagonal ``M`` is a column scaling."""
        if self.adapters[part].diagonal:
            return left * self.coefficients(part, left)
        M = self.dense_m(part, left)
        return left @ (M.mT if transpose else M)

    def adapted_rows(self, part, weight, bias, *, training):
        adapter = self.adapters[part]
        U = adapter_tensor(adapter.U, weight)
        V = adapter_tensor(adapter.V, weight)
        return weight + self._times_m(part, U, transpose=False) @ V.mT, bias

    def part_output(self, part, x, weight, bias):
        adapter = self.adapters[part]
        z = self._times_m(part, x @ adapter.V.to(x.dtype), transpose=True)
        return frozen_linear(x, weight, bias) + z @ adapter.U.to(x.dtype).mT

    def side_costs(self, tokens, backward):
        """Forming ``W + (U M) Vᵀ`` against the activation path.

        Extra multiply-adds over the frozen layer, with ``T`` tokens, ``c = r`` (``1`` for a diagonal ``M``):
        weight side ``out·r·(in + c)`` to form the weight (twice with a backward pass) plus, with a backward
        pass, the weight gradient ``T·in·out``; activation side ``T·r·(in + c + out)`` (twice with a backward
        pass, plus ``T·r·c`` for ``M``'s gradient).
        """
        weight_cost = activation_cost = 0
        for part, (start, stop) in self.parts.items():
            out, r = stop - start, self.adapters[part].rank
            c = 1 if self.adapters[part].diagonal else r
            form = out * r * (self.in_features + c)
            act = tokens * r * (self.in_features + c + out)
            weight_cost += 2 * form + tokens * self.in_features * out if backward else form
            activation_cost += 2 * act + tokens * r * c if backward else act
        return weight_cost, activation_cost

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, side={self.side!r}"


class SVFT(AdapterStrategy):
    """Singular-vector fine-tuning.

    Args:
        pattern: support Ω of ``M`` (SVFT paper §3.2): ``"plain"`` (singular values only), ``"banded"``,
            ``"random"`` or ``"top_k"``.
        off_diag: ``d``, the number of off-diagonals of banded Ω (and the matching size for random/top-k);
            ignored by plain.
        init: ``"zero"`` (identity at init) or ``"gated"`` (the reference code's random ``M`` times
            ``sigmoid(g)``, for reproducing the paper's numbers).
        seed: seeds the random support and the gated initial values (combined with each layer's name).
        svd_rank: keep only the top ``svd_rank`` singular triplets of each weight (the reference code's ``rank``
            option; named apart from LoRA's ``rank`` so that switching a config's adapter does not carry it over):
            ``W' = W + U_k M V_kᵀ`` with ``U_k: out × k``, ``V_k: in × k`` and ``M`` on Ω of a ``k × k`` matrix,
            ``k = min(svd_rank, out, in)``; the frozen ``W`` stays whole, so the base function is exact. ``U`` and ``V``
            cost ``k (out + in)`` values instead of ``r (out + in)``. ``None``: full rank ``r = min(out, in)``.
        svd_dtype: precision of the SVD (``"float32"`` or ``"float64"``); buffers are then stored in the
            model's dtype.
        side: ``"auto"`` picks, per forward call, the cheaper of the weight and the activation formulations.
        target_modules, trainable_modules, fused_qkv: see :class:`~lit_peft.adapters.base.AdapterStrategy`.
    """

    @property
    def tag(self) -> str:
        return (f"svft_{self.pattern}" + ("" if self.pattern == "plain" else f"_d{self.off_diag}")
                + ("" if self.svd_rank is None else f"_k{self.svd_rank}"))

    def __init__(self, pattern: Pattern = "plain", off_diag: int = 2, init: Literal["zero", "gated"] = "zero",
                 seed: int = 0, svd_rank: int | None = None, svd_dtype: Literal["float32", "float64"] = "float32",
                 side: Side = "auto", target_modules: TargetSpec = "all-linear",
                 trainable_modules: list[str] | tuple[str, ...] = (), fused_qkv: Literal["split", "joint"] = "split"):
        super().__init__(target_modules, trainable_modules, fused_qkv)
        self.pattern = pattern
        self.off_diag = off_diag
        self.init = init
        self.seed = seed
        self.svd_rank = svd_rank
        self.svd_dtype = svd_dtype
        self.side = side
        self.check_arguments(integers={"off_diag": 0, **({} if svd_rank is None else {"svd_rank": 1})},
                             choices={"pattern": PATTERNS, "init": ("zero", "gated"),
                                      "svd_dtype": ("float32", "float64"), "side": SIDES})

    @property
    def svd_torch_dtype(self) -> torch.dtype:
        """``svd_dtype`` as a ``torch.dtype``: the precision an :class:`SVDProvider` is asked for."""
        return getattr(torch, self.svd_dtype)

    def check_layer(self, name, linear, parts):
        problems = []
        for part, (start, stop) in parts.items():
            label = part_label(name, part)
            out, n = stop - start, linear.in_features
            rank = self.kept_rank(out, n)
            if self.pattern == "top_k" and out != n:
                problems.append(f"{label}: pattern='top_k' needs a square weight (u_i and v_j in one space), got "
                                f"shape ({out}, {n}); use 'banded' or 'random' for this layer")
            if self.pattern != "plain" and self.off_diag >= rank:
                what = "the rank" if self.svd_rank is None or rank == min(out, n) else "the kept rank"
                problems.append(f"{label}: off_diag={self.off_diag} must be smaller than {what} {rank} of its "
                                f"({out}, {n}) weight")
        return problems

    def kept_rank(self, out: int, n: int) -> int:
        """``k``: the singular triplets kept for an ``(out, n)`` weight (``svd_rank`` capped at ``min(out, n)``)."""
        return min(out, n) if self.svd_rank is None else min(self.svd_rank, out, n)

    def compute_svd(self, name: str, weight: Tensor, svd_provider: SVDProvider | None = None) -> SVD:
        """The canonical SVD of one part's weight, from ``svd_provider`` when given (e.g. the SVD cache), truncated to
        the top ``svd_rank`` triplets when ``svd_rank`` is set."""
        if svd_provider is not None:
            U, S, V = canonical_signs(*svd_provider(name, weight, self.svd_torch_dtype))
        else:
            U, S, V = canonical_svd(weight, self.svd_torch_dtype)
        k = self.kept_rank(*weight.shape)
        if k < S.numel():
            U, S, V = U[:, :k].contiguous(), S[:k].contiguous(), V[:, :k].contiguous()
        return U, S, V

    def prepare(self, model, targets, *, svd_provider=None):
        return svd_provider  # what make_layer receives as ``shared``

    def make_layer(self, name, linear, parts, shared=None):
        weight = dense_weight(linear.weight).detach()  # a quantized base: the SVD of the dequantized weight
        modules = {}
        for part, (start, stop) in parts.items():
            label = part_label(name, part)
            U, S, V = self.compute_svd(label, weight[start:stop], svd_provider=shared)
            rows, cols = make_support(self.pattern, S.numel(), self.off_diag, layer_seed(self.seed, label), U, V)
            modules[part] = SVFTPart((U, S, V), rows, cols, self.init, layer_seed(self.seed + 1, label),
                                     dtype=weight.dtype, diagonal=self.pattern == "plain")
        return SVFTLinear(linear, parts, modules, self.side)


__all__ = ["SVFT", "SVFTLinear", "SVFTPart", "SVDProvider", "canonical_svd", "canonical_signs", "make_support",
           "support_size"]
