"""Tiled and multi-crop VLMs: LLaVA-NeXT, LLaVA-OneVision, Idefics3, SmolVLM, Mistral 3.

Every test builds its inputs with the model's **real processor** (image processor and
processor classes of the installed transformers, with a tiny offline word-level tokenizer
holding the families' special tokens), on tiny random-init models.

* Placement: with a vision tower of zero layers every image token's embedding depends only
  on its own pixels, so ``autograd`` tells which pixels of ``pixel_values`` each position of
  the language model's input came from. The test image encodes its own coordinates in its
  colours (``y/H``, ``x/W``, and 1 over real pixels), so those pixels say where in the
  original image each token comes from. The views (positions, grid, rectangle) must put
  every token's cell there, and the tokens they leave out (newlines) must have no pixels.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from torch import Tensor, nn

tf = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from _versions import requires  # noqa: E402

from captum_legrad.adapters.hf.vlm_idefics3 import tile_views  # noqa: E402
from captum_legrad.adapters.hf.vlm_llava_next import anyres_views  # noqa: E402
from captum_legrad.adapters.hf.vlm_mistral3 import pixtral_views  # noqa: E402
from captum_legrad.adapters.hf.vlm_tiles import ImageView  # noqa: E402

pytestmark = requires("transformers", "LlavaModel", since="transformers 4.52")

SPECIAL = [
    "<image>", "<fake_token_around_image>", "<global-img>", "\n", "[IMG]", "[IMG_BREAK]",
    "[IMG_END]", "<end_of_utterance>", "<video>",
    *[f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)],
]  # fmt: skip
WORDS = ["<unk>", "<pad>", "a", "b", "c", "what", "is", "this", "?", "USER:", "ASSISTANT:"]
VOCAB = 64


def tokenizer() -> Any:
    """A word-level tokenizer with the families' special tokens (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(WORDS + SPECIAL)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL})
    fast.padding_side = "left"
    return fast


TOKENIZER = tokenizer()


def token(text: str) -> int:
    return int(TOKENIZER.convert_tokens_to_ids(text))


PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def _text(**kw: Any) -> Any:
    return tf.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=1024, **kw,
    )  # fmt: skip


def _finish(model: nn.Module, attn: str) -> nn.Module:
    model.config._attn_implementation = attn
    for sub in model.modules():
        config = getattr(sub, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = attn
    return model.eval()


def llava_next(attn: str = "eager", vision_layers: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    vision = tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
        num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32,
    )  # fmt: skip
    config = tf.LlavaNextConfig(
        vision_config=vision, text_config=_text(), image_token_index=token("<image>"),
        image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
    )  # fmt: skip
    config._attn_implementation = attn
    return _finish(tf.LlavaNextForConditionalGeneration(config), attn)


def llava_onevision(attn: str = "eager", vision_layers: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    vision = tf.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
        num_attention_heads=2, image_size=32, patch_size=8,
    )  # fmt: skip
    text = tf.Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024,
    )  # fmt: skip
    config = tf.LlavaOnevisionConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(),
        image_token_index=token("<image>"), video_token_index=token("<video>"),
        image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_1",
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )  # fmt: skip
    config._attn_implementation = attn
    return _finish(tf.LlavaOnevisionForConditionalGeneration(config), attn)


def _idefics_vision(layers: int) -> Any:
    return tf.Idefics3VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
        image_size=32, patch_size=8,
    )  # fmt: skip


def idefics3(attn: str = "eager", vision_layers: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = tf.Idefics3Config(
        vision_config=_idefics_vision(vision_layers).to_dict(), text_config=_text().to_dict(),
        image_token_id=token("<image>"), scale_factor=2,
    )  # fmt: skip
    config._attn_implementation = attn
    return _finish(tf.Idefics3ForConditionalGeneration(config), attn)


def smolvlm(attn: str = "eager", vision_layers: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = tf.SmolVLMConfig(
        vision_config=_idefics_vision(vision_layers).to_dict(), text_config=_text().to_dict(),
        image_token_id=token("<image>"), scale_factor=2,
    )  # fmt: skip
    config._attn_implementation = attn
    return _finish(tf.SmolVLMForConditionalGeneration(config), attn)


def mistral3(attn: str = "eager", vision_layers: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    vision = tf.PixtralVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
        num_attention_heads=2, image_size=64, patch_size=4, head_dim=16,
    )  # fmt: skip
    text = tf.MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=1024,
    )  # fmt: skip
    config = tf.Mistral3Config(
        vision_config=vision.to_dict(), text_config=text.to_dict(),
        image_token_index=token("[IMG]"), spatial_merge_size=2, vision_feature_layer=-1,
    )  # fmt: skip
    config._attn_implementation = attn
    return _finish(tf.Mistral3ForConditionalGeneration(config), attn)


PLAIN = dict(image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0], do_rescale=False)


def processor(name: str) -> Any:
    tok = tokenizer()
    if name == "llava_next":
        ip = tf.LlavaNextImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
            image_grid_pinpoints=PINPOINTS, **PLAIN,
        )  # fmt: skip
        return tf.LlavaNextProcessor(
            image_processor=ip, tokenizer=tok, patch_size=8, image_token="<image>",
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
        )  # fmt: skip
    if name == "llava_onevision":
        ip = tf.LlavaOnevisionImageProcessor(
            size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
            image_grid_pinpoints=PINPOINTS, **PLAIN,
        )  # fmt: skip
        return tf.LlavaOnevisionProcessor(
            image_processor=ip, tokenizer=tok, video_processor=tf.LlavaOnevisionVideoProcessor(),
            num_image_tokens=16,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1",
            image_token="<image>", video_token="<video>",
        )  # fmt: skip
    if name in ("idefics3", "smolvlm"):
        cls = tf.Idefics3ImageProcessor if name == "idefics3" else tf.SmolVLMImageProcessor
        ip = cls(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, **PLAIN)
        try:
            import num2words  # noqa: F401  (SmolVLMProcessor needs it, for videos)
        except ImportError:
            name = "idefics3"  # SmolVLMProcessor lays out images as Idefics3Processor does
        if name == "idefics3":
            return tf.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4)
        return tf.SmolVLMProcessor(
            image_processor=ip,
            tokenizer=tok,
            video_processor=tf.SmolVLMVideoProcessor(),
            image_seq_len=4,
        )
    ip = tf.PixtralImageProcessor(
        size={"longest_edge": 64}, patch_size={"height": 8, "width": 8}, **PLAIN
    )
    return tf.PixtralProcessor(
        image_processor=ip, tokenizer=tok, patch_size=4, spatial_merge_size=2,
        image_token="[IMG]", image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]",
    )  # fmt: skip


BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    "llava_next": llava_next,
    "llava_onevision": llava_onevision,
    "idefics3": idefics3,
    "smolvlm": smolvlm,
    "mistral3": mistral3,
}
PLACEHOLDER = {"mistral3": "[IMG]"}


def coordinate_image(height: int, width: int) -> Tensor:
    """``(3, H, W)`` in [0, 1]: ``(y + ½) / H``, ``(x + ½) / W``, and 1 (real pixels)."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    return torch.stack(
        [ys[:, None].expand(height, width), xs[None, :].expand(height, width),
         torch.ones(height, width)]
    )  # fmt: skip


def inputs(
    name: str, images: List[Tensor], texts: List[str], side: str = "left"
) -> Dict[str, Tensor]:
    proc = processor(name)
    proc.tokenizer.padding_side = side
    nested: Any = [[im] for im in images] if name in ("idefics3", "smolvlm") else images
    out = proc(images=nested, text=texts, return_tensors="pt", padding=True)
    return {k: v for k, v in out.items() if isinstance(v, Tensor)}


def views_of(name: str, model: nn.Module, batch: Dict[str, Tensor]) -> List[List[ImageView]]:
    config: Any = model.config
    ids = batch["input_ids"]
    if name in ("llava_next", "llava_onevision"):
        return anyres_views(
            ids, config, batch["image_sizes"], onevision=name == "llava_onevision",
            batch_num_images=batch.get("batch_num_images"),
        )  # fmt: skip
    if name in ("idefics3", "smolvlm"):
        return tile_views(
            ids, config, batch["pixel_values"], batch.get("pixel_attention_mask"), name
        )
    return pixtral_views(ids, config, batch["image_sizes"])


def model_kwargs(name: str, batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {k: v for k, v in batch.items() if k not in ("image_sizes",) or name != "idefics3"}


def pixel_sources(
    model: nn.Module, batch: Dict[str, Tensor], positions: Tensor, sample: int
) -> List[Tensor]:
    """For each position: the gradient magnitude of its input embedding over ``pixel_values``."""
    pixels = batch["pixel_values"].clone().requires_grad_(True)
    captured: Dict[str, Tensor] = {}
    inner: Any = model.model
    language = getattr(inner, "language_model", None) or inner.text_model

    def grab(module: nn.Module, args: Any, kwargs: Dict[str, Any]) -> None:
        captured["embeds"] = kwargs["inputs_embeds"]

    handle = language.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        inner(**{**batch, "pixel_values": pixels}, use_cache=False)
    finally:
        handle.remove()
    embeds = captured["embeds"]
    out = []
    for p in positions.tolist():
        (grad,) = torch.autograd.grad(embeds[sample, p].sum(), pixels, retain_graph=True)
        out.append(grad.abs())
    return out


def local_vision(model: nn.Module) -> nn.Module:
    """The model with its vision attention outputs zeroed: every vision token then depends
    on its own patch only (the MLPs, norms and merger act per token or per merged group)."""
    inner: Any = model.model
    tower = getattr(inner, "vision_tower", None) or inner.vision_model
    with torch.no_grad():
        for name, module in tower.named_modules():
            if name.endswith(("out_proj", "o_proj")) and isinstance(module, nn.Linear):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
    return model


IMAGE_SIZES = {
    # two sizes per family with different crop / tile layouts
    "llava_next": [(60, 80), (90, 40)],
    "llava_onevision": [(60, 80), (40, 100)],
    "idefics3": [(60, 80), (80, 24)],
    "smolvlm": [(100, 40), (20, 24)],
    "mistral3": [(60, 80), (30, 52)],
}


def check_placement(name: str, model: nn.Module, batch: Dict[str, Tensor]) -> List[List[ImageView]]:
    """The views of ``batch`` put every token where its pixels come from (see the module
    doc); tokens they leave out come from no pixel. Returns the views, per sample."""
    placeholder = PLACEHOLDER.get(name, "<image>")
    per_sample = views_of(name, model, batch)
    ids = batch["input_ids"]
    pixels = batch["pixel_values"]
    assert len(per_sample) == ids.shape[0]
    for b in range(ids.shape[0]):
        image_positions = set(torch.nonzero(ids[b] == token(placeholder))[:, 0].tolist())
        used = torch.cat([v.positions for v in per_sample[b]]).tolist()
        assert len(used) == len(set(used)), "a token in two views"
        assert set(used) <= image_positions
        left_out = sorted(image_positions - set(used))
        for grad in pixel_sources(model, batch, torch.tensor(left_out, dtype=torch.long), b):
            assert grad.sum() == 0, "a left-out image token (newline) comes from pixels"
    for sample, view in ((b, v) for b, views in enumerate(per_sample) for v in views):
        # The box in pixels of the original image; the test image's colours are fractions.
        height, width = view.size
        top, left, bottom, right = view.box
        top, left, bottom, right = top / height, left / width, bottom / height, right / width
        g_h, g_w = view.grid
        cell = ((bottom - top) / g_h, (right - left) / g_w)
        grads = pixel_sources(model, batch, view.positions, sample)
        for k, grad in enumerate(grads):
            r, c = divmod(k, g_w)
            support = grad.sum(dim=-3, keepdim=True) > 0  # over channels
            assert support.any(), f"{view.kind} token {k} comes from no pixel"
            frame_pixels = pixels * support
            real = frame_pixels.select(-3, 2)
            weight = real.sum()
            if weight < 0.5:  # only views of padded squares have cells over padding only
                assert view.kind == "base" and (top < 0 or left < 0), (view.kind, (r, c))
                continue
            y = (frame_pixels.select(-3, 0)).sum() / weight
            x = (frame_pixels.select(-3, 1)).sum() / weight
            expected_y = top + (r + 0.5) * cell[0]
            expected_x = left + (c + 0.5) * cell[1]
            # Cells partly over padding: their real pixels' centre moves inwards.
            partial = bool((real[support.select(-3, 0)] < 0.99).any())
            tol = 0.55 if partial else 0.2
            if name == "llava_onevision" and view.kind == "crops":
                # The shrunk grid's cells are bilinear mixes of up to two cells each way:
                # their support's centre is off theirs by up to half a source cell.
                tol = max(tol, 0.35)
            assert abs(float(y) - expected_y) <= tol * cell[0] + 1e-3, (
                f"{name} {view.kind} cell {(r, c)}: y {float(y):.3f} vs {expected_y:.3f}"
            )
            assert abs(float(x) - expected_x) <= tol * cell[1] + 1e-3, (
                f"{name} {view.kind} cell {(r, c)}: x {float(x):.3f} vs {expected_x:.3f}"
            )
    return per_sample


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_views_match_the_models_placement(name: str) -> None:
    model = local_vision(BUILDERS[name](vision_layers=1))
    placeholder = PLACEHOLDER.get(name, "<image>")
    sizes = IMAGE_SIZES[name]
    layouts = set()
    for height, width in sizes:
        image = coordinate_image(height, width)
        batch = inputs(name, [image], [f"a {placeholder} what is this ?"])
        (views,) = check_placement(name, model, batch)
        layouts.add(tuple((v.kind, v.grid, v.box) for v in views))
    assert len(layouts) == len(sizes), f"the image sizes gave the same layout: {layouts}"


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_several_images_per_sample(name: str) -> None:
    """Two samples, the first with two images of different sizes (LLaVA-OneVision: its
    multi-image rule, one base view of the image padded to a square)."""
    model = local_vision(BUILDERS[name](vision_layers=1))
    placeholder = PLACEHOLDER.get(name, "<image>")
    (h0, w0), (h1, w1) = IMAGE_SIZES[name]
    images = [coordinate_image(h0, w0), coordinate_image(h1, w1), coordinate_image(h1, w0)]
    texts = [f"a {placeholder} b {placeholder} ?", f"{placeholder} what is this ?"]
    proc = processor(name)
    nested: Any = [images[:2], images[2:]]
    if name not in ("idefics3", "smolvlm", "llava_onevision"):
        nested = images
    out = proc(images=nested, text=texts, return_tensors="pt", padding=True)
    batch = {k: v for k, v in out.items() if isinstance(v, Tensor)}
    views = check_placement(name, model, batch)
    # The images are numbered over the batch, in the processor's order.
    assert [sorted({v.image for v in sample}) for sample in views] == [[0, 1], [2]]
    if name == "llava_onevision":
        assert [v.kind for v in views[0]] == ["base", "base"]
        assert [v.kind for v in views[1]] == ["base", "crops"]


def test_as_samples_numbers_sources_and_tiles_per_sample() -> None:
    """The one conversion, against hand-placed views: each sample's images become its
    sources in order (their batch-wide index dropped), boxes are rounded to whole pixels
    (also beyond the image), ``"tile"`` views without a name are numbered per sample, a
    given name is kept, and a sample without images has no sources."""
    from captum_legrad.adapters.hf.vlm_tiles import as_samples

    def at(*positions: int) -> Tensor:
        return torch.tensor(positions)

    views = [
        [
            ImageView(0, at(3, 4), (1, 2), (0.0, 0.0, 10.4, 20.6), (10, 20), "tile"),
            ImageView(0, at(5, 6), (2, 1), (-2.6, 10.5, 11.5, 21.0), (10, 20), "tile"),
            ImageView(1, at(8), (1, 1), (0.0, 0.0, 5.0, 7.0), (5, 7), "global"),
            ImageView(1, at(9), (1, 1), (1.0, 2.0, 3.0, 4.0), (5, 7), "tile", "tile 1,2"),
        ],
        [],
        [ImageView(2, at(1, 2, 3, 4), (2, 2), (0.0, 4.0, 8.0, 8.0), (8, 8), "tile")],
    ]
    first, empty, last = as_samples(views)
    assert [s.size for s in first.sources] == [(10, 20), (5, 7)]
    assert [v.source for v in first.views] == [0, 0, 1, 1]
    assert [v.name for v in first.views] == ["tile 0", "tile 1", "global", "tile 1,2"]
    # Python rounds halves to even: 10.5 -> 10, 11.5 -> 12.
    assert [v.box for v in first.views] == [
        (0, 0, 10, 21), (-3, 10, 12, 21), (0, 0, 5, 7), (1, 2, 3, 4),
    ]  # fmt: skip
    assert [v.positions.tolist() for v in first.views] == [[3, 4], [5, 6], [8], [9]]
    assert empty.sources == () and empty.views == ()
    assert [s.size for s in last.sources] == [(8, 8)]
    assert [(v.source, v.name, v.grid) for v in last.views] == [(0, "tile 0", (2, 2))]
    with pytest.raises(ValueError, match="g_h·g_w = 4"):
        ImageView(0, at(1, 2, 3), (2, 2), (0.0, 0.0, 8.0, 8.0), (8, 8), "image")


# ---------------------------------------------------------------------------- the oracle


def _language(model: Any) -> Any:
    inner = model.model
    return getattr(inner, "language_model", None) or inner.text_model


def oracle_key_maps(
    model: nn.Module, batch: Dict[str, Tensor], positions: Tensor, answer_ids: Tensor
) -> Tensor:
    """Per-layer, per-token LeGrad values on every key: ``(B, T, L, N)``, from docs/method.md.

    Independent of the package: an eager deep copy run once with ``output_attentions=True``
    on the whole teacher-forced sequence (``batch``: the model's own keyword inputs), the
    decoder layers' outputs kept by forward hooks; then explicit loops over answer tokens
    and layers: the logit lens ``lm_head(norm(Z^l))`` at ``positions[:, j]`` picked at
    ``answer_ids[:, j]``, ``autograd.grad`` to the attention probabilities HF returns, ReLU,
    mean over heads and query rows.
    """
    import copy

    work: Any = copy.deepcopy(model)
    work.set_attn_implementation("eager")
    work.eval()
    language = _language(work)
    decoder = list(language.layers)
    hidden: List[Tensor] = []
    handles = [
        layer.register_forward_hook(
            lambda m, a, o: hidden.append(o[0] if isinstance(o, tuple) else o)
        )
        for layer in decoder
    ]
    try:
        with torch.enable_grad():
            out = work(**batch, output_attentions=True, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    attentions = out.attentions
    assert len(attentions) == len(decoder) == len(hidden)
    b, t = answer_ids.shape
    rows = torch.arange(b)
    n = attentions[0].shape[-1]
    maps = torch.zeros(b, t, len(decoder), n)
    for j in range(t):
        for layer in range(len(decoder)):
            logits = work.lm_head(language.norm(hidden[layer]))
            picked = logits[rows, positions[:, j], answer_ids[:, j]]
            (grad,) = torch.autograd.grad(picked.sum(), attentions[layer], retain_graph=True)
            maps[:, j, layer] = grad.clamp(min=0).mean(dim=(1, 2))
    return maps


def teacher_forced(batch: Dict[str, Tensor], answers: Tensor) -> Tuple[Dict[str, Tensor], Tensor]:
    """The processor's left-padded batch with the answers appended, and the predicting
    positions ``(B, T)``."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert bool((mask[:, -1] == 1).all()), "the processor must pad on the left here"
    b, s = ids.shape
    t = answers.shape[1]
    full = dict(batch)
    full["input_ids"] = torch.cat([ids, answers], dim=1)
    full["attention_mask"] = torch.cat([mask, torch.ones_like(answers)], dim=1)
    return full, torch.arange(s - 1, s + t - 1).expand(b, t)


def white_tokens_only(model: nn.Module) -> nn.Module:
    """A LLaVA-NeXT whose image tokens are exactly zero where the pixels are black and not
    where they are white (hand-set weights): its vision tower sees each patch alone
    (:func:`local_vision`, no position embeddings), and the projector's first layer is set
    so that a black patch's feature gives ``gelu(-50) = 0`` and a white one's ``gelu(5)``."""
    local_vision(model)
    inner: Any = model.model
    tower = inner.vision_tower
    with torch.no_grad():
        tower.embeddings.position_embedding.weight.zero_()
        colours = torch.stack([torch.ones(3, 32, 32), torch.zeros(3, 32, 32)])
        features = tower(colours, output_hidden_states=True).hidden_states[-1][:, 1]
        white, black = features[0], features[1]
        direction = (white - black) / (white - black).pow(2).sum()
        projector = inner.multi_modal_projector
        projector.linear_1.weight.copy_(55 * direction.expand_as(projector.linear_1.weight))
        projector.linear_1.bias.fill_(float(-55 * direction @ black - 50))
        projector.linear_2.bias.zero_()
    return model


# ---------------------------------------------------------------------- AnswerLogits

TOL = 2e-5
ATTN = ("sdpa", "eager")
FAMILIES = sorted(BUILDERS)
_models: Dict[Tuple[str, str], nn.Module] = {}


def model_for(name: str, attn: str) -> nn.Module:
    if (name, attn) not in _models:
        _models[(name, attn)] = BUILDERS[name](attn)
    return _models[(name, attn)]


def random_image(height: int, width: int, seed: int) -> Tensor:
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))


def case(name: str, seed: int = 0) -> Tuple[Dict[str, Tensor], Tensor]:
    """Two prompts of different lengths with two images of different sizes (different
    crop / tile layouts), left-padded by the processor, and random answers."""
    placeholder = PLACEHOLDER.get(name, "<image>")
    sizes = IMAGE_SIZES[name]
    images = [random_image(*sizes[0], seed), random_image(*sizes[1], seed + 1)]
    texts = [f"a {placeholder} what is this ?", f"USER: {placeholder} b"]
    batch = inputs(name, images, texts)
    answers = torch.randint(2, 11, (2, 3), generator=torch.Generator().manual_seed(seed))
    return batch, answers


def explained_for(model: nn.Module, batch: Dict[str, Tensor], answers: Tensor, **kw: Any) -> Any:
    from captum_legrad import AnswerLogits

    others = {
        k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "pixel_values")
    }
    return AnswerLogits(model, batch["input_ids"], answers, batch["attention_mask"], **others, **kw)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("name", FAMILIES)
def test_view_maps_match_the_oracle(name: str, attn: str) -> None:
    from conftest import assert_not_vacuous

    model = model_for(name, attn)
    batch, answers = case(name)
    full, positions = teacher_forced(batch, answers)
    explained = explained_for(model, batch, answers)
    logits = explained(batch["pixel_values"])
    with torch.no_grad():
        own = model(**full, use_cache=False).logits
    rows = torch.arange(2).unsqueeze(1)
    torch.testing.assert_close(logits, own[rows, positions, answers], rtol=1e-4, atol=1e-5)
    expected = oracle_key_maps(model, full, positions, answers)  # (B, T, L, N)
    samples = explained.views(batch["pixel_values"])
    mine = views_of(name, model, {**batch, "input_ids": full["input_ids"]})
    got = explained.view_maps(batch["pixel_values"], targets=range(3))
    layouts = set()
    for b, sample in enumerate(samples):
        own_views = mine[b]
        assert [tuple(v.positions.tolist()) for v in own_views] == [
            tuple(v.positions.tolist()) for v in sample.views
        ]
        layouts.add(tuple(v.grid for v in sample.views))
        for view, maps in zip(sample.views, got[b]):
            ref = expected[b][:, :, view.positions].sum(1).reshape(3, *view.grid)
            assert_not_vacuous(ref.unsqueeze(0), lead=2)
            flat = ref.flatten(1)
            assert bool((flat.max(1).values > flat.min(1).values).all()), "constant oracle map"
            torch.testing.assert_close(maps, ref, rtol=1e-4, atol=TOL * float(ref.abs().max()))
    assert len(layouts) == 2, "the two image sizes gave the same views"
    # Per layer: the last one alone.
    last = explained.view_maps(batch["pixel_values"], targets=[1], layers=[-1])
    for b, sample in enumerate(samples):
        for view, maps in zip(sample.views, last[b]):
            ref = expected[b][1, -1, view.positions].reshape(1, *view.grid)
            torch.testing.assert_close(maps, ref, rtol=1e-4, atol=TOL * float(ref.abs().max()))


@pytest.mark.parametrize("name", FAMILIES)
def test_sdpa_equals_eager_and_batch_equals_single(name: str) -> None:
    from test_side_effects import assert_unchanged, snapshot

    batch, answers = case(name, seed=3)
    model = model_for(name, "sdpa")
    with torch.no_grad():  # transformers installs its output-capturing hooks on first use
        model(**teacher_forced(batch, answers)[0], use_cache=False)
    before = snapshot(model)
    together = explained_for(model, batch, answers).source_maps(batch["pixel_values"])
    assert_unchanged(before, snapshot(model))
    eager = explained_for(model_for(name, "eager"), batch, answers).source_maps(
        batch["pixel_values"]
    )
    placeholder = PLACEHOLDER.get(name, "<image>")
    sizes = IMAGE_SIZES[name]
    texts = [f"a {placeholder} what is this ?", f"USER: {placeholder} b"]
    images = [random_image(*sizes[0], 3), random_image(*sizes[1], 4)]
    right = inputs(name, images, texts, side="right")
    assert bool((right["attention_mask"][:, 0] == 1).all())
    assert not bool((right["attention_mask"][:, -1] == 1).all()), "no right padding"
    right_maps = explained_for(model, right, answers).source_maps(right["pixel_values"])
    for b in range(2):
        torch.testing.assert_close(right_maps[b][0], together[b][0], rtol=1e-4, atol=1e-4)
        for m, e in zip(together[b], eager[b]):
            torch.testing.assert_close(m, e, rtol=1e-4, atol=1e-4)
        alone = inputs(name, [random_image(*sizes[b], 3 + b)], [texts[b]])
        single = explained_for(model, alone, answers[b : b + 1]).source_maps(alone["pixel_values"])
        assert len(single[0]) == len(together[b]) == 1
        assert single[0][0].shape[-2:] == tuple(IMAGE_SIZES[name][b]) or name in (
            "idefics3", "smolvlm", "mistral3",
        )  # fmt: skip
        torch.testing.assert_close(single[0][0], together[b][0], rtol=1e-4, atol=1e-4)


def half_image(height: int, width: int) -> Tensor:
    """White on the left half, black on the right."""
    image = torch.zeros(3, height, width)
    image[:, :, : width // 2] = 1.0
    return image


@pytest.mark.parametrize("size", [(50, 80), (90, 40)])
def test_half_image_map_lies_on_its_half(size: Tuple[int, int]) -> None:
    """A LLaVA-NeXT whose image tokens respond only to white pixels, on an image white on
    the left and black on the right: the first layer's map (where black tokens carry
    exactly nothing) lies on the left half of the original image, from the base view and
    the crops alike (the crops' padding cut off)."""
    model = white_tokens_only(llava_next("sdpa", vision_layers=1, seed=5))
    height, width = size
    batch = inputs("llava_next", [half_image(height, width)], ["a <image> what is this ?"])
    answers = torch.tensor([[2, 5, 7]])
    explained = explained_for(model, batch, answers)
    sample = explained.views(batch["pixel_values"])[0]
    assert [v.name for v in sample.views] == ["base", "crops"]
    per_view = explained.view_maps(batch["pixel_values"], layers=[0])[0]
    for view, maps in zip(sample.views, per_view):
        g_h, g_w = view.grid
        top, left, bottom, right = view.box  # pixels of the original image
        rows = top + (torch.arange(g_h) + 0.5) * (bottom - top) / g_h
        cols = left + (torch.arange(g_w) + 0.5) * (right - left) / g_w
        cell = (right - left) / g_w
        white = cols < width / 2 - cell / 2
        black = cols > width / 2 + cell / 2
        inside = (rows > 0) & (rows < height)  # crops' rows over the padding stay off
        assert bool((maps[..., black] == 0).all()), f"{view.name}: a black column is on"
        assert bool((maps[:, inside][..., white] > 0).all()), f"{view.name}: white is off"
        assert bool((maps[:, ~inside] == 0).all()), f"{view.name}: padding is on"
    (canvas,) = explained.source_maps(batch["pixel_values"], layers=[0], normalize=False)[0]
    assert canvas.shape == (3, height, width)
    base_cell = width / sample.views[0].grid[1]
    right_of = int(width / 2 + 1.5 * base_cell) + 1
    left_of = int(width / 2 - 1.5 * base_cell)
    assert bool((canvas[..., right_of:] == 0).all())
    assert bool((canvas[..., :left_of] > 0).all())
    assert_map = legrad_map(explained, batch, layers=[0])
    assert assert_map.shape == (1, 3, height, width)
    assert bool((assert_map[..., right_of:] == 0).all())
    assert bool((assert_map[..., :left_of] > 0).all())


def legrad_map(explained: Any, batch: Dict[str, Tensor], layers: List[int]) -> Tensor:
    from captum_legrad import LeGrad

    return LeGrad(explained, layers=layers).attribute_multi(
        batch["pixel_values"], targets=range(3), output="map"
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_explain_answer(name: str) -> None:
    """explain_answer with the family's real processor: one map per answer token on the
    original image, equal to the normalised source map."""
    from captum_legrad import explain_answer

    model = model_for(name, "sdpa")
    height, width = IMAGE_SIZES[name][0]
    image = random_image(height, width, 7)
    placeholder = PLACEHOLDER.get(name, "<image>")
    result = explain_answer(
        model, processor(name), image, f"a {placeholder} what is this ?", answer="a b c"
    )
    assert result.tokens == ["a", "b", "c"]
    assert result.maps.shape == (3, height, width)
    assert result.answer_map.shape == (height, width)
    flat = result.maps.flatten(1)
    assert bool((flat.max(1).values == 1).all()) and bool((flat.min(1).values == 0).all())
    import copy

    speaking: Any = copy.deepcopy(model)  # answers with words: special tokens' logits at 0
    with torch.no_grad():
        speaking.lm_head.weight[len(WORDS) :] = 0
        speaking.lm_head.weight[:2] = 0  # nor <unk>, <pad>
    generated = explain_answer(
        speaking, processor(name), image, f"a {placeholder} what is this ?", max_new_tokens=2
    )
    assert generated.maps.shape[1:] == (height, width)


def test_output_forms_and_refusals() -> None:
    """``output="grid"`` for one view per sample (Mistral 3) is the view's raw map;
    several views per sample and ``output="input"`` are refused naming the way out; LLaVA
    with CLIP and strategy "full" (a CLS token in every crop) is refused."""
    from captum_legrad import AnswerLogits, LeGrad, UnsupportedModelError

    batch, answers = case("mistral3", seed=4)
    explained = explained_for(model_for("mistral3", "sdpa"), batch, answers)
    grid = LeGrad(explained).attribute_multi(
        batch["pixel_values"], targets=range(3), output="grid", normalize=False
    )
    per_view = explained.view_maps(batch["pixel_values"], targets=range(3))
    for b in range(2):
        (own,) = per_view[b]
        g_h, g_w = own.shape[-2:]
        torch.testing.assert_close(grid[b, :, :g_h, :g_w], own, rtol=1e-5, atol=1e-7)
        assert bool((grid[b, :, g_h:] == 0).all()) and bool((grid[b, :, :, g_w:] == 0).all())
    batch, answers = case("llava_next", seed=4)
    explained = explained_for(model_for("llava_next", "sdpa"), batch, answers)
    with pytest.raises(ValueError, match="view_maps"):
        LeGrad(explained).attribute_multi(batch["pixel_values"], targets=[0], output="grid")
    model = model_for("llava_next", "sdpa")
    full: Any = type(model)(model.config.__class__(**{
        **model.config.to_dict(), "vision_feature_select_strategy": "full"
    }))  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="CLS"):
        AnswerLogits(full, batch["input_ids"], answers)
    with pytest.raises(ValueError, match="image_sizes"):
        AnswerLogits(model, batch["input_ids"], answers, batch["attention_mask"])(
            batch["pixel_values"]
        )


@pytest.mark.parametrize("name", ["llava_next", "idefics3", "mistral3"])
def test_input_form(name: str) -> None:
    """``output="input"`` (``attribute``'s default): the canvas map seen through every
    frame of ``pixel_values``: Mistral 3's image in its top-left corner, LLaVA-NeXT's base
    view and Idefics3's global image the whole canvas resized."""
    import torch.nn.functional as F

    from captum_legrad import LeGrad

    batch, answers = case(name, seed=6)
    pixels = batch["pixel_values"]
    legrad = LeGrad(explained_for(model_for(name, "sdpa"), batch, answers))
    maps = legrad.attribute_multi(pixels, targets=range(3))  # (B, 3, H, W), padded
    form = legrad.attribute_multi(pixels, targets=range(3), output="input")
    assert form.shape == (pixels.shape[0], 3, *pixels.shape[1:])
    one = legrad.attribute(pixels, target=1)
    assert one.shape == pixels.shape
    torch.testing.assert_close(one, form[:, 1])
    sources = legrad.forward_func.views(pixels)
    for b in range(2):
        h, w = sources[b].sources[0].size
        if name == "mistral3":
            torch.testing.assert_close(form[b, :, 0, :h, :w], maps[b, :, :h, :w])
            assert bool((form[b, :, :, h:] == 0).all()) and bool((form[b, :, :, :, w:] == 0).all())
            continue
        if name == "llava_next":
            frame = form[b, :, 0, 0]  # the base view
        else:
            real = int((pixels[b].flatten(1) != 0).any(1).sum())
            frame = form[b, :, real - 1, 0]  # the global image
        canvas = maps[b, :, :h, :w].unsqueeze(0)
        size = pixels.shape[-2:]
        resized = F.interpolate(canvas, size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(frame, resized[0], rtol=1e-4, atol=1e-5)


def test_half_image_input_form() -> None:
    """The half-image model's map in ``pixel_values``' own shape lies on the white pixels of
    every frame (the base view and each crop, padding included)."""
    from captum_legrad import LeGrad

    model = white_tokens_only(llava_next("sdpa", vision_layers=1, seed=5))
    batch = inputs("llava_next", [half_image(50, 80)], ["a <image> what is this ?"])
    explained = explained_for(model, batch, torch.tensor([[2, 5, 7]]))
    form = LeGrad(explained, layers=[0]).attribute(batch["pixel_values"], target=0)
    pixels = batch["pixel_values"]
    for f in range(pixels.shape[1]):
        white = pixels[0, f, 0] > 0.99
        black = pixels[0, f, 0] < 0.01
        on = form[0, f, 0]
        bright = float(on[white].mean()) if bool(white.any()) else 0.0
        dark = float(on[black].mean()) if bool(black.any()) else 0.0
        if bool(white.any()):
            assert bright > 0.3, f"frame {f}: white pixels are off"
        assert dark < (0.25 * bright if bool(white.any()) else 0.05), f"frame {f}: black is on"
