"""Lightning callbacks of lit_peft: cache SVDs, watch BOFT orthogonality, merge the adapters at the end of fit, write
predictions, show progress with a metric line per epoch.

This folder is installed as ``lit_peft.callbacks`` (``pyproject.toml``'s ``package-dir``); every import here is
absolute, so the classes are the same objects however the folder was reached.
"""

from lit_peft.callbacks.merge import MergeAdapters, MergeCheckError
from lit_peft.callbacks.orthogonality import OrthogonalityCheck, OrthogonalityError
from lit_peft.callbacks.predictions import PredictionWriter
from lit_peft.callbacks.progress import RichProgress
from lit_peft.callbacks.svd_cache import SVDCache, find_svd_provider

__all__ = ["SVDCache", "find_svd_provider", "OrthogonalityCheck", "OrthogonalityError", "MergeAdapters",
           "MergeCheckError", "PredictionWriter", "RichProgress"]
