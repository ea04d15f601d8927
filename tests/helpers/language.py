"""The tiny Llama of the language tests and its data, and small helpers for ``transformers`` models.

A tiny Llama (``LlamaConfig``: hidden 64, 2 layers, 4 heads, tied embeddings) and a word-level tokenizer trained with
``tokenizers`` on synthetic arithmetic Q/A, briefly pre-trained (plain PyTorch) so that it is a language model of
the data, both saved with ``save_pretrained``; beside them train / GSM-8K-style eval jsonl files.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lit_peft.data import format_prompt

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NUMBERS = range(0, 10)


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


def build_tiny_llama(root: Path) -> Path:
    """The tiny Llama pre-trained for a few steps on the arithmetic data, with its tokenizer, in ``root/model``; the
    train / GSM-8K-style eval jsonl files in ``root/data``. Returns ``root``."""
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


def adamw(lr: float):
    return functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)


def logits_of(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
