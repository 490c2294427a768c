"""timm families beyond ``VisionTransformer`` / ``Eva`` (``docs/models.md``), and the
refusals.

* ``Cait``: the self-attention blocks (talking heads: ``A^l`` is the head mix after the
  softmax, the tensor multiplied with ``V``) and the class-attention blocks (one query,
  the class token; the patch tokens are cut from the graph there).
* ``ConVit``: GPSA blocks (``A^l`` is the gated, renormalised mix of the patch and the
  positional softmax) and the MHSA blocks after the class token joins.
* ``Xcit``: the class-attention blocks only (XCA attends over channels, not tokens).
* ``VisionTransformerSAM``: the global-attention blocks only (windowed blocks attend
  within padded windows).
* The VLM vision towers timm ships as classifiers: ``Qwen3VitClassifier``,
  ``Gemma4VitClassifier``, ``DeepseekVitClassifier`` (RoPE, an ``encoder`` wrapper;
  Gemma4's ``encoder_pool="soft"`` through the model's own soft-token pooler).
* For ``VisionTransformer`` blocks (:func:`block_attentions`): ``ParallelThingsBlock``'s
  branches as head groups of one attention, and differential attention's ``A`` through
  ``O = A·V`` at the input of its ``sub_norm``.

Every other timm model (hierarchical, windowed, convolutional, MLP) is refused with
:class:`~captum_legrad.errors.UnsupportedModelError` saying why. Classes an old timm
lacks are simply not matched.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ...errors import UnsupportedModelError
from ...spec import TokenInput, ViTSpec
from ..common import floor_grid, pair

__all__ = ["match_other", "refusal_reason"]

#: What LeGrad needs, said in every refusal.
NEEDS = (
    "LeGrad needs blocks whose attention is global over the patch tokens of one fixed patch "
    "grid (every patch token attends to every patch token, probabilities (B, heads, N, N))."
)
HOW = (
    "If your model has such blocks, describe them with captum_legrad.ViTSpec (or "
    "captum_legrad.custom.vit_spec, which finds the attention modules) and pass "
    "LeGrad(model, spec=...)."
)

#: Why a timm model class is refused, by class name.
_REASONS: Dict[str, str] = {
    **dict.fromkeys(
        (
            "SwinTransformer",
            "SwinTransformerV2",
            "SwinTransformerV2Cr",
            "DaVit",
            "GlobalContextVit",
            "Nest",
            "FocalNet",
        ),
        "a hierarchical, windowed backbone: its blocks attend within local windows (or "
        "over pooled tokens) and the token grid shrinks from stage to stage",
    ),
    **dict.fromkeys(
        (
            "MultiScaleVit",
            "Hiera",
            "HieraDet",
            "PyramidVisionTransformerV2",
            "Twins",
            "PoolingVisionTransformer",
        ),
        "a hierarchical backbone: its attention pools keys/queries or works within "
        "windows, and the token grid shrinks from stage to stage",
    ),
    **dict.fromkeys(
        ("MaxxVit", "MaxxVitCfg", "CoAtNet"),
        "a hybrid convolution / windowed (block and grid) attention backbone with a shrinking grid",
    ),
    **dict.fromkeys(
        ("Levit", "LevitDistilled"),
        "a hierarchical backbone whose attention subsamples its queries and whose grid "
        "shrinks from stage to stage",
    ),
    "EfficientVit": "its attention is linear (ReLU-kernel multi-scale linear attention): there "
    "are no attention probabilities to differentiate",
    "EfficientViM": "its token mixer is a state-space layer, not softmax attention",
    "MambaOut": "a gated-convolution network: no attention between tokens",
    "TNT": "its blocks exchange two token streams (pixel tokens inside each patch, patch tokens) "
    "and return both",
    "CrossVit": "two branches with different patch sizes exchange their class tokens by "
    "cross-attention: there is no single patch grid",
    "VOLO": "its first stages use outlook attention (local windows built by unfolding)",
    **dict.fromkeys(
        ("Visformer", "MetaFormer", "NextViT", "TinyVit", "EfficientFormer", "EfficientFormerV2"),
        "a hierarchical network whose attention (where it has one) works on a downsampled "
        "grid of a later stage, or within windows",
    ),
    "Xcit": "its XCA blocks attend over channels (a d x d cross-covariance), not over "
    "tokens, and this model has no class-attention blocks",
    "VisionTransformerSAM": "every block attends within local windows (no global-attention "
    "block); a windowed block's probabilities cover one padded window, not the grid",
    "Qwen3VitEncoder": "the encoder variant (_enc) has no classification head; explain the "
    "classifier variant (qwen3_vit_*) or add a head and describe it with a ViTSpec",
    "Gemma4VitEncoder": "the encoder variant (_enc) has no classification head; explain the "
    "classifier variant (gemma4_vit_*) or add a head and describe it with a ViTSpec",
    "DeepseekVitEncoder": "the encoder variant (_enc) has no classification head; explain the "
    "classifier variant (deepseek_vit_*) or add a head and describe it with a ViTSpec",
}

#: timm model classes another adapter handles (they are not refused here).
_OTHERS = ("NaFlexVit",)


def _timm_class(name: str, module: str) -> Optional[type]:
    """``timm.models.<module>.<name>``, or ``None`` where this timm version lacks it."""
    try:
        return getattr(importlib.import_module(f"timm.models.{module}"), name, None)
    except ImportError:
        return None


def _is(model: nn.Module, name: str, module: str) -> bool:
    cls = _timm_class(name, module)
    return cls is not None and isinstance(model, cls)


def is_timm_model(model: nn.Module) -> bool:
    """A timm model class (defined in ``timm.models``, with a ``forward_head``)."""
    return type(model).__module__.startswith("timm.models.") and callable(
        getattr(model, "forward_head", None)
    )


def refusal_reason(model: nn.Module) -> str:
    """Why LeGrad cannot explain this timm model."""
    name = type(model).__name__
    if name in _REASONS:
        return _REASONS[name]
    has_attention = any(
        "attn" in type(m).__name__.lower() or "attention" in type(m).__name__.lower()
        for m in model.modules()
    )
    if has_attention:
        return (
            "its attention is not global token attention over one patch grid (hierarchical, "
            "windowed, pooled, linear or channel attention, or a convolution / attention hybrid)"
        )
    return (
        "it has no softmax attention between image tokens (a convolutional, MLP, state-space "
        "or linear-attention network)"
    )


def block_attentions(
    model: nn.Module, blocks: Tuple[nn.Module, ...]
) -> Tuple[FrozenSet[int], Dict[int, nn.Module]]:
    """How each block's attention is recorded, beyond one attention call per block.

    Returns:
        ``(parallel, products)``: the blocks that run several attentions side by side
        (``ParallelThingsBlock``: head groups of one attention,
        :attr:`~captum_legrad.spec.ViTSpec.parallel_attentions`), and, for differential
        attention (``DiffAttention``, ``DiffParallelScalingBlock``), the module whose
        input is ``O = (softmax₁ − λ·softmax₂)·V``: its ``sub_norm``
        (:attr:`~captum_legrad.spec.ViTSpec.product_inputs`).

    Raises:
        UnsupportedModelError: a block with parallel *differential* attentions.
    """
    parallel = set()
    products: Dict[int, nn.Module] = {}
    for index, block in enumerate(blocks):
        differential = [
            m
            for m in block.modules()
            if type(m).__name__ in ("DiffAttention", "DiffParallelScalingBlock")
        ]
        if type(block).__name__ == "ParallelThingsBlock":
            parallel.add(index)
        if len(differential) > 1 or (differential and index in parallel):
            raise UnsupportedModelError(
                f"timm {type(model).__name__} cannot be explained by LeGrad: its blocks run "
                "several differential attentions in parallel, which LeGrad does not combine. "
                f"{NEEDS} {HOW}"
            )
        if differential:
            sub_norm = getattr(differential[0], "sub_norm", None)
            if not isinstance(sub_norm, nn.Module):
                raise UnsupportedModelError(
                    f"timm {type(model).__name__} cannot be explained by LeGrad: its "
                    "differential attention has no sub_norm module, whose input is the "
                    f"attention output LeGrad differentiates. {NEEDS} {HOW}"
                )
            products[index] = sub_norm
    return frozenset(parallel), products


def refuse(model: nn.Module) -> UnsupportedModelError:
    """The error for a timm model LeGrad cannot explain."""
    return UnsupportedModelError(
        f"timm {type(model).__name__} cannot be explained by LeGrad: {refusal_reason(model)}. "
        f"{NEEDS} {HOW}"
    )


# ---------------------------------------------------------------------------- CaiT


@dataclass(frozen=True)
class _CaitTokens(TokenInput):
    """CaiT's blocks: self-attention blocks take ``x``; class-attention blocks take
    ``(x, x_cls)``, the class token being their residual stream. There the patch tokens
    ``x`` are constants and are cut from the graph too, so that no class-attention
    score reaches the attention of a self-attention block."""

    def get(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if len(args) >= 2:
            return args[1]
        if "x_cls" in kwargs:
            return kwargs["x_cls"]
        return super().get(args, kwargs)

    def replace(
        self, args: Tuple[Any, ...], kwargs: Dict[str, Any], value: Any
    ) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        if len(args) >= 2:
            return (args[0].detach(), value, *args[2:]), kwargs
        if "x_cls" in kwargs:
            patches = args[0] if args else kwargs["x"]
            rest = {k: v for k, v in kwargs.items() if k not in ("x", "x_cls")}
            return (patches.detach(),), {**rest, "x_cls": value}
        return super().replace(args, kwargs, value)


def _cait(vit: Any) -> ViTSpec:
    talking: Any = _timm_class("TalkingHeadAttn", "cait")
    self_blocks = tuple(vit.blocks)
    class_blocks = tuple(vit.blocks_token_only or ())
    attentions: List[nn.Module] = []
    outputs = set()
    for index, block in enumerate(self_blocks):
        attn: Any = block.attn
        if talking is not None and isinstance(attn, talking):
            attentions.append(attn.attn_drop)  # proj_w(softmax): multiplied with V
            outputs.add(index)
        else:
            attentions.append(block.attn)
    attentions.extend(block.attn for block in class_blocks)
    patch_size = pair(vit.patch_embed.patch_size)

    def head(pooled: Tensor) -> Tensor:
        return vit.head(vit.head_drop(pooled))

    def mean_readout(z: Tensor) -> Tensor:
        if z.shape[1] == 1:  # a class-attention block: its stream is the class token
            return head(vit.norm(z[:, 0]))
        return head(vit.norm(z.mean(dim=1)))

    def model_readout(z: Tensor) -> Tensor:
        if z.shape[1] == 1:
            return head(vit.norm(z[:, 0]))
        cls = vit.cls_token.expand(z.shape[0], -1, -1)
        for block in class_blocks:  # the class-attention stage (timm's forward_cls)
            cls = block(z, cls)
        return vit.forward_head(vit.norm(torch.cat((cls, z), dim=1)))

    return ViTSpec(
        family="timm",
        root=vit,
        blocks=self_blocks + class_blocks,
        attentions=tuple(attentions),
        readout=mean_readout,
        model_readout=model_readout,
        num_prefix_tokens=1 if class_blocks else 0,
        patch_size=patch_size,
        grid=floor_grid(patch_size),
        token_input=_CaitTokens("x"),
        output_attentions=frozenset(outputs),
    )


# -------------------------------------------------------------------------- ConViT


def _convit(vit: Any) -> ViTSpec:
    gpsa: Any = _timm_class("GPSA", "convit")
    blocks = tuple(vit.blocks)
    attentions: List[nn.Module] = []
    outputs = set()
    for index, block in enumerate(blocks):
        attn: Any = block.attn
        if gpsa is not None and isinstance(attn, gpsa):
            attentions.append(attn.attn_drop)  # the gated mix, multiplied with V
            outputs.add(index)
        else:
            attentions.append(block.attn)
    patch_size = pair(vit.patch_embed.patch_size)
    n_patches = int(vit.patch_embed.num_patches)

    def head(pooled: Tensor) -> Tensor:
        return vit.head(vit.head_drop(pooled))

    def mean_readout(z: Tensor) -> Tensor:
        return head(vit.norm(z.mean(dim=1)))

    def model_readout(z: Tensor) -> Tensor:
        if z.shape[1] == n_patches:  # before the class token joins: no token to read
            return head(vit.norm(z).mean(dim=1))
        return vit.forward_head(vit.norm(z))

    return ViTSpec(
        family="timm",
        root=vit,
        blocks=blocks,
        attentions=tuple(attentions),
        readout=mean_readout,
        model_readout=model_readout,
        num_prefix_tokens=int(getattr(vit, "num_prefix_tokens", vit.cls_token is not None)),
        patch_size=patch_size,
        grid=floor_grid(patch_size),
        token_input=TokenInput("x"),
        output_attentions=frozenset(outputs),
    )


# --------------------------------------------------------------------------- XCiT


def _xcit(vit: Any) -> Optional[ViTSpec]:
    blocks = tuple(vit.cls_attn_blocks or ())
    if not blocks:
        return None
    patch_size = pair(vit.patch_embed.patch_size)

    def mean_readout(z: Tensor) -> Tensor:
        return vit.head(vit.head_drop(vit.norm(z.mean(dim=1))))

    def model_readout(z: Tensor) -> Tensor:
        return vit.forward_head(vit.norm(z))

    return ViTSpec(
        family="timm",
        root=vit,
        blocks=blocks,
        attentions=tuple(block.attn for block in blocks),
        readout=mean_readout,
        model_readout=model_readout,
        num_prefix_tokens=1,
        patch_size=patch_size,
        grid=floor_grid(patch_size),
        token_input=TokenInput("x"),
    )


# ---------------------------------------------------------------------------- SAM


def _sam(vit: Any) -> Optional[ViTSpec]:
    blocks = tuple(block for block in vit.blocks if int(block.window_size) == 0)
    if not blocks:
        return None
    patch_size = pair(vit.patch_embed.patch_size)

    def readout(z: Tensor) -> Tensor:  # (B, H, W, D): the model's neck (a conv) and head
        return vit.forward_head(vit.neck(z.permute(0, 3, 1, 2)))

    return ViTSpec(
        family="timm",
        root=vit,
        blocks=blocks,
        attentions=tuple(block.attn for block in blocks),
        readout=readout,
        model_readout=readout,
        num_prefix_tokens=0,
        patch_size=patch_size,
        grid=floor_grid(patch_size),
        token_input=TokenInput("x"),
    )


# ------------------------------------------------------------ VLM vision towers


def _square(z: Tensor) -> Tuple[int, int]:
    side = math.isqrt(z.shape[1])
    if side * side != z.shape[1]:
        raise UnsupportedModelError(
            f"This model's projector pools the {z.shape[1]} tokens of a layer on their 2-D "
            "grid, which LeGrad can only rebuild for square grids: pass a square image, or "
            "build the model without the projector (encoder_pool='')."
        )
    return side, side


def _vlm(
    vit: Any,
    post: Callable[..., Tensor],
    readout_inputs: Optional[Callable[[Tuple[Any, ...]], Tuple[Any, ...]]] = None,
) -> ViTSpec:
    encoder = vit.encoder
    blocks = tuple(encoder.blocks)
    patch_size = pair(encoder.patch_embed.patch_size)

    def readout(z: Tensor, *extra: Any) -> Tensor:
        return vit.forward_head(post(z, *extra))

    return ViTSpec(
        family="timm",
        root=vit,
        blocks=blocks,
        attentions=tuple(block.attn for block in blocks),
        readout=readout,  # the model's own: it mean-pools all tokens (no prefix) already
        model_readout=readout,
        num_prefix_tokens=0,
        patch_size=patch_size,
        grid=floor_grid(patch_size),
        token_input=TokenInput("x"),
        readout_inputs=readout_inputs,
    )


def _qwen3(vit: Any) -> ViTSpec:
    merger = vit.encoder.merger

    def post(z: Tensor) -> Tensor:
        if merger is None:
            return z
        g_h, g_w = _square(z)
        return merger(z.reshape(z.shape[0], g_h, g_w, -1))

    return _vlm(vit, post)


def _deepseek(vit: Any) -> ViTSpec:
    encoder = vit.encoder
    aligner = encoder.aligner

    def post(z: Tensor) -> Tensor:
        z = encoder.norm(z)
        if aligner is None:
            return z
        g_h, g_w = _square(z)
        return aligner(z.reshape(z.shape[0], g_h, g_w, -1))

    return _vlm(vit, post)


def _gemma4(vit: Any) -> Optional[ViTSpec]:
    if vit.encoder_pool != "soft":
        return _vlm(vit, lambda z: z)
    # encoder_pool="soft": the encoder's pooler averages the tokens of each k x k cell of
    # the patch grid (by their (x, y) positions), scales by sqrt(D) and, for the
    # standardised variants, applies std_bias / std_scale; the classifier then averages
    # the cells. A weighted mean over tokens, so a readout: the positions are those
    # timm's patch embedding gives an image's dense grid, rebuilt from the image size.
    encoder = vit.encoder
    p_h, p_w = pair(encoder.patch_embed.patch_size)

    def image_grid(arguments: Tuple[Any, ...]) -> Tuple[Any, ...]:
        image = arguments[0] if arguments else None
        if not isinstance(image, Tensor) or image.dim() != 4:
            raise UnsupportedModelError(
                "A Gemma4VitClassifier with encoder_pool='soft' is explained on image "
                "tensors (B, C, H, W): its soft-token pooler needs the patch grid. Pass "
                "images, or build it with encoder_pool='' (the default)."
            )
        return ((image.shape[-2] // p_h, image.shape[-1] // p_w),)

    def soft_pool(z: Tensor, grid: Tuple[int, int]) -> Tensor:
        rows, cols = torch.meshgrid(
            torch.arange(grid[0], device=z.device),
            torch.arange(grid[1], device=z.device),
            indexing="ij",
        )
        positions = torch.stack((cols, rows), dim=-1).reshape(1, -1, 2)  # Gemma4's (x, y)
        pooled, _ = encoder.pooler(z, positions.expand(z.shape[0], -1, -1), None)
        if encoder.std_bias is not None:
            pooled = (pooled - encoder.std_bias) * encoder.std_scale
        return pooled

    return _vlm(vit, soft_pool, image_grid)


# ------------------------------------------------------------------------- match

#: (class name, timm module, describer): tried in order.
_DESCRIBED: Tuple[Tuple[str, str, Callable[[Any], Optional[ViTSpec]]], ...] = (
    ("Cait", "cait", _cait),
    ("ConVit", "convit", _convit),
    ("Xcit", "xcit", _xcit),
    ("VisionTransformerSAM", "vision_transformer_sam", _sam),
    ("Qwen3VitClassifier", "qwen3_vit", _qwen3),
    ("Gemma4VitClassifier", "gemma4_vit", _gemma4),
    ("DeepseekVitClassifier", "deepseek_vit", _deepseek),
)


def match_other(model: nn.Module) -> Optional[ViTSpec]:
    """Describe one of the families above; refuse any other timm model; ``None`` for a
    module that is not a timm model (or one another adapter handles)."""
    for name, module, describe in _DESCRIBED:
        if _is(model, name, module):
            spec = describe(model)
            if spec is None:
                raise refuse(model)
            return spec
    if is_timm_model(model) and type(model).__name__ not in _OTHERS:
        raise refuse(model)
    return None
