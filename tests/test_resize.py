"""Any input size (issue #16): the position embedding resampled for the call only.

The oracles are independent of captum_legrad's resizing: timm's own
``resample_abs_pos_embed`` and ``dynamic_img_size=True`` path, models built natively at the
larger size with timm's resampled embedding loaded, and HF's ``interpolate_pos_encoding``.
"""

from __future__ import annotations

import copy
import inspect
import threading
from typing import Any, Dict, List, Tuple

import open_clip
import pytest
import timm
import torch
from _versions import reason
from conftest import TIMM_MODELS, TINY, explainable, make_model
from oracle import oracle_legrad
from oracle_mha import block_attention_maps, finish, pool_attention_maps
from test_open_clip import (
    clip_model,
    coca_model,
    cosine,
    has_batch_first,
    known_options,
    pooler_queries,
    sequence_first,
    text,
)
from test_side_effects import assert_unchanged, snapshot
from test_torchvision import tiny_vit
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn
from torchvision.models import VisionTransformer

from captum_legrad import ImageTextSimilarity, LeGrad, discover
from captum_legrad.internals import resample_position_embedding

GEN = torch.Generator().manual_seed(11)
#: Larger (the authors' 2x), non-square, and one side smaller than native (antialias).
SIZES = [(64, 64), (64, 48), (24, 40)]


def grid_of(size: Tuple[int, int], patch: int = 8) -> Tuple[int, int]:
    return size[0] // patch, size[1] // patch


def state_dict_copy(model: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_identical(before: Dict[str, Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        # Bit-identical, also where a model leaves a parameter uninitialised (NaN != NaN).
        now = after[key]
        assert value.shape == now.shape and value.dtype == now.dtype, key
        bits, now_bits = value.reshape(-1).view(torch.uint8), now.reshape(-1).view(torch.uint8)
        assert torch.equal(bits, now_bits), key


# ------------------------------------------------------------------------------ resampling


@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("new", [(8, 8), (8, 6), (3, 5), (4, 4)])
def test_resample_equals_timm(prefix: int, new: Tuple[int, int]) -> None:
    table = torch.randn(1, prefix + 16, 12, generator=GEN)
    expected = resample_abs_pos_embed(table, list(new), old_size=[4, 4], num_prefix_tokens=prefix)
    ours = resample_position_embedding(table, (4, 4), new, prefix)
    assert ours.shape == expected.shape == (1, prefix + new[0] * new[1], 12)
    assert torch.equal(ours, expected)
    # OpenCLIP keeps the table 2-D
    flat = resample_position_embedding(table[0], (4, 4), new, prefix)
    assert torch.equal(flat, expected[0])
    if prefix:
        assert torch.equal(ours[:, :prefix], table[:, :prefix])  # prefix rows kept


def test_resample_rejects_a_table_of_another_grid() -> None:
    with pytest.raises(ValueError, match="rows"):
        resample_position_embedding(torch.randn(1, 18, 4), (4, 4), (8, 8), 1)


# ------------------------------------------------------------------------------ timm

STATIC = ["vit", "deit_distilled", "dinov2_reg", "siglip_map", "deit3", "eva", "avgpool_fcnorm"]


def dynamic_twin(key: str, model: nn.Module) -> nn.Module:
    """The same weights in a ``dynamic_img_size=True`` model: timm's own resampling."""
    arch, extra = TIMM_MODELS[key]
    twin = timm.create_model(arch, **{**TINY, **extra, "dynamic_img_size": True})
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("key", STATIC)
def test_timm_static_equals_timm_dynamic(key: str, size: Tuple[int, int]) -> None:
    model = make_model(key)
    twin = dynamic_twin(key, model)
    x = torch.randn(2, 3, *size, generator=GEN)
    target = torch.tensor([1, 3])
    with torch.no_grad():
        expected_logits = twin(x)
    seen: List[Tensor] = []
    handle = model.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    before = state_dict_copy(model)
    try:
        ours = LeGrad(model).attribute(x, target=target, output="map")
    finally:
        handle.remove()
    assert_state_identical(before, model)
    torch.testing.assert_close(seen[0], expected_logits, atol=1e-5, rtol=1e-5)
    assert ours.shape == (2, 1, *size)
    assert (ours - oracle_legrad(twin, x, target)).abs().max() <= 1e-5


def test_timm_dynamic_model_is_run_as_it_is() -> None:
    model = make_model("vit_dynamic")
    x = torch.randn(1, 3, 64, 48, generator=GEN)
    for resize in (True, False):  # the model takes any size by itself
        ours = LeGrad(model, resize_pos_embed=resize).attribute(x, target=2, output="map")
        assert (ours - oracle_legrad(model, x, torch.tensor([2]))).abs().max() <= 1e-5


# ------------------------------------------------------------------------------ torchvision


def torchvision_at(model: VisionTransformer, side: int) -> VisionTransformer:
    """A torchvision ViT built at ``side`` with timm's resampling of ``model``'s embedding."""
    big = VisionTransformer(
        image_size=side, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=5,
    )  # fmt: skip
    state = state_dict_copy(model)
    state["encoder.pos_embedding"] = resample_abs_pos_embed(
        state["encoder.pos_embedding"], [side // 8, side // 8], old_size=[4, 4]
    )
    big.load_state_dict(state)
    return big.eval()


def torchvision_oracle(model: VisionTransformer, x: Tensor, target: Tensor) -> Tensor:
    blocks = list(model.encoder.layers)

    def score(z: Tensor) -> Tensor:
        return model.heads(model.encoder.ln(z.mean(1))).gather(1, target[:, None])[:, 0]

    grid = grid_of((x.shape[-2], x.shape[-1]))
    per_layer = block_attention_maps(
        lambda: model(x), blocks, [b.self_attention for b in blocks], score, [0, 1, 2], grid
    )
    return finish(per_layer, (x.shape[-2], x.shape[-1]))


@pytest.mark.parametrize("side", [64, 24])
def test_torchvision_equals_model_built_at_the_size(side: int) -> None:
    model = tiny_vit()
    big = torchvision_at(model, side)
    x, target = torch.randn(2, 3, side, side, generator=GEN), torch.tensor([4, 0])
    before = snapshot(model)
    seen: List[Tensor] = []
    handle = model.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    try:
        ours = LeGrad(model).attribute(x, target=target, output="map")
    finally:
        handle.remove()
    assert_unchanged(before, snapshot(model))
    with torch.no_grad():
        torch.testing.assert_close(seen[0], big(x), atol=1e-5, rtol=1e-5)
    assert (ours - torchvision_oracle(big, x, target)).abs().max() <= 1e-5
    # non-square works too (torchvision itself only builds square models)
    assert LeGrad(model).attribute(torch.randn(1, 3, 64, 40), target=1).shape == (1, 3, 64, 40)


# ------------------------------------------------------------------------------ OpenCLIP


def clip_at(model: open_clip.CLIP, size: Tuple[int, int]) -> open_clip.CLIP:
    """The fixture CLIP built natively at ``size``, its embedding resampled by timm."""
    import json

    from test_open_clip import FIXTURES

    config = known_options(json.loads((FIXTURES / "config.json").read_text()))
    config["vision_cfg"]["image_size"] = list(size)
    big = open_clip.CLIP(**config)
    state = state_dict_copy(model)
    table = state["visual.positional_embedding"]
    state["visual.positional_embedding"] = resample_abs_pos_embed(
        table[None], list(grid_of(size)), old_size=[4, 4], num_prefix_tokens=1
    )[0]
    big.load_state_dict(state)
    return big.eval()


def clip_maps(model: open_clip.CLIP, x: Tensor, prompts: Tensor, target: Tensor) -> Tensor:
    visual = model.visual
    blocks = list(visual.transformer.resblocks)

    def score(z: Tensor) -> Tensor:
        return cosine(visual.ln_post(z.mean(1)) @ visual.proj, prompts, target)

    size = (x.shape[-2], x.shape[-1])
    batch_first = getattr(visual.transformer, "batch_first", False)  # < 2.26: (N, B, D)
    per_layer = block_attention_maps(
        lambda: visual(x),
        blocks,
        [b.attn for b in blocks],
        score,
        [0, 1, 2],
        grid_of(size),
        batch_first,
    )
    return finish(per_layer, size)


@pytest.mark.parametrize("layout", ["batch_first", "sequence_first"])
@pytest.mark.parametrize("size", SIZES)
def test_open_clip_equals_model_built_at_the_size(size: Tuple[int, int], layout: str) -> None:
    if layout == "batch_first" and not has_batch_first():
        pytest.skip(reason("open_clip", "batch-first Transformer", "open-clip-torch 2.26"))
    model = clip_model() if layout == "batch_first" else sequence_first(clip_model())
    big = clip_at(clip_model(), size)
    prompts, x = text(), torch.randn(2, 3, *size, generator=GEN)
    target = torch.tensor([0, 3])
    before = state_dict_copy(model)
    seen: List[Tensor] = []
    handle = model.visual.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    try:
        ours = LeGrad(ImageTextSimilarity(model, prompts)).attribute(x, target=target, output="map")
    finally:
        handle.remove()
    assert_state_identical(before, model)
    with torch.no_grad():
        torch.testing.assert_close(seen[0], big.encode_image(x), atol=1e-5, rtol=1e-5)
    assert (ours - clip_maps(big, x, prompts, target)).abs().max() <= 1e-5


def test_coca_equals_model_built_at_the_size() -> None:
    model = coca_model()
    torch.manual_seed(0)
    big = open_clip.CoCa(
        embed_dim=32,
        multimodal_cfg=dict(width=32, context_length=16, heads=2, layers=1, vocab_size=100),
        text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1),
        vision_cfg=dict(
            layers=3, width=40, head_width=8, patch_size=8, image_size=(64, 48),
            attentional_pool=True, **pooler_queries(4), attn_pooler_heads=2, output_tokens=True,
        ),
    ).eval()  # fmt: skip
    state = state_dict_copy(model)
    state["visual.positional_embedding"] = resample_abs_pos_embed(
        state["visual.positional_embedding"][None], [8, 6], old_size=[4, 4]
    )[0]
    big.load_state_dict(state)
    visual = big.visual
    x, prompts, target = torch.randn(2, 3, 64, 48, generator=GEN), text(), torch.tensor([1, 2])

    def score(z: Tensor) -> Tensor:
        return cosine(visual.ln_post(visual.attn_pool(z))[:, 0] @ visual.proj, prompts, target)

    blocks = list(visual.transformer.resblocks)
    batch_first = getattr(visual.transformer, "batch_first", False)  # < 2.26: (N, B, D)
    per_layer = pool_attention_maps(
        lambda: visual(x), blocks, visual.attn_pool.attn, score, [0, 1, 2], (8, 6), 0, batch_first
    )
    before = state_dict_copy(model)
    ours = LeGrad(ImageTextSimilarity(model, prompts)).attribute(x, target=target, output="map")
    assert_state_identical(before, model)
    assert (ours - finish(per_layer, (64, 48))).abs().max() <= 1e-5


# ------------------------------------------------------------------------------ HF


@pytest.mark.parametrize("key", ["vit_cls", "clip_vision", "siglip_vision"])
def test_hf_switches_on_its_own_interpolation(key: str) -> None:
    pytest.importorskip("transformers")
    from oracle_hf import oracle_legrad as hf_oracle
    from test_hf import make_hf

    model = make_hf(key)
    explained = explainable(model, torch.randn(1, 3, 32, 32))  # feature models: their dims
    x, target = torch.randn(2, 3, 64, 48, generator=GEN), torch.tensor([0, 3])
    embeddings = discover(model).root.embeddings
    if "interpolate_pos_encoding" not in inspect.signature(embeddings.forward).parameters:
        # an older release: refused with what to do, the model left as it was
        before = snapshot(model)
        with pytest.raises(ValueError, match="cannot interpolate its learned position"):
            LeGrad(explained).attribute(x, target=target)
        assert_unchanged(before, snapshot(model))
        since = {"clip_vision": "transformers 4.46", "siglip_vision": "transformers 4.41"}
        pytest.skip(
            reason("transformers", f"{type(embeddings).__name__}(interpolate_pos_encoding=)",
                   since.get(key, "a later transformers"))
            + "; the refusal was checked"
        )  # fmt: skip
    before = snapshot(model)
    ours = LeGrad(explained).attribute(x, target=target, output="map")  # no flag passed
    assert_unchanged(before, snapshot(model))
    expected = hf_oracle(model, x, target, forward_kwargs={"interpolate_pos_encoding": True})
    assert (ours - expected).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="resize_pos_embed=False"):
        LeGrad(explained, resize_pos_embed=False).attribute(x, target=target)
    with pytest.raises(ValueError, match="multiple"):
        LeGrad(explained).attribute(torch.randn(1, 3, 60, 48), target=0)


# ------------------------------------------------------------------------------ no side effects


def _families() -> Dict[str, Any]:
    prompts = text()
    return {
        "timm": lambda: (make_model("vit"), lambda m: m),
        "eva": lambda: (make_model("eva"), lambda m: m),
        "torchvision": lambda: (tiny_vit(), lambda m: m),
        "open_clip": lambda: (clip_model(), lambda m: ImageTextSimilarity(m, prompts)),
    }


@pytest.mark.parametrize("family", sorted(_families()))
def test_nothing_changes_and_the_native_forward_still_works(family: str) -> None:
    model, wrap = _families()[family]()
    x_native = torch.randn(2, 3, 32, 32, generator=GEN)
    with torch.no_grad():
        native_out = wrap(model)(x_native)
    before, state = snapshot(model), state_dict_copy(model)
    legrad = LeGrad(wrap(model))
    legrad.attribute(torch.randn(2, 3, 64, 64, generator=GEN), target=1)
    assert_unchanged(before, snapshot(model))
    assert_state_identical(state, model)
    with torch.no_grad():  # the user's own forward at the native size, unchanged
        torch.testing.assert_close(wrap(model)(x_native), native_out, atol=0, rtol=0)
    # and the user's own forward at 2x is still refused by the model: nothing was made dynamic
    with pytest.raises((AssertionError, RuntimeError)), torch.no_grad():
        wrap(model)(torch.randn(1, 3, 64, 64))
    # a later call at the native size sees the original embedding
    native_maps = legrad.attribute(x_native, target=1)
    assert torch.equal(
        native_maps, LeGrad(wrap(copy.deepcopy(model))).attribute(x_native, target=1)
    )


def _raise(*_: object, **__: object) -> None:
    raise RuntimeError("injected failure")


@pytest.mark.parametrize("where", ["embedding", "block", "readout"])
def test_nothing_changes_when_a_resized_call_raises(where: str, monkeypatch) -> None:
    model = clip_model()
    sim = ImageTextSimilarity(model, text())
    before, state = snapshot(model), state_dict_copy(model)
    visual = model.visual
    handle = None
    if where == "embedding":  # while the substitution is active, before any block
        handle = visual.ln_pre.register_forward_hook(_raise)
    elif where == "block":
        handle = visual.transformer.resblocks[1].register_forward_hook(_raise)
    else:
        from captum_legrad.internals import OutputRecord

        monkeypatch.setattr(OutputRecord, "reduce", _raise)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            LeGrad(sim).attribute(torch.randn(1, 3, 64, 64), target=1)
    finally:
        if handle is not None:
            handle.remove()
    monkeypatch.undo()
    assert_unchanged(before, snapshot(model))
    assert_state_identical(state, model)
    with torch.no_grad():
        assert sim(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_another_thread_sees_the_original_model() -> None:
    """While one thread explains a 2x image, another runs the shared model at 32x32."""
    model = make_model("vit")
    x_native = torch.randn(2, 3, 32, 32, generator=GEN)
    with torch.no_grad():
        expected = model(x_native)
    results: Dict[str, Any] = {}

    def other_thread() -> None:
        try:
            with torch.no_grad():
                results["out"] = model(x_native)
        except BaseException as error:
            results["error"] = error

    caller = threading.get_ident()

    def during(module: nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() == caller and not results:
            worker = threading.Thread(target=other_thread)
            worker.start()
            worker.join()

    handle = model.patch_embed.register_forward_hook(during)  # inside the substituted scope
    try:
        LeGrad(model).attribute(torch.randn(1, 3, 64, 64), target=1)
    finally:
        handle.remove()
    assert "error" not in results, results.get("error")
    torch.testing.assert_close(results["out"], expected, atol=0, rtol=0)


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("family", sorted(_families()))
def test_refusals(family: str) -> None:
    model, wrap = _families()[family]()
    before = snapshot(model)
    with pytest.raises(ValueError, match="resize_pos_embed=False refuses") as info:
        LeGrad(wrap(model), resize_pos_embed=False).attribute(torch.randn(1, 3, 64, 64), target=0)
    assert "32x32" in str(info.value) and "64x64" in str(info.value)
    with pytest.raises(ValueError, match="not a multiple") as info:
        LeGrad(wrap(model)).attribute(torch.randn(1, 3, 60, 64), target=0)
    assert "56x64" in str(info.value)
    assert_unchanged(before, snapshot(model))
    # the native size is fine with resize_pos_embed=False
    out = LeGrad(wrap(model), resize_pos_embed=False).attribute(torch.randn(1, 3, 32, 32), target=0)
    assert out.shape == (1, 3, 32, 32)


def test_siglip_tower_equals_a_dynamic_trunk(monkeypatch: pytest.MonkeyPatch) -> None:
    from oracle import _attention_pool_by_hand
    from oracle_mha import relevance
    from test_open_clip import require_map_head, siglip_tower

    tower = siglip_tower(monkeypatch, "linear")
    require_map_head(tower)
    assert discover(tower).input_size is not None
    trunk = timm.create_model(
        "vit_base_patch16_siglip_224", img_size=32, patch_size=8, embed_dim=32, depth=3,
        num_heads=2, num_classes=0, dynamic_img_size=True,
    )  # fmt: skip
    trunk.load_state_dict(tower.trunk.state_dict())
    trunk.eval()
    x, prompts, target = torch.randn(2, 3, 64, 48, generator=GEN), text(3, 24), torch.tensor([0, 2])
    outputs: Dict[int, Tensor] = {}
    hooks = [
        b.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o))
        for i, b in enumerate(trunk.blocks)
    ]
    with torch.no_grad():
        embedding = tower.head(trunk(x))
    for h in hooks:
        h.remove()
    maps = []
    with torch.enable_grad():
        for i in range(3):
            z = outputs[i].detach().requires_grad_()
            pooled, attn = _attention_pool_by_hand(trunk.attn_pool, trunk.norm(z))
            score = cosine(tower.head(trunk.head(trunk.fc_norm(pooled))), prompts, target)
            (g,) = torch.autograd.grad(score.sum(), attn)
            maps.append(relevance(g, (8, 6)))
    before = state_dict_copy(tower)
    seen: List[Tensor] = []
    handle = tower.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    try:
        ours = LeGrad(ImageTextSimilarity(tower, prompts)).attribute(x, target=target, output="map")
    finally:
        handle.remove()
    assert_state_identical(before, tower)
    torch.testing.assert_close(seen[0], embedding, atol=1e-5, rtol=1e-5)
    assert (ours - finish(torch.stack(maps, 1), (64, 48))).abs().max() <= 1e-5


# ------------------------------------------------------------------------------ native size


def _native_not_a_multiple() -> Dict[str, Any]:
    """Models built at 36x36 with 8x8 patches (a 4x4 grid; the last 4 pixels are unused,
    as in SigLIP so400m/14 at 384) and the same weights built at 32x32."""

    def timm_pair() -> Tuple[nn.Module, nn.Module]:
        return make_model("vit", img_size=36), make_model("vit")

    def open_clip_pair() -> Tuple[nn.Module, nn.Module]:
        models = []
        for size in (36, 32):
            torch.manual_seed(0)
            models.append(
                open_clip.transformer.VisionTransformer(
                    image_size=size, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0,
                    output_dim=16,
                ).eval()
            )  # fmt: skip
        models[1].load_state_dict(models[0].state_dict())
        return models[0], models[1]

    return {"timm": timm_pair, "open_clip": open_clip_pair}


@pytest.mark.parametrize("family", sorted(_native_not_a_multiple()))
def test_native_size_that_is_not_a_multiple_of_the_patch(family: str) -> None:
    """The native size runs as the model was built for it, patch multiple or not: the map
    is the one of the 32x32 pixels its patch embedding sees; other such sizes are refused."""
    model, cropped = _native_not_a_multiple()[family]()
    x = torch.randn(2, 3, 36, 36, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the model itself only sees the top-left 32x32 pixels
        torch.testing.assert_close(model(x), cropped(x[..., :32, :32]), atol=1e-5, rtol=1e-5)
    model, cropped = explainable(model, x), explainable(cropped, x[..., :32, :32])
    ours = LeGrad(model).attribute(x, target=1, output="grid", normalize=False)
    ref = LeGrad(cropped).attribute(x[..., :32, :32], target=1, output="grid", normalize=False)
    assert ours.shape == (2, 1, 4, 4)
    assert ref.abs().max() > 0, "reference map is all zeros; the comparison would be vacuous"
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    assert LeGrad(model).attribute(x, target=1, output="map").shape == (2, 1, 36, 36)
    with pytest.raises(ValueError, match="not a multiple"):
        LeGrad(model).attribute(torch.randn(1, 3, 44, 44), target=1)
