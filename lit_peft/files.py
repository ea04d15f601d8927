"""File-system helpers: write a file or a folder under a temporary name beside it, then rename it into place, so a
reader never sees half a file and a failed write leaves the previous version (and no temporary) behind.

>>> atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))      # doctest: +SKIP
>>> atomic_write_text(path, "text\\n")                                # doctest: +SKIP
>>> atomic_write_folder(folder, lambda tmp: model.save_pretrained(tmp))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def _temporary(path: Path) -> Path:
    """A name beside ``path`` (same folder, hence same file system: ``os.replace`` is a rename) for this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` writes the file ``tmp`` (a temporary name beside ``path``), which is then renamed onto
    ``path``. The folder of ``path`` must exist. If ``write`` raises, ``path`` is untouched and ``tmp`` removed."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """:func:`atomic_write` of ``text``; missing parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def atomic_write_folder(folder: str | os.PathLike, write: Callable[[Path], object], *, merge: bool = False) -> Path:
    """``write(tmp)`` fills ``tmp``, a fresh empty folder beside ``folder``; then ``folder`` is replaced by it.

    With ``merge=True`` each entry of ``tmp`` is renamed into ``folder`` instead (an entry of the same name is
    replaced, other entries of ``folder`` are kept): for writing several files into a folder that holds others.
    Missing parent folders are created; ``tmp`` is removed whatever happens. Returns ``folder``.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if merge:
            folder.mkdir(exist_ok=True)
            for item in sorted(tmp.iterdir()):
                _replace(item, folder / item.name)
        else:
            _replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _replace(source: Path, target: Path) -> None:
    """Rename ``source`` onto ``target``; an existing folder ``target`` (``os.replace`` cannot) is removed first."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    os.replace(source, target)


__all__ = ["atomic_write", "atomic_write_text", "atomic_write_folder"]
