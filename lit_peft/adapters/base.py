"""The adapter contract shared by every method: strategies, adapted layers, target matching.

An *adapter strategy* (``BOFT(...)``, ``SVFT(...)``, ``LoRA(...)``, ...) is a small, serialisable config
object. ``strategy.apply(model)`` finds the target ``nn.Linear`` layers, checks every one of them against the
strategy's hyperparameters (all problems in one ``ValueError``, before anything is modified), freezes the
model and swaps each target for an :class:`AdaptedLinear` subclass.

An adapted layer keeps the frozen base ``weight`` (``(out, in)``) and ``bias`` under ``nn.Linear``'s names, so
a base checkpoint still loads into it, and holds one adapter per *part* in ``adapters`` (an
``nn.ModuleDict``). A part is a contiguous range of output rows with its own adapter:

    weight (out, in)                 adapters
    ┌────────────────────┐
    │ rows 0 .. d        │  <- "q"    own rotation / own SVD / own low-rank pair
    │ rows d .. 2d       │  <- "k"
    │ rows 2d .. 3d      │  <- "v"
    └────────────────────┘

An ordinary linear has one part, ``"all"``. timm fuses q, k and v into one ``qkv`` linear while both papers adapt
q, k and v as separate matrices (and count parameters that way), so by default (``fused_qkv="split"``) a fused
``qkv`` gets the three parts ``q``, ``k``, ``v``. A target may also name a single part (``"qkv.q"``,
``"qkv.v"``): the other rows then stay frozen. ``fused_qkv="joint"`` treats the fused matrix as one part.

Parameter names in state dicts therefore read ``blocks.0.attn.qkv.adapters.q.<tensor>`` and
``blocks.0.mlp.fc1.adapters.all.<tensor>``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ALL = "all"
QKV_PARTS = ("q", "k", "v")
FUSED_QKV_NAMES = ("qkv",)

TargetSpec = str | Sequence[str]


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor, also when ``t`` is a DTensor shard (FSDP2); plain tensors come back unchanged. A shard kept
    in host memory by FSDP2's CPU offload is gathered on its mesh's device (NCCL gathers GPU tensors only)."""
    if not hasattr(t, "full_tensor"):
        return t
    if t.device.type != t.device_mesh.device_type:
        t = t.to(t.device_mesh.device_type)
    return t.full_tensor()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: merges and orthogonality checks run in it even for bf16/fp16 models."""
    return torch.promote_types(dtype, torch.float32)


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` plus one adapter per part (a contiguous range of output rows).

    Subclasses implement :meth:`adapted_rows` (the adapted weight and bias of one part, used for merging and
    for weight-side forwards) and :meth:`forward`.
    """

    def __init__(self, base: nn.Linear, parts: Mapping[str, tuple[int, int]]):
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.parts = dict(sorted(parts.items(), key=lambda kv: kv[1][0]))
        self.adapters = nn.ModuleDict()

    # -- structure ---------------------------------------------------------------------------------------------
    def row_blocks(self) -> Iterator[tuple[str | None, int, int]]:
        """``(part or None, start, stop)`` covering rows ``0..out`` in order; ``None`` marks frozen rows."""
        row = 0
        for name, (start, stop) in self.parts.items():
            if start > row:
                yield None, row, start
            yield name, start, stop
            row = stop
        if row < self.out_features:
            yield None, row, self.out_features

    def base_rows(self, start: int, stop: int) -> tuple[Tensor, Tensor | None]:
        bias = None if self.bias is None else self.bias[start:stop]
        return self.weight[start:stop], bias

    def num_adapter_parameters(self) -> int:
        return sum(p.numel() for p in self.adapters.parameters())

    # -- maths -------------------------------------------------------------------------------------------------
    def adapted_rows(self, part: str, weight: Tensor, bias: Tensor | None, *,
                     training: bool) -> tuple[Tensor, Tensor | None]:
        """The adapted ``(W', b')`` of ``part`` from its base rows ``weight: (out_p, in)``, ``bias: (out_p,)``.

        Computed in ``weight.dtype`` through the module's own parameters (read with :func:`full_tensor`, so the
        same code serves a forward pass and a merge of FSDP2-sharded parameters). ``training`` switches on the
        method's training-only randomness (BOFT's multiplicative dropout).
        """
        raise NotImplementedError

    def _assemble(self, weight: Tensor, bias: Tensor | None, training: bool) -> tuple[Tensor, Tensor | None]:
        """``(W', b')`` from the full base ``weight``/``bias``: adapted parts through :meth:`adapted_rows`."""
        weights, biases = [], []
        for part, start, stop in self.row_blocks():
            w, b = weight[start:stop], None if bias is None else bias[start:stop]
            if part is not None:
                w, b = self.adapted_rows(part, w, b, training=training)
            weights.append(w)
            biases.append(b)
        return _cat_rows(weights, biases, self.row_blocks())

    def adapted_weight(self) -> tuple[Tensor, Tensor | None]:
        """The full adapted ``(W', b')`` for a forward pass (autograd flows into the adapter tensors)."""
        return self._assemble(self.weight, self.bias, self.training)

    def forward_weight_side(self, x: Tensor) -> Tensor:
        weight, bias = self.adapted_weight()
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def forward_by_rows(self, x: Tensor, part_output) -> Tensor:
        """Concatenate per-part outputs ``part_output(part, x, W_p, b_p)`` with the frozen rows' plain output."""
        outputs = []
        for part, start, stop in self.row_blocks():
            w, b = self.base_rows(start, stop)
            outputs.append(F.linear(x, w, b) if part is None else part_output(part, x, w, b))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)

    # -- merging -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing what this layer computes in eval mode (merged in >= float32)."""
        weight = full_tensor(self.weight)
        work = compute_dtype(weight.dtype)
        bias = None if self.bias is None else full_tensor(self.bias).to(work)
        merged_w, merged_b = self._assemble(weight.to(work), bias, training=False)
        linear = nn.Linear(self.in_features, self.out_features, bias=merged_b is not None,
                           device=merged_w.device, dtype=weight.dtype)
        linear.weight.copy_(merged_w)
        if merged_b is not None:
            linear.bias.copy_(merged_b)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        parts = ", ".join(self.parts)
        return f"in_features={self.in_features}, out_features={self.out_features}, parts=[{parts}]"


def _cat_rows(weights: list[Tensor], biases: list[Tensor | None], blocks) -> tuple[Tensor, Tensor | None]:
    """Stack per-row-block weights and biases; a block without bias gets zeros when another block has one."""
    weight = weights[0] if len(weights) == 1 else torch.cat(weights)
    if all(b is None for b in biases):
        return weight, None
    if len(biases) == 1:
        return weight, biases[0]
    filled = [weight.new_zeros(stop - start) if b is None else b for b, (_, start, stop) in zip(biases, blocks)]
    return weight, torch.cat(filled)


def adapter_tensor(t: Tensor, like: Tensor) -> Tensor:
    """An adapter tensor as a whole tensor in ``like``'s dtype (forward passes and merges alike)."""
    return full_tensor(t).to(like.dtype)


# -- target matching ---------------------------------------------------------------------------------------------
def _is_fused_qkv(name: str, module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and name.rpartition(".")[2] in FUSED_QKV_NAMES
            and module.out_features % 3 == 0)


def _entry_matches(entry: str, name: str) -> bool:
    return name == entry or name.endswith("." + entry)


def head_modules(model: nn.Module) -> set[int]:
    """``id``s of the output head(s): timm's ``get_classifier()``, Hugging Face's ``get_output_embeddings()``."""
    heads = set()
    for getter in ("get_classifier", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        if callable(fn):
            try:
                head = fn()
            except (AttributeError, NotImplementedError, TypeError):
                head = None
            if isinstance(head, nn.Module):
                heads.add(id(head))
    if not heads:
        for name, module in model.named_modules():
            if name.rpartition(".")[2] in ("head", "classifier", "lm_head", "score"):
                heads.add(id(module))
    return heads


def _describe_linears(model: nn.Module) -> str:
    leaves: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            leaf = name.rpartition(".")[2] or name
            if _is_fused_qkv(name, module):
                leaf += " (parts qkv.q, qkv.k, qkv.v)"
            leaves[leaf] = leaves.get(leaf, 0) + 1
    if not leaves:
        return "the model has no nn.Linear layers"
    return "linear layers by name: " + ", ".join(f"{leaf} ×{n}" for leaf, n in leaves.items())


def resolve_targets(model: nn.Module, target_modules: TargetSpec, fused_qkv: str = "split",
                    exclude: Sequence[str] = ()) -> dict[str, dict[str, tuple[int, int]]]:
    """Map each targeted linear's dotted name to its parts ``{part: (start_row, stop_row)}``.

    ``target_modules`` is a list of names (a module matches an entry equal to its dotted name or to a dotted
    suffix of it; ``"qkv.q"`` names the q part of a fused ``qkv``), a single string (a regular expression that
    must match the whole dotted name, parts included as ``....qkv.q``), or ``"all-linear"`` (every ``nn.Linear``
    except the output head). Raises ``ValueError`` for an entry that matches nothing, for a non-linear module
    named exactly, and for an entry whose matches are all non-linear (suffix matches of non-linear modules
    beside linear ones are skipped: ``"proj"`` targets attention projections, not timm's ``patch_embed.proj``).
    """
    if fused_qkv not in ("split", "joint"):
        raise ValueError(f"fused_qkv must be 'split' or 'joint', got {fused_qkv!r}")
    modules = dict(model.named_modules())
    excluded = {name for name in modules for e in exclude if _entry_matches(e, name)}
    heads = head_modules(model)
    requested: dict[str, set[str]] = {}
    problems: list[str] = []

    def parts_of(name: str, module: nn.Module) -> tuple[str, ...]:
        return QKV_PARTS if fused_qkv == "split" and _is_fused_qkv(name, module) else (ALL,)

    def add(name: str, parts: Sequence[str]):
        requested.setdefault(name, set()).update(parts)

    def add_matches(label: str, names: Sequence[str], exact: Sequence[str] = ()):
        """Linear matches are targets; a non-linear match is an error when it was named exactly or when the
        entry matched no linear at all (a suffix like ``proj`` also hitting timm's ``patch_embed.proj`` conv)."""
        linear = [n for n in names if isinstance(modules[n], nn.Linear)]
        other = [n for n in names if not isinstance(modules[n], nn.Linear) and (n in exact or not linear)]
        for n in other:
            problems.append(f"target {label!r} matches {n!r}, a {type(modules[n]).__name__}, not an nn.Linear")
        for n in linear:
            add(n, parts_of(n, modules[n]))
        return len(names)

    candidates = [n for n in modules if n and n not in excluded]
    if isinstance(target_modules, str) and target_modules == "all-linear":
        for name in candidates:
            if isinstance(modules[name], nn.Linear) and id(modules[name]) not in heads:
                add(name, parts_of(name, modules[name]))
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules regex {target_modules!r} does not compile: {err}") from err
        hits = add_matches(target_modules, [n for n in candidates if pattern.fullmatch(n)])
        if fused_qkv == "split":
            for name in candidates:
                if _is_fused_qkv(name, modules[name]) and not pattern.fullmatch(name):
                    parts = [p for p in QKV_PARTS if pattern.fullmatch(f"{name}.{p}")]
                    if parts:
                        add(name, parts)
                        hits += 1
        if hits == 0:
            problems.append(f"target_modules regex {target_modules!r} matches no module")
    else:
        entries = list(target_modules)
        if not entries:
            problems.append("target_modules is an empty list")
        for entry in entries:
            hits = add_matches(entry, [n for n in candidates if _entry_matches(entry, n)], exact=[entry])
            for name in candidates:
                if not _is_fused_qkv(name, modules[name]):
                    continue
                for p in QKV_PARTS:
                    if _entry_matches(entry, f"{name}.{p}"):
                        hits += 1
                        if fused_qkv == "joint":
                            problems.append(f"target {entry!r} names a part of the fused {name!r}, but "
                                            f"fused_qkv='joint'; use fused_qkv='split' or target {name!r}")
                        else:
                            add(name, [p])
            if hits == 0:
                problems.append(f"target {entry!r} matches no module")
    if problems:
        raise ValueError("cannot apply adapter:\n  - " + "\n  - ".join(problems) + "\n" + _describe_linears(model))

    resolved = {}
    for name, parts in requested.items():
        out = modules[name].out_features
        if ALL in parts:
            resolved[name] = {ALL: (0, out)}
        else:
            third = out // 3
            resolved[name] = {p: (i * third, (i + 1) * third) for i, p in enumerate(QKV_PARTS) if p in parts}
    return resolved


# -- strategies --------------------------------------------------------------------------------------------------
class AdapterStrategy:
    """Base class of every adapter method: a serialisable config that adapts a model in place.

    Subclasses store each constructor argument under an attribute of the same name (that is what
    :meth:`init_args` reads, and what ``save_adapter`` writes) and implement :meth:`check_layer` and
    :meth:`make_layer`.

    Args:
        target_modules: which ``nn.Linear`` layers to adapt: a list of names, a full-match regex, or
            ``"all-linear"`` (see :func:`resolve_targets`).
        trainable_modules: names of modules (same matching as a target list) kept fully trainable and saved
            with the adapter, e.g. a classification ``head``.
        fused_qkv: ``"split"`` gives a fused ``qkv`` linear separate q, k, v adapters (as the papers count them);
            ``"joint"`` adapts the fused matrix as one.
    """

    def __init__(self, target_modules: TargetSpec = "all-linear", trainable_modules: Sequence[str] = (),
                 fused_qkv: Literal["split", "joint"] = "split"):
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.trainable_modules = list(trainable_modules)
        self.fused_qkv = fused_qkv
        if fused_qkv not in ("split", "joint"):
            raise ValueError(f"fused_qkv must be 'split' or 'joint', got {fused_qkv!r}")

    def init_args(self) -> dict:
        """The constructor arguments, as JSON-friendly values (what ``save_adapter`` writes)."""
        args = {}
        for cls in type(self).__mro__:
            if cls is object or "__init__" not in vars(cls):
                continue
            for name, param in inspect.signature(cls.__init__).parameters.items():
                if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or name in args:
                    continue
                value = getattr(self, name)
                args[name] = list(value) if isinstance(value, tuple) else value
        return args

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args().items())
        return f"{type(self).__name__}({args})"

    # -- hooks for subclasses ----------------------------------------------------------------------------------
    def check_layer(self, name: str, linear: nn.Linear, parts: Mapping[str, tuple[int, int]]) -> list[str]:
        """Problems (as messages naming ``name``) that prevent adapting this layer; empty if none."""
        return []

    def make_layer(self, name: str, linear: nn.Linear, parts: Mapping[str, tuple[int, int]]) -> AdaptedLinear:
        raise NotImplementedError

    def prepare(self, model: nn.Module, targets: Mapping[str, Mapping[str, tuple[int, int]]]) -> None:
        """Called once after all checks passed and before layers are built (e.g. VeRA's shared projections)."""

    def extra_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        """Tensors shared across layers that ``save_adapter`` writes beside the per-layer ones (none by default)."""
        return {}

    def load_extra_tensors(self, model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
        """Restore what :meth:`extra_tensors` saved."""

    # -- the public entry point --------------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """Adapt ``model`` in place and return it: base weights frozen, adapter tensors trainable."""
        if any(isinstance(m, AdaptedLinear) for m in model.modules()):
            raise ValueError(f"{type(model).__name__} already has adapters; merge_adapters() or rebuild it first")
        targets = resolve_targets(model, self.target_modules, self.fused_qkv, exclude=self.trainable_modules)
        problems = []
        modules = dict(model.named_modules())
        for name, parts in targets.items():
            problems += self.check_layer(name, modules[name], parts)
        trainable = self._trainable_module_names(model)
        if problems:
            raise ValueError(f"cannot apply {type(self).__name__}:\n  - " + "\n  - ".join(problems))
        self.prepare(model, targets)
        for param in model.parameters():
            param.requires_grad_(False)
        for name, parts in targets.items():
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, self.make_layer(name, modules[name], parts))
        for name in trainable:
            for param in model.get_submodule(name).parameters():
                param.requires_grad_(True)
        model.lit_peft_strategy = self
        return model

    def _trainable_module_names(self, model: nn.Module) -> list[str]:
        names, missing = [], []
        all_names = [n for n, _ in model.named_modules() if n]
        for entry in self.trainable_modules:
            hits = [n for n in all_names if _entry_matches(entry, n)]
            if not hits:
                missing.append(entry)
            names += hits
        if missing:
            top = ", ".join(n for n in all_names if "." not in n)
            raise ValueError(f"trainable_modules {missing} match no module; top-level modules are: {top}")
        return names


#: Name components that module wrappers insert and that their state dicts leave out: FSDP1's
#: ``FullyShardedDataParallel`` and activation checkpointing's ``CheckpointWrapper``.
WRAPPER_NAME_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_name(name: str) -> str:
    """``name`` (from ``named_modules``/``named_parameters``) as the unwrapped model and its state dict spell it."""
    for part in WRAPPER_NAME_PARTS:
        name = name.replace(part, "")
    return name


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """Every adapted layer of ``model`` by its name in the unwrapped model (also inside FSDP1-wrapped blocks)."""
    return {unwrapped_name(name): m for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"adapter": ..., "trainable": ..., "total": ...}``; ``adapter`` excludes ``trainable_modules``."""
    adapter = sum(layer.num_adapter_parameters() for layer in adapted_layers(model).values())
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = full_tensor(param).numel() if hasattr(param, "full_tensor") else param.numel()
        total += n
        trainable += n if param.requires_grad else 0
    return {"adapter": adapter, "trainable": trainable, "total": total}
