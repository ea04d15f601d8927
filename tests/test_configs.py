"""The shipped configs, the VTAB sweep generator and the results collector.

(a) every YAML under ``configs/`` parses with the CLI (``fit --print_config``, in-process, nothing downloaded: sockets
    are refused and ``timm.create_model`` must not run), and the paper configs keep the house style (first-line
    comment, explicit integer seed, every argument spelled out);
(b) ``scripts/vtab_sweep.py`` writes 19 configs per method with the paper's per-task lrs and the tasks' class counts,
    and what it writes (with its per-seed overrides) parses;
(c) ``scripts/collect_results.py`` turns fake ``metrics.csv`` files into the table beside the paper's numbers;
(d) the paper configs' adapters have the papers' parameter counts (backbones built on the ``meta`` device);
(e) the LLM and GLUE configs (``math_*``, ``commonsense_*``, ``glue_*``) keep their house style and have the papers'
    parameter counts (the real architectures built on the ``meta`` device from their published configs);
and a bare config name (``--config demo.yaml``) resolves to the bundled ``configs/`` folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import shlex
import socket
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

from helpers.cli import REPO, print_config
from helpers.language import PROJECTIONS
from lit_peft.adapters import count_parameters, resolve_targets
from lit_peft.adapters.svft import support_size
from lit_peft.cli import bundled_configs_dir, resolve_config_args
from lit_peft.data import FEWSHOT_DATASETS, VTAB_TASKS

CONFIGS = REPO / "configs"
ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))
PAPER_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name.startswith(("vtab_", "fewshot_")))
ADAMW_KEYS = {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable", "differentiable",
              "fused"}
#: Arguments that only some supported Lightning versions have, so a shipped config cannot spell them out.
VERSION_DEPENDENT = {"save_on_exception"}
REAL_CREATE_MODEL = timm.create_model  # the no_downloads fixture replaces timm.create_model while configs parse


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_lit_peft_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sweep = load_script("vtab_sweep")
collect = load_script("collect_results")


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Parsing a config must not reach the network nor build a model."""

    def refuse_connect(self, *args, **kwargs):
        raise AssertionError(f"network access while parsing a config: {args}")

    def refuse_model(*args, **kwargs):
        raise AssertionError(f"timm.create_model{args} called while parsing a config")

    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    monkeypatch.setattr(timm, "create_model", refuse_model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["lit_peft"])  # LightningCLI warns when sys.argv and args both carry arguments


def raw(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def config_args(path: Path) -> list[str]:
    """A config without a ``model`` is an overlay (e.g. a strategy): parse it on top of the demo config."""
    if "model" in (raw(path) or {}):
        return ["--config", str(path)]
    return ["--config", str(CONFIGS / "demo.yaml"), "--config", str(path)]


def missing_keys(written, full, where: str) -> list[str]:
    """Keys of ``class_path``/``init_args`` blocks that the printed config has and the written one leaves out."""
    problems = []
    if isinstance(full, dict) and isinstance(written, dict):
        if "class_path" in full and "init_args" in full:
            have = set((written.get("init_args") or {}))
            for key in full["init_args"]:
                if key not in have and key not in VERSION_DEPENDENT:
                    problems.append(f"{where}.init_args.{key} ({full['class_path']})")
        for key, value in full.items():
            if key in written:
                problems += missing_keys(written[key], value, f"{where}.{key}")
    elif isinstance(full, list) and isinstance(written, list) and len(full) == len(written):
        for i, (w, f) in enumerate(zip(written, full)):
            problems += missing_keys(w, f, f"{where}[{i}]")
    return problems


# -- (a) the shipped configs ----------------------------------------------------------------------------------------


def test_paper_configs_exist():
    names = {p.name for p in PAPER_CONFIGS}
    expected = {"vtab_boft.yaml", "vtab_oft.yaml", "vtab_lora.yaml", "vtab_svft.yaml", "fewshot_svft_plain.yaml",
                "fewshot_svft_banded.yaml", "fewshot_svft_random.yaml", "fewshot_svft_top_k.yaml",
                "fewshot_lora.yaml", "fewshot_vera.yaml", "fewshot_boft.yaml"}
    assert expected <= names, expected - names


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses(path):
    config = print_config(*config_args(path))
    assert config["model"]["class_path"]
    seed = config["seed_everything"]
    assert isinstance(seed, int) and not isinstance(seed, bool), f"seed_everything must be an explicit int: {seed!r}"


def test_bare_config_name_resolves_to_configs_folder():
    config = print_config("--config", "vtab_boft.yaml")
    assert config["data"]["init_args"]["task"] == "cifar100"


def test_bare_config_name_resolves_to_bundled_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_args(["fit", "--config", "demo.yaml"])[2] == str(bundled_configs_dir() / "demo.yaml")
    assert resolve_config_args(["fit", "--config=configs/demo.yaml"])[1] == f"--config={bundled_configs_dir() / 'demo.yaml'}"
    (tmp_path / "demo.yaml").write_text("seed_everything: 1\n")  # a file here wins over the bundled one
    assert resolve_config_args(["fit", "--config", "demo.yaml"])[2] == "demo.yaml"
    with pytest.raises(SystemExit, match="vtab_boft.yaml"):  # the error lists what is bundled
        resolve_config_args(["fit", "--config", "no_such.yaml"])


def test_yaml_syntax_error_names_its_file(tmp_path, monkeypatch):
    """With several --config files, a syntax error in the second says which file (and where)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "override.yaml").write_text("trainer:\n  max_steps: [1\n")
    with pytest.raises(SystemExit, match=r"lit_peft: config override\.yaml, line 3, column 1: not valid YAML"):
        resolve_config_args(["fit", "--config", "demo.yaml", "--config", "override.yaml"])


def test_test_after_fit_best_without_checkpointing_fails_before_fit(tmp_path):
    from helpers.cli import cli_env
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "lit_peft", "fit", "--config", "demo.yaml", "--test_after_fit",
                           "best", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
                           "--trainer.default_root_dir", str(tmp_path)],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "test_after_fit: best needs a checkpoint" in out, out[-2000:]
    assert "Epoch" not in out and not list(tmp_path.rglob("metrics.csv")), "it must fail before any training"


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_spells_out_every_key(path):
    """Configs are the user interface: every class_path block lists all its init_args (so switching a class never
    inherits another's values silently), and a full config says which paper table it reproduces."""
    written = raw(path)
    if "model" in written:
        full = print_config("--config", str(path))
        problems = missing_keys(written, full, "config")
        assert not problems, f"{path.name}: not spelled out: {problems}"


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.name)
def test_paper_config_house_style(path):
    text = path.read_text(encoding="utf-8")
    first = text.splitlines()[0]
    assert first.startswith("# ") and ("Table" in first or "table" in first), f"first line must name the table: {first}"
    written = raw(path)
    seed = written["seed_everything"]
    assert isinstance(seed, int) and not isinstance(seed, bool)
    trainer = written["trainer"]
    assert trainer["precision"] == "bf16-mixed" and trainer["accelerator"] == "auto" and trainer["devices"] == 1
    assert trainer["logger"]["class_path"] == "lit_peft.loggers.CSVTensorBoardLogger"
    assert trainer["logger"]["init_args"]["tensorboard"] is True
    model = written["model"]["init_args"]
    assert model["pretrained"] is True and model["img_size"] == 224
    optimizer = model["optimizer"]
    assert optimizer["class_path"] == "torch.optim.AdamW"
    assert set(optimizer["init_args"]) == ADAMW_KEYS
    callbacks = [c["class_path"].rsplit(".", 1)[1] for c in trainer["callbacks"]]
    assert "MergeAdapters" in callbacks
    adapter = model["adapter"]["class_path"].rsplit(".", 1)[1]
    assert ("SVDCache" in callbacks) == (adapter == "SVFT")
    assert ("OrthogonalityCheck" in callbacks) == (adapter in ("BOFT", "OFT"))


@pytest.mark.parametrize("path", [p for p in PAPER_CONFIGS if p.name.startswith("vtab_")], ids=lambda p: p.name)
def test_vtab_protocol(path):
    c = raw(path)
    model, data, trainer = c["model"]["init_args"], c["data"]["init_args"], c["trainer"]
    assert c["test_after_fit"] == "final"
    assert model["backbone"] == "vit_large_patch14_dinov2"
    assert model["num_classes"] == VTAB_TASKS[data["task"]] and data["task"] == "cifar100" and data["final"] is True
    assert trainer["max_epochs"] == 30 and data["batch_size"] == 64 and data["img_size"] == 224
    assert model["optimizer"]["init_args"]["weight_decay"] == 0.02
    assert model["lr_schedule"] == "cosine" and model["warmup_ratio"] == 0.1
    adapter = model["adapter"]["init_args"]
    assert adapter["target_modules"] == ["qkv", "proj", "fc1", "fc2"] and adapter["fused_qkv"] == "split"
    expected_lr = {"vtab_boft.yaml": sweep.task_lr("boft_m2b8", "cifar100"),
                   "vtab_oft.yaml": sweep.task_lr("oft_b16", "cifar100"),
                   "vtab_lora.yaml": sweep.task_lr("lora_r4", "cifar100"), "vtab_svft.yaml": 5e-2}[path.name]
    assert model["optimizer"]["init_args"]["lr"] == pytest.approx(expected_lr)


@pytest.mark.parametrize("path", [p for p in PAPER_CONFIGS if p.name.startswith("fewshot_")], ids=lambda p: p.name)
def test_fewshot_protocol(path):
    c = raw(path)
    model, data, trainer = c["model"]["init_args"], c["data"]["init_args"], c["trainer"]
    assert c["test_after_fit"] == "best"
    assert model["backbone"] == "vit_base_patch16_224.augreg_in21k"
    assert model["num_classes"] == FEWSHOT_DATASETS[data["dataset"]]
    assert (data["shots"], data["val_shots"], data["seed"], data["batch_size"]) == (10, 2, 42, 64)
    assert trainer["max_epochs"] == 10 and model["head_lr"] == 4e-3
    assert model["optimizer"]["init_args"]["weight_decay"] == 0.01
    assert model["lr_schedule"] == "linear" and model["warmup_ratio"] == 0.1
    assert model["adapter"]["init_args"]["target_modules"] == ["qkv.q", "qkv.v"]
    checkpoint = [cb for cb in trainer["callbacks"] if cb["class_path"].endswith("ModelCheckpoint")]
    assert len(checkpoint) == 1
    assert {k: checkpoint[0]["init_args"][k] for k in ("monitor", "mode", "save_top_k")} == {
        "monitor": "val_acc", "mode": "max", "save_top_k": 1}
    adapter = model["adapter"]
    if adapter["class_path"].endswith("SVFT"):
        pattern = adapter["init_args"]["pattern"]
        lr = model["optimizer"]["init_args"]["lr"]
        assert lr == (5e-2 if pattern == "plain" else 5e-3)
        if pattern != "plain":
            assert adapter["init_args"]["off_diag"] == 4


# -- (d) parameter counts against the papers ------------------------------------------------------------------------


def meta_backbone(model_args: dict) -> torch.nn.Module:
    with torch.device("meta"):  # no weights: pretrained=False, and nothing is allocated
        return REAL_CREATE_MODEL(model_args["backbone"], pretrained=False, num_classes=model_args["num_classes"],
                                 img_size=model_args["img_size"], **(model_args["model_kwargs"] or {}))


def adapter_params(model_args: dict) -> int:
    """Adapter parameters of a config's adapter on its backbone (``meta`` device; SVFT counted from its support)."""
    spec = model_args["adapter"]
    module, name = spec["class_path"].rsplit(".", 1)
    adapter = getattr(importlib.import_module(module), name)(**spec["init_args"])
    model = meta_backbone(model_args)
    if name == "SVFT":  # the SVD cannot run on meta tensors: count |Ω| (+1 gate per part when gated)
        modules = dict(model.named_modules())
        total = 0
        for layer, parts in resolve_targets(model, adapter.target_modules, adapter.fused_qkv).items():
            for start, stop in parts.values():
                rank = min(stop - start, modules[layer].in_features)
                total += support_size(rank, adapter.pattern, adapter.off_diag) + (adapter.init == "gated")
        return total
    adapter.apply(model)
    return count_parameters(model)["adapter"]


PAPER_PARAMS = {  # config: (rounding unit, printed #params), from the papers' tables in docs/protocols.md
    "vtab_boft.yaml": (1e6, 1.99), "vtab_oft.yaml": (1e6, 2.10), "vtab_lora.yaml": (1e6, 1.77),
    "fewshot_lora.yaml": (1e3, 294.9), "fewshot_vera.yaml": (1e3, 24.6), "fewshot_svft_plain.yaml": (1e3, 18.5),
    "fewshot_svft_banded.yaml": (1e3, 165.4), "fewshot_svft_random.yaml": (1e3, 165.4),
}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_parameter_counts(name):
    unit, printed = PAPER_PARAMS[name]
    count = adapter_params(raw(CONFIGS / name)["model"]["init_args"])
    assert round(count / unit, 2 if unit == 1e6 else 1) == printed, f"{name}: {count:,}"


@pytest.mark.parametrize("method,printed", [("boft_m4b4", 1.77), ("boft_m6b2", 1.11)])
def test_sweep_parameter_counts(method, printed, tmp_path):
    written = sweep.write_configs([method], tmp_path, tasks=["cifar100"])
    count = adapter_params(raw(written[method][0])["model"]["init_args"])
    assert round(count / 1e6, 2) == printed, f"{method}: {count:,}"


# -- (e) the LLM and GLUE configs -----------------------------------------------------------------------------------

TEXT_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name.startswith(("math_", "commonsense_", "glue_")))


def test_text_configs_exist():
    names = {p.stem for p in TEXT_CONFIGS}
    assert names == {"math_svft_plain", "math_svft_banded", "math_svft_random", "math_boft", "math_lora", "math_dora",
                     "commonsense_svft_banded", "glue_boft", "glue_svft_plain", "glue_svft_random", "glue_lora"}


@pytest.mark.parametrize("path", TEXT_CONFIGS, ids=lambda p: p.name)
def test_text_config_house_style(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# Reproduces") and "table" in first.lower(), first
    written = raw(path)
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


def meta_text_model(name: str):
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
TEXT_PAPER_PARAMS = {"math_svft_plain.yaml": 0.19, "math_svft_random.yaml": 6.35, "math_svft_banded.yaml": 6.35,
                     "glue_boft.yaml": 0.75, "glue_svft_plain.yaml": 0.06, "glue_svft_random.yaml": 0.28,
                     "glue_lora.yaml": 1.33}


@pytest.mark.parametrize("name", sorted(TEXT_PAPER_PARAMS))
def test_text_config_parameter_counts(name):
    """The configs' adapters on the real architectures (built on the meta device from their published configs) have
    the papers' parameter counts; DeBERTa's new head (pooler.dense, classifier) is excluded as the module does."""
    import importlib

    from lit_peft.adapters import count_parameters, resolve_targets
    from lit_peft.adapters.svft import support_size

    model_args = raw(CONFIGS / name)["model"]["init_args"]
    spec = model_args["adapter"]
    module, cls = spec["class_path"].rsplit(".", 1)
    adapter = getattr(importlib.import_module(module), cls)(**spec["init_args"])
    model = meta_text_model(model_args["model_name_or_path"])
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
    assert round(count / 1e6, 2) == TEXT_PAPER_PARAMS[name], f"{name}: {count:,}"


# -- (b) the sweep generator ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    return out, sweep.write_configs(list(sweep.METHODS), out, seed=0, data_root="/data/vtab-1k")


def test_sweep_task_order_matches_lit_peft():
    assert sweep.TASK_ORDER == tuple(VTAB_TASKS)
    assert collect.VTAB_TASKS == tuple(VTAB_TASKS)
    assert set(sweep.METHODS) == {"boft_m2b8", "boft_m4b4", "boft_m6b2", "oft_b16", "lora_r4"}


def test_sweep_writes_19_configs_per_method(swept):
    out, written = swept
    for method, paths in written.items():
        assert len(paths) == 19 and len(set(paths)) == 19, method
        assert sorted(p.stem for p in (out / "configs" / method).glob("*.yaml")) == sorted(VTAB_TASKS)
        assert not list((out / "configs" / method).glob(".*")), "temporary files left behind"
        for path in paths:
            config = raw(path)
            task = config["data"]["init_args"]["task"]
            assert path.stem == task
            assert config["model"]["init_args"]["num_classes"] == VTAB_TASKS[task]
            assert config["data"]["init_args"]["data_root"] == "/data/vtab-1k"
            assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == sweep.task_lr(method, task)
            assert path.read_text().startswith("# BOFT paper Table 4")


@pytest.mark.parametrize("method,task,lr", [
    ("boft_m4b4", "svhn", 3e-3), ("boft_m4b4", "smallnorb_azi", 5e-3), ("boft_m4b4", "patch_camelyon", 1e-3),
    ("boft_m2b8", "svhn", 3e-3), ("boft_m2b8", "dsprites_loc", 4e-3),  # m=2 b=8 uses the m=4 b=4 row
    ("boft_m6b2", "patch_camelyon", 4e-3), ("boft_m6b2", "kitti_dist", 3e-3), ("boft_m6b2", "caltech101", 9e-4),
    ("oft_b16", "oxford_iiit_pet", 3e-4), ("oft_b16", "dmlab", 2e-3), ("oft_b16", "smallnorb_ele", 6e-4),
    ("lora_r4", "svhn", 1e-3),
])
def test_sweep_learning_rates(swept, method, task, lr):
    out, _ = swept
    config = raw(sweep.config_path(out, method, task))
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == pytest.approx(lr, rel=0, abs=1e-12)


def test_sweep_adapter_shapes(swept):
    out, _ = swept
    shapes = {"boft_m2b8": (8, 2), "boft_m4b4": (4, 4), "boft_m6b2": (2, 6)}
    for method, (b, m) in shapes.items():
        adapter = raw(sweep.config_path(out, method, "dtd"))["model"]["init_args"]["adapter"]
        assert adapter["class_path"] == "lit_peft.adapters.BOFT"
        assert (adapter["init_args"]["block_size"], adapter["init_args"]["n_butterfly_factors"]) == (b, m)
    assert raw(sweep.config_path(out, "oft_b16", "dtd"))["model"]["init_args"]["adapter"]["init_args"][
        "block_size"] == 16
    lora = raw(sweep.config_path(out, "lora_r4", "dtd"))["model"]["init_args"]["adapter"]["init_args"]
    assert (lora["rank"], lora["alpha"]) == (4, 4.0)


@pytest.mark.parametrize("method,task,seed", [("boft_m2b8", "smallnorb_azi", 3), ("lora_r4", "sun397", 1)])
def test_sweep_commands_parse(swept, method, task, seed):
    out, written = swept
    lines = sweep.commands({method: [sweep.config_path(out, method, task)]}, out, [0, seed])
    assert len(lines) == 2
    argv = shlex.split(lines[1])
    assert argv[:4] == ["python", "-m", "lit_peft", "fit"]
    config = print_config(*argv[4:])
    assert config["seed_everything"] == seed and config["data"]["init_args"]["seed"] == seed
    assert config["data"]["init_args"]["task"] == task
    assert config["model"]["init_args"]["num_classes"] == VTAB_TASKS[task]
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == sweep.task_lr(method, task)
    logger = config["trainer"]["logger"]["init_args"]
    assert Path(logger["save_dir"]) / logger["name"] == sweep.run_dir(out, method, task, seed)
    assert Path(config["trainer"]["default_root_dir"]) == sweep.run_dir(out, method, task, seed)


def test_sweep_cli(tmp_path, capsys):
    assert sweep.main(["--method", "oft_b16", "--seeds", "0", "1", "2", "--out-dir", str(tmp_path), "--slurm",
                       "--tasks", "svhn", "dmlab"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    runs = [line for line in printed if not line.startswith("#")]
    assert len(runs) == 6 and all("--config" in line for line in runs)
    assert printed[-1].startswith("# SLURM: sbatch --array=1-6%8")
    assert (tmp_path / "configs" / "commands.txt").read_text().strip().splitlines() == runs


# -- (c) the results collector --------------------------------------------------------------------------------------


def write_metrics(folder: Path, test_acc: float | None) -> None:
    folder.mkdir(parents=True)
    rows = ["epoch,step,test_acc,test_loss,train_loss", "0,15,,,2.3"]
    if test_acc is not None:
        rows.append(f"29,480,{test_acc},0.7,")
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")


def table_row(text: str, start: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {start}"))
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_collect_vtab(tmp_path, capsys):
    runs = tmp_path / "runs"
    tasks = list(VTAB_TASKS)
    for i, task in enumerate(tasks):  # every task, two seeds: (50 + i) and (52 + i) %, mean 51 + i
        write_metrics(runs / "boft_m2b8" / task / "seed_0" / "version_0", (50 + i) / 100)
        write_metrics(runs / "boft_m2b8" / task / "seed_1" / "version_0", (52 + i) / 100)
    # newest version with a test_acc wins: version_1 (90%) over version_0 (10%); version_2 crashed before testing
    for version, acc in (("version_0", 0.10), ("version_1", 0.90), ("version_2", None)):
        write_metrics(runs / "oft_b16" / "svhn" / "seed_0" / version, acc)
    write_metrics(runs / "svft_banded_d2" / "dtd" / "seed_0" / "version_0", 0.5)

    assert collect.main(["--table", "vtab", "--runs-dir", str(runs)]) == 0
    text = capsys.readouterr().out
    header = table_row(text, "method")
    assert header[2:] == [*collect.VTAB_HEADERS, "mean"]
    paper = table_row(text, "BOFT m=2 b=8 (paper)")
    assert paper[2:5] == ["78.1", "92.5", "80.6"] and paper[-1] == "77.9"
    assert table_row(text, "LoRA r=4 (paper)")[-1] == "76.6"
    ours = table_row(text, "BOFT m=2 b=8 (ours")
    assert "2 seeds" in ours[0]
    assert ours[2:] == [f"{51 + i:.1f}" for i in range(19)] + [f"{sum(51 + i for i in range(19)) / 19:.1f}"]
    oft = table_row(text, "OFT b=16 (ours")
    svhn = 2 + tasks.index("svhn")
    assert oft[svhn] == "90.0" and oft[-1] == "90.0 (1/19)"
    assert all(cell == collect.DASH for j, cell in enumerate(oft[2:-1], start=2) if j != svhn)
    assert table_row(text, "SVFT banded d=2 (ours")[2 + tasks.index("dtd")] == "50.0"
    assert "no paper number" in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    order = [line.split("|")[1].strip() for line in lines]
    assert order.index("BOFT m=2 b=8 (paper)") + 1 == order.index("BOFT m=2 b=8 (ours: boft_m2b8, 2 seeds)")


def test_collect_fewshot(tmp_path):
    runs = tmp_path / "runs"
    for seed, acc in ((42, 0.84), (123, 0.86), (3076, 0.85)):
        write_metrics(runs / "svft_banded_d4" / "cifar100" / f"seed_{seed}" / "version_0", acc)
    write_metrics(runs / "svft_banded_d4" / "resisc45" / "seed_42" / "version_0", 0.75)
    text = collect.build_table(collect.TABLES["fewshot"], runs, show_std=True)
    assert table_row(text, "SVFT banded d=4 (paper)")[2:] == ["84.65", "76.51", "99.21", "75.12", "83.87*"]
    assert table_row(text, "LoRA r=8 (paper)")[2:6] == ["85.65", "76.13", "99.14", "74.01"]
    ours = table_row(text, "SVFT banded d=4 (ours")
    assert "3 seeds" in ours[0] or "1–3 seeds" in ours[0]
    assert ours[2] == "85.00 ± 1.00" and ours[3] == ours[4] == collect.DASH and ours[5] == "75.00"
    assert ours[6] == "80.00 (2/4)"
    matched = collect.build_table(collect.TABLES["fewshot"], runs, paper_rows="matched")
    assert "VeRA r=256 (paper)" not in matched and "Head only (paper)" in matched
