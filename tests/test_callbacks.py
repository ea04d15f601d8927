"""The Lightning callbacks (``lit_peft.callbacks``): ``SVDCache``, ``OrthogonalityCheck`` and ``MergeAdapters``.

Everything runs on a tiny timm ViT (2 blocks, width 64, 8×8 patches of 32×32 images) wrapped in ``ViTClassifier``.
The SVD-cache unit tests drive the callback's ``setup`` with a minimal fake trainer, then apply the adapter with
``configure_model`` exactly as Lightning does (the module finds the cache among its trainer's callbacks); the rest
run a real ``lightning.Trainer`` for a few steps on scikit-learn's digits (``DigitsDataModule``, no download).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lit_peft.adapters.svft as svft_module
import lit_peft.callbacks.merge as merge_module
import lit_peft.callbacks.svd_cache as svd_cache_module
from lit_peft.adapters import BOFT, SVFT, BOFTLinear, LoRA, adapted_layers, load_adapter, read_adapter_config
from lit_peft.adapters.svft import canonical_svd
from lit_peft.callbacks import (MergeAdapters, MergeCheckError, OrthogonalityCheck, OrthogonalityError,
                                SVDCache, find_svd_provider)
from lit_peft.data import DigitsDataModule
from lit_peft.modules.vision import ViTClassifier

BACKBONE = "vit_tiny_patch16_224"
NUM_CLASSES = 5
IMG_SIZE = 32
MODEL_KWARGS = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
SVFT_TARGETS = ["qkv", "proj", "fc1", "fc2"]
# The weight parts SVFT adapts (fused qkv split into q/k/v): 2 blocks × (3 + 1 + 1 + 1) = 12 SVDs.
PARTS = [(f"blocks.{i}.attn.qkv", (j * 64, (j + 1) * 64), f"blocks.{i}.attn.qkv.{p}")
         for i in range(2) for j, p in enumerate("qkv")]
PARTS += [(f"blocks.{i}.{leaf}", None, f"blocks.{i}.{leaf}") for i in range(2)
          for leaf in ("attn.proj", "mlp.fc1", "mlp.fc2")]
N_PARTS = len(PARTS)
SVD_DTYPE = torch.float32


# -- fixtures and helpers ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(1234))


@pytest.fixture(scope="module")
def digits():
    """One data module for every fit (its setup is cheap, but loading sklearn's digits once is cheaper)."""
    return DigitsDataModule(img_size=IMG_SIZE, batch_size=32)


class LightningLogRecords(logging.Handler):
    """Collects what ``rank_zero_info`` logs (the ``lightning.pytorch`` logger does not propagate to caplog)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, needle: str) -> list[str]:
        return [r.getMessage() for r in self.records if needle in r.getMessage()]


@pytest.fixture
def lightning_log():
    handler = LightningLogRecords()
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def svft(**kwargs) -> SVFT:
    # banded + gated: M is non-zero and off-diagonal from the start, so the outputs depend on U and V bit by bit.
    args = {"pattern": "banded", "off_diag": 1, "init": "gated", "target_modules": SVFT_TARGETS}
    return SVFT(**{**args, **kwargs})


def make_module(adapter, seed: int = 0, **kwargs) -> ViTClassifier:
    torch.manual_seed(seed)
    return ViTClassifier(BACKBONE, num_classes=NUM_CLASSES, img_size=IMG_SIZE, model_kwargs=MODEL_KWARGS,
                         adapter=adapter, **kwargs)


def fake_trainer(callbacks=()):
    """What ``SVDCache.setup`` and ``configure_model`` read from a trainer: the rank, a barrier, the callbacks."""
    return SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda name=None: None),
                           callbacks=list(callbacks))


def setup_with_cache(cache_dir: Path, module: ViTClassifier | None = None) -> tuple[ViTClassifier, SVDCache]:
    """Lightning's order: the callback's ``setup`` (fills the cache), then ``configure_model`` (applies SVFT with
    the SVD provider it finds among the trainer's callbacks)."""
    module = module if module is not None else make_module(svft())
    cache = SVDCache(cache_dir=str(cache_dir))
    fake = fake_trainer([cache])
    cache.setup(fake, module, "fit")
    module.trainer = fake
    module.configure_model()
    return module, cache


def part_weight(model: torch.nn.Module, name: str, rows) -> torch.Tensor:
    weight = model.get_submodule(name).weight.detach()
    return weight if rows is None else weight[rows[0]:rows[1]]


def entry_files(cache_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in Path(cache_dir).iterdir()}


def expected_entries(module: ViTClassifier, cache: SVDCache) -> dict[str, str]:
    """``{file name: part label}`` of every entry the module's weights should have."""
    return {cache.path(cache.key(part_weight(module.model, name, rows), SVD_DTYPE)).name: label
            for name, rows, label in PARTS}


@torch.no_grad()
def outputs(module: ViTClassifier, images: torch.Tensor) -> torch.Tensor:
    return module.model.eval()(images)


def svd_buffers(module: ViTClassifier) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.model.named_buffers() if k.rsplit(".", 1)[-1] in ("U", "S", "V")}


def trainer(tmp_path: Path, callbacks, max_steps: int = 2, **kwargs) -> L.Trainer:
    args = {"logger": False, "enable_progress_bar": False, "enable_checkpointing": False,
            "enable_model_summary": False, "limit_val_batches": 0, "num_sanity_val_steps": 0, **kwargs}
    return L.Trainer(max_steps=max_steps, callbacks=callbacks, default_root_dir=str(tmp_path), accelerator="cpu",
                     devices=1, **args)


@pytest.fixture(scope="module")
def reference(images):
    """Outputs and SVD buffers of the SVFT model built without any cache (``canonical_svd`` directly)."""
    module = make_module(svft())
    module.configure_model()
    return outputs(module, images), svd_buffers(module)


# == SVDCache ======================================================================================================
def test_svd_cache_is_an_svd_provider(tmp_path, images, reference):
    """Outside Lightning the cache is passed to ``apply``; the strategy is left as constructed (no provider kept)."""
    ref_out, _ = reference
    cache = SVDCache(cache_dir=str(tmp_path / "svd"))
    assert find_svd_provider([object(), cache]) is cache and find_svd_provider([]) is None
    for run, expected in enumerate([(N_PARTS, 0), (N_PARTS, N_PARTS)]):
        module = make_module(svft())
        strategy = module.adapter
        strategy.apply(module.model, svd_provider=cache)
        assert (cache.misses, cache.hits) == expected, f"run {run}"
        assert set(vars(strategy)) == set(strategy.init_args())
        assert torch.equal(outputs(module, images), ref_out)


def test_svd_cache_miss_then_hit(tmp_path, images, reference, monkeypatch):
    cache_dir = tmp_path / "svd"
    ref_out, ref_svd = reference

    # Cold: one miss per adapted weight part (q, k, v of each fused qkv separately), one file per part.
    cold, cache = setup_with_cache(cache_dir)
    assert cache.misses == N_PARTS
    assert cache.hits == N_PARTS  # configure_model's SVFT.apply then loads every part back from the cache
    files = entry_files(cache_dir)
    assert sorted(files) == sorted(expected_entries(cold, cache))  # exactly the entries, no temp files
    weights = {label: part_weight(cold.model, name, rows) for name, rows, label in PARTS}
    for file_name, label in expected_entries(cold, cache).items():
        tensors, meta = read_entry(files[file_name])
        assert meta["key"] == file_name.removesuffix(".safetensors"), label
        assert set(tensors) == {"U", "S", "V"}
        for k, computed in zip("USV", canonical_svd(weights[label], SVD_DTYPE)):  # the entry is the canonical SVD
            assert torch.equal(tensors[k], computed), (label, k)
    assert torch.equal(outputs(cold, images), ref_out)

    # Warm: every part is a hit, nothing is computed (canonical_svd would raise).
    def no_svd(*args, **kwargs):
        raise AssertionError("canonical_svd called on a warm cache")

    monkeypatch.setattr(svd_cache_module, "canonical_svd", no_svd)
    monkeypatch.setattr(svft_module, "canonical_svd", no_svd)
    mtimes = {name: p.stat().st_mtime_ns for name, p in files.items()}
    warm, cache = setup_with_cache(cache_dir)
    assert (cache.misses, cache.hits) == (0, 2 * N_PARTS)
    assert {name: p.stat().st_mtime_ns for name, p in entry_files(cache_dir).items()} == mtimes  # nothing rewritten

    # The cached SVD is the computed one, bit for bit: same buffers, same adapted outputs.
    warm_svd = svd_buffers(warm)
    assert warm_svd.keys() == ref_svd.keys() and len(warm_svd) == 3 * N_PARTS
    for key, tensor in ref_svd.items():
        assert torch.equal(warm_svd[key], tensor), key
    assert torch.equal(outputs(warm, images), ref_out)


# Every corruption replaces the file (new inode) rather than writing into it: entries loaded earlier in this process
# may still be memory-mapped, and truncating a mapped file under them would crash the test process (SIGBUS).
def replace_bytes(file: Path, data: bytes) -> None:
    tmp = file.with_name(file.name + ".corrupt")
    tmp.write_bytes(data)
    os.replace(tmp, file)


def replace_tensors(file: Path, tensors: dict, metadata: dict) -> None:
    tmp = file.with_name(file.name + ".corrupt")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, file)


def read_entry(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The entry's tensors (copied out of the file mapping) and metadata."""
    with safe_open(str(file), framework="pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}, f.metadata()


def _truncate(file: Path, **_):
    data = file.read_bytes()
    replace_bytes(file, data[: len(data) // 2])


def _garbage(file: Path, **_):
    replace_bytes(file, os.urandom(4096))


def _header_only_garbage(file: Path, **_):
    replace_bytes(file, (200).to_bytes(8, "little") + b"{not json" + b"\0" * 300)


def _foreign(file: Path, other: Path, **_):
    """A valid entry for another weight of the same shape (k instead of q), copied over the key's name."""
    replace_bytes(file, other.read_bytes())


def _foreign_relabelled(file: Path, other: Path, **_):
    """The same foreign entry with its metadata rewritten to claim this key: only the reconstruction catches it."""
    tensors, meta = read_entry(other)
    meta["key"] = file.name.removesuffix(".safetensors")
    replace_tensors(file, tensors, meta)


def _tampered(file: Path, **_):
    """Right key, right shapes, values changed (one singular value 1 % off): the reconstruction check catches it."""
    tensors, meta = read_entry(file)
    tensors["S"][0] *= 1.01
    replace_tensors(file, tensors, meta)


def _sign_flipped(file: Path, **_):
    """u_0 flipped without v_0: a different matrix, which must not be trusted either."""
    tensors, meta = read_entry(file)
    tensors["U"][:, 0] *= -1
    replace_tensors(file, tensors, meta)


def _nan(file: Path, **_):
    tensors, meta = read_entry(file)
    tensors["V"][3, 2] = float("nan")
    replace_tensors(file, tensors, meta)


def _wrong_shape(file: Path, **_):
    tensors, meta = read_entry(file)
    replace_tensors(file, {k: v[:-1] for k, v in tensors.items()}, meta)


def _missing_tensor(file: Path, **_):
    tensors, meta = read_entry(file)
    del tensors["V"]
    replace_tensors(file, tensors, meta)


CORRUPTIONS = {
    "truncated": (_truncate, "unreadable"),
    "garbage": (_garbage, "unreadable"),
    "bad-header": (_header_only_garbage, "unreadable"),
    "missing-tensor": (_missing_tensor, "unreadable"),
    "foreign-entry": (_foreign, "does not match"),
    "wrong-shape": (_wrong_shape, "does not match"),
    "foreign-relabelled": (_foreign_relabelled, "reconstructs"),
    "tampered-values": (_tampered, "reconstructs"),
    "sign-flipped": (_sign_flipped, "reconstructs"),
    "nan": (_nan, "reconstructs"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_svd_cache_corrupt_entry_recomputed(corruption, tmp_path, images, reference):
    corrupt, reason = CORRUPTIONS[corruption]
    cache_dir = tmp_path / "svd"
    module, cache = setup_with_cache(cache_dir)
    by_label = {label: cache_dir / name for name, label in expected_entries(module, cache).items()}
    target, other = by_label["blocks.0.attn.qkv.q"], by_label["blocks.0.attn.qkv.k"]
    good, _ = read_entry(target)
    corrupt(target, other=other)

    with pytest.warns(UserWarning, match=f"SVDCache: .*{reason}.*recomputing"):
        module, cache = setup_with_cache(cache_dir)
    # Detected and recomputed exactly once (in setup); configure_model then loads the rewritten entry.
    assert (cache.misses, cache.hits) == (1, 2 * N_PARTS - 1)
    # Rewritten: a valid entry again, equal to the original, and no temp file left behind.
    assert sorted(entry_files(cache_dir)) == sorted(expected_entries(module, cache))
    rewritten, meta = read_entry(target)
    assert meta["key"] == target.name.removesuffix(".safetensors")
    for k in "USV":
        assert torch.equal(rewritten[k], good[k]), k
    # Never trusted: the adapted model is bit-identical to the one built without a cache.
    ref_out, ref_svd = reference
    for key, tensor in svd_buffers(module).items():
        assert torch.equal(tensor, ref_svd[key]), key
    assert torch.equal(outputs(module, images), ref_out)

    # And the next run is all hits again.
    _, cache = setup_with_cache(cache_dir)
    assert (cache.misses, cache.hits) == (0, 2 * N_PARTS)


def test_svd_cache_loaded_svd_does_not_alias_the_file(tmp_path):
    """A verified entry must stay verified: the adapted model's SVD buffers must not be views of the cache file.

    ``safe_open(...).get_tensor`` returns tensors backed by a mapping of the file; if ``SVDCache.load`` hands them
    on uncopied, a later in-place write to the entry (another tool, ``rsync --inplace``, a shared cache) changes
    the live model's buffers after the reconstruction check, and truncating it makes any access a SIGBUS.
    """
    cache_dir = tmp_path / "svd"
    setup_with_cache(cache_dir)
    module, cache = setup_with_cache(cache_dir)  # all hits: every SVD comes from a file
    assert cache.misses == 0
    before = svd_buffers(module)
    for file in cache_dir.iterdir():  # same size, same header, other values: written in place
        size = file.stat().st_size
        with open(file, "r+b") as f:
            header = int.from_bytes(f.read(8), "little")
            f.seek(8 + header)
            f.write(b"\x3f" * (size - 8 - header))
    after = svd_buffers(module)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == [], f"{len(changed)} SVD buffers changed with the cache files, e.g. {changed[:3]}"


def test_svd_cache_changed_weight_is_a_miss(tmp_path):
    cache_dir = tmp_path / "svd"
    first, cache = setup_with_cache(cache_dir)
    before = {name: p.read_bytes() for name, p in entry_files(cache_dir).items()}

    changed = make_module(svft())
    with torch.no_grad():
        changed.model.blocks[1].mlp.fc1.weight[0, 0] += 1e-3  # one entry of one weight
    changed, cache = setup_with_cache(cache_dir, changed)
    assert (cache.misses, cache.hits) == (1, 2 * N_PARTS - 1)
    after = entry_files(cache_dir)
    assert len(after) == N_PARTS + 1  # the new key is a new entry; the old one is left alone
    new = set(after) - set(before)
    assert new == {cache.path(cache.key(changed.model.blocks[1].mlp.fc1.weight, SVD_DTYPE)).name}
    assert all(after[name].read_bytes() == data for name, data in before.items())
    # The key covers the SVD precision too.
    w = first.model.blocks[0].mlp.fc2.weight
    assert cache.key(w, torch.float32) != cache.key(w, torch.float64)


def test_svd_cache_other_adapter_is_a_no_op(tmp_path, lightning_log):
    module = make_module(BOFT(block_size=8))
    cache = SVDCache(cache_dir=str(tmp_path / "svd"))
    cache.setup(fake_trainer(), module, "fit")
    assert (cache.hits, cache.misses) == (0, 0)
    assert not (tmp_path / "svd").exists()
    assert "svd_provider" not in vars(module.adapter)
    assert lightning_log.messages("SVDCache: the adapter is BOFT")


def test_svd_cache_real_trainer_second_run_all_hits(tmp_path, digits):
    cache_dir = tmp_path / "svd"
    for run, expected in enumerate([(N_PARTS, N_PARTS), (0, 2 * N_PARTS)]):
        module = make_module(svft())
        cache = SVDCache(cache_dir=str(cache_dir))
        trainer(tmp_path / f"run{run}", [cache], max_steps=2).fit(module, datamodule=digits)
        assert (cache.misses, cache.hits) == expected, f"run {run}"
        assert sorted(entry_files(cache_dir)) == sorted(expected_entries(make_module(svft()), cache))


def test_svd_cache_fit_then_test_same_module(tmp_path, digits):
    """``trainer.fit`` then ``trainer.test`` (the usual script): ``setup("test")`` sees an already adapted module;
    the cache must not fail on it (configure_model skips re-applying the adapter)."""
    module = make_module(svft())
    cache = SVDCache(cache_dir=str(tmp_path / "svd"))
    run = trainer(tmp_path, [cache], max_steps=1, limit_test_batches=1)
    run.fit(module, datamodule=digits)
    run.test(module, datamodule=digits, verbose=False)  # raises ValueError in SVDCache.setup -> resolve_targets
    assert cache.misses == N_PARTS


# == OrthogonalityCheck ============================================================================================
def boft_module(seed: int = 0) -> ViTClassifier:
    module = make_module(BOFT(block_size=8, n_butterfly_factors=2), seed,
                         optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    module.configure_model()  # idempotent; Lightning's own call then does nothing
    return module


def plant_non_orthogonal(module: ViTClassifier, name: str = "blocks.0.attn.qkv") -> None:
    """Make one layer's blocks ``1.1 Q``: ``‖(1.1Q)ᵀ(1.1Q) − I‖_F = 0.21·√8 ≈ 0.59``."""
    layer = module.model.get_submodule(name)
    assert isinstance(layer, BOFTLinear)
    original = layer.orthogonal_blocks
    layer.orthogonal_blocks = lambda part, training=False: original(part, training) * 1.1


def test_orthogonality_check_logs_tiny_error(tmp_path, digits):
    module = boft_module()
    check = OrthogonalityCheck(every_n_steps=1, tolerance=1e-4, action="raise")
    run = trainer(tmp_path, [check], max_steps=3)
    run.fit(module, datamodule=digits)
    assert run.global_step == 3
    assert check.last_error is not None and check.last_error < 1e-5
    assert float(run.callback_metrics["orthogonality_error"]) == pytest.approx(check.last_error)
    # The adapters did train (so the blocks are not trivially the identity).
    skew = module.model.blocks[0].attn.qkv.adapters["q"].skew
    assert skew.abs().max() > 0


def test_orthogonality_check_warn(tmp_path, digits):
    module = boft_module()
    plant_non_orthogonal(module)
    check = OrthogonalityCheck(every_n_steps=1, tolerance=1e-4, action="warn")
    run = trainer(tmp_path, [check], max_steps=3)
    with pytest.warns(UserWarning, match="OrthogonalityCheck: max .* exceeds tolerance") as record:
        run.fit(module, datamodule=digits)
    assert len([w for w in record if "OrthogonalityCheck" in str(w.message)]) == 3  # every step, training went on
    assert run.global_step == 3 and not run.should_stop
    assert check.last_error == pytest.approx(0.21 * 8 ** 0.5, rel=1e-3)
    assert float(run.callback_metrics["orthogonality_error"]) == pytest.approx(check.last_error)


def test_orthogonality_check_stop(tmp_path, digits):
    module = boft_module()
    plant_non_orthogonal(module, "blocks.1.mlp.fc2")
    check = OrthogonalityCheck(every_n_steps=1, tolerance=1e-4, action="stop")
    run = trainer(tmp_path, [check], max_steps=5)
    with pytest.warns(UserWarning, match="exceeds tolerance"):
        run.fit(module, datamodule=digits)
    assert run.should_stop
    assert run.global_step == 1  # stopped after the first check, long before max_steps


def test_orthogonality_check_raise(tmp_path, digits):
    module = boft_module()
    plant_non_orthogonal(module)
    check = OrthogonalityCheck(every_n_steps=1, tolerance=1e-4, action="raise")
    run = trainer(tmp_path, [check], max_steps=5)
    with pytest.raises(OrthogonalityError, match="exceeds tolerance"):
        run.fit(module, datamodule=digits)
    assert run.global_step == 1


def test_orthogonality_check_every_n_steps(tmp_path, digits, monkeypatch):
    steps = []
    original = OrthogonalityCheck.check

    def spy(self, trainer, pl_module):
        steps.append(trainer.global_step)
        return original(self, trainer, pl_module)

    monkeypatch.setattr(OrthogonalityCheck, "check", spy)
    run = trainer(tmp_path, [OrthogonalityCheck(every_n_steps=2)], max_steps=5)
    run.fit(boft_module(), datamodule=digits)
    assert steps == [2, 4]


def test_orthogonality_check_lora_is_a_no_op(tmp_path, digits, lightning_log, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("orthogonality_error called on a LoRA model")

    monkeypatch.setattr("lit_peft.callbacks.orthogonality.orthogonality_error", fail)
    module = make_module(LoRA(rank=4))
    check = OrthogonalityCheck(every_n_steps=1, action="raise")
    run = trainer(tmp_path, [check], max_steps=2)
    run.fit(module, datamodule=digits)
    assert run.global_step == 2
    assert not check.active and check.last_error is None
    assert "orthogonality_error" not in run.callback_metrics
    notices = lightning_log.messages("OrthogonalityCheck")
    assert len(notices) == 1 and "\n" not in notices[0] and "LoRA" in notices[0]


def test_orthogonality_check_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        OrthogonalityCheck(every_n_steps=0)
    with pytest.raises(ValueError, match="action"):
        OrthogonalityCheck(action="ignore")


# == MergeAdapters =================================================================================================
MERGE_ADAPTERS = {
    "BOFT": lambda: BOFT(block_size=8, n_butterfly_factors=2),
    "SVFT": lambda: SVFT(pattern="banded", off_diag=1, target_modules=SVFT_TARGETS),
}


def no_temp_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


@pytest.mark.parametrize("method", list(MERGE_ADAPTERS))
def test_merge_adapters_writes_a_plain_model(method, tmp_path, digits, images):
    module = make_module(MERGE_ADAPTERS[method](), optimizer=lambda p: torch.optim.AdamW(p, lr=2e-2),
                         lr_schedule="constant")
    out = tmp_path / "merged"
    merge = MergeAdapters(output_dir=str(out))
    trainer(tmp_path, [merge], max_steps=3).fit(module, datamodule=digits)

    assert merge.written == out
    assert merge.last_difference is not None and merge.last_difference <= 1e-4
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["adapter/adapter.safetensors", "adapter/adapter_config.json", "model.safetensors",
                     "model_config.json"]
    assert no_temp_files(out) == []
    # The adapters trained, so the merged model is not the base model.
    trained = [p for layer in adapted_layers(module.model).values()
               for n, p in layer.adapters.named_parameters() if n.endswith(("skew", "values"))]
    assert trained and all(p.abs().max() > 0 for p in trained)  # both start at zero

    # A user's load: timm.create_model from model_config.json, strict load of model.safetensors.
    config = json.loads((out / "model_config.json").read_text())
    assert config["backbone"] == BACKBONE
    assert config["create_model_kwargs"] == {"num_classes": NUM_CLASSES, **MODEL_KWARGS, "img_size": IMG_SIZE}
    plain = timm.create_model(config["backbone"], pretrained=False, **config["create_model_kwargs"])
    plain.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    assert not any(isinstance(m, BOFTLinear) for m in plain.modules())
    adapted = outputs(module, images)
    with torch.no_grad():
        merged = plain.eval()(images)
    assert (merged - adapted).abs().max() <= 1e-4 * adapted.abs().max()
    assert torch.equal(merged.argmax(-1), adapted.argmax(-1))
    x, _ = next(iter(digits.val_dataloader()))
    with torch.no_grad():
        assert torch.equal(plain(x).argmax(-1), module.model.eval()(x).argmax(-1))

    # The adapter folder loads onto a fresh copy of the same base model and gives the same function.
    assert read_adapter_config(out / "adapter")["strategy"].endswith(method)
    torch.manual_seed(0)
    fresh = timm.create_model(BACKBONE, pretrained=False, num_classes=NUM_CLASSES, img_size=IMG_SIZE, **MODEL_KWARGS)
    load_adapter(fresh, out / "adapter")
    with torch.no_grad():
        reloaded = fresh.eval()(images)
    assert torch.allclose(reloaded, adapted, rtol=0, atol=1e-5 * float(adapted.abs().max()))


def test_merge_adapters_planted_mismatch_writes_nothing(tmp_path, digits, monkeypatch):
    real = merge_module.merged_state_dict

    def perturbed(model, **kwargs):
        state = real(model, **kwargs)
        # Random, not a constant shift: fc1 reads LayerNorm outputs (zero mean over features), so adding a constant
        # to every entry of its weight would change nothing.
        weight = state["blocks.0.mlp.fc1.weight"]
        state["blocks.0.mlp.fc1.weight"] = weight + 0.5 * torch.randn(weight.shape, generator=torch.Generator())
        return state

    monkeypatch.setattr(merge_module, "merged_state_dict", perturbed)
    module = make_module(BOFT(block_size=8, n_butterfly_factors=2))
    out = tmp_path / "merged"
    merge = MergeAdapters(output_dir=str(out))
    with pytest.raises(MergeCheckError, match="differ"):
        trainer(tmp_path / "root", [merge], max_steps=1).fit(module, datamodule=digits)
    assert merge.last_difference is not None and merge.last_difference > 1e-4
    assert merge.written is None
    assert not out.exists()
    assert not any(p.name.endswith(".safetensors") for p in tmp_path.rglob("*"))


def test_merge_adapters_default_folder(tmp_path, digits):
    module = make_module(BOFT(block_size=8, n_butterfly_factors=1))
    merge = MergeAdapters()
    trainer(tmp_path, [merge], max_steps=1).fit(module, datamodule=digits)
    assert merge.written == tmp_path / "merged"
    assert (tmp_path / "merged" / "model.safetensors").is_file()


class SnapshotAtFitEnd(L.Callback):
    """The module's (adapter-only) state dict when fit ends, before the callbacks after it run."""

    def on_fit_end(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}


class StepScore(L.Callback):
    """Logs ``step_score = global_step`` at each validation."""

    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.log("step_score", float(trainer.global_step))


def test_merge_adapters_best_weights(tmp_path, digits, images):
    """``weights="best"``: the merged model is the best checkpoint's, not the final weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = make_module(BOFT(block_size=8, n_butterfly_factors=2), optimizer=lambda p: torch.optim.AdamW(p, lr=2e-2),
                         lr_schedule="constant")
    # A monitored score that is best at the first validation (step 2 of 4), so best != final for sure.
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="step_score", mode="min", save_top_k=1)
    final = SnapshotAtFitEnd()
    merge = MergeAdapters(output_dir=str(tmp_path / "merged"), weights="best")
    run = trainer(tmp_path, [StepScore(), checkpoint, final, merge], max_steps=4, enable_checkpointing=True,
                  val_check_interval=2, limit_val_batches=2)
    run.fit(module, datamodule=digits)

    best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)
    now = module.state_dict()
    assert best["state_dict"].keys() == now.keys()
    assert all(torch.equal(now[k], v) for k, v in best["state_dict"].items())  # the module holds the best weights
    assert (best["global_step"], run.global_step) == (2, 4)
    assert any(not torch.equal(final.state[k], v) for k, v in best["state_dict"].items())  # not the final weights
    plain = timm.create_model(BACKBONE, pretrained=False, num_classes=NUM_CLASSES, img_size=IMG_SIZE,
                              **MODEL_KWARGS)
    plain.load_state_dict(load_file(str(tmp_path / "merged" / "model.safetensors")), strict=True)
    adapted = outputs(module, images)
    with torch.no_grad():
        assert (plain.eval()(images) - adapted).abs().max() <= 1e-4 * adapted.abs().max()


def test_merge_adapters_best_without_checkpoint_raises(tmp_path, digits):
    merge = MergeAdapters(output_dir=str(tmp_path / "merged"), weights="best")
    with pytest.raises(ValueError, match="ModelCheckpoint"):
        trainer(tmp_path, [merge], max_steps=1).fit(make_module(BOFT(block_size=8)), datamodule=digits)
    assert not (tmp_path / "merged").exists()
    with pytest.raises(ValueError, match="weights"):
        MergeAdapters(weights="last")
