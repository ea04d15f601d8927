"""Exactness of every adapter method against the dense float64 reference in ``tests/helpers/reference.py``.

1. forward == reference formula (float64, random non-initial adapter values, both compute sides, fused qkv split,
   partial targets), train == eval with dropout 0;
2. identity at initialisation;
3. exact, idempotent merge;
4. BOFT's rotation: orthogonal, block-diagonal with blocks of b·2^(m-1), Neumann == exact (same orientation),
   Neumann guard for large ‖A‖, ``orthogonality_error``;
5. low-precision dtypes and autocast;
6. gradients == gradients through the reference (float64).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from helpers.models import make_vit, randomize
from helpers.reference import (
    boft_rotation,
    cayley_dense,
    reference_layer,
    skew_from_free,
    svft_support,
    svft_support_size,
)

from lit_peft.adapters import (
    BOFT,
    OFT,
    SVFT,
    AdaptedLinear,
    BOFTLinear,
    DoRA,
    LoRA,
    VeRA,
    adapted_layers,
    find_strategy,
    merge_adapters,
    orthogonality_error,
)

timm = pytest.importorskip("timm")



F64_TOL = 1e-10
DTYPE_TOL = {torch.float32: 1e-5, torch.bfloat16: 6e-2, torch.float16: 1e-2}
VIT_BIAS_STD = 0.05  # make_vit's linears get non-zero biases, N(0, 0.05²)


# -- models ------------------------------------------------------------------------------------------------------
class Net(nn.Module):
    """Tall (fc1), wide and bias-free (fc2) and fused-qkv (qkv, square parts) linears."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width, bias=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.width = width

    def forward(self, x):
        return torch.cat([self.fc2(torch.tanh(self.fc1(x))), self.qkv(x)], dim=-1)


class Single(nn.Module):
    def __init__(self, n_in: int, n_out: int, bias: bool = True):
        super().__init__()
        self.lin = nn.Linear(n_in, n_out, bias=bias)
        self.width = n_in

    def forward(self, x):
        return self.lin(x)


def make_net(seed: int = 0, width: int = 16) -> Net:
    torch.manual_seed(seed)
    net = Net(width)
    with torch.no_grad():  # non-zero biases
        for m in net.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.3)
    return net


def net_input(model, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, model.width, generator=gen, dtype=torch.float64).to(dtype)


def vit_input(dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64).to(dtype)


# -- helpers -----------------------------------------------------------------------------------------------------
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def reference_params(base: nn.Module, adapted: nn.Module, detach_norm: bool = True) -> dict[str, torch.Tensor]:
    """``{"<layer>.weight": W', "<layer>.bias": b'}`` of every adapted layer, computed by the reference from the
    *base model's* weights (float64) and the adapted layer's adapter tensors."""
    params = {}
    for name, layer in adapted_layers(adapted).items():
        lin = base.get_submodule(name)
        W = lin.weight.detach().double()
        b = None if lin.bias is None else lin.bias.detach().double()
        W_new, b_new = reference_layer(layer, W, b, detach_norm)
        params[f"{name}.weight"] = W_new
        if b_new is not None:
            params[f"{name}.bias"] = b_new
    return params


def reference_forward(base64: nn.Module, adapted: nn.Module, x: torch.Tensor, grad: bool = False):
    """The base model (float64) run with the reference's adapted weights in place of the adapted layers."""
    with torch.set_grad_enabled(grad):
        return functional_call(base64, reference_params(base64, adapted), (x,))


def adapt(base: nn.Module, strategy, dtype=torch.float64, seed=0, random_values=True, std=0.3):
    """A deep copy of ``base`` adapted with ``strategy``, cast to ``dtype``, with random adapter values."""
    model = strategy.apply(copy.deepcopy(base)).to(dtype)
    if random_values:
        randomize(model, seed, std, absolute=True)
    return model.eval()


# -- the strategies under test -----------------------------------------------------------------------------------
# pytest.param(case_id, factory): factory(side, **target_kwargs) -> strategy
BOFT_CONFIGS = [(4, 1), (2, 2), (4, 2), (2, 3), (4, 3), (8, 2), (2, 4)]  # (4,3), (8,2), (2,4): dense R for in=16


def case(case_id, factory):
    return pytest.param(case_id, factory, id=case_id)


def boft_cases():
    cases = []
    for b, m in BOFT_CONFIGS:
        cases.append(case(f"boft-b{b}-m{m}", lambda side, b=b, m=m, **kw: BOFT(block_size=b, n_butterfly_factors=m,
                                                                                 side=side, **kw)))
    cases.append(case("oft-b4", lambda side, **kw: OFT(block_size=4, side=side, **kw)))
    cases.append(case("boft-noscale-trainbias", lambda side, **kw: BOFT(block_size=4, n_butterfly_factors=2,
                                                                        scale=False, train_bias=True, side=side, **kw)))
    cases.append(case("boft-neumann-guarded", lambda side, **kw: BOFT(block_size=4, n_butterfly_factors=2,
                                                                      cayley="neumann", side=side, **kw)))
    return cases


def svft_cases():
    cases = []
    for pattern, d in [("plain", 0), ("banded", 1), ("banded", 2), ("random", 2), ("top_k", 1)]:
        for init in ("zero", "gated"):
            cases.append(case(f"svft-{pattern}{d}-{init}", lambda side, p=pattern, d=d, i=init, **kw: SVFT(
                pattern=p, off_diag=d, init=i, svd_dtype="float64", side=side, **kw)))
    return cases


OTHER_CASES = [
    case("lora", lambda side, **kw: LoRA(rank=3, alpha=6.0, **kw)),
    case("dora", lambda side, **kw: DoRA(rank=3, alpha=6.0, **kw)),
    case("vera", lambda side, **kw: VeRA(rank=4, **kw)),
]
ALL_CASES = boft_cases() + svft_cases() + OTHER_CASES
SIDES = ["activation", "weight", "auto"]
TARGETS = {
    "all": dict(target_modules="all-linear"),
    "qkv-q-v": dict(target_modules=["qkv.q", "qkv.v"]),
    "joint": dict(target_modules="all-linear", fused_qkv="joint"),
}


def targets_for(case_id: str, target: str) -> dict | None:
    """top_k needs square parts: the q/k/v parts of the 16-wide qkv; other layers are not square."""
    if "top_k" in case_id:
        return {"all": dict(target_modules=["qkv"]), "qkv-q-v": TARGETS["qkv-q-v"]}.get(target)
    return TARGETS[target]


def _side_applies(case_id: str) -> bool:
    return case_id.startswith(("boft", "oft", "svft"))


# =================================================================================================================
# 1. forward == reference (float64)
# =================================================================================================================
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case_id,factory", ALL_CASES)
def test_forward_matches_reference_net(case_id, factory, side, target):
    if side != "activation" and not _side_applies(case_id):
        pytest.skip("method has a single compute path")
    kw = targets_for(case_id, target)
    if kw is None:
        pytest.skip("top_k needs square parts")
    base = make_net()
    model = adapt(base, factory(side, **kw))
    layers = adapted_layers(model)
    if target == "qkv-q-v":
        assert set(layers) == {"qkv"} and set(layers["qkv"].parts) == {"q", "v"}
        assert layers["qkv"].parts == {"q": (0, 16), "v": (32, 48)}
    elif target == "all" and "top_k" not in case_id:
        assert set(layers["qkv"].parts) == {"q", "k", "v"}
    elif target == "joint":
        assert set(layers["qkv"].parts) == {"all"}
    if "qkv" in layers and len(layers["qkv"].parts) > 1:  # different adapter values per part
        first, second = [dict(layers["qkv"].adapters[p].named_parameters()) for p in list(layers["qkv"].parts)[:2]]
        name = next(iter(first))
        assert not torch.equal(first[name], second[name])
    base64 = copy.deepcopy(base).double()
    x = net_input(base)
    expected = reference_forward(base64, model, x)
    assert rel_err(model(x), expected) <= F64_TOL
    with torch.no_grad():  # side="auto" may switch path without a backward pass
        assert rel_err(model(x), expected) <= F64_TOL
    assert rel_err(model(x[0, :1]), expected[0, :1]) <= F64_TOL  # a single token
    # the adapter changes the function (random non-initial values), so the check has power
    assert rel_err(base64(x), expected) > 1e-3


@pytest.mark.parametrize("side", ["activation", "weight"])
@pytest.mark.parametrize("b,m", [(4, 7), (8, 6), (4, 3)])
def test_boft_wide_layer_both_rotation_paths(b, m, side):
    """in=256: (4,7) and (8,6) are dense and take the factor-by-factor path, (4,3) the folded-blocks path."""
    torch.manual_seed(0)
    base = Single(256, 12)
    model = adapt(base, BOFT(block_size=b, n_butterfly_factors=m, side=side))
    x = net_input(base)
    expected = reference_forward(copy.deepcopy(base).double(), model, x)
    assert rel_err(model(x), expected) <= F64_TOL
    layer = model.lin
    R = layer.rotation("all")
    assert rel_err(R, boft_rotation(layer.adapters["all"].skew.detach(), b)) <= F64_TOL


VIT_CASES = [
    pytest.param(lambda side: BOFT(block_size=4, n_butterfly_factors=2, side=side), id="boft-b4-m2"),
    pytest.param(lambda side: BOFT(block_size=4, n_butterfly_factors=5, side=side, train_bias=True),
                 id="boft-b4-m5-trainbias"),
    pytest.param(lambda side: BOFT(block_size=8, n_butterfly_factors=4, side=side), id="boft-b8-m4-dense-qkv"),
    pytest.param(lambda side: OFT(block_size=8, side=side), id="oft-b8"),
    pytest.param(lambda side: SVFT(pattern="plain", init="zero", side=side), id="svft-plain"),
    pytest.param(lambda side: SVFT(pattern="banded", off_diag=2, init="gated", side=side), id="svft-banded-gated"),
    pytest.param(lambda side: SVFT(pattern="random", off_diag=2, side=side), id="svft-random"),
    pytest.param(lambda side: SVFT(pattern="top_k", off_diag=1, side=side, target_modules=["qkv", "proj"]),
                 id="svft-topk"),
    pytest.param(lambda side: LoRA(rank=4, alpha=8.0), id="lora"),
    pytest.param(lambda side: DoRA(rank=4, alpha=8.0), id="dora"),
    pytest.param(lambda side: VeRA(rank=8), id="vera"),
]
VIT_PARTIAL = dict(target_modules=["qkv.q", "qkv.v", "fc2"])


@pytest.mark.parametrize("side", ["activation", "weight"])
@pytest.mark.parametrize("factory", VIT_CASES)
def test_forward_matches_reference_vit(factory, side):
    base = make_vit(bias_std=VIT_BIAS_STD)
    strategy = factory(side)
    if side == "weight" and not hasattr(strategy, "side"):
        pytest.skip("method has a single compute path")
    model = adapt(base, strategy)
    assert set(adapted_layers(model)["blocks.0.attn.qkv"].parts) == {"q", "k", "v"}
    base64 = copy.deepcopy(base).double()
    x = vit_input()
    expected = reference_forward(base64, model, x)
    with torch.no_grad():
        got = model(x)
    assert rel_err(got, expected) <= F64_TOL
    assert rel_err(base64(x), expected) > 1e-4


@pytest.mark.parametrize("factory", [pytest.param(lambda: BOFT(block_size=4, n_butterfly_factors=3, side="weight",
                                                               **VIT_PARTIAL), id="boft"),
                                     pytest.param(lambda: SVFT(pattern="banded", off_diag=1, side="activation",
                                                               **VIT_PARTIAL), id="svft"),
                                     pytest.param(lambda: DoRA(rank=2, **VIT_PARTIAL), id="dora")])
def test_forward_matches_reference_vit_partial_qkv(factory):
    base = make_vit(bias_std=VIT_BIAS_STD)
    model = adapt(base, factory())
    layers = adapted_layers(model)
    assert set(layers) == {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "mlp.fc2")}
    assert set(layers["blocks.1.attn.qkv"].parts) == {"q", "v"}
    x = vit_input()
    expected = reference_forward(copy.deepcopy(base).double(), model, x)
    with torch.no_grad():
        assert rel_err(model(x), expected) <= F64_TOL
        # the k rows are exactly the base rows
        qkv = model.blocks[0].attn.qkv
        tokens = torch.randn(3, 64, dtype=torch.float64)
        k_rows = qkv(tokens)[:, 64:128]
        base_qkv = base.blocks[0].attn.qkv
        assert torch.allclose(k_rows, F.linear(tokens, base_qkv.weight.double()[64:128],
                                               base_qkv.bias.double()[64:128]), rtol=0, atol=1e-14)


@pytest.mark.parametrize("case_id,factory", ALL_CASES)
def test_train_mode_equals_eval_mode(case_id, factory):
    for side in (["activation", "weight"] if _side_applies(case_id) else ["activation"]):
        base = make_net()
        kw = targets_for(case_id, "all")
        model = adapt(base, factory(side, **kw))
        x = net_input(base)
        eval_out = model(x)
        model.train()
        train_out = model(x)
        assert rel_err(train_out, eval_out) <= 1e-14, side


@pytest.mark.parametrize("factory", [pytest.param(lambda: BOFT(block_size=4, n_butterfly_factors=2), id="boft"),
                                     pytest.param(lambda: SVFT(pattern="banded", off_diag=1), id="svft"),
                                     pytest.param(lambda: LoRA(rank=3), id="lora"),
                                     pytest.param(lambda: DoRA(rank=3), id="dora"),
                                     pytest.param(lambda: VeRA(rank=4), id="vera")])
def test_apply_to_float64_model(factory):
    """Adapters applied to a model that is already float64 must compute in float64 (exact to 1e-10)."""
    base = make_net().double()
    model = factory().apply(copy.deepcopy(base))
    randomize(model, std=0.3, absolute=True)
    model.eval()
    x = net_input(base)
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float64}
    err = rel_err(model(x), reference_forward(base, model, x))
    assert err <= F64_TOL, f"relative error {err:.3g} on a float64 model; adapter parameters not in float64: {dtypes}"
    assert not dtypes


def test_vera_projections_shared_and_frozen():
    model = adapt(make_vit(bias_std=VIT_BIAS_STD), VeRA(rank=8))
    layers = list(adapted_layers(model).values())
    assert len({id(layer.projections) for layer in layers}) == 1
    assert not any(p.requires_grad for layer in layers for p in layer.projections.parameters())
    assert {n.rpartition(".")[2] for layer in layers for n, _ in layer.adapters.named_parameters()} == {
        "lambda_d", "lambda_b"}


@pytest.mark.parametrize("pattern,d", [("plain", 0), ("banded", 1), ("banded", 3), ("random", 2), ("top_k", 1),
                                       ("top_k", 2)])
def test_svft_svd_and_support_match_definition(pattern, d):
    """The frozen SVD reproduces each part's rows with canonical signs; Ω is the pattern's support."""
    base = make_net().double()
    kw = dict(target_modules=["qkv"]) if pattern == "top_k" else {}
    model = SVFT(pattern=pattern, off_diag=d, svd_dtype="float64", **kw).apply(copy.deepcopy(base))
    for name, layer in adapted_layers(model).items():
        for part, (start, stop) in layer.parts.items():
            ad = layer.adapters[part]
            assert {n for n, _ in ad.named_parameters()} <= {"values", "gate"}
            W = base.get_submodule(name).weight.detach()[start:stop]
            U, S, V = ad.U, ad.S, ad.V
            r = min(W.shape)
            assert U.shape == (W.shape[0], r) and V.shape == (W.shape[1], r) and S.shape == (r,)
            assert rel_err(U @ torch.diag(S) @ V.T, W) <= 1e-12
            eye = torch.eye(r, dtype=torch.float64)
            assert (U.T @ U - eye).abs().max() <= 1e-12 and (V.T @ V - eye).abs().max() <= 1e-12
            assert torch.all(S[:-1] >= S[1:]) and torch.all(S >= 0)
            independent = torch.linalg.eigvalsh(W.T @ W if W.shape[0] >= W.shape[1] else W @ W.T).flip(0).sqrt()
            assert (S - independent).abs().max() <= 1e-10
            pivot = U.abs().argmax(dim=0)
            assert torch.all(U[pivot, torch.arange(r)] > 0), "non-canonical signs"
            support = list(zip(ad.rows.tolist(), ad.cols.tolist()))
            assert len(set(support)) == len(support), "repeated positions in Ω"
            expected_size = r if pattern == "plain" else svft_support_size(r, d)
            assert len(support) == expected_size == ad.values.numel()
            assert all(0 <= i < r and 0 <= j < r for i, j in support)
            if pattern == "random":
                assert set(support) != svft_support("banded", r, d)
            else:
                assert set(support) == svft_support(pattern, r, d, U, V)


# =================================================================================================================
# 2. identity at initialisation
# =================================================================================================================
INIT_CASES = [
    pytest.param(lambda side: BOFT(block_size=4, n_butterfly_factors=2, side=side), id="boft"),
    pytest.param(lambda side: BOFT(block_size=4, n_butterfly_factors=3, cayley="neumann", side=side),
                 id="boft-neumann"),
    pytest.param(lambda side: OFT(block_size=8, side=side), id="oft"),
    pytest.param(lambda side: SVFT(pattern="plain", init="zero", side=side), id="svft-plain"),
    pytest.param(lambda side: SVFT(pattern="banded", off_diag=2, init="zero", side=side), id="svft-banded"),
    pytest.param(lambda side: SVFT(pattern="random", off_diag=2, init="zero", side=side), id="svft-random"),
    pytest.param(lambda side: SVFT(pattern="top_k", off_diag=1, init="zero", side=side,
                                   target_modules=["qkv", "proj"]), id="svft-topk"),
    pytest.param(lambda side: LoRA(rank=4), id="lora"),
    pytest.param(lambda side: DoRA(rank=4), id="dora"),
    pytest.param(lambda side: VeRA(rank=8), id="vera"),
]


@pytest.mark.parametrize("side", ["activation", "weight"])
@pytest.mark.parametrize("factory", INIT_CASES)
def test_identity_at_init_vit(factory, side):
    base = make_vit(bias_std=VIT_BIAS_STD)
    strategy = factory(side)
    if side == "weight" and not hasattr(strategy, "side"):
        pytest.skip("method has a single compute path")
    model = strategy.apply(copy.deepcopy(base)).eval()
    x = vit_input(torch.float32)
    with torch.no_grad():
        expected = base(x)
        assert rel_err(model(x), expected) <= 1e-6
    model.train()  # with gradients enabled too (side="auto" may pick the other path)
    assert rel_err(model(x), expected) <= 1e-6


def test_svft_gated_init_is_not_identity_and_matches_reference():
    base = make_net()
    model = adapt(base, SVFT(pattern="banded", off_diag=1, init="gated", svd_dtype="float64"), random_values=False)
    layer = model.fc1
    part = layer.adapters["all"]
    assert part.gate is not None and part.gate.item() == 0.0
    x = net_input(base)
    expected = reference_forward(copy.deepcopy(base).double(), model, x)
    assert rel_err(model(x), expected) <= F64_TOL
    assert rel_err(base.double()(x), expected) > 1e-3


# =================================================================================================================
# 3. exact, idempotent merge
# =================================================================================================================
MERGE_CASES = [
    pytest.param(lambda: BOFT(block_size=4, n_butterfly_factors=2, train_bias=True), id="boft"),
    pytest.param(lambda: BOFT(block_size=8, n_butterfly_factors=4, cayley="neumann"), id="boft-neumann-dense"),
    pytest.param(lambda: OFT(block_size=8), id="oft"),
    pytest.param(lambda: SVFT(pattern="banded", off_diag=2, init="gated"), id="svft-banded"),
    pytest.param(lambda: SVFT(pattern="plain"), id="svft-plain"),
    pytest.param(lambda: SVFT(pattern="top_k", target_modules=["qkv", "proj"]), id="svft-topk"),
    pytest.param(lambda: LoRA(rank=4), id="lora"),
    pytest.param(lambda: DoRA(rank=4), id="dora"),
    pytest.param(lambda: VeRA(rank=8), id="vera"),
    pytest.param(lambda: BOFT(block_size=4, n_butterfly_factors=2, target_modules=["qkv.q", "qkv.v"]),
                 id="boft-partial-qkv"),
    pytest.param(lambda: SVFT(pattern="random", target_modules=["qkv.k", "fc1"]), id="svft-partial-qkv"),
]


@pytest.mark.parametrize("factory", MERGE_CASES)
def test_merge_is_exact_and_idempotent(factory):
    base = make_vit(bias_std=VIT_BIAS_STD)
    model = adapt(base, factory(), dtype=torch.float32)
    names = set(adapted_layers(model))
    adapters64 = adapt(base, factory(), dtype=torch.float64, random_values=False)
    adapters64.load_state_dict(model.state_dict())  # the same adapter values, in float64, for the reference
    with torch.no_grad():
        ref_params = reference_params(copy.deepcopy(base).double(), adapters64)
    x = vit_input(torch.float32)
    with torch.no_grad():
        adapted64 = adapters64(x.double())
        merge_adapters(adapters64)
        merged64 = adapters64(x.double())
        rounded = copy.deepcopy(adapters64).float()(x)  # the exact merge, stored in float32
        adapted = model(x)
        merge_adapters(model)
        merged = model(x)
    assert rel_err(merged64, adapted64) <= 1e-12  # the merge is exact: float64 shows rounding only
    # float32: storing even the exact merged weights in float32 moves the outputs (~1e-5 here, machine-dependent
    # through the BLAS kernels); the float32 merge may add as much again, beside the adapted forward's own rounding
    floor = rel_err(rounded, adapted64)
    assert rel_err(merged, adapted) <= max(1e-5, 2 * floor + rel_err(adapted, adapted64))
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    assert find_strategy(model) is None
    for name in names:
        lin = model.get_submodule(name)
        assert type(lin) is nn.Linear and lin.weight.dtype == torch.float32
        assert rel_err(lin.weight, ref_params[f"{name}.weight"]) <= 1e-5, name
        if f"{name}.bias" in ref_params:
            assert rel_err(lin.bias, ref_params[f"{name}.bias"]) <= 1e-5, name
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merge_adapters(model)
    with torch.no_grad():
        again = model(x)
    assert torch.equal(again, merged)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# =================================================================================================================
# 4. BOFT's rotation
# =================================================================================================================
def boft_single(n_in: int, b: int, m: int, dtype=torch.float32, cayley="exact", n_out: int = 8, seed=0, std=0.5):
    torch.manual_seed(seed)
    model = BOFT(block_size=b, n_butterfly_factors=m, cayley=cayley).apply(Single(n_in, n_out)).to(dtype)
    randomize(model, seed, std=std, absolute=True)
    return model.lin


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_boft_rotation_orthogonal_and_block_diagonal(m):
    n, b = 64, 4
    layer = boft_single(n, b, m)
    R = layer.rotation("all")
    assert R.shape == (n, n) and R.dtype == torch.float32
    eye = torch.eye(n)
    assert (R.T @ R - eye).norm() <= 1e-5
    assert (R @ R.T - eye).norm() <= 1e-5
    size = b * 2 ** (m - 1)
    inside = torch.block_diag(*[torch.ones(size, size, dtype=torch.bool)] * (n // size))
    assert torch.all(R[~inside] == 0), "nonzero entries outside the diagonal blocks"
    assert torch.all(R[inside] != 0), f"zero entries inside the {size}x{size} diagonal blocks"
    if m == 5:
        assert inside.all()  # dense
    # the same rotation as the dense reference (exact orientation, not the transpose)
    skew64 = layer.adapters["all"].skew.detach().double()
    R_ref = boft_rotation(skew64, b)
    assert torch.equal(R_ref != 0, inside)
    assert (R.double() - R_ref).abs().max() <= 1e-5
    assert (R_ref - R_ref.T).abs().max() > 0.1


def test_boft_orthogonal_blocks_are_cayley_of_skew():
    layer = boft_single(16, 4, 2, dtype=torch.float64)
    Q = layer.orthogonal_blocks("all")
    skew = layer.adapters["all"].skew.detach()
    for i in range(Q.shape[0]):
        for k in range(Q.shape[1]):
            A = skew_from_free(skew[i, k], 4)
            assert torch.allclose(A, -A.T)
            assert torch.allclose(Q[i, k], cayley_dense(A), rtol=0, atol=1e-13)


def test_neumann_matches_exact_for_small_skew():
    exact = boft_single(32, 8, 2, cayley="exact", std=0.01)
    neumann = boft_single(32, 8, 2, cayley="neumann", std=0.01)
    assert torch.equal(exact.adapters["all"].skew, neumann.adapters["all"].skew)
    A_norms = torch.linalg.matrix_norm(torch.stack([skew_from_free(f, 8) for f in exact.adapters["all"].skew[0]]))
    assert 0.03 < A_norms.max() < 0.2  # inside the series' accurate range, far from zero
    Q_e, Q_n = exact.orthogonal_blocks("all"), neumann.orthogonal_blocks("all")
    assert (Q_e - Q_n).abs().max() <= 1e-6
    assert (Q_e - Q_e.mT).abs().max() > 1e-2  # transposes would be told apart
    R_e, R_n = exact.rotation("all"), neumann.rotation("all")
    assert (R_e - R_n).abs().max() <= 1e-6
    R_ref = boft_rotation(exact.adapters["all"].skew.detach().double(), 8)
    assert (R_n.double() - R_ref).abs().max() <= 1e-6
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert rel_err(neumann(x), exact(x)) <= 1e-6


@pytest.mark.parametrize("norm", [0.15, 0.3, 0.6, 1.0, 3.0, 10.0])
def test_neumann_guard_keeps_q_orthogonal(norm):
    """Blocks with ‖A‖_F of every size, mixed with small ones in one layer: Neumann Q stays orthogonal."""
    exact = boft_single(32, 8, 2, cayley="exact")
    neumann = boft_single(32, 8, 2, cayley="neumann")
    with torch.no_grad():
        for layer in (exact, neumann):
            skew = layer.adapters["all"].skew
            gen = torch.Generator().manual_seed(3)
            free = torch.randn(skew.shape, generator=gen)
            free = free / (free.norm(dim=-1, keepdim=True) * 2**0.5)  # ‖A‖_F = 1 per block
            targets = torch.tensor([norm, 0.01, norm, 0.05])[: skew.shape[1]]
            skew.copy_(free * targets[None, :, None])
    A = torch.stack([skew_from_free(f, 8) for f in neumann.adapters["all"].skew.detach()[0]])
    assert torch.linalg.matrix_norm(A)[0].item() == pytest.approx(norm, rel=1e-5)
    Q_n = neumann.orthogonal_blocks("all")
    eye = torch.eye(8)
    ortho = torch.linalg.matrix_norm(Q_n.mT @ Q_n - eye).max().item()
    assert ortho <= 5e-4
    if norm >= 0.3:
        Q_e = exact.orthogonal_blocks("all")
        assert (Q_n - Q_e).abs().max() <= 1e-5
        assert ortho <= 1e-5
    assert orthogonality_error(nn.ModuleDict({"a": neumann})) <= 5e-4


def test_orthogonality_error():
    boft = adapt(make_vit(bias_std=VIT_BIAS_STD), BOFT(block_size=4, n_butterfly_factors=3), dtype=torch.float32)
    err = orthogonality_error(boft)
    assert err is not None and 0 <= err <= 1e-5
    oft = adapt(make_vit(bias_std=VIT_BIAS_STD), OFT(block_size=8, cayley="neumann"), dtype=torch.float32)
    assert orthogonality_error(oft) <= 1e-5  # large random skew: the guard falls back to the exact map
    assert orthogonality_error(adapt(make_vit(bias_std=VIT_BIAS_STD), LoRA(rank=2), dtype=torch.float32)) is None
    assert orthogonality_error(adapt(make_vit(bias_std=VIT_BIAS_STD), SVFT(), dtype=torch.float32)) is None
    assert orthogonality_error(make_vit(bias_std=VIT_BIAS_STD)) is None


# =================================================================================================================
# 5. dtypes
# =================================================================================================================
DTYPE_CASES = [
    pytest.param(lambda side: BOFT(block_size=4, n_butterfly_factors=2, side=side), id="boft"),
    pytest.param(lambda side: BOFT(block_size=8, n_butterfly_factors=4, cayley="neumann", side=side),
                 id="boft-neumann"),
    pytest.param(lambda side: SVFT(pattern="banded", off_diag=1, side=side), id="svft-banded"),
    pytest.param(lambda side: SVFT(pattern="plain", side=side), id="svft-plain"),
    pytest.param(lambda side: LoRA(rank=4), id="lora"),
]


def _forward_backward(model, x):
    y = model(x)
    loss = y.float().square().mean()
    loss.backward()
    return y


@pytest.mark.parametrize("order", ["cast-after-apply", "apply-to-cast-model"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("side", ["activation", "weight"])
@pytest.mark.parametrize("factory", DTYPE_CASES)
def test_low_precision_forward_backward(factory, side, dtype, order):
    strategy = factory(side)
    if side == "weight" and not hasattr(strategy, "side"):
        pytest.skip("method has a single compute path")
    if dtype == torch.float32 and order != "cast-after-apply":
        pytest.skip("same as cast-after-apply")
    base = make_vit(bias_std=VIT_BIAS_STD)
    model32 = adapt(base, strategy, dtype=torch.float32, std=0.1)
    x = vit_input(torch.float32)
    with torch.no_grad():
        y32 = model32(x)
    if order == "cast-after-apply":
        model = copy.deepcopy(model32).to(dtype).train()
    else:  # adapters built on a model already in dtype, then given the same adapter values
        model = factory(side).apply(copy.deepcopy(base).to(dtype)).train()
        model.load_state_dict(model32.state_dict())
        # compare with the same adapted model in float32: SVFT's SVD is recomputed from the rounded weights, and
        # a few singular-vector pairs of nearly tied magnitude flip their canonical sign or rotate, which changes
        # what a given M means (a property of rounding the base weights, not of the low-precision arithmetic)
        with torch.no_grad():
            y32 = copy.deepcopy(model).float().eval()(x)
    try:
        y = _forward_backward(model, x.to(dtype))
    except RuntimeError as err:
        if dtype == torch.float16 and "not implemented" in str(err).lower():
            pytest.skip(f"float16 op unsupported on CPU: {err}")
        raise
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    assert rel_err(y, y32) <= DTYPE_TOL[dtype]
    grads = [p.grad for layer in adapted_layers(model).values() for p in layer.adapters.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    for layer in adapted_layers(model).values():
        if isinstance(layer, BOFTLinear):
            for part in layer.parts:
                assert layer.orthogonal_blocks(part).dtype == torch.float32


@pytest.mark.parametrize("side", ["activation", "weight"])
@pytest.mark.parametrize("factory", DTYPE_CASES)
def test_autocast_bf16(factory, side):
    strategy = factory(side)
    if side == "weight" and not hasattr(strategy, "side"):
        pytest.skip("method has a single compute path")
    base = make_vit(bias_std=VIT_BIAS_STD)
    model = adapt(base, strategy, dtype=torch.float32, std=0.1)
    x = vit_input(torch.float32)
    with torch.no_grad():
        y32 = model(x)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        for layer in adapted_layers(model).values():
            if isinstance(layer, BOFTLinear):
                for part in layer.parts:
                    assert layer.orthogonal_blocks(part).dtype == torch.float32
    y.float().square().mean().backward()
    assert torch.isfinite(y).all()
    assert rel_err(y, y32) <= DTYPE_TOL[torch.bfloat16]
    params = [p for layer in adapted_layers(model).values() for p in layer.adapters.parameters()]
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               and torch.isfinite(p.grad).all() for p in params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_boft_blocks_float32_on_low_precision_model(dtype):
    model = adapt(make_net(), BOFT(block_size=4, n_butterfly_factors=2), dtype=dtype)
    for layer in adapted_layers(model).values():
        for part in layer.parts:
            Q = layer.orthogonal_blocks(part)
            assert Q.dtype == torch.float32
            eye = torch.eye(4)
            assert torch.linalg.matrix_norm(Q.mT @ Q - eye).max() <= 1e-5


# =================================================================================================================
# 6. gradients == gradients through the reference (float64)
# =================================================================================================================
GRAD_CASES = [
    pytest.param(lambda side: BOFT(block_size=4, n_butterfly_factors=2, side=side), id="boft-b4-m2"),
    pytest.param(lambda side: BOFT(block_size=2, n_butterfly_factors=4, side=side, train_bias=True),
                 id="boft-b2-m4-dense-trainbias"),
    pytest.param(lambda side: OFT(block_size=4, side=side), id="oft"),
    pytest.param(lambda side: BOFT(block_size=4, n_butterfly_factors=3, side=side,
                                   target_modules=["qkv.q", "qkv.v", "fc2"]), id="boft-partial"),
    pytest.param(lambda side: SVFT(pattern="plain", svd_dtype="float64", side=side), id="svft-plain"),
    pytest.param(lambda side: SVFT(pattern="banded", off_diag=2, init="gated", svd_dtype="float64", side=side),
                 id="svft-banded-gated"),
    pytest.param(lambda side: SVFT(pattern="random", off_diag=1, svd_dtype="float64", side=side,
                                   target_modules=["qkv.k", "fc1"]), id="svft-random-partial"),
    pytest.param(lambda side: LoRA(rank=3), id="lora"),
    pytest.param(lambda side: DoRA(rank=3), id="dora"),
    pytest.param(lambda side: VeRA(rank=4), id="vera"),
]


@pytest.mark.parametrize("side", ["activation", "weight"])
@pytest.mark.parametrize("factory", GRAD_CASES)
def test_gradients_match_reference(factory, side):
    strategy = factory(side)
    if side == "weight" and not hasattr(strategy, "side"):
        pytest.skip("method has a single compute path")
    base = make_net()
    model = adapt(base, strategy)
    base64 = copy.deepcopy(base).double()
    x = net_input(base)
    target = torch.randn(2, 5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert params
    loss = ((model(x) - target) ** 2).sum()
    grads = torch.autograd.grad(loss, list(params.values()))
    ref_loss = ((reference_forward(base64, model, x, grad=True) - target) ** 2).sum()
    ref_grads = torch.autograd.grad(ref_loss, list(params.values()))
    assert rel_err(loss, ref_loss) <= F64_TOL
    for name, g, r in zip(params, grads, ref_grads):
        assert r.abs().max() > 0, name
        assert rel_err(g, r) <= 1e-9, name
