"""The registry of model families: one row per library LeGrad recognises.

Each :class:`Family` row names the adapter module that recognises the library's models
(:func:`captum_legrad.discover`), the package the user must already have imported, the
extra that installs it, and the command-line loader (``captum-legrad explain --model
NAME:...``). Adding a family is one adapter module, one row here, tests and docs
(``docs/architecture.md``). Nothing here imports an adapter or a loader: the rows hold
module paths, resolved where they are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ["Family", "FAMILIES", "family", "family_names"]


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: The family's name, also the command line's model prefix (``timm:NAME``).
        library: The top-level package of the library; its adapter is consulted only once
            the user has imported it (a model of it cannot exist otherwise).
        adapter: Module (under ``captum_legrad.adapters``) with ``match(model) -> ViTSpec |
            None``.
        extra: The ``captum-legrad[...]`` extra that installs the library.
        description: What the adapter recognises, for error messages and docs.
        loader: ``"module:function"`` building a model of this family for the command line
            (``function(name, weights, num_classes)``), or ``None`` if it has none.
        name_hint: What follows the prefix on the command line.
    """

    name: str
    library: str
    adapter: str
    extra: str
    description: str
    loader: Optional[str] = None
    name_hint: str = "NAME"


FAMILIES: Tuple[Family, ...] = (
    Family(
        name="timm",
        library="timm",
        adapter="timm",
        extra="timm",
        description=(
            "timm VisionTransformer, Eva, Beit, RelPos, CaiT, ConViT, XCiT (class attention), "
            "SAM (global blocks), Qwen3 / Gemma4 / DeepSeek vision towers and NaFlexVit"
        ),
        loader="captum_legrad.eval.models:load_timm",
    ),
    Family(
        name="open_clip",
        library="open_clip",
        adapter="open_clip",
        extra="open_clip",
        description="OpenCLIP CLIP / CoCa / SigLIP (TimmModel) and their .visual",
        loader="captum_legrad.eval.models:load_open_clip",
    ),
    Family(
        name="hf",
        library="transformers",
        adapter="hf",
        extra="transformers",
        description="HF transformers ViT, DeiT, BEiT, data2vec, ViT-MAE/-MSN, I-JEPA, DINOv2/v3, "
        "CLIP, MetaCLIP 2, SigLIP, SigLIP2 and AIMv2 vision models, VideoMAE, ViViT, "
        "TimeSformer and V-JEPA 2 video classifiers and the Audio Spectrogram Transformer",
        loader="captum_legrad.eval.models:load_hf",
        name_hint="PATH",
    ),
    Family(
        name="torchvision",
        library="torchvision",
        adapter="torchvision",
        extra="torchvision",
        description="torchvision VisionTransformer (vit_b_16 family)",
        loader="captum_legrad.eval.models:load_torchvision",
    ),
)


def family(name: str) -> Family:
    """The registry row called ``name``.

    Raises:
        KeyError: no family has that name.
    """
    for row in FAMILIES:
        if row.name == name:
            return row
    raise KeyError(name)


def family_names() -> Tuple[str, ...]:
    """The names of all families, in registry order."""
    return tuple(row.name for row in FAMILIES)
