"""Seeded stratified splits, and the JSON-lines files the data modules read."""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _allocate(size: int, available: Mapping[Any, int]) -> dict[Any, int]:
    """``size`` items spread over classes in proportion to ``available`` (largest remainders; ties to the class
    first in order), never more than a class has."""
    total = sum(available.values())
    if size > total:
        raise ValueError(f"a split of {size} items asked for, but only {total} are left")
    if total == 0:
        return {c: 0 for c in available}
    exact = {c: size * n / total for c, n in available.items()}
    quota = {c: int(np.floor(x)) for c, x in exact.items()}
    left = size - sum(quota.values())
    order = sorted(available, key=lambda c: (-(exact[c] - quota[c]), list(available).index(c)))
    for c in order:
        if left == 0:
            break
        if quota[c] < available[c]:
            quota[c] += 1
            left -= 1
    return quota


def stratified_split(
    labels: Sequence[Hashable],
    sizes: Mapping[str, int | float | None],
    seed: int,
    groups: Sequence[Hashable] | None = None,
) -> dict[str, list[int]]:
    """Split the indices ``0..len(labels)-1`` into named splits, each stratified by label.

    ``sizes``: split name → a count, a fraction of the whole (a float in (0, 1)), or ``None`` for all that is
    left (at most one, last). Within each class the items are drawn in a seeded random order; every split's
    indices come back in a seeded random order too (so "the first N" of a split is a random sample). With
    ``groups``, items of the same group (e.g. duplicate texts) always land in the same split: the split is drawn
    over groups (a group's label is that of its first item) and counts are counts of groups.
    The result depends on ``labels``, ``sizes``, ``seed`` and ``groups`` only.
    """
    labels = list(labels)
    if groups is not None:
        if len(groups) != len(labels):
            raise ValueError(f"{len(groups)} groups for {len(labels)} labels")
        members: dict[Hashable, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        keys = list(members)
        by_group = stratified_split([labels[members[k][0]] for k in keys], sizes, seed)
        rng = np.random.default_rng([seed, 1])
        out = {}
        for split, idx in by_group.items():
            flat = [i for gi in idx for i in members[keys[gi]]]
            out[split] = [flat[j] for j in rng.permutation(len(flat))]
        return out
    n = len(labels)
    if list(sizes.values()).count(None) > 1 or (None in sizes.values() and list(sizes.values())[-1] is not None):
        raise ValueError("at most one split may take the rest (size None), and it must be the last")
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels), key=lambda c: (str(type(c)), c))
    pools = {c: [int(i) for i in rng.permutation([i for i, y in enumerate(labels) if y == c])] for c in classes}
    taken = {c: 0 for c in classes}
    out: dict[str, list[int]] = {}
    for split, size in sizes.items():
        available = {c: len(pools[c]) - taken[c] for c in classes}
        if size is None:
            count = sum(available.values())
        elif isinstance(size, float):
            if not 0 < size < 1:
                raise ValueError(f"split {split!r}: a fraction must lie in (0, 1), got {size}")
            count = int(round(size * n))
        else:
            count = int(size)
        quota = _allocate(count, available)
        idx = []
        for c in classes:
            idx.extend(pools[c][taken[c]: taken[c] + quota[c]])
            taken[c] += quota[c]
        out[split] = [idx[j] for j in rng.permutation(len(idx))]
    return out


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Write ``records`` as JSON lines (UTF-8, not ASCII-escaped); returns the number written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def counts(labels: Sequence[Any], idx: Sequence[int]) -> dict[str, int]:
    """Label → count over ``idx`` (keys as strings, sorted)."""
    out: dict[str, int] = {}
    for i in idx:
        out[str(labels[i])] = out.get(str(labels[i]), 0) + 1
    return dict(sorted(out.items()))
