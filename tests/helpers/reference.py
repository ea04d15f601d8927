"""Dense, plainly written reference implementations of every adapter method's formula (float64).

Nothing here imports from ``lit_peft``'s maths: every formula is written out from the papers (as summarised in
the module docstrings under ``lit_peft/adapters/``; BOFT's effective weight ``W' = diag(s) · W · Rᵀ``), with dense
matrices, explicit permutation matrices and ``torch.linalg.inv``. It is slow on purpose and meant for small widths only.

Conventions: a linear has ``W: (out, in)`` and computes ``y = x Wᵀ + b``. Each ``*_weight`` function returns the
adapted ``(W', b')`` of one *part* (a contiguous range of output rows); :func:`reference_layer` stitches the parts
of a lit_peft layer together (frozen rows stay as they are) by reading its adapter tensors.
All functions are autograd-friendly, so gradients can be taken through them.
"""

from __future__ import annotations

import torch
from torch import Tensor

# -----------------------------------------------------------------------------------------------------------------
# BOFT / OFT
# -----------------------------------------------------------------------------------------------------------------


def skew_from_free(free: Tensor, b: int) -> Tensor:
    """``(b(b-1)/2,)`` free entries -> ``(b, b)`` skew-symmetric ``A``: upper triangle in ``triu_indices`` order."""
    rows, cols = torch.triu_indices(b, b, offset=1)
    assert free.shape == (len(rows),), (free.shape, b)
    upper = torch.zeros(b, b, dtype=free.dtype)
    upper = upper.index_put((rows, cols), free)
    return upper - upper.T


def cayley_dense(A: Tensor) -> Tensor:
    """``Q = (I + A)(I - A)^-1`` with an explicit inverse."""
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    return (eye + A) @ torch.linalg.inv(eye - A)


def butterfly_order(n: int, b: int, i: int) -> list[int]:
    """The index order in which factor ``i`` reads its blocks: block ``k`` is ``order[k*b:(k+1)*b]``.

    Factor 0: consecutive blocks of ``b``. Factor ``i >= 1``: inside each group of ``b*2^i`` consecutive
    indices, block ``j`` (``j < 2^i``) is half-block ``j`` of the group's first half (``b/2`` indices) followed by
    half-block ``j`` of its second half, i.e. two half-blocks ``b*2^(i-1)`` apart.
    """
    if i == 0:
        return list(range(n))
    half = b // 2
    group = b * 2**i
    assert n % group == 0 and b % 2 == 0
    order = []
    for g in range(n // group):
        start = g * group
        for j in range(2**i):
            first = start + j * half
            second = start + group // 2 + j * half
            order += list(range(first, first + half)) + list(range(second, second + half))
    assert sorted(order) == list(range(n))
    return order


def permutation_matrix(order: list[int], dtype=torch.float64) -> Tensor:
    """Dense ``P`` with ``P[order[j], j] = 1``, so ``(Pᵀ v)[j] = v[order[j]]`` (gather into the block order)."""
    n = len(order)
    P = torch.zeros(n, n, dtype=dtype)
    for j, src in enumerate(order):
        P[src, j] = 1.0
    return P


def boft_rotation(skew: Tensor, b: int) -> Tensor:
    """Dense ``R = F_{m-1} ··· F_1 · F_0`` from ``skew: (m, n/b, b(b-1)/2)``; ``F_i = P_i blockdiag(Q_i) P_iᵀ``."""
    m, n_blocks, _ = skew.shape
    n = n_blocks * b
    R = torch.eye(n, dtype=skew.dtype)
    for i in range(m):
        blocks = [cayley_dense(skew_from_free(skew[i, k], b)) for k in range(n_blocks)]
        P = permutation_matrix(butterfly_order(n, b, i), skew.dtype)
        F_i = P @ torch.block_diag(*blocks) @ P.T
        R = F_i @ R
    return R


def boft_weight(W: Tensor, bias: Tensor | None, skew: Tensor, b: int, scale: Tensor | None = None,
                trained_bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``W' = diag(s) · W · Rᵀ``; the bias is the trained one if any, else the (unscaled) base bias."""
    R = boft_rotation(skew, b)
    W_new = W @ R.T
    if scale is not None:
        W_new = torch.diag(scale) @ W_new
    return W_new, (trained_bias if trained_bias is not None else bias)


# -----------------------------------------------------------------------------------------------------------------
# SVFT
# -----------------------------------------------------------------------------------------------------------------


def svft_dense_m(rank: int, rows: Tensor, cols: Tensor, values: Tensor, gate: Tensor | None = None) -> Tensor:
    """Dense ``r × r`` ``M`` with ``M[rows[k], cols[k]] = sigmoid(gate) * values[k]`` (gate factor 1 if none)."""
    coeff = values if gate is None else torch.sigmoid(gate) * values
    M = torch.zeros(rank, rank, dtype=values.dtype)
    return M.index_put((rows, cols), coeff)


def svft_weight(W: Tensor, bias: Tensor | None, U: Tensor, V: Tensor, rows: Tensor, cols: Tensor, values: Tensor,
                gate: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``W' = W + U M Vᵀ`` (``U: out × r``, ``V: in × r``)."""
    M = svft_dense_m(U.shape[1], rows, cols, values, gate)
    return W + U @ M @ V.T, bias


def svft_support(pattern: str, rank: int, d: int, U: Tensor | None = None, V: Tensor | None = None) -> set:
    """The support Ω as a set of ``(i, j)`` (not for ``random``, whose positions are drawn)."""
    if pattern == "plain":
        return {(i, i) for i in range(rank)}
    if pattern == "banded":
        return {(i, j) for i in range(rank) for j in range(rank) if abs(i - j) <= d}
    if pattern == "top_k":
        k = svft_support_size(rank, d)
        score = {(i, j): abs(float(U[:, i] @ V[:, j])) for i in range(rank) for j in range(rank)}
        return set(sorted(score, key=score.get, reverse=True)[:k])
    raise ValueError(pattern)


def svft_support_size(rank: int, d: int) -> int:
    """``|Ω|`` of banded/random/top-k: ``r(2d+1) - d(d+1)``."""
    return rank * (2 * d + 1) - d * (d + 1)


# -----------------------------------------------------------------------------------------------------------------
# LoRA, DoRA, VeRA
# -----------------------------------------------------------------------------------------------------------------


def lora_weight(W: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, alpha: float,
                rank: int) -> tuple[Tensor, Tensor | None]:
    """``W' = W + (α/r) B A``."""
    return W + (alpha / rank) * (B @ A), bias


def dora_weight(W: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, magnitude: Tensor, alpha: float, rank: int,
                detach_norm: bool = True) -> tuple[Tensor, Tensor | None]:
    """``W' = m ⊙ (W + (α/r) B A) / ‖W + (α/r) B A‖_row`` (norm of each output row; detached, as in DoRA)."""
    direction = W + (alpha / rank) * (B @ A)
    norm = torch.sqrt((direction**2).sum(dim=1))
    if detach_norm:
        norm = norm.detach()
    return (magnitude / norm)[:, None] * direction, bias


def vera_weight(W: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, lambda_d: Tensor,
                lambda_b: Tensor) -> tuple[Tensor, Tensor | None]:
    """``W' = W + diag(b) B diag(d) A`` (``A: r × in``, ``B: out × r``)."""
    return W + torch.diag(lambda_b) @ B @ torch.diag(lambda_d) @ A, bias


# -----------------------------------------------------------------------------------------------------------------
# Reading a lit_peft adapted layer (only its tensors and the row ranges of its parts)
# -----------------------------------------------------------------------------------------------------------------


def reference_part(layer, part: str, W: Tensor, bias: Tensor | None, detach_norm: bool = True):
    """``(W', b')`` of one part of a lit_peft layer from the base rows ``W``/``bias`` and its adapter tensors."""
    kind = type(layer).__name__
    ad = layer.adapters[part]

    def t(name):  # an adapter tensor (or None), in W's dtype: the formula is evaluated in that precision
        value = getattr(ad, name)
        return None if value is None else value.to(W.dtype)

    if kind == "BOFTLinear":
        return boft_weight(W, bias, t("skew"), layer.block_size, t("scale"), t("bias"))
    if kind == "SVFTLinear":
        return svft_weight(W, bias, t("U"), t("V"), ad.rows, ad.cols, t("values"), t("gate"))
    if kind == "LoRALinear":
        return lora_weight(W, bias, t("lora_A"), t("lora_B"), layer.alpha, layer.rank)
    if kind == "DoRALinear":
        return dora_weight(W, bias, t("lora_A"), t("lora_B"), t("magnitude"), layer.alpha, layer.rank, detach_norm)
    if kind == "VeRALinear":
        A = layer.projections.A[:, : W.shape[1]].to(W.dtype)  # frozen random pair, shared by all layers
        B = layer.projections.B[: W.shape[0]].to(W.dtype)
        return vera_weight(W, bias, A, B, t("lambda_d"), t("lambda_b"))
    raise TypeError(kind)


def reference_layer(layer, W: Tensor, bias: Tensor | None, detach_norm: bool = True):
    """The full adapted ``(W', b')`` of a lit_peft layer whose base weight is ``W`` (``bias``): each part's rows by
    its formula (adapter tensors read off ``layer``), the rows of no part left frozen."""
    out = W.shape[0]
    spans = sorted(layer.parts.items(), key=lambda kv: kv[1][0])
    weights, biases, row = [], [], 0
    for part, (start, stop) in spans + [(None, (out, out))]:
        if start > row:  # frozen rows before this part
            weights.append(W[row:start])
            biases.append(None if bias is None else bias[row:start])
        if part is not None:
            w, b = reference_part(layer, part, W[start:stop], None if bias is None else bias[start:stop],
                                  detach_norm)
            weights.append(w)
            biases.append(b)
        row = stop
    W_new = torch.cat(weights)
    if all(b is None for b in biases):
        return W_new, None
    b_new = torch.cat([torch.zeros(w.shape[0], dtype=W_new.dtype) if b is None else b
                       for w, b in zip(weights, biases)])
    return W_new, b_new
