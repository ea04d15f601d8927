"""``GLUEDataModule`` (:mod:`lit_peft.data.glue`) on generated local GLUE files and the tiny BPE tokenizer of the
``tok_dir`` fixture; the hub path with ``datasets.load_dataset`` patched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.data import make_tokenizer, write_jsonl
from lit_peft.data import GLUE_TASKS, GLUEDataModule
from lit_peft.handover import DataInfo, ModelInfo, connect


GLUE_ROWS = {
    "mrpc": [{"sentence1": "The cat sat on the mat.", "sentence2": "A cat is on the mat.", "label": 1},
             {"sentence1": "A man is playing a guitar.", "sentence2": "Is the sky blue?", "label": 0},
             {"sentence1": "Natalia sold clips.", "sentence2": "She sold 48 clips to her friends in April.",
              "label": 1}],
    "stsb": [{"sentence1": "A man is playing a guitar.", "sentence2": "A man plays guitar.", "label": 4.75},
             {"sentence1": "The cat sat.", "sentence2": "Is the sky blue?", "label": 0.2}],
    "cola": [{"sentence": "The cat sat on the mat.", "label": 1}, {"sentence": "Mat the on sat.", "label": 0}],
    "mnli": [{"premise": "A man is playing a guitar.", "hypothesis": "A man plays.", "label": 0},
             {"premise": "The cat sat.", "hypothesis": "The sky is blue.", "label": 1},
             {"premise": "It is true.", "hypothesis": "It is false.", "label": 2}],
}


@pytest.fixture()
def glue_root(tmp_path) -> Path:
    root = tmp_path / "glue"
    for task, rows in GLUE_ROWS.items():
        splits = ("train", "validation", "test")
        if task == "mnli":
            splits = ("train", "validation_matched", "validation_mismatched", "test_matched")
        for split in splits:
            data = rows if "test" not in split else [{k: v for k, v in r.items() if k != "label"} for r in rows]
            if split == "validation_mismatched":
                data = rows[:1]
            write_jsonl(root / task / f"{split}.jsonl", data)
    return root


def glue_dm(root, tok_dir, task="mrpc", **kw) -> GLUEDataModule:
    args = dict(task=task, data=str(root), tokenizer=str(tok_dir), batch_size=2, cache_dir=str(root / "cache"))
    args.update(kw)
    return GLUEDataModule(**args)


def test_glue_task_table(tmp_path):
    assert {t: s.max_length for t, s in GLUE_TASKS.items()} == {
        "cola": 64, "sst2": 128, "mrpc": 320, "qqp": 320, "stsb": 128, "mnli": 256, "qnli": 512, "rte": 320}
    expected_keys = {"cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
                     "stsb": ("sentence1", "sentence2"), "rte": ("sentence1", "sentence2"),
                     "qqp": ("question1", "question2"), "mnli": ("premise", "hypothesis"),
                     "qnli": ("question", "sentence")}
    for task, spec in GLUE_TASKS.items():
        dm = GLUEDataModule(task=task, data=str(tmp_path))
        assert dm.max_length == spec.max_length and dm.text_fields == expected_keys[task]
        assert dm.num_labels == {"stsb": 1, "mnli": 3}.get(task, 2) and dm.is_regression == (task == "stsb")
        assert dm.metric_name == {"cola": "matthews", "stsb": "pearson"}.get(task, "accuracy")
    assert GLUEDataModule(task="qnli", max_length=100).max_length == 100
    with pytest.raises(ValueError, match=r"unknown GLUE task 'sst-2' \(did you mean 'sst2'\?\)"):
        GLUEDataModule(task="sst-2")
    with pytest.raises(ValueError, match="mnli_mismatched applies to task mnli only"):
        GLUEDataModule(task="rte", mnli_mismatched=True)


def test_glue_pair_encoding_and_batches(glue_root, tok_dir, tok):
    dm = glue_dm(glue_root, tok_dir, batch_size=3)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert list(batch) == ["input_ids", "attention_mask", "labels"]  # this tokenizer gives no token_type_ids
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0, 1]
    lengths = batch["attention_mask"].sum(1)
    for row, r in enumerate(GLUE_ROWS["mrpc"]):
        n = int(lengths[row])
        assert batch["input_ids"][row, :n].tolist() == tok(r["sentence1"], r["sentence2"])["input_ids"]
        assert batch["input_ids"][row, n:].eq(tok.pad_token_id).all() and batch["attention_mask"][row, n:].eq(0).all()
    a = tok("The cat sat on the mat.", add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0, : len(a) + 2].tolist() == [tok.bos_token_id, *a, tok.eos_token_id]
    # test = the labelled validation split (what the papers report); predict = GLUE's unlabelled test split
    dm.setup("test")
    assert next(iter(dm.test_dataloader()))["labels"].tolist() == [1, 0, 1]
    dm.setup("predict")
    assert "labels" not in next(iter(dm.predict_dataloader()))


def test_glue_token_type_ids_and_truncation(glue_root, tmp_path, tok):
    folder = make_tokenizer(tmp_path / "typed", token_types=True)
    dm = glue_dm(glue_root, folder, max_length=9, batch_size=3)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert list(batch) == ["input_ids", "attention_mask", "token_type_ids", "labels"]
    assert batch["input_ids"].shape[1] == 9 and batch["attention_mask"].sum(1).max() == 9
    types = batch["token_type_ids"][0].tolist()
    first_eos = batch["input_ids"][0].tolist().index(tok.eos_token_id)
    assert types[: first_eos + 1] == [0] * (first_eos + 1) and types[first_eos + 1:] == [1] * (9 - first_eos - 1)


def test_glue_stsb_regression_and_cola_single(glue_root, tok_dir, tok):
    dm = glue_dm(glue_root, tok_dir, task="stsb")
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == pytest.approx([4.75, 0.2])
    dm = glue_dm(glue_root, tok_dir, task="cola")
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    n = int(batch["attention_mask"][0].sum())
    assert batch["input_ids"][0, :n].tolist() == tok("The cat sat on the mat.")["input_ids"]


def test_glue_mnli_splits(glue_root, tok_dir):
    dm = glue_dm(glue_root, tok_dir, task="mnli", batch_size=8)
    assert dm.split_name("validation") == "validation_matched"
    dm.setup("validate")
    assert next(iter(dm.val_dataloader()))["labels"].tolist() == [0, 1, 2]
    dm = glue_dm(glue_root, tok_dir, task="mnli", batch_size=8, mnli_mismatched=True)
    dm.setup("validate")
    assert next(iter(dm.val_dataloader()))["labels"].tolist() == [0]
    # a local folder may call the matched split plain 'validation'
    (glue_root / "mnli" / "validation_matched.jsonl").rename(glue_root / "mnli" / "validation.jsonl")
    dm = glue_dm(glue_root, tok_dir, task="mnli", batch_size=8)
    dm.setup("validate")
    assert len(dm.val_set) == 3


def test_glue_errors(glue_root, tok_dir):
    write_jsonl(glue_root / "rte" / "train.jsonl", [{"premise": "a", "hypothesis": "b", "label": 0}])
    with pytest.raises(KeyError, match=r"GLUE rte data .*rte/train\.jsonl has no fields 'sentence1', 'sentence2' "
                                       r"\(fields: premise, hypothesis, label\); GLUE task rte needs the fields "
                                       r"sentence1, sentence2, label"):
        glue_dm(glue_root, tok_dir, task="rte").setup("fit")
    write_jsonl(glue_root / "cola" / "validation.jsonl", [{"sentence": "a", "label": 3}])
    with pytest.raises(ValueError, match=r"example 0 has label 3; GLUE cola labels are the integers 0\.\.1"):
        glue_dm(glue_root, tok_dir, task="cola").setup("validate")
    (glue_root / "qnli").mkdir()
    with pytest.raises(FileNotFoundError, match=r"GLUE qnli data folder .*glue/qnli has no file for split 'train': "
                                                r"expected one of train\.jsonl, .*\(data files present: none\)"):
        glue_dm(glue_root, tok_dir, task="qnli").setup("fit")
    with pytest.raises(FileNotFoundError, match=r"GLUE sst2 data file or folder not found: .*nowhere/sst2"):
        glue_dm(glue_root / "nowhere", tok_dir, task="sst2").setup("fit")


def test_glue_hub_path_and_shuffle(glue_root, tok_dir, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, *, split=None, cache_dir=None, **kw):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(GLUE_ROWS["mrpc"] * 3)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dms = [GLUEDataModule(task="mrpc", tokenizer=str(tok_dir), batch_size=2, seed=s) for s in (0, 0, 1)]
    for dm in dms:
        dm.setup("fit")
    assert calls[:2] == [("nyu-mll/glue", "mrpc", "train"), ("nyu-mll/glue", "mrpc", "validation")]
    orders = [[b["input_ids"].tolist() for b in dm.train_dataloader()] for dm in dms]
    assert orders[0] == orders[1] and orders[0] != orders[2]


def test_glue_tokenizer_from_connect(glue_root, tok_dir, tok):
    class Model:
        def model_info(self) -> ModelInfo:
            return ModelInfo(tokenizer=str(tok_dir))

        def connect_data(self, info: DataInfo) -> None:
            self.data = info

    dm = glue_dm(glue_root, tok_dir, task="stsb", tokenizer=None)
    model = Model()
    connect(model, dm)
    assert model.data == DataInfo("GLUEDataModule", task="stsb", num_classes=1, metric="pearson")
    dm.setup("validate")
    assert dm.tokenizer.get_vocab() == tok.get_vocab() and len(dm.val_set) == 2


def test_glue_test_split(glue_root, tok_dir):
    """``test_split: test`` scores a labelled test split (the assets' RT and BBC data) instead of validation; an
    unlabelled test split is refused at setup, naming the option."""
    rows = [{"sentence": "Good.", "label": 1}, {"sentence": "Bad.", "label": 0}, {"sentence": "Fine.", "label": 1}]
    write_jsonl(glue_root / "sst2" / "train.jsonl", rows)
    write_jsonl(glue_root / "sst2" / "validation.jsonl", rows[:1])
    write_jsonl(glue_root / "sst2" / "test.jsonl", rows)
    dm = glue_dm(glue_root, tok_dir, task="sst2", batch_size=8)
    dm.setup("test")
    assert next(iter(dm.test_dataloader()))["labels"].tolist() == [1]          # GLUE convention: validation
    dm = glue_dm(glue_root, tok_dir, task="sst2", batch_size=8, test_split="test")
    dm.setup("test")
    assert dm.val_set is None
    assert next(iter(dm.test_dataloader()))["labels"].tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"test_split: test, but the GLUE cola test split .* is unlabelled"):
        glue_dm(glue_root, tok_dir, task="cola", test_split="test").setup("test")
    with pytest.raises(ValueError, match="test_split"):
        glue_dm(glue_root, tok_dir, task="cola", test_split="dev")
