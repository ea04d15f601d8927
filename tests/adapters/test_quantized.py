"""A quantized frozen base (``lit_peft.adapters.quantized``): every adapter over an NF4 / int8 base computes exactly
what it computes over the dequantized weights (outputs and gradients), keeps no full-precision weight for the
backward pass, merges into a plain full-precision model, and SVFT takes the SVD of the dequantized weight; fused
qkv parts are separate blocks; the storage shrinks as the schemes promise; refusals name the layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from helpers.language import PROJECTIONS, logits_of
from helpers.models import make_vit, randomize_adapters
from lit_peft.adapters import (BOFT, OFT, SVFT, DoRA, LoRA, QuantizedLinear, VeRA, adapted_layers, merged_state_dict,
                               quantize_frozen_linears, resolve_targets)
from lit_peft.adapters.quantized import QuantizedWeight, base_weight_bytes, dense_weight, is_quantized

pytest.importorskip("torchao")
pytestmark = pytest.mark.usefixtures("hf_offline")

ADAPTERS = {
    "lora": lambda: LoRA(rank=4, alpha=16, target_modules=PROJECTIONS),
    "dora": lambda: DoRA(rank=4, alpha=8, dropout=0.1, target_modules=PROJECTIONS),
    "vera": lambda: VeRA(rank=8, seed=3, target_modules=["q_proj", "v_proj", "down_proj"]),
    "oft": lambda: OFT(block_size=8, target_modules=PROJECTIONS),
    "boft": lambda: BOFT(block_size=4, n_butterfly_factors=2, target_modules=PROJECTIONS),
    "svft_banded": lambda: SVFT(pattern="banded", off_diag=2, target_modules=PROJECTIONS),
}


def batch():
    return {"input_ids": torch.randint(4, 40, (2, 11), generator=torch.Generator().manual_seed(0)),
            "attention_mask": torch.ones(2, 11, dtype=torch.long)}


def quantized_and_reference(llama_dir, strategy, scheme):
    """The tiny Llama with its frozen linears in ``scheme``, and a full-precision copy whose weights are the
    dequantized ones; the same adapter (same initial and randomized values) applied to both."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir / "model")
    targets = resolve_targets(model, strategy.target_modules, strategy.fused_qkv)
    report = quantize_frozen_linears(model, scheme, targets=targets)
    reference = AutoModelForCausalLM.from_pretrained(llama_dir / "model")
    with torch.no_grad():
        for name in report.layers:
            reference.get_submodule(name).weight.copy_(model.get_submodule(name).weight.dequantize())
    for m in (model, reference):
        torch.manual_seed(0)
        strategy.apply(m)
        randomize_adapters(m)
    return model, reference, report


def logits(model):
    return model(**batch()).logits


def adapter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_over_a_quantized_base_is_the_adapter_over_its_dequantized_weights(name, scheme, llama_dir):
    model, reference, report = quantized_and_reference(llama_dir, ADAPTERS[name](), scheme)
    assert len(report.layers) == 2 * len(PROJECTIONS) and report.skipped == {"lm_head": "weight tied to another module"}
    for layer in adapted_layers(model).values():
        assert is_quantized(layer.weight) and not layer.use_weight_side(torch.zeros(64, layer.in_features))
    # training mode (BOFT's and DoRA's dropout drawn from the same seed in both)
    for m in (model, reference):
        m.train()
        torch.manual_seed(1)
        logits(m).float().square().mean().backward()
    ours, theirs = adapter_grads(model), adapter_grads(reference)
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-6), key
    model.eval(), reference.eval()
    expected = logits_of(reference, batch())
    got = logits_of(model, batch())
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    # the merged model is a plain full-precision model computing the same function
    plain = AutoModelForCausalLM.from_pretrained(llama_dir / "model")
    plain.load_state_dict(merged_state_dict(model), strict=True)
    assert not any(isinstance(m, QuantizedLinear) for m in plain.modules())
    assert torch.allclose(logits_of(plain, batch()), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["lora", "dora", "boft", "svft_banded"])
def test_no_full_precision_weight_is_kept_for_the_backward_pass(name, llama_dir):
    """What autograd saves between forward and backward: no float tensor of a quantized weight block's shape (the
    layers dequantize inside their own matmuls only)."""
    model, _, _ = quantized_and_reference(llama_dir, ADAPTERS[name](), "nf4")
    blocks = [q.get_original_weight() for m in model.modules() if isinstance(m, QuantizedWeight) for q in m.quantized]
    seen, copies = [], []

    def pack(t):
        seen.append(t)
        if not is_quantized(t) and t.is_floating_point():
            copies.extend(tuple(t.shape) for w in blocks if w.shape == t.shape and torch.equal(w, t.to(w.dtype)))
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = logits(model).float().square().mean()
    loss.backward()
    assert len(seen) > 50 and not copies, copies
    # the detector's control: torchao's own F.linear of an int8 weight keeps its integers cast to float32 (Wᵀ)
    layer = QuantizedLinear(nn.Linear(64, 32), "int8")
    blocks[:] = [layer.weight.quantized[0].qdata.T.float()]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.nn.functional.linear(torch.randn(5, 64, requires_grad=True), layer.weight[0:32])
    assert copies


def test_svft_takes_the_svd_of_the_dequantized_weight(llama_dir):
    model, _, _ = quantized_and_reference(llama_dir, SVFT(pattern="plain", target_modules=["q_proj"]), "nf4")
    for layer in adapted_layers(model).values():
        part = layer.adapters["all"]
        dense = dense_weight(layer.weight)
        rebuilt = part.U @ torch.diag(part.S) @ part.V.mT
        assert torch.allclose(rebuilt, dense, atol=1e-5)


@pytest.mark.parametrize("scheme, ratio, error", [("nf4", 0.16, 0.12), ("int8", 0.27, 0.01)])
def test_storage_and_error_of_each_scheme(scheme, ratio, error, llama_dir):
    """NF4: 4 bits a value plus double-quantized block scales (~0.14 of float32); int8: a byte a value plus a
    scale a row; the dequantized weights within the schemes' usual relative error."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir / "model")
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear}
    before = base_weight_bytes(model)
    report = quantize_frozen_linears(model, scheme)
    assert report.dense_bytes == sum(w.numel() * 4 for n, w in dense.items() if n != "lm_head")
    assert report.quantized_bytes < ratio * report.dense_bytes
    assert base_weight_bytes(model) == before - report.dense_bytes + report.quantized_bytes
    for name in report.layers:
        w = dense[name]
        assert float((dense_weight(model.get_submodule(name).weight) - w).norm() / w.norm()) < error, name
    assert f"{len(report.layers)} frozen linear layers quantized" in report.summary()


def test_fused_qkv_parts_are_quantized_as_separate_blocks(images):
    """timm's fused qkv: each adapted part reads its own block (q, k, v; or q and the frozen k/v rows); the ViT
    over the quantized base equals the ViT over the dequantized weights."""
    for targets, blocks in ((["qkv", "fc1"], [(0, 64), (64, 128), (128, 192)]), (["qkv.q"], [(0, 64), (64, 192)])):
        for scheme in ("nf4", "int8"):
            strategy = BOFT(block_size=8, n_butterfly_factors=2, target_modules=targets)
            model = make_vit()
            report = quantize_frozen_linears(model, scheme, targets=resolve_targets(model, targets, "split"),
                                             keep=["head"])
            assert "head" not in report.layers and model.blocks[0].attn.qkv.weight.blocks == blocks
            reference = make_vit()
            with torch.no_grad():
                for name in report.layers:
                    reference.get_submodule(name).weight.copy_(model.get_submodule(name).weight.dequantize())
            for m in (model, reference):
                strategy.apply(m)
                randomize_adapters(m)
            assert torch.allclose(model(images), reference(images), rtol=1e-5, atol=1e-5), (targets, scheme)


def test_refusals_name_the_layer(llama_dir):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(7, 3)

    with pytest.raises(ValueError, match=r"proj: rows 0\.\.3 of its \(3, 7\) weight hold 21 values, not a multiple "
                                         r"of NF4's block of 64; use quantize: int8"):
        quantize_frozen_linears(Odd(), "nf4")
    model = Odd()
    quantize_frozen_linears(model, "int8")  # int8 has no block constraint
    assert isinstance(model.proj, QuantizedLinear)
    with pytest.raises(ValueError, match=r"quantize must be one of 'nf4', 'int8' \(or null\), got 'fp8'"):
        quantize_frozen_linears(Odd(), "fp8")
    vit = make_vit()
    quantize_frozen_linears(vit, "nf4")  # without the targets: qkv is one block
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: part 'q' \(rows 0\.\.64\) is not a row block of its "
                                         r"nf4 weight \(blocks \[\(0, 192\)\]\); quantize with the adapter's targets"):
        LoRA(rank=2, target_modules=["qkv"]).apply(vit)
    with pytest.raises(IndexError, match=r"a nf4 weight of shape \(64, 64\) gives whole row blocks \[\(0, 64\)\], "
                                         r"not rows slice\(0, 32, None\)"):
        vit.blocks[0].attn.proj.weight[0:32]
