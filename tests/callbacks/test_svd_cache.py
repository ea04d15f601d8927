"""``SVDCache`` (:mod:`lit_peft.callbacks.svd_cache`): one canonical SVD per adapted weight part, computed once and
loaded back bit for bit; every kind of corrupt entry detected, recomputed and rewritten; a changed weight is a miss.

The unit tests drive the callback's ``setup`` with a minimal fake trainer, then apply the adapter with
``configure_model`` exactly as Lightning does (the module finds the cache among its trainer's callbacks); the rest run
a real ``lightning.Trainer`` for a few steps on scikit-learn's digits (``DigitsDataModule``, no download), on the tiny
ViT of ``helpers.callbacks``.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lit_peft.adapters.svft as svft_module
import lit_peft.callbacks.svd_cache as svd_cache_module
from helpers.callbacks import SVFT_TARGETS, make_module, outputs, trainer
from lit_peft.adapters import BOFT, SVFT
from lit_peft.adapters.svft import canonical_svd
from lit_peft.callbacks import SVDCache, find_svd_provider
from lit_peft.modules.vision import ViTClassifier


# The weight parts SVFT adapts (fused qkv split into q/k/v): 2 blocks × (3 + 1 + 1 + 1) = 12 SVDs.
PARTS = [(f"blocks.{i}.attn.qkv", (j * 64, (j + 1) * 64), f"blocks.{i}.attn.qkv.{p}")
         for i in range(2) for j, p in enumerate("qkv")]
PARTS += [(f"blocks.{i}.{leaf}", None, f"blocks.{i}.{leaf}") for i in range(2)
          for leaf in ("attn.proj", "mlp.fc1", "mlp.fc2")]
N_PARTS = len(PARTS)
SVD_DTYPE = torch.float32


# -- fixtures and helpers ----------------------------------------------------------------------------------------
def svft(**kwargs) -> SVFT:
    # banded + gated: M is non-zero and off-diagonal from the start, so the outputs depend on U and V bit by bit.
    args = {"pattern": "banded", "off_diag": 1, "init": "gated", "target_modules": SVFT_TARGETS}
    return SVFT(**{**args, **kwargs})


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


def svd_buffers(module: ViTClassifier) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.model.named_buffers() if k.rsplit(".", 1)[-1] in ("U", "S", "V")}


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


def _permuted(file: Path, **_):
    """Triplets 0 and 1 swapped together: U·S·Vᵀ is still W, but banded/top_k couple other singular vectors."""
    tensors, meta = read_entry(file)
    order = torch.arange(tensors["S"].shape[0])
    order[[0, 1]] = order[[1, 0]]
    replace_tensors(file, {"U": tensors["U"][:, order], "S": tensors["S"][order], "V": tensors["V"][:, order]}, meta)


def _pair_flipped(file: Path, **_):
    """u_0 and v_0 flipped together: a valid SVD, not the canonical one saved coefficients pair with."""
    tensors, meta = read_entry(file)
    tensors["U"][:, 0] *= -1
    tensors["V"][:, 0] *= -1
    replace_tensors(file, tensors, meta)


def _rescaled(file: Path, **_):
    """u_0 doubled and s_0 halved: reconstructs W, but U is not orthonormal."""
    tensors, meta = read_entry(file)
    tensors["U"][:, 0] *= 2
    tensors["S"][0] /= 2
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
    "permuted": (_permuted, "not the canonical SVD .*non-increasing order"),
    "pair-sign-flipped": (_pair_flipped, "not the canonical SVD .*signs not canonical"),
    "rescaled": (_rescaled, "not the canonical SVD .*not orthonormal"),
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
