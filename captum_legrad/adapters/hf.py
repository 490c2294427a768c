"""Hugging Face ``transformers`` adapter: ViT, CLIP, MetaCLIP 2, DINOv2 (with registers) and
SigLIP here; DeiT, BEiT, data2vec-vision, ViT-MSN, I-JEPA, DINOv3, ViT-MAE and AIMv2 in
:mod:`captum_legrad.adapters.hf_families`, which also refuses the hierarchical families.

Recognised here (transformers 4.4x and 5.x):

* ``ViTForImageClassification``, ``ViTModel``;
* ``CLIPModel``, ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``,
  ``CLIPForImageClassification`` (and 4.x's inner ``CLIPVisionTransformer``);
* ``Dinov2Model``, ``Dinov2ForImageClassification``, ``Dinov2WithRegistersModel``,
  ``Dinov2WithRegistersForImageClassification``;
* ``SiglipModel``, ``SiglipVisionModel``, ``SiglipForImageClassification`` (and 4.x's
  inner ``SiglipVisionTransformer``);
* ``MetaClip2Model``, ``MetaClip2VisionModel``, ``MetaClip2VisionModelWithProjection``,
  ``MetaClip2ForImageClassification`` (CLIP's architecture and readouts).
* SigLIP2 (NaFlex, per-sample grids): :mod:`captum_legrad.adapters.hf_siglip2`.

The attention implementation the user chose (``"sdpa"`` or ``"eager"``) is left as it
is: the attention probabilities are obtained inside each layer's attention module by
:mod:`captum_legrad.capture`.

The readouts, ``pooling="model"`` (equal to the model's real output at the last layer)
and ``pooling="mean"`` (``z = Z.mean(1)``, the final norm, the head):

- ViT classification: ``classifier(layernorm(Z)[:, 0])`` / ``classifier(layernorm(z))``;
- ViTModel: ``pooler(layernorm(Z))`` / ``pooler`` on ``layernorm(z)`` as token 0 (without
  a pooler: ``layernorm(Z)[:, 0]`` / ``layernorm(z)``);
- CLIP vision: ``post_layernorm(Z[:, 0])`` / ``post_layernorm(z)``, then ``proj``;
- CLIP classification: ``classifier(Z[:, 1:].mean(1))`` / ``classifier(z)``;
- DINOv2 classification: ``classifier(cat(y[:, 0], y[:, P:].mean(1)))`` /
  ``classifier(cat(n, n))``; DINOv2 model: ``y[:, 0]`` / ``n``;
- SigLIP with its MAP head: ``head(post_layernorm(Z))`` for both (an attention pool);
  without a head: ``post_layernorm(Z).mean(1)`` / ``post_layernorm(z)``;
- SigLIP classification: ``classifier(post_layernorm(Z).mean(1))`` /
  ``classifier(post_layernorm(z))``.

(``y = layernorm(Z)``, ``n = layernorm(z)``, ``proj`` = ``visual_projection`` where the
model has one.) Multimodal models (``CLIPModel``, ``SiglipModel``) take text as their
first forward argument: ``LeGrad(model)`` runs ``get_image_features`` instead
(``ViTSpec.image_forward``; image-embedding dimensions are the targets), and
:class:`~captum_legrad.ImageTextSimilarity` makes the prompts the targets.

Other input sizes: the model's own ``interpolate_pos_encoding`` is switched on for the
call, by a forward pre-hook of the embeddings module acting in the calling thread only
(the user need not pass it); DINOv2 interpolates by itself.
"""

from __future__ import annotations

import inspect
import itertools
import sys
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..hooks import ScopedHooks
from ..resize import InputSize
from ..spec import LayoutRule, TokenInput, ViTSpec
from .common import floor_grid, pair

__all__ = ["match"]

Readout = Callable[[Tensor], Tensor]


def _classes(module: str, *names: str) -> Tuple[type, ...]:
    """The named classes of ``transformers.models.<module>``, if that module is imported.

    A model of a class can only exist once its module has been imported, so nothing is
    imported here; classes missing from the installed version are skipped.
    """
    loaded = sys.modules.get(f"transformers.models.{module}")
    if loaded is None:
        return ()
    return tuple(cls for name in names if isinstance(cls := getattr(loaded, name, None), type))


def _is_instance_of(model: nn.Module, module: str, *names: str) -> bool:
    """Whether ``model`` is one of the named classes of ``transformers.models.<module>``."""
    classes = _classes(module, *names)
    return bool(classes) and isinstance(model, classes)


def _version_at_least(major: int, minor: int) -> bool:
    """Whether the imported transformers is at least ``major.minor``."""
    version = str(getattr(sys.modules.get("transformers"), "__version__", "0.0"))
    parts = []
    for part in version.split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        parts.append(int(digits or 0))
    return tuple(parts) >= (major, minor)


def _child(module: nn.Module, path: str) -> Optional[nn.Module]:
    current: Any = module
    for name in path.split("."):
        current = getattr(current, name, None)
        if not isinstance(current, nn.Module):
            return None
    return current


def _blocks(model: nn.Module) -> Tuple[nn.Module, ...]:
    """The transformer layers: ``layers`` (ViT 5.x), ``encoder.layers``, ``encoder.layer``,
    ``model.layer`` (DINOv3)."""
    for path in ("layers", "encoder.layers", "encoder.layer", "model.layer"):
        found = _child(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return tuple(found)
    raise UnsupportedModelError(
        f"{type(model).__name__}: no transformer layers at .layers, .encoder.layers, "
        ".encoder.layer or .model.layer (an unknown transformers version?); pass "
        "spec=ViTSpec(...)."
    )


def _attention(block: nn.Module, name: str) -> nn.Module:
    """The module computing a layer's attention probabilities.

    transformers 5.x: ``block.<name>`` itself. 4.x ViT / DINOv2 wrap it as
    ``block.attention.attention`` (the self-attention beside the output projection).
    """
    outer = getattr(block, name)
    inner = getattr(outer, "attention", None)
    if isinstance(inner, nn.Module) and isinstance(getattr(outer, "output", None), nn.Module):
        return inner
    return outer


def _vision_tower(model: nn.Module) -> nn.Module:
    """The module holding ``embeddings``, ``encoder`` and ``post_layernorm`` (CLIP, SigLIP).

    transformers 5.x: ``CLIPVisionModel`` / ``SiglipVisionModel`` itself; 4.x: their
    ``vision_model`` (a ``*VisionTransformer``). Multimodal and projection models hold
    one of these as ``vision_model``.
    """
    current = model
    while not (hasattr(current, "encoder") and hasattr(current, "post_layernorm")):
        inner = getattr(current, "vision_model", None)
        if not isinstance(inner, nn.Module):
            raise UnsupportedModelError(
                f"{type(model).__name__}: no vision tower (embeddings, encoder, "
                "post_layernorm) found; pass spec=ViTSpec(...)."
            )
        current = inner
    return current


def _patch_size(embeddings: Any, config: Any) -> Tuple[int, int]:
    patch_embeddings = getattr(embeddings, "patch_embeddings", None)
    size = getattr(patch_embeddings, "patch_size", None)
    if size is None:
        size = getattr(embeddings, "patch_size", None)
    if size is None:
        size = config.patch_size
    return pair(size)


def _image_forward(model: nn.Module) -> Optional[Callable[..., Any]]:
    """``get_image_features`` of a multimodal model, whose forward takes text first."""
    method = getattr(model, "get_image_features", None)
    return method if callable(method) and hasattr(model, "get_text_features") else None


_FLAG = "interpolate_pos_encoding"


def _fixed_grid(root: nn.Module, embeddings: Any) -> bool:
    """Position information learned for one grid and no way to interpolate it: a position
    table without ``interpolate_pos_encoding``, or a relative-position bias whose forward
    takes no window size (BEiT / data2vec before transformers 4.42)."""
    for module in root.modules():
        if type(module).__name__.endswith("RelativePositionBias"):
            forward = getattr(type(module), "forward", None)
            if forward is not None and len(inspect.signature(forward).parameters) <= 1:
                return True
    if callable(getattr(embeddings, _FLAG, None)):
        return False
    for name in ("position_embeddings", "position_embedding"):
        if isinstance(getattr(embeddings, name, None), (nn.Parameter, nn.Embedding)):
            return True
    return False


def _cannot_resize(embeddings: Any, native: Tuple[int, int]) -> Callable[..., None]:
    """Position information for one grid only (:func:`_fixed_grid`: transformers 4.40's
    CLIP, SigLIP, BEiT, DeiT, ViT-MAE; AIMv2 with ``is_native=False``):
    the model runs at its native size only, and other sizes are refused with what to do."""

    def enter(hooks: ScopedHooks, size: Tuple[int, int]) -> None:
        import transformers

        raise ValueError(
            f"The input is {size[0]}x{size[1]} pixels but this model was built for "
            f"{native[0]}x{native[1]}, and {type(embeddings).__name__} of transformers "
            f"{transformers.__version__} cannot interpolate its learned position embedding "
            f"(or relative-position bias) to another grid. Resize the images to "
            f"{native[0]}x{native[1]}. (SigLIP from transformers 4.41, DeiT, BEiT and ViT-MAE "
            "from 4.42 and CLIP from 4.46 interpolate: upgrade transformers for those.)"
        )

    return enter


def _input_size(
    root: nn.Module, embeddings: Any, config: Any, patch_size: Tuple[int, int]
) -> InputSize:
    """The embeddings' own ``interpolate_pos_encoding``, switched on for the call."""
    native = pair(config.image_size)
    forward = getattr(type(embeddings), "forward", None)
    names = list(inspect.signature(forward).parameters) if forward is not None else []
    if _FLAG not in names:
        if _fixed_grid(root, embeddings):
            return InputSize(native, patch_size, enter=_cannot_resize(embeddings, native))
        # DINOv2 interpolates whenever the size differs, DINOv3's RoPE takes any size
        return InputSize(native, patch_size, mechanism="the model's own interpolation")
    position = names.index(_FLAG) - 1  # without self

    def switch_on(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if len(args) > position:
            return (*args[:position], True, *args[position + 1 :]), kwargs
        return args, {**kwargs, _FLAG: True}

    def enter(hooks: ScopedHooks, size: Tuple[int, int]) -> None:
        hooks.forward_pre(embeddings, switch_on, with_kwargs=True)

    return InputSize(
        native,
        patch_size,
        enter=enter,
        mechanism="the model's own interpolate_pos_encoding=True for the call",
    )


def _spec(
    root: nn.Module,
    attention_name: str,
    *,
    mean_readout: Optional[Readout],
    model_readout: Readout,
    num_prefix_tokens: int,
    pool_attention: Optional[nn.Module] = None,
    image_forward: Optional[Callable[..., Any]] = None,
    layout: Optional[LayoutRule] = None,
) -> ViTSpec:
    """The spec of an HF vision encoder ``root`` whose layers hold ``<attention_name>``."""
    vit: Any = root
    blocks = _blocks(root)
    patch_size = _patch_size(vit.embeddings, vit.config)

    return ViTSpec(
        family="hf",
        token_mean_readout=True,
        root=root,
        blocks=blocks,
        attentions=tuple(_attention(block, attention_name) for block in blocks),
        readout=mean_readout,
        model_readout=model_readout,
        num_prefix_tokens=num_prefix_tokens,
        patch_size=patch_size,
        grid=floor_grid(patch_size),
        pool_attention=pool_attention,
        image_forward=image_forward,
        token_input=TokenInput("hidden_states"),
        input_size=_input_size(root, vit.embeddings, vit.config, patch_size),
        layout=layout,
    )


# ---------------------------------------------------------------------------- ViT


def _match_vit(model: nn.Module) -> Optional[ViTSpec]:
    if _is_instance_of(model, "vit.modeling_vit", "ViTForImageClassification"):
        classifier_model: Any = model
        vit: Any = classifier_model.vit

        def cls_logits(tokens: Tensor) -> Tensor:
            return classifier_model.classifier(vit.layernorm(tokens)[:, 0])

        def mean_logits(tokens: Tensor) -> Tensor:
            return classifier_model.classifier(vit.layernorm(tokens.mean(dim=1)))

        return _spec(
            vit,
            "attention",
            mean_readout=mean_logits,
            model_readout=cls_logits,
            num_prefix_tokens=1,
        )
    if _is_instance_of(model, "vit.modeling_vit", "ViTModel"):
        base: Any = model
        pooler: Optional[nn.Module] = base.pooler

        def model_pooled(tokens: Tensor) -> Tensor:
            normed = base.layernorm(tokens)
            return pooler(normed) if pooler is not None else normed[:, 0]

        def mean_pooled(tokens: Tensor) -> Tensor:
            # The pooler reads token 0: give it the normalised mean token there.
            normed = base.layernorm(tokens.mean(dim=1))
            return pooler(normed.unsqueeze(1)) if pooler is not None else normed

        return _spec(
            base,
            "attention",
            mean_readout=mean_pooled,
            model_readout=model_pooled,
            num_prefix_tokens=1,
        )
    return None


# ---------------------------------------------------------------------------- CLIP


def _match_clip(
    model: nn.Module, module: str = "clip.modeling_clip", prefix: str = "CLIP"
) -> Optional[ViTSpec]:
    """CLIP, and architectures that are CLIP's under another name (MetaCLIP 2)."""
    if _is_instance_of(model, module, f"{prefix}ForImageClassification"):
        classifier_model: Any = model
        tower = _vision_tower(model)

        def patch_mean_logits(tokens: Tensor) -> Tensor:
            return classifier_model.classifier(tokens[:, 1:].mean(dim=1))

        def mean_logits(tokens: Tensor) -> Tensor:
            return classifier_model.classifier(tokens.mean(dim=1))

        return _spec(
            tower,
            "self_attn",
            mean_readout=mean_logits,
            model_readout=patch_mean_logits,
            num_prefix_tokens=1,
        )
    if not _is_instance_of(
        model,
        module,
        f"{prefix}Model",
        f"{prefix}VisionModel",
        f"{prefix}VisionModelWithProjection",
        f"{prefix}VisionTransformer",
    ):
        return None
    tower = _vision_tower(model)
    vision: Any = tower
    projection: Optional[nn.Module] = getattr(model, "visual_projection", None)

    def embed(pooled: Tensor) -> Tensor:
        pooled = vision.post_layernorm(pooled)
        return projection(pooled) if projection is not None else pooled

    def cls_embedding(tokens: Tensor) -> Tensor:
        return embed(tokens[:, 0])

    def mean_embedding(tokens: Tensor) -> Tensor:
        return embed(tokens.mean(dim=1))

    return _spec(
        tower,
        "self_attn",
        mean_readout=mean_embedding,
        model_readout=cls_embedding,
        num_prefix_tokens=1,
        image_forward=_image_forward(model),
    )


# ---------------------------------------------------------------------------- DINOv2


def _match_dinov2(model: nn.Module) -> Optional[ViTSpec]:
    plain = "dinov2.modeling_dinov2"
    registers = "dinov2_with_registers.modeling_dinov2_with_registers"
    if _is_instance_of(model, plain, "Dinov2ForImageClassification") or _is_instance_of(
        model, registers, "Dinov2WithRegistersForImageClassification"
    ):
        classifier_model: Any = model
        base: Any = getattr(classifier_model, "dinov2", None)
        if base is None:
            base = classifier_model.dinov2_with_registers
    elif _is_instance_of(model, plain, "Dinov2Model") or _is_instance_of(
        model, registers, "Dinov2WithRegistersModel"
    ):
        classifier_model, base = None, model
    else:
        return None
    n_prefix = 1 + int(getattr(base.config, "num_register_tokens", 0) or 0)
    # The classifier averages the patch tokens; before transformers 4.52 (PR #37836) the
    # registers were averaged with them.
    first_patch = n_prefix if _version_at_least(4, 52) else 1

    if classifier_model is None:

        def model_readout(tokens: Tensor) -> Tensor:
            return base.layernorm(tokens)[:, 0]

        def mean_readout(tokens: Tensor) -> Tensor:
            return base.layernorm(tokens.mean(dim=1))

    else:

        def model_readout(tokens: Tensor) -> Tensor:
            normed = base.layernorm(tokens)
            features = torch.cat([normed[:, 0], normed[:, first_patch:].mean(dim=1)], dim=1)
            return classifier_model.classifier(features)

        def mean_readout(tokens: Tensor) -> Tensor:
            pooled = base.layernorm(tokens.mean(dim=1))
            return classifier_model.classifier(torch.cat([pooled, pooled], dim=1))

    return _spec(
        base,
        "attention",
        mean_readout=mean_readout,
        model_readout=model_readout,
        num_prefix_tokens=n_prefix,
    )


# ---------------------------------------------------------------------------- SigLIP


def _match_siglip(model: nn.Module) -> Optional[ViTSpec]:
    module = "siglip.modeling_siglip"
    if _is_instance_of(model, module, "SiglipForImageClassification"):
        classifier_model: Any = model
        tower = _vision_tower(model)
        norm: Any = tower.post_layernorm
        # The classifier averages all tokens; transformers < 4.43 averaged them from the
        # second on (``sequence_output[:, 1:]``, although SigLIP has no class token): the
        # model's own readout is what that release computes. Its forward pools inline, so
        # there is no attribute to detect this by.
        first = 0 if _version_at_least(4, 43) else 1

        def norm_then_mean_logits(tokens: Tensor) -> Tensor:
            return classifier_model.classifier(norm(tokens)[:, first:].mean(dim=1))

        def mean_then_norm_logits(tokens: Tensor) -> Tensor:
            return classifier_model.classifier(norm(tokens.mean(dim=1)))

        return _spec(
            tower,
            "self_attn",
            mean_readout=mean_then_norm_logits,
            model_readout=norm_then_mean_logits,
            num_prefix_tokens=0,
        )
    if not _is_instance_of(
        model, module, "SiglipModel", "SiglipVisionModel", "SiglipVisionTransformer"
    ):
        return None
    tower = _vision_tower(model)
    vision: Any = tower
    attention_pool: Optional[nn.Module] = getattr(vision, "head", None)
    if not getattr(vision, "use_head", attention_pool is not None):
        attention_pool = None
    if attention_pool is not None:
        pool: nn.Module = attention_pool

        def pooled(tokens: Tensor) -> Tensor:
            return pool(vision.post_layernorm(tokens))

        return _spec(
            tower,
            "self_attn",
            mean_readout=None,  # an attention pool has no mean-pooled variant
            model_readout=pooled,
            num_prefix_tokens=0,
            pool_attention=pool,
            image_forward=_image_forward(model),
        )

    def norm_then_mean(tokens: Tensor) -> Tensor:
        return vision.post_layernorm(tokens).mean(dim=1)

    def mean_then_norm(tokens: Tensor) -> Tensor:
        return vision.post_layernorm(tokens.mean(dim=1))

    return _spec(
        tower,
        "self_attn",
        mean_readout=mean_then_norm,
        model_readout=norm_then_mean,
        num_prefix_tokens=0,
        image_forward=_image_forward(model),
    )


def _match_metaclip2(model: nn.Module) -> Optional[ViTSpec]:
    return _match_clip(model, "metaclip_2.modeling_metaclip_2", "MetaClip2")


_MATCHERS = (_match_vit, _match_clip, _match_metaclip2, _match_dinov2, _match_siglip)


def match(model: nn.Module) -> Optional[ViTSpec]:
    """Describe a transformers vision model of a recognised family; ``None`` otherwise.

    Raises:
        UnsupportedModelError: the model is of a family LeGrad recognises but cannot
            explain (hierarchical or local attention: Swin, Hiera, PVT, ...; see
            :mod:`captum_legrad.adapters.hf_families`).
    """
    if not any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__):
        return None
    from . import hf_families

    for matcher in (*_MATCHERS, hf_families.match):
        spec = matcher(model)
        if spec is not None:
            return spec
    from .hf_siglip2 import match as match_siglip2  # NaFlex: per-sample grids

    return match_siglip2(model)
