"""timm families beyond VisionTransformer / Eva against an independent oracle
(tests/oracle_timm.py): Beit, VisionTransformerRelPos, CaiT, ConViT, XCiT, SAM and the VLM
vision towers; batch ≡ single, fused ≡ eager, no side effects; refusals with the reason."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any, Dict, List, Tuple

import pytest
import timm
import torch
from _versions import require_timm_model
from conftest import randomize
from oracle_timm import timm_oracle_layer_maps, timm_oracle_legrad
from test_side_effects import assert_unchanged, snapshot
from torch import nn

from captum_legrad import LeGrad, UnsupportedModelError, discover

SMALL = dict(embed_dim=32, num_heads=2, num_classes=5)

#: key -> (timm name, oracle family, patch size, image size, extra kwargs)
FAMILIES: Dict[str, Tuple[str, str, int, int, Dict[str, Any]]] = {
    "beit": ("beit_base_patch16_224", "beit", 8, 32, dict(img_size=32, patch_size=8, depth=3)),
    "beit_avg": (
        "beitv2_base_patch16_224",
        "beit",
        8,
        32,
        # fc_norm: the default with global_pool="avg" (timm 0.9.16 has no use_fc_norm)
        dict(img_size=32, patch_size=8, depth=2, global_pool="avg"),
    ),
    "relpos": (
        "vit_relpos_medium_patch16_cls_224",
        "relpos",
        8,
        32,
        dict(img_size=32, patch_size=8, depth=3),
    ),
    "relpos_shared": (
        "vit_srelpos_small_patch16_224",
        "relpos",
        8,
        32,
        dict(img_size=32, patch_size=8, depth=2),
    ),
    "cait": ("cait_xxs24_224", "cait", 8, 32, dict(img_size=32, patch_size=8, depth=2)),
    "convit": (
        "convit_tiny",
        "convit",
        8,
        32,
        dict(img_size=32, patch_size=8, depth=3, local_up_to_layer=2),
    ),
    "xcit": ("xcit_nano_12_p8_224", "xcit", 8, 32, dict(img_size=32, depth=2)),
    "sam": (
        "samvit_base_patch16",
        "sam",
        8,
        48,
        dict(img_size=48, patch_size=8, depth=3, window_size=4, global_attn_indexes=(0, 2)),
    ),
    "qwen3": (
        "qwen3_vit_88m",
        "qwen3",
        8,
        32,
        dict(img_size=32, patch_size=8, depth=2, pos_embed_grid_size=4),
    ),
    "qwen3_merge": (
        "qwen3_vit_88m_merge",
        "qwen3",
        8,
        32,
        dict(img_size=32, patch_size=8, depth=2, pos_embed_grid_size=4, out_features=16),
    ),
    "gemma4": (
        "gemma4_vit_167m",
        "gemma4",
        8,
        32,
        dict(
            img_size=32,
            patch_size=8,
            depth=2,
            head_dim=16,
            intermediate_size=64,
            position_embedding_size=64,
        ),
    ),
    "deepseek": ("deepseek_vit_412m", "deepseek", 8, 32, dict(img_size=32, patch_size=8, depth=2)),
    "gemma4_soft": (
        "gemma4_vit_167m",
        "gemma4_soft",
        8,
        48,
        dict(
            img_size=48,
            patch_size=8,
            depth=2,
            head_dim=16,
            intermediate_size=64,
            position_embedding_size=64,
            encoder_pool="soft",
            pooling_kernel_size=3,
        ),
    ),
    # ParallelThingsBlock: two attentions per block, head groups of one attention
    "parallel": (
        "vit_small_patch16_18x2_224",
        "parallel",
        8,
        32,
        dict(img_size=32, patch_size=8, depth=2, init_values=None),
    ),
    # DiffAttention in Block (LayerScale off: its 1e-5 init would shrink every map)
    "diff": (
        "vit_dwee_patch16_reg1_gap_256",
        "diff",
        8,
        32,
        dict(img_size=32, patch_size=8, depth=2, init_values=None),
    ),
    "diff_parallel": (
        "vit_dpwee_patch16_reg1_gap_256",
        "diff",
        8,
        32,
        dict(img_size=32, patch_size=8, depth=2, init_values=None),
    ),
    "deepseek_align": (
        "deepseek_vit_412m_align",
        "deepseek",
        8,
        32,
        dict(img_size=32, patch_size=8, depth=2, out_features=16),
    ),
}

FINAL_TOL = 1e-5
LAYER_RTOL = 1e-4


def build(key: str, seed: int = 0) -> nn.Module:
    name, _, _, _, kwargs = FAMILIES[key]
    require_timm_model(name)
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **{**SMALL, **kwargs})
    return randomize(model, seed).eval()


def images(key: str, batch: int = 3, seed: int = 7) -> torch.Tensor:
    size = FAMILIES[key][3]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _close_layers(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    assert torch.isfinite(ours).all()
    for layer in range(ref.shape[1]):  # every layer's map must be there, not only the sum
        scale = ref[:, layer].abs().max()
        assert scale > 0, f"oracle layer {layer} is all zeros; the comparison would be vacuous"
        assert (ours[:, layer] - ref[:, layer]).abs().max() <= LAYER_RTOL * scale, layer


#: Families whose two readouts differ; the others (SAM, the VLM towers) read out through the
#: model's own pooling for both.
TWO_READOUTS = ("beit", "relpos", "cait", "convit", "xcit", "parallel", "diff", "diff_parallel")
CASES = [(key, "mean") for key in sorted(FAMILIES)] + [(key, "model") for key in TWO_READOUTS]


@pytest.mark.parametrize(("key", "pooling"), CASES)
def test_matches_oracle(key: str, pooling: str) -> None:
    _, family, patch, _, _ = FAMILIES[key]
    model = build(key)
    x = images(key)
    target = torch.tensor([1, 4, 2])
    legrad = LeGrad(model, pooling=pooling)
    per_layer = legrad.attribute_layers(x, target=target)
    _close_layers(per_layer, timm_oracle_layer_maps(model, family, x, target, patch, None, pooling))
    final = legrad.attribute(x, target=target, output="map")
    expected = timm_oracle_legrad(model, family, x, target, patch, None, pooling)
    assert (final - expected).abs().max() <= FINAL_TOL


@pytest.mark.parametrize("key", ["cait", "convit"])
def test_layer_subsets_across_the_class_token(key: str) -> None:
    # CaiT: last self-attention block + first class-attention block; ConViT: last GPSA +
    # first MHSA block. Their tokens and keys differ; the last self-attention map also
    # proves that the class-attention blocks' patch input is cut from the graph.
    _, family, patch, _, _ = FAMILIES[key]
    model = build(key)
    layers = [1, 2]
    x = images(key, batch=2)
    target = torch.tensor([3, 0])
    ours = LeGrad(model, layers).attribute_layers(x, target=target)
    _close_layers(ours, timm_oracle_layer_maps(model, family, x, target, patch, layers))


def test_cait_and_convit_specs() -> None:
    cait = discover(build("cait"))
    assert cait.num_layers == 2 + 2 and cait.num_prefix_tokens == 1
    assert cait.output_attentions == frozenset({0, 1})  # talking heads: the head mix
    assert [type(a).__name__ for a in cait.attentions] == ["Dropout"] * 2 + ["ClassAttn"] * 2
    convit = discover(build("convit"))
    assert convit.output_attentions == frozenset({0, 1})  # GPSA: the gated mix
    assert type(convit.attentions[2]).__name__ == "MHSA"
    assert discover(build("xcit")).num_layers == 2  # the class-attention blocks only
    assert discover(build("sam")).num_layers == 2  # the global blocks only


@pytest.mark.parametrize(
    "key",
    [
        "beit",
        "cait",
        "convit",
        "xcit",
        "sam",
        "qwen3_merge",
        "gemma4",
        "gemma4_soft",
        "parallel",
        "diff",
        "diff_parallel",
    ],
)
def test_batch_equals_single(key: str) -> None:
    model = build(key)
    x = images(key, batch=2)
    target = [2, 4]
    legrad = LeGrad(model)
    batched = legrad.attribute_layers(x, target=target)
    for i in range(2):
        single = legrad.attribute_layers(x[i : i + 1], target=target[i])
        torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("key", sorted(FAMILIES))
def test_fused_equals_eager_and_no_side_effects(key: str) -> None:
    model = build(key)
    x = images(key, batch=2)
    fused = [m for m in model.modules() if getattr(m, "fused_attn", False)]
    eager = copy.deepcopy(model)
    for module in eager.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    with torch.no_grad():
        reference = model(x)  # ConViT's GPSA fills its rel_indices buffer on a first forward
    before = snapshot(model)
    outputs = []
    handle = model.register_forward_hook(lambda m, a, out: outputs.append(out.detach()))
    try:
        ours = LeGrad(model).attribute_layers(x, target=1)
    finally:
        handle.remove()
    torch.testing.assert_close(outputs[0], reference, atol=1e-5, rtol=1e-5)  # same forward
    after = snapshot(model)
    assert_unchanged(before, after)
    if fused:
        theirs = LeGrad(eager).attribute_layers(x, target=1)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-10)


def test_sam_without_global_blocks_is_refused() -> None:
    model = timm.create_model(
        "samvit_base_patch16",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        window_size=2,
        global_attn_indexes=(),
        **SMALL,
    )
    with pytest.raises(UnsupportedModelError, match="windows"):
        discover(model)


@pytest.mark.parametrize(
    ("name", "kwargs", "reason"),
    [
        ("swin_tiny_patch4_window7_224", dict(depths=(1, 1), num_heads=(1, 2)), "windowed"),
        ("resnet18", {}, "no softmax attention"),
        ("levit_128s", {}, "subsamples"),
        ("pit_ti_224", {}, "hierarchical"),
        ("twins_svt_small", dict(depths=(1, 1, 1, 1)), "hierarchical"),
        ("xcit_nano_12_p16_224", dict(cls_attn_layers=0, depth=1), "channels"),
        ("qwen3_vit_88m_enc", dict(depth=1, out_features=8), "no classification head"),
        (
            "vit_small_patch16_18x2_224",
            dict(depth=1, embed_dim=32, num_heads=2, attn_layer="diff"),
            "several differential attentions in parallel",
        ),
    ],
)
def test_refusals_say_why_and_what_to_do(name: str, kwargs: Dict[str, Any], reason: str) -> None:
    require_timm_model(name)
    if kwargs.get("attn_layer") == "diff":  # differential attention came with vit_dwee
        require_timm_model("vit_dwee_patch16_reg1_gap_256")
    model = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(UnsupportedModelError, match=reason) as info:
        LeGrad(model)
    message = str(info.value)
    assert "global" in message and "ViTSpec" in message


def test_refusal_inside_a_wrapper() -> None:
    wrapped = nn.Sequential(nn.Identity(), timm.create_model("resnet18", pretrained=False))
    with pytest.raises(UnsupportedModelError, match="ResNet"):
        discover(wrapped)


def test_zero_head_warns_once() -> None:
    model = build("beit")
    with torch.no_grad():
        model.head.weight.zero_()
    legrad = LeGrad(model)
    x = images("beit", batch=2)
    with pytest.warns(UserWarning, match="zero-initialised classification head"):
        out = legrad.attribute(x, target=1)
    assert torch.equal(out, torch.zeros_like(out))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        legrad.attribute(x, target=2)  # once per instance


def test_trained_looking_head_does_not_warn() -> None:
    legrad = LeGrad(build("relpos"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        legrad.attribute(images("relpos", batch=2), target=1)


def test_zero_head_warning_is_general() -> None:
    # torchvision zero-initialises its ViT head: constant logits, all-zero maps, a warning.
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=5,
    ).eval()
    assert not model.heads.head.weight.any()
    with pytest.warns(UserWarning, match="all zeros for 2 of 2"):
        LeGrad(model).attribute(torch.randn(2, 3, 32, 32), target=1)


def test_a_refused_submodule_does_not_hide_a_vit_beside_it() -> None:
    class Hybrid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cnn = timm.create_model("resnet18", pretrained=False, num_classes=5)
            self.vit = build("beit")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.vit(x) + self.cnn(x)

    spec = discover(Hybrid())
    assert spec.family == "timm" and spec.num_layers == 3


# ------------------------------------------- parallel, differential, Gemma4 soft pooling


def test_parallel_and_differential_specs() -> None:
    parallel = discover(build("parallel"))
    assert parallel.parallel_attentions == frozenset({0, 1}) and not parallel.product_inputs
    assert [type(a).__name__ for a in parallel.attentions] == ["ParallelThingsBlock"] * 2
    for key, owner in (("diff", "DiffAttention"), ("diff_parallel", "DiffParallelScalingBlock")):
        model = build(key)
        spec = discover(model)
        assert not spec.parallel_attentions and sorted(spec.product_inputs) == [0, 1]
        for layer, module in spec.product_inputs.items():
            assert type(spec.attentions[layer]).__name__ == owner
            assert module is spec.attentions[layer].sub_norm  # its input is O = A·V


@pytest.mark.parametrize("key", ["parallel", "gemma4_soft"])
def test_lean_equals_explicit(key: str) -> None:
    from test_routes import _assert_routes_equal

    model = build(key)
    x = images(key, batch=2)
    _assert_routes_equal(
        lambda route: LeGrad(model, route=route), x, torch.tensor([1, 4]), [0, 2, 3]
    )


@pytest.mark.parametrize("key", ["diff", "diff_parallel"])
def test_differential_attention_explicit_route_is_refused(key: str) -> None:
    model = build(key)
    with pytest.raises(ValueError, match="route='lean'") as info:
        LeGrad(model, route="explicit")
    assert "differential attention" in str(info.value)
    legrad = LeGrad(model)
    legrad.route = "explicit"  # set after construction: refused at the call too
    with pytest.raises(ValueError, match="route='lean'"):
        legrad.attribute(images(key, batch=1), target=0)


@pytest.mark.parametrize("key", ["diff", "diff_parallel", "parallel"])
def test_layer_subsets_of_parallel_and_differential(key: str) -> None:
    _, family, patch, _, _ = FAMILIES[key]
    model = build(key)
    x = images(key, batch=2)
    target = torch.tensor([2, 0])
    ours = LeGrad(model, [1]).attribute_layers(x, target=target)
    _close_layers(ours, timm_oracle_layer_maps(model, family, x, target, patch, [1]))


def test_gemma4_soft_readout_is_the_model_on_non_square_grids() -> None:
    # The soft pooler bins tokens by their (x, y) positions; LeGrad rebuilds them from the
    # image size: the last layer's readout must be the model's output, also for 48x72.
    model = build("gemma4_soft")
    spec = discover(model)
    x = torch.randn(2, 3, 48, 72, generator=torch.Generator().manual_seed(3))
    last: Dict[str, torch.Tensor] = {}
    handle = spec.blocks[-1].register_forward_hook(lambda m, a, out: last.setdefault("z", out))
    try:
        with torch.no_grad():
            expected = model(x)
    finally:
        handle.remove()
    with torch.no_grad():
        got = spec.model_readout(last["z"], *spec.extra_readout_inputs((x,), 2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    maps = LeGrad(model).attribute_layers(x, target=[0, 3])
    assert maps.shape == (2, 2, 6, 9) and maps.abs().max() > 0


@pytest.mark.parametrize("key", ["parallel", "diff"])
def test_attention_baselines_refuse_split_attentions(key: str) -> None:
    # Rollout / raw attention / Chefer need A as one probability tensor: say so, do not
    # silently use one branch or one softmax.
    from captum_legrad import CaptureError
    from captum_legrad.baselines import AttentionRollout, GenericAttention

    model = build(key)
    x = images(key, batch=1)
    for baseline in (AttentionRollout(model), GenericAttention(model)):
        with pytest.raises(CaptureError, match="LeGrad itself explains"):
            baseline.attribute(x, target=0)


@pytest.mark.parametrize("key", ["diff", "diff_parallel", "parallel"])
def test_eager_path_matches_oracle(key: str) -> None:
    # timm's non-fused path: one softmax over 2H heads, A = P1 - lambda P2 formed inline, then
    # matmul with V (differential); softmax and matmul per branch (parallel).
    _, family, patch, _, _ = FAMILIES[key]
    model = build(key)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    x = images(key, batch=2)
    target = torch.tensor([4, 1])
    calls: List[str] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    class Count(torch.overrides.TorchFunctionMode):
        def __torch_function__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            if func is sdpa:
                calls.append("sdpa")
            return func(*args, **(kwargs or {}))

    with Count():
        ours = LeGrad(model).attribute_layers(x, target=target)
    assert not calls  # the eager path ran
    _close_layers(ours, timm_oracle_layer_maps(model, family, x, target, patch))


def test_spec_validates_the_new_fields() -> None:
    spec = discover(build("diff"))
    with pytest.raises(ValueError, match="parallel_attentions names blocks"):
        dataclasses.replace(spec, parallel_attentions=frozenset({5}))
    with pytest.raises(ValueError, match="product_inputs names blocks"):
        dataclasses.replace(spec, product_inputs={-1: spec.blocks[0]})
    with pytest.raises(ValueError, match=r"must map to nn\.Modules"):
        dataclasses.replace(spec, product_inputs={0: "sub_norm"})  # type: ignore[dict-item]


@pytest.mark.parametrize("pool", ["", "none"])
def test_gemma4_per_token_logits_take_token_class_targets(pool: str) -> None:
    name, _, _, _, kwargs = FAMILIES["gemma4"]
    require_timm_model(name)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **{**SMALL, **kwargs, "global_pool": pool})
    model = randomize(model).eval()
    x = images("gemma4", batch=2)
    with pytest.raises(Exception, match="needs 2 index"):
        LeGrad(model).attribute(x, target=1)
    maps = LeGrad(model).attribute_layers(x, target=[(3, 1), (0, 4)])
    assert maps.shape == (2, 2, 4, 4) and maps.abs().max() > 0
