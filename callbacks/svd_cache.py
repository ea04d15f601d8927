"""``SVDCache``: compute each SVFT-adapted weight's SVD once and keep it on disk.

A cache entry is ``<cache_dir>/<sha256>.safetensors`` holding ``U``, ``S``, ``V``; the key hashes the weight's
bytes, shape and dtype, the SVD precision and a format version, so a changed weight never hits a stale entry.
An entry is trusted only if its metadata repeats the key and shapes and ``U diag(S) Vᵀ`` reproduces the weight;
a truncated, foreign or mismatched file is recomputed and rewritten (to a temporary name, then renamed).

In a multi-process run the global rank 0 fills the cache during ``setup`` (before the adapter is applied and
before any sharding) while the other ranks wait at a barrier, then every rank loads.

The cache is an :class:`~lit_peft.adapters.SVDProvider`: the LightningModule passes the one among the trainer's
callbacks (:func:`find_svd_provider`) to ``strategy.apply(model, svd_provider=...)``; the strategy itself is never
modified. Outside Lightning: ``SVFT(...).apply(model, svd_provider=SVDCache(cache_dir))``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lit_peft.adapters import SVFT, SVDProvider, find_strategy, resolve_targets
from lit_peft.adapters.quantized import dense_weight
from lit_peft.distributed import full_tensor
from lit_peft.adapters.svft import canonical_svd
from lit_peft.adapters.targets import part_label
from lit_peft.files import atomic_write

CACHE_VERSION = "1"


class SVDCache(L.Callback):
    """Cache the SVDs that SVFT needs. The cache is an :class:`~lit_peft.adapters.SVDProvider`:
    ``cache(name, weight, dtype)`` is :meth:`get_or_compute`.

    Args:
        cache_dir: folder of the cache entries (created if missing).
        reconstruction_tolerance: largest relative error ``‖U diag(S) Vᵀ − W‖_F / ‖W‖_F`` of a trusted entry.

    An entry is trusted only if it reconstructs its weight and is the canonical SVD SVFT relies on: singular
    values non-increasing, U and V orthonormal, canonical signs (see :func:`~lit_peft.adapters.svft.canonical_signs`).
    """

    def __init__(self, cache_dir: str = "~/.cache/lit_peft/svd", reconstruction_tolerance: float = 1e-4):
        self.cache_dir = Path(os.path.expanduser(cache_dir))
        self.reconstruction_tolerance = reconstruction_tolerance
        self.hits = 0
        self.misses = 0
        self.seconds = 0.0

    # -- the cache itself ------------------------------------------------------------------------------------------
    @staticmethod
    def key(weight: Tensor, dtype: torch.dtype) -> str:
        digest = hashlib.sha256()
        digest.update(f"{CACHE_VERSION}|{tuple(weight.shape)}|{weight.dtype}|{dtype}|".encode())
        digest.update(weight.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.safetensors"

    def load(self, weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor] | None:
        """The cached SVD of ``weight``, or ``None`` if there is no trustworthy entry."""
        key = self.key(weight, dtype)
        file = self.path(key)
        if not file.is_file():
            return None
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
                # clone: safetensors tensors are views of the memory-mapped file, which may change under us
                U, S, V = (f.get_tensor(k).clone() for k in ("U", "S", "V"))
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            rank_zero_warn(f"SVDCache: unreadable entry {file} ({err}); recomputing")
            return None
        out, n = weight.shape
        r = min(out, n)
        if meta.get("key") != key or U.shape != (out, r) or S.shape != (r,) or V.shape != (n, r):
            rank_zero_warn(f"SVDCache: entry {file} does not match its weight ({tuple(weight.shape)}); recomputing")
            return None
        W = weight.detach().to(device="cpu", dtype=U.dtype)
        error = torch.linalg.matrix_norm(U * S @ V.mT - W) / torch.linalg.matrix_norm(W).clamp_min(1e-30)
        if not error <= self.reconstruction_tolerance:
            rank_zero_warn(f"SVDCache: entry {file} reconstructs its weight with relative error {float(error):.2e}; "
                           f"recomputing")
            return None
        # What SVFT relies on beyond U·S·Vᵀ = W: the order of the triplets (its patterns couple neighbouring
        # indices, top_k ranks them), orthonormal U and V, and the canonical signs (saved coefficients pair with
        # them): permuted, rescaled or pair-flipped triplets reconstruct W just as well.
        problems = []
        if bool((S < 0).any()) or bool((S[1:] > S[:-1]).any()):
            problems.append("singular values not in non-increasing order")
        eye = torch.eye(r, dtype=U.dtype)
        if max(float(torch.linalg.matrix_norm(U.mT @ U - eye)), float(torch.linalg.matrix_norm(V.mT @ V - eye))) \
                > self.reconstruction_tolerance * r ** 0.5:
            problems.append("U or V not orthonormal")
        pivot = torch.gather(U, 0, U.abs().argmax(dim=0, keepdim=True))
        if bool((pivot < 0).any()):
            problems.append("signs not canonical")
        if problems:
            rank_zero_warn(f"SVDCache: entry {file} is not the canonical SVD SVFT relies on ({'; '.join(problems)}); "
                           f"recomputing")
            return None
        return U, S, V

    def store(self, weight: Tensor, dtype: torch.dtype, svd: tuple[Tensor, Tensor, Tensor]) -> None:
        key = self.key(weight, dtype)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: t.detach().cpu().contiguous() for k, t in zip("USV", svd)}
        metadata = {"key": key, "shape": f"{tuple(weight.shape)}", "dtype": str(dtype)}
        atomic_write(self.path(key), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    def get_or_compute(self, name: str, weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """The SVD ``(U, S, V)`` of ``weight`` in ``dtype``: loaded from its entry, or computed and stored."""
        start = time.perf_counter()
        weight = full_tensor(weight)
        cached = self.load(weight, dtype)
        if cached is not None:
            self.hits += 1
            svd = cached
        else:
            self.misses += 1
            svd = canonical_svd(weight, dtype)
            self.store(weight, dtype, svd)
        self.seconds += time.perf_counter() - start
        return tuple(t.to(weight.device) for t in svd)

    __call__ = get_or_compute  # the SVDProvider protocol

    # -- Lightning hooks -------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        adapter = getattr(pl_module, "adapter", None)
        if not isinstance(adapter, SVFT):
            rank_zero_info(f"SVDCache: the adapter is {type(adapter).__name__}, not SVFT; nothing to cache")
            return
        if find_strategy(pl_module.model) is not None:
            return  # already adapted (a test or validate stage after fit in the same process)
        if getattr(pl_module, "quantize", None):
            # the SVDs are those of the dequantized weights, which exist once configure_model has quantized the
            # base (one process): SVFT asks this cache for each of them then
            rank_zero_info(f"SVDCache: the base is stored in {pl_module.quantize}; the SVDs of its dequantized "
                           f"weights are taken from or added to {self.cache_dir} as the adapter is applied")
            return
        if trainer.is_global_zero:
            targets = resolve_targets(pl_module.model, adapter.target_modules, adapter.fused_qkv,
                                      exclude=adapter.trainable_modules)
            for name, parts in targets.items():
                weight = dense_weight(pl_module.model.get_submodule(name).weight)
                for part, (start, stop) in parts.items():
                    self.get_or_compute(part_label(name, part), weight[start:stop], adapter.svd_torch_dtype)
            rank_zero_info(f"SVDCache: {self.hits} loaded, {self.misses} computed in {self.seconds:.1f}s "
                           f"({self.cache_dir})")
        trainer.strategy.barrier("svd_cache")


def find_svd_provider(callbacks: Iterable[object]) -> SVDProvider | None:
    """The :class:`SVDCache` among ``callbacks`` (e.g. ``trainer.callbacks``), or ``None``: what a LightningModule
    passes to ``strategy.apply(model, svd_provider=...)``."""
    return next((c for c in callbacks if isinstance(c, SVDCache)), None)
