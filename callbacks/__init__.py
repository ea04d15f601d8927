"""Lightning callbacks of lit_peft (installed as ``lit_peft.callbacks``): cache SVDs, watch BOFT orthogonality,
merge the adapters at the end of fit."""

from .merge import MergeAdapters, MergeCheckError
from .orthogonality import OrthogonalityCheck, OrthogonalityError
from .svd_cache import SVDCache

__all__ = ["SVDCache", "OrthogonalityCheck", "OrthogonalityError", "MergeAdapters", "MergeCheckError"]
