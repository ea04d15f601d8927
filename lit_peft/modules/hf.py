"""Hugging Face ``transformers`` backbones with a pluggable adapter: causal language models (MetaMathQA → GSM-8K /
MATH, Commonsense-15K; SVFT Table 1, BOFT Table 3) and sequence classifiers (GLUE with DeBERTaV3; both papers).

The shared part (:class:`HFAdaptedModule`) is here; :mod:`lit_peft.modules.causal_lm` and
:mod:`lit_peft.modules.sequence_classifier` hold the two modules. Both load the backbone with ``from_pretrained`` (a hub id or a local folder) in ``__init__`` (the classifier
with ``num_labels: null`` once the data module says how many labels, see :mod:`lit_peft.handover`), check the adapter's
``target_modules`` against it right away (a clear error listing the model's linear layers, before any training work)
and let :class:`~lit_peft.modules.base.AdaptedModule` apply the adapter in ``configure_model``.

Export (``lit_peft.callbacks.MergeAdapters``): the merged model is rebuilt with ``from_config`` on the ``meta``
device, loaded with ``load_state_dict(assign=True, strict=True)`` and written with ``save_pretrained`` together
with the tokenizer, so ``AutoModelFor*.from_pretrained(folder)`` loads it; with ``export_peft`` the same folder
also gets ``peft_adapter/``, a Hugging Face ``peft`` adapter (:func:`lit_peft.adapters.peft_export.export_peft_adapter`)
when the strategy has a ``peft`` counterpart.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import transformers
from lightning.pytorch.utilities import rank_zero_info
from packaging.version import Version
from torch import nn
from transformers import AutoTokenizer

from ..adapters import AdapterStrategy, find_strategy, resolve_targets
from ..adapters.peft_export import export_peft_adapter, peft_export_problem
from ..files import atomic_write_folder
from ..hub import check_model_source
from ..handover import ModelInfo
from .base import AdaptedModule

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Top-level module names of the classification heads of ``AutoModelForSequenceClassification`` models.
CLASSIFIER_NAMES = ("classifier", "score")


def dtype_kwargs(torch_dtype: str) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: ``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    if torch_dtype not in DTYPES:
        raise ValueError(f"torch_dtype must be one of {sorted(DTYPES)}, got {torch_dtype!r}")
    key = "dtype" if Version(transformers.__version__.split("+")[0]) >= Version("4.56") else "torch_dtype"
    return {key: DTYPES[torch_dtype]}


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing: gradients reach the adapters although the embeddings (the inputs of
    the checkpointed blocks) are frozen, so ``enable_input_require_grads`` is not needed."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class HFAdaptedModule(AdaptedModule):
    """What the ``transformers`` modules share: tokenizer, early target check, merged export and ``peft`` export.

    Subclasses set ``self.model`` (loaded with ``from_pretrained``), ``self.auto_class`` and ``self.peft_task_type``
    and then call :meth:`_finish_init`.
    """

    auto_class: Any = None
    peft_task_type: str | None = None
    #: Left out of ``hparams``: the strategy objects, and ``tokenizer`` / ``eval_task``, which the text data modules
    #: also have as hyperparameters (Lightning refuses to log a module and a data module whose shared
    #: hyperparameters differ, e.g. ``eval_task: null`` here and ``gsm8k`` there). LightningCLI's ``config.yaml``
    #: still records them; pass them again to ``load_from_checkpoint`` when they are not the defaults.
    hparams_ignored = ("adapter", "optimizer", "tokenizer", "eval_task")

    def _init_common(self, model_name_or_path: str, tokenizer: str | None, torch_dtype: str,
                     attn_implementation: str | None, export_peft: bool) -> None:
        check_model_source(model_name_or_path, argument="model.init_args.model_name_or_path",
                           instead="A local folder works offline: e.g. `python -m lit_peft.assets prepare "
                                   "smollm2-135m-instruct` and model_name_or_path: the folder `python -m "
                                   "lit_peft.assets path smollm2-135m-instruct` prints.")
        if tokenizer is not None:
            check_model_source(tokenizer, argument="model.init_args.tokenizer", local_file="")
        self.model_name_or_path = model_name_or_path
        #: what the text data modules load when their own ``tokenizer`` argument is ``None`` (:meth:`model_info`)
        self.tokenizer_name_or_path = tokenizer or model_name_or_path
        self.torch_dtype = torch_dtype
        self.attn_implementation = attn_implementation
        self.export_peft = export_peft
        self._dtype_kwargs = dtype_kwargs(torch_dtype)

    def model_info(self) -> ModelInfo:
        return ModelInfo(tokenizer=self.tokenizer_name_or_path)

    def _load_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(self._dtype_kwargs)
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs

    def _finish_init(self, gradient_checkpointing: bool) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path)
        if getattr(self.model.config, "pad_token_id", None) is None and self.tokenizer.pad_token_id is not None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        if self.adapter is not None:
            self.check_targets(self.adapter)

    def check_targets(self, adapter: AdapterStrategy) -> None:
        """Resolve the adapter's targets on the loaded model now, so a projection name the model lacks fails at
        construction time with the list of its linear layers (not after data loading, SVDs, ...)."""
        exclude = list(adapter.trainable_modules) + self.head_names()
        try:
            resolve_targets(self.model, adapter.target_modules, adapter.fused_qkv, exclude=exclude)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {type(adapter).__name__}(target_modules="
                             f"{adapter.target_modules!r}) does not fit {self.model_name_or_path!r} "
                             f"({type(self.model).__name__}): {err}") from err

    # -- the MergeAdapters hooks -----------------------------------------------------------------------------------
    def build_plain_model(self) -> nn.Module:
        """The un-adapted architecture from ``self.model.config`` on the ``meta`` device, ready for
        ``load_state_dict(state, strict=True, assign=True)``.

        Two things ``from_config`` on ``meta`` leaves wrong are fixed here: non-persistent buffers computed at
        construction (rotary ``inv_freq``, …), which no state dict carries, are copied from the live model; and
        tied weights (``tie_word_embeddings``: Gemma, small Llamas), which ``assign=True`` unties, are re-tied by a
        load-state-dict post-hook.
        """
        kwargs = {}
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        with torch.device("meta"):
            plain = self.auto_class.from_config(copy.deepcopy(self.model.config), **kwargs)
        live = dict(self.model.named_buffers(remove_duplicate=False))
        persistent = set(plain.state_dict(keep_vars=True))
        for name, _ in list(plain.named_buffers(remove_duplicate=False)):
            if name in persistent:
                continue
            if name not in live:
                raise RuntimeError(f"build_plain_model: non-persistent buffer {name} has no counterpart in the "
                                   f"adapted model")
            owner_name, _, leaf = name.rpartition(".")
            owner = plain.get_submodule(owner_name) if owner_name else plain
            owner.register_buffer(leaf, live[name].detach().clone(), persistent=False)
        if getattr(self.model, "generation_config", None) is not None:
            plain.generation_config = copy.deepcopy(self.model.generation_config)

        def retie(module, incompatible_keys):
            if callable(getattr(module, "tie_weights", None)):
                module.tie_weights()

        plain.register_load_state_dict_post_hook(retie)
        return plain

    def save_merged_model(self, model: nn.Module, folder: Path) -> None:
        """``model.save_pretrained`` + ``tokenizer.save_pretrained`` into a temporary folder beside ``folder``, whose
        files then replace their namesakes in ``folder`` (``AutoModelFor….from_pretrained(folder)`` loads it)."""

        def write(tmp: Path) -> None:
            if callable(getattr(model, "tie_weights", None)):
                model.tie_weights()
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)

        atomic_write_folder(folder, write, merge=True)

    def export_extra(self, folder: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """``peft_adapter/`` (a Hugging Face ``peft`` adapter) when ``export_peft`` and the strategy has one, from
        ``tensors`` (the gathered adapter state) when given, so it also works on rank 0 of an FSDP2 run."""
        if not self.export_peft or find_strategy(self.model) is None:
            return
        problem = peft_export_problem(self.model)
        if problem is not None:
            rank_zero_info(f"{type(self).__name__}: no peft export ({problem})")
            return
        out = export_peft_adapter(self.model, Path(folder) / "peft_adapter", self.model_name_or_path,
                                  task_type=self.peft_task_type, tensors=tensors)
        rank_zero_info(f"{type(self).__name__}: peft adapter written to {out}")
