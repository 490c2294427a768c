"""InternVL, Gemma 4 and Llama 4: image tokens → views → rectangles of the original image.

Placement tests check the per-family view rules against (a) the tiny model's own placement
of vision features in the sequence (the vision tower's output replaced, through forward
hooks on a copy, by features that encode each patch's tile and position; the language
model's ``inputs_embeds`` read back) and (b) the real image processors, on an image whose
pixels encode their own coordinates.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Tuple

import pytest
import torch
from torch import Tensor, nn

tf = pytest.importorskip("transformers")

from conftest import assert_not_vacuous  # noqa: E402
from oracle_vlm_more import logits_at, on_grid, per_key  # noqa: E402
from test_side_effects import assert_unchanged, snapshot  # noqa: E402

from captum_legrad import AnswerLogits, LeGrad, UnsupportedModelError  # noqa: E402
from captum_legrad.adapters.hf import vlm_gemma4 as gemma4  # noqa: E402
from captum_legrad.adapters.hf import vlm_internvl as internvl  # noqa: E402
from captum_legrad.adapters.hf import vlm_llama4 as llama4  # noqa: E402

IMAGE = 63  # the image placeholder id of every tiny model below
BOI, EOI = 60, 61


# ------------------------------------------------------------------------ tiny models


def build_internvl(attn: str = "sdpa", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    vision = tf.InternVLVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=4,
    )  # fmt: skip
    text = tf.Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=512,
    )  # fmt: skip
    config = tf.InternVLConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE,
        image_seq_length=16,
    )  # fmt: skip
    config._attn_implementation = attn
    return tf.InternVLForConditionalGeneration(config).eval()


def build_llama4(attn: str = "sdpa", seed: int = 0, chunk: int = 512) -> nn.Module:
    torch.manual_seed(seed)
    vision = tf.Llama4VisionConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=4, vision_output_dim=32, projector_input_dim=32,
        projector_output_dim=32, pixel_shuffle_ratio=0.5,
    )  # fmt: skip
    text = tf.Llama4TextConfig(
        hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64,
        max_position_embeddings=512, num_local_experts=2, attention_chunk_size=chunk,
        no_rope_layers=[1, 0],
    )  # fmt: skip
    config = tf.Llama4Config(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE,
        boi_token_index=BOI, eoi_token_index=EOI,
    )  # fmt: skip
    config._attn_implementation = attn
    return tf.Llama4ForConditionalGeneration(config).eval()


def build_gemma4(
    attn: str = "sdpa", seed: int = 0, full_only: bool = False, shared_moe: bool = False
) -> nn.Module:
    """Tiny Gemma 4; ``shared_moe``: four layers, the last two reusing the keys and values
    of earlier ones (``num_kv_shared_layers``, as Gemma 4 E2B/E4B) and expert MLPs."""
    torch.manual_seed(seed)
    types = ["sliding_attention", "sliding_attention", "full_attention"]
    extra: Dict[str, Any] = {}
    if full_only:
        types = ["full_attention"]
    if shared_moe:
        types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
        extra = dict(
            num_kv_shared_layers=2, enable_moe_block=True, num_experts=2, top_k_experts=1,
            moe_intermediate_size=32,
        )  # fmt: skip
    vision = tf.Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, pooling_kernel_size=2, patch_size=4,
        position_embedding_size=64,
    )  # fmt: skip
    text = tf.Gemma4TextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=len(types), num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, vocab_size_per_layer_input=64,
        hidden_size_per_layer_input=8, sliding_window=8, max_position_embeddings=512,
        layer_types=types,
        use_bidirectional_attention="vision", global_head_dim=16, num_global_key_value_heads=2,
        final_logit_softcapping=30.0, **extra,
    )  # fmt: skip
    config = tf.Gemma4Config(
        vision_config=vision.to_dict(), text_config=text.to_dict(), boi_token_id=BOI,
        eoi_token_id=EOI, image_token_id=IMAGE, video_token_id=62, audio_token_id=59,
        boa_token_id=58, eoa_token_index=57,
    )  # fmt: skip
    config._attn_implementation = attn
    return tf.Gemma4ForConditionalGeneration(config).eval()


# ------------------------------------------------------------------------ prompts


def internvl_image(tiles: int) -> List[int]:
    return [BOI, *[IMAGE] * (16 * tiles), EOI]


def llama4_image(
    rows: int, cols: int, x_sep: int = 55, y_sep: int = 56, img: int = 57
) -> List[int]:
    """The Llama 4 processor's string for a rows × cols canvas (4 tokens per tile here)."""
    out = [BOI]
    if rows * cols > 1:
        for _ in range(rows):
            for c in range(cols):
                out += [IMAGE] * 4
                if c < cols - 1:
                    out.append(x_sep)
            out.append(y_sep)
    out += [img, *[IMAGE] * 4, EOI]
    return out


def gemma4_patches(
    sizes: List[Tuple[int, int]], patch: int = 4, length: int = 64
) -> Tuple[Tensor, Tensor]:
    """Patchified images and ``image_position_ids`` as Gemma 4's processor lays them out."""
    pixels = torch.zeros(len(sizes), length, 3 * patch * patch)
    positions = torch.full((len(sizes), length, 2), -1, dtype=torch.long)
    for i, (h, w) in enumerate(sizes):
        gen = torch.Generator().manual_seed(i)
        n = h * w
        pixels[i, :n] = torch.rand(n, 3 * patch * patch, generator=gen)
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        positions[i, :n, 0] = xx.flatten()
        positions[i, :n, 1] = yy.flatten()
    return pixels, positions


def padded(prompts: List[List[int]], fill: int = 5) -> Tensor:
    """Rows of equal length (an ordinary token appended)."""
    s = max(len(p) for p in prompts)
    return torch.tensor([p + [fill] * (s - len(p)) for p in prompts])


# ------------------------------------------------------------------------ the model's placement


def _embeds_of(model: nn.Module, language: nn.Module, **inputs: Any) -> Tensor:
    seen: Dict[str, Tensor] = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = language.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen["embeds"]


def _codes(tiles: int, side: int, width: int, first: int = 1) -> Tensor:
    """Per tile ``t`` and patch ``(r, c)``: the constant feature ``1000·t + side·r + c + 1``."""
    t = torch.arange(tiles).view(-1, 1, 1) * 1000
    r = torch.arange(side).view(1, -1, 1) * side
    c = torch.arange(side).view(1, 1, -1)
    code = (t + r + c + 1).float().flatten(1)  # (tiles, side²)
    return code.unsqueeze(-1).expand(-1, -1, width).clone()


def _decode(value: Tensor, width: int, side: int) -> set:
    """The (tile, r, c) of the four merged patches held in channels 0..3 of a token."""
    out = set()
    for code in value[:4].round().long().tolist():
        code -= 1
        out.add((code // 1000, (code % 1000) // side, code % side))
    return out


def _check_merged(embeds: Tensor, views: list, side: int, tile_of: Any) -> None:
    """Every view cell (i, j) holds its tile's patches (2i..2i+1, 2j..2j+1)."""
    checked = 0
    for b, sample in enumerate(views):
        for k, view in enumerate(sample):
            gh, gw = view.grid
            for i in range(gh):
                for j in range(gw):
                    got = _decode(embeds[b, int(view.positions[i * gw + j])], 32, side)
                    t = tile_of(b, k)
                    want = {(t, 2 * i + a, 2 * j + c) for a in (0, 1) for c in (0, 1)}
                    assert got == want, (b, k, i, j, got, want)
                    checked += 1
    assert checked > 0


def test_internvl_views_follow_the_models_placement() -> None:
    model = copy.deepcopy(build_internvl())
    side = 8  # 32 px / 4 px patches; pixel shuffle 2x2 -> 4x4 tokens per tile
    # sample 0: an image of 2x3 tiles (wide) + thumbnail; sample 1: one tile, then 1x2 + thumb.
    sizes = [(40, 70), (32, 32), (30, 80)]
    prompts = [
        [1, *internvl_image(7)],
        [2, *internvl_image(1), 7, *internvl_image(3), 8],
    ]
    ids = padded(prompts)
    tiles = 7 + 1 + 3

    def vision_hook(module: nn.Module, args: tuple, output: Any) -> Any:
        cls = torch.zeros(tiles, 1, 32)
        output.last_hidden_state = torch.cat([cls, _codes(tiles, side, 32)], dim=1)
        return output

    def projector_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        merged = args[0]  # (tiles, 16, 4·32): four patches' constant channels
        out = torch.zeros(*merged.shape[:2], 32)
        out[..., :4] = merged[..., ::32]
        return out

    inner: Any = model.model
    hooks = [
        inner.vision_tower.register_forward_hook(vision_hook),
        inner.multi_modal_projector.register_forward_hook(projector_hook),
    ]
    embeds = _embeds_of(
        model, inner.language_model, input_ids=ids, pixel_values=torch.zeros(tiles, 3, 32, 32)
    )
    for h in hooks:
        h.remove()
    got = internvl.views(ids, IMAGE, internvl.tokens_per_tile(model.config), (32, 32), sizes)
    assert [len(s) for s in got] == [7, 1 + 3]
    first_tile = {(0, k): k for k in range(7)} | {(1, 0): 7} | {(1, k): 7 + k for k in (1, 2, 3)}
    _check_merged(embeds, got, side, lambda b, k: first_tile[(b, k)])
    # the arrangement: 40x70 with 6 tiles -> 2 rows x 3 columns; 30x80 with 2 -> 1 x 2
    assert [v.kind for v in got[0]] == ["tile"] * 6 + ["global"]
    assert got[0][4].box == pytest.approx((20.0, 70 / 3, 40.0, 140 / 3))
    assert got[0][6].box == (0.0, 0.0, 40.0, 70.0)
    assert got[1][0].box == (0.0, 0.0, 32.0, 32.0) and got[1][0].kind == "image"
    assert got[1][2].box == pytest.approx((0.0, 40.0, 30.0, 80.0))


def test_llama4_views_follow_the_models_placement() -> None:
    model = copy.deepcopy(build_llama4())
    config: Any = model.config
    grid = llama4.tokens_per_tile(config)
    assert grid == (4, 4)
    per_tile = 16

    def llama_image(rows: int, cols: int) -> List[int]:
        tokens = llama4_image(rows, cols)
        out: List[int] = []
        i = 0
        while i < len(tokens):  # each run of 4 IMAGE tokens -> 16
            if tokens[i] == IMAGE:
                out += [IMAGE] * per_tile
                i += 4
            else:
                out.append(tokens[i])
                i += 1
        return out

    prompts = [
        [1, *llama_image(2, 2)],
        [2, *llama_image(1, 1), 7, *llama_image(1, 2), 8],
    ]
    ids = padded(prompts)
    tiles = 5 + 1 + 3
    side = 8  # 32 px / 4 px patches, shuffled 2x2 into 4x4 = 16 tokens per tile

    def patches_hook(module: nn.Module, args: tuple) -> tuple:
        return (_codes(tiles, side, 32),)

    def mlp_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        merged = args[0]
        out = torch.zeros(*merged.shape[:2], 32)
        out[..., :4] = merged[..., ::32]
        return out

    vision: Any = model.vision_model
    hooks = [
        vision.vision_adapter.register_forward_pre_hook(patches_hook),
        vision.vision_adapter.mlp.register_forward_hook(mlp_hook),
        model.multi_modal_projector.register_forward_hook(lambda m, a, o: a[0]),
    ]
    embeds = _embeds_of(
        model, model.language_model, input_ids=ids, pixel_values=torch.zeros(tiles, 3, 32, 32)
    )
    for h in hooks:
        h.remove()
    sizes = [(64, 64), (20, 30), (32, 64)]
    got = llama4.views(ids, IMAGE, BOI, EOI, grid, 32, sizes)
    assert [[v.kind for v in s] for s in got] == [
        ["tile"] * 4 + ["global"],
        ["image", "tile", "tile", "global"],
    ]
    order = {(0, k): k for k in range(5)} | {(1, 0): 5, (1, 1): 6, (1, 2): 7, (1, 3): 8}

    def check(b: int, k: int, view: Any) -> None:
        gh, gw = view.grid
        for i in range(gh):
            for j in range(gw):
                got_ = _decode(embeds[b, int(view.positions[i * gw + j])], 32, side)
                want = {(order[(b, k)], 2 * i + a, 2 * j + c) for a in (0, 1) for c in (0, 1)}
                assert got_ == want, (b, k, i, j)

    for b, sample in enumerate(got):
        for k, view in enumerate(sample):
            check(b, k, view)
    # 20x30 in one 32x32 tile: not upscaled (the processor upscales only to 32 on the long
    # side: 21x32), the bottom 11 px padding: 3 of 4 token rows (8 px each) hold image.
    assert llama4.content_size(20, 30, (32, 32), 32) == (21, 32)
    assert got[1][0].grid == (3, 4)
    assert got[1][0].box == pytest.approx((0.0, 0.0, 24 * 20 / 21, 30.0))
    # 2x2 canvas of a 64x64 image: no padding, tiles are the quarters
    assert got[0][3].box == pytest.approx((32.0, 32.0, 64.0, 64.0))
    assert got[0][4].box == (0.0, 0.0, 64.0, 64.0)


def test_gemma4_views_follow_the_models_placement() -> None:
    model = copy.deepcopy(build_gemma4())
    sizes = [(4, 6), (6, 4), (2, 2)]  # patches per image; pooled 2x2 -> 2x3, 3x2, 1x1
    pixels, positions = gemma4_patches(sizes)
    prompts = [
        [1, BOI, *[IMAGE] * 6, EOI, 5, BOI, *[IMAGE] * 6, EOI],
        [2, 3, BOI, *[IMAGE] * 1, EOI],
    ]
    ids = padded(prompts)
    n = positions.shape[1]

    def encoder_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        # channel 0: x, channel 1: y, channel 2: the image; the pooler averages them.
        state = torch.zeros(len(sizes), n, 32)
        state[..., 0] = positions[..., 0].float()
        state[..., 1] = positions[..., 1].float()
        state[..., 2] = torch.arange(len(sizes)).view(-1, 1).float()
        output.last_hidden_state = state
        return output

    inner: Any = model.model
    root = math.sqrt(32)
    hooks = [
        inner.vision_tower.encoder.register_forward_hook(encoder_hook, with_kwargs=True),
        inner.embed_vision.register_forward_hook(
            lambda m, a, kw, o: kw["inputs_embeds"] / root, with_kwargs=True
        ),
    ]
    embeds = _embeds_of(
        model,
        inner.language_model,
        input_ids=ids,
        pixel_values=pixels,
        image_position_ids=positions,
        mm_token_type_ids=(ids == IMAGE).long(),
    )
    for h in hooks:
        h.remove()
    got = gemma4.views(ids, IMAGE, positions, 2, 4, [(40, 60), (60, 40), (9, 9)])
    assert [[v.grid for v in s] for s in got] == [[(2, 3), (3, 2)], [(1, 1)]]
    for b, sample in enumerate(got):
        for view in sample:
            gh, gw = view.grid
            for i in range(gh):
                for j in range(gw):
                    x, y, img = embeds[b, int(view.positions[i * gw + j]), :3].tolist()
                    assert (x, y, img) == pytest.approx((2 * j + 0.5, 2 * i + 0.5, view.image))
            assert view.box[2:] == {0: (40.0, 60.0), 1: (60.0, 40.0), 2: (9.0, 9.0)}[view.image]


# ------------------------------------------------------------------------ the real processors


def _coordinate_image(height: int, width: int) -> Any:
    """An RGB image whose red channel grows with x and green with y (0..255)."""
    from PIL import Image

    y = torch.linspace(0, 255, height).view(-1, 1).expand(height, width)
    x = torch.linspace(0, 255, width).view(1, -1).expand(height, width)
    rgb = torch.stack([x, y, torch.zeros_like(x)], dim=-1).round().to(torch.uint8)
    return Image.fromarray(rgb.numpy())


def _centre(box: tuple, height: int, width: int) -> Tuple[float, float]:
    """The expected (red, green) of a box's centre on the coordinate image."""
    top, left, bottom, right = box
    cy = min((top + bottom) / 2, height) / (height - 1) * 255
    cx = min((left + right) / 2, width) / (width - 1) * 255
    return cx, cy


@pytest.mark.parametrize("size", [(300, 700), (700, 300), (500, 500), (200, 210)])
def test_internvl_boxes_match_the_image_processor(size: Tuple[int, int]) -> None:
    processor = tf.GotOcr2ImageProcessor(
        size={"height": 64, "width": 64}, crop_to_patches=True, max_patches=6,
        do_normalize=False,
    )  # fmt: skip
    h, w = size
    out = processor(_coordinate_image(h, w), return_tensors="pt")
    tiles = out["pixel_values"]  # (n, 3, 64, 64) in [0, 1]
    n = int(out["num_patches"][0])
    ids = torch.tensor([[1, BOI, *[IMAGE] * (4 * n), EOI]])
    got = internvl.views(ids, IMAGE, (2, 2), (64, 64), [size])[0]
    assert len(got) == n
    for k, view in enumerate(got):
        tile = tiles[k] * 255
        red, green = tile[0, 32, 32].item(), tile[1, 32, 32].item()
        want = _centre(view.box, h, w)
        assert (red, green) == pytest.approx(want, abs=6), (k, view.box)


@pytest.mark.parametrize("size", [(300, 700), (500, 500), (40, 60), (100, 50)])
def test_llama4_boxes_match_the_image_processor(size: Tuple[int, int]) -> None:
    processor = tf.Llama4ImageProcessor(
        size={"height": 64, "width": 64}, max_patches=6, do_normalize=False
    )
    h, w = size
    out = processor(_coordinate_image(h, w), return_tensors="pt")
    tiles = out["pixel_values"].float() * 255  # (n, 3, 64, 64)
    rows, cols = (int(v) for v in out["aspect_ratios"][0])
    # llama4_image writes 4 tokens per tile: a 2x2 token grid per 64 px tile here
    ids = torch.tensor([[1, *llama4_image(rows, cols)]])
    got = llama4.views(ids, IMAGE, BOI, EOI, (2, 2), 64, [size])[0]
    content = llama4.content_size(h, w, (rows * 64, cols * 64), 64)
    n_tiles = rows * cols
    # every tile view: its centre on the canvas reads back the expected coordinates
    views_by_tile = [v for v in got if v.kind != "global"]
    for k in range(n_tiles):
        r, c = divmod(k, cols)
        tile_views = [
            v
            for v in views_by_tile
            if abs(v.box[0] - r * 64 * h / content[0]) < 1e-6
            and abs(v.box[1] - c * 64 * w / content[1]) < 1e-6
        ]
        inside = r * 64 < content[0] and c * 64 < content[1]
        assert len(tile_views) == int(inside), (k, [v.box for v in got])
        if not inside:
            continue
        view = tile_views[0]
        # a point inside the view's first cell that is inside the image content
        py = min(8, (content[0] - r * 64) // 2)
        px = min(8, (content[1] - c * 64) // 2)
        red, green = tiles[k, 0, py, px].item(), tiles[k, 1, py, px].item()
        wy = (r * 64 + py + 0.5) * h / content[0]
        wx = (c * 64 + px + 0.5) * w / content[1]
        assert (red, green) == pytest.approx(
            (min(wx, w - 1) / (w - 1) * 255, min(wy, h - 1) / (h - 1) * 255), abs=8
        ), (k, view.box)
    if n_tiles > 1:  # the global view: the whole image
        assert got[-1].kind == "global" and got[-1].box == (0.0, 0.0, float(h), float(w))
        red, green = tiles[-1, 0, 32, 32].item(), tiles[-1, 1, 32, 32].item()
        assert (red, green) == pytest.approx((127.5, 127.5), abs=6)


# ------------------------------------------------------------------------ against the oracle


def _randomise(model: nn.Module) -> nn.Module:
    """HF zero-initialises some parts (Gemma 4's vision position table is ones, Llama 4's
    and InternVL's are fine); give every parameter initialised to a constant random values at
    HF's init scale, so no two image tokens are alike by construction."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if (
                parameter.dim() >= 1
                and parameter.numel() > 1
                and bool((parameter == parameter.flatten()[0]).all())
                and "norm" not in name
                and "layernorm" not in name
            ):
                parameter.normal_(0, 0.02)
    return model


#: name -> (builder, per-image (positions helper) description)
BUILDERS = {"internvl": build_internvl, "gemma4": build_gemma4, "llama4": build_llama4}
_models: Dict[Tuple[str, str], nn.Module] = {}


def model_for(name: str, attn: str) -> nn.Module:
    if (name, attn) not in _models:
        model = _randomise(BUILDERS[name](attn))
        # HF's first forward installs its output-capturing hooks (an attribute of the
        # vision tower): run it once so that the side-effect snapshots see only ours.
        case = Case(name)
        ids, _ = left(case.prompts[1:])
        extra = case.inputs(ids)
        extra.pop("image_sizes", None)
        pixels = case.pixels[-1:]
        if name == "gemma4":
            pixels, extra["image_position_ids"] = (
                case.pixels[2:],
                case.extra["image_position_ids"][2:],
            )
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pixels, **extra)
        _models[(name, attn)] = model
    return _models[(name, attn)]


def left(prompts: List[List[int]]) -> Tuple[Tensor, Tensor]:
    s = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), s, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, s - len(p) :] = torch.tensor(p)
        mask[i, s - len(p) :] = 1
    return ids, mask


def right(prompts: List[List[int]]) -> Tuple[Tensor, Tensor]:
    s = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), s), 3, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    return ids, mask


def llama_image(rows: int, cols: int) -> List[int]:
    """Llama 4's image string with 16 tokens (4x4) per 32 px tile."""
    out: List[int] = []
    for t in llama4_image(rows, cols):
        out += [IMAGE] * 4 if t == IMAGE else [t]
    return out


class Case:
    """One family's batch of two prompts: the prompts, the extra inputs, the explained
    tensor, and by hand each sample's views as (positions among the sample's image tokens,
    grid)."""

    def __init__(self, name: str, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.name = name
        self.extra: Dict[str, Any] = {}
        self.oracle_extra: Dict[str, Any] = {}
        if name == "internvl":
            # sample 0: a 30x80 image (1x2 tiles + thumbnail); sample 1: one tile
            self.prompts = [[1, 2, *internvl_image(3), 5, 6], [4, *internvl_image(1), 9]]
            self.pixels = torch.randn(4, 3, 32, 32, generator=gen)
            self.extra["image_sizes"] = [(30, 80), (32, 32)]
            # (start, count, grid) per view, in each sample's image tokens
            self.hand = [[(0, 16, (4, 4)), (16, 16, (4, 4)), (32, 16, (4, 4))], [(0, 16, (4, 4))]]
        elif name == "llama4":
            # sample 0: a 32x64 image (1x2 tiles, no padding, + global); sample 1: a 20x30
            # image in one tile: 21x32 content, the last token row all padding
            self.prompts = [[1, 2, *llama_image(1, 2), 5, 6], [4, *llama_image(1, 1), 9]]
            self.pixels = torch.randn(4, 3, 32, 32, generator=gen)
            self.extra["image_sizes"] = [(32, 64), (20, 30)]
            self.hand = [[(0, 16, (4, 4)), (16, 16, (4, 4)), (32, 16, (4, 4))], [(0, 12, (3, 4))]]
        else:
            # sample 0: images of 4x6 and 6x4 patches (2x3, 3x2 tokens); sample 1: 4x4 (2x2)
            self.prompts = [
                [1, BOI, *[IMAGE] * 6, EOI, 5, BOI, *[IMAGE] * 6, EOI],
                [2, BOI, *[IMAGE] * 4, EOI, 7],
            ]
            self.pixels, positions = gemma4_patches([(4, 6), (6, 4), (4, 4)])
            self.pixels = self.pixels + 0.1 * torch.randn(self.pixels.shape, generator=gen)
            self.extra["image_position_ids"] = positions
            self.oracle_extra["image_position_ids"] = positions
            self.hand = [[(0, 6, (2, 3)), (6, 6, (3, 2))], [(0, 4, (2, 2))]]
        self.answers = torch.randint(10, 50, (2, 3), generator=gen)

    def inputs(self, ids: Tensor) -> Dict[str, Any]:
        out = dict(self.extra)
        if self.name == "gemma4":
            out["mm_token_type_ids"] = (ids == IMAGE).long()
        return out

    def oracle(self, model: nn.Module, layers: Any = None) -> Tuple[List[List[Tensor]], Tensor]:
        """Per sample, per view: the oracle's layer-summed map; and the model's logits."""
        ids, mask = left(self.prompts)
        b, s = ids.shape
        t = self.answers.shape[1]
        full = torch.cat([ids, self.answers], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(self.answers)], dim=1)
        batch: Dict[str, Any] = {
            "input_ids": full, "attention_mask": full_mask, "pixel_values": self.pixels,
            **self.oracle_extra,
        }  # fmt: skip
        if self.name == "gemma4":
            batch["mm_token_type_ids"] = (full == IMAGE).long() * (torch.arange(s + t) < s).long()
        positions = torch.arange(s - 1, s + t - 1).expand(b, t)
        softcap = 30.0 if self.name == "gemma4" else None
        values = per_key(model, batch, positions, self.answers, layers, softcap).sum(2)
        logits = logits_at(model, batch, positions, self.answers)
        maps = []
        for i in range(b):
            image = torch.nonzero(ids[i] == IMAGE)[:, 0].tolist()
            own = []
            for start, count, grid in self.hand[i]:
                where = image[start : start + count]
                own.append(on_grid(values[i], where, grid))
            maps.append(own)
        return maps, logits


def _close(got: Tensor, want: Tensor) -> None:
    scale = want.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(got / scale, want / scale, rtol=1e-4, atol=2e-5)


FAMILIES = sorted(BUILDERS)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", FAMILIES)
def test_maps_match_the_oracle(name: str, attn: str) -> None:
    model = model_for(name, attn)
    case = Case(name)
    ids, mask = left(case.prompts)
    before = snapshot(model)
    explained = AnswerLogits(model, ids, case.answers, mask, **case.inputs(ids))
    logits = explained(case.pixels)
    got = explained.view_maps(case.pixels)
    assert_unchanged(before, snapshot(model))
    want, model_logits = case.oracle(model)
    torch.testing.assert_close(logits, model_logits, rtol=1e-4, atol=1e-5)
    assert [[tuple(v.shape) for v in s] for s in got] == [
        [(3, *g) for _, _, g in views] for views in case.hand
    ]
    for mine, theirs in zip(got, want):
        for g, w in zip(mine, theirs):
            assert_not_vacuous(w.unsqueeze(0), lead=2)
            assert w.flatten(1).std(dim=1).min() > 0  # not constant over the view
            _close(g, w)


@pytest.mark.parametrize("name", FAMILIES)
def test_sdpa_equals_eager(name: str) -> None:
    case = Case(name, seed=1)
    ids, mask = left(case.prompts)
    out = []
    for attn in ("sdpa", "eager"):
        explained = AnswerLogits(model_for(name, attn), ids, case.answers, mask, **case.inputs(ids))
        out.append(explained.view_maps(case.pixels))
    for a, b in zip(*out):
        for x, y in zip(a, b):
            _close(x, y)


def _single(case: Case, i: int) -> Case:
    """Sample ``i`` of ``case`` alone (its images' pixels and extra rows)."""
    one = copy.copy(case)
    one.prompts = [case.prompts[i]]
    one.answers = case.answers[i : i + 1]
    one.hand = [case.hand[i]]
    one.extra = dict(case.extra)
    if case.name == "gemma4":
        images = [[0, 1], [2]][i]
        one.pixels = case.pixels[images]
        one.extra["image_position_ids"] = case.extra["image_position_ids"][images]
    else:
        tiles = [[0, 1, 2], [3]][i]
        one.pixels = case.pixels[tiles]
        one.extra["image_sizes"] = [case.extra["image_sizes"][i]]
    return one


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", FAMILIES)
def test_batch_equals_single(name: str, side: str) -> None:
    model = model_for(name, "sdpa")
    case = Case(name, seed=2)
    ids, mask = (left if side == "left" else right)(case.prompts)
    explained = AnswerLogits(model, ids, case.answers, mask, **case.inputs(ids))
    together = explained.source_maps(case.pixels)
    for i in range(2):
        one = _single(case, i)
        ids1, mask1 = left(one.prompts)
        alone = AnswerLogits(model, ids1, one.answers, mask1, **one.inputs(ids1))
        single = alone.source_maps(one.pixels)[0]
        assert len(single) == len(together[i])
        for x, y in zip(together[i], single):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=2e-5)


def test_llama4_refuses_a_sequence_across_attention_chunks() -> None:
    """Llama 4's chunked layers attend within chunks: an answer in a later chunk than the
    image does not attend to it there, so the maps are refused, naming the layers."""
    model = _randomise(build_llama4(chunk=16))
    ids, mask = left([[1, 2, *llama_image(1, 1), 5, 6]])  # 21 tokens + 3 answer > 16
    explained = AnswerLogits(model, ids, torch.tensor([[10, 11, 12]]), mask, image_sizes=[(32, 32)])
    with pytest.raises(UnsupportedModelError, match=r"attention_chunk_size 16.*layers \[0\]"):
        explained(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="image_sizes"):
        AnswerLogits(model, ids, torch.tensor([[10]]), mask)(torch.randn(1, 3, 32, 32))


# ------------------------------------------------------------------------ the half-image test


def _half(model: nn.Module, vision: nn.Module, language: nn.Module) -> nn.Module:
    """Image tokens that are zero where the image is zero (black; Gemma 4: grey, which its
    patch embedding maps to 0): every vision bias, position embedding, attention output
    projection and second MLP linear off, so a token is a function of its own pixels and
    zero pixels give a zero token; with no value bias, its value in decoder layer 0 is zero,
    so no answer logit read at layer 0 depends on its attention weight."""
    with torch.no_grad():
        for name, parameter in vision.named_parameters():
            if (
                name.endswith("bias")
                or "position" in name
                or any(k in name for k in ("projection_layer", "o_proj", "fc2", "down_proj"))
            ) and "vision_adapter" not in name:
                parameter.zero_()
        for name, parameter in language.named_parameters():
            if "v_proj.bias" in name:
                parameter.zero_()
    return model


def _half_image(bright: str, height: int, width: int, dark: float) -> Tensor:
    """``(3, H, W)`` in 0..255: one half coloured, the other ``dark``."""
    image = torch.full((3, height, width), dark)
    half = slice(0, width // 2) if bright == "left" else slice(width // 2, width)
    image[:, :, half] = torch.tensor([230.0, 100.0, 30.0]).view(3, 1, 1)
    return image


def _assert_on_half(maps: Tensor, bright: str) -> None:
    """Per token: the maximum lies on the lit half or within an eighth of the width of the
    boundary (tokens straddling it see the colour), the lit half has 1.5x the mean, and
    the outer eighth of the dark half (farther than any view's token reaches) is zero."""
    w = maps.shape[-1]
    lit = maps[..., : w // 2] if bright == "left" else maps[..., w // 2 :]
    dark = maps[..., w // 2 :] if bright == "left" else maps[..., : w // 2]
    far = maps[..., w - w // 8 :] if bright == "left" else maps[..., : w // 8]
    near = maps[..., : w // 2 + w // 8] if bright == "left" else maps[..., w // 2 - w // 8 :]
    assert torch.all(near.amax(dim=(-2, -1)) == 1.0)
    assert torch.all(far.abs().amax(dim=(-2, -1)) < 1e-4)
    assert torch.all(lit.mean(dim=(-2, -1)) > 1.5 * dark.mean(dim=(-2, -1)))


@pytest.mark.parametrize("bright", ["left", "right"])
def test_internvl_half_image_maps_to_that_half(bright: str) -> None:
    model = build_internvl(seed=3)
    inner: Any = model.model
    _half(model, inner.vision_tower, inner.language_model)
    processor = tf.GotOcr2ImageProcessor(
        size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=6, do_normalize=False
    )
    image = _half_image(bright, 60, 160, 0.0)
    out = processor(image, return_tensors="pt")
    n = int(out["num_patches"][0])
    ids, mask = left([[1, 2, *internvl_image(n), 5]])
    explained = AnswerLogits(
        model, ids, torch.tensor([[10, 11, 12]]), mask, image_sizes=[(60, 160)]
    )
    maps = explained.source_maps(out["pixel_values"], layers=[0])[0][0]
    assert maps.shape == (3, 60, 160)
    _assert_on_half(maps, bright)


@pytest.mark.parametrize("bright", ["left", "right"])
def test_llama4_half_image_maps_to_that_half(bright: str) -> None:
    model = build_llama4(seed=3)
    m: Any = model
    _half(model, m.vision_model, m.language_model)
    processor = tf.Llama4ImageProcessor(
        size={"height": 32, "width": 32}, max_patches=6, do_normalize=False
    )
    image = _half_image(bright, 60, 160, 0.0)
    out = processor(image, return_tensors="pt")
    rows, cols = (int(v) for v in out["aspect_ratios"][0])
    ids, mask = left([[1, 2, *llama_image(rows, cols), 5]])
    explained = AnswerLogits(
        model, ids, torch.tensor([[10, 11, 12]]), mask, image_sizes=[(60, 160)]
    )
    maps = explained.source_maps(out["pixel_values"].float(), layers=[0])[0][0]
    assert maps.shape == (3, 60, 160)
    _assert_on_half(maps, bright)


@pytest.mark.parametrize("bright", ["left", "right"])
def test_gemma4_half_image_maps_to_that_half(bright: str) -> None:
    model = build_gemma4(seed=3, full_only=True)
    inner: Any = model.model
    _half(model, inner.vision_tower, inner.language_model)
    processor = tf.Gemma4ImageProcessor(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70)
    # grey: 0 after Gemma 4's 2·(x − 0.5); 40x104 is a size the processor keeps (no
    # resampling noise, which Gemma 4's RMS norms would blow up)
    image = _half_image(bright, 40, 104, 127.5)
    out = processor(image, return_tensors="pt")
    tokens = int(out["num_soft_tokens_per_image"][0])
    ids, mask = left([[1, 2, BOI, *[IMAGE] * tokens, EOI, 5]])
    explained = AnswerLogits(
        model, ids, torch.tensor([[10, 11, 12]]), mask,
        image_position_ids=out["image_position_ids"], image_sizes=[(40, 104)],
    )  # fmt: skip
    maps = explained.source_maps(out["pixel_values"], layers=[0])[0][0]
    assert maps.shape == (3, 40, 104)
    _assert_on_half(maps, bright)


@pytest.mark.parametrize("name", FAMILIES)
def test_legrad_map_output_is_on_the_original_image(name: str) -> None:
    """``LeGrad(AnswerLogits(...)).attribute_multi(..., output="map")``: one map per sample at
    its image's size (padded to the batch's largest), equal to ``source_maps``."""
    model = model_for(name, "sdpa")
    case = Case(name, seed=3)
    if name == "gemma4":  # one image per sample for LeGrad's one-map-per-sample output
        case.prompts = [[2, BOI, *[IMAGE] * 6, EOI, 7], [2, BOI, *[IMAGE] * 4, EOI, 7]]
        case.pixels = case.pixels[[0, 2]]
        case.extra["image_position_ids"] = case.extra["image_position_ids"][[0, 2]]
        case.extra["image_sizes"] = [(30, 50), (20, 20)]
    ids, mask = left(case.prompts)
    explained = AnswerLogits(model, ids, case.answers, mask, **case.inputs(ids))
    maps = LeGrad(explained).attribute_multi(case.pixels, targets=[0, 1, 2], output="map")
    placed = explained.source_maps(case.pixels)
    sizes = [p[0].shape[-2:] for p in placed]
    assert maps.shape == (2, 3, max(h for h, _ in sizes), max(w for _, w in sizes))
    for b, (h, w) in enumerate(sizes):
        torch.testing.assert_close(maps[b, :, :h, :w], placed[b][0], rtol=1e-4, atol=1e-5)


class _Tokenizer:
    """Words ``w<k>`` ↔ ids ``k``: enough for explain_answer's encode and decode."""

    all_special_ids: Tuple[int, ...] = ()

    def __call__(self, text: str, add_special_tokens: bool = False) -> Dict[str, List[int]]:
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def decode(self, ids: List[int]) -> str:
        return " ".join(f"w{i}" for i in ids)


class _InternVLProcessor:
    """InternVL's processor in miniature: the real image processor (tiles + thumbnail), the
    prompt's ``<image>`` expanded to ``<img>`` + 16 tokens per tile + ``</img>``; like the
    real one it returns no image size."""

    tokenizer = _Tokenizer()

    def __init__(self) -> None:
        self.images = tf.GotOcr2ImageProcessor(
            size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=6,
            do_normalize=False,
        )  # fmt: skip

    def __call__(self, text: List[str], images: List[Any], return_tensors: str) -> Dict[str, Any]:
        out = self.images(images[0], return_tensors="pt")
        n = int(out["num_patches"][0])
        ids: List[int] = []
        for word in text[0].split():
            ids += internvl_image(n) if word == "<image>" else [int(word[1:])]
        row = torch.tensor([ids])
        return {
            "input_ids": row,
            "attention_mask": torch.ones_like(row),
            "pixel_values": out["pixel_values"],
        }


def test_explain_answer_passes_the_original_size() -> None:
    """explain_answer on InternVL: the processor returns no image size; the maps are on the
    original image (the size explain_answer passes as image_sizes), one per answer token."""
    from captum_legrad import explain_answer

    model = model_for("internvl", "sdpa")
    image = torch.rand(3, 30, 80, generator=torch.Generator().manual_seed(5))
    result = explain_answer(model, _InternVLProcessor(), image, "w1 <image> w2", answer="w7 w8")
    assert result.tokens == ["w7", "w8"]
    assert result.maps.shape == (2, 30, 80) and result.answer_map.shape == (30, 80)
    ids = torch.tensor([[1, *internvl_image(4), 2]])  # 30x80 -> 1x3 tiles + thumbnail
    explained = AnswerLogits(model, ids, torch.tensor([[7, 8]]), image_sizes=[(30, 80)])
    pixels = _InternVLProcessor().images(image, return_tensors="pt")["pixel_values"]
    raw = explained.source_maps(pixels, normalize=False)[0][0]
    low = raw.flatten(1).min(1).values.view(-1, 1, 1)
    high = raw.flatten(1).max(1).values.view(-1, 1, 1)
    torch.testing.assert_close(result.maps, (raw - low) / (high - low), rtol=1e-4, atol=1e-5)


def test_refusals_name_the_reason() -> None:
    """InternVL keeping CLS (the pixel shuffle's square breaks) is refused; tiled images
    without their size are a ValueError naming image_sizes; a wrong token count names the
    processor."""
    model = build_internvl()
    config: Any = copy.deepcopy(model.config)
    config.vision_feature_select_strategy = "full"
    with pytest.raises(UnsupportedModelError, match="CLS"):
        internvl.rules(config)
    ids = torch.tensor([[1, *internvl_image(3), 2]])
    with pytest.raises(ValueError, match="image_sizes"):
        AnswerLogits(model, ids, torch.tensor([[7]]))(torch.randn(3, 3, 32, 32))
    bad = torch.tensor([[1, BOI, *[IMAGE] * 20, EOI, 2]])
    with pytest.raises(ValueError, match="processor"):
        AnswerLogits(model, bad, torch.tensor([[7]]))(torch.randn(2, 3, 32, 32))


def test_gemma4_input_form_is_the_patches_layout() -> None:
    """Gemma 4's ``output="input"``: the map in ``pixel_values``' layout ``(images, K,
    patches, 3·p²)``: each image's map resized to the processed image and patchified as the
    processor does (checked by un-patchifying), padding patches 0."""
    model = model_for("gemma4", "sdpa")
    case = Case("gemma4", seed=4)
    case.prompts = [[2, BOI, *[IMAGE] * 6, EOI, 7], [2, BOI, *[IMAGE] * 4, EOI, 7]]
    pixels = case.pixels[[0, 2]]
    positions = case.extra["image_position_ids"][[0, 2]]
    ids, mask = left(case.prompts)
    explained = AnswerLogits(
        model, ids, case.answers, mask, image_position_ids=positions,
        mm_token_type_ids=(ids == IMAGE).long(),
    )  # fmt: skip
    legrad = LeGrad(explained)
    rows = legrad.attribute_multi(pixels, targets=[0, 1, 2], output="input")
    assert rows.shape == (2, 3, *pixels.shape[1:])
    canvas = legrad.attribute_multi(pixels, targets=[0, 1, 2], output="map")
    for i, (hp, wp) in enumerate([(4, 6), (4, 4)]):
        n = hp * wp
        assert torch.all(rows[i, :, n:] == 0)
        patches = rows[i, :, :n].reshape(3, hp, wp, 4, 4, 3)[..., 0]
        image = patches.permute(0, 1, 3, 2, 4).reshape(3, hp * 4, wp * 4)
        size = (hp * 4, wp * 4)  # no image_sizes: the canvas is the processed image
        torch.testing.assert_close(image, canvas[i, :, : size[0], : size[1]])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gemma4_shared_kv_and_experts_match_the_oracle(attn: str) -> None:
    """Gemma 4 with layers that reuse earlier layers' keys and values and with expert MLPs:
    each layer's own attention probabilities are differentiated, as the oracle does."""
    model = _randomise(build_gemma4(attn, shared_moe=True))
    case = Case("gemma4", seed=5)
    ids, mask = left(case.prompts)
    got = AnswerLogits(model, ids, case.answers, mask, **case.inputs(ids)).view_maps(case.pixels)
    want, _ = case.oracle(model)
    for mine, theirs in zip(got, want):
        for g, w in zip(mine, theirs):
            assert_not_vacuous(w.unsqueeze(0), lead=2)
            _close(g, w)
