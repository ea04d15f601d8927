"""``lit_peft.adapters.export_lora``: any adapter as a peft LoRA (truncated SVD of ``ΔW``), loaded by
``peft.PeftModel.from_pretrained`` with the outputs the export reports; exact for LoRA at its own rank; the rank
chosen per layer by a tolerance; a changed bias and a trained head on a tiny BERT; refusals."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers.language import PROJECTIONS, logits_of
from helpers.models import randomize_adapters
from lit_peft.adapters import BOFT, OFT, SVFT, DoRA, LoRA, VeRA, export_lora

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("hf_offline")

ADAPTERS = {
    "lora": lambda: LoRA(rank=4, alpha=16, target_modules=PROJECTIONS),
    "dora": lambda: DoRA(rank=4, alpha=8, target_modules=PROJECTIONS),
    "vera": lambda: VeRA(rank=8, seed=3, target_modules=["q_proj", "v_proj", "down_proj"]),
    "oft": lambda: OFT(block_size=8, target_modules=PROJECTIONS),
    "boft": lambda: BOFT(block_size=4, n_butterfly_factors=2, target_modules=PROJECTIONS),
    "svft_plain": lambda: SVFT(pattern="plain", target_modules=PROJECTIONS),
    "svft_banded": lambda: SVFT(pattern="banded", off_diag=2, target_modules=PROJECTIONS),
}


def batch():
    return {"input_ids": torch.randint(4, 40, (2, 11), generator=torch.Generator().manual_seed(0)),
            "attention_mask": torch.ones(2, 11, dtype=torch.long)}


def adapted(llama_dir, name):
    model = AutoModelForCausalLM.from_pretrained(llama_dir / "model")
    ADAPTERS[name]().apply(model)
    randomize_adapters(model)
    return model


def served(llama_dir, folder):
    base = AutoModelForCausalLM.from_pretrained(llama_dir / "model")
    return peft.PeftModel.from_pretrained(base, folder)


def relative(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_every_adapter_exports_as_a_lora_that_peft_serves_with_the_reported_error(name, llama_dir, tmp_path):
    """Full precision (tolerance 1e-6): peft's LoRA gives the adapted model's logits; rank 2 everywhere: peft gives
    exactly the outputs the export reports (its relative difference), and that is not zero for full-rank ΔW."""
    model = adapted(llama_dir, name)
    ours = logits_of(model, batch())
    fine = export_lora(model, tmp_path / "fine", tolerance=1e-6, example=batch(), task_type="CAUSAL_LM")
    assert fine.output_relative_error < 1e-5 and fine.max_relative_error <= 1e-6
    assert relative(logits_of(served(llama_dir, fine.folder), batch()), ours) < 1e-5
    if name == "lora":  # a LoRA's ΔW has the adapter's rank: exported exactly at it
        assert {layer.rank for layer in fine.layers.values()} == {4}
    else:  # DoRA's magnitude rescales W's own rows: full-rank ΔW, like every other method here
        assert max(layer.rank for layer in fine.layers.values()) > 4

    coarse = export_lora(model, tmp_path / "coarse", rank=2, example=batch())
    assert {layer.rank for layer in coarse.layers.values()} == {2}
    theirs = logits_of(served(llama_dir, coarse.folder), batch())
    assert relative(theirs, ours) == pytest.approx(coarse.output_relative_error, rel=1e-3, abs=1e-6)
    assert coarse.output_relative_error > 1e-4 and coarse.max_relative_error > 1e-3
    written = json.loads((coarse.folder / "lora_export.json").read_text())
    assert written["rank"] == 2 and set(written["layers"]) == set(coarse.layers)
    config = json.loads((coarse.folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and set(config["rank_pattern"].values()) == {2}


def test_tolerance_chooses_each_layer_rank(llama_dir, tmp_path):
    """The smallest rank whose relative Frobenius error of ΔW is at most the tolerance, per layer; a looser
    tolerance gives smaller ranks and a smaller file; each reported error is what that rank leaves of ΔW."""
    model = adapted(llama_dir, "boft")
    tight = export_lora(model, tmp_path / "tight", tolerance=0.05)
    loose = export_lora(model, tmp_path / "loose", tolerance=0.5)
    assert all(layer.relative_error <= 0.05 for layer in tight.layers.values())
    assert all(loose.layers[n].rank <= tight.layers[n].rank for n in tight.layers)
    assert loose.file_bytes < tight.file_bytes
    assert len({layer.rank for layer in tight.layers.values()}) > 1  # per-layer ranks (rank_pattern)
    name, layer = next(iter(tight.layers.items()))
    module = model.get_submodule(name)
    weight = module.weight.double()
    delta = module.merged_linear().weight.double() - weight
    s = torch.linalg.svdvals(delta)
    assert layer.relative_error == pytest.approx(float(s[layer.rank:].norm() / s.norm()), rel=1e-5)
    if layer.rank > 0:
        assert float(s[layer.rank - 1:].norm() / s.norm()) > 0.05  # one less would not do


def test_changed_bias_and_trained_head_on_bert(tmp_path):
    """BOFT with ``train_bias`` on a BERT with biases and a trained classification head: the new biases and the head
    travel with the LoRA (``bias="lora_only"``, ``modules_to_save``)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertForSequenceClassification(config).eval().save_pretrained(tmp_path / "base")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    BOFT(block_size=4, n_butterfly_factors=2, train_bias=True, target_modules=["query", "value"],
         trainable_modules=["classifier"]).apply(model)
    randomize_adapters(model)  # the bias and the head too: every trainable tensor
    inputs = {"input_ids": torch.randint(1, 60, (2, 9), generator=torch.Generator().manual_seed(0)),
              "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    ours = logits_of(model, inputs)
    report = export_lora(model, tmp_path / "lora", tolerance=1e-6, example=inputs, task_type="SEQ_CLS")
    assert all(layer.bias_changed for layer in report.layers.values())
    written = json.loads((report.folder / "adapter_config.json").read_text())
    assert written["bias"] == "lora_only" and written["modules_to_save"] == ["classifier"]
    fresh = BertForSequenceClassification.from_pretrained(tmp_path / "base")
    theirs = logits_of(peft.PeftModel.from_pretrained(fresh, report.folder), inputs)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_refusals(llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(llama_dir / "model")
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no adapters: call strategy.apply\(model\)"):
        export_lora(model, tmp_path / "none")
    LoRA(rank=4, target_modules=PROJECTIONS).apply(model)  # B = 0 at init: ΔW = 0
    with pytest.raises(ValueError, match=r"every adapted layer is unchanged \(ΔW = 0"):
        export_lora(model, tmp_path / "identity")
    for bad in ({"rank": 0}, {"rank": "4"}, {"tolerance": 0.0}, {"tolerance": 1.5}):
        with pytest.raises(ValueError, match="rank must be|tolerance must be"):
            export_lora(model, tmp_path / "bad", **bad)
    assert not (tmp_path / "identity").exists() and not (tmp_path / "bad").exists()
