"""``InstructionDataModule`` (:mod:`lit_peft.data.instruction`): instruction tuning and generation eval on data and
a tokenizer the tests build (the ``tok_dir`` fixture: a byte-level BPE trained with ``tokenizers``, saved as a
``transformers`` tokenizer and loaded back through ``AutoTokenizer.from_pretrained(folder)``). No hub access: the hub
code path is exercised with ``datasets.load_dataset`` patched."""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from helpers.data import EOS, make_tokenizer, write_jsonl
from lit_peft.data import IGNORE_INDEX, GLUEDataModule, InstructionDataModule, format_prompt
from lit_peft.handover import DataInfo, DataSide, ModelInfo


METAMATH = [
    {"query": "What is 2 + 3?", "response": "2 + 3 = 5. The answer is: 5"},
    {"query": "Natalia sold clips to 48 of her friends in April.", "response": "The answer is: 72"},
    {"query": "Is the sky blue?", "response": "Yes it is.\nThe answer is: true"},
    {"query": "What is 4 + 4?", "response": "4 + 4 = 8"},
    {"query": "Sum 1 and 1.", "response": "2"},
    {"query": "The cat sat on the mat. Where?", "response": "On the mat. The answer is: mat"},
]
GSM8K = [
    {"question": "Natalia sold 48 clips. How many?", "answer": "She sold 48 + 24 = 72\n#### 72"},
    {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
    {"question": "Is it?", "answer": "#### 42"},
]


@pytest.fixture()
def data(tmp_path) -> SimpleNamespace:
    return SimpleNamespace(
        root=tmp_path,
        train=write_jsonl(tmp_path / "metamath.jsonl", METAMATH),
        gsm8k=write_jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM8K),
        cache=str(tmp_path / "cache"),
    )


def instr_dm(data, tok_dir, **kw) -> InstructionDataModule:
    args = dict(train_data=str(data.train), eval_data=str(data.gsm8k), eval_task="gsm8k", tokenizer=str(tok_dir),
                max_length=128, batch_size=3, eval_batch_size=2, cache_dir=data.cache)
    args.update(kw)
    return InstructionDataModule(**args)


def prompt_ids(tok, prompt: str) -> list[int]:
    return [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------------------------
# training examples
# ------------------------------------------------------------------------------------------------------------------
def test_labels_masked_exactly_on_prompt(data, tok_dir, tok):
    dm = instr_dm(data, tok_dir)
    dm.setup("fit")
    assert len(dm.train_set) == len(METAMATH) and dm.num_dropped == 0 and dm.num_truncated == 0
    for item in (dm.train_set[i] for i in range(len(dm.train_set))):
        ex = METAMATH[item["index"]]
        p = prompt_ids(tok, format_prompt("metamath", ex["query"]))
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        assert ids[: len(p)] == p and ids[0] == tok.bos_token_id
        assert labels[: len(p)] == [IGNORE_INDEX] * len(p)
        unmasked = [t for t in labels if t != IGNORE_INDEX]
        assert unmasked == ids[len(p):] and unmasked[-1] == tok.eos_token_id
        assert tok.decode(unmasked) == ex["response"] + EOS


def test_train_batches_right_padded(data, tok_dir, tok):
    dm = instr_dm(data, tok_dir, batch_size=6)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long for v in batch.values())
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape == (6, int(lengths.max())) and len(set(lengths.tolist())) > 1
    for row in range(6):
        n = int(lengths[row])
        assert batch["attention_mask"][row, :n].eq(1).all() and batch["attention_mask"][row, n:].eq(0).all()
        assert batch["input_ids"][row, n:].eq(tok.pad_token_id).all()
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()
        assert batch["input_ids"][row, n - 1] == tok.eos_token_id  # nothing truncated at max_length=128
        assert batch["input_ids"][row, 0] == tok.bos_token_id


def test_truncation_keeps_prompt_and_cuts_response(data, tok_dir, tok):
    plens = [len(prompt_ids(tok, format_prompt("metamath", ex["query"]))) for ex in METAMATH]
    max_length = max(plens) + 2  # every prompt fits, the longer responses do not
    dm = instr_dm(data, tok_dir, max_length=max_length)
    dm.setup("fit")
    assert dm.num_truncated > 0
    for i in range(len(dm.train_set)):
        item = dm.train_set[i]
        full = plens[item["index"]] + len(tok(METAMATH[item["index"]]["response"],
                                              add_special_tokens=False)["input_ids"]) + 1
        assert len(item["input_ids"]) == min(full, max_length)
        assert int((item["labels"] != IGNORE_INDEX).sum()) == min(full, max_length) - plens[item["index"]] >= 1


def test_overlong_prompt_error_and_drop(data, tok_dir, tok):
    rows = METAMATH[:2] + [{"query": "Natalia sold clips " * 20, "response": "72"}] + METAMATH[2:]
    write_jsonl(data.train, rows)
    long_len = len(prompt_ids(tok, format_prompt("metamath", rows[2]["query"])))
    max_length = max(len(prompt_ids(tok, format_prompt("metamath", r["query"]))) for r in METAMATH) + 4
    assert long_len >= max_length
    dm = instr_dm(data, tok_dir, max_length=max_length)
    with pytest.raises(ValueError, match=rf"metamath\.jsonl: example 2 has a prompt of {long_len} tokens and "
                                         rf"max_length is {max_length}.*\(2 tokens with EOS\).*1 of 7 examples.*"
                                         r"drop_overlong: true"):
        dm.setup("fit")
    dm = instr_dm(data, tok_dir, max_length=max_length, drop_overlong=True)
    with pytest.warns(UserWarning, match="dropped 1 of 7 examples"):
        dm.setup("fit")
    assert dm.num_dropped == 1 and len(dm.train_set) == 6 and 2 not in dm.train_set.indices


def test_missing_fields_error(data, tok_dir):
    bad = write_jsonl(data.root / "data" / "x.jsonl", GSM8K)
    dm = instr_dm(data, tok_dir, train_data=str(bad), response_field="answer")
    with pytest.raises(KeyError, match=r"train_data .*data/x\.jsonl has no field 'query' \(fields: question, "
                                       r"answer\); set data\.init_args\.query_field"):
        dm.setup("fit")
    dm = instr_dm(data, tok_dir, train_data=str(bad), query_field="question", response_field="output")
    with pytest.raises(KeyError, match=r"no field 'output' .*set data\.init_args\.response_field"):
        dm.setup("fit")
    dm = instr_dm(data, tok_dir, train_data=str(bad), query_field="q", response_field="r")
    with pytest.raises(KeyError, match=r"no fields 'q', 'r' .*query_field / data\.init_args\.response_field"):
        dm.setup("fit")
    dm = instr_dm(data, tok_dir, eval_query_field="problem")
    with pytest.raises(KeyError, match=r"eval_data .*test\.jsonl has no field 'problem' \(fields: question, "
                                       r"answer\); set data\.init_args\.eval_query_field"):
        dm.setup("test")


def test_missing_local_files(data, tok_dir):
    missing = data.root / "nope" / "train.jsonl"
    with pytest.raises(FileNotFoundError, match=rf"train_data file not found: {missing}"):
        instr_dm(data, tok_dir, train_data=str(missing)).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"eval_data folder .*gsm8k has no file for split 'validation'.*"
                                                r"data files present: test\.jsonl"):
        instr_dm(data, tok_dir, eval_split="validation", eval_data=str(data.gsm8k.parent)).setup("validate")


def test_commonsense_json_array_with_input(data, tok_dir, tok):
    rows = [{"instruction": "Please answer: is the sky blue?", "input": "", "output": "the answer is true",
             "answer": "true"},
            {"instruction": "Choose the option.", "input": "option1 or option2", "output": "the answer is option2",
             "answer": "option2"}]
    path = data.root / "commonsense_15k.json"
    path.write_text(json.dumps(rows, indent=1))  # a JSON array, as LLM-Adapters ships it
    dm = instr_dm(data, tok_dir, train_data=str(path), query_field="instruction", response_field="output",
                  input_field="input", template="alpaca", eval_data=str(path), eval_query_field="instruction",
                  eval_task="boolq")
    dm.setup()
    for i, row in enumerate(rows):
        p = prompt_ids(tok, format_prompt("alpaca", row["instruction"], row["input"]))
        assert dm.train_set[i]["input_ids"].tolist()[: len(p)] == p
        assert dm.eval_set[i]["prompt"] == format_prompt("alpaca", row["instruction"], row["input"])
    assert "### Input:\noption1 or option2" in dm.eval_set[1]["prompt"]
    assert "### Input:" not in dm.eval_set[0]["prompt"]
    assert [dm.eval_set[i]["answer"] for i in range(2)] == ["true", "option2"]


# ------------------------------------------------------------------------------------------------------------------
# evaluation prompts
# ------------------------------------------------------------------------------------------------------------------
def test_eval_prompts_left_padded(data, tok_dir, tok):
    dm = instr_dm(data, tok_dir, eval_batch_size=3, max_eval_samples=2)
    dm.setup("test")
    assert dm.train_set is None  # test stage builds the eval set only
    batch = next(iter(dm.test_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "answers", "indices", "prompts"}
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["answers"] == [r["answer"] for r in GSM8K] and batch["indices"] == [0, 1, 2]
    assert batch["prompts"] == [format_prompt("metamath", r["question"]) for r in GSM8K]
    lengths = batch["attention_mask"].sum(1)
    width = batch["input_ids"].shape[1]
    assert width == int(lengths.max()) and len(set(lengths.tolist())) > 1
    for row, r in enumerate(GSM8K):
        n = int(lengths[row])
        mask = batch["attention_mask"][row]
        assert mask[: width - n].eq(0).all() and mask[width - n:].eq(1).all()
        assert batch["input_ids"][row, : width - n].eq(tok.pad_token_id).all()
        assert batch["input_ids"][row, width - n:].tolist() == prompt_ids(tok, format_prompt("metamath", r["question"]))
    # validation is capped by max_eval_samples, testing is not
    assert sum(len(b["indices"]) for b in dm.val_dataloader()) == 2
    assert sum(len(b["indices"]) for b in dm.test_dataloader()) == 3


def test_no_eval_data_means_no_validation(data, tok_dir):
    dm = instr_dm(data, tok_dir, eval_data=None, eval_task=None)
    dm.setup("fit")
    assert dm.val_dataloader() == []
    with pytest.raises(RuntimeError, match="set data.init_args.eval_data"):
        dm.test_dataloader()
    with pytest.raises(RuntimeError, match="set data.init_args.eval_data"):
        dm.check_can_test()   # what the CLI asks before fit when test_after_fit is set
    with pytest.raises(RuntimeError, match="set data.init_args.val_fraction > 0"):
        dm.loss_val_dataloader()


def test_loss_validation_holdout(data, tok_dir):
    dm = instr_dm(data, tok_dir, val_fraction=0.34, eval_batch_size=4)
    dm.setup("fit")
    train, held = dm.train_set.indices, dm.loss_val_set.indices
    assert len(held) == 2 and sorted(train + held) == list(range(6)) and not set(train) & set(held)
    batch = next(iter(dm.loss_val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape[0] == 2
    again = instr_dm(data, tok_dir, val_fraction=0.34)
    again.setup("fit")
    assert again.loss_val_set.indices == held  # seeded
    other = [instr_dm(data, tok_dir, val_fraction=0.34, seed=s) for s in range(5)]
    for o in other:
        o.setup("fit")
    assert len({tuple(o.loss_val_set.indices) for o in other}) > 1
    capped = instr_dm(data, tok_dir, max_train_samples=4, val_fraction=0.25)
    capped.setup("fit")
    assert sorted(capped.train_set.indices + capped.loss_val_set.indices) == [0, 1, 2, 3]


def _order(dm, epoch: int = 0) -> list[list[int]]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [b["input_ids"].tolist() for b in loader]


def test_shuffling_is_deterministic_per_seed(data, tok_dir):
    a, b, c = (instr_dm(data, tok_dir, seed=s, batch_size=2) for s in (1, 1, 2))
    for dm in (a, b, c):
        dm.setup("fit")
    assert _order(a) == _order(b) and _order(a, 3) == _order(b, 3)
    assert _order(a) != _order(c)
    assert _order(a, 0) != _order(a, 1)
    assert _order(a, 0) == _order(a, 0)  # epoch order depends on (seed, epoch) only


# ------------------------------------------------------------------------------------------------------------------
# tokenizer resolution and the hub path
# ------------------------------------------------------------------------------------------------------------------
def test_tokenizer_from_connected_model(data, tok_dir, tok):
    dm = instr_dm(data, tok_dir, tokenizer=None)
    with pytest.raises(ValueError, match=r"InstructionDataModule: no tokenizer given and none to inherit \(no model "
                                         r"was connected\); set data\.init_args\.tokenizer"):
        dm.setup("fit")
    dm.connect_model(ModelInfo())
    with pytest.raises(ValueError, match=r"\(the connected model gave no tokenizer\); set data\.init_args\.tokenizer"):
        dm.setup("fit")
    dm.connect_model(ModelInfo(tokenizer=str(tok_dir)))
    dm.setup("fit")
    assert dm.tokenizer.get_vocab() == tok.get_vocab() and dm.pad_token_id == tok.pad_token_id
    # an explicit tokenizer wins over the model's
    explicit = instr_dm(data, tok_dir)
    explicit.connect_model(ModelInfo(tokenizer=str(data.root)))
    assert explicit.tokenizer_source() == str(tok_dir)
    with pytest.raises(RuntimeError, match=rf"(?s)cannot load the tokenizer from local folder {data.root}: .*"
                                           r"set data\.init_args\.tokenizer"):
        _ = instr_dm(data, tok_dir, tokenizer=str(data.root)).tokenizer  # a folder with no tokenizer in it


def test_pad_falls_back_to_eos(data, tmp_path, tok):
    folder = make_tokenizer(tmp_path / "nopad", pad=False)
    dm = instr_dm(data, folder)
    dm.setup("fit")
    assert dm.tokenizer.pad_token is None and dm.pad_token_id == tok.eos_token_id
    batch = next(iter(dm.train_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    row = int(lengths.argmin())
    assert batch["input_ids"][row, int(lengths[row]):].eq(tok.eos_token_id).all()


def test_hub_names_go_to_load_dataset(data, tok_dir, monkeypatch):
    import datasets

    calls = []
    tables = {"meta-math/MetaMathQA-40K": METAMATH, "openai/gsm8k": GSM8K}

    def fake_load_dataset(path, name=None, *, split=None, cache_dir=None, **kw):
        calls.append((path, name, split, cache_dir))
        return datasets.Dataset.from_list(tables[path])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = instr_dm(data, tok_dir, train_data="meta-math/MetaMathQA-40K", eval_data="openai/gsm8k")
    dm.prepare_data()
    dm.setup()
    assert calls[-2:] == [("meta-math/MetaMathQA-40K", None, "train", data.cache), ("openai/gsm8k", "main", "test",
                                                                                    data.cache)]
    assert len(dm.train_set) == 6 and len(dm.eval_set) == 3

    def failing(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(RuntimeError, match=r"could not load train_data 'some/dataset'.*ConnectionError: offline"):
        instr_dm(data, tok_dir, train_data="some/dataset").setup("fit")


def test_constructor_validation(data, tok_dir):
    with pytest.raises(ValueError, match="unknown eval_task 'gsm8K'"):
        instr_dm(data, tok_dir, eval_task="gsm8K")
    with pytest.raises(ValueError, match=r"val_fraction must lie in \[0, 1\)"):
        instr_dm(data, tok_dir, val_fraction=1.0)
    with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
        instr_dm(data, tok_dir, max_length=0)


class _TinyLM(L.LightningModule):
    """Consumes both batch formats through a real Trainer; hands its tokenizer to the datamodule (the model side of
    :mod:`lit_peft.handover`)."""

    def __init__(self, tokenizer: str, vocab: int) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.emb = torch.nn.Embedding(vocab, 8)
        self.out = torch.nn.Linear(8, vocab)
        self.seen: dict[str, int] = {"train": 0, "val": 0}
        self.data_info: DataInfo | None = None

    def model_info(self) -> ModelInfo:
        return ModelInfo(tokenizer=self.tokenizer)

    def connect_data(self, info: DataInfo) -> None:
        self.data_info = info

    def training_step(self, batch, batch_idx):
        self.seen["train"] += 1
        logits = self.out(self.emb(batch["input_ids"]))[:, :-1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten())

    def validation_step(self, batch, batch_idx):
        self.seen["val"] += 1
        assert len(batch["answers"]) == batch["input_ids"].shape[0] and batch["attention_mask"][:, -1].eq(1).all()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_fit_end_to_end(data, tok_dir, tok):
    dm = instr_dm(data, tok_dir, tokenizer=None, max_eval_samples=2)
    model = _TinyLM(str(tok_dir), len(tok))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert model.seen == {"train": 2, "val": 1}  # 6 examples / batch 3; 2 eval prompts / batch 2
    assert model.data_info == DataInfo("InstructionDataModule", eval_task="gsm8k")


def test_text_data_info_without_setup(data, tok_dir):
    dm = instr_dm(data, tok_dir, tokenizer=None)
    assert isinstance(dm, DataSide)
    assert dm.data_info() == DataInfo("InstructionDataModule", eval_task="gsm8k") and dm.connected_model is None
    assert instr_dm(data, tok_dir, eval_data=None, eval_task=None).data_info().eval_task is None
    for task, labels, metric in (("stsb", 1, "pearson"), ("mnli", 3, "accuracy"), ("cola", 2, "matthews")):
        glue = GLUEDataModule(task=task)
        assert glue.data_info() == DataInfo("GLUEDataModule", task=task, num_classes=labels, metric=metric)
        assert (glue.task, glue.num_labels, glue.metric_name) == (task, labels, metric)
