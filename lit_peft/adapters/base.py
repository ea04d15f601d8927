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
``blocks.0.mlp.fc1.adapters.all.<tensor>``. Which layers and parts a strategy targets is decided in
:mod:`lit_peft.adapters.targets`.

A strategy holds configuration only. What ``apply`` needs at run time besides the model (an SVD provider for SVFT,
e.g. :class:`lit_peft.callbacks.SVDCache`) is an argument of ``apply``; what the adapted layers share (VeRA's random
pair) is built by ``apply`` and lives in the layers. ``apply`` records the strategy on the model
(:func:`find_strategy`, :func:`get_strategy`), so that saving and merging know what was applied.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed.tensors import full_tensor
from .quantized import dense_weight, frozen_linear, is_quantized, parts_problem
from .targets import FUSED_QKV_MODES, TargetSpec, matching_module_names, resolve_targets, row_blocks

if TYPE_CHECKING:
    from .svft import SVDProvider

#: Which formulation a layer with two of them (BOFT, SVFT) computes: ``"auto"`` picks the cheaper per call.
Side = Literal["auto", "activation", "weight"]
SIDES = ("auto", "activation", "weight")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: merges and orthogonality checks run in it even for bf16/fp16 models."""
    return torch.promote_types(dtype, torch.float32)


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` plus one adapter per part (a contiguous range of output rows).

    Subclasses implement :meth:`adapted_rows` (the adapted weight and bias of one part, used for merging and for
    weight-side forwards) and :meth:`part_output` (one part's output computed from the activations). A method with
    both formulations sets :attr:`side` and implements :meth:`side_costs`; :meth:`forward` then picks one per call.
    """

    #: ``"auto"``, ``"activation"`` or ``"weight"`` for a layer with both formulations; ``None``: activations only.
    side: Side | None = None

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
        #: applied to a ``meta``-device layer: shapes and counts only, its adapter tensors never initialised
        self.built_on_meta = base.weight.device.type == "meta"

    def _check_initialised(self) -> None:
        if self.built_on_meta and self.weight.device.type != "meta":
            raise RuntimeError(
                f"this {type(self).__name__} was built on the meta device (shapes and parameter counts only): its "
                f"adapter tensors were never initialised, and materialising the model (to_empty) does not initialise "
                f"them. Apply the adapter to the model after its weights are loaded")

    # -- structure ---------------------------------------------------------------------------------------------
    def row_blocks(self) -> Iterator[tuple[str | None, int, int]]:
        """``(part or None, start, stop)`` covering rows ``0..out`` in order; ``None`` marks frozen rows."""
        return row_blocks(self.parts, self.out_features)

    def base_rows(self, start: int, stop: int) -> tuple[Tensor, Tensor | None]:
        bias = None if self.bias is None else self.bias[start:stop]
        return self.weight[start:stop], bias

    def num_adapter_parameters(self) -> int:
        """The adapter's own parameters, without a part's ``FROZEN_TENSORS`` (SVFT's ``U``, ``S``, ``V`` held as
        frozen parameters under FSDP2)."""
        return sum(p.numel() for part in self.adapters.values() for name, p in part.named_parameters()
                   if name not in getattr(part, "FROZEN_TENSORS", ()))

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

    def part_output(self, part: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The adapted output rows of ``part`` for the activations ``x``, from its base rows ``weight``, ``bias``."""
        raise NotImplementedError

    def side_costs(self, tokens: int, backward: bool) -> tuple[int, int]:
        """Extra multiply-adds over the frozen layer of ``(weight side, activation side)`` for ``tokens`` tokens,
        ``backward``: with a backward pass through the adapter (what ``side="auto"`` compares)."""
        raise NotImplementedError

    def use_weight_side(self, x: Tensor) -> bool:
        """Whether :meth:`forward` forms the adapted weight (one GEMM) rather than adapting the activations (always,
        with ``side="auto"``, over a quantized base: the weight side would dequantize the whole weight and keep it)."""
        if self.side != "auto":
            return self.side == "weight"
        if is_quantized(self.weight):
            return False
        tokens = x.numel() // self.in_features
        backward = torch.is_grad_enabled() and any(p.requires_grad for p in self.adapters.parameters())
        weight_cost, activation_cost = self.side_costs(tokens, backward)
        return weight_cost < activation_cost

    def forward(self, x: Tensor) -> Tensor:
        self._check_initialised()
        if self.use_weight_side(x):
            return self.forward_weight_side(x)
        return self.forward_by_rows(x, self.part_output)

    def adapted_weight(self) -> tuple[Tensor, Tensor | None]:
        """The full adapted ``(W', b')`` for a forward pass (autograd flows into the adapter tensors)."""
        return self._assemble(dense_weight(self.weight), self.bias, self.training)

    def forward_weight_side(self, x: Tensor) -> Tensor:
        weight, bias = self.adapted_weight()
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def forward_by_rows(self, x: Tensor, part_output) -> Tensor:
        """Concatenate per-part outputs ``part_output(part, x, W_p, b_p)`` with the frozen rows' plain output."""
        outputs = []
        for part, start, stop in self.row_blocks():
            w, b = self.base_rows(start, stop)
            outputs.append(frozen_linear(x, w, b) if part is None else part_output(part, x, w, b))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)

    # -- merging -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing what this layer computes in eval mode (merged in >= float32)."""
        self._check_initialised()
        weight = dense_weight(self.weight)  # gathered when sharded, dequantized when quantized
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


# -- the strategy applied to a model -----------------------------------------------------------------------------
#: The attribute of an adapted model that holds its strategy (set by ``apply``; read through the functions below).
STRATEGY_ATTRIBUTE = "lit_peft_strategy"


def find_strategy(model: nn.Module) -> AdapterStrategy | None:
    """The strategy applied to ``model`` (by ``apply`` or ``load_adapter``), or ``None`` if it has no adapters."""
    return getattr(model, STRATEGY_ATTRIBUTE, None)


def get_strategy(model: nn.Module) -> AdapterStrategy:
    """As :func:`find_strategy`, but a model without adapters is a ``ValueError``."""
    strategy = find_strategy(model)
    if strategy is None:
        raise ValueError(f"{type(model).__name__} has no adapters: call strategy.apply(model) or load_adapter first")
    return strategy


def detach_strategy(model: nn.Module) -> AdapterStrategy | None:
    """Forget the strategy recorded on ``model`` (after merging or undoing its adapters); returns it, or ``None``."""
    strategy = find_strategy(model)
    if strategy is not None:
        delattr(model, STRATEGY_ATTRIBUTE)
    return strategy


def _one_of(choices: Sequence) -> str:
    """``'a', 'b' or 'c'``."""
    quoted = [repr(c) for c in choices]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


# -- strategies --------------------------------------------------------------------------------------------------
class AdapterStrategy:
    """Base class of every adapter method: a serialisable config that adapts a model in place.

    Subclasses store each constructor argument under an attribute of the same name (that is what
    :meth:`init_args` reads, and what ``save_adapter`` writes), check them with :meth:`check_arguments`, and
    implement :meth:`make_layer` (and :meth:`check_layer`, :meth:`prepare` where needed). A strategy holds no
    runtime state: ``apply`` may be called on any number of models.

    Args:
        target_modules: which ``nn.Linear`` layers to adapt: a list of names, a full-match regex, or
            ``"all-linear"`` (see :func:`~lit_peft.adapters.targets.resolve_targets`).
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
        self.check_arguments(choices={"fused_qkv": FUSED_QKV_MODES})

    def check_arguments(self, *, integers: Mapping[str, int] | None = None, fractions: Sequence[str] = (),
                        positives: Sequence[str] = (), finites: Sequence[str] = (),
                        choices: Mapping[str, Sequence] | None = None, problems: Sequence[str] = ()) -> None:
        """Raise one ``ValueError`` naming every invalid constructor argument, each read from its attribute
        (a number given as a string, e.g. ``"16"`` from Python, is named too, never a bare ``TypeError`` later).

        Args:
            integers: ``{name: minimum}``: an integer at least ``minimum``.
            fractions: names of probabilities in ``[0, 1)`` (dropouts).
            positives: names of finite real numbers > 0 (scales such as LoRA's ``alpha``).
            finites: names of finite real numbers (initial values).
            choices: ``{name: valid values}``.
            problems: messages of the subclass's own checks (arguments that constrain each other).
        """
        found = []
        def real(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for name, minimum in (integers or {}).items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                found.append(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name in fractions:
            value = getattr(self, name)
            if not (real(value) and 0.0 <= value < 1.0):
                found.append(f"{name} must be in [0, 1), got {value!r}")
        for name in positives:
            value = getattr(self, name)
            if not (real(value) and value > 0):
                found.append(f"{name} must be a finite number > 0, got {value!r}")
        for name in finites:
            value = getattr(self, name)
            if not real(value):
                found.append(f"{name} must be a finite number, got {value!r}")
        for name, valid in (choices or {}).items():
            value = getattr(self, name)
            if value not in valid:
                found.append(f"{name} must be {_one_of(valid)}, got {value!r}")
        found += problems
        if found:
            raise ValueError(f"invalid {type(self).__name__} arguments:\n  - " + "\n  - ".join(found))

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

    @property
    def tag(self) -> str:
        """A short name of the method and its defining sizes (``lora_r8``, ``boft_m2b8``, ``svft_banded_d2``): what
        ``{adapter}`` becomes in a config's run folders, and the method folder names that
        ``scripts/collect_results.py`` reads."""
        return type(self).__name__.lower()

    # -- hooks for subclasses ----------------------------------------------------------------------------------
    def check_layer(self, name: str, linear: nn.Linear, parts: Mapping[str, tuple[int, int]]) -> list[str]:
        """Problems (as messages naming ``name``) that prevent adapting this layer; empty if none."""
        return []

    def prepare(self, model: nn.Module, targets: Mapping[str, Mapping[str, tuple[int, int]]], *,
                svd_provider: SVDProvider | None = None) -> object:
        """Called once by :meth:`apply` after every check passed, before the layers are built. What it returns is
        handed to every :meth:`make_layer` call as ``shared``: the runtime objects the layers use (VeRA's shared
        random pair, SVFT's SVD provider). ``None`` by default."""
        return None

    def make_layer(self, name: str, linear: nn.Linear, parts: Mapping[str, tuple[int, int]],
                   shared: object = None) -> AdaptedLinear:
        """The adapted layer replacing ``linear`` (named ``name``); ``shared``: what :meth:`prepare` returned."""
        raise NotImplementedError

    def extra_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        """Tensors shared across layers that ``save_adapter`` writes beside the per-layer ones (none by default);
        read from ``model``'s adapted layers."""
        return {}

    def load_extra_tensors(self, model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
        """Restore what :meth:`extra_tensors` saved into ``model``'s adapted layers."""

    def trainable_module_names(self, model: nn.Module) -> list[str]:
        """The names of the modules of ``model`` that ``trainable_modules`` names (``ValueError`` if one is absent)."""
        return matching_module_names(model, self.trainable_modules)

    # -- the public entry point --------------------------------------------------------------------------------
    def apply(self, model: nn.Module, *, svd_provider: SVDProvider | None = None) -> nn.Module:
        """Adapt ``model`` in place and return it: base weights frozen, adapter tensors trainable.

        ``svd_provider``: where SVFT takes each weight's SVD from instead of computing it (e.g. an
        :class:`~lit_peft.callbacks.SVDCache`); other methods ignore it.
        """
        if any(isinstance(m, AdaptedLinear) for m in model.modules()):
            raise ValueError(f"{type(model).__name__} already has adapters; merge_adapters() or rebuild it first")
        targets = resolve_targets(model, self.target_modules, self.fused_qkv, exclude=self.trainable_modules)
        problems = []
        modules = dict(model.named_modules())
        for name, parts in targets.items():
            problems += self.check_layer(name, modules[name], parts)
            problem = parts_problem(name, modules[name], parts)
            problems += [problem] if problem else []
        trainable = self.trainable_module_names(model)
        if problems:
            raise ValueError(f"cannot apply {type(self).__name__}:\n  - " + "\n  - ".join(problems))
        shared = self.prepare(model, targets, svd_provider=svd_provider)
        for param in model.parameters():
            param.requires_grad_(False)
        for name, parts in targets.items():
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, self.make_layer(name, modules[name], parts, shared))
        for name in trainable:
            for param in model.get_submodule(name).parameters():
                param.requires_grad_(True)
        setattr(model, STRATEGY_ATTRIBUTE, self)
        return model


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
    # an adapter part's frozen tensors (SVFT's U, S, V) held as parameters for FSDP2 are not model parameters
    seen = {id(t) for m in model.modules() for name in getattr(m, "FROZEN_TENSORS", ())
            if isinstance(t := getattr(m, name, None), nn.Parameter)}
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = full_tensor(param).numel()
        total += n
        trainable += n if param.requires_grad else 0
    return {"adapter": adapter, "trainable": trainable, "total": total}
