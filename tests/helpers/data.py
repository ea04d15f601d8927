"""Data the data-module tests generate (no downloads): solid-colour images in a VTAB-1k folder layout, and a tiny
byte-level BPE tokenizer trained with ``tokenizers`` and saved as a ``transformers`` tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from lit_peft.data import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT, VTABDataModule

# -- images --------------------------------------------------------------------------------------------------------
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]  # one solid colour per class
HALF = (0.5, 0.5, 0.5)


def write_image(path: Path, color, size=(12, 9), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)


def make_color_vtab_task(root: Path, task: str = "dmlab", counts=None) -> Path:
    """A tiny prepared VTAB-1k task folder: 3 classes, solid-colour images, the four list files."""
    counts = counts or {"train800": 2, "val200": 1, "test": 2}  # per class
    folder = root / task
    lines: dict[str, list[str]] = {}
    for split, n in counts.items():
        lines[split] = []
        for c, color in enumerate(COLORS):
            for i in range(n):
                rel = f"images/{split}/c{c}_{i}.png"
                # one grayscale and one odd-sized image to exercise the RGB conversion / resize
                mode = "L" if (split == "train800" and c == 1 and i == 0) else "RGB"
                write_image(folder / rel, color, size=(7 + i, 11), mode=mode)
                lines[split].append(f"{rel} {c}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, ls in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(ls) + "\n")
    return folder


def vtab_dm(root: Path, **kw) -> VTABDataModule:
    """The data module of the ``dmlab`` folder under ``root`` (``vtab_root``), 16×16 images normalised with 0.5."""
    args = dict(task="dmlab", data_root=str(root), img_size=16, batch_size=4, num_workers=0, mean=HALF, std=HALF)
    args.update(kw)
    return VTABDataModule(**args)


# -- text ----------------------------------------------------------------------------------------------------------
BOS, EOS, PAD = "<s>", "</s>", "<pad>"

CORPUS = [
    ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT,
    "What is 2 + 3? Natalia sold clips to 48 of her friends in April. The answer is: 5",
    "#### 42 #### 72 the answer is true false option1 option2 solution1 solution2",
    "A man is playing a guitar. The cat sat on the mat. Is the sky blue? Yes it is.",
] * 3


def make_tokenizer(folder: Path, *, pad: bool = True, token_types: bool = False) -> Path:
    """Train a tiny byte-level BPE (exact decode round trip), add a Llama-like BOS post-processor, save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[PAD, BOS, EOS, "<unk>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {EOS} $B:1 {EOS}:1", special_tokens=[(BOS, bos), (EOS, eos)])
    kwargs = dict(bos_token=BOS, eos_token=EOS, unk_token="<unk>")
    if pad:
        kwargs["pad_token"] = PAD
    if token_types:
        kwargs["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs).save_pretrained(str(folder))
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
