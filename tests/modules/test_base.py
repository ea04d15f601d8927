"""What every lit_peft module shares (:mod:`lit_peft.modules.base`, :mod:`lit_peft.modules.checkpointing`): a
non-finite training loss stops the run before its backward pass with an error naming the step (the user's CLI path,
a diverging learning rate), or with ``skip_nonfinite: N`` is skipped, at most ``N`` times; checkpoints are written
atomically, carry a digest checked on resume, and a checkpoint of another adapter is refused."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers.callbacks import IMG_SIZE, NUM_CLASSES, make_module, trainer
from helpers.cli import cli_env, make_vtab_task, write_config
from lit_peft.adapters import BOFT, LoRA


def test_diverging_run_stops_at_the_nonfinite_step_and_saves_nothing(tmp_path):
    data = make_vtab_task(tmp_path / "data")
    config = write_config(tmp_path, data, {"class_path": "lit_peft.adapters.LoRA", "init_args": {"rank": 2}},
                          max_epochs=3)
    proc = subprocess.run([sys.executable, "-m", "lit_peft", "fit", "--config", str(config),
                           "--model.init_args.optimizer.init_args.lr", "1e6", "--model.init_args.head_lr", "1e6"],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "FloatingPointError: train_loss is" in out and "at optimiser step" in out, out[-3000:]
    assert "model.init_args.optimizer.init_args.lr: 1e+06" in out and "skip_nonfinite" in out
    saved = [p for p in (tmp_path / "runs").rglob("*") if p.suffix in (".ckpt", ".safetensors")]
    assert not saved, f"a diverged run wrote {saved}"


def _loader(nan_batches: set[int], n_batches: int = 6):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n_batches * 2, 3, IMG_SIZE, IMG_SIZE, generator=gen)
    for b in nan_batches:
        images[2 * b] = float("nan")
    labels = torch.arange(n_batches * 2) % NUM_CLASSES
    return DataLoader(TensorDataset(images, labels), batch_size=2)


def test_skip_nonfinite_skips_at_most_n_steps(tmp_path):
    module = make_module(LoRA(rank=2), skip_nonfinite=2)
    with pytest.warns(UserWarning, match=r"train_loss is nan at optimiser step 1 \(epoch 0, batch 1\): step "
                                         r"skipped \(1 of at most 2"):
        trainer(tmp_path, [], max_steps=4).fit(module, _loader({1, 3}))
    assert module.global_step == 4          # Lightning counts a skipped step too
    assert all(torch.isfinite(p).all() for p in module.parameters())
    module = make_module(LoRA(rank=2), skip_nonfinite=1)
    with pytest.warns(UserWarning, match="step skipped"), \
            pytest.raises(FloatingPointError, match=r"at optimiser step 3 \(epoch 0, batch 3\) after skipping 1"):
        trainer(tmp_path, [], max_steps=6).fit(module, _loader({1, 3}))
    with pytest.raises(ValueError, match=r"skip_nonfinite must be an integer >= 0"):
        make_module(LoRA(rank=2), skip_nonfinite=-1)


# == checkpoint integrity and resume mismatches ====================================================================
def _fit_with_checkpoint(tmp_path, adapter, **kwargs):
    import lightning as L

    from helpers.callbacks import make_module

    module = make_module(adapter)
    run = trainer(tmp_path, [L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
                  max_steps=2, enable_checkpointing=True, **kwargs)
    run.fit(module, _loader(set()))
    return module, run, tmp_path / "ckpt" / "last.ckpt"


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    """A write that fails half-way (a full disk) leaves neither a truncated file under the final name nor a
    temporary one; the strategy's I/O is lit_peft's AtomicCheckpointIO."""
    import lightning.fabric.plugins.io.torch_io as torch_io

    from lit_peft.modules.checkpointing import AtomicCheckpointIO

    module, run, last = _fit_with_checkpoint(tmp_path, LoRA(rank=2))
    assert isinstance(run.strategy.checkpoint_io, AtomicCheckpointIO) and last.is_file()
    before = last.read_bytes()

    def full_disk(checkpoint, path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch_io, "_atomic_save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run.save_checkpoint(last)
    assert last.read_bytes() == before
    assert sorted(p.name for p in last.parent.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]


def test_bit_flipped_checkpoint_is_refused_on_resume(tmp_path):
    _, _, last = _fit_with_checkpoint(tmp_path, LoRA(rank=2))
    checkpoint = torch.load(last, weights_only=False)
    key = next(k for k in checkpoint["state_dict"] if "lora_B" in k)
    checkpoint["state_dict"][key].view(torch.int32)[0, 0] ^= 1 << 30   # one flipped bit in the tensor data
    torch.save(checkpoint, last)
    module = make_module(LoRA(rank=2))
    with pytest.raises(ValueError, match="do not match the checksum written with them"):
        trainer(tmp_path / "again", [], max_steps=4).fit(module, _loader(set()), ckpt_path=last)


@pytest.mark.parametrize("resume_with, needles", [
    (lambda: LoRA(rank=2), ["not in it", "lora_A", "that this run's adapter does not have", "skew"]),
    (lambda: BOFT(block_size=4, n_butterfly_factors=1), ["shape(s) differ", "skew"]),
    (lambda: BOFT(block_size=8, n_butterfly_factors=2, target_modules=["qkv"]), ["does not have", "mlp.fc1"]),
])
def test_resume_with_another_adapter_is_refused(tmp_path, resume_with, needles):
    """A BOFT checkpoint resumed with a LoRA config (or other BOFT shapes, fewer targets) used to load nothing and
    train (and merge) an untrained adapter: refused, naming the differences."""
    _, _, last = _fit_with_checkpoint(tmp_path, BOFT(block_size=8, n_butterfly_factors=2))
    with pytest.raises(ValueError, match="the checkpoint does not fit this run's model") as err:
        trainer(tmp_path / "again", [], max_steps=4).fit(make_module(resume_with()), _loader(set()), ckpt_path=last)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_quantize_option_stores_the_frozen_base_and_keeps_head_and_checkpoint_small():
    """``quantize: nf4`` on a module: the backbone's frozen linears quantized (the adapter's parts as blocks) before
    the adapter, the head in full precision and trainable; a checkpoint holds the trainable tensors only; more than
    one process and an unknown scheme are refused, naming the option."""
    from types import SimpleNamespace

    pytest.importorskip("torchao")
    from helpers.models import tiny_vit
    from lit_peft.adapters import BOFT, QuantizedLinear, adapted_layers
    from lit_peft.adapters.quantized import QuantizedWeight

    module = tiny_vit(adapter=BOFT(block_size=4, n_butterfly_factors=2, target_modules=["qkv", "fc1"]),
                      quantize="nf4")
    module.configure_model()
    layers = adapted_layers(module.model)
    assert all(isinstance(layer.weight, QuantizedWeight) for layer in layers.values())
    assert layers["blocks.0.attn.qkv"].weight.blocks == [(0, 32), (32, 64), (64, 96)]
    assert isinstance(module.model.blocks[0].attn.proj, QuantizedLinear)  # frozen, not adapted: quantized too
    assert type(module.model.head) is torch.nn.Linear and module.model.head.weight.requires_grad
    assert "frozen linear layers quantized" in module.quantization.summary()
    state = module.state_dict()
    assert not any("quantized" in key for key in state) and any(".adapters." in key for key in state)
    module(torch.randn(2, 3, 32, 32)).sum().backward()

    with pytest.raises(ValueError, match=r"quantize must be one of 'nf4', 'int8' or null"):
        tiny_vit(quantize="fp4")
    module = tiny_vit(adapter=BOFT(block_size=4, target_modules=["qkv"]), quantize="int8")
    module._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(), callbacks=[])
    with pytest.raises(ValueError, match=r"model.init_args.quantize: 'int8' trains on one device"):
        module.apply_adapter()
