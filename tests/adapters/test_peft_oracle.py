"""Hugging Face ``peft`` as an oracle for lit_peft's BOFT, OFT, LoRA, DoRA and VeRA.

Each test builds one base model, deep-copies it, adapts one copy with ``peft.get_peft_model`` and the other with
the lit_peft strategy, gives the peft adapters random non-initial values, copies them (mapped, see below) into
lit_peft and checks that both compute the same function in eval mode: unmerged forward, merged forward
(``merge_and_unload`` against ``merge_adapters``) and, for the MLP, the gradients of every adapter tensor. Models
run in float64 so that the tolerances can be tight (``rtol=1e-10``); a float32 run checks the usual precision.

Mapping of the tensors, peft -> lit_peft (adapter name ``"default"``, lit_peft part ``"all"``):

* LoRA: ``lora_A.default.weight (r, in)`` -> ``lora_A``; ``lora_B.default.weight (out, r)`` -> ``lora_B``; peft's
  ``scaling = lora_alpha / r`` (``use_rslora=False``) equals ours ``alpha / rank``.
* DoRA (``LoraConfig(use_dora=True)``): as LoRA, plus ``lora_magnitude_vector.default.weight (out,)`` ->
  ``magnitude``. Both compute ``m / ‖W + s·BA‖_row`` with the norm detached; the initial magnitudes agree.
* BOFT: peft forms ``S = ½(boft_R − boft_Rᵀ)`` from a full ``(m, in/b, b, b)`` tensor (its symmetric half is dead
  weight), ``Q_peft = (I − S)(I + S)⁻¹`` and ``y = s ⊙ (x R_peft Wᵀ) + b`` with ``R_peft = F_{m-1}···F_0``,
  ``F_i = P_i blockdiag(Q_peft) P_iᵀ``. Ours is ``Q = (I + A)(I − A)⁻¹`` and ``y = s ⊙ (x R Wᵀ) + b``, so
  ``Q = Q_peft`` exactly when ``A = −S``: ``skew[..., k] = ½(boft_R[..., j, i] − boft_R[..., i, j])`` for
  the ``k``-th pair ``(i, j)`` of ``torch.triu_indices(b, b, 1)``. Blocks and factors are indexed alike (factor
  ``i`` block ``t`` of a group couples the half-blocks ``t`` and ``t + 2^i`` in both). ``boft_s (out, 1)`` ->
  ``scale (out,)``. Gradients: ``d skew[k] = G[j, i] − G[i, j]`` with ``G = d boft_R``.
  peft's butterfly path (``m > 1``) needs its CUDA extension ``fbd_cuda``; without it peft silently uses one
  factor. These tests replace ``get_fbd_cuda`` either by ``None`` (no compile attempt, ``m = 1``) or by a CPU
  stand-in (``torch.block_diag`` per factor; ``helpers.peft_cpu``, the ``peft_boft_on_cpu`` fixture) so that peft's
  real multi-factor path, permutations included, is compared too.
* OFT (peft's current parametrisation, checked with 0.21): ``OFTConfig(oft_block_size=b, r=0, coft=False,
  block_share=False, module_dropout=0, use_cayley_neumann=False)``. ``oft_R.default.weight (in/b, b(b−1)/2)``
  holds the upper triangle in ``triu_indices`` order, ``S = upper − upperᵀ``, ``Q_peft = (I − S)(I + S)⁻¹`` and
  each input block goes ``x_block → x_block Q_peft``. Ours: ``skew = −weight`` (one factor). peft's OFT has no
  output scale, so ours is built with ``scale=False``.
  peft's Cayley–Neumann path (``use_cayley_neumann=True``, its default; the series of peft >= 0.18) is oriented
  the other way round: with ``n`` terms it computes ``(I + S)(I + S + … + S^(n−2))``, which is our
  ``cayley="neumann"`` with ``skew = +weight`` and ``neumann_terms = n − 2``. So peft's exact and Neumann paths
  are transposes of each other (a defect of peft's); ours agree.
* VeRA: ``vera_lambda_d.default (r,)`` -> ``lambda_d``, ``vera_lambda_b.default (out,)`` -> ``lambda_b``; the shared
  ``base_model.vera_A.default (r, max_in)`` / ``vera_B.default (max_out, r)`` equal our ``projections.A`` / ``.B``
  bit for bit when ``projection_prng_key == seed`` (both Kaiming-uniform, gain √2, fan-in = columns, A drawn
  before B from one ``torch.Generator``; :func:`test_vera_projections_match_peft_prng`). They are copied anyway.

A timm ViT is adapted on ``qkv`` (``fused_qkv="joint"``: one matrix, as in peft), ``attn.proj``, ``fc1``, ``fc2``
(``"attn.proj"`` rather than ``"proj"``: peft would also adapt the ``patch_embed.proj`` convolution).

Most tests convert both models to float64 after adapting them. :func:`test_boft_float64_model_keeps_float64_precision`
does not: BOFT applied to a float64 model must create its adapter tensors in float64 too.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
import peft.tuners.boft.layer as peft_boft_layer  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

from helpers.models import make_vit  # noqa: E402
from lit_peft.adapters import BOFT, OFT, DoRA, LoRA, VeRA, adapted_layers, merge_adapters  # noqa: E402
from lit_peft.adapters.base import AdaptedLinear  # noqa: E402
from lit_peft.adapters.vera import VeRAProjections  # noqa: E402

ADAPTER = "default"
MLP_TARGETS = ["fc1", "fc2", "fc3"]
VIT_TARGETS = ["qkv", "attn.proj", "fc1", "fc2"]
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


# -- models ------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Widths 32 -> 48 -> 64 -> 32 -> 5; every adapted layer has a different shape."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 64)
        self.fc3 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.nn.functional.gelu(self.fc1(x))
        x = torch.nn.functional.gelu(self.fc2(x))
        return self.head(torch.tanh(self.fc3(x)))


def make_mlp() -> nn.Module:
    return MLP()


#: name -> (factory, targets, input shape); build_pair seeds before it calls the factory
MODELS = {"mlp": (make_mlp, MLP_TARGETS, (3, 7, 32)),
          "vit": (functools.partial(make_vit, seed=None), VIT_TARGETS, (2, 3, 32, 32))}




@pytest.fixture
def peft_boft_without_cuda(monkeypatch):
    """peft BOFT with one factor and no attempt to compile (or load) its CUDA extension."""
    monkeypatch.setattr(peft_boft_layer, "get_fbd_cuda", lambda: None)


# -- per-method mappings -----------------------------------------------------------------------------------------
def boft_skew_from_peft(boft_R: torch.Tensor) -> torch.Tensor:
    """peft ``boft_R (..., b, b)`` -> our free entries ``(..., b(b−1)/2)`` of ``A = −½(boft_R − boft_Rᵀ)``."""
    b = boft_R.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1)
    A = -0.5 * (boft_R - boft_R.transpose(-1, -2))
    return A[..., rows, cols]


def boft_skew_grad_from_peft(grad_R: torch.Tensor) -> torch.Tensor:
    """Chain rule of :func:`boft_skew_from_peft`: ``d skew[(i, j)] = G[j, i] − G[i, j]``."""
    b = grad_R.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1)
    return (grad_R.transpose(-1, -2) - grad_R)[..., rows, cols]


def copy_lora(p, l):
    a = l.adapters["all"]
    a.lora_A.copy_(p.lora_A[ADAPTER].weight)
    a.lora_B.copy_(p.lora_B[ADAPTER].weight)
    assert l.scaling == pytest.approx(p.scaling[ADAPTER])


def grads_lora(p, l):
    a = l.adapters["all"]
    return [("lora_A", a.lora_A.grad, p.lora_A[ADAPTER].weight.grad),
            ("lora_B", a.lora_B.grad, p.lora_B[ADAPTER].weight.grad)]


def copy_dora(p, l):
    copy_lora(p, l)
    l.adapters["all"].magnitude.copy_(p.lora_magnitude_vector[ADAPTER].weight)


def grads_dora(p, l):
    return grads_lora(p, l) + [("magnitude", l.adapters["all"].magnitude.grad,
                                p.lora_magnitude_vector[ADAPTER].weight.grad)]


def copy_boft(p, l):
    a = l.adapters["all"]
    assert a.skew.shape[0] == p.boft_R[ADAPTER].shape[0], "peft and lit_peft use different numbers of factors"
    a.skew.copy_(boft_skew_from_peft(p.boft_R[ADAPTER]))
    a.scale.copy_(p.boft_s[ADAPTER].squeeze(-1))


def grads_boft(p, l):
    a = l.adapters["all"]
    return [("skew", a.skew.grad, boft_skew_grad_from_peft(p.boft_R[ADAPTER].grad)),
            ("scale", a.scale.grad, p.boft_s[ADAPTER].grad.squeeze(-1))]


def copy_oft(p, l):
    l.adapters["all"].skew.copy_(-p.oft_R[ADAPTER].weight.unsqueeze(0))


def copy_oft_neumann(p, l):
    l.adapters["all"].skew.copy_(p.oft_R[ADAPTER].weight.unsqueeze(0))


def grads_oft(p, l):
    return [("skew", l.adapters["all"].skew.grad, -p.oft_R[ADAPTER].weight.grad.unsqueeze(0))]


def copy_vera(p, l):
    a = l.adapters["all"]
    a.lambda_d.copy_(p.vera_lambda_d[ADAPTER])
    a.lambda_b.copy_(p.vera_lambda_b[ADAPTER])


def grads_vera(p, l):
    a = l.adapters["all"]
    return [("lambda_d", a.lambda_d.grad, p.vera_lambda_d[ADAPTER].grad),
            ("lambda_b", a.lambda_b.grad, p.vera_lambda_b[ADAPTER].grad)]


def copy_vera_projections(peft_model, lit_model):
    """The shared random pair, peft -> ours (they are already equal for the same seed; see the VeRA test)."""
    ours = next(m for m in lit_model.modules() if isinstance(m, VeRAProjections))
    ours.A.copy_(peft_model.base_model.vera_A[ADAPTER])
    ours.B.copy_(peft_model.base_model.vera_B[ADAPTER])


@dataclasses.dataclass
class Method:
    peft_config: Callable[[list[str]], object]
    lit_strategy: Callable[[list[str]], object]
    copy_layer: Callable
    grads: Callable
    mergeable: bool = True  # peft's merge_and_unload is compared


def _oft_config(**kwargs):
    fields = getattr(peft.OFTConfig, "__dataclass_fields__", {})
    if "use_cayley_neumann" not in fields or "oft_block_size" not in fields:
        pytest.skip(f"peft {peft.__version__} has the pre-0.15 OFT parametrisation")
    return peft.OFTConfig(r=0, oft_block_size=4, module_dropout=0.0, coft=False, block_share=False, **kwargs)


METHODS = {
    "lora": Method(lambda t: peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=t),
                   lambda t: LoRA(rank=4, alpha=8, target_modules=t, fused_qkv="joint"), copy_lora, grads_lora),
    "dora": Method(lambda t: peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True, target_modules=t),
                   lambda t: DoRA(rank=4, alpha=8, target_modules=t, fused_qkv="joint"), copy_dora, grads_dora),
    "boft": Method(lambda t: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, boft_dropout=0.0,
                                             target_modules=t),
                   lambda t: BOFT(block_size=4, n_butterfly_factors=1, target_modules=t, fused_qkv="joint"),
                   copy_boft, grads_boft),
    "oft": Method(lambda t: _oft_config(use_cayley_neumann=False, target_modules=t),
                  lambda t: OFT(block_size=4, scale=False, target_modules=t, fused_qkv="joint"), copy_oft, grads_oft),
    "vera": Method(lambda t: peft.VeraConfig(r=8, projection_prng_key=0, d_initial=0.1, vera_dropout=0.0,
                                             save_projection=True, target_modules=t),
                   lambda t: VeRA(rank=8, d_init=0.1, seed=0, target_modules=t, fused_qkv="joint"),
                   copy_vera, grads_vera),
}


# -- building the pair -------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize_peft(peft_model: nn.Module, seed: int = 1) -> None:
    """Non-initial adapter values: scale-like tensors (BOFT ``s``, DoRA magnitude) × (1 + N(0, 0.1²)), every other
    trainable tensor N(0, σ²) with σ = 0.2 (BOFT/OFT skew, LoRA A and B, VeRA λ)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if not param.requires_grad:
            continue
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float64).to(param.dtype)
        if "boft_s" in name or "lora_magnitude_vector" in name:
            param.mul_(1 + 0.1 * noise)
        else:
            param.copy_(0.2 * noise)


@torch.no_grad()
def copy_into_lit(method: Method, peft_model: nn.Module, lit_model: nn.Module) -> None:
    layers = adapted_layers(lit_model)
    assert layers, "lit_peft adapted nothing"
    inner = peft_model.base_model.model
    for name, layer in layers.items():
        assert list(layer.parts) == ["all"], f"{name}: expected one joint part, got {list(layer.parts)}"
        method.copy_layer(inner.get_submodule(name), layer)
    if any(isinstance(m, VeRAProjections) for m in lit_model.modules()):
        copy_vera_projections(peft_model, lit_model)


def build_pair(method: Method, model: str, dtype=torch.float64, seed: int = 0, randomize: bool = True,
               copy_values: bool = True):
    """``(base, peft_model, lit_model, x)``: one base model, adapted twice, both in eval mode and ``dtype``."""
    make, targets, input_shape = MODELS[model]
    torch.manual_seed(seed)
    base = make().to(dtype).eval()
    peft_model = peft.get_peft_model(copy.deepcopy(base), method.peft_config(list(targets))).to(dtype).eval()
    lit_model = method.lit_strategy(list(targets)).apply(copy.deepcopy(base)).to(dtype).eval()
    peft_layers = [n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, BaseTunerLayer)]
    assert sorted(adapted_layers(lit_model)) == sorted(peft_layers), "peft and lit_peft adapted different layers"
    if randomize:
        randomize_peft(peft_model)
    if copy_values:
        copy_into_lit(method, peft_model, lit_model)
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64).to(dtype)
    return base, peft_model, lit_model, x


def assert_same(actual, expected, dtype, what):
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype], msg=lambda m: f"{what}: {m}")


# -- tests -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["mlp", "vit"])
@pytest.mark.parametrize("name", list(METHODS))
@torch.no_grad()
def test_forward_and_merge_match_peft(name, model, peft_boft_without_cuda):
    """At init both are the pretrained function (LoRA's A differs between the two; B = 0 hides it); with the same
    random adapter values both compute the same function, unmerged and merged, and merge to the same weights."""
    method = METHODS[name]
    base, peft_model, lit_model, x = build_pair(method, model, randomize=False, copy_values=False)
    pretrained = base(x)
    assert_same(peft_model(x), pretrained, torch.float64, f"{name} peft at init")
    assert_same(lit_model(x), pretrained, torch.float64, f"{name} lit_peft at init")
    randomize_peft(peft_model)
    copy_into_lit(method, peft_model, lit_model)
    expected = peft_model(x)
    assert (expected - pretrained).abs().max() > 1e-3, "the random adapter values should change the function"
    assert_same(lit_model(x), expected, torch.float64, f"{name} forward")

    lit_merged = merge_adapters(lit_model)
    assert not any(isinstance(m, AdaptedLinear) for m in lit_merged.modules())
    assert_same(lit_merged(x), expected, torch.float64, f"{name} lit_peft merged vs peft unmerged")
    peft_merged = peft_model.merge_and_unload()
    assert_same(peft_merged(x), expected, torch.float64, f"{name} peft merged vs peft unmerged")
    lit_state, peft_state = lit_merged.state_dict(), peft_merged.state_dict()
    assert sorted(lit_state) == sorted(peft_state)
    for key, tensor in lit_state.items():
        assert_same(tensor, peft_state[key], torch.float64, f"{name} merged tensor {key}")


@pytest.mark.parametrize("name", ["lora", "boft", "dora"])
@torch.no_grad()
def test_float32_forward_and_merge_match_peft(name, peft_boft_without_cuda):
    base, peft_model, lit_model, x = build_pair(METHODS[name], "mlp", dtype=torch.float32)
    expected = peft_model(x)
    assert_same(lit_model(x), expected, torch.float32, f"{name} float32 forward")
    assert_same(merge_adapters(lit_model)(x), peft_model.merge_and_unload()(x), torch.float32, f"{name} float32 merged")


@pytest.mark.parametrize("side", ["activation", "weight"])
@torch.no_grad()
def test_boft_both_sides_match_peft(side, peft_boft_without_cuda):
    """Rotating the activations and rotating the weight both equal peft's ``x @ R_peft``."""
    method = dataclasses.replace(METHODS["boft"], lit_strategy=lambda t: BOFT(block_size=4, n_butterfly_factors=1,
                                                                              side=side, target_modules=t))
    _, peft_model, lit_model, x = build_pair(method, "mlp")
    for layer in adapted_layers(lit_model).values():
        assert layer.use_weight_side(x[..., : layer.in_features]) == (side == "weight")
    assert_same(lit_model(x), peft_model(x), torch.float64, f"BOFT side={side}")


@pytest.mark.parametrize("path", ["folded", "factorwise"])
@pytest.mark.parametrize("factors", [2, 3])
@torch.no_grad()
def test_boft_butterfly_factors_match_peft(factors, path, peft_boft_on_cpu, monkeypatch):
    """peft's multi-factor BOFT (dense permutation matrices, run on CPU through :class:`CpuFastBlockDiag`) against
    ours, both by folded effective blocks and factor by factor (``rotation_cost`` patched to pick the path)."""
    import lit_peft.adapters.boft as lit_boft

    monkeypatch.setattr(lit_boft, "rotation_cost", lambda b, m: (b * m, path == "folded"))
    method = dataclasses.replace(
        METHODS["boft"],
        peft_config=lambda t: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=factors, target_modules=t),
        lit_strategy=lambda t: BOFT(block_size=4, n_butterfly_factors=factors, side="activation", target_modules=t))
    _, peft_model, lit_model, x = build_pair(method, "mlp")
    for name, layer in adapted_layers(lit_model).items():
        assert peft_model.base_model.model.get_submodule(name).boft_R[ADAPTER].shape[0] == factors
    expected = peft_model(x)
    assert_same(lit_model(x), expected, torch.float64, f"BOFT m={factors} activation side ({path})")
    for layer in adapted_layers(lit_model).values():
        layer.side = "weight"
    assert_same(lit_model(x), expected, torch.float64, f"BOFT m={factors} weight side ({path})")
    assert_same(merge_adapters(lit_model)(x), peft_model.merge_and_unload()(x), torch.float64,
                f"BOFT m={factors} merged")


@pytest.mark.parametrize("name", list(METHODS))
def test_gradients_match_peft(name, peft_boft_without_cuda):
    """The gradient of every adapter tensor (mapped through the same correspondence) agrees with peft's."""
    method = METHODS[name]
    _, peft_model, lit_model, x = build_pair(method, "mlp")
    weights = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (peft_model(x) * weights).sum().backward()
    (lit_model(x) * weights).sum().backward()
    inner = peft_model.base_model.model
    for layer_name, layer in adapted_layers(lit_model).items():
        for what, ours, theirs in method.grads(inner.get_submodule(layer_name), layer):
            assert ours is not None and theirs is not None, f"{layer_name}.{what}: missing gradient"
            assert_same(ours, theirs, torch.float64, f"{name} gradient {layer_name}.{what}")


@torch.no_grad()
def test_vera_projections_match_peft_prng():
    """Same seed -> the same shared pair, bit for bit (before any dtype conversion), and the same shapes."""
    torch.manual_seed(0)
    base = make_mlp()
    for seed in (0, 1234):
        peft_model = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=8, projection_prng_key=seed,
                                                                              target_modules=MLP_TARGETS))
        lit_model = VeRA(rank=8, seed=seed, target_modules=MLP_TARGETS).apply(copy.deepcopy(base))
        ours = next(m for m in lit_model.modules() if isinstance(m, VeRAProjections))
        theirs_A, theirs_B = peft_model.base_model.vera_A[ADAPTER], peft_model.base_model.vera_B[ADAPTER]
        assert ours.A.shape == theirs_A.shape == (8, 64) and ours.B.shape == theirs_B.shape == (64, 8)
        assert torch.equal(ours.A, theirs_A.to(ours.A.dtype))
        assert torch.equal(ours.B, theirs_B.to(ours.B.dtype))


@torch.no_grad()
def test_dora_initial_magnitude_matches_peft():
    _, peft_model, lit_model, _ = build_pair(METHODS["dora"], "mlp", randomize=False, copy_values=False)
    for name, layer in adapted_layers(lit_model).items():
        theirs = peft_model.base_model.model.get_submodule(name).lora_magnitude_vector[ADAPTER].weight
        assert_same(layer.adapters["all"].magnitude, theirs, torch.float64, f"{name} initial magnitude")


@torch.no_grad()
def test_oft_cayley_neumann_is_peft_transposed(peft_boft_without_cuda):
    """peft's Cayley–Neumann OFT (its default) with ``n`` terms is our Neumann path with ``skew = +weight`` (not
    ``−weight`` as for peft's exact path) and ``neumann_terms = n − 2``: peft's two paths are transposes of each
    other, ours are not. Small values keep our accuracy guard from switching blocks to the exact solve."""
    from packaging.version import Version

    if Version(peft.__version__.partition("+")[0]) < Version("0.18.0"):
        pytest.skip("peft < 0.18 has an older Cayley-Neumann series")
    terms = 5
    method = Method(lambda t: _oft_config(use_cayley_neumann=True, num_cayley_neumann_terms=terms, target_modules=t),
                    lambda t: OFT(block_size=4, scale=False, cayley="neumann", neumann_terms=terms - 2,
                                  target_modules=t), copy_oft_neumann, grads_oft)
    _, peft_model, lit_model, x = build_pair(method, "mlp", randomize=False, copy_values=False)
    gen = torch.Generator().manual_seed(3)
    for param in peft_model.parameters():
        if param.requires_grad:
            param.copy_(0.01 * torch.randn(param.shape, generator=gen, dtype=torch.float64))
    copy_into_lit(method, peft_model, lit_model)
    neumann = peft_model(x)
    assert_same(lit_model(x), neumann, torch.float64, "OFT Cayley-Neumann (peft orientation)")
    # peft's exact path with the same weights rotates the other way: it differs from its own Neumann path by far more
    # than the truncation error (O(‖S‖⁴)), and equals our exact path with skew = −weight.
    for module in peft_model.modules():
        if hasattr(module, "use_cayley_neumann"):
            module.use_cayley_neumann = False
    exact = peft_model(x)
    assert (exact - neumann).abs().max() > 1e-3
    for layer in adapted_layers(lit_model).values():
        layer.cayley = "exact"
        layer.adapters["all"].skew.neg_()
    assert_same(lit_model(x), exact, torch.float64, "OFT exact after flipping the sign")


@torch.no_grad()
def test_boft_float64_model_keeps_float64_precision(peft_boft_without_cuda):
    """BOFT applied to a float64 model (no ``.double()`` afterwards) should compute in float64 like peft does and
    like lit_peft's LoRA/DoRA/VeRA (whose adapter tensors take ``compute_dtype(weight.dtype)``); ``BOFTLinear``'s
    own ``orthogonal_blocks`` docstring promises float64 for float64 models."""
    torch.manual_seed(0)
    base = make_mlp().double().eval()
    peft_model = peft.get_peft_model(copy.deepcopy(base), METHODS["boft"].peft_config(MLP_TARGETS)).eval()
    lit_model = METHODS["boft"].lit_strategy(MLP_TARGETS).apply(copy.deepcopy(base)).eval()
    randomize_peft(peft_model)
    copy_into_lit(METHODS["boft"], peft_model, lit_model)
    dtypes = {n: p.dtype for n, p in lit_model.named_parameters() if p.requires_grad}
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    assert_same(lit_model(x), peft_model(x), torch.float64, "BOFT on a float64 model")
    assert all(d == torch.float64 for d in dtypes.values()), f"adapter dtypes on a float64 model: {dtypes}"


def test_dora_dropout_matches_peft_with_a_shared_mask():
    """DoRA in training mode with dropout > 0 (peft and the DoRA authors drop the input of the magnitude's base-path
    correction too): the same function and gradients as peft's when both draw the same dropout masks."""
    method = Method(
        lambda t: peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, use_dora=True, target_modules=t),
        lambda t: DoRA(rank=4, alpha=8, dropout=0.3, target_modules=t, fused_qkv="joint"), copy_dora, grads_dora)
    _, peft_model, lit_model, x = build_pair(method, "mlp")
    peft_model.train()
    lit_model.train()
    weights = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.manual_seed(11)
    expected = peft_model(x)
    torch.manual_seed(11)
    actual = lit_model(x)
    assert_same(actual, expected, torch.float64, "DoRA dropout 0.3 forward")
    with torch.no_grad():
        assert (lit_model.eval()(x) - actual).abs().max() > 1e-3, "dropout should change the training output"
    lit_model.train()
    (expected * weights).sum().backward()
    (actual * weights).sum().backward()
    inner = peft_model.base_model.model
    for layer_name, layer in adapted_layers(lit_model).items():
        for what, ours, theirs in method.grads(inner.get_submodule(layer_name), layer):
            assert_same(ours, theirs, torch.float64, f"DoRA dropout gradient {layer_name}.{what}")
