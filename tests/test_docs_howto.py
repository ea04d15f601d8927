"""The how-to pages (``docs/howto/*.md``) stay true: every config they name exists, every ``python -m lit_peft``
command they show parses with the CLI (every key and class of it exists), every YAML block they show is a valid
config (section), every asset they prepare exists, and the instruction-tuning command of ``data.md`` runs through
the CLI (``fit`` then ``predict``) on a tiny local Llama.

Where the pages' other snippets run (for the report of issue #12): ``my_images.yaml`` with its ``fit`` and
``predict``, and the merged model loaded with ``timm.create_model("local-dir:…")``:
``tests/data/test_imagefolder.py``; VTAB ``predict``: ``tests/test_cli.py``; resuming: ``tests/test_cli.py``; ``plot``:
``tests/test_plot.py``; ``HF_HUB_OFFLINE`` and local-folder errors: ``tests/test_hub.py``; ``checkpoint_path``:
``tests/modules/test_vision.py``; merged Hugging Face folders and ``peft_adapter/``:
``tests/modules/test_causal_lm.py``.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from helpers.cli import REPO, print_config, run_cli
from lit_peft.cli import bundled_configs_dir

PAGES = sorted((REPO / "docs" / "howto").glob("*.md"))
#: files of a run folder, not configs
RUN_FILES = {"config.yaml", "hparams.yaml"}


def blocks(kind: str) -> list[tuple[str, str]]:
    """``(page name, text)`` of every fenced ``kind`` block of the pages."""
    return [(page.name, text) for page in PAGES
            for text in re.findall(rf"```{kind}\n(.*?)```", page.read_text(), flags=re.S)]


def doc_configs() -> dict[str, str]:
    """The complete configs the pages define: YAML blocks whose first line is ``# <name>.yaml``."""
    named = {}
    for _, text in blocks("yaml"):
        first = text.splitlines()[0]
        if re.fullmatch(r"# [\w.-]+\.yaml", first):
            named[first[2:]] = text
    return named


def commands(program: str) -> list[tuple[str, list[str]]]:
    """``(page, argv after the program)`` of every ``<program>`` command in the pages' bash blocks (continuation
    lines joined, comments dropped, ``$(python -m lit_peft.assets path NAME)`` replaced by ``/assets/NAME``)."""
    found = []
    for page, text in blocks("bash"):
        for line in text.replace("\\\n", " ").splitlines():
            line = re.sub(r"\$\(python -m lit_peft\.assets path ([\w.-]+)\)", r"/assets/\1", line)
            argv = shlex.split(line, comments=True)
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # HF_HUB_OFFLINE=1 python …
                argv = argv[1:]
            prefix = ["python", "-m", *program.split()]
            if argv[: len(prefix)] == prefix:
                found.append((page, argv[len(prefix):]))
    return found


def assets_named() -> set[str]:
    return {name for page in PAGES for name in re.findall(r"lit_peft\.assets path ([\w.-]+)", page.read_text())}


# ------------------------------------------------------------------------------------------------------------------
# links, configs and assets the pages name
# ------------------------------------------------------------------------------------------------------------------
def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_link_of_the_pages_resolves():
    checked = 0
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            assert path.is_file(), f"{page.name}: link to {target}: no file {path}"
            if anchor:
                assert anchor in anchors(path), f"{page.name}: link to {target}: no heading #{anchor} in {path.name}"
            checked += 1
    assert checked > 10


# ------------------------------------------------------------------------------------------------------------------
# configs and assets the pages name
# ------------------------------------------------------------------------------------------------------------------
def test_every_config_the_pages_name_exists():
    defined = doc_configs()
    assert "my_images.yaml" in defined
    named = {name for page in PAGES for name in re.findall(r"`(?:configs/)?([\w*./-]+\.yaml)`", page.read_text())}
    named |= {argv[argv.index("--config") + 1] for _, argv in commands("lit_peft") if "--config" in argv}
    assert len(named) > 10
    missing = [n for n in sorted(named - RUN_FILES - set(defined))
               if not glob.glob(str(bundled_configs_dir() / n))]
    assert not missing, f"docs/howto names configs that are not in configs/: {missing}"


def test_every_asset_the_pages_use_exists_and_the_asset_commands_parse():
    from lit_peft import assets
    from lit_peft.assets.__main__ import _parser

    assert assets_named() and assets_named() <= set(assets.ASSETS), assets_named() - set(assets.ASSETS)
    found = commands("lit_peft.assets")
    assert len(found) >= 4
    for _, argv in found:
        args = _parser().parse_args(argv)
        names = getattr(args, "names", None) or ([args.name] if getattr(args, "name", None) else [])
        assert set(names) <= set(assets.ASSETS), argv
    default = re.search(r"the default set: ([\w -]+)", (REPO / "docs" / "howto" / "offline.md").read_text())
    assert default and default.group(1).split() == assets.default_names()


# ------------------------------------------------------------------------------------------------------------------
# every CLI command and YAML block of the pages parses (print_config: every key and class_path must exist)
# ------------------------------------------------------------------------------------------------------------------
CLI_COMMANDS = [(page, argv) for page, argv in commands("lit_peft") if argv and argv[0] != "plot"]


@pytest.fixture
def docs_dir(tmp_path, monkeypatch):
    """A working directory holding the pages' own configs (``my_images.yaml``), as a user's would."""
    for name, text in doc_configs().items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def without_ckpt_path(argv: list[str]) -> list[str]:
    """``argv`` less ``--ckpt_path X`` (the checkpoint is read when parsing; its keys are Lightning's own)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            out.append(arg)
    return out


@pytest.mark.parametrize("page,argv", CLI_COMMANDS, ids=[f"{p}:{' '.join(a)[:60]}" for p, a in CLI_COMMANDS])
def test_every_cli_command_parses(page, argv, docs_dir):
    assert argv[0] in ("fit", "validate", "test", "predict"), argv
    if argv[0] == "predict" or "--ckpt_path" in argv:
        assert "--ckpt_path" in argv and argv[argv.index("--ckpt_path") + 1].endswith(".ckpt"), argv
    config = print_config(*without_ckpt_path(argv[1:]))
    assert config["model"]["class_path"] and config["data"]["class_path"]


def test_print_config_refuses_a_key_a_class_lacks(docs_dir):
    """The check above has teeth: a misspelt argument fails to parse."""
    from lit_peft.cli import main

    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as exc:
        main(["fit", "--config", "my_images.yaml", "--data.init_args.val_fractoin", "0.1", "--print_config"])
    assert exc.value.code not in (0, None)


def base_config_for(section: dict) -> str:
    """A bundled config with the same model/data classes as ``section`` (so that ``section`` overlays it)."""
    for path in sorted(bundled_configs_dir().glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        if all(config.get(key, {}).get("class_path") == value.get("class_path")
               for key, value in section.items() if key in ("model", "data")):
            return path.name
    return "my_images.yaml"


YAML_BLOCKS = [(page, text) for page, text in blocks("yaml")]


@pytest.mark.parametrize("page,text", YAML_BLOCKS, ids=[f"{p}:{t.splitlines()[0][:40]}" for p, t in YAML_BLOCKS])
def test_every_yaml_block_is_a_valid_config_or_section(page, text, docs_dir):
    section = yaml.safe_load(text)
    overlay = docs_dir / "overlay.yaml"
    overlay.write_text(text)
    if {"model", "data"} <= set(section):
        config = print_config("--config", str(overlay))
    else:
        config = print_config("--config", base_config_for(section), "--config", str(overlay))
    for key, value in section.items():
        if isinstance(value, dict) and "class_path" in value:
            assert config[key]["class_path"] == value["class_path"]
            assert set(value.get("init_args", {})) <= set(config[key]["init_args"])


def test_data_help_lists_the_arguments_the_pages_use():
    from lit_peft.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        main(["fit", "--data.help", "lit_peft.data.imagefolder.ImageFolderDataModule"])
    assert exc.value.code in (0, None)
    for name in ("data_root", "train_dir", "val_dir", "test_dir", "val_fraction", "img_size", "batch_size"):
        assert f"--data.{name} " in out.getvalue() or f"--data.{name}\n" in out.getvalue(), name


# ------------------------------------------------------------------------------------------------------------------
# data.md's instruction-tuning command, run through the CLI on a tiny local Llama, then predict
# ------------------------------------------------------------------------------------------------------------------
def test_instruction_command_fits_and_predicts_through_the_cli(llama_dir, tmp_path):
    """``fit --config math_lora.yaml`` with the page's overrides (a local model folder, local JSON lines with other
    field names, a local eval file), sized for the CPU (2 steps, a few new tokens), then ``predict``: one line per
    eval example with its row, prompt and generated output."""
    page = (REPO / "docs" / "howto" / "data.md").read_text()
    argv = next(a for p, a in commands("lit_peft") if p == "data.md" and "math_lora.yaml" in a)
    data = tmp_path / "my_text"
    data.mkdir()
    rows = [json.loads(line) for line in (llama_dir / "data" / "train.jsonl").read_text().splitlines()]
    (data / "train.jsonl").write_text("".join(json.dumps({"question": r["query"], "answer": r["response"]}) + "\n"
                                              for r in rows))
    (data / "test.jsonl").write_text((llama_dir / "data" / "gsm8k_test.jsonl").read_text())
    assert "/data/my_text/train.jsonl" in page
    argv = [a.replace("/models/my-llm", str(llama_dir / "model")).replace("/data/my_text", str(data)) for a in argv]
    small = ["--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
             "--trainer.precision", "32-true", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps",
             "0", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", "runs",
             "--trainer.logger.init_args.save_dir", "runs", "--model.init_args.max_new_tokens", "4",
             "--model.init_args.attn_implementation", "eager", "--data.init_args.num_workers", "0",
             "--data.init_args.batch_size", "4", "--data.init_args.max_length", "64"]
    out = run_cli(*argv, *small, cwd=tmp_path)
    assert "96 training examples" in out, out[-3000:]
    checkpoints = list((tmp_path / "runs").rglob("checkpoints/*.ckpt"))
    assert [c.name for c in checkpoints] == ["last.ckpt"], checkpoints  # what every shipped config writes
    # enable_progress_bar: false hides the config's RichProgress bar; its epoch line stays
    assert re.search(r"^epoch 1/1 · step 2 · ", out, re.M), out[-3000:]
    test_file = checkpoints[0].parents[1] / "predictions.jsonl"
    test_rows = [json.loads(line) for line in test_file.read_text().splitlines()]
    assert {"index", "prompt", "output", "extracted", "gold", "correct"} <= set(test_rows[0])  # test_after_fit

    predict = ["predict", *argv[1:], *small, "--ckpt_path", str(checkpoints[0])]
    out = run_cli(*predict, cwd=tmp_path)
    match = re.search(r"PredictionWriter: 6 predictions written to (\S+)", out)
    assert match, out[-3000:]
    rows = [json.loads(line) for line in (tmp_path / match.group(1)).read_text().splitlines()]
    assert [(r["index"], r["id"]) for r in rows] == [(i, i) for i in range(6)]
    for row in rows:
        assert set(row) == {"index", "id", "prompt", "output"} and row["prompt"].endswith("### Response:\n")
        assert isinstance(row["output"], str)
