"""HF transformers adapter (in progress)."""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..spec import ViTSpec

__all__ = ["match"]


def match(model: nn.Module) -> Optional[ViTSpec]:
    """Describe a HF transformers Vision Transformer; ``None`` for anything else."""
    return None
