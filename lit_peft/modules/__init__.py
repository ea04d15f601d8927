"""LightningModules: a thin layer that wraps a backbone, applies an adapter strategy and trains it."""

from .base import AdaptedModule
from .causal_lm import CausalLMModule
from .hf import HFAdaptedModule
from .sequence_classifier import SequenceClassifierModule
from .vision import ViTClassifier

__all__ = ["AdaptedModule", "ViTClassifier", "CausalLMModule", "SequenceClassifierModule", "HFAdaptedModule"]
