"""``MergeAdapters``: at the end of ``fit``, fold the adapters into the backbone and write a plain model.

Steps (global rank 0 writes, the other ranks wait):

1. build the merged weights without touching the trained model (:func:`lit_peft.adapters.merged_state_dict`);
2. load them into a freshly built *plain* backbone (``pl_module.build_plain_model()``, e.g. ``timm.create_model``)
   with ``strict=True`` — the same thing a user does with the file;
3. check on one batch that the plain merged model and the adapted model agree within ``tolerance``;
4. write ``model.safetensors`` (via ``pl_module.save_merged_model``), and the adapter alone under ``adapter/``
   (``adapter.safetensors`` + ``adapter_config.json``), each to a temporary name, then renamed.
5. call ``pl_module.export_extra(folder, adapter_tensors)`` (lit_peft's Hugging Face modules write a ``peft``
   adapter folder there, from the adapter tensors gathered in step 4, also under FSDP2; the others write nothing);
6. with ``lora_tolerance`` or ``lora_rank``: write any adapter as a peft LoRA under ``lora/``
   (:mod:`lit_peft.adapters.lora_export`: truncated SVD of each layer's merged − base weight), with each layer's
   rank and error, and the served LoRA's output difference on the check batch, in ``lora/lora_export.json``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_peft.adapters import adapted_layers, find_strategy, merged_state_dict
from lit_peft.adapters.io import adapter_config, adapter_state_dict, nonfinite_tensors, write_adapter
from lit_peft.adapters.lora_export import LoraExport, _check_rank_args, lora_factors, served_model, write_lora
from lit_peft.adapters.quantized import dense_weight
from lit_peft.files import atomic_write_folder


class MergeCheckError(RuntimeError):
    """The merged model does not reproduce the adapted model on the check batch."""


def first_batch(trainer: L.Trainer):
    """One batch for the merge check: from the validation loader if there is one, else the training loader."""
    datamodule = trainer.datamodule
    loaders = []
    if datamodule is not None:
        for getter in ("val_dataloader", "train_dataloader"):
            try:
                loaders.append(getattr(datamodule, getter)())
            except (NotImplementedError, AttributeError, TypeError):
                continue
    loaders += [trainer.val_dataloaders, trainer.train_dataloader]
    for loader in loaders:
        if loader is None:
            continue
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is not None:
            for batch in loader:
                return batch
    return None


class MergeAdapters(L.Callback):
    """Write the merged model and the adapter when ``fit`` ends.

    Args:
        output_dir: where to write; default ``<trainer.log_dir>/merged``.
        tolerance: largest relative difference (max-abs over max-abs) of merged vs adapted outputs on the check
            batch; a larger one raises :class:`MergeCheckError` and nothing is written.
        check: run the one-batch check.
        weights: ``"final"`` merges the weights at the end of fit (the BOFT VTAB protocol); ``"best"`` first loads
            the best checkpoint of the trainer's ``ModelCheckpoint`` into the module (the SVFT few-shot protocol
            reports the best-validation checkpoint), so the module then holds those weights.
        allow_nonfinite: write adapters holding NaN or infinite values (a diverged run) instead of refusing, with or
            without ``check``.
        lora_tolerance: also write the adapter, whatever its method, as a peft LoRA under ``lora/`` (for LoRA-only
            servers), each layer's rank the smallest whose relative error of ``ΔW`` is at most this (e.g. 0.01).
        lora_rank: the same with one fixed rank for every layer (instead of ``lora_tolerance``).

    The output folder is written as a whole: everything goes into a temporary folder beside it, which then
    replaces it, so an interrupted merge never leaves a new model beside a previous run's ``adapter/``.
    """

    def __init__(self, output_dir: str | None = None, tolerance: float = 1e-4, check: bool = True,
                 weights: Literal["final", "best"] = "final", allow_nonfinite: bool = False,
                 lora_tolerance: float | None = None, lora_rank: int | None = None):
        if weights not in ("final", "best"):
            raise ValueError(f"weights must be 'final' or 'best', got {weights!r}")
        if lora_rank is not None or lora_tolerance is not None:
            try:
                _check_rank_args(lora_rank, lora_tolerance)
            except ValueError as err:
                raise ValueError(f"MergeAdapters: lora_rank / lora_tolerance: {err}") from None
        self.lora_tolerance = lora_tolerance
        self.lora_rank = lora_rank
        self.lora_export: LoraExport | None = None
        self.output_dir = output_dir
        self.tolerance = tolerance
        self.check = check
        self.weights = weights
        self.allow_nonfinite = allow_nonfinite
        self.last_difference: float | None = None
        self.written: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """What would fail only after the whole fit fails now: ``weights: best`` without a checkpoint callback, an
        output folder that is a file, cannot be written or lies on a disk without room for the merged model."""
        if stage != "fit":
            return
        if self.weights == "best" and trainer.checkpoint_callback is None:
            raise ValueError("MergeAdapters(weights='best') needs a ModelCheckpoint callback (checkpointing is off); "
                             "use weights: final or add a lightning.pytorch.callbacks.ModelCheckpoint")
        folder = self.resolve_dir(trainer)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"MergeAdapters: output_dir {folder} is a file, not a folder; choose another output_dir")
        parent = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"MergeAdapters: cannot write the merged model to {folder}: {parent} is not writable; "
                             f"choose another output_dir")
        if parent is not None:
            # the merged model is about the size of the backbone's weights (written beside the old folder first)
            need = sum(p.numel() * p.element_size() for p in pl_module.parameters())
            free = shutil.disk_usage(parent).free
            if free < need:
                raise ValueError(f"MergeAdapters: {parent} has {free / 2**20:,.0f} MiB free, but the merged model needs "
                                 f"about {need / 2**20:,.0f} MiB; free some space or choose another output_dir")

    def resolve_dir(self, trainer: L.Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "merged"

    @torch.no_grad()
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = find_strategy(pl_module.model)
        if strategy is None:
            rank_zero_info("MergeAdapters: the model has no adapter; nothing to merge")
            return
        folder = self.resolve_dir(trainer)
        if self.weights == "best":
            self._load_best(trainer, pl_module)
        if not self.allow_nonfinite:
            self._refuse_nonfinite(trainer, pl_module, folder)
        # Collectives first, on every rank: gathering FSDP2-sharded tensors and the sharded forward of the check.
        # Rank 0 alone keeps the merged state (on the CPU); the others get {} (see merged_state_dict).
        with pl_module.full_weights() as keep:  # FSDP1 gathers its flat shards here, FSDP2's DTensors themselves
            state = keep(merged_state_dict(pl_module.model, keep=trainer.is_global_zero))
            adapter_files = (adapter_config(pl_module.model), keep(adapter_state_dict(pl_module.model)))
            export_lora = self.lora_rank is not None or self.lora_tolerance is not None
            base = keep(self._base_weights(pl_module.model, trainer.is_global_zero)) if export_lora else {}
        batch, adapted = (self._adapted_outputs(trainer, pl_module) if self.check or export_lora
                          else (None, None))
        if trainer.is_global_zero:
            plain = pl_module.build_plain_model()
            plain.load_state_dict(state, strict=True, assign=True)
            plain.to(pl_module.device).eval()
            if adapted is not None and self.check:
                self._compare(folder, pl_module, plain, batch, adapted)
            lora = self._lora(pl_module, strategy, state, base, folder, batch, adapted) if export_lora else None

            def write(tmp: Path) -> None:
                pl_module.save_merged_model(plain, tmp)
                write_adapter(tmp / "adapter", *adapter_files, allow_nonfinite=self.allow_nonfinite)
                # from the gathered adapter tensors: no collective on rank 0 alone
                pl_module.export_extra(tmp, adapter_files[1])
                if lora is not None:
                    factors, heads, report = lora
                    write_lora(tmp / "lora", factors, report, {k: state[k] for k in heads},
                               strategy.trainable_module_names(pl_module.model), self.lora_rank,
                               self.lora_tolerance, task_type=getattr(pl_module, "peft_task_type", None))

            atomic_write_folder(folder, write)
            self.written = folder
            rank_zero_info(f"MergeAdapters: merged model and adapter ({strategy!r}) written to "
                           f"{folder}" + ("" if self.last_difference is None else
                                          f"; merged vs adapted relative difference {self.last_difference:.2e}"))
            if self.lora_export is not None:
                self.lora_export.folder = folder / "lora"
                rank_zero_info(f"MergeAdapters: {self.lora_export.summary()}")
        trainer.strategy.barrier("merge_adapters")

    @staticmethod
    def _base_weights(model: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor]:
        """The frozen base ``weight``/``bias`` of every adapted layer, whole (gathering shards is collective: every
        rank calls this), on the CPU where ``keep``."""
        out = {}
        for name, layer in adapted_layers(model).items():
            for leaf in ("weight", "bias"):
                tensor = getattr(layer, leaf)
                if tensor is not None:
                    whole = dense_weight(tensor).detach()  # gathered when sharded, dequantized when quantized
                    if keep:
                        out[f"{name}.{leaf}"] = whole.cpu()
        return out

    def _lora(self, pl_module: L.LightningModule, strategy, state: dict, base: dict, folder: Path, batch, adapted):
        """On rank 0: every adapted layer's LoRA from its merged and base weights, and the output difference of the
        model a LoRA-only server builds from them (base + B·A) against the adapted one on the check batch."""
        report = LoraExport(folder=folder / "lora")
        factors = {}
        for name in adapted_layers(pl_module.model):
            B, A, new_bias, report.layers[name] = lora_factors(
                base[f"{name}.weight"], state[f"{name}.weight"], base.get(f"{name}.bias"), state.get(f"{name}.bias"),
                self.lora_rank, self.lora_tolerance)
            if B is not None:
                factors[name] = (B, A, new_bias)
        if not factors:
            raise ValueError(f"MergeAdapters: every adapted layer is unchanged (ΔW = 0), no LoRA to export; nothing "
                             f"written to {folder}")
        heads = [f"{module}.{key}" for module in strategy.trainable_module_names(pl_module.model)
                 for key in pl_module.model.get_submodule(module).state_dict()]
        if adapted is not None:
            served_state = dict(state)
            served_state.update({k: v.clone() for k, v in base.items()})  # base weights, new tensors (not plain's)
            served = pl_module.build_plain_model()
            served.load_state_dict(served_state, strict=True, assign=True)
            served = served_model(served, factors).to(pl_module.device).eval()
            got = pl_module.model_outputs(served, batch).float()
            report.output_relative_error = float((got - adapted).abs().max() / adapted.abs().max().clamp_min(1e-12))
            del served
        self.lora_export = report
        return factors, heads, report

    @staticmethod
    def _refuse_nonfinite(trainer: L.Trainer, pl_module: L.LightningModule, folder: Path) -> None:
        """Every rank looks at its own (local, possibly sharded) adapter tensors; the ranks decide together."""
        bad = nonfinite_tensors({f"{name}.adapters.{key}": getattr(t, "_local_tensor", t)
                                 for name, layer in adapted_layers(pl_module.model).items()
                                 for key, t in layer.adapters.state_dict().items()})
        refuse = trainer.strategy.reduce_boolean_decision(bool(bad), all=False) if trainer.world_size > 1 else bool(bad)
        if refuse:
            raise ValueError(f"MergeAdapters: refusing to merge: adapter tensors hold NaN or infinite values"
                             + (f" ({', '.join(bad[:5])})" if bad else " on another rank")
                             + f", i.e. the training diverged; nothing written to {folder}. Set "
                             f"allow_nonfinite: true on the callback to write them anyway")

    @staticmethod
    def _load_best(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        if not best:
            raise ValueError("MergeAdapters(weights='best') needs a ModelCheckpoint that monitors a metric and saved "
                             "a best checkpoint; none was found")
        checkpoint = torch.load(best, map_location=pl_module.device, weights_only=False)
        pl_module.load_trained_state(checkpoint["state_dict"])
        rank_zero_info(f"MergeAdapters: merging the best checkpoint {best}")

    def _adapted_outputs(self, trainer: L.Trainer, pl_module: L.LightningModule):
        """One batch and the adapted model's outputs on it (every rank runs it: a sharded forward is collective)."""
        batch = first_batch(trainer)
        if batch is None:
            rank_zero_info("MergeAdapters: no batch available for the merge check; skipped")
            return None, None
        batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
        was_training = pl_module.training
        pl_module.eval()
        try:
            return batch, pl_module.adapted_outputs(batch).float()
        finally:
            pl_module.train(was_training)

    def _compare(self, folder: Path, pl_module: L.LightningModule, plain: torch.nn.Module, batch,
                 adapted: torch.Tensor) -> None:
        """On rank 0 alone, so no ``trainer.log_dir`` here (a broadcast under DDP: the other ranks would hang)."""
        merged = pl_module.model_outputs(plain, batch).float()
        difference = float((merged - adapted).abs().max() / adapted.abs().max().clamp_min(1e-12))
        self.last_difference = difference
        if not difference <= self.tolerance:
            raise MergeCheckError(f"MergeAdapters: merged and adapted outputs differ by {difference:.3e} (relative), "
                                  f"more than tolerance {self.tolerance:.1e}; nothing written to "
                                  f"{folder}")
