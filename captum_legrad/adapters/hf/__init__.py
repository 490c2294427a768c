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
from typing import Optional

from torch import nn

from ...spec import ViTSpec
from . import audio, common, families, siglip2, video, vision

__all__ = ["match"]


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
