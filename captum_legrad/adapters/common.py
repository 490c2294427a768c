"""Small helpers the adapters share."""

from __future__ import annotations

from typing import Any, Tuple

from ..spec import GridRule

__all__ = ["pair", "floor_grid"]


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
