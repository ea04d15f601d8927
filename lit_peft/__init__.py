"""lit_peft: parameter-efficient fine-tuning (SVFT, BOFT/OFT, LoRA, DoRA, VeRA) of ViTs and LLMs on Lightning."""

__version__ = "0.1.0"
