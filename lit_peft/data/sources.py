"""Where the data come from, and the file formats they come in.

Text: a hub name goes to ``datasets.load_dataset(name, config, split=split)``; a local file (``.json`` — a JSON
array or JSON lines —, ``.jsonl``, ``.parquet``, ``.csv``) is the whole split; a local folder holds one file per
split, ``<folder>/<split>.<ext>`` (:func:`load_split`).

Images: the prepared VTAB-1k list files (:func:`read_image_list`), torchvision's datasets
(:func:`vtab_torchvision`, :func:`fewshot_torchvision`), local ImageFolder copies (:func:`imagefolder`) and
RESISC45 from the Hugging Face hub (:func:`resisc45_split`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import ConcatDataset, Dataset

from .tasks import RESISC45_HUB_ID, VTAB_TORCHVISION_TASKS
from .transforms import _SubtractLabel

# --------------------------------------------------------------------------------------------------------------
# Text: local files and the hub
# --------------------------------------------------------------------------------------------------------------

#: Local file suffix → ``datasets`` packaged builder.
LOCAL_FORMATS: dict[str, str] = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def is_local(source: str) -> bool:
    """Whether ``source`` names a local file or folder (existing, a known data-file suffix, or an explicit path)
    rather than a dataset on the Hugging Face hub."""
    path = Path(source).expanduser()
    return (path.exists() or path.suffix.lower() in LOCAL_FORMATS
            or source.startswith(("/", "./", "../", "~", ".\\")))


def _describe(role: str, source: str, split: str | None) -> str:
    return f"{role} {source}" + (f" (split {split})" if split else "")


def load_split(
    source: str,
    split: str,
    *,
    role: str = "data",
    config: str | None = None,
    cache_dir: str | None = None,
    split_aliases: Sequence[str] = (),
) -> tuple[Any, str]:
    """One split as a ``datasets.Dataset``, and a description of where it came from (for error messages).

    * a local file (``.json``/``.jsonl``/``.parquet``/``.csv``): the whole file, whatever ``split`` says;
    * a local folder: the first of ``<folder>/<name>.<ext>`` for ``name`` in ``(split, *split_aliases)`` and
      ``ext`` in ``jsonl, json, parquet, csv``;
    * anything else: ``datasets.load_dataset(source, config, split=split, cache_dir=cache_dir)`` (the hub).

    ``role`` names the argument in errors (``train_data``, ``eval_data``, ...). A missing local path raises
    ``FileNotFoundError`` naming it; a hub dataset that cannot be loaded raises ``RuntimeError`` with the cause.
    """
    import datasets

    path = Path(source).expanduser()
    if is_local(source):
        if path.is_dir():
            names = (split, *split_aliases)
            for name in names:
                for suffix in LOCAL_FORMATS:
                    candidate = path / f"{name}{suffix}"
                    if candidate.is_file():
                        return _load_file(candidate, role, cache_dir), f"{role} {candidate}"
            present = sorted(p.name for p in path.iterdir() if p.suffix.lower() in LOCAL_FORMATS)
            wanted = ", ".join(f"{n}{s}" for n in names for s in (".jsonl", ".json", ".parquet", ".csv"))
            raise FileNotFoundError(
                f"{role} folder {path} has no file for split {split!r}: expected one of {wanted} "
                f"(data files present: {', '.join(present) or 'none'})"
            )
        if path.is_file():
            return _load_file(path, role, cache_dir), f"{role} {path}"
        kind = "file" if path.suffix.lower() in LOCAL_FORMATS else "file or folder"
        raise FileNotFoundError(
            f"{role} {kind} not found: {path} (expected a local .json/.jsonl/.parquet/.csv file or a folder of "
            "<split>.<ext> files; anything else is looked up on the Hugging Face hub)"
        )
    try:
        ds = datasets.load_dataset(source, config, split=split, cache_dir=cache_dir)
    except Exception as e:
        raise RuntimeError(
            f"could not load {role} {source!r} (config {config!r}, split {split!r}) with datasets.load_dataset: "
            f"{type(e).__name__}: {e}. No local file or folder {source!r} exists either; give a local "
            ".json/.jsonl/.parquet/.csv file or folder, or run once with internet access to fill the cache"
        ) from e
    return ds, _describe(role, source, split)


def _load_file(path: Path, role: str, cache_dir: str | None) -> Any:
    import datasets

    suffix = path.suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise ValueError(f"{role} {path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_FORMATS)}")
    try:
        return datasets.load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as e:
        raise ValueError(f"cannot read {role} {path} as {LOCAL_FORMATS[suffix]}: {type(e).__name__}: {e}") from e


def _require_fields(ds: Any, desc: str, fields: Mapping[str, str | None]) -> None:
    """``fields``: dataset field → the config argument that names it (``None``: not configurable)."""
    columns = list(ds.column_names)
    missing = [(f, arg) for f, arg in fields.items() if f not in columns]
    if not missing:
        return
    names = ", ".join(repr(f) for f, _ in missing)
    args = [f"data.init_args.{arg}" for _, arg in missing if arg]
    fix = f"; set {' / '.join(args)}" if args else ""
    raise KeyError(
        f"{desc} has no field{'s' if len(missing) > 1 else ''} {names} (fields: {', '.join(columns)}){fix}"
    )


def _column(ds: Any, field: str) -> list[Any]:
    return list(ds[field])


def _text(value: Any, desc: str, field: str, index: int, allow_none: bool = False) -> str:
    if value is None:
        if allow_none:
            return ""
        raise ValueError(f"{desc}: example {index} has no value (null) in field {field!r}")
    return value if isinstance(value, str) else str(value)


# --------------------------------------------------------------------------------------------------------------
# Images: list files, torchvision, ImageFolder, the hub
# --------------------------------------------------------------------------------------------------------------


def read_image_list(list_file: Path, num_classes: int | None = None) -> tuple[list[tuple[str, int]], list[int]]:
    """The ``(relative image path, label)`` samples of a list file (one ``<relative/image/path> <label>`` per
    line, the VTAB-1k list files), and the line number of each.

    Blank lines are skipped; paths may contain spaces (the label is the last field). A malformed line or a label
    out of ``[0, num_classes)`` raises ``ValueError`` naming the file and line.
    """
    samples: list[tuple[str, int]] = []
    line_numbers: list[int] = []
    with open(list_file, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise ValueError(
                    f"{list_file}:{lineno}: malformed line {line!r}; expected '<relative image path> <label>'"
                )
            rel, label_str = parts
            try:
                label = int(label_str)
            except ValueError:
                raise ValueError(
                    f"{list_file}:{lineno}: malformed line {line!r}; the label {label_str!r} is not an "
                    "integer (expected '<relative image path> <label>')"
                ) from None
            if label < 0 or (num_classes is not None and label >= num_classes):
                valid = f"[0, {num_classes})" if num_classes is not None else ">= 0"
                raise ValueError(
                    f"{list_file}:{lineno}: label {label} out of range; valid labels are {valid}"
                    + (f" for {num_classes} classes" if num_classes is not None else "")
                )
            samples.append((rel, label))
            line_numbers.append(lineno)
    return samples, line_numbers


def vtab_torchvision(task: str, root: str, kwargs: dict[str, Any], transform: Callable | None,
                     download: bool) -> Dataset:
    """One split (``kwargs``) of a VTAB task torchvision provides (:data:`VTAB_TORCHVISION_TASKS`), labels as VTAB
    numbers them; ``root`` is torchvision's dataset root."""
    import torchvision.datasets as tvd

    spec = VTAB_TORCHVISION_TASKS[task]
    cls = getattr(tvd, spec.cls_name, None)
    if cls is None:
        raise RuntimeError(
            f"this torchvision lacks datasets.{spec.cls_name} (needed for VTAB task {task!r}); upgrade "
            "torchvision or use source: folder"
        )
    target_tf = _SubtractLabel(spec.label_offset) if spec.label_offset else None
    try:
        return cls(root, transform=transform, target_transform=target_tf, download=download, **kwargs)
    except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found or corrupted ..."
        raise FileNotFoundError(
            f"torchvision {spec.cls_name} (VTAB task {task!r}, split {kwargs or 'all'}) could not be "
            f"loaded from {root}: {e}. Set download: true (data.init_args.download) to fetch it, "
            "point data_root at an existing copy, or use source: folder with the prepared VTAB-1k layout"
        ) from e


def imagefolder(folder: Path, transform: Callable | None, dataset: str, num_classes: int) -> Dataset:
    """``torchvision.datasets.ImageFolder`` of ``folder`` (``<folder>/<class>/<image>``), which must hold one class
    folder for each of the ``num_classes`` classes of ``dataset``."""
    from torchvision.datasets import ImageFolder

    try:
        ds = ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise FileNotFoundError(f"cannot read ImageFolder {folder}: {e}") from e
    if len(ds.classes) != num_classes:
        raise ValueError(
            f"{folder} has {len(ds.classes)} class folders, but {dataset} has {num_classes} classes; "
            f"expected {folder}/<class>/<image> with one folder per class"
        )
    return ds


def fewshot_torchvision(dataset: str, root: str, split: str, transform: Callable | None, download: bool,
                        local_dir: Path) -> Dataset:
    """The ``train`` or ``test`` split of a few-shot dataset torchvision provides (``cifar100``, ``food101``,
    ``flowers102``: its train and val splits pooled for ``train``); ``local_dir`` is named in errors as the
    alternative."""
    import torchvision.datasets as tvd

    try:
        if dataset == "cifar100":
            return tvd.CIFAR100(root, train=split == "train", transform=transform, download=download)
        if dataset == "food101":
            return tvd.Food101(root, split=split, transform=transform, download=download)
        if dataset == "flowers102":
            if split == "train":
                return ConcatDataset(
                    [tvd.Flowers102(root, split=s, transform=transform, download=download)
                     for s in ("train", "val")]
                )
            return tvd.Flowers102(root, split="test", transform=transform, download=download)
    except (RuntimeError, OSError) as e:
        raise FileNotFoundError(
            f"{dataset} ({split} split) not found under {root}: {e}. Set download: true "
            f"(data.init_args.download) to fetch it with torchvision, or provide a local ImageFolder copy at "
            f"{local_dir}/{{train,test}}/<class>/<image>"
        ) from e
    raise AssertionError(dataset)  # pragma: no cover


def resisc45_split(split: str, cache_dir: str, local_dir: Path) -> Any:
    """RESISC45's ``split`` from the hub (:data:`RESISC45_HUB_ID`, a ``datasets.Dataset``), read from the
    ``datasets`` cache in ``cache_dir`` when present, else downloaded; ``local_dir`` is named in errors as the
    alternative."""
    try:
        from datasets import load_dataset

        return load_dataset(RESISC45_HUB_ID, split=split, cache_dir=cache_dir)
    except Exception as e:
        raise FileNotFoundError(
            f"could not load {RESISC45_HUB_ID} ({split} split, cache_dir={cache_dir}): {e}. Run once with "
            f"internet access (download: true) to fill the cache, or provide a local ImageFolder copy at "
            f"{local_dir}/{{train,test}}/<class>/<image>"
        ) from e
