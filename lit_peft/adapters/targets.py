"""Which ``nn.Linear`` layers of a model a strategy adapts, and which *parts* (row ranges) of each.

``target_modules`` is a list of names, a full-match regular expression or ``"all-linear"``; a fused ``qkv`` linear
(timm) has the parts ``q``, ``k``, ``v`` under ``fused_qkv="split"`` (see :mod:`lit_peft.adapters.base`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence

from torch import nn

ALL = "all"
QKV_PARTS = ("q", "k", "v")
FUSED_QKV_NAMES = ("qkv",)
FUSED_QKV_MODES = ("split", "joint")

TargetSpec = str | Sequence[str]


def row_blocks(parts: Mapping[str, tuple[int, int]], out: int) -> Iterator[tuple[str | None, int, int]]:
    """``(part or None, start, stop)`` covering rows ``0..out`` in order, from ``parts`` (``{part: (start, stop)}``);
    ``None`` marks the frozen rows between and after them."""
    row = 0
    for name, (start, stop) in sorted(parts.items(), key=lambda kv: kv[1][0]):
        if start > row:
            yield None, row, start
        yield name, start, stop
        row = stop
    if row < out:
        yield None, row, out


def part_label(name: str, part: str) -> str:
    """How one part of the layer ``name`` is named in messages and SVD look-ups: ``"blocks.0.attn.qkv.q"``, or the
    layer's own name for its single part ``"all"``."""
    return name if part == ALL else f"{name}.{part}"


def _is_fused_qkv(name: str, module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and name.rpartition(".")[2] in FUSED_QKV_NAMES
            and module.out_features % 3 == 0)


def name_matches(entry: str, name: str) -> bool:
    """Whether the dotted module name ``name`` is ``entry`` or ends with ``"." + entry``."""
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
    if fused_qkv not in FUSED_QKV_MODES:
        raise ValueError(f"fused_qkv must be 'split' or 'joint', got {fused_qkv!r}")
    modules = dict(model.named_modules())
    excluded = {name for name in modules for e in exclude if name_matches(e, name)}
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
            hits = add_matches(entry, [n for n in candidates if name_matches(entry, n)], exact=[entry])
            for name in candidates:
                if not _is_fused_qkv(name, modules[name]):
                    continue
                for p in QKV_PARTS:
                    if name_matches(entry, f"{name}.{p}"):
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


def matching_module_names(model: nn.Module, entries: Sequence[str]) -> list[str]:
    """Names of the modules that ``entries`` name (:func:`name_matches`); ``ValueError`` for an entry naming none."""
    names, missing = [], []
    all_names = [n for n, _ in model.named_modules() if n]
    for entry in entries:
        hits = [n for n in all_names if name_matches(entry, n)]
        if not hits:
            missing.append(entry)
        names += hits
    if missing:
        top = ", ".join(n for n in all_names if "." not in n)
        raise ValueError(f"trainable_modules {missing} match no module; top-level modules are: {top}")
    return names


__all__ = ["ALL", "TargetSpec", "head_modules", "matching_module_names", "name_matches", "part_label",
           "resolve_targets"]
