"""The grad-mode protocol of one LeGrad forward, in one place.

LeGrad's forward builds an autograd graph only where its one backward needs one: inside the
selected blocks, from their cut input (explicit route) or from their attention output (lean
route) to their output. PyTorch's grad mode is switched by the hooks of one call at fixed
points, always through the functions below; grad mode is thread-local, so another thread's
forward of the same model is not affected. The caller's mode is restored by the
``torch.enable_grad()`` block around the forward and by :class:`LinearModes` for the
linears.

1. the model's root, forward pre-hook: :func:`model_entered`, off;
2. every block, forward pre-hook: :func:`block_entered`, on only for a selected block on the
   explicit route (its graph starts at its cut input);
3. a lean attention recorder, entered: :func:`attention_entered`, off (the attention's inputs
   need no graph);
4. the attention output (or eager probabilities) made a leaf: :func:`graph_started`, on (the
   rest of the block computes from the leaf);
5. every block, forward hook: :func:`block_left`, off;
6. each ``nn.Linear`` of a selected block on the lean route: :class:`LinearModes` saves the
   mode and switches it off for the linear's own forward, then restores it.

Nothing here creates tensors: :func:`~captum_legrad._core.records.new_leaf` makes a leaf
without touching the mode, and the recorder that made it calls :func:`graph_started`.
"""

from __future__ import annotations

from typing import List

import torch

__all__ = [
    "model_entered",
    "block_entered",
    "attention_entered",
    "graph_started",
    "block_left",
    "LinearModes",
]


def model_entered() -> None:
    """The model's forward begins: no graph outside the selected blocks."""
    torch.set_grad_enabled(False)


def block_entered(builds_graph: bool) -> None:
    """A block begins: a graph from its (cut) input only if ``builds_graph``."""
    torch.set_grad_enabled(builds_graph)


def attention_entered() -> None:
    """A lean attention recorder begins: the attention's inputs need no graph."""
    torch.set_grad_enabled(False)


def graph_started() -> None:
    """A block's graph starts here (its attention output, or its probabilities, made a leaf)."""
    torch.set_grad_enabled(True)


def block_left() -> None:
    """A block ended: no graph until the next selected block."""
    torch.set_grad_enabled(False)


class LinearModes:
    """The grad mode around one ``nn.Linear`` (possibly called in a nested way): ``push``
    saves the mode and switches gradients off (the linear runs without a graph), ``pop``
    restores the saved mode and returns it."""

    def __init__(self) -> None:
        self._saved: List[bool] = []

    def push(self) -> None:
        self._saved.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def pop(self) -> bool:
        enabled = self._saved.pop() if self._saved else torch.is_grad_enabled()
        torch.set_grad_enabled(enabled)
        return enabled
