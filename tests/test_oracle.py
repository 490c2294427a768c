"""LeGrad equals an independent per-layer autograd loop written from docs/method.md
(tests/oracle.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import TIMM_MODELS, make_model
from oracle import oracle_layer_maps, oracle_legrad

from captum_legrad import LeGrad, discover

# Final maps are min-max normalised to [0, 1]: compare absolutely. Per-layer maps are raw
# gradients whose scale ranges from 1e-7 (Eva, LayerScale) to 1e-2: compare relative to it.
FINAL_TOL = 1e-5
LAYER_RTOL = 1e-4


def _size(key: str) -> tuple:
    return (32, 48) if key == "vit_dynamic" else (32, 32)


def _assert_layers_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    scale = ref.abs().max()
    assert scale > 0, "oracle map is all zeros; the comparison would be vacuous"
    assert (ours - ref).abs().max() <= LAYER_RTOL * scale


@pytest.mark.parametrize("pooling", ["mean", "model"])
@pytest.mark.parametrize("layers", [None, [-2, -1], [0, 2]], ids=["all", "last2", "subset"])
def test_matches_oracle(model_key: str, pooling: str, layers: object) -> None:
    model = make_model(model_key)
    x = torch.randn(3, 3, *_size(model_key), generator=torch.Generator().manual_seed(7))
    target = torch.tensor([1, 4, 2])
    legrad = LeGrad(model, layers, pooling=pooling)  # type: ignore[arg-type]

    per_layer = legrad.attribute_layers(x, target=target)
    _assert_layers_close(per_layer, oracle_layer_maps(model, x, target, layers, pooling))

    final = legrad.attribute(x, target=target, output="map")
    expected = oracle_legrad(model, x, target, layers, pooling)
    assert final.shape == (3, 1, *_size(model_key))
    assert (final - expected).abs().max() <= FINAL_TOL
    assert final.amax() == 1.0 and final.amin() == 0.0


def test_every_family_is_covered() -> None:
    """The models above span the timm variants docs/models.md lists, by their real properties."""
    from timm.models.eva import Eva

    models = {key: make_model(key) for key in TIMM_MODELS}
    specs = {key: discover(model) for key, model in models.items()}
    assert {spec.family for spec in specs.values()} == {"timm"}
    # plain CLS, distilled (CLS + distillation), DINOv2 registers (CLS + 4), SigLIP (none)
    assert {spec.num_prefix_tokens for spec in specs.values()} >= {0, 1, 2, 5}
    assert any(spec.pool_attention is not None for spec in specs.values())  # SigLIP MAP
    assert any(getattr(m, "global_pool", None) == "avg" for m in models.values())
    assert any(isinstance(m, Eva) for m in models.values())
    assert any(getattr(m, "dynamic_img_size", False) for m in models.values())
    assert any(  # deit3: LayerScale blocks
        type(getattr(m.blocks[0], "ls1", None)).__name__ == "LayerScale" for m in models.values()
    )


@pytest.mark.parametrize("size", [(32, 48), (48, 24), (40, 40)])
def test_dynamic_non_square_sizes(size: tuple) -> None:
    model = make_model("vit_dynamic")
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([0, 3])
    ours = LeGrad(model).attribute(x, target=target, output="map")
    assert ours.shape == (2, 1, *size)
    assert (ours - oracle_legrad(model, x, target)).abs().max() <= FINAL_TOL
    grid = LeGrad(model).attribute(x, target=target, output="grid", normalize=False)
    assert grid.shape == (2, 1, size[0] // 8, size[1] // 8)


def test_eva_map_pooler_sees_prefix_tokens() -> None:
    # Eva's attention pool is given the CLS token too (ViT's drops it): P keys are dropped.
    model = make_model("eva", global_pool="map")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([2, 2])
    ours = LeGrad(model).attribute_layers(x, target=target)
    _assert_layers_close(ours, oracle_layer_maps(model, x, target))


def test_frozen_parameters_still_work() -> None:
    model = make_model("vit")
    model.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([1, 0])
    ours = LeGrad(model).attribute(x, target=target, output="map")
    assert (ours - oracle_legrad(model, x, target)).abs().max() <= FINAL_TOL
    assert not any(p.requires_grad for p in model.parameters())
