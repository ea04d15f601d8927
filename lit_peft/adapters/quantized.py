"""A quantized frozen base under any adapter: the frozen ``nn.Linear`` weights stored in 4-bit NF4 or 8-bit integers.

``quantize_frozen_linears(model, "nf4")`` replaces every frozen ``nn.Linear`` of a backbone (the adapter's targets
and the other frozen projections; not the trainable head, not a weight tied to another module such as an LLM's
``lm_head``) by a :class:`QuantizedLinear`; an adapter applied afterwards wraps it as it wraps a plain linear::

    QuantizedLinear.weight: QuantizedWeight   one quantized tensor per row block (q, k, v of a fused qkv: three)
        "nf4"  torchao's NF4Tensor (QLoRA's 4-bit NormalFloat, blocks of 64 values, double-quantized scales)
        "int8" torchao's Int8Tensor (symmetric, one scale per output row)

The tensors come from torchao (PyTorch's own quantization library: pure PyTorch, so the same code runs on the CPU
and on GPUs, and its NF4Tensor is what torchtune's QLoRA uses); bitsandbytes' CPU backend needs its compiled
library and its 8-bit layers are inference-oriented. torchao's own ``F.linear`` of an ``Int8Tensor`` casts the
integer weight to the activations' dtype inside autograd, which then keeps that full-precision copy for the
backward pass; :func:`quantized_linear` instead saves only the quantized tensor and dequantizes it again in the
backward pass (as torchao's ``linear_nf4`` does), so no full-precision weight outlives one matmul.

What reads a base weight as a whole (merging, SVFT's SVD, DoRA's magnitude, the LoRA export) takes
:func:`dense_weight`, the dequantized weight: SVFT's singular vectors are those of the weight the model computes
with, and a merged model is a plain full-precision model. Adapters compute on the activations over a quantized
base (their ``side="auto"`` never forms the adapted weight: that would dequantize the whole weight and keep it for
the weight gradient).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed.tensors import full_tensor
from .targets import row_blocks

Scheme = Literal["nf4", "int8"]
SCHEMES = ("nf4", "int8")
#: NF4: values per quantization block (QLoRA's 64) and the most blocks whose scales share one second-level scale
NF4_BLOCK = 64
NF4_SCALER_BLOCK = 256


def _torchao():
    try:
        import torchao.quantization as tq
    except ImportError as err:
        raise ImportError("a quantized base (quantize: 'nf4' or 'int8') needs torchao: pip install torchao "
                          "(or pip install -e '.[test]' in a lit_peft checkout)") from err
    return tq


def _nf4_tensor_class():
    tq = _torchao()
    cls = getattr(tq, "NF4Tensor", None)
    if cls is None:  # torchao < 0.15 kept it under torchao.dtypes
        from torchao.dtypes.nf4tensor import NF4Tensor as cls
    return cls


def _quantize(weight: Tensor, scheme: str) -> Tensor:
    """One frozen ``(rows, in)`` weight block as a torchao quantized tensor (dtype: the weight's)."""
    tq = _torchao()
    if scheme == "nf4":
        n_blocks = weight.numel() // NF4_BLOCK
        scaler_block = NF4_SCALER_BLOCK
        while n_blocks % scaler_block:  # the largest power of two <= 256 dividing the number of blocks
            scaler_block //= 2
        to_nf4 = getattr(tq, "to_nf4", None)
        if to_nf4 is None:
            from torchao.dtypes.nf4tensor import to_nf4
        return to_nf4(weight.detach().contiguous(), block_size=NF4_BLOCK, scaler_block_size=scaler_block)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    tq.quantize_(linear, tq.Int8WeightOnlyConfig())
    return linear.weight.detach()


def _is_torchao(t) -> bool:
    """A torchao quantized tensor (``NF4Tensor``, ``Int8Tensor``, …)?"""
    return type(t).__module__.startswith("torchao.")


def _dequantize(q: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The full-precision values of a torchao quantized tensor (a plain tensor returned as it is)."""
    if not _is_torchao(q):
        out = q
    elif isinstance(q, _nf4_tensor_class()):
        out = q.get_original_weight()
    else:
        out = q.dequantize()
    return out if dtype is None else out.to(dtype)


def _inner_bytes(t: Tensor) -> int:
    """Storage of a tensor subclass (its inner tensors) or of a plain tensor."""
    if not _is_torchao(t):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(_inner_bytes(getattr(t, name)) for name in names)


class _QuantizedLinearFunction(torch.autograd.Function):
    """``x Wᵀ`` for a quantized frozen ``W``: saves the quantized tensor only; the input gradient dequantizes it."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor) -> Tensor:
        ctx.save_for_backward(q)
        if isinstance(q, _nf4_tensor_class()):
            return F.linear(x, _dequantize(q, x.dtype))
        return F.linear(x, q)  # torchao's int8 kernel (no graph is recorded inside forward)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (q,) = ctx.saved_tensors
        return grad @ _dequantize(q, grad.dtype), None


def quantized_linear(x: Tensor, q: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, W, bias)`` for a frozen quantized ``W`` (see the module docstring)."""
    y = _QuantizedLinearFunction.apply(x, q)
    return y if bias is None else y + bias.to(y.dtype)


class QuantizedWeight(nn.Module):
    """A frozen ``(out, in)`` weight stored as one quantized tensor per row block.

    ``weight[start:stop]`` gives a row block's quantized tensor (the blocks are the adapter's parts, so an adapted
    layer only asks for whole blocks; an int8 block can also be cut); :meth:`dequantize` the whole weight.
    ``shape``, ``dtype`` (the full-precision dtype) and ``device`` read as a tensor's.
    """

    def __init__(self, weight: Tensor, blocks: Sequence[tuple[int, int]], scheme: str):
        super().__init__()
        self.scheme = scheme
        self.shape = torch.Size(weight.shape)
        self.dtype = weight.dtype
        self.blocks = [tuple(b) for b in blocks]
        self.quantized = nn.ParameterList(
            nn.Parameter(_quantize(weight[start:stop], scheme), requires_grad=False) for start, stop in self.blocks)

    @property
    def device(self) -> torch.device:
        return self.quantized[0].device

    def __getitem__(self, rows: slice) -> Tensor:
        start, stop, step = rows.indices(self.shape[0]) if isinstance(rows, slice) else (None, None, None)
        if step == 1:
            for (b_start, b_stop), q in zip(self.blocks, self.quantized):
                if (b_start, b_stop) == (start, stop):
                    return q
                if self.scheme == "int8" and b_start <= start and stop <= b_stop:
                    return q[start - b_start:stop - b_start]
        raise IndexError(f"a {self.scheme} weight of shape {tuple(self.shape)} gives whole row blocks "
                         f"{self.blocks}, not rows {rows!r}")

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The whole weight in full precision (``dtype``: the original one by default)."""
        parts = [_dequantize(q, dtype or self.dtype) for q in self.quantized]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def nbytes(self) -> int:
        return sum(_inner_bytes(q) for q in self.quantized)

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        outputs = [quantized_linear(x, q) for q in self.quantized]
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        return y if bias is None else y + bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.scheme}, shape={tuple(self.shape)}, blocks={self.blocks}"


class QuantizedLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is a :class:`QuantizedWeight` (an adapter wraps it like any linear)."""

    def __init__(self, linear: nn.Linear, scheme: str, blocks: Sequence[tuple[int, int]] | None = None):
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = full_tensor(linear.weight).detach()
        self.weight = QuantizedWeight(weight, blocks or [(0, linear.out_features)], scheme)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.weight.linear(x, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.weight.scheme}")


def is_quantized(weight) -> bool:
    """A quantized base weight: a :class:`QuantizedWeight`, or one of its torchao row blocks."""
    return isinstance(weight, QuantizedWeight) or _is_torchao(weight)


def dense_weight(weight, dtype: torch.dtype | None = None) -> Tensor:
    """A base weight as a whole full-precision tensor: dequantized (:class:`QuantizedWeight` or a torchao tensor),
    gathered (an FSDP2 ``DTensor``) or as it is."""
    if isinstance(weight, QuantizedWeight):
        return weight.dequantize(dtype)
    out = _dequantize(full_tensor(weight))
    return out if dtype is None else out.to(dtype)


def frozen_linear(x: Tensor, weight, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` of a frozen base weight, plain or a quantized block (:func:`quantized_linear`)."""
    if isinstance(weight, QuantizedWeight):
        return weight.linear(x, bias)
    if _is_torchao(weight):
        return quantized_linear(x, weight, bias)
    return F.linear(x, weight, bias)


@dataclass
class QuantizationReport:
    """What :func:`quantize_frozen_linears` did: the layers, and the weight bytes before and after."""

    scheme: str
    layers: list[str] = field(default_factory=list)
    dense_bytes: int = 0
    quantized_bytes: int = 0
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{self.scheme} base: {len(self.layers)} frozen linear layers quantized, their weights "
                f"{self.dense_bytes / 2**20:.1f} MiB -> {self.quantized_bytes / 2**20:.1f} MiB"
                + ("; kept in full precision: " + ", ".join(f"{k} ({v})" for k, v in self.skipped.items())
                   if self.skipped else ""))


def _tied(model: nn.Module) -> set[int]:
    """Ids of parameters that more than one module holds (tied embeddings)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def check_quantizable(name: str, linear: nn.Linear, scheme: str, blocks: Iterable[tuple[int, int]]) -> str | None:
    """Why ``linear`` cannot be stored in ``scheme`` (a message naming it), or ``None``."""
    if scheme == "nf4":
        for start, stop in blocks:
            if ((stop - start) * linear.in_features) % NF4_BLOCK:
                return (f"{name}: rows {start}..{stop} of its ({linear.out_features}, {linear.in_features}) weight "
                        f"hold {(stop - start) * linear.in_features} values, not a multiple of NF4's block of "
                        f"{NF4_BLOCK}; use quantize: int8, or leave this layer out of the adapter's targets")
    return None


def parts_problem(name: str, linear: nn.Module, parts: Mapping[str, tuple[int, int]]) -> str | None:
    """Why an adapter's ``parts`` cannot read their rows of ``linear``'s quantized weight (``None``: they can, or
    the weight is not quantized)."""
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, QuantizedWeight):
        return None
    for part, (start, stop) in parts.items():
        try:
            weight[start:stop]
        except IndexError:
            return (f"{name}: part {part!r} (rows {start}..{stop}) is not a row block of its {weight.scheme} weight "
                    f"(blocks {weight.blocks}); quantize with the adapter's targets "
                    f"(quantize_frozen_linears(model, {weight.scheme!r}, targets=resolve_targets(model, ...))), as "
                    f"the modules' quantize option does")
    return None


def quantize_frozen_linears(model: nn.Module, scheme: str, *,
                            targets: Mapping[str, Mapping[str, tuple[int, int]]] | None = None,
                            keep: Sequence[str] = ()) -> QuantizationReport:
    """Store the frozen ``nn.Linear`` weights of ``model`` in ``scheme`` (``"nf4"`` or ``"int8"``), in place.

    Args:
        targets: the adapter's targets (``{layer: {part: (start, stop)}}``, from
            :func:`~lit_peft.adapters.targets.resolve_targets`): their parts become separate quantized row blocks,
            so each adapted part reads its own block.
        keep: names of modules left in full precision, with everything inside them (the trainable head).

    Weights tied to another module (an LLM's ``lm_head`` sharing the embedding) stay in full precision. The
    quantized weights are frozen (``requires_grad=False``) whatever they were. Every layer is checked before any is
    changed (one ``ValueError`` naming all that cannot be quantized).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"quantize must be one of {', '.join(map(repr, SCHEMES))} (or null), got {scheme!r}")
    _torchao()
    targets = targets or {}
    tied = _tied(model)
    report = QuantizationReport(scheme)
    plan, problems = [], []
    kept_prefixes = tuple(f"{k}." for k in keep)
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if name in keep or name.startswith(kept_prefixes):
            continue
        if id(module.weight) in tied:
            report.skipped[name] = "weight tied to another module"
            continue
        parts = targets.get(name)
        blocks = [(start, stop) for _, start, stop in row_blocks(parts or {}, module.out_features)]
        problem = check_quantizable(name, module, scheme, blocks)
        if problem:
            problems.append(problem)
        plan.append((name, module, blocks))
    if problems:
        raise ValueError(f"cannot store the base in {scheme}:\n  - " + "\n  - ".join(problems))
    for name, module, blocks in plan:
        quantized = QuantizedLinear(module, scheme, blocks)
        report.layers.append(name)
        report.dense_bytes += module.weight.numel() * module.weight.element_size()
        report.quantized_bytes += quantized.weight.nbytes()
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, quantized)
        del module
    return report


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes of the frozen linear weights of ``model`` as stored (quantized or not), counted once each."""
    total, seen = 0, set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, QuantizedWeight):
            if id(weight) not in seen:
                seen.add(id(weight))
                total += weight.nbytes()
        elif (isinstance(weight, Tensor) and hasattr(module, "in_features") and hasattr(module, "out_features")
              and id(weight) not in seen):  # nn.Linear, or an adapted layer over a full-precision weight
            seen.add(id(weight))
            total += weight.numel() * weight.element_size()
    return total


__all__ = ["SCHEMES", "QuantizationReport", "QuantizedLinear", "QuantizedWeight", "base_weight_bytes",
           "dense_weight", "frozen_linear", "is_quantized", "quantize_frozen_linears", "quantized_linear"]
