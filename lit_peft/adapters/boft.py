"""BOFT: orthogonal butterfly fine-tuning (Liu et al., "Parameter-Efficient Orthogonal Finetuning via Butterfly
Factorization", ICLR 2024, arXiv 2311.06243). OFT (Qiu et al., NeurIPS 2023) is its one-factor case.

For a linear ``y = x Wᵀ + b`` with ``W: (out, in)`` and ``x`` a row of activations::

    W' = diag(s) · W · Rᵀ                  y = s ⊙ (x R Wᵀ) + b          (R: in × in, orthogonal)
    R  = F_{m-1} ··· F_1 · F_0             F_i = P_i · blockdiag(Q_{i,1}, …, Q_{i,in/b}) · P_iᵀ
    Q  = (I + A)(I − A)⁻¹                  A skew-symmetric b × b, only its b(b−1)/2 free entries stored

``P_0 = I``; for ``i ≥ 1`` a block of ``F_i`` couples two half-blocks (``b/2`` indices each) that lie
``b·2^(i−1)`` apart inside a group of ``b·2^i`` consecutive indices. Example, ``in = 8``, ``b = 2``, ``m = 3``::

    F_0: (0 1)(2 3)(4 5)(6 7)      F_1: (0 2)(1 3)(4 6)(5 7)      F_2: (0 4)(1 5)(2 6)(3 7)

so ``R`` is block-diagonal with contiguous blocks of ``b·2^(m−1)`` (dense once ``m = log2(in/b) + 1``).

How we compute it (never a dense ``in × in`` permutation, never a dense ``R`` by ``in³`` matmuls):

* a factor is applied with a reshape/transpose and one batched ``b × b`` product (:func:`butterfly_rotate`);
* since ``R`` is block-diagonal, the ``m`` factors are folded into its ``in / b_eff`` diagonal blocks of size
  ``b_eff = b·2^(m−1)`` (:func:`effective_blocks`, ``b_eff · in · b · m`` work) whenever that is cheaper than
  rotating factor by factor, so the activations are rotated in one batched product;
* the rotation is applied to the activations (``x → x R``, then the frozen GEMM) or to the weight
  (``W → W Rᵀ``, then one GEMM), whichever costs less for the step's token count (``side="auto"``).

This is the paper's ``z = (R W₀)ᵀ x`` with ``W₀ = Wᵀ`` (``in × out``), and ``peft``'s merge ``W R_peftᵀ``.

The Cayley map always runs in float32 (also under bf16 autocast). ``cayley="neumann"`` replaces the solve by the
series ``(I + A)(I + A + A² + …)``; blocks whose ``‖A‖_F`` is too large for the series to be accurate
(truncation error above ``NEUMANN_TOLERANCE``) fall back to the exact solve. Both paths compute the same
``(I + A)(I − A)⁻¹``, not transposes of each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from ..distributed import full_tensor
from .base import SIDES, AdaptedLinear, AdapterStrategy, Side, adapter_tensor, adapted_layers, compute_dtype
from .quantized import dense_weight, frozen_linear
from .targets import TargetSpec

CAYLEY_METHODS = ("exact", "neumann")

NEUMANN_TOLERANCE = 1e-4
# Extra memory traffic of one factor-by-factor rotation, in multiply-add equivalents per element: a reshape,
# a transpose copy and a gather back cost about as much as a 32-wide product on current CPUs and GPUs.
_FACTOR_OVERHEAD = 32


# -- pure functions --------------------------------------------------------------------------------------------
def skew_symmetric(free: Tensor, block_size: int) -> Tensor:
    """``(..., b(b−1)/2)`` free entries → ``(..., b, b)`` skew-symmetric ``A`` (upper triangle = ``free``)."""
    rows, cols = torch.triu_indices(block_size, block_size, offset=1, device=free.device)
    upper = free.new_zeros(*free.shape[:-1], block_size, block_size)
    upper[..., rows, cols] = free
    return upper - upper.transpose(-1, -2)


def neumann_max_norm(terms: int, tolerance: float = NEUMANN_TOLERANCE) -> float:
    """Largest ``‖A‖`` for which ``‖(I−A)⁻¹ − Σ_{j≤terms} A^j‖ ≤ ‖A‖^(terms+1) / (1 − ‖A‖)`` stays ≤ tolerance."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid ** (terms + 1) / (1 - mid) <= tolerance else (lo, mid)
    return lo


def cayley(skew: Tensor, method: Literal["exact", "neumann"] = "exact", neumann_terms: int = 5) -> Tensor:
    """``Q = (I + A)(I − A)⁻¹`` for a batch of skew-symmetric ``A: (..., b, b)``, in float32 or float64.

    ``(I + A)`` and ``(I − A)⁻¹`` commute, so the exact path solves ``(I − A) Q = I + A``. The Neumann path
    sums ``(I − A)⁻¹ ≈ I + A + … + A^terms`` and falls back to the solve for blocks where that is inaccurate.
    """
    A = skew if skew.dtype == torch.float64 else skew.float()
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    if method == "exact":
        return torch.linalg.solve(eye - A, eye + A)
    if method != "neumann":
        raise ValueError(f"cayley must be 'exact' or 'neumann', got {method!r}")
    series, power = eye + A, A
    for _ in range(neumann_terms - 1):
        power = power @ A
        series = series + power
    Q = (eye + A) @ series
    too_large = torch.linalg.matrix_norm(A.detach()) > neumann_max_norm(neumann_terms)
    if too_large.any():
        exact = torch.linalg.solve(eye - A[too_large], eye + A[too_large])
        Q = Q.index_put((too_large.nonzero(as_tuple=True)), exact)
    return Q


def butterfly_rotate(v: Tensor, Q: Tensor, transpose: bool = False) -> Tensor:
    """``v Rᵀ`` (``R`` applied to each vector ``v``; ``v R`` if ``transpose``) for ``v: (..., n)`` and factor
    blocks ``Q: (m, n/b, b, b)``.

    Factor ``i`` views ``v`` as ``(groups, 2, 2^i, b/2)`` half-blocks, pairs half-block ``j`` of each group's
    first half with half-block ``j`` of its second half, multiplies each pair by its ``Q`` and undoes the view.
    ``Rᵀ = F_0ᵀ ··· F_{m−1}ᵀ``, so the transpose runs the factors in reverse with transposed blocks.
    """
    m, n_blocks, b, _ = Q.shape
    n = v.shape[-1]
    lead = v.shape[:-1]
    Q = Q.to(v.dtype)
    if transpose:
        Q = Q.mT
    for i in (reversed(range(m)) if transpose else range(m)):
        if i == 0:
            blocks = v.reshape(*lead, n_blocks, b)
        else:
            groups, stride = n // (b * 2**i), 2**i
            blocks = v.reshape(*lead, groups, 2, stride, b // 2).transpose(-3, -2).reshape(*lead, n_blocks, b)
        blocks = torch.einsum("...kc,krc->...kr", blocks, Q[i])
        if i == 0:
            v = blocks.reshape(*lead, n)
        else:
            v = blocks.reshape(*lead, groups, stride, 2, b // 2).transpose(-3, -2).reshape(*lead, n)
    return v


def effective_blocks(Q: Tensor) -> Tensor:
    """The ``n / b_eff`` diagonal blocks of ``R`` (``b_eff = b·2^(m−1)``): ``(n/b_eff, b_eff, b_eff)``.

    Rotating the identity tiled along the width gives, at column ``k·b_eff + r`` of row ``c``, ``R_k[r, c]``.
    """
    m, n_blocks, b, _ = Q.shape
    if m == 1:
        return Q[0]
    size = b * 2 ** (m - 1)
    n = n_blocks * b
    tiled = torch.eye(size, dtype=Q.dtype, device=Q.device).repeat(1, n // size)
    return butterfly_rotate(tiled, Q).reshape(size, n // size, size).permute(1, 2, 0)


def block_rotate(v: Tensor, blocks: Tensor) -> Tensor:
    """``v Rᵀ`` for block-diagonal ``R`` given by ``blocks: (k, s, s)``, ``v: (..., k·s)``."""
    k, s, _ = blocks.shape
    out = torch.einsum("...kc,krc->...kr", v.reshape(*v.shape[:-1], k, s), blocks.to(v.dtype))
    return out.reshape(v.shape)


def dense_rotation(Q: Tensor) -> Tensor:
    """The dense ``R`` (``n × n``); for tests, plots and orthogonality checks only."""
    n = Q.shape[1] * Q.shape[2]
    return butterfly_rotate(torch.eye(n, dtype=Q.dtype, device=Q.device), Q).T


def rotation_cost(block_size: int, n_factors: int) -> tuple[int, bool]:
    """Multiply-add equivalents to rotate one vector entry, and whether the folded-blocks path is the cheaper."""
    folded = block_size * 2 ** (n_factors - 1)
    factorwise = n_factors * (block_size + _FACTOR_OVERHEAD)
    return min(folded, factorwise), folded <= factorwise


def multiplicative_dropout(Q: Tensor, p: float) -> Tensor:
    """Reference semantics: one factor drawn at random has ``int(p · blocks)`` blocks replaced by ``I``.

    Uses the global torch RNG, so ranks seeded alike (``seed_everything``) draw the same blocks.
    """
    m, n_blocks, b, _ = Q.shape
    n_drop = int(p * n_blocks)
    if n_drop == 0:
        return Q
    factor = int(torch.randint(m, (1,)))
    dropped = torch.randperm(n_blocks)[:n_drop].to(Q.device)
    mask = torch.zeros(m, n_blocks, 1, 1, dtype=torch.bool, device=Q.device)
    mask[factor, dropped] = True
    return torch.where(mask, torch.eye(b, dtype=Q.dtype, device=Q.device), Q)


class _ScaledFrozenLinear(torch.autograd.Function):
    """``y = s ⊙ (x Wᵀ)`` for a frozen ``W``, keeping the *output* ``y`` for ``s``'s gradient (``Σ g ⊙ y / s``)
    instead of the pre-scale ``x Wᵀ`` that plain autograd keeps.

    The consumer of a linear's output often saves it anyway (an activation's input, attention's values), so ``y``
    is stored once instead of twice; on SmolLM2 this is most of BOFT's activation memory above LoRA's. Callers
    use it only when ``W`` needs no gradient and no ``s`` is exactly 0 (there ``y`` holds nothing to divide).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        y = frozen_linear(x, weight)
        y.mul_(scale.to(y.dtype))           # in place: no second activation-sized tensor
        ctx.save_for_backward(y, weight, scale)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        y, weight, scale = ctx.saved_tensors
        s = scale.to(grad.dtype)
        grad_x = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad * s) @ dense_weight(weight, grad.dtype)  # a quantized W: dequantized for this product only
        if ctx.needs_input_grad[2]:
            grad_scale = ((grad * y).reshape(-1, y.shape[-1]).sum(0) / s).to(scale.dtype)
        return grad_x, None, grad_scale


def scaled_frozen_linear(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """``s ⊙ (x Wᵀ)`` (see :class:`_ScaledFrozenLinear`); plain autograd where its conditions do not hold."""
    if (torch.is_grad_enabled() and scale.requires_grad and not weight.requires_grad
            and not bool((scale == 0).any())):
        return _ScaledFrozenLinear.apply(x, weight, scale)
    y = frozen_linear(x, weight)
    return y * scale.to(y.dtype)


# -- modules ---------------------------------------------------------------------------------------------------
class BOFTPart(nn.Module):
    """The trainable tensors of one part: ``skew`` (the free entries of every ``A``), ``scale`` ``s``, ``bias``.

    Args:
        in_features: width ``in`` that ``R`` acts on.
        out_features: number of output rows of this part (length of ``s``).
        block_size, n_butterfly_factors: ``b`` and ``m`` of the paper.
        scale: train a per-output scale ``s`` (init 1).
        bias: initial value of a trainable bias for these rows, or ``None`` to keep the base bias frozen.
    """

    def __init__(self, in_features: int, out_features: int, block_size: int, n_butterfly_factors: int,
                 scale: bool = True, bias: Tensor | None = None, device=None, dtype=None):
        super().__init__()
        self.block_size = block_size
        self.n_butterfly_factors = n_butterfly_factors
        free = block_size * (block_size - 1) // 2
        like = {"device": device, "dtype": dtype}
        self.skew = nn.Parameter(torch.zeros(n_butterfly_factors, in_features // block_size, free, **like))
        self.scale = nn.Parameter(torch.ones(out_features, **like)) if scale else None
        self.bias = nn.Parameter(bias.detach().to(**like).clone()) if bias is not None else None

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, n_butterfly_factors={self.n_butterfly_factors}"


class BOFTLinear(AdaptedLinear):
    """A frozen ``nn.Linear`` with a butterfly-orthogonal rotation of its input per part (see module docstring)."""

    def __init__(self, base: nn.Linear, parts: Mapping[str, tuple[int, int]], block_size: int,
                 n_butterfly_factors: int, dropout: float = 0.0, scale: bool = True, train_bias: bool = False,
                 cayley: Literal["exact", "neumann"] = "exact", neumann_terms: int = 5, side: Side = "auto"):
        super().__init__(base, parts)
        self.block_size = block_size
        self.n_butterfly_factors = n_butterfly_factors
        self.dropout = dropout
        self.cayley = cayley
        self.neumann_terms = neumann_terms
        self.side = side
        dtype = compute_dtype(self.weight.dtype)
        for part, (start, stop) in self.parts.items():
            bias = self.bias[start:stop] if train_bias and self.bias is not None else None
            self.adapters[part] = BOFTPart(self.in_features, stop - start, block_size, n_butterfly_factors, scale,
                                           bias, device=self.weight.device, dtype=dtype)

    def orthogonal_blocks(self, part: str, training: bool = False) -> Tensor:
        """``Q`` of every factor and block, ``(m, in/b, b, b)``, in float32 (float64 for float64 models)."""
        free = full_tensor(self.adapters[part].skew)
        with torch.autocast(device_type=free.device.type, enabled=False):
            Q = cayley(skew_symmetric(free.float() if free.dtype != torch.float64 else free, self.block_size),
                       self.cayley, self.neumann_terms)
        if training and self.dropout > 0:
            Q = multiplicative_dropout(Q, self.dropout)
        return Q

    def rotation(self, part: str) -> Tensor:
        """The dense ``R`` of ``part`` (``in × in``), for inspection and tests."""
        return dense_rotation(self.orthogonal_blocks(part))

    def _rotate(self, v: Tensor, Q: Tensor, transpose: bool = False) -> Tensor:
        """``v Rᵀ`` (rows of ``W``) or, with ``transpose``, ``v R`` (activations)."""
        _, folded = rotation_cost(self.block_size, self.n_butterfly_factors)
        if folded:
            blocks = effective_blocks(Q)
            return block_rotate(v, blocks.mT if transpose else blocks)
        return butterfly_rotate(v, Q, transpose)

    def _scale_and_bias(self, part: str, bias: Tensor | None, like: Tensor) -> tuple[Tensor | None, Tensor | None]:
        adapter = self.adapters[part]
        scale = None if adapter.scale is None else adapter_tensor(adapter.scale, like)
        if adapter.bias is not None:
            bias = adapter_tensor(adapter.bias, like)
        return scale, bias

    def adapted_rows(self, part, weight, bias, *, training):
        rotated = self._rotate(weight, self.orthogonal_blocks(part, training))
        scale, bias = self._scale_and_bias(part, bias, weight)
        return (rotated if scale is None else rotated * scale[:, None]), bias

    def part_output(self, part, x, weight, bias):
        rotated = self._rotate(x, self.orthogonal_blocks(part, self.training), transpose=True)
        adapter = self.adapters[part]
        if adapter.bias is not None:
            bias = adapter.bias
        if adapter.scale is None:
            y = frozen_linear(rotated, weight)
        else:
            y = scaled_frozen_linear(rotated, weight, full_tensor(adapter.scale))
        return y if bias is None else y + adapter_tensor(bias, y)

    def side_costs(self, tokens, backward):
        """Rotating ``W`` against rotating the activations, per input feature.

        Rotating the activations costs ``passes · T · c`` (``c`` = :func:`rotation_cost`, ``passes`` = 3 with a
        backward pass: forward, input gradient, ``Q`` gradient); rotating the weight costs ``passes · out · c``
        plus, with a backward pass, the full weight gradient ``gᵀx`` (``T · out``).
        """
        cost, _ = rotation_cost(self.block_size, self.n_butterfly_factors)
        passes = 3 if backward else 1
        adapted_rows = sum(stop - start for start, stop in self.parts.values())
        activation = passes * tokens * cost * len(self.parts)
        weight = passes * adapted_rows * cost + (tokens * adapted_rows if backward else 0)
        return weight, activation

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, block_size={self.block_size}, "
                f"n_butterfly_factors={self.n_butterfly_factors}, dropout={self.dropout}, cayley={self.cayley!r}, "
                f"side={self.side!r}")


class BOFT(AdapterStrategy):
    """Orthogonal butterfly fine-tuning.

    Args:
        block_size: ``b``, size of each orthogonal block (BOFT paper §3; VTAB uses b=8 with m=2).
        n_butterfly_factors: ``m``, number of butterfly factors; 1 is block-diagonal OFT.
        dropout: multiplicative dropout probability (BOFT paper §4.3; reference semantics, see
            :func:`multiplicative_dropout`).
        scale: train the per-output magnitude ``s`` (reference code; counted in the paper's tables).
        train_bias: also train the base bias ("boft_only" in the reference; counted in the VTAB table).
        cayley: ``"exact"`` (solve) or ``"neumann"`` (truncated series with an exactness guard).
        neumann_terms: number of series terms for ``cayley="neumann"``.
        side: ``"auto"`` picks, per forward call, the cheaper of rotating the activations or the weight.
        target_modules, trainable_modules, fused_qkv: see :class:`~lit_peft.adapters.base.AdapterStrategy`.
    """

    @property
    def tag(self) -> str:
        return f"boft_m{self.n_butterfly_factors}b{self.block_size}"

    def __init__(self, block_size: int = 8, n_butterfly_factors: int = 2, dropout: float = 0.0,
                 scale: bool = True, train_bias: bool = False, cayley: Literal["exact", "neumann"] = "exact",
                 neumann_terms: int = 5, side: Side = "auto", target_modules: TargetSpec = "all-linear",
                 trainable_modules: list[str] | tuple[str, ...] = (), fused_qkv: Literal["split", "joint"] = "split"):
        super().__init__(target_modules, trainable_modules, fused_qkv)
        self.block_size = block_size
        self.n_butterfly_factors = n_butterfly_factors
        self.dropout = dropout
        self.scale = scale
        self.train_bias = train_bias
        self.cayley = cayley
        self.neumann_terms = neumann_terms
        self.side = side
        problems = []
        if isinstance(n_butterfly_factors, int) and isinstance(block_size, int) and n_butterfly_factors > 1:
            if block_size % 2:
                problems.append(f"block_size must be even when n_butterfly_factors > 1 (a butterfly factor pairs "
                                f"half-blocks), got block_size={block_size}")
        self.check_arguments(integers={"block_size": 2, "n_butterfly_factors": 1, "neumann_terms": 1},
                             fractions=["dropout"], choices={"cayley": CAYLEY_METHODS, "side": SIDES},
                             problems=problems)

    def check_layer(self, name, linear, parts):
        n, b, m = linear.in_features, self.block_size, self.n_butterfly_factors
        if n % b:
            valid = [d for d in range(2, min(n, 64) + 1) if n % d == 0]
            return [f"{name}: in_features={n} is not divisible by block_size={b}; block sizes that divide it: {valid}"]
        if m > 1 and (n // b) % 2:
            return [f"{name}: in_features/block_size = {n}/{b} = {n // b} blocks is odd; a butterfly factor needs an "
                    f"even number of blocks (use n_butterfly_factors=1 or another block_size)"]
        if m > 1 and n % (b * 2 ** (m - 1)):
            max_m = 1
            while n % (b * 2 ** max_m) == 0:
                max_m += 1
            return [f"{name}: n_butterfly_factors={m} is too many for in_features={n} with block_size={b} "
                    f"(needs in_features divisible by b·2^(m-1) = {b * 2 ** (m - 1)}); at most {max_m} factors fit"]
        return []

    def make_layer(self, name, linear, parts, shared=None):
        return BOFTLinear(linear, parts, self.block_size, self.n_butterfly_factors, self.dropout, self.scale,
                          self.train_bias, self.cayley, self.neumann_terms, self.side)


class OFT(BOFT):
    """Orthogonal fine-tuning (Qiu et al., NeurIPS 2023): BOFT with one factor, ``R`` block-diagonal.

    Args: as :class:`BOFT`, without ``n_butterfly_factors``.
    """

    @property
    def tag(self) -> str:
        return f"oft_b{self.block_size}"

    def __init__(self, block_size: int = 16, dropout: float = 0.0, scale: bool = True, train_bias: bool = False,
                 cayley: Literal["exact", "neumann"] = "exact", neumann_terms: int = 5, side: Side = "auto",
                 target_modules: TargetSpec = "all-linear", trainable_modules: list[str] | tuple[str, ...] = (),
                 fused_qkv: Literal["split", "joint"] = "split"):
        super().__init__(block_size, 1, dropout, scale, train_bias, cayley, neumann_terms, side, target_modules,
                         trainable_modules, fused_qkv)

    def init_args(self) -> dict:
        args = super().init_args()
        args.pop("n_butterfly_factors", None)
        return args


@torch.no_grad()
def orthogonality_error(model: nn.Module) -> float | None:
    """``max ‖QᵀQ − I‖_F`` over every BOFT/OFT block of ``model``; ``None`` if it has none, NaN if any block is
    not finite (so a check ``error > tolerance`` must also test ``math.isfinite``)."""
    worst = None
    for layer in adapted_layers(model).values():
        if isinstance(layer, BOFTLinear):
            for part in layer.parts:
                Q = layer.orthogonal_blocks(part)
                eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
                err = torch.linalg.matrix_norm(Q.transpose(-1, -2) @ Q - eye).max().item()
                if err != err:  # NaN anywhere: the answer, whatever the other blocks hold
                    return float("nan")
                worst = err if worst is None else max(worst, err)
    return worst


__all__ = ["BOFT", "OFT", "BOFTLinear", "BOFTPart", "orthogonality_error", "cayley", "skew_symmetric",
           "butterfly_rotate", "effective_blocks", "block_rotate", "dense_rotation"]
