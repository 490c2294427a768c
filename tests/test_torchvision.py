"""torchvision VisionTransformer: discovery, oracle equality, batches, side effects."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_not_vacuous, randomize
from oracle_mha import block_attention_maps, finish
from test_side_effects import assert_unchanged, snapshot
from torchvision.models import VisionTransformer, vit_b_16

from captum_legrad import LeGrad, discover


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=3,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=5,
    )
    return randomize(model).eval()


def oracle(model: VisionTransformer, x: torch.Tensor, target: torch.Tensor, layers, pooling):
    blocks = list(model.encoder.layers)
    ids = list(range(len(blocks))) if layers is None else sorted(i % len(blocks) for i in layers)

    def score(z: torch.Tensor) -> torch.Tensor:
        pooled = z.mean(1) if pooling == "mean" else model.encoder.ln(z)[:, 0]
        logits = model.heads(model.encoder.ln(pooled) if pooling == "mean" else pooled)
        return logits.gather(1, target[:, None])[:, 0]

    per_layer = block_attention_maps(
        lambda: model(x), blocks, [b.self_attention for b in blocks], score, ids, (4, 4)
    )
    return per_layer, finish(per_layer, (32, 32))


@pytest.mark.parametrize("pooling", ["mean", "model"])
@pytest.mark.parametrize("layers", [None, [-2, -1]])
def test_matches_oracle(pooling: str, layers) -> None:
    model = tiny_vit()
    x, target = torch.randn(3, 3, 32, 32), torch.tensor([1, 4, 0])
    legrad = LeGrad(model, layers, pooling=pooling)
    per_layer, final = oracle(model, x, target, layers, pooling)
    assert_not_vacuous(per_layer)
    ours = legrad.attribute_layers(x, target=target)
    assert (ours - per_layer).abs().max() <= 1e-4 * per_layer.abs().max()
    assert (legrad.attribute(x, target=target, output="map") - final).abs().max() <= 1e-5


def test_discovery_batches_and_side_effects() -> None:
    model = tiny_vit()
    spec = discover(model)
    assert (spec.family, spec.num_layers, spec.num_prefix_tokens, spec.patch_size) == (
        "torchvision",
        3,
        1,
        (8, 8),
    )
    x, target = torch.randn(3, 3, 32, 32), torch.tensor([2, 2, 3])
    before = snapshot(model)
    with torch.no_grad():
        plain = model(x)
    seen = []
    handle = model.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    try:
        batched = LeGrad(model).attribute(x, target=target, output="map")
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], plain, atol=1e-5, rtol=1e-5)  # forward equivalence
    assert_unchanged(before, snapshot(model))
    for i in range(3):
        alone = LeGrad(model).attribute(x[i : i + 1], target=int(target[i]), output="map")
        assert (alone[0] - batched[i]).abs().max() <= 1e-5


def test_vit_b_16_builder_is_discovered() -> None:
    spec = discover(vit_b_16(weights=None))
    assert (spec.num_layers, spec.patch_size, spec.grid_size(224, 224)) == (12, (16, 16), (14, 14))
