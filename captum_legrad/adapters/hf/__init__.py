"""Hugging Face ``transformers`` adapters.

* :mod:`.vision`: ViT, CLIP, MetaCLIP 2, DINOv2 (with registers) and SigLIP;
* :mod:`.families`: DeiT, BEiT, data2vec-vision, ViT-MSN, I-JEPA, DINOv3, ViT-MAE and AIMv2,
  and the refusals (hierarchical and local-attention families);
* :mod:`.siglip2`: SigLIP2 (NaFlex, per-sample grids);
* :mod:`.video`: the video classifiers VideoMAE, ViViT, TimeSformer and V-JEPA 2;
* :mod:`.audio`: the Audio Spectrogram Transformer;
* :mod:`.vlm`: the vision-language models :class:`~captum_legrad.AnswerLogits` explains;
* :mod:`.common`: what they share.

Base and vision models (``*Model``, ``*VisionModel``, ``*VisionModelWithProjection``,
multimodal models through ``get_image_features``) return an image embedding: their specs are
marked ``scores_are_features``; only ``*ForImageClassification*``, ``*ForVideoClassification``
and ``*ForAudioClassification`` models return class scores.

The attention implementation the user chose (``"sdpa"`` or ``"eager"``) is left as it
is: the attention is recorded inside each layer's attention module during the call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from torch import nn

from ...spec import ViTSpec
from . import audio, common, families, siglip2, video, vision

__all__ = ["match", "image_text_class"]


def image_text_class(config: Any) -> Optional[type]:
    """The transformers class to load for an image-text ``config``; ``None`` otherwise.

    An image-text model is one with both towers (:func:`.common.has_text_tower`, the rule
    the adapters and :class:`~captum_legrad.ImageTextSimilarity` use): CLIP, SigLIP,
    SigLIP2, MetaCLIP 2, AIMv2. The class is ``AutoModel``'s for the config's model type;
    whether LeGrad recognises it is :func:`~captum_legrad.discover`'s answer.

    Args:
        config: A ``transformers`` ``PretrainedConfig``.
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    name: Any = MODEL_MAPPING_NAMES.get(getattr(config, "model_type", ""))
    if isinstance(name, (tuple, list)):
        name = name[0]
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    return cls if isinstance(cls, type) and common.has_text_tower(cls) else None


def match(model: nn.Module) -> Optional[ViTSpec]:
    """Describe a transformers vision model of a recognised family; ``None`` otherwise.

    Raises:
        UnsupportedModelError: the model is of a family LeGrad recognises but cannot
            explain (hierarchical or local attention: Swin, Hiera, PVT, ...; see
            :mod:`.families`).
    """
    if not any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__):
        return None
    for matcher in (vision.match, families.match, siglip2.match, video.match, audio.match):
        spec = matcher(model)
        if spec is not None:
            if common.returns_features(model):
                spec = dataclasses.replace(spec, scores_are_features=True)
            return spec
    return None
