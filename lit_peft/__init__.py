"""lit_peft: parameter-efficient fine-tuning (SVFT, BOFT/OFT, LoRA, DoRA, VeRA) of ViTs and LLMs on Lightning.

``lit_peft.adapters`` is plain PyTorch; ``lit_peft.modules``, ``lit_peft.data`` and ``lit_peft.callbacks`` are the
Lightning layer, and ``python -m lit_peft`` is the LightningCLI.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

# The callbacks live in the repository's top-level callbacks/ folder (the project layout); installs map it to
# lit_peft.callbacks (pyproject's package-dir). From a bare checkout, let this package find it there too.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "callbacks" / "__init__.py").is_file() and (_checkout / "pyproject.toml").is_file():
    __path__.append(str(_checkout))  # noqa: F821 - the package's own __path__
