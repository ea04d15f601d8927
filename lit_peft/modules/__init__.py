"""LightningModules: a thin layer that wraps a backbone, applies an adapter strategy and trains it."""

from .base import AdaptedModule
from .language import CausalLMModule, SequenceClassifierModule
from .vision import ViTClassifier

__all__ = ["AdaptedModule", "ViTClassifier", "CausalLMModule", "SequenceClassifierModule"]
