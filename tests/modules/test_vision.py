"""``ViTClassifier`` (:mod:`lit_peft.modules.vision`): local weights files for the backbone, optimiser groups,
adapter-only state dicts and a head-only module, and clear errors for bad arguments, on a tiny timm ViT."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from helpers.models import TINY
from lit_peft.adapters import BOFT, LoRA
from lit_peft.modules import ViTClassifier


def test_local_checkpoint_path_loads_backbone_and_reinitialises_head(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32, **TINY)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    module = ViTClassifier(backbone="vit_tiny_patch16_224", num_classes=3, checkpoint_path=str(path), img_size=32,
                           model_kwargs=TINY)
    for name, tensor in module.model.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(tensor, source.state_dict()[name]), name
    assert module.model.head.out_features == 3
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ViTClassifier(backbone="vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="not a timm model"):
        ViTClassifier(backbone="no_such_vit")


def test_parameter_groups_state_dict_and_head_only():
    module = ViTClassifier(backbone="vit_tiny_patch16_224", num_classes=3, img_size=32, model_kwargs=TINY,
                           adapter=LoRA(rank=2, target_modules=["qkv"]), head_lr=4e-3, head_weight_decay=0.0)
    module.configure_model()
    module.configure_model()  # idempotent: applying twice would raise
    groups = {g["name"]: g for g in module.parameter_groups()}
    assert groups["head"]["lr"] == 4e-3 and groups["head"]["weight_decay"] == 0.0
    assert "lr" not in groups["adapter"]  # the optimiser's own lr applies
    head_ids = {id(p) for p in module.model.head.parameters()}
    assert {id(p) for p in groups["head"]["params"]} == head_ids
    assert all(".adapters." in n for n, p in module.named_parameters() if p.requires_grad and id(p) not in head_ids)
    keys = set(module.state_dict())
    assert keys == {n for n, p in module.named_parameters() if p.requires_grad}

    head_only = ViTClassifier(backbone="vit_tiny_patch16_224", num_classes=3, img_size=32, model_kwargs=TINY)
    head_only.configure_model()
    assert {n for n, p in head_only.named_parameters() if p.requires_grad} == {"model.head.weight", "model.head.bias"}


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="lr_schedule"):
        ViTClassifier(backbone="vit_tiny_patch16_224", img_size=32, model_kwargs=TINY, lr_schedule="step")
    module = ViTClassifier(backbone="vit_tiny_patch16_224", num_classes=3, img_size=32, model_kwargs=TINY,
                           adapter=BOFT(block_size=5, n_butterfly_factors=1, target_modules=["qkv"]))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: in_features=32 is not divisible by block_size=5"):
        module.configure_model()
