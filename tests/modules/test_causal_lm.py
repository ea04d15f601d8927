"""``CausalLMModule`` (:mod:`lit_peft.modules.causal_lm`) end to end on the CPU, on the tiny Llama of the
``llama_dir`` fixture (``LlamaConfig``: hidden 64, 2 layers, 4 heads, tied embeddings, and a word-level tokenizer,
both saved with ``save_pretrained`` and loaded back through ``CausalLMModule(model_name_or_path=<folder>)``).

* Each adapter (BOFT m=2, OFT, SVFT, LoRA, DoRA, VeRA) on all seven projections is fine-tuned by a real
  ``lightning.Trainer`` with :class:`~lit_peft.data.InstructionDataModule` on local jsonl files: the training loss
  falls; greedy generation on a GSM-8K-style test set runs and writes ``predictions.jsonl``; ``MergeAdapters`` writes
  a merged model that ``AutoModelForCausalLM.from_pretrained`` loads with the adapted model's logits, and (except
  SVFT) a ``peft_adapter/`` that ``peft.PeftModel.from_pretrained`` loads with the same logits.
* Gradient checkpointing: adapters get the same gradients as without it (frozen embeddings).
* Loss validation batches, a bfloat16 backbone, the eval task handed over by the data module.
* Clear errors for a target the model lacks.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from transformers import AutoModelForCausalLM

from helpers.language import PROJECTIONS, adamw, logits_of, qa_rows
from helpers.models import randomize_adapters
from lit_peft.adapters import BOFT, OFT, SVFT, DoRA, LoRA, VeRA
from lit_peft.callbacks import MergeAdapters
from lit_peft.data import InstructionDataModule, format_prompt
from lit_peft.handover import DataInfo
from lit_peft.modules import CausalLMModule

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("hf_offline", "peft_boft_on_cpu")


def instruction_data(root: Path, **kwargs) -> InstructionDataModule:
    args = dict(train_data=str(root / "data" / "train.jsonl"), eval_data=str(root / "data" / "gsm8k_test.jsonl"),
                eval_task="gsm8k", max_length=64, batch_size=8, eval_batch_size=3, seed=0)
    args.update(kwargs)
    return InstructionDataModule(**args)


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


ADAPTERS = {
    "boft": (lambda: BOFT(block_size=8, n_butterfly_factors=2, dropout=0.0, target_modules=PROJECTIONS), 2e-2),
    "oft": (lambda: OFT(block_size=8, scale=False, target_modules=PROJECTIONS), 2e-2),
    "svft": (lambda: SVFT(pattern="banded", off_diag=2, target_modules=PROJECTIONS), 2e-2),
    "lora": (lambda: LoRA(rank=4, alpha=8, target_modules=PROJECTIONS), 1e-2),
    "dora": (lambda: DoRA(rank=4, alpha=8, target_modules=PROJECTIONS), 1e-2),
    "vera": (lambda: VeRA(rank=16, d_init=0.1, target_modules=PROJECTIONS), 2e-2),
}


def eval_batch(module: CausalLMModule, root: Path) -> dict:
    """A right-padded batch of full training texts (a loss batch) for logit comparisons."""
    rows = qa_rows(5, 4)
    texts = [format_prompt("metamath", r["query"]) + r["response"] for r in rows]
    enc = module.tokenizer(texts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def assert_close_logits(actual, expected, what, atol=1e-5):
    mask_diff = (actual - expected).abs().max().item()
    assert mask_diff <= atol * max(1.0, expected.abs().max().item()), f"{what}: max difference {mask_diff:.3e}"


# -- fine-tuning every adapter ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_causal_lm_finetune_generate_merge_export(name, llama_dir, tmp_path):
    make, lr = ADAPTERS[name]
    torch.manual_seed(0)
    module = CausalLMModule(str(llama_dir / "model"), adapter=make(), optimizer=adamw(lr), max_new_tokens=12,
                            lr_schedule="constant", warmup_ratio=0.0, gradient_checkpointing=(name == "svft"))
    assert module.tokenizer_name_or_path == str(llama_dir / "model")
    data = instruction_data(llama_dir)
    recorder, merge = LossRecorder(), MergeAdapters(tolerance=1e-5)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=16, logger=CSVLogger(tmp_path, name="run"),
                        callbacks=[recorder, merge], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=4,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert 0.0 <= float(trainer.callback_metrics["val_acc"]) <= 1.0  # generation validation after epoch 0

    # the training loss falls
    losses = recorder.losses
    assert len(losses) == 16
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.9 * first, f"{name}: loss {first:.3f} -> {last:.3f}"

    # generation-based evaluation on the GSM-8K-style test set, predictions written
    results = trainer.test(module, datamodule=data, verbose=False)
    assert 0.0 <= results[0]["test_acc"] <= 1.0
    predictions = Path(trainer.log_dir) / "predictions.jsonl"
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(6))
    for r in records:
        assert set(r) == {"index", "prompt", "output", "extracted", "gold", "correct"}
        assert r["prompt"].endswith("### Response:\n") and "####" in r["gold"]
        assert isinstance(r["output"], str) and isinstance(r["correct"], bool)
    assert results[0]["test_acc"] == pytest.approx(sum(r["correct"] for r in records) / 6)

    # the merged model loads with from_pretrained and reproduces the adapted model's logits
    folder = merge.written
    assert folder is not None and (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporary files left behind"
    batch = eval_batch(module, llama_dir)
    adapted = logits_of(module.model, batch)
    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr(), "tied weights lost"
    assert_close_logits(logits_of(merged, batch), adapted, f"{name} merged")
    base = AutoModelForCausalLM.from_pretrained(llama_dir / "model")
    assert (logits_of(base, batch) - adapted).abs().max() > 1e-3, "the adapter changed nothing"

    # the peft export (all but SVFT) loads in peft with the same logits
    exported = folder / "peft_adapter"
    if name == "svft":
        assert not exported.exists()
        return
    config = json.loads((exported / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(llama_dir / "model") and config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == sorted(PROJECTIONS)
    peft_model = peft.PeftModel.from_pretrained(base, exported)
    assert_close_logits(logits_of(peft_model, batch), adapted, f"{name} peft export")


# -- gradient checkpointing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lora", "boft"])
def test_gradient_checkpointing_reaches_adapters(name, llama_dir):
    make = {"lora": lambda: LoRA(rank=4, target_modules=PROJECTIONS),
            "boft": lambda: BOFT(block_size=8, n_butterfly_factors=2, target_modules=PROJECTIONS)}[name]
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = CausalLMModule(str(llama_dir / "model"), adapter=make(), gradient_checkpointing=checkpointing)
        module.configure_model()
        randomize_adapters(module.model)
        module.train()
        assert module.model.model.gradient_checkpointing is checkpointing
        assert not module.model.get_input_embeddings().weight.requires_grad
        batch = eval_batch(module, llama_dir)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        module._loss({**batch, "labels": labels}).backward()
        grads[checkpointing] = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
        assert module.model.get_input_embeddings().weight.grad is None
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) == 28
    for key, grad in grads[True].items():
        assert grad is not None and grad.abs().max() > 0, f"{key}: no gradient under checkpointing"
        torch.testing.assert_close(grad, grads[False][key], rtol=1e-4, atol=1e-6)


def test_loss_validation_batches_and_dtype(llama_dir, tmp_path):
    """A validation batch with labels logs val_loss; bfloat16 backbones keep float32 adapter tensors; the eval task
    comes from the data module and may not contradict it; generation refuses right-padded prompts."""
    module = CausalLMModule(str(llama_dir / "model"), torch_dtype="bfloat16",
                            adapter=LoRA(rank=2, target_modules=PROJECTIONS))
    assert module.model.dtype == torch.bfloat16
    data = instruction_data(llama_dir, tokenizer=str(llama_dir / "model"), val_fraction=0.25)
    data.setup("fit")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    results = trainer.validate(module, dataloaders=data.loss_val_dataloader(), verbose=False)
    assert set(results[0]) == {"val_loss"} and 0 < results[0]["val_loss"] < 20
    assert {p.dtype for p in module.parameters() if p.requires_grad} == {torch.float32}
    module.connect_data(DataInfo(name="InstructionDataModule", eval_task="boolq"))
    assert module.resolved_eval_task() == "boolq"
    module.eval_task = "gsm8k"
    with pytest.raises(ValueError, match="eval_task='gsm8k' but the data module's eval_task is 'boolq'"):
        module.resolved_eval_task()
    enc = module.tokenizer(["What is 1 plus 2 ?", "What is"], return_tensors="pt", padding=True)
    assert module.tokenizer.padding_side == "right" and enc["attention_mask"][1, -1] == 0
    with pytest.raises(ValueError, match="left-padded"):
        module.generate(enc["input_ids"], enc["attention_mask"])


# -- clear errors -------------------------------------------------------------------------------------------------
def test_unknown_target_lists_the_models_linears(llama_dir):
    with pytest.raises(ValueError) as err:
        CausalLMModule(str(llama_dir / "model"), adapter=LoRA(target_modules=["q_proj", "query", "c_attn"]))
    message = str(err.value)
    assert "'query' matches no module" in message and "'c_attn' matches no module" in message
    assert "LlamaForCausalLM" in message
    for leaf in PROJECTIONS:
        assert f"{leaf} ×2" in message, message
