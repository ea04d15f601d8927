"""lit_peft: parameter-efficient fine-tuning (SVFT, BOFT/OFT, LoRA, DoRA, VeRA) of ViTs and LLMs on Lightning.

``lit_peft.adapters`` is plain PyTorch; ``lit_peft.modules``, ``lit_peft.data`` and ``lit_peft.callbacks`` are the
Lightning layer, and ``python -m lit_peft`` is the LightningCLI. The callbacks live in the repository's top-level
``callbacks/`` folder, which the package build (``pyproject.toml``'s ``package-dir``) installs as
``lit_peft.callbacks``; install the checkout (``pip install -e .``, what ``scripts/install.sh`` does) to import it.
"""

__version__ = "0.1.0"

from .compat import install_log_filters as _install_log_filters

_install_log_filters()
