"""Small helpers the adapters share."""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Sequence, Tuple

from torch import nn

__all__ = ["pair", "floor_grid", "mlp_outputs"]


def pair(value: Any) -> Tuple[int, int]:
    """``(h, w)`` from an int or a 2-sequence (patch sizes as libraries store them)."""
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def floor_grid(patch: Tuple[int, int]) -> Callable[[int, int], Tuple[int, int]]:
    """The grid rule of a patch embedding without padding: ``(H // p_h, W // p_w)``."""

    def grid(height: int, width: int) -> Tuple[int, int]:
        return height // patch[0], width // patch[1]

    return grid


def mlp_outputs(
    blocks: Sequence[nn.Module], paths: Mapping[str, Sequence[str]]
) -> Dict[int, nn.Module]:
    """:attr:`~captum_legrad.spec.ViTSpec.mlp_outputs` for blocks of known classes.

    ``paths`` maps a block class name to the submodule paths of its last MLP linear (the
    first that exists is taken), for classes whose output is ``x + t(W h + b)`` with ``t``
    acting alike on every token (dropout in eval, LayerScale, drop path, the residual add).
    Blocks of other classes, and paths that do not lead to a plain ``nn.Linear``, are left
    out.
    """
    found: Dict[int, nn.Module] = {}
    for index, block in enumerate(blocks):
        for path in paths.get(type(block).__name__, ()):
            try:
                linear = block.get_submodule(path)
            except AttributeError:
                continue
            if type(linear) is nn.Linear:
                found[index] = linear
            break
    return found
