"""The ``peft`` export (:mod:`lit_peft.adapters.peft_export`) of untrained adapters with random values, loaded by
``peft.PeftModel.from_pretrained`` with the same logits: LoRA, DoRA, OFT, OFT with scale (as BOFT m=1), BOFT m=1,
BOFT m=2, VeRA on the tiny Llama of the ``llama_dir`` fixture; BOFT/OFT with trained biases and a trained head on a
tiny BERT; refusals for SVFT and fused-qkv parts. (Exports after fine-tuning: ``modules/test_causal_lm.py`` and
``modules/test_sequence_classifier.py``.)
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers.language import PROJECTIONS, logits_of
from helpers.models import randomize_adapters
from lit_peft.adapters import BOFT, OFT, SVFT, DoRA, LoRA, VeRA
from lit_peft.adapters.peft_export import export_peft_adapter, peft_export_problem

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("hf_offline", "peft_boft_on_cpu")


EXPORTS = {
    "lora": (lambda: LoRA(rank=4, alpha=16, target_modules=PROJECTIONS), "LORA"),
    "dora": (lambda: DoRA(rank=4, alpha=8, target_modules=PROJECTIONS), "LORA"),
    "oft": (lambda: OFT(block_size=8, scale=False, target_modules=PROJECTIONS), "OFT"),
    "oft_scaled": (lambda: OFT(block_size=8, scale=True, target_modules=PROJECTIONS), "BOFT"),
    "boft_m1": (lambda: BOFT(block_size=8, n_butterfly_factors=1, target_modules=PROJECTIONS), "BOFT"),
    "boft_m2": (lambda: BOFT(block_size=4, n_butterfly_factors=2, target_modules=["q_proj", "down_proj"]), "BOFT"),
    "vera": (lambda: VeRA(rank=8, seed=3, target_modules=["q_proj", "v_proj", "down_proj"]), "VERA"),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_peft_export_matches_peft(name, llama_dir, tmp_path):
    make, peft_type = EXPORTS[name]
    model = AutoModelForCausalLM.from_pretrained(llama_dir / "model")
    make().apply(model)
    randomize_adapters(model)
    assert peft_export_problem(model) is None
    folder = export_peft_adapter(model, tmp_path / "peft", "tiny-llama", task_type="CAUSAL_LM")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == peft_type
    batch = {"input_ids": torch.randint(4, 40, (2, 11), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(2, 11, dtype=torch.long)}
    ours = logits_of(model, batch)
    base = AutoModelForCausalLM.from_pretrained(llama_dir / "model")
    assert (logits_of(base, batch) - ours).abs().max() > 1e-3
    theirs = logits_of(peft.PeftModel.from_pretrained(base, folder), batch)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["boft", "oft"])
def test_peft_export_trained_bias_and_head(name, tmp_path):
    """BOFT/OFT with ``train_bias`` (peft's ``bias="boft_only"`` / ``"oft_only"``) on a BERT with biases, and a
    trained classification head as ``modules_to_save``."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    base = BertForSequenceClassification(config).eval()
    base.save_pretrained(tmp_path / "base")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    strategy = (BOFT(block_size=4, n_butterfly_factors=2, train_bias=True, trainable_modules=["classifier"])
                if name == "boft" else
                OFT(block_size=4, scale=False, train_bias=True, trainable_modules=["classifier"]))
    strategy.apply(model)
    randomize_adapters(model)
    folder = export_peft_adapter(model, tmp_path / "peft", str(tmp_path / "base"), task_type="SEQ_CLS")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["bias"] == f"{name}_only" and config["modules_to_save"] == ["classifier"]
    batch = {"input_ids": torch.randint(1, 60, (2, 9), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    ours = logits_of(model, batch)
    fresh = BertForSequenceClassification.from_pretrained(tmp_path / "base")
    theirs = logits_of(peft.PeftModel.from_pretrained(fresh, folder), batch)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_peft_export_refusals(llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(llama_dir / "model")
    SVFT(pattern="plain", target_modules=["q_proj"]).apply(model)
    with pytest.raises(ValueError, match="peft has no SVFT; use lit_peft.adapters.save_adapter"):
        export_peft_adapter(model, tmp_path / "svft")
    assert not (tmp_path / "svft").exists()

    class Fused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48)

        def forward(self, x):
            return self.qkv(x)

    fused = LoRA(rank=2, target_modules=["qkv"]).apply(Fused())
    with pytest.raises(ValueError, match=r"layer 'qkv' is adapted as parts \['q', 'k', 'v'\]"):
        export_peft_adapter(fused, tmp_path / "fused")
    joint = LoRA(rank=2, target_modules=["qkv"], fused_qkv="joint").apply(Fused())
    assert peft_export_problem(joint) is None
