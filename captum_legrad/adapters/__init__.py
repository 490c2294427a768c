"""Per-library adapters: recognise a model and describe it as a :class:`~captum_legrad.ViTSpec`.

Each adapter module exposes ``match(model) -> ViTSpec | None`` and only describes
where things are in a model; the LeGrad computation itself lives in
:mod:`captum_legrad.compute`. An adapter is consulted only when its library has
already been imported by the user (a model of that library cannot exist otherwise),
so recognising models never imports optional dependencies.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Optional, Tuple

from torch import nn

from ..spec import GridRule, ViTSpec

__all__ = ["match_model", "supported_families", "pair", "floor_grid"]

#: (adapter module, the library that must already be imported, what it recognises)
_ADAPTERS: Tuple[Tuple[str, str, str], ...] = (
    ("timm", "timm", "timm VisionTransformer and Eva (vit_*, deit*, DINOv2 registers, SigLIP MAP)"),
    ("open_clip", "open_clip", "OpenCLIP CLIP / CoCa / SigLIP (TimmModel) and their .visual"),
    ("hf", "transformers", "HF transformers ViT, CLIP, DINOv2 and SigLIP vision models"),
    ("torchvision", "torchvision", "torchvision VisionTransformer (vit_b_16 family)"),
)


def match_model(model: nn.Module) -> Optional[ViTSpec]:
    """The :class:`ViTSpec` of ``model`` if an adapter recognises it, else ``None``.

    A module with a ``legrad_spec()`` method (such as
    :class:`~captum_legrad.ImageTextSimilarity`) describes itself.
    """
    describe = getattr(model, "legrad_spec", None)
    if callable(describe):
        described: ViTSpec = describe()
        return described
    for module_name, library, _ in _ADAPTERS:
        if library not in sys.modules:
            continue
        adapter = importlib.import_module(f"{__name__}.{module_name}")
        spec: Optional[ViTSpec] = adapter.match(model)
        if spec is not None:
            return spec
    return None


def supported_families() -> str:
    """Human-readable list of the model families the adapters recognise."""
    return "; ".join(description for _, _, description in _ADAPTERS)


def pair(value: Any) -> Tuple[int, int]:
    """``(h, w)`` from an int or a 2-sequence (patch sizes as libraries store them)."""
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def floor_grid(patch: Tuple[int, int]) -> GridRule:
    """The grid rule of a patch embedding without padding: ``(H // p_h, W // p_w)``."""

    def grid(height: int, width: int) -> Tuple[int, int]:
        return height // patch[0], width // patch[1]

    return grid
