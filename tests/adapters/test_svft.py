"""SVFT (``lit_peft.adapters.svft``): canonical singular-vector signs, so that an adapter saved on one machine loads
onto an SVD computed elsewhere (another sign choice, another SVD library); the saved support defines the update;
parameter counts (ViT-B on a stand-in module tree built on the ``meta`` device, real SVDs on small layers); the
shapes and arguments it refuses, with a clear error before anything is modified.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lit_peft.adapters.svft as svft_module
from helpers.adapters import SIX_LINEARS, StandInViT, expect_apply_error, max_diff, part_shapes, svft_count
from helpers.models import Stack, make_vit, randomize
from lit_peft.adapters import SVFT, adapted_layers, count_parameters, get_strategy, load_adapter, save_adapter


# == canonical signs ===============================================================================================
def _flip_pairs(U, Vh, gen):
    """Flip a random half of the singular pairs (u_i, v_i) together: still a valid SVD."""
    r = U.shape[-1]
    sign = torch.ones(r, dtype=U.dtype)
    flip = torch.randperm(r, generator=gen)[: max(1, r // 2)]
    sign[flip] = -1
    return U * sign, Vh * sign[:, None], int(len(flip))


@pytest.fixture()
def saved_svft(tmp_path, images):
    model = SVFT(pattern="banded", off_diag=2).apply(make_vit(0))
    randomize(model, seed=4, std=0.3)
    with torch.no_grad():
        out = model(images)
    return save_adapter(model, tmp_path / "svft"), out


def test_svft_signs_canonical_under_flipped_torch_svd(saved_svft, images, monkeypatch):
    folder, expected = saved_svft
    original_svd = torch.linalg.svd
    gen = torch.Generator().manual_seed(0)
    flipped = []

    def flipping_svd(A, *args, **kwargs):
        U, S, Vh = original_svd(A, *args, **kwargs)
        U, Vh, n = _flip_pairs(U, Vh, gen)
        flipped.append(n)
        return U, S, Vh

    monkeypatch.setattr(svft_module.torch.linalg, "svd", flipping_svd)
    fresh = load_adapter(make_vit(0), folder)
    assert len(flipped) == 2 * 6 and all(n > 0 for n in flipped), "the SVD was not recomputed through the patch"
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), expected, atol=1e-6, rtol=0)

    # negative control: without the canonical sign the same flips change the function
    monkeypatch.setattr(svft_module, "canonical_signs", lambda U, S, V: (U, S, V))
    uncanonical = load_adapter(make_vit(0), folder)
    with torch.no_grad():
        assert max_diff(uncanonical(images), expected) > 1e-3


def test_svft_signs_canonical_under_other_svd_library(saved_svft, images):
    """An ``svd_provider`` (as an SVD cache would be) computing the SVD with numpy, signs flipped at random, passed
    to ``load_adapter``; the strategy is not modified by it."""
    folder, expected = saved_svft
    gen = torch.Generator().manual_seed(1)
    calls = []

    def numpy_svd(name, weight, dtype):
        U, S, Vh = np.linalg.svd(weight.double().numpy(), full_matrices=False)
        U, Vh, _ = _flip_pairs(torch.from_numpy(U), torch.from_numpy(Vh), gen)
        calls.append(name)
        return U.to(dtype), torch.from_numpy(S).to(dtype), Vh.mT.to(dtype)

    fresh = load_adapter(make_vit(0), folder, svd_provider=numpy_svd)
    assert "blocks.0.attn.qkv.k" in calls and "blocks.1.mlp.fc2" in calls and len(calls) == 12
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), expected, atol=2e-5, rtol=0)
    assert vars(get_strategy(fresh)).keys() == get_strategy(fresh).init_args().keys()  # configuration only

    # the same provider through apply: the same SVDs, so the same adapters as load_adapter rebuilt
    calls.clear()
    applied = SVFT(pattern="banded", off_diag=2).apply(make_vit(0), svd_provider=numpy_svd)
    assert len(calls) == 12
    for name, layer in adapted_layers(applied).items():
        for key, tensor in layer.adapters.named_buffers():
            if key.rpartition(".")[2] in ("U", "S", "V"):
                assert torch.allclose(tensor, fresh.get_submodule(name).adapters.get_buffer(key), atol=1e-5), key


def _svft_reference(layer, x):
    """``x (W + U M Vᵀ)ᵀ + b`` per part, ``M`` built from the layer's current support and values."""
    weight = layer.weight.clone()
    for part, (start, stop) in layer.parts.items():
        a = layer.adapters[part]
        values = a.values * (torch.sigmoid(a.gate) if a.gate is not None else 1)
        M = torch.zeros(a.rank, a.rank).index_put((a.rows, a.cols), values)
        weight[start:stop] += a.U @ M @ a.V.mT
    return F.linear(x, weight, layer.bias)


@pytest.mark.parametrize("pattern, off_diag", [("top_k", 0), ("top_k", 1), ("random", 0), ("banded", 1)])
def test_svft_loaded_support_defines_the_update(tmp_path, pattern, off_diag):
    """On another base model the saved support Ω (not the one recomputed there) defines ``M``, in the forward
    pass and in the merge. With top_k the recomputed support can differ from the saved one: here the new base
    is symmetric (U = V), so its own top_k(d=0) support is the diagonal while the saved one is not."""
    source = SVFT(pattern=pattern, off_diag=off_diag).apply(Stack([16, 16, 16], seed=0))
    randomize(source, seed=2, std=0.3)
    save_adapter(source, tmp_path / "a")
    target = Stack([16, 16, 16], seed=1)
    with torch.no_grad():
        for layer in target.layers:
            A = torch.randn(16, 16)
            layer.weight.copy_(A @ A.T / 16)
    load_adapter(target, tmp_path / "a")
    x = torch.randn(5, 16)
    for src, layer in zip(source.layers, target.layers):
        a = layer.adapters["all"]
        assert torch.equal(a.rows, src.adapters["all"].rows) and torch.equal(a.cols, src.adapters["all"].cols)
        with torch.no_grad():
            expected = _svft_reference(layer, x)
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer.merged_linear()(x), expected, atol=1e-5, rtol=1e-5)


def test_canonical_sign_convention():
    torch.manual_seed(0)
    W = torch.randn(10, 6)
    U, S, V = svft_module.canonical_svd(W)
    torch.testing.assert_close(U @ torch.diag(S) @ V.mT, W, atol=1e-5, rtol=0)
    pivots = U.abs().argmax(dim=0)
    assert (U[pivots, torch.arange(U.shape[1])] > 0).all()


# == parameter counts ==============================================================================================
def test_svft_top_k_count_and_distinct_random_support():
    model = SVFT(pattern="top_k", off_diag=2, target_modules=["qkv", "proj"]).apply(make_vit(0))
    for layer in adapted_layers(model).values():
        for part, adapter in layer.adapters.items():
            assert len(adapter.rows) == svft_count(64, 64, "top_k", 2)
    model = SVFT(pattern="random", off_diag=2).apply(make_vit(0))
    for layer in adapted_layers(model).values():
        for adapter in layer.adapters.values():
            pairs = set(zip(adapter.rows.tolist(), adapter.cols.tolist()))
            assert len(pairs) == len(adapter.rows) == adapter.values.numel()


@pytest.mark.parametrize("init, expected", [("zero", 276_048), ("gated", 276_048 + 72)])
def test_svft_vit_base_count_on_meta(init, expected):
    with torch.device("meta"):
        model = StandInViT(depth=12, dim=768, hidden=3072)
    SVFT(pattern="banded", off_diag=2, init=init, target_modules=SIX_LINEARS).apply(model)
    layers = adapted_layers(model)
    assert sum(len(layer.parts) for layer in layers.values()) == 12 * 6
    per_layer = [sum(svft_count(o, i, "banded", 2, init == "gated") for o, i in part_shapes(layer))
                 for layer in layers.values()]
    assert [layer.num_adapter_parameters() for layer in layers.values()] == per_layer
    assert count_parameters(model)["adapter"] == sum(per_layer) == expected


def test_svft_banded_count_on_real_layers():
    """The per-layer formula ``r(2d+1) − d(d+1)`` with a real SVD, square and both rectangular orientations."""
    model = Stack([48, 48, 96, 40], seed=2)
    SVFT(pattern="banded", off_diag=2).apply(model)
    assert [layer.num_adapter_parameters() for layer in model.layers] == [48 * 5 - 6, 48 * 5 - 6, 40 * 5 - 6]
    gated = SVFT(pattern="banded", off_diag=2, init="gated").apply(Stack([48, 48, 96, 40], seed=2))
    assert count_parameters(gated)["adapter"] == 2 * (48 * 5 - 6) + (40 * 5 - 6) + 3


# == bad input =====================================================================================================
@pytest.mark.parametrize("kwargs", [dict(pattern="diagonal"), dict(off_diag=-1), dict(init="random"),
                                    dict(svd_dtype="float16")])
def test_svft_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SVFT(**kwargs)


def test_svft_top_k_needs_square():
    message = expect_apply_error(make_vit(0), SVFT(pattern="top_k", off_diag=1), "blocks.0.mlp.fc1",
                                  "(256, 64)", "blocks.0.mlp.fc2", "(64, 256)", "top_k")
    assert "attn.qkv" not in message  # the split q, k, v parts are square


def test_svft_off_diag_at_least_rank():
    expect_apply_error(Stack([8, 4, 8]), SVFT(pattern="banded", off_diag=4), "layers.0", "off_diag=4", "rank 4",
                        "layers.1")
    model = SVFT(pattern="banded", off_diag=3).apply(Stack([8, 4, 8]))
    assert model.layers[0].num_adapter_parameters() == svft_count(4, 8, "banded", 3)
    SVFT(pattern="plain", off_diag=40).apply(Stack([8, 4]))  # plain ignores off_diag


# == truncated rank ================================================================================================
@pytest.mark.parametrize("pattern", ["plain", "banded", "random", "top_k"])
def test_svft_svd_rank_is_the_papers_update_on_the_top_k_triplets(tmp_path, pattern):
    """``svd_rank=k``: ``W' = W + U_k M V_kᵀ`` (float64 reference from the weight's own SVD), the base exact at init,
    ``U``/``V`` of ``k`` columns (``k`` capped at ``min(out, in)``), the support counted on ``k``, exact merge and
    a save/load round trip."""
    widths = [24, 24, 40] if pattern == "top_k" else [24, 32, 40, 16]
    model = Stack(widths, seed=3).double()
    reference_model = Stack(widths, seed=3).double()
    strategy = SVFT(pattern=pattern, off_diag=1, svd_rank=6, svd_dtype="float64",
                    target_modules=["layers.0"] if pattern == "top_k" else "all-linear")
    strategy.apply(model)
    x = torch.randn(5, widths[0], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_model(x), rtol=0, atol=0)  # zero init: the base function
    randomize(model, seed=4, std=0.3)
    for name, layer in adapted_layers(model).items():
        a = layer.adapters["all"]
        W = reference_model.get_submodule(name).weight.detach()
        k = min(6, *W.shape)
        assert a.U.shape == (W.shape[0], k) and a.V.shape == (W.shape[1], k) and a.rank == k
        assert len(a.rows) == (k if pattern == "plain" else svft_count(k, k, "banded", 1))
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        torch.testing.assert_close(a.S, S[:k])
        # the kept triplets span the same subspaces as the top-k SVD (up to the canonical signs)
        torch.testing.assert_close((a.U * U[:, :k]).sum(0).abs(), torch.ones(k, dtype=torch.float64))
        M = torch.zeros(k, k, dtype=torch.float64).index_put((a.rows, a.cols), a.values.detach())
        h = torch.randn(5, W.shape[1], dtype=torch.float64)
        expected = F.linear(h, W + a.U @ M @ a.V.mT, layer.bias)
        with torch.no_grad():
            torch.testing.assert_close(layer(h), expected)
            torch.testing.assert_close(layer.merged_linear()(h), expected)
    assert strategy.tag == f"svft_{pattern}" + ("" if pattern == "plain" else "_d1") + "_k6"
    save_adapter(model, tmp_path / "a")
    loaded = Stack(widths, seed=3).double()
    load_adapter(loaded, tmp_path / "a")
    assert get_strategy(loaded).svd_rank == 6
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_svft_truncated_rank_memory_and_refusals():
    """``U`` and ``V`` shrink by ``k / min(out, in)``; a rank below ``off_diag + 1`` is refused naming the layer and
    the kept rank; ``rank`` must be an integer >= 1."""
    full = SVFT(pattern="banded", off_diag=2).apply(Stack([48, 48, 96]))
    cut = SVFT(pattern="banded", off_diag=2, svd_rank=12).apply(Stack([48, 48, 96]))

    def uv_values(model):
        return sum(a.U.numel() + a.V.numel() for layer in adapted_layers(model).values()
                   for a in layer.adapters.values())

    assert uv_values(full) == 48 * (48 + 48) + 48 * (96 + 48) and uv_values(cut) == 12 * (48 + 48) + 12 * (96 + 48)
    expect_apply_error(Stack([48, 48]), SVFT(pattern="banded", off_diag=2, svd_rank=2), "layers.0", "off_diag=2",
                       "the kept rank 2")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="svd_rank must be an integer >= 1"):
            SVFT(svd_rank=bad)
