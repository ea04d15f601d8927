"""Adapted layers under DDP and inside FSDP2 ``fully_shard`` (2 CPU processes, gloo), every adapter: DDP's gradient
of two half batches equals the whole batch's, the sharded forward and gradients equal the unsharded model's, and the helpers that read parameters outside ``forward`` (merge, save, orthogonality) accept
the DTensor shards. ``merged_state_dict`` keeps the merged model on rank 0 alone (on the CPU) and nothing on the
other ranks."""

from __future__ import annotations

import copy
import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist

from helpers.distributed import spawn_workers

METHODS = ["boft", "oft", "svft", "lora", "dora", "vera"]


def build(method: str):
    import timm

    from lit_peft.adapters import BOFT, OFT, SVFT, DoRA, LoRA, VeRA

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2)
    strategy = {"boft": BOFT(block_size=4, n_butterfly_factors=2, train_bias=True, trainable_modules=["head"]),
                "oft": OFT(block_size=8), "svft": SVFT(pattern="banded", off_diag=1, init="gated"),
                "lora": LoRA(rank=4), "dora": DoRA(rank=4), "vera": VeRA(rank=8)}[method]
    strategy.apply(model)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if param.requires_grad and ".adapters." in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def worker(rank: int, world: int, port: int, folder: str, errors) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from lit_peft.adapters import (adapter_state_dict, count_parameters, merge_adapters, merged_state_dict,
                                       orthogonality_error, save_adapter)
        from lit_peft.distributed import shard_svd_tensors

        mesh = init_device_mesh("cpu", (world,))
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        for method in METHODS:
            reference = build(method)
            # DDP: each rank takes half of a batch of 4; the gradient averaged over ranks is the whole batch's
            ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(reference))
            whole = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
            ddp(whole[2 * rank:2 * rank + 2]).square().mean().backward()
            single = copy.deepcopy(reference)
            single(whole).square().mean().backward()
            trained = [(n, p) for n, p in ddp.module.named_parameters() if p.requires_grad]
            assert trained, method
            for (name, param), ref in zip(trained, [p for p in single.parameters() if p.requires_grad]):
                torch.testing.assert_close(param.grad, ref.grad, rtol=1e-4, atol=1e-6,
                                           msg=f"{method}: DDP gradient of {name}")
            del ddp, single

            model = copy.deepcopy(reference)
            assert shard_svd_tensors(model) == (12 if method == "svft" else 0)  # q, k, v, proj, fc1, fc2 × 2
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            if method == "svft":  # U, S, V sharded like the frozen weights, not whole on every rank
                part = model.blocks[0].mlp.fc1.adapters["all"]
                for name in ("U", "S", "V"):
                    tensor = getattr(part, name)
                    assert hasattr(tensor, "full_tensor") and not tensor.requires_grad, name
                    assert tensor.to_local().numel() <= tensor.numel() // 2 + tensor.shape[1:].numel(), name
            assert count_parameters(model) == count_parameters(reference), method

            out, ref_out = model(x), reference(x)
            torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6, msg=f"{method}: forward")
            out.square().mean().backward()
            ref_out.square().mean().backward()
            ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
            for name, param in model.named_parameters():
                if param.requires_grad:
                    torch.testing.assert_close(param.grad.full_tensor(), ref_grads[name], rtol=1e-4, atol=1e-6,
                                               msg=f"{method}: gradient of {name}")

            sharded_state, ref_state = adapter_state_dict(model), adapter_state_dict(reference)
            assert sharded_state.keys() == ref_state.keys(), method
            for key in ref_state:
                assert not hasattr(sharded_state[key], "full_tensor"), f"{method}: {key} still a DTensor"
                torch.testing.assert_close(sharded_state[key], ref_state[key], msg=f"{method}: {key}")

            merged = merged_state_dict(model, keep=rank == 0)  # every rank takes part in the all-gathers
            if rank == 0:  # the whole merged model, on the CPU, exactly what merging the unsharded model gives
                expected = merge_adapters(copy.deepcopy(reference)).state_dict()
                assert merged.keys() == expected.keys(), method
                for key, value in expected.items():
                    assert merged[key].device.type == "cpu" and not hasattr(merged[key], "full_tensor"), key
                    torch.testing.assert_close(merged[key], value, rtol=0, atol=0, msg=f"{method}: merged {key}")
            else:
                assert merged == {}, f"{method}: rank {rank} kept {len(merged)} merged tensors"
                assert merged_state_dict(reference, keep=False) == {}, "an unsharded model is merged on rank 0 alone"

            error, ref_error = orthogonality_error(model), orthogonality_error(reference)
            if method in ("boft", "oft"):
                assert error is not None and error < 1e-5 and abs(error - ref_error) < 1e-6
            else:
                assert error is None and ref_error is None

            save_adapter(model, os.path.join(folder, f"{method}-rank{rank}"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo")
def test_adapters_under_fully_shard(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 (fully_shard) not available")
    from torch.distributed.fsdp import fully_shard  # noqa: F401  (skip cleanly on torch without FSDP2)

    world = 2
    spawn_workers(worker, world, str(tmp_path))

    from lit_peft.adapters import load_adapter

    for method in METHODS:  # what a sharded run saved loads onto a plain model and matches the reference
        reference = build(method)
        for rank in range(world):
            fresh = build_base()
            load_adapter(fresh, tmp_path / f"{method}-rank{rank}")
            x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                torch.testing.assert_close(fresh(x), reference(x), rtol=1e-5, atol=1e-6)


def build_base():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32, patch_size=8,
                             embed_dim=32, depth=2, num_heads=2)
