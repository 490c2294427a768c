"""Pictures for the command line and the harness: overlays and perturbation curves.

Matplotlib is imported only when a picture is drawn (it is in the ``eval`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["overlay", "save_overlay", "save_grid", "save_curves"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "Drawing overlays and plots needs matplotlib: pip install 'captum-legrad[eval]'."
        ) from error
    return plt


def overlay(image: Tensor, heat: Tensor, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a ``[0, 1]`` RGB image ``(3, H, W)`` with a map ``(H, W)`` → ``(H, W, 3)`` array.

    The map is min-max normalised and coloured with ``cmap``.
    """
    plt = _pyplot()
    heat = heat.detach().double().cpu()
    low, high = float(heat.min()), float(heat.max())
    norm = (heat - low) / (high - low) if high > low else torch.zeros_like(heat)
    colours = plt.get_cmap(cmap)(norm.numpy())[..., :3]
    rgb = image.detach().cpu().permute(1, 2, 0).double().clamp(0, 1).numpy()
    return np.asarray((1 - alpha) * rgb + alpha * colours, dtype=np.float64)


def save_overlay(path: Union[str, Path], image: Tensor, heat: Tensor, alpha: float = 0.5) -> None:
    """Write :func:`overlay` as a PNG at the image's resolution."""
    _pyplot().imsave(str(path), np.clip(overlay(image, heat, alpha), 0, 1))


def save_grid(
    path: Union[str, Path],
    images: Tensor,
    columns: Dict[str, Tensor],
    *,
    titles: Optional[Sequence[str]] = None,
    masks: Optional[Tensor] = None,
) -> None:
    """A figure: one row per image, the image and one overlay per method (column).

    Args:
        path: PNG to write.
        images: ``(N, 3, H, W)`` images in [0, 1].
        columns: Method name → ``(N, H, W)`` maps.
        titles: Row labels (e.g. the explained class).
        masks: ``(N, H, W)`` ground-truth masks, outlined on the image column.
    """
    plt = _pyplot()
    rows = images.shape[0]
    fig, axes = plt.subplots(
        rows, 1 + len(columns), figsize=(1.6 * (1 + len(columns)), 1.6 * rows), squeeze=False
    )
    for r in range(rows):
        axes[r, 0].imshow(images[r].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
        if masks is not None:
            axes[r, 0].contour(masks[r].float().cpu().numpy(), levels=[0.5], colors="white")
        axes[r, 0].set_ylabel(titles[r] if titles else "", fontsize=8)
        for c, (name, maps) in enumerate(columns.items(), start=1):
            axes[r, c].imshow(np.clip(overlay(images[r], maps[r]), 0, 1))
            if r == 0:
                axes[r, c].set_title(name, fontsize=8)
        if r == 0:
            axes[r, 0].set_title("image", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)


def save_curves(
    path: Union[str, Path],
    fractions: Sequence[float],
    curves: Dict[str, Tuple[Tensor, Tensor]],
    ylabel: str = "accuracy",
) -> None:
    """Positive and negative perturbation curves, one line per method.

    Args:
        path: PNG to write.
        fractions: Fractions of patches removed (x axis).
        curves: Method name → (positive curve, negative curve), each ``(S,)``.
        ylabel: What the curves measure.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    x = [100 * f for f in fractions]
    for name, (positive, negative) in curves.items():
        axes[0].plot(x, positive.cpu().numpy(), marker="o", markersize=3, label=name)
        axes[1].plot(x, negative.cpu().numpy(), marker="o", markersize=3, label=name)
    axes[0].set_title("positive perturbation (most relevant removed first) ↓")
    axes[1].set_title("negative perturbation (least relevant removed first) ↑")
    for ax in axes:
        ax.set_xlabel("% of patches removed")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
