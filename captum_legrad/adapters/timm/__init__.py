"""timm adapters.

* :mod:`.vit`: ``VisionTransformer`` (and its parallel and differential-attention blocks),
  ``Eva``, ``Beit``, ``VisionTransformerRelPos``;
* :mod:`.naflex`: ``NaFlexVit`` (per-sample grids);
* :mod:`.families`: CaiT, ConViT, XCiT, SAM and the VLM vision towers, and the refusal of
  every other timm model with the reason.

A model built without a classifier (``num_classes=0``: its head is an identity, its output
the pooled features) is marked ``scores_are_features``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from torch import nn

from ...spec import ViTSpec
from . import families, naflex, vit

__all__ = ["match"]


def match(model: nn.Module) -> Optional[ViTSpec]:
    """Describe a timm ViT; ``None`` for a module that is not a timm model.

    Raises:
        UnsupportedModelError: a timm model without global token attention (hierarchical,
            windowed, convolutional), with the reason.
    """
    for matcher in (vit.match, naflex.match, families.match_other):
        spec = matcher(model)
        if spec is not None:
            if getattr(model, "num_classes", None) == 0:  # the head is an identity
                spec = dataclasses.replace(spec, scores_are_features=True)
            return spec
    return None
