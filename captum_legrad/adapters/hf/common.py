"""What the Hugging Face adapters share: finding a model's classes, layers, attention modules
and vision tower across transformers 4.4x and 5.x, its input-size mechanism, and the
:class:`~captum_legrad.ViTSpec` of a plain vision encoder (:func:`build_spec`).

Public inside :mod:`captum_legrad.adapters.hf`: :mod:`.vision`, :mod:`.families` and
:mod:`.siglip2` use these.
"""

from __future__ import annotations

import inspect
import itertools
import sys
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from torch import Tensor, nn

from ..._core.hooks import ScopedHooks
from ..._core.resize import InputSize
from ...errors import UnsupportedModelError
from ...spec import LayoutRule, TokenInput, ViTSpec
from ..common import floor_grid, mlp_outputs, pair

__all__ = [
    "Readout",
    "MLP_OUTPUTS",
    "model_classes",
    "is_instance_of",
    "version_at_least",
    "child",
    "layers_of",
    "attention_of",
    "vision_tower",
    "patch_size_of",
    "image_features_forward",
    "returns_features",
    "input_size_of",
    "build_spec",
]

Readout = Callable[[Tensor], Tensor]

#: Layer classes whose output is ``x + t(W h + b)`` (:func:`~..common.mlp_outputs`), and
#: the path of that last MLP linear: transformers 5 (``ViTMLP``) and 4 (``ViTOutput``).
MLP_OUTPUTS: Mapping[str, Sequence[str]] = {
    "ViTLayer": ("mlp.fc2", "output.dense"),
    "CLIPEncoderLayer": ("mlp.fc2",),
    "SiglipEncoderLayer": ("mlp.fc2",),
    "Dinov2Layer": ("mlp.fc2",),
    "Dinov2WithRegistersLayer": ("mlp.fc2",),
}


def model_classes(module: str, *names: str) -> Tuple[type, ...]:
    """The named classes of ``transformers.models.<module>``, if that module is imported.

    A model of a class can only exist once its module has been imported, so nothing is
    imported here; classes missing from the installed version are skipped.
    """
    loaded = sys.modules.get(f"transformers.models.{module}")
    if loaded is None:
        return ()
    return tuple(cls for name in names if isinstance(cls := getattr(loaded, name, None), type))


def is_instance_of(model: nn.Module, module: str, *names: str) -> bool:
    """Whether ``model`` is one of the named classes of ``transformers.models.<module>``."""
    classes = model_classes(module, *names)
    return bool(classes) and isinstance(model, classes)


def version_at_least(major: int, minor: int) -> bool:
    """Whether the imported transformers is at least ``major.minor``."""
    version = str(getattr(sys.modules.get("transformers"), "__version__", "0.0"))
    parts = []
    for part in version.split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        parts.append(int(digits or 0))
    return tuple(parts) >= (major, minor)


def child(module: nn.Module, path: str) -> Optional[nn.Module]:
    current: Any = module
    for name in path.split("."):
        current = getattr(current, name, None)
        if not isinstance(current, nn.Module):
            return None
    return current


def layers_of(model: nn.Module) -> Tuple[nn.Module, ...]:
    """The transformer layers: ``layers`` (ViT 5.x), ``encoder.layers``, ``encoder.layer``,
    ``model.layer`` (DINOv3)."""
    for path in ("layers", "encoder.layers", "encoder.layer", "model.layer"):
        found = child(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return tuple(found)
    raise UnsupportedModelError(
        f"{type(model).__name__}: no transformer layers at .layers, .encoder.layers, "
        ".encoder.layer or .model.layer (an unknown transformers version?); pass "
        "spec=ViTSpec(...)."
    )


def attention_of(block: nn.Module, name: str) -> nn.Module:
    """The module computing a layer's attention probabilities.

    transformers 5.x: ``block.<name>`` itself. 4.x ViT / DINOv2 wrap it as
    ``block.attention.attention`` (the self-attention beside the output projection).
    """
    outer = getattr(block, name)
    inner = getattr(outer, "attention", None)
    if isinstance(inner, nn.Module) and isinstance(getattr(outer, "output", None), nn.Module):
        return inner
    return outer


def vision_tower(model: nn.Module) -> nn.Module:
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


def patch_size_of(embeddings: Any, config: Any) -> Tuple[int, int]:
    patch_embeddings = getattr(embeddings, "patch_embeddings", None)
    size = getattr(patch_embeddings, "patch_size", None)
    if size is None:
        size = getattr(embeddings, "patch_size", None)
    if size is None:
        size = config.patch_size
    return pair(size)


def has_text_tower(model: Any) -> bool:
    """Whether a transformers model (or model class) is an image-text model: it has
    ``get_image_features`` and ``get_text_features`` (CLIP, SigLIP, SigLIP2, MetaCLIP 2,
    AIMv2, ...). The one rule: the adapters run such a model through
    ``get_image_features``, and :class:`~captum_legrad.ImageTextSimilarity` embeds prompts
    with ``get_text_features``."""
    return callable(getattr(model, "get_image_features", None)) and callable(
        getattr(model, "get_text_features", None)
    )


def image_features_forward(model: nn.Module) -> Optional[Callable[..., Any]]:
    """``get_image_features`` of a multimodal model, whose forward takes text first."""
    method = getattr(model, "get_image_features", None)
    return method if has_text_tower(model) else None


def returns_features(model: nn.Module) -> bool:
    """Whether ``model``'s output is an embedding rather than class scores: every class but
    the ``*ForImageClassification*``, ``*ForVideoClassification`` and
    ``*ForAudioClassification`` ones (base models, vision models, multimodal models through
    ``get_image_features``), and a classifier built with ``num_labels=0`` (its heads are
    identities)."""
    if not any(kind in type(model).__name__ for kind in _CLASSIFIERS):
        return True
    heads = [getattr(model, name, None) for name in ("classifier", "cls_classifier")]
    heads = [getattr(head, "dense", head) for head in heads]  # AST's head: norm, then dense
    modules = [head for head in heads if isinstance(head, nn.Module)]
    return bool(modules) and all(isinstance(head, nn.Identity) for head in modules)


_CLASSIFIERS = ("ForImageClassification", "ForVideoClassification", "ForAudioClassification")

_FLAG = "interpolate_pos_encoding"


def fixed_grid(root: nn.Module, embeddings: Any) -> bool:
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


def cannot_resize(embeddings: Any, native: Tuple[int, int]) -> Callable[..., None]:
    """Position information for one grid only (:func:`fixed_grid`: transformers 4.40's
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


def input_size_of(
    root: nn.Module, embeddings: Any, config: Any, patch_size: Tuple[int, int]
) -> InputSize:
    """The embeddings' own ``interpolate_pos_encoding``, switched on for the call."""
    native = pair(config.image_size)
    forward = getattr(type(embeddings), "forward", None)
    names = list(inspect.signature(forward).parameters) if forward is not None else []
    if _FLAG not in names:
        if fixed_grid(root, embeddings):
            return InputSize(native, patch_size, enter=cannot_resize(embeddings, native))
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


def build_spec(
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
    blocks = layers_of(root)
    patch_size = patch_size_of(vit.embeddings, vit.config)

    return ViTSpec(
        family="hf",
        token_mean_readout=True,
        root=root,
        blocks=blocks,
        attentions=tuple(attention_of(block, attention_name) for block in blocks),
        readout=mean_readout,
        model_readout=model_readout,
        num_prefix_tokens=num_prefix_tokens,
        patch_size=patch_size,
        grid=floor_grid(patch_size),
        pool_attention=pool_attention,
        image_forward=image_forward,
        token_input=TokenInput("hidden_states"),
        input_size=input_size_of(root, vit.embeddings, vit.config, patch_size),
        layout=layout,
        mlp_outputs=mlp_outputs(blocks, MLP_OUTPUTS),
    )
