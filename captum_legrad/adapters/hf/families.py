"""Hugging Face ``transformers`` families beyond ViT / CLIP / DINOv2 / SigLIP.

Recognised (the classes each installed transformers version has; see ``docs/models.md``):

* DeiT: ``DeiTModel``, ``DeiTForImageClassification``,
  ``DeiTForImageClassificationWithTeacher`` (CLS and distillation token: ``P = 2``);
* BEiT and data2vec-vision: ``BeitModel``, ``BeitForImageClassification``,
  ``Data2VecVisionModel``, ``Data2VecVisionForImageClassification`` (relative position
  bias, added to the attention scores, is part of ``A^l``);
* ViT-MSN: ``ViTMSNModel``, ``ViTMSNForImageClassification``;
* I-JEPA: ``IJepaModel``, ``IJepaForImageClassification`` (no CLS token: ``P = 0``);
* DINOv3: ``DINOv3ViTModel`` (RoPE, ``1 + num_register_tokens`` prefix tokens);
* ViT-MAE: ``ViTMAEModel`` with ``mask_ratio=0`` (see below);
* AIMv2: ``Aimv2VisionModel``, ``Aimv2Model`` (its attention-pooling head is
  differentiated, as SigLIP's);
* MetaCLIP 2 is CLIP's architecture and is handled by the CLIP matcher of
  :mod:`captum_legrad.adapters.hf`.

Readouts (``y = norm(Z)``, ``n = norm(mean over all tokens of Z)``; ``pooling="model"`` /
``pooling="mean"``):

- DeiT classification: ``classifier(y[:, 0])`` / ``classifier(n)``; with teacher
  ``(cls_classifier(y[:, 0]) + distillation_classifier(y[:, 1])) / 2`` / the same two heads
  on ``n``; ``DeiTModel``, ``ViTMSNModel``, ``DINOv3ViTModel``, ``ViTMAEModel``: the pooler
  on ``y`` (else ``y[:, 0]``) / the pooler on ``n`` (else ``n``);
- BEiT / data2vec: ``pooler(y)`` (mean of the patch tokens and the pooler's norm, or the
  CLS token) then the classifier / the pooler on ``n`` (as every token);
- I-JEPA: ``classifier(y.mean(1))`` / ``classifier(n)``; the model: ``y.mean(1)`` / ``n``
  (with a pooler: the pooler, which reads token 0);
- AIMv2 with its head: ``head(rms_norm(Z))`` for both, then ``visual_projection`` for the
  full model; without a head: ``rms_norm(Z).mean(1)`` / ``rms_norm(mean Z)``.

ViT-MAE draws random ``noise`` in every forward and runs its encoder on the patches in the
order ``argsort(noise)``, even at ``mask_ratio=0``. ``LeGrad(model)`` therefore runs the
model through ``ViTSpec.image_forward``, which passes ``noise = 0, 1, 2, ...`` (the image
order) unless the call gives its own ``noise`` (second positional argument, e.g. through
``additional_forward_args``), and keeps the ``ids_restore`` the model returns, for this
call and thread only; the ``PatchLayout`` of the call puts the keys back in image order from
it (per sample). Nothing is written to the model. Models with ``mask_ratio > 0`` drop
patches at random and are refused.
"""

from __future__ import annotations

import threading
import types
import weakref
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from ...errors import CaptureError, UnsupportedModelError
from ...spec import PatchLayout, ViTSpec
from ..common import floor_grid, pair
from . import common

__all__ = ["match", "refuse"]

Readout = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------- refusals

#: transformers model packages whose attention is not global over one token set, and why.
_REFUSED = {
    "swin": "shifted-window attention inside local windows, with patch merging between stages",
    "swinv2": "shifted-window attention inside local windows, with patch merging between stages",
    "donut": "shifted-window attention inside local windows, with patch merging between stages",
    "maskformer": "a Swin backbone: shifted-window attention with patch merging between stages",
    "hiera": "mask-unit (local) attention, with pooling between stages",
    "pvt": "spatial-reduction attention (keys on a pooled grid) in stages of shrinking grids",
    "pvt_v2": "spatial-reduction attention (keys on a pooled grid) in stages of shrinking grids",
    "segformer": "spatial-reduction attention (keys on a pooled grid) in stages of shrinking grids",
    "glpn": "spatial-reduction attention (keys on a pooled grid) in stages of shrinking grids",
    "mobilevit": "a CNN with local transformer blocks over unfolded pixel patches",
    "mobilevitv2": "a CNN with separable (linear) attention over unfolded pixel patches",
    "levit": "attention with downsampling stages (the token grid shrinks)",
    "cvt": "convolutional token embeddings in stages of shrinking grids",
    "dinat": "neighbourhood (local) attention in stages of shrinking grids",
    "nat": "neighbourhood (local) attention in stages of shrinking grids",
    "vitdet": "windowed (local) attention in most blocks",
    "focalnet": "focal modulation instead of attention, in stages of shrinking grids",
    "efficientformer": "pooling and convolution stages, attention only in the last stage",
    "swiftformer": "additive attention in convolutional stages of shrinking grids",
    "poolformer": "pooling instead of attention",
}


def refuse(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` for a transformers model of a hierarchical or
    local-attention family (Swin, Hiera, PVT, SegFormer, ...); return otherwise."""
    if not _is_pretrained(model):
        return
    parts = type(model).__module__.split(".")
    family = parts[2] if len(parts) > 3 and parts[1] == "models" else ""
    if family == "deprecated" and len(parts) > 4:
        family = parts[3]
    reason = _REFUSED.get(family)
    if reason is None:
        return
    raise UnsupportedModelError(
        f"{type(model).__name__} is not supported by LeGrad: it uses {reason}. LeGrad needs a "
        "Vision Transformer whose every block attends globally over one fixed set of tokens "
        "(prefix tokens and one patch grid), so that each layer's attention to each patch "
        "can be read. Use a plain ViT (ViT, DeiT, BEiT, DINOv2/v3, CLIP, SigLIP, AIMv2, ...), "
        "or describe a compatible model with spec=ViTSpec(...)."
    )


def _is_pretrained(model: nn.Module) -> bool:
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.")
        for cls in type(model).__mro__
    )


# ---------------------------------------------------------------------------- helpers


def _cls_or_pooler(base: Any, norm: nn.Module) -> Tuple[Readout, Readout]:
    """``(model, mean)`` readouts of a CLS model: its pooler (token 0) or the CLS token."""
    pooler: Optional[nn.Module] = getattr(base, "pooler", None)

    def model_readout(tokens: Tensor) -> Tensor:
        normed = norm(tokens)
        return pooler(normed) if pooler is not None else normed[:, 0]

    def mean_readout(tokens: Tensor) -> Tensor:
        normed = norm(tokens.mean(dim=1))
        return pooler(normed.unsqueeze(1)) if pooler is not None else normed

    return model_readout, mean_readout


def _classify(head: nn.Module, readouts: Tuple[Readout, Readout]) -> Tuple[Readout, Readout]:
    model_readout, mean_readout = readouts
    return (lambda tokens: head(model_readout(tokens))), (lambda tokens: head(mean_readout(tokens)))


def _spec(
    root: nn.Module, readouts: Tuple[Readout, Optional[Readout]], prefix: int, **extra: Any
) -> ViTSpec:
    model_readout, mean_readout = readouts
    return common.build_spec(
        root,
        "attention",
        mean_readout=mean_readout,
        model_readout=model_readout,
        num_prefix_tokens=prefix,
        **extra,
    )


# ---------------------------------------------------------------------------- DeiT


def _match_deit(model: nn.Module) -> Optional[ViTSpec]:
    module = "deit.modeling_deit"
    m: Any = model
    if common.is_instance_of(model, module, "DeiTForImageClassificationWithTeacher"):
        base: Any = m.deit

        def both(features_cls: Tensor, features_dist: Tensor) -> Tensor:
            return (m.cls_classifier(features_cls) + m.distillation_classifier(features_dist)) / 2

        def model_readout(tokens: Tensor) -> Tensor:
            normed = base.layernorm(tokens)
            return both(normed[:, 0], normed[:, 1])

        def mean_readout(tokens: Tensor) -> Tensor:
            normed = base.layernorm(tokens.mean(dim=1))
            return both(normed, normed)

        return _spec(base, (model_readout, mean_readout), 2)
    if common.is_instance_of(model, module, "DeiTForImageClassification"):
        base = m.deit
        readouts = _cls_or_pooler(base, base.layernorm)  # its DeiTModel has no pooler
        return _spec(base, _classify(m.classifier, readouts), 2)
    if common.is_instance_of(model, module, "DeiTModel"):
        return _spec(model, _cls_or_pooler(m, m.layernorm), 2)
    return None


# ---------------------------------------------------------------------------- BEiT, data2vec


def _beit_readouts(base: Any) -> Tuple[Readout, Readout]:
    """BEiT's pooler: the patch tokens' mean and the pooler's norm, or the CLS token."""
    pooler: Optional[nn.Module] = getattr(base, "pooler", None)

    def pool(normed: Tensor) -> Tensor:
        return pooler(normed) if pooler is not None else normed[:, 0]

    def model_readout(tokens: Tensor) -> Tensor:
        return pool(base.layernorm(tokens))

    def mean_readout(tokens: Tensor) -> Tensor:
        # The mean token in the CLS place and as the only patch: both pooler modes read it.
        normed = base.layernorm(tokens.mean(dim=1, keepdim=True))
        return pool(torch.cat([normed, normed], dim=1))

    return model_readout, mean_readout


def _match_beit(model: nn.Module) -> Optional[ViTSpec]:
    m: Any = model
    for module, prefix, inner in (
        ("beit.modeling_beit", "Beit", "beit"),
        ("data2vec.modeling_data2vec_vision", "Data2VecVision", "data2vec_vision"),
    ):
        if common.is_instance_of(model, module, f"{prefix}ForImageClassification"):
            base = getattr(m, inner)
            return _spec(base, _classify(m.classifier, _beit_readouts(base)), 1)
        if common.is_instance_of(model, module, f"{prefix}Model"):
            return _spec(model, _beit_readouts(m), 1)
    return None


# ---------------------------------------------------------------------------- ViT-MSN, I-JEPA


def _match_msn(model: nn.Module) -> Optional[ViTSpec]:
    module = "vit_msn.modeling_vit_msn"
    m: Any = model
    if common.is_instance_of(model, module, "ViTMSNForImageClassification"):
        base = m.vit
        return _spec(base, _classify(m.classifier, _cls_or_pooler(base, base.layernorm)), 1)
    if common.is_instance_of(model, module, "ViTMSNModel"):
        return _spec(model, _cls_or_pooler(m, m.layernorm), 1)
    return None


def _match_ijepa(model: nn.Module) -> Optional[ViTSpec]:
    module = "ijepa.modeling_ijepa"
    m: Any = model
    if common.is_instance_of(model, module, "IJepaForImageClassification"):
        base: Any = m.ijepa
    elif common.is_instance_of(model, module, "IJepaModel"):
        base = m
    else:
        return None
    if base is m and getattr(m, "pooler", None) is not None:
        return _spec(model, _cls_or_pooler(m, m.layernorm), 0)

    def model_readout(tokens: Tensor) -> Tensor:
        return base.layernorm(tokens).mean(dim=1)

    def mean_readout(tokens: Tensor) -> Tensor:
        return base.layernorm(tokens.mean(dim=1))

    readouts: Tuple[Readout, Readout] = (model_readout, mean_readout)
    if base is not m:
        readouts = _classify(m.classifier, readouts)
    return _spec(base, readouts, 0)


# ---------------------------------------------------------------------------- DINOv3


def _match_dinov3(model: nn.Module) -> Optional[ViTSpec]:
    module = "dinov3_vit.modeling_dinov3_vit"
    if common.is_instance_of(model, module, "DINOv3ViTBackbone"):
        raise UnsupportedModelError(
            "DINOv3ViTBackbone returns feature maps, not scores LeGrad can explain; load the "
            "same weights as DINOv3ViTModel (DINOv3ViTModel.from_pretrained(...)) and explain "
            "a score of its CLS embedding: ImageImageSimilarity or FeatureDirection."
        )
    if not common.is_instance_of(model, module, "DINOv3ViTModel"):
        return None
    m: Any = model
    prefix = 1 + int(getattr(m.config, "num_register_tokens", 0) or 0)
    return _spec(model, _cls_or_pooler(m, m.norm), prefix)


# ---------------------------------------------------------------------------- ViT-MAE


class _MaeOrder(threading.local):
    """The patch order of the last ViT-MAE forward LeGrad ran in this thread."""

    pixels: Optional[Callable[[], Optional[Tensor]]] = None
    ids_restore: Optional[Tensor] = None


_MAE_ORDER = _MaeOrder()


def _mae_forward(
    self: nn.Module, pixel_values: Tensor, noise: Optional[Tensor] = None, *args: Any, **kwargs: Any
) -> Any:
    """``model(pixel_values, noise, ...)`` with ``noise`` = the image order unless given."""
    if noise is None:
        noise = kwargs.pop("noise", None)
    if noise is None:
        patch = pair(self.config.patch_size)  # type: ignore[union-attr]
        g_h, g_w = pixel_values.shape[-2] // patch[0], pixel_values.shape[-1] // patch[1]
        order = torch.arange(g_h * g_w, dtype=torch.float32, device=pixel_values.device)
        noise = order.expand(pixel_values.shape[0], -1)
    output = self(pixel_values, noise, *args, **kwargs)
    ids_restore = getattr(output, "ids_restore", None)
    if ids_restore is None:  # a tuple output: what random_masking computes from noise
        ids_restore = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    _MAE_ORDER.pixels = weakref.ref(pixel_values)
    _MAE_ORDER.ids_restore = ids_restore.detach()
    return output


def _mae_layout(patch: Tuple[int, int]) -> Callable[[Tuple[Any, ...], int], PatchLayout]:
    grid_rule = floor_grid(patch)

    def layout(inputs: Tuple[Any, ...], n_keys: int) -> PatchLayout:
        image = inputs[0]
        grid = grid_rule(image.shape[-2], image.shape[-1])
        pixels = _MAE_ORDER.pixels() if _MAE_ORDER.pixels is not None else None
        ids_restore = _MAE_ORDER.ids_restore
        _MAE_ORDER.pixels, _MAE_ORDER.ids_restore = None, None  # one forward, one layout
        if pixels is not image or ids_restore is None:
            raise CaptureError(
                "ViT-MAE shuffles its patches with random noise in every forward, and LeGrad "
                "knows the order only when it runs the ViTMAEModel itself: pass the model as "
                "forward_func (LeGrad(vitmae_model)), not a function or module that calls it."
            )
        if n_keys != 1 + grid[0] * grid[1] or ids_restore.shape[-1] != grid[0] * grid[1]:
            raise CaptureError(
                f"ViT-MAE attended over {n_keys} keys for a {grid[0]}x{grid[1]} patch grid: "
                "patches were masked; LeGrad needs mask_ratio=0."
            )
        # The patch at image position p sits at shuffled position ids_restore[p], after CLS.
        return PatchLayout(1 + ids_restore, grid)

    return layout


def _match_mae(model: nn.Module) -> Optional[ViTSpec]:
    module = "vit_mae.modeling_vit_mae"
    if common.is_instance_of(model, module, "ViTMAEForPreTraining"):
        raise UnsupportedModelError(
            "ViTMAEForPreTraining outputs a pixel reconstruction of randomly masked patches, "
            "not scores LeGrad can explain; explain its encoder, model.vit (a ViTMAEModel, "
            "built with mask_ratio=0.0)."
        )
    if not common.is_instance_of(model, module, "ViTMAEModel"):
        return None
    m: Any = model
    ratio = float(getattr(m.config, "mask_ratio", 0.0) or 0.0)
    if ratio > 0:
        raise UnsupportedModelError(
            f"This ViTMAEModel has mask_ratio={ratio}: it drops that share of the patches at "
            "random in every forward, so most patches get no attention to explain. Load it "
            "with mask_ratio=0.0 (ViTMAEModel.from_pretrained(name, mask_ratio=0.0)); LeGrad "
            "then fixes the patch order itself."
        )
    patch = common.patch_size_of(m.embeddings, m.config)
    return _spec(
        model,
        _cls_or_pooler(m, m.layernorm),
        1,
        image_forward=types.MethodType(_mae_forward, model),
        layout=_mae_layout(patch),
    )


# ---------------------------------------------------------------------------- AIMv2


def _match_aimv2(model: nn.Module) -> Optional[ViTSpec]:
    module = "aimv2.modeling_aimv2"
    m: Any = model
    if common.is_instance_of(model, module, "Aimv2Model"):
        tower: Any = m.vision_model
        projection: Optional[nn.Module] = m.visual_projection
    elif common.is_instance_of(model, module, "Aimv2VisionModel"):
        tower, projection = m, None
    else:
        return None

    def project(pooled: Tensor) -> Tensor:
        return projection(pooled) if projection is not None else pooled

    image_forward = common.image_features_forward(model)
    head: Optional[nn.Module] = getattr(tower, "head", None) if tower.use_head else None
    if head is not None:
        pool: nn.Module = head

        def pooled(tokens: Tensor) -> Tensor:
            return project(pool(tower.rms_norm(tokens)))

        return _spec(
            tower, (pooled, None), 0, pool_attention=pool, image_forward=image_forward
        )  # an attention pool has no mean-pooled variant

    def norm_then_mean(tokens: Tensor) -> Tensor:
        return project(tower.rms_norm(tokens).mean(dim=1))

    def mean_then_norm(tokens: Tensor) -> Tensor:
        return project(tower.rms_norm(tokens.mean(dim=1)))

    return _spec(tower, (norm_then_mean, mean_then_norm), 0, image_forward=image_forward)


_MATCHERS = (
    _match_deit,
    _match_beit,
    _match_msn,
    _match_ijepa,
    _match_dinov3,
    _match_mae,
    _match_aimv2,
)


def match(model: nn.Module) -> Optional[ViTSpec]:
    """Describe a model of the families above; ``None`` otherwise. Raises
    :class:`UnsupportedModelError` for classes that are recognised but cannot be explained
    (hierarchical families, ``ViTMAEForPreTraining``, ViT-MAE with masking, backbones)."""
    refuse(model)
    for matcher in _MATCHERS:
        spec = matcher(model)
        if spec is not None:
            return spec
    return None
