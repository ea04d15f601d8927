"""Export a lit_peft adapter as a Hugging Face ``peft`` adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``), so ``peft.PeftModel.from_pretrained(base, folder)`` loads it and computes the same
function.

Tensor mapping, lit_peft → peft (keys ``base_model.model.<layer>.<tensor>``; the correspondences are the ones
``tests/test_peft_oracle.py`` checks against peft itself):

* LoRA: ``lora_A (r, in)`` → ``lora_A.weight``; ``lora_B (out, r)`` → ``lora_B.weight``; ``lora_alpha = alpha``
  (peft's ``scaling = lora_alpha / r`` with ``use_rslora=False``).
* DoRA: as LoRA with ``use_dora=True``, plus ``magnitude (out,)`` → ``lora_magnitude_vector``.
* BOFT: our ``Q = (I + A)(I − A)⁻¹`` with ``A`` from the free entries ``skew``; peft's ``Q = (I − S)(I + S)⁻¹`` with
  ``S = ½(boft_R − boft_Rᵀ)``; so ``boft_R = −A`` (skew-symmetric, hence ``S = −A``), shape ``(m, in/b, b, b)``.
  Factors and blocks are indexed alike (peft's butterfly permutations pair the same half-blocks as ours).
  ``scale (out,)`` → ``boft_s (out, 1)`` (ones when ``scale=False``); a trained bias (``train_bias``) →
  ``base_layer.bias`` with ``bias="boft_only"``. peft computes ``m > 1`` only through its CUDA extension
  ``fbd_cuda``; without it peft silently drops to one factor and then refuses the file's ``(m, …)`` tensors, so
  loading a multi-factor export needs a machine where peft's extension builds.
* OFT (our ``OFT`` with ``scale=False``): peft's OFT (>= 0.15 parametrisation) with ``r=0``,
  ``oft_block_size=b``, ``use_cayley_neumann=False``, ``coft=False``, ``block_share=False``:
  ``oft_R.weight (in/b, b(b−1)/2) = −skew``. peft's OFT has no output scale, so an OFT trained with ``scale=True``
  is exported as a one-factor peft BOFT (same function).
* VeRA: ``lambda_d (r,)`` → ``vera_lambda_d``, ``lambda_b (out,)`` → ``vera_lambda_b``; the shared pair is written
  (``save_projection=True``) as ``base_model.vera_A (r, max_in)`` / ``base_model.vera_B (max_out, r)``, so peft
  does not regenerate it.
* ``trainable_modules`` (a classification head) → ``modules_to_save`` with their tensors under
  ``base_model.model.<module>.<tensor>``.

Not exportable (a clear ``ValueError``): SVFT (peft has no SVFT; use :func:`lit_peft.adapters.save_adapter`), and
parts of a fused ``qkv`` (peft adapts whole ``nn.Linear`` layers; ``fused_qkv="joint"`` is exportable).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..files import atomic_write_folder
from .base import get_strategy
from .boft import BOFT, OFT, BOFTLinear, skew_symmetric
from .io import adapter_state_dict
from .lora import DoRA, DoRALinear, LoRA, LoRALinear
from .svft import SVFT
from .targets import ALL
from .vera import VeRA, VeRALinear

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."


def _require_peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - peft is a test dependency
        raise ImportError("exporting a peft adapter needs the peft package (pip install peft)") from err
    return peft


def peft_export_problem(model: nn.Module) -> str | None:
    """Why ``model``'s adapter cannot be exported to peft, or ``None`` when it can."""
    try:
        _check_exportable(model)
    except (ValueError, ImportError) as err:
        return str(err)
    return None


def _check_exportable(model: nn.Module):
    strategy = get_strategy(model)
    if isinstance(strategy, SVFT):
        raise ValueError("peft has no SVFT; use lit_peft.adapters.save_adapter (and load_adapter) for SVFT adapters")
    if not isinstance(strategy, (LoRA, BOFT, VeRA)):
        raise ValueError(f"{type(strategy).__name__} has no peft counterpart that lit_peft can export; use "
                         f"lit_peft.adapters.save_adapter")
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, (LoRALinear, BOFTLinear, VeRALinear))}
    if not layers:
        raise ValueError("the model has no adapted layers to export")
    for name, layer in layers.items():
        if list(layer.parts) != [ALL]:
            raise ValueError(f"layer {name!r} is adapted as parts {list(layer.parts)} of a fused qkv linear; peft "
                             f"adapts whole nn.Linear layers only (adapt it with fused_qkv='joint' to export, or "
                             f"use lit_peft.adapters.save_adapter)")
    peft = _require_peft()
    if isinstance(strategy, OFT) and not strategy.scale:
        fields = getattr(peft.OFTConfig, "__dataclass_fields__", {})
        if "oft_block_size" not in fields or "use_cayley_neumann" not in fields:
            raise ValueError("this peft version has the pre-0.15 OFT parametrisation, which lit_peft does not "
                             "export; upgrade peft (>= 0.15)")
    return strategy, layers


def peft_target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """peft ``target_modules`` naming exactly ``names``: the leaf names when every module whose dotted name ends
    with such a leaf is one of ``names`` (``["q_proj", "v_proj"]``), else the full dotted names."""
    chosen = set(names)
    leaves = sorted({n.rpartition(".")[2] for n in names})
    all_names = [n for n, _ in model.named_modules() if n]
    for leaf in leaves:
        matching = {n for n in all_names if n == leaf or n.endswith("." + leaf)}
        if not matching <= chosen:
            return sorted(chosen)
    return leaves


#: ``get(leaf)``: the whole tensor ``<layer>.adapters.all.<leaf>`` of one layer (``None`` when it has none)
Getter = Callable[[str], Tensor | None]


def _lora_tensors(name: str, layer: LoRALinear, get: Getter) -> dict[str, Tensor]:
    out = {f"{PREFIX}{name}.lora_A.weight": get("lora_A"), f"{PREFIX}{name}.lora_B.weight": get("lora_B")}
    if isinstance(layer, DoRALinear):
        out[f"{PREFIX}{name}.lora_magnitude_vector"] = get("magnitude")
    return out


def _boft_tensors(name: str, layer: BOFTLinear, bias_key: str, get: Getter) -> dict[str, Tensor]:
    A = skew_symmetric(get("skew"), layer.block_size)
    scale = get("scale")
    if scale is None:
        scale = torch.ones(layer.out_features, dtype=A.dtype, device=A.device)
    out = {f"{PREFIX}{name}.boft_R": -A, f"{PREFIX}{name}.boft_s": scale[:, None]}
    if get("bias") is not None:
        out[f"{PREFIX}{name}.{bias_key}"] = get("bias")
    return out


def _oft_tensors(name: str, bias_key: str, get: Getter) -> dict[str, Tensor]:
    out = {f"{PREFIX}{name}.oft_R.weight": -get("skew")[0]}
    if get("bias") is not None:
        out[f"{PREFIX}{name}.{bias_key}"] = get("bias")
    return out


def _vera_tensors(name: str, get: Getter) -> dict[str, Tensor]:
    return {f"{PREFIX}{name}.vera_lambda_b": get("lambda_b"), f"{PREFIX}{name}.vera_lambda_d": get("lambda_d")}


def export_peft_adapter(model: nn.Module, folder: str | os.PathLike, base_model_name_or_path: str | None = None,
                        task_type: str | None = None, tensors: Mapping[str, Tensor] | None = None) -> Path:
    """Write ``model``'s adapter (applied by a lit_peft strategy) as a peft adapter folder; returns the folder.

    Args:
        model: the adapted model (the backbone itself, e.g. ``LlamaForCausalLM``, not a LightningModule).
        folder: output folder; written under a temporary name beside it and renamed into place (an existing
            folder is replaced).
        base_model_name_or_path: recorded in ``adapter_config.json`` (what ``AutoPeftModel…`` loads as the base).
        task_type: peft's task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, …); ``None`` for a plain ``PeftModel``.
        tensors: ``model``'s :func:`~lit_peft.adapters.adapter_state_dict`, when already gathered; with it the
            export reads no tensor from ``model``, so one rank of an FSDP2-sharded run can call it alone (gathering
            the shards is a collective). ``None``: taken from ``model`` (every rank must call then, if sharded).

    Raises ``ValueError`` for SVFT, fused-qkv parts and other unexportable set-ups (see the module docstring).
    """
    peft = _require_peft()
    strategy, layers = _check_exportable(model)
    state = adapter_state_dict(model) if tensors is None else tensors
    names = list(layers)
    targets = peft_target_modules(model, names)
    head = strategy.trainable_module_names(model)
    modules_to_save = head or None
    common = {"target_modules": targets, "modules_to_save": modules_to_save, "task_type": task_type,
              "base_model_name_or_path": base_model_name_or_path}
    out: dict[str, Tensor] = {}

    def getter(name: str) -> Getter:
        return lambda leaf: state.get(f"{name}.adapters.{ALL}.{leaf}")

    if isinstance(strategy, LoRA):
        config = peft.LoraConfig(r=strategy.rank, lora_alpha=strategy.alpha, lora_dropout=strategy.dropout,
                                 use_dora=isinstance(strategy, DoRA), use_rslora=False, bias="none", **common)
        for name, layer in layers.items():
            out.update(_lora_tensors(name, layer, getter(name)))
    elif isinstance(strategy, OFT) and not strategy.scale:
        bias = "oft_only" if strategy.train_bias else "none"
        config = peft.OFTConfig(r=0, oft_block_size=strategy.block_size, module_dropout=strategy.dropout,
                                coft=False, block_share=False, use_cayley_neumann=False, bias=bias, **common)
        for name in layers:
            out.update(_oft_tensors(name, "base_layer.bias", getter(name)))
    elif isinstance(strategy, BOFT):
        bias = "boft_only" if strategy.train_bias else "none"
        config = peft.BOFTConfig(boft_block_size=strategy.block_size, boft_block_num=0,
                                 boft_n_butterfly_factor=strategy.n_butterfly_factors, boft_dropout=strategy.dropout,
                                 bias=bias, **common)
        for name, layer in layers.items():
            out.update(_boft_tensors(name, layer, "base_layer.bias", getter(name)))
    else:  # VeRA: _check_exportable refused every other strategy
        config = peft.VeraConfig(r=strategy.rank, projection_prng_key=strategy.seed, save_projection=True,
                                 vera_dropout=strategy.dropout, d_initial=strategy.d_init, bias="none", **common)
        for name in layers:
            out.update(_vera_tensors(name, getter(name)))
        out["base_model.vera_A"] = state["vera_projections.A"]
        out["base_model.vera_B"] = state["vera_projections.B"]
    for module_name in head:
        for key in model.get_submodule(module_name).state_dict(keep_vars=True):
            out[f"{PREFIX}{module_name}.{key}"] = state[f"{module_name}.{key}"]
    out = {k: v.detach().cpu().contiguous() for k, v in out.items()}


    def write(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        save_file(out, str(tmp / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})

    return atomic_write_folder(folder, write)


__all__ = ["export_peft_adapter", "peft_export_problem", "peft_target_modules"]
