"""Saving, loading and merging adapters.

An adapter folder holds two files:

* ``adapter.safetensors``: every adapter tensor (``<layer>.adapters.<part>.<name>``: trainable tensors and
  persistent buffers such as SVFT's support), the ``trainable_modules`` (e.g. ``head.weight``) and the strategy's
  shared tensors (VeRA's random pair);
* ``adapter_config.json``: the strategy's class path and constructor arguments, and the shape and parts of every
  adapted layer, so ``load_adapter`` can rebuild the same adapters on a fresh base model and refuse a base model
  whose shapes differ before doing any work.

Both are written to a temporary name and renamed into place (:func:`lit_peft.files.atomic_write`), the tensors
first and the config last: the config is the folder's manifest. A SHA-256 digest of the tensors (names, dtypes,
shapes, bytes) is stored in both files and checked on load, so flipped bits in the tensor data, or tensors left
beside another save's config by an interrupted save, are refused rather than loaded (folders of format version 1,
which have no digest, load unchecked). Tensors holding NaN or infinite values are refused when saving and
merging unless ``allow_nonfinite=True``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..files import atomic_write
from ..distributed import full_tensor, is_sharded
from .base import AdapterStrategy, adapted_layers, count_parameters, detach_strategy, get_strategy, unwrapped_name
from .quantized import QuantizedLinear
from .targets import resolve_targets

if TYPE_CHECKING:
    from .svft import SVDProvider

FORMAT = "lit_peft.adapter"
FORMAT_VERSION = 2  # 2: tensors_sha256 in the config and sha256 in the tensors file's metadata
TENSORS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor an adapter file holds, keyed by its name in ``model.state_dict()`` (DTensors gathered)."""
    strategy = get_strategy(model)
    state = {}
    for name, layer in adapted_layers(model).items():
        for key, tensor in layer.adapters.state_dict(keep_vars=True).items():
            state[f"{name}.adapters.{key}"] = tensor
    for name in strategy.trainable_module_names(model):
        for key, tensor in model.get_submodule(name).state_dict(keep_vars=True).items():
            state[f"{name}.{key}"] = tensor
    state.update(strategy.extra_tensors(model))
    return {k: full_tensor(v.detach()).contiguous() for k, v in state.items()}


def adapter_config(model: nn.Module) -> dict:
    strategy = get_strategy(model)
    cls = type(strategy)
    layers = {name: {"in_features": layer.in_features, "out_features": layer.out_features,
                     "parts": {p: list(rows) for p, rows in layer.parts.items()}}
              for name, layer in adapted_layers(model).items()}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "strategy": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": strategy.init_args(), "layers": layers,
            "parameter_count": count_parameters(model)["adapter"]}


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 (hex) over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def nonfinite_tensors(tensors: Mapping[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _refuse_nonfinite(tensors: Mapping[str, Tensor], what: str) -> None:
    bad = nonfinite_tensors(tensors)
    if bad:
        raise ValueError(f"refusing to {what}: {len(bad)} adapter tensor(s) hold NaN or infinite values "
                         f"({', '.join(bad[:5])}{', …' if len(bad) > 5 else ''}), i.e. the training diverged; "
                         f"pass allow_nonfinite=True to do it anyway")


def save_adapter(model: nn.Module, path: str | os.PathLike, *, allow_nonfinite: bool = False) -> Path:
    """Write ``adapter.safetensors`` and ``adapter_config.json`` into the folder ``path``; returns the folder.

    Refuses tensors holding NaN or infinities unless ``allow_nonfinite``. With FSDP2-sharded parameters,
    gathering them is a collective: every rank must call this (or call :func:`adapter_state_dict` and
    :func:`adapter_config` on every rank and :func:`write_adapter` on one)."""
    return write_adapter(path, adapter_config(model), adapter_state_dict(model), allow_nonfinite=allow_nonfinite)


def write_adapter(path: str | os.PathLike, config: dict, tensors: Mapping[str, Tensor], *,
                  allow_nonfinite: bool = False) -> Path:
    """Write an adapter folder from an :func:`adapter_config` and an :func:`adapter_state_dict` (no collectives):
    the tensors, then the config (the manifest), both carrying the tensors' :func:`tensor_digest`."""
    folder = Path(path)
    tensors = {k: v.cpu() for k, v in tensors.items()}
    if not allow_nonfinite:
        _refuse_nonfinite(tensors, f"write the adapter {folder}")
    digest = tensor_digest(tensors)
    config = {**config, "format_version": FORMAT_VERSION, "tensors_sha256": digest}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / TENSORS_FILE,
                 lambda p: save_file(tensors, str(p), metadata={"format": FORMAT, "sha256": digest}))
    atomic_write(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return folder


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The parsed, validated ``adapter_config.json`` of an adapter folder (clear errors for anything else)."""
    folder = Path(path)
    config_file = folder / CONFIG_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist (expected {CONFIG_FILE} and {TENSORS_FILE})")
    for needed in (config_file, folder / TENSORS_FILE):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} is missing: {folder} is not a lit_peft adapter folder")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}); the adapter folder is corrupt") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{config_file} is not a lit_peft adapter config (no \"format\": \"{FORMAT}\"); "
                         f"for a Hugging Face peft adapter use peft.PeftModel.from_pretrained")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{config_file} has format_version {config['format_version']}, newer than this lit_peft "
                         f"reads ({FORMAT_VERSION}); upgrade lit_peft")
    missing = [k for k in ("strategy", "init_args", "layers") if k not in config]
    if missing:
        raise ValueError(f"{config_file} lacks the keys {missing}; the adapter folder is corrupt")
    return config


def strategy_from_config(config: Mapping) -> AdapterStrategy:
    module_name, _, class_name = config["strategy"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"adapter strategy {config['strategy']!r} cannot be imported: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, AdapterStrategy)):
        raise ValueError(f"{config['strategy']!r} is not an AdapterStrategy subclass")
    return cls(**config["init_args"])


def _read_tensors(file: Path, expected_digest: str | None = None) -> dict[str, Tensor]:
    """The tensors of ``file``, verified against the digest in its metadata (bit flips) and ``expected_digest``
    (the config's: tensors and config written by the same save)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"{file} was not written by lit_peft.save_adapter (no format metadata)")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file} is not a readable safetensors file ({err}); the adapter folder is corrupt") from err
    stored = metadata.get("sha256")
    if stored is not None or expected_digest is not None:
        actual = tensor_digest(tensors)
        if stored is not None and actual != stored:
            raise ValueError(f"{file}: the tensor data does not match the checksum written with it (sha256 "
                             f"{actual[:12]}… ≠ {stored[:12]}…): the file was damaged after it was saved; "
                             f"restore it from a copy or save the adapter again")
        if expected_digest is not None and actual != expected_digest:
            raise ValueError(f"{file} does not belong to the {CONFIG_FILE} beside it (tensors sha256 "
                             f"{actual[:12]}…, the config expects {expected_digest[:12]}…): they come from different "
                             f"saves, e.g. an interrupted one; save the adapter again")
    return tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, *,
                 svd_provider: SVDProvider | None = None) -> nn.Module:
    """Rebuild the saved adapters on ``model`` (a freshly built base model) and load their tensors.

    Layer shapes, parts and head tensors are checked against the file before any work; if the rebuilt adapters
    then do not fit the file's tensors, the model is put back as it was before the error is raised.
    ``svd_provider``: passed to ``strategy.apply`` (where SVFT takes its SVDs from, e.g. an ``SVDCache``).
    Returns ``model``.
    """
    folder = Path(path)
    config = read_adapter_config(folder)
    strategy = strategy_from_config(config)
    on_meta = sorted({n.rsplit(".", 1)[0] for n, t in model.state_dict().items() if t.device.type == "meta"})
    if on_meta:
        raise ValueError(f"cannot load adapter {folder} onto a model on the meta device ({len(on_meta)} module(s), "
                         f"e.g. {on_meta[0]}): the saved values would be dropped. Materialise the model and load its "
                         f"weights first (e.g. model.to_empty(device='cpu') and load_state_dict), then load_adapter")
    tensors = _read_tensors(folder / TENSORS_FILE, config.get("tensors_sha256"))

    modules = dict(model.named_modules())
    problems = []
    for name, saved in config["layers"].items():
        module = modules.get(name)
        if module is None:
            problems.append(f"{name}: saved layer not found in {type(model).__name__}")
        elif not isinstance(module, nn.Linear):
            problems.append(f"{name}: is a {type(module).__name__} here, the adapter was saved on an nn.Linear")
        elif (module.out_features, module.in_features) != (saved["out_features"], saved["in_features"]):
            problems.append(f"{name}: weight shape here ({module.out_features}, {module.in_features}), saved "
                            f"({saved['out_features']}, {saved['in_features']})")
    if not problems:
        targets = resolve_targets(model, strategy.target_modules, strategy.fused_qkv, strategy.trainable_modules)
        expected = {name: {p: list(rows) for p, rows in parts.items()} for name, parts in targets.items()}
        saved_parts = {name: saved["parts"] for name, saved in config["layers"].items()}
        if expected != saved_parts:
            differing = sorted(n for n in {*expected, *saved_parts} if expected.get(n) != saved_parts.get(n))
            problems.append(f"the adapter's targets resolve to other layers or parts on this model: {differing[:5]}")
        for name in strategy.trainable_module_names(model):
            for key, tensor in model.get_submodule(name).state_dict().items():
                saved_tensor = tensors.get(f"{name}.{key}")
                if saved_tensor is None:
                    problems.append(f"{name}.{key}: missing from {folder / TENSORS_FILE}")
                elif saved_tensor.shape != full_tensor(tensor).shape:
                    problems.append(f"{name}.{key}: shape here {tuple(full_tensor(tensor).shape)}, saved "
                                    f"{tuple(saved_tensor.shape)}")
        layer_keys = {k.split(".adapters.")[0] for k in tensors if ".adapters." in k}
        missing_layers = sorted(set(config["layers"]) - layer_keys)
        if missing_layers:
            problems.append(f"{folder / TENSORS_FILE} has no tensors for {missing_layers[:5]}; the file is corrupt")
    if problems:
        raise ValueError(f"cannot load adapter {folder} onto {type(model).__name__}:\n  - " + "\n  - ".join(problems))

    with _restored_on_error(model):
        strategy.apply(model, svd_provider=svd_provider)
        expected_state = adapter_state_dict(model)
        missing = sorted(set(expected_state) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected_state))
        mismatched = [f"{k}: here {tuple(v.shape)}, saved {tuple(tensors[k].shape)}"
                      for k, v in expected_state.items() if k in tensors and tensors[k].shape != v.shape]
        if missing or unexpected or mismatched:
            raise ValueError(f"adapter file {folder / TENSORS_FILE} does not fit the rebuilt adapters: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {mismatched[:5]}")
        extra_keys = set(strategy.extra_tensors(model))
        with torch.no_grad():
            model.load_state_dict({k: v for k, v in tensors.items() if k not in extra_keys}, strict=False)
            strategy.load_extra_tensors(model, {k: tensors[k] for k in extra_keys})
    return model


@contextmanager
def _restored_on_error(model: nn.Module):
    """Undo ``strategy.apply`` (original layers back, ``requires_grad`` flags as they were) if the block raises."""
    modules = dict(model.named_modules())
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for name in adapted_layers(model):
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, modules[name])
        for param, flag in flags:
            param.requires_grad_(flag)
        detach_strategy(model)
        raise


@torch.no_grad()
def merged_state_dict(model: nn.Module, *, keep: bool = True) -> dict[str, Tensor]:
    """The state dict of the merged model, on the CPU, without modifying ``model``: the keys of the plain base
    model, with every adapted layer's ``weight``/``bias`` replaced by its merged values.

    One tensor (one merged layer) at a time is gathered or merged on the model's device and moved to the CPU, so
    device memory peaks at one layer and host memory at one copy of the merged model (tied weights are gathered
    once and shared). The caller says whether this process keeps the result: with ``keep=False`` it returns ``{}``,
    at once when the model is not sharded, after taking part in every all-gather when it is (FSDP2 DTensors: every
    rank must call this, and each gathered tensor is dropped at once). Under ``torch.distributed`` pass
    ``keep=lit_peft.distributed.is_global_zero()`` so that one process holds the merged copy."""
    state = model.state_dict(keep_vars=True)  # keep_vars: tied weights stay one object, so they are gathered once
    if not keep and not any(is_sharded(t) for t in state.values()):
        return {}
    layers = adapted_layers(model)
    merged: dict[str, Tensor] = {}
    for name, layer in layers.items():
        linear = layer.merged_linear()  # gathers the layer's shards (collective)
        if keep:
            merged[f"{name}.weight"] = linear.weight.detach().cpu()
            if linear.bias is not None:
                merged[f"{name}.bias"] = linear.bias.detach().cpu()
        del linear
    # the frozen layers of a quantized base that no adapter wraps: dequantized into plain weights
    quantized = {unwrapped_name(n): m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for name, linear in quantized.items():
        if keep:
            merged[f"{name}.weight"] = linear.weight.dequantize().detach().cpu()
    prefixes = tuple(f"{name}." for name in layers) + tuple(f"{name}.weight." for name in quantized)
    gathered: dict[int, Tensor | None] = {}
    for key, tensor in state.items():
        if key.startswith(prefixes):
            continue
        if id(tensor) not in gathered:
            whole = full_tensor(tensor.detach())
            gathered[id(tensor)] = whole.cpu() if keep else None
            del whole
        if keep:
            merged[key] = gathered[id(tensor)]
    return merged


def merge_adapters(model: nn.Module, *, allow_nonfinite: bool = False) -> nn.Module:
    """Fold every adapter into its layer: each adapted layer becomes a plain ``nn.Linear`` with the same output
    (in eval mode). In place, returns ``model``; a model without adapters is returned unchanged. Adapters holding
    NaN or infinite values are refused (before anything changes) unless ``allow_nonfinite``."""
    layers = adapted_layers(model)
    for layer in layers.values():
        layer._check_initialised()
    if not allow_nonfinite:
        _refuse_nonfinite({f"{name}.adapters.{key}": full_tensor(t.detach())
                           for name, layer in layers.items() for key, t in layer.adapters.state_dict().items()},
                          "merge the adapters")
    for name, layer in layers.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, layer.merged_linear())
    detach_strategy(model)
    return model


__all__ = ["save_adapter", "write_adapter", "load_adapter", "merge_adapters", "merged_state_dict", "adapter_state_dict",
           "adapter_config", "read_adapter_config", "tensor_digest", "nonfinite_tensors"]
