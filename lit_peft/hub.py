"""Fail in seconds, with what to do, when a model must come from the Hugging Face hub and cannot.

``from_pretrained`` / ``timm.create_model(pretrained=True)`` on a machine without the hub retry for about a minute
and end in a long traceback that names neither the local alternatives nor ``HF_HUB_OFFLINE``. The modules call
:func:`check_model_source` first: a local path that does not exist is reported as such (not as a malformed repo id),
and a hub id that is neither in the local cache nor reachable (a 3-second connection test) is refused at once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

_TRUE = {"1", "true", "yes", "on"}


def looks_local(name: str) -> bool:
    """A path rather than a hub id: absolute, ``~``/``.``-relative, more than one ``/``, or an existing path."""
    return (os.path.isabs(name) or name.startswith(("~", "./", "../", ".\\")) or name.count("/") > 1
            or os.path.exists(os.path.expanduser(name)))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint (``HF_ENDPOINT`` or huggingface.co) opens within ``timeout``."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def cached(repo_id: str, filenames: Sequence[str]) -> bool:
    """Whether one of ``filenames`` of ``repo_id`` is in the local hub cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers and timm
        return False
    for filename in filenames:
        try:
            if isinstance(try_to_load_from_cache(repo_id, filename), str):
                return True
        except Exception:  # a malformed id: let from_pretrained report it
            return True
    return False


def check_model_source(name: str, *, argument: str, filenames: Sequence[str] = ("config.json",),
                       local_file: str = "config.json", instead: str = "") -> None:
    """Raise before any loading if ``name`` (the value of ``argument``) cannot be loaded here.

    ``filenames``: the hub files whose presence in the cache means the model is available offline; ``local_file``:
    what a local folder must hold (``""``: anything); ``instead``: the local alternative to suggest.
    """
    hint = f" {instead}" if instead else ""
    if looks_local(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{argument}: {name} does not exist (a local model folder was expected; a hub id "
                                    f"looks like 'org/name').{hint}")
        if local_file and path.is_dir() and not (path / local_file).is_file():
            present = sorted(p.name for p in path.iterdir())[:8]
            raise FileNotFoundError(f"{argument}: the folder {name} has no {local_file}, so it is not a saved model "
                                    f"(it holds: {', '.join(present) or 'nothing'}).{hint}")
        return
    if cached(name, filenames):
        return
    if hub_offline():
        raise OSError(f"{argument}: {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so it "
                      f"cannot be fetched.{hint} Or run once with the hub reachable to fill the cache.")
    if not hub_reachable():
        raise OSError(f"{argument}: {name!r} is not in the local Hugging Face cache and the hub "
                      f"({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) cannot be reached from this "
                      f"machine.{hint} Set HF_HUB_OFFLINE=1 once the cache holds it, or run where the hub is "
                      f"reachable to fill the cache.")


__all__ = ["check_model_source", "hub_reachable", "hub_offline", "looks_local"]
