"""Matplotlib figures of LeGrad maps: an overlay, K targets, the per-layer maps.

Every function returns a :class:`matplotlib.figure.Figure` (built without pyplot, so it
works headless and does not touch pyplot's global state) and saves it when ``save=`` names
a file (PNG, or any format matplotlib knows from the suffix). Images are given
channels-first, as the model sees them: pass the ``mean`` and ``std`` the images were
normalised with and they are drawn un-normalised. Maps of another size than the image (the
patch grid, per-layer maps) are upsampled with ``torch.nn.functional.interpolate``
(bilinear, ``align_corners=False``, as LeGrad itself does); colours come from matplotlib's
colour maps and matplotlib scales each map to its own minimum and maximum unless
``vmin``/``vmax`` are given.

How the figures look (colour map, opacity, colour bar, panel size, title size, dpi) is one
:class:`FigureStyle`, passed as ``style=`` to every function; the functions' own keywords
(``alpha=``, ``cmap=``, ...) still work and win over the style.

matplotlib is an optional dependency (the ``viz`` extra: ``pip install
"captum-legrad[viz]"``); it is imported when a function here runs, not when this module is
imported.

For Captum's own drawing functions (``captum.attr.visualization.visualize_image_attr``),
move a map channels-last: ``attr[i].permute(1, 2, 0).numpy()``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ._core.maps import upsample

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "FigureStyle",
    "denormalize",
    "overlay",
    "plot_layers",
    "plot_targets",
    "plot_methods",
    "plot_curves",
    "plot_photo",
]

#: A tensor or a NumPy array.
ArrayLike = Union[Tensor, np.ndarray]
#: Per-channel statistics: one number for all channels or one per channel.
Stats = Optional[Union[float, Sequence[float], Tensor]]
PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class FigureStyle:
    r"""How the figures of :mod:`captum_legrad.viz` look, in one object.

    Every function here takes ``style=FigureStyle(...)``; a keyword given to the function
    itself (``alpha=0.3``) wins over the style, and the style's defaults are the functions'
    own defaults, so ``style=None`` draws what the functions always drew.

    Attributes:
        cmap (str): A matplotlib colour map name.
                    Default: "jet"
        alpha (float): Opacity of the maps over the images.
                    Default: 0.5
        colorbar (bool): Add a colour bar where a function makes it optional
                    (:func:`overlay`, :func:`plot_methods`; :func:`plot_photo` always has
                    one).
                    Default: False
        panel_size (float, optional): Size of one panel in inches (the height for
                    :func:`plot_photo`, whose width follows the photo); None: each
                    function's own (2.5 for :func:`plot_targets`, 1.8 for
                    :func:`plot_methods`, ...).
                    Default: None
        title_size (str or float): Font size of panel titles (matplotlib sizes:
                    ``"small"``, ``10``).
                    Default: "small"
        dpi (int): Resolution when saving.
                    Default: 100
        vmin (float, optional): Value drawn with the colour map's first colour, for
                    un-scaled maps.
                    Default: None (each map's minimum)
        vmax (float, optional): Value drawn with the colour map's last colour.
                    Default: None (each map's maximum)

    Examples::

        >>> from captum_legrad.viz import FigureStyle, overlay, plot_targets
        >>> paper = FigureStyle(cmap="inferno", alpha=0.6, colorbar=True, dpi=300)
        >>> fig = overlay(x[0], attr[0], style=paper, save="one.png")
        >>> fig = plot_targets(x, maps, prompts, style=paper, save="prompts.png")
    """

    cmap: str = "jet"
    alpha: float = 0.5
    colorbar: bool = False
    panel_size: Optional[float] = None
    title_size: Union[str, float] = "small"
    dpi: int = 100
    vmin: Optional[float] = None
    vmax: Optional[float] = None


def _resolve(style: Optional[FigureStyle], **given: Any) -> FigureStyle:
    """``style`` (or the default style) with the keywords the caller gave (not None)."""
    if style is not None and not isinstance(style, FigureStyle):
        raise TypeError(f"style must be a captum_legrad.viz.FigureStyle, got {type(style)}.")
    chosen = {key: value for key, value in given.items() if value is not None}
    return dataclasses.replace(style or FigureStyle(), **chosen)


def _panel(style: FigureStyle, default: float) -> float:
    return style.panel_size if style.panel_size is not None else default


def _matplotlib() -> Any:
    """Import matplotlib's Figure, or explain how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "captum_legrad.viz needs matplotlib, which is not installed. Install the 'viz' "
            'extra: pip install "captum-legrad[viz]" (or pip install matplotlib).'
        ) from err
    return Figure


def _tensor(value: ArrayLike, what: str) -> Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor or numpy array, got {type(value)}.")
    return value.detach().cpu()


def _stats(value: Stats, channels: int, what: str) -> Optional[Tensor]:
    if value is None:
        return None
    stats = torch.as_tensor(value, dtype=torch.float32).flatten()
    if stats.numel() == 1:
        stats = stats.expand(channels)
    if stats.numel() != channels:
        raise ValueError(
            f"{what} has {stats.numel()} values but the image has {channels} channels."
        )
    return stats.view(channels, 1, 1)


def denormalize(image: ArrayLike, mean: Stats = None, std: Stats = None) -> np.ndarray:
    r"""An image as matplotlib draws it: channels-last, un-normalised, in [0, 1].

    Args:

        image (Tensor or numpy.ndarray): One image ``(C, H, W)`` or ``(1, C, H, W)``,
                    channels-first; ``C`` is 1 (grey) or 3. Integer images are taken
                    to be in 0..255.
        mean (float, sequence or Tensor, optional): The per-channel mean the image was
                    normalised with, e.g. ``(0.485, 0.456, 0.406)``.
                    Default: None (no un-normalisation)
        std (float, sequence or Tensor, optional): The per-channel standard deviation
                    the image was normalised with.
                    Default: None

    Returns:
        *numpy.ndarray* ``(H, W, C)`` (``(H, W)`` for a grey image), float32, clipped to
        [0, 1]: ``image * std + mean``.

    Examples::

        >>> from captum_legrad.viz import denormalize
        >>> rgb = denormalize(x[0], mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    """
    img = _tensor(image, "image")
    if img.dim() == 4 and img.shape[0] == 1:
        img = img[0]
    if img.dim() != 3 or img.shape[0] not in (1, 3):
        raise ValueError(
            f"image must be one channels-first image (C, H, W) with C = 1 or 3, got shape "
            f"{tuple(img.shape)}; pick one image of a batch with x[i]."
        )
    img = img.float() / 255.0 if not img.is_floating_point() else img.float()
    channels = img.shape[0]
    std_t = _stats(std, channels, "std")
    mean_t = _stats(mean, channels, "mean")
    if std_t is not None:
        img = img * std_t
    if mean_t is not None:
        img = img + mean_t
    img = img.clamp(0.0, 1.0)
    out = img.permute(1, 2, 0).numpy()
    return out[..., 0] if channels == 1 else out


def _map(attribution: ArrayLike, size: Tuple[int, int], what: str = "attribution") -> np.ndarray:
    """One map as ``(H, W)`` at the image's size (upsampled by torch if needed)."""
    amap = _tensor(attribution, what).float()
    if amap.dim() == 4 and amap.shape[0] == 1:
        amap = amap[0]
    if amap.dim() == 3:
        # (1, H, W) from output="map", or (C, H, W) from output="input" where every
        # channel holds the same map: their mean is that map.
        amap = amap.mean(0)
    if amap.dim() != 2:
        raise ValueError(
            f"{what} must be one map (H, W), (1, H, W), (C, H, W) or (1, C, H, W), got "
            f"shape {tuple(amap.shape)}; pick one image of a batch with attr[i]."
        )
    if tuple(amap.shape) != tuple(size):
        amap = upsample(amap[None, None], size)[0, 0]
    return amap.numpy()


def _draw(
    ax: Axes,
    rgb: np.ndarray,
    amap: Optional[np.ndarray],
    *,
    style: FigureStyle,
    vmin: Optional[float],
    vmax: Optional[float],
    title: Optional[str],
    colorbar: bool,
) -> None:
    ax.imshow(rgb, cmap="gray" if rgb.ndim == 2 else None, vmin=0.0, vmax=1.0)
    if amap is not None:
        image = ax.imshow(amap, cmap=style.cmap, alpha=style.alpha, vmin=vmin, vmax=vmax)
        if colorbar:
            ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if title is not None:
        ax.set_title(title, fontsize=style.title_size)
    ax.set_axis_off()


def _finish(fig: Figure, save: Optional[PathLike], dpi: int) -> Figure:
    if save is not None:
        fig.savefig(save, dpi=dpi, bbox_inches="tight")
    return fig


def overlay(
    image: ArrayLike,
    attribution: ArrayLike,
    *,
    mean: Stats = None,
    std: Stats = None,
    alpha: Optional[float] = None,
    cmap: Optional[str] = None,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    title: Optional[str] = None,
    colorbar: Optional[bool] = None,
    ax: Optional[Axes] = None,
    figsize: Optional[Tuple[float, float]] = None,
    save: Optional[PathLike] = None,
    dpi: Optional[int] = None,
    style: Optional[FigureStyle] = None,
) -> Figure:
    r"""Draw one map over its (un-normalised) image.

    Args:

        image (Tensor or numpy.ndarray): The image ``(C, H, W)`` or ``(1, C, H, W)``, as
                    given to the model.
        attribution (Tensor or numpy.ndarray): Its map: ``(H, W)``, ``(1, H, W)``
                    (``output="map"``), ``(C, H, W)`` (``output="input"``, the default) or
                    with a leading batch dimension of 1. A map of another size (e.g.
                    ``output="grid"``) is upsampled bilinearly to the image.
        mean (float, sequence or Tensor, optional): Normalisation mean to undo.
                    Default: None
        std (float, sequence or Tensor, optional): Normalisation std to undo.
                    Default: None
        alpha (float, optional): Opacity of the map.
                    Default: None (the style's, 0.5)
        cmap (str, optional): A matplotlib colour map name.
                    Default: None (the style's, "jet")
        vmin (float, optional): Value drawn with the colour map's first colour.
                    Default: None (the map's minimum)
        vmax (float, optional): Value drawn with the colour map's last colour.
                    Default: None (the map's maximum)
        title (str, optional): Title of the panel, e.g. the class name or prompt.
                    Default: None
        colorbar (bool, optional): Add a colour bar.
                    Default: None (the style's, False)
        ax (matplotlib.axes.Axes, optional): Draw into these axes instead of a new
                    figure; their figure is returned.
                    Default: None
        figsize (tuple[float, float], optional): Size of a new figure in inches.
                    Default: None (the style's ``panel_size`` squared, else (4.0, 4.0))
        save (str or os.PathLike, optional): Save the figure there (``.png``, ...).
                    Default: None
        dpi (int, optional): Resolution when saving.
                    Default: None (the style's, 100)
        style (FigureStyle, optional): The look of the figure; the keywords above
                    win over it.
                    Default: None (:class:`FigureStyle`'s defaults)

    Returns:
        *matplotlib.figure.Figure*: the figure drawn on.

    Examples::

        >>> from captum_legrad import LeGrad
        >>> from captum_legrad.viz import overlay
        >>> attr = LeGrad(model).attribute(x, target=3)
        >>> fig = overlay(x[0], attr[0], mean=MEAN, std=STD, title="class 3",
        ...               save="legrad.png")
    """
    s = _resolve(style, alpha=alpha, cmap=cmap, vmin=vmin, vmax=vmax, colorbar=colorbar, dpi=dpi)
    rgb = denormalize(image, mean, std)
    amap = _map(attribution, (rgb.shape[0], rgb.shape[1]))
    if ax is None:
        side = _panel(s, 4.0)
        fig = _matplotlib()(figsize=figsize or (side, side), layout="constrained")
        ax = fig.add_subplot()
    else:
        _matplotlib()
        parent: Any = ax.figure
        fig = parent.figure  # the root figure, also when ``ax`` lies in a subfigure
    _draw(
        ax,
        rgb,
        amap,
        style=s,
        vmin=s.vmin,
        vmax=s.vmax,
        title=title,
        colorbar=s.colorbar,
    )
    return _finish(fig, save, s.dpi)


def _batched(value: ArrayLike, dims: int, what: str) -> Tensor:
    tensor = _tensor(value, what)
    return tensor.unsqueeze(0) if tensor.dim() == dims - 1 else tensor


def plot_targets(
    images: ArrayLike,
    maps: ArrayLike,
    labels: Optional[Sequence[str]] = None,
    *,
    mean: Stats = None,
    std: Stats = None,
    show_image: bool = True,
    alpha: Optional[float] = None,
    cmap: Optional[str] = None,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    panel_size: Optional[float] = None,
    save: Optional[PathLike] = None,
    dpi: Optional[int] = None,
    style: Optional[FigureStyle] = None,
) -> Figure:
    r"""A grid of K targets: one row per image, one column per class name or prompt.

    Args:

        images (Tensor or numpy.ndarray): ``(B, C, H, W)`` or one image ``(C, H, W)``.
        maps (Tensor or numpy.ndarray): The maps of
                    :meth:`~captum_legrad.LeGrad.attribute_multi`: ``(B, K, H, W)``
                    (``output="map"``, its default), ``(B, K, g_h, g_w)`` (``"grid"``,
                    upsampled here), ``(B, K, C, H, W)`` (``"input"``); for one image
                    ``(C, H, W)``, the same without ``B``.
        labels (sequence of str, optional): The K column titles: class names or
                    prompts, in the order of the targets.
                    Default: None ("target 0", "target 1", ...)
        mean (float, sequence or Tensor, optional): Normalisation mean to undo.
                    Default: None
        std (float, sequence or Tensor, optional): Normalisation std to undo.
                    Default: None
        show_image (bool, optional): Add a first column with the plain image.
                    Default: True
        alpha (float, optional): Opacity of the maps.
                    Default: None (the style's, 0.5)
        cmap (str, optional): A matplotlib colour map name.
                    Default: None (the style's, "jet")
        vmin (float, optional): As in :func:`overlay`.
                    Default: None
        vmax (float, optional): As in :func:`overlay`.
                    Default: None
        panel_size (float, optional): Width and height of one panel in inches.
                    Default: None (the style's, else 2.5)
        save (str or os.PathLike, optional): Save the figure there.
                    Default: None
        dpi (int, optional): Resolution when saving.
                    Default: None (the style's, 100)
        style (FigureStyle, optional): The look of the figure; the keywords above
                    win over it.
                    Default: None (:class:`FigureStyle`'s defaults)

    Returns:
        *matplotlib.figure.Figure* with ``B`` rows and ``K`` (+1) columns.

    Examples::

        >>> from captum_legrad.viz import plot_targets
        >>> prompts = ["a cat", "a dog", "a remote"]
        >>> maps = LeGrad(sim).attribute_multi(x, targets=[0, 1, 2])
        >>> fig = plot_targets(x, maps, prompts, mean=MEAN, std=STD, save="prompts.png")
    """
    s = _resolve(style, alpha=alpha, cmap=cmap, vmin=vmin, vmax=vmax, dpi=dpi)
    panel_size = _panel(s, 2.5)
    one_image = _tensor(images, "images").dim() == 3
    imgs = _batched(images, 4, "images")
    grid = _tensor(maps, "maps")
    if one_image:  # (K, H, W) or (K, C, H, W) for one image
        grid = grid.unsqueeze(0)
    if grid.dim() == 5:
        grid = grid.float().mean(2)
    if grid.dim() != 4 or grid.shape[0] != imgs.shape[0]:
        raise ValueError(
            f"maps must be (B, K, H, W) for the {imgs.shape[0]} image(s), got shape "
            f"{tuple(_tensor(maps, 'maps').shape)}."
        )
    k = grid.shape[1]
    names: List[str] = [f"target {i}" for i in range(k)] if labels is None else list(labels)
    if len(names) != k:
        raise ValueError(f"{len(names)} labels for {k} maps: give one label per target.")
    rows, cols = imgs.shape[0], k + int(show_image)
    fig = _matplotlib()(figsize=(panel_size * cols, panel_size * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for row in range(rows):
        rgb = denormalize(imgs[row], mean, std)
        size = (rgb.shape[0], rgb.shape[1])
        if show_image:
            _draw(
                axes[row, 0],
                rgb,
                None,
                style=s,
                vmin=s.vmin,
                vmax=s.vmax,
                title="image" if row == 0 else None,
                colorbar=False,
            )
        for j in range(k):
            _draw(
                axes[row, j + int(show_image)],
                rgb,
                _map(grid[row, j], size, "maps"),
                style=s,
                vmin=s.vmin,
                vmax=s.vmax,
                title=names[j] if row == 0 else None,
                colorbar=False,
            )
    return _finish(fig, save, s.dpi)


def plot_layers(
    image: ArrayLike,
    layer_maps: ArrayLike,
    layers: Optional[Sequence[int]] = None,
    *,
    mean: Stats = None,
    std: Stats = None,
    show_sum: bool = True,
    ncols: Optional[int] = None,
    alpha: Optional[float] = None,
    cmap: Optional[str] = None,
    panel_size: Optional[float] = None,
    save: Optional[PathLike] = None,
    dpi: Optional[int] = None,
    style: Optional[FigureStyle] = None,
) -> Figure:
    r"""The per-layer maps of one image, from :meth:`~captum_legrad.LeGrad.attribute_layers`.

    Each layer's map is unnormalised (their scales differ by orders of magnitude), so each
    panel is coloured from its own minimum to its own maximum. The optional last panel is
    their sum: LeGrad's map.

    Args:

        image (Tensor or numpy.ndarray): The image ``(C, H, W)`` or ``(1, C, H, W)``.
        layer_maps (Tensor or numpy.ndarray): ``(n_layers, g_h, g_w)`` or ``(1,
                    n_layers, g_h, g_w)`` (one image of ``attribute_layers``' output).
        layers (sequence of int, optional): The block index of each map, for the titles;
                    pass ``legrad.layers``.
                    Default: None (0, 1, ...)
        mean (float, sequence or Tensor, optional): Normalisation mean to undo.
                    Default: None
        std (float, sequence or Tensor, optional): Normalisation std to undo.
                    Default: None
        show_sum (bool, optional): Add a panel with the sum over the layers.
                    Default: True
        ncols (int, optional): Panels per row.
                    Default: None (up to 6)
        alpha (float, optional): Opacity of the maps.
                    Default: None (the style's, 0.5)
        cmap (str, optional): A matplotlib colour map name.
                    Default: None (the style's, "jet")
        panel_size (float, optional): Width and height of one panel in inches.
                    Default: None (the style's, else 2.5)
        save (str or os.PathLike, optional): Save the figure there.
                    Default: None
        dpi (int, optional): Resolution when saving.
                    Default: None (the style's, 100)
        style (FigureStyle, optional): The look of the figure; the keywords above
                    win over it.
                    Default: None (:class:`FigureStyle`'s defaults)

    Returns:
        *matplotlib.figure.Figure* with one panel per layer (and the sum).

    Examples::

        >>> from captum_legrad.viz import plot_layers
        >>> legrad = LeGrad(model)
        >>> per_layer = legrad.attribute_layers(x, target=3)  # (B, n_layers, g_h, g_w)
        >>> fig = plot_layers(x[0], per_layer[0], legrad.layers, save="layers.png")
    """
    s = _resolve(style, alpha=alpha, cmap=cmap, dpi=dpi)
    panel_size = _panel(s, 2.5)
    per_layer = _tensor(layer_maps, "layer_maps").float()
    if per_layer.dim() == 4 and per_layer.shape[0] == 1:
        per_layer = per_layer[0]
    if per_layer.dim() != 3:
        raise ValueError(
            f"layer_maps must be (n_layers, g_h, g_w) for one image, got shape "
            f"{tuple(per_layer.shape)}; pick one image with per_layer[i]."
        )
    n = per_layer.shape[0]
    blocks = list(range(n)) if layers is None else list(layers)
    if len(blocks) != n:
        raise ValueError(f"{len(blocks)} layer indices for {n} maps.")
    panels = [(f"block {b}", per_layer[i]) for i, b in enumerate(blocks)]
    if show_sum:
        panels.append(("sum", per_layer.sum(0)))
    cols = ncols if ncols is not None else min(len(panels), 6)
    rows = -(-len(panels) // cols)
    rgb = denormalize(image, mean, std)
    size = (rgb.shape[0], rgb.shape[1])
    fig = _matplotlib()(figsize=(panel_size * cols, panel_size * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (title, amap) in zip(axes, panels):
        _draw(
            ax,
            rgb,
            _map(amap, size, "layer_maps"),
            style=s,
            vmin=None,
            vmax=None,
            title=title,
            colorbar=False,
        )
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    return _finish(fig, save, s.dpi)


def plot_methods(
    images: ArrayLike,
    columns: Mapping[str, ArrayLike],
    row_labels: Optional[Sequence[str]] = None,
    *,
    masks: Optional[ArrayLike] = None,
    mean: Stats = None,
    std: Stats = None,
    alpha: Optional[float] = None,
    cmap: Optional[str] = None,
    panel_size: Optional[float] = None,
    title: Optional[str] = None,
    colorbar: Optional[bool] = None,
    save: Optional[PathLike] = None,
    dpi: Optional[int] = None,
    style: Optional[FigureStyle] = None,
) -> Figure:
    r"""Methods side by side: one row per image, the image, then one column per method.

    Each map is min-max scaled to [0, 1] (methods differ in scale by orders of magnitude),
    so one colour bar serves all panels.

    Args:

        images (Tensor or numpy.ndarray): ``(N, C, H, W)``.
        columns (Mapping[str, Tensor or numpy.ndarray]): Method name → its ``(N, H, W)``,
                    ``(N, 1, H, W)`` or ``(N, C, H, W)`` maps, in column order.
        row_labels (sequence of str, optional): One label per row (e.g. the explained
                    class), drawn left of the image.
                    Default: None
        masks (Tensor or numpy.ndarray, optional): ``(N, H, W)`` ground-truth masks,
                    outlined in white on the image column.
                    Default: None
        mean (float, sequence or Tensor, optional): Normalisation mean to undo.
                    Default: None
        std (float, sequence or Tensor, optional): Normalisation std to undo.
                    Default: None
        alpha (float, optional): Opacity of the maps.
                    Default: None (the style's, 0.5)
        cmap (str, optional): A matplotlib colour map name.
                    Default: None (the style's, "jet")
        panel_size (float, optional): Width and height of one panel in inches.
                    Default: None (the style's, else 1.8)
        title (str, optional): The figure's title.
                    Default: None
        colorbar (bool, optional): Add one colour bar for all maps (right of the panels;
                    it adds one axes to ``fig.axes``).
                    Default: None (the style's, False)
        save (str or os.PathLike, optional): Save the figure there.
                    Default: None
        dpi (int, optional): Resolution when saving.
                    Default: None (the style's, 100)
        style (FigureStyle, optional): The look of the figure; the keywords above
                    win over it.
                    Default: None (:class:`FigureStyle`'s defaults)

    Returns:
        *matplotlib.figure.Figure* with ``N`` rows and ``1 + len(columns)`` columns.

    Examples::

        >>> from captum_legrad.viz import plot_methods
        >>> fig = plot_methods(x, {"LeGrad": legrad_maps, "GradCAM": gradcam_maps})
    """
    s = _resolve(style, alpha=alpha, cmap=cmap, colorbar=colorbar, dpi=dpi)
    panel_size = _panel(s, 1.8)
    imgs = _batched(images, 4, "images")
    rows = imgs.shape[0]
    names = list(columns)
    labels = list(row_labels) if row_labels is not None else None
    if labels is not None and len(labels) != rows:
        raise ValueError(f"{len(labels)} row labels for {rows} images: give one per image.")
    outlines = _tensor(masks, "masks").float() if masks is not None else None
    fig = _matplotlib()(
        figsize=(panel_size * (1 + len(names)), panel_size * rows), layout="constrained"
    )
    axes = fig.subplots(rows, 1 + len(names), squeeze=False)
    for row in range(rows):
        rgb = denormalize(imgs[row], mean, std)
        size = (rgb.shape[0], rgb.shape[1])
        _draw(
            axes[row, 0],
            rgb,
            None,
            style=s,
            vmin=None,
            vmax=None,
            title="image" if row == 0 else None,
            colorbar=False,
        )
        if outlines is not None:
            axes[row, 0].contour(outlines[row].numpy(), levels=[0.5], colors="white")
        if labels is not None:
            axes[row, 0].set_axis_on()
            axes[row, 0].set_xticks([])
            axes[row, 0].set_yticks([])
            axes[row, 0].set_ylabel(labels[row], fontsize=s.title_size)
        for col, name in enumerate(names, start=1):
            amap = _map(_tensor(columns[name], name)[row], size, name)
            low, high = float(np.nanmin(amap)), float(np.nanmax(amap))
            scaled = (amap - low) / (high - low) if high > low else np.zeros_like(amap)
            _draw(
                axes[row, col],
                rgb,
                scaled,
                style=s,
                vmin=0.0,
                vmax=1.0,
                title=name if row == 0 else None,
                colorbar=False,
            )
    if title is not None:
        fig.suptitle(title)
    if s.colorbar and names:
        image = axes[0, 1].get_images()[-1]
        bar = fig.colorbar(image, ax=axes[:, 1:], fraction=0.03, pad=0.02, shrink=0.9)
        bar.set_label("relevance (each map min-max scaled)", fontsize=s.title_size)
    return _finish(fig, save, s.dpi)


def plot_curves(
    fractions: Sequence[float],
    curves: Mapping[str, Tuple[ArrayLike, ArrayLike]],
    *,
    ylabel: str = "accuracy",
    title: Optional[str] = None,
    figsize: Optional[Tuple[float, float]] = None,
    save: Optional[PathLike] = None,
    dpi: Optional[int] = None,
    style: Optional[FigureStyle] = None,
) -> Figure:
    r"""Positive and negative perturbation curves, one line per method.

    Args:

        fractions (sequence of float): Fractions of patches removed (the x axis).
        curves (Mapping[str, tuple]): Method name → (positive curve, negative curve), each
                    with one value per fraction.
        ylabel (str, optional): What the curves measure.
                    Default: "accuracy"
        title (str, optional): The figure's title.
                    Default: None
        figsize (tuple[float, float], optional): Figure size in inches.
                    Default: None ((11.0, 4.0))
        save (str or os.PathLike, optional): Save the figure there.
                    Default: None
        dpi (int, optional): Resolution when saving.
                    Default: None (the style's, 100)
        style (FigureStyle, optional): The look of the figure; the keywords above
                    win over it.
                    Default: None (:class:`FigureStyle`'s defaults)

    Returns:
        *matplotlib.figure.Figure* with two panels (positive, negative) and the legend
        outside them, right of the panels, so that it covers no curve.

    Examples::

        >>> from captum_legrad.viz import plot_curves
        >>> fig = plot_curves([0.0, 0.1, 0.2], {"LeGrad": (pos, neg)}, save="curves.png")
    """
    s = _resolve(style, dpi=dpi)
    fig = _matplotlib()(figsize=figsize or (11.0, 4.0), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    x = [100 * f for f in fractions]
    for name, (positive, negative) in curves.items():
        for ax, curve in zip(axes, (positive, negative)):
            ax.plot(x, _tensor(curve, name).numpy(), marker="o", markersize=3, label=name)
    axes[0].set_title(
        "positive perturbation (most relevant removed first) ↓", fontsize=s.title_size
    )
    axes[1].set_title(
        "negative perturbation (least relevant removed first) ↑", fontsize=s.title_size
    )
    for ax in axes:
        ax.set_xlabel("% of patches removed")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    if title is not None:
        fig.suptitle(title)
    if curves:
        fig.legend(
            *axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=s.title_size
        )
    return _finish(fig, save, s.dpi)


def plot_photo(
    photo: Any,
    maps: ArrayLike,
    titles: Sequence[str],
    *,
    suptitle: Optional[str] = None,
    alpha: Optional[float] = None,
    cmap: Optional[str] = None,
    panel_height: Optional[float] = None,
    save: Optional[PathLike] = None,
    dpi: Optional[int] = None,
    style: Optional[FigureStyle] = None,
) -> Figure:
    r"""A photo, then one overlay per target, at the photo's own resolution and aspect.

    Maps are in [0, 1] with ``NaN`` where the model did not see the photo (the border its
    preprocessing cropped away); that region is greyed and hatched.

    Args:

        photo (PIL.Image, numpy.ndarray or Tensor): The photo: a PIL image, ``(h, w, 3)``
                    (uint8 or float in [0, 1]) or ``(3, h, w)`` in [0, 1].
        maps (Tensor or numpy.ndarray): ``(K, h, w)`` maps on the photo, values in [0, 1]
                    or ``NaN``.
        titles (sequence of str): One title per map (class name or prompt and score).
        suptitle (str, optional): The figure's title.
                    Default: None
        alpha (float, optional): Opacity of the maps.
                    Default: None (the style's, 0.5)
        cmap (str, optional): A matplotlib colour map name.
                    Default: None (the style's, "jet")
        panel_height (float, optional): Height of a panel in inches (the width follows
                    the photo's aspect ratio).
                    Default: None (the style's ``panel_size``, else 3.2)
        save (str or os.PathLike, optional): Save the figure there.
                    Default: None
        dpi (int, optional): Resolution when saving.
                    Default: None (the style's, 100)
        style (FigureStyle, optional): The look of the figure; the keywords above
                    win over it.
                    Default: None (:class:`FigureStyle`'s defaults)

    Returns:
        *matplotlib.figure.Figure* with ``1 + K`` panels, each overlay with a colour bar.

    Examples::

        >>> from captum_legrad.viz import plot_photo
        >>> fig = plot_photo(pil_image, maps, ["tabby cat\\nprobability 0.81"])
    """
    s = _resolve(style, alpha=alpha, cmap=cmap, dpi=dpi)
    panel_height = panel_height if panel_height is not None else _panel(s, 3.2)
    if isinstance(photo, (np.ndarray, Tensor)):
        rgb = _tensor(photo, "photo").float()
        if rgb.dim() == 3 and rgb.shape[0] in (1, 3) and rgb.shape[-1] not in (1, 3):
            rgb = rgb.permute(1, 2, 0)
        array = rgb.numpy()
        array = array / 255.0 if array.max() > 1.0 else array
    else:
        array = np.asarray(photo.convert("RGB"), dtype=np.float32) / 255.0
    grid = _tensor(maps, "maps").float()
    if grid.dim() == 2:
        grid = grid[None]
    height, width = array.shape[:2]
    if grid.dim() != 3 or tuple(grid.shape[1:]) != (height, width):
        raise ValueError(
            f"maps must be (K, {height}, {width}) like the photo, got {tuple(grid.shape)}"
        )
    if len(titles) != grid.shape[0]:
        raise ValueError(f"{len(titles)} titles for {grid.shape[0]} maps: give one per map.")
    from matplotlib import colormaps

    colours = colormaps[s.cmap].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    aspect = width / height
    panels = 1 + grid.shape[0]
    fig = _matplotlib()(
        figsize=(panels * panel_height * aspect * 1.25, panel_height + 0.8), layout="constrained"
    )
    axes = fig.subplots(1, panels, squeeze=False)[0]
    axes[0].imshow(array)
    axes[0].set_title(f"photo ({width}×{height})", fontsize=s.title_size)
    axes[0].set_axis_off()
    for ax, amap, title in zip(axes[1:], grid.numpy(), titles):
        ax.imshow(array)
        image = ax.imshow(np.ma.masked_invalid(amap), cmap=colours, alpha=s.alpha, vmin=0, vmax=1)
        unseen = np.isnan(amap)
        if unseen.any():
            grey = np.zeros((height, width, 4), dtype=np.float32)
            grey[unseen] = (0.5, 0.5, 0.5, 0.75)
            ax.imshow(grey)
            ax.contourf(unseen.astype(np.float32), levels=[0.5, 1.5], colors="none", hatches=["//"])
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
        bar.set_label("LeGrad relevance", fontsize=s.title_size)
        ax.set_title(title, fontsize=s.title_size)
        ax.set_axis_off()
    if suptitle is not None:
        fig.suptitle(suptitle)
    return _finish(fig, save, s.dpi)


def plot_answer(
    image: ArrayLike,
    maps: ArrayLike,
    tokens: Sequence[str],
    *,
    answer_map: Optional[ArrayLike] = None,
    mean: Stats = None,
    std: Stats = None,
    show_image: bool = True,
    columns: int = 6,
    alpha: Optional[float] = None,
    cmap: Optional[str] = None,
    panel_size: Optional[float] = None,
    title: Optional[str] = None,
    save: Optional[PathLike] = None,
    dpi: Optional[int] = None,
    style: Optional[FigureStyle] = None,
) -> Figure:
    r"""A vision-language model's answer: one overlay per answer token, in reading order.

    Args:

        image (Tensor or numpy.ndarray): The processed image ``(C, H, W)`` or
                    ``(1, C, H, W)`` (``pixel_values``).
        maps (Tensor or numpy.ndarray): ``(T, H, W)`` (or ``(1, T, H, W)``, as
                    ``attribute_multi`` returns for one image; grid-sized maps are
                    upsampled here): one map per answer token.
        tokens (sequence of str): The T answer tokens as text (panel titles).
        answer_map (Tensor or numpy.ndarray, optional): The whole answer's map, drawn
                    after the tokens.
                    Default: None
        mean (float, sequence or Tensor, optional): Normalisation mean to undo.
                    Default: None
        std (float, sequence or Tensor, optional): Normalisation std to undo.
                    Default: None
        show_image (bool, optional): Start with the plain image.
                    Default: True
        columns (int, optional): Panels per row; long answers wrap.
                    Default: 6
        alpha (float, optional): Opacity of the maps.
                    Default: None (the style's, 0.5)
        cmap (str, optional): A matplotlib colour map name.
                    Default: None (the style's, "jet")
        panel_size (float, optional): Width and height of one panel in inches.
                    Default: None (the style's, else 2.0)
        title (str, optional): Figure title, e.g. the question.
                    Default: None
        save (str or os.PathLike, optional): Save the figure there.
                    Default: None
        dpi (int, optional): Resolution when saving.
                    Default: None (the style's, 100)
        style (FigureStyle, optional): The look of the figure; the keywords above
                    win over it.
                    Default: None (:class:`FigureStyle`'s defaults)

    Returns:
        *matplotlib.figure.Figure* with one panel per token (plus the image and the
        whole-answer map).

    Examples::

        >>> from captum_legrad import explain_answer
        >>> from captum_legrad.viz import plot_answer
        >>> result = explain_answer(vlm, processor, image, prompt)
        >>> fig = plot_answer(result.pixel_values, result.maps, result.tokens,
        ...                   answer_map=result.answer_map, mean=MEAN, std=STD)
    """
    s = _resolve(style, alpha=alpha, cmap=cmap, dpi=dpi)
    panel_size = _panel(s, 2.0)
    img = _tensor(image, "image")
    if img.dim() == 4 and img.shape[0] == 1:
        img = img[0]
    stack = _tensor(maps, "maps")
    if stack.dim() == 4 and stack.shape[0] == 1:
        stack = stack[0]
    if stack.dim() != 3:
        raise ValueError(
            f"maps must be (T, H, W), one map per answer token, got shape {tuple(stack.shape)}."
        )
    names = list(tokens)
    if len(names) != stack.shape[0]:
        raise ValueError(f"{len(names)} tokens for {stack.shape[0]} maps: give one per map.")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}.")
    rgb = denormalize(img, mean, std)
    size = (rgb.shape[0], rgb.shape[1])
    panels: List[Tuple[Optional[np.ndarray], str]] = []
    if show_image:
        panels.append((None, "image"))
    panels += [(_map(stack[j], size, "maps"), repr(names[j])) for j in range(len(names))]
    if answer_map is not None:
        panels.append((_map(answer_map, size, "answer_map"), "whole answer"))
    cols = min(columns, len(panels))
    rows = -(-len(panels) // cols)
    fig = _matplotlib()(figsize=(panel_size * cols, panel_size * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for slot, ax in enumerate(axes.flat):
        if slot >= len(panels):
            ax.set_axis_off()
            continue
        amap, label = panels[slot]
        _draw(ax, rgb, amap, style=s, vmin=None, vmax=None, title=label, colorbar=False)
    if title is not None:
        fig.suptitle(title)
    return _finish(fig, save, s.dpi)


__all__ += ["plot_answer"]


# --------------------------------------------------------------------------- video and audio


def _frames(video: ArrayLike) -> np.ndarray:
    """A video as ``(T, H, W, 3)`` (or ``(T, H, W)`` grey) floats in [0, 1], un-normalised
    later: model layout ``(T, C, H, W)`` / ``(1, T, C, H, W)`` or decoded frames
    ``(T, H, W, 3)`` uint8."""
    clip = _tensor(video, "video")
    if clip.dim() == 5 and clip.shape[0] == 1:
        clip = clip[0]
    if clip.dim() != 4:
        raise ValueError(
            f"video must be one clip (T, C, H, W) as the model takes it, or frames (T, H, W, 3), "
            f"got shape {tuple(clip.shape)}; pick one clip of a batch with x[i]."
        )
    return clip.numpy()


def _video_rgb(video: ArrayLike, mean: Stats, std: Stats) -> List[np.ndarray]:
    clip = _frames(video)
    if clip.shape[-1] in (1, 3) and clip.shape[1] not in (1, 3):  # channels-last frames
        tensor = torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2)
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(clip))
    return [denormalize(frame, mean, std) for frame in tensor]


def _video_maps(
    maps: ArrayLike, frames: int, channels: int, size: Tuple[int, int], targets: Optional[int]
) -> np.ndarray:
    """Maps → ``(K, T, H, W)`` at the frames' size; a map with fewer time steps (a tubelet
    grid) gives each frame its tubelet's map."""
    grid = _tensor(maps, "maps").float()
    if grid.dim() == 6 and grid.shape[0] == 1:  # attribute_multi(..., output="input"), B=1
        grid = grid[0]
    if grid.dim() == 5:
        grid = grid.mean(2)  # (K, T, C, H, W): every channel holds the same map
    elif grid.dim() == 4 and grid.shape[0] == frames and grid.shape[1] == channels:
        if targets is None or targets == 1 or grid.shape[0] != targets:
            grid = grid.mean(1, keepdim=False)[None]  # (T, C, H, W): one target
    if grid.dim() == 3:
        grid = grid[None]
    if grid.dim() != 4:
        raise ValueError(
            "maps must be one target's (T, H, W) or (T, C, H, W), or K targets' (K, T, H, W) "
            f"or (K, T, C, H, W), got shape {tuple(_tensor(maps, 'maps').shape)}."
        )
    steps = grid.shape[1]
    if steps != frames:
        index = torch.tensor([i * steps // frames for i in range(frames)])
        grid = grid[:, index]
    if tuple(grid.shape[-2:]) != tuple(size):
        grid = upsample(grid.flatten(0, 1)[:, None], size)[:, 0].view(*grid.shape[:2], *size)
    return grid.numpy()


def _frame_title(
    position: int, indices: Optional[Sequence[int]], times: Optional[Sequence[float]]
) -> str:
    index = int(indices[position]) if indices is not None else position
    text = f"frame {index}"
    if times is not None:
        text += f"\n{float(times[position]):.2f} s"
    return text


def _shown(frames: int, chosen: Optional[Sequence[int]], max_columns: int) -> List[int]:
    if chosen is not None:
        picked = [int(i) for i in chosen]
        bad = [i for i in picked if not 0 <= i < frames]
        if bad:
            raise ValueError(f"frames {bad} are out of range for a clip of {frames} frames.")
        return picked
    if frames <= max_columns:
        return list(range(frames))
    return [int(i) for i in np.rint(np.linspace(0, frames - 1, max_columns))]


def plot_video(
    video: ArrayLike,
    maps: ArrayLike,
    labels: Optional[Sequence[str]] = None,
    *,
    times: Optional[Sequence[float]] = None,
    indices: Optional[Sequence[int]] = None,
    frames: Optional[Sequence[int]] = None,
    max_columns: int = 16,
    show_frames: bool = True,
    mean: Stats = None,
    std: Stats = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    panel_size: float = 1.6,
    title: Optional[str] = None,
    save: Optional[PathLike] = None,
    dpi: int = 100,
) -> Figure:
    r"""A video's map as a strip of frames: one column per frame, one row per target.

    All panels share one colour scale (a video's map is normalised over all its frames
    together, so a frame that is dim here is less relevant than a bright one) and one
    colour bar. Column titles name each frame's index in the clip and, with ``times``,
    its time in seconds.

    Args:

        video (Tensor or numpy.ndarray): One clip as the model takes it, ``(T, C, H, W)``
                    (or ``(1, T, C, H, W)``; HF video models' ``pixel_values``), or decoded
                    frames ``(T, H, W, 3)`` (uint8 or floats in [0, 1]).
        maps (Tensor or numpy.ndarray): One target's map ``(T, H, W)``
                    (``output="map"`` without its channel) or ``(T, C, H, W)``
                    (``output="input"``), or K targets' ``(K, T, H, W)`` or
                    ``(K, T, C, H, W)`` (``attribute_multi(...)[0]``). A map with fewer
                    time steps than frames (``output="grid"``: one step per tubelet) gives
                    each frame its tubelet's map; other spatial sizes are upsampled
                    bilinearly. A 4-D map whose first sizes are the clip's ``T`` and ``C``
                    is read as one target's ``(T, C, H, W)`` unless ``labels`` names ``T``
                    targets.
        labels (sequence of str, optional): One row label per target (class name).
                    Default: None ("target 0", ...)
        times (sequence of float, optional): Each frame's time in seconds (titles).
                    Default: None
        indices (sequence of int, optional): Each frame's index in the original clip
                    (titles), e.g. the sampled frame numbers.
                    Default: None (0, 1, ...)
        frames (sequence of int, optional): Which of the ``T`` frames to draw.
                    Default: None (all, or ``max_columns`` spread evenly)
        max_columns (int, optional): Most frames drawn when ``frames`` is not given.
                    Default: 16
        show_frames (bool, optional): A first row with the plain frames.
                    Default: True
        mean (float, sequence or Tensor, optional): Normalisation mean to undo.
                    Default: None
        std (float, sequence or Tensor, optional): Normalisation std to undo.
                    Default: None
        alpha (float, optional): Opacity of the maps.
                    Default: 0.5
        cmap (str, optional): A matplotlib colour map name.
                    Default: "jet"
        vmin (float, optional): Value of the colour map's first colour.
                    Default: None (the smallest value of all maps)
        vmax (float, optional): Value of the colour map's last colour.
                    Default: None (the largest value of all maps)
        panel_size (float, optional): Width and height of one panel in inches.
                    Default: 1.6
        title (str, optional): The figure's title.
                    Default: None
        save (str or os.PathLike, optional): Save the figure there.
                    Default: None
        dpi (int, optional): Resolution when saving.
                    Default: 100

    Returns:
        *matplotlib.figure.Figure* with ``K`` (+1) rows of frames and a colour bar (the
        last axes of ``fig.axes``).

    Examples::

        >>> from captum_legrad.viz import plot_video
        >>> x = processor(frames, return_tensors="pt")["pixel_values"]  # (1, T, C, H, W)
        >>> maps = LeGrad(model).attribute_multi(x, targets=[3, 7])     # (1, 2, T, C, H, W)
        >>> fig = plot_video(x[0], maps[0], ["class 3", "class 7"], mean=MEAN, std=STD,
        ...                  save="clip.png")
    """
    rgb = _video_rgb(video, mean, std)
    clip = _frames(video)
    channels = int(clip.shape[1]) if clip.shape[1] in (1, 3) else int(clip.shape[-1])
    size = (rgb[0].shape[0], rgb[0].shape[1])
    count = len(rgb)
    stack = _video_maps(maps, count, channels, size, len(labels) if labels is not None else None)
    k = stack.shape[0]
    names = [f"target {i}" for i in range(k)] if labels is None else list(labels)
    if len(names) != k:
        raise ValueError(f"{len(names)} labels for {k} maps: give one label per target.")
    for what, values in (("times", times), ("indices", indices)):
        if values is not None and len(values) != count:
            raise ValueError(f"{what} has {len(values)} entries for {count} frames.")
    shown = _shown(count, frames, max_columns)
    low = float(np.nanmin(stack)) if vmin is None else vmin
    high = float(np.nanmax(stack)) if vmax is None else vmax
    rows = k + int(show_frames)
    aspect = size[1] / size[0]
    fig = _matplotlib()(
        figsize=(panel_size * aspect * len(shown) + 1.2, panel_size * rows + 0.4),
        layout="constrained",
    )
    axes = fig.subplots(rows, len(shown), squeeze=False)
    image = None
    for col, position in enumerate(shown):
        if show_frames:
            ax = axes[0, col]
            ax.imshow(rgb[position], cmap="gray" if rgb[position].ndim == 2 else None)
            ax.set_xticks([])
            ax.set_yticks([])
        for row in range(k):
            ax = axes[row + int(show_frames), col]
            ax.imshow(rgb[position], cmap="gray" if rgb[position].ndim == 2 else None)
            image = ax.imshow(stack[row, position], cmap=cmap, alpha=alpha, vmin=low, vmax=high)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, col].set_title(_frame_title(position, indices, times), fontsize="small")
    if show_frames:
        axes[0, 0].set_ylabel("frames", fontsize="small")
    for row in range(k):
        axes[row + int(show_frames), 0].set_ylabel(names[row], fontsize="small")
    if image is not None:
        bar = fig.colorbar(image, ax=axes[int(show_frames) :, :], fraction=0.03, pad=0.01)
        bar.set_label("LeGrad relevance", fontsize="small")
    if title is not None:
        fig.suptitle(title)
    return _finish(fig, save, dpi)


def _compose(rgb: np.ndarray, amap: np.ndarray, colours: Any, alpha: float) -> np.ndarray:
    """One overlay frame, ``(H, W, 3)`` floats: the frame blended with the coloured map."""
    base = np.repeat(rgb[..., None], 3, axis=-1) if rgb.ndim == 2 else rgb
    coloured = np.asarray(colours(amap))[..., :3]
    seen = np.isfinite(amap)[..., None]
    blended = (1.0 - alpha) * base + alpha * coloured
    return np.where(seen, blended, base).astype(np.float32)


def overlay_frames(
    video: ArrayLike,
    maps: ArrayLike,
    *,
    mean: Stats = None,
    std: Stats = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
) -> np.ndarray:
    r"""One target's map blended into every frame of its clip, as images.

    Args:

        video (Tensor or numpy.ndarray): As in :func:`plot_video`.
        maps (Tensor or numpy.ndarray): One target's ``(T, H, W)`` or ``(T, C, H, W)``
                    map (fewer time steps or another spatial size as in
                    :func:`plot_video`).
        mean (float, sequence or Tensor, optional): Normalisation mean to undo.
                    Default: None
        std (float, sequence or Tensor, optional): Normalisation std to undo.
                    Default: None
        alpha (float, optional): Opacity of the map.
                    Default: 0.5
        cmap (str, optional): A matplotlib colour map name.
                    Default: "jet"
        vmin (float, optional): Value of the colour map's first colour.
                    Default: None (the map's minimum over all frames)
        vmax (float, optional): Value of the colour map's last colour.
                    Default: None (the map's maximum over all frames)

    Returns:
        *numpy.ndarray* ``(T, H, W, 3)`` uint8.

    Examples::

        >>> from captum_legrad.viz import overlay_frames
        >>> frames = overlay_frames(x[0], attr[0], mean=MEAN, std=STD)
    """
    _matplotlib()
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    rgb = _video_rgb(video, mean, std)
    clip = _frames(video)
    channels = int(clip.shape[1]) if clip.shape[1] in (1, 3) else int(clip.shape[-1])
    size = (rgb[0].shape[0], rgb[0].shape[1])
    stack = _video_maps(maps, len(rgb), channels, size, 1)
    if stack.shape[0] != 1:
        raise ValueError(f"one target's map is needed, got {stack.shape[0]}: pass maps[k].")
    norm = Normalize(
        vmin=float(np.nanmin(stack)) if vmin is None else vmin,
        vmax=float(np.nanmax(stack)) if vmax is None else vmax,
    )
    colours = colormaps[cmap]
    out = [
        _compose(frame, norm(amap).filled(np.nan), colours, alpha)
        for frame, amap in zip(rgb, stack[0])
    ]
    return (np.clip(np.stack(out), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _caption(frame: np.ndarray, text: str, colours: Any) -> np.ndarray:
    """The frame over a band with ``text`` and a colour bar (low → high)."""
    from PIL import Image, ImageDraw

    height, width = frame.shape[:2]
    band = 16
    canvas = np.full((height + band, width, 3), 255, dtype=np.uint8)
    canvas[:height] = frame
    bar_width = max(width // 4, 8)
    ramp = (np.asarray(colours(np.linspace(0.0, 1.0, bar_width)))[:, :3] * 255).astype(np.uint8)
    canvas[height + 4 : height + band - 4, width - bar_width - 2 : width - 2] = ramp[None]
    image = Image.fromarray(canvas)
    ImageDraw.Draw(image).text((2, height + 2), text, fill=(0, 0, 0))
    return np.asarray(image)


def animate_video(
    video: ArrayLike,
    maps: ArrayLike,
    path: PathLike,
    *,
    times: Optional[Sequence[float]] = None,
    indices: Optional[Sequence[int]] = None,
    fps: Optional[float] = None,
    min_size: int = 160,
    caption: bool = True,
    format: Optional[str] = None,
    mean: Stats = None,
    std: Stats = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
) -> str:
    r"""Write one target's map over its clip as an animation: GIF (Pillow) or MP4 (PyAV).

    Each frame of the clip becomes one frame of the animation (:func:`overlay_frames`, one
    colour scale for all frames), enlarged so that its shorter side is at least
    ``min_size`` pixels, with a caption band: the frame's position, its index in the
    clip, its time, and the colour bar (low → high). A GIF loops and plays anywhere (a
    browser, a README); an MP4 (H.264 where FFmpeg has it, else MPEG-4 part 2, yuv420p) is
    smaller for long clips and needs PyAV (the ``media`` extra).

    Args:

        video (Tensor or numpy.ndarray): As in :func:`plot_video`.
        maps (Tensor or numpy.ndarray): One target's map, as in :func:`overlay_frames`.
        path (str or os.PathLike): Where to write (``.gif`` or ``.mp4``).
        times (sequence of float, optional): Each frame's time in seconds (caption, and
                    the default frame rate).
                    Default: None
        indices (sequence of int, optional): Each frame's index in the clip (caption).
                    Default: None
        fps (float, optional): Frames per second of the animation.
                    Default: None (real time from ``times``, between 1 and 30; else 4)
        min_size (int, optional): Shorter side of the animation in pixels at least.
                    Default: 160
        caption (bool, optional): Add the caption band.
                    Default: True
        format (str, optional): ``"gif"`` or ``"mp4"``.
                    Default: None (from the suffix of ``path``)
        mean (float, sequence or Tensor, optional): Normalisation mean to undo.
                    Default: None
        std (float, sequence or Tensor, optional): Normalisation std to undo.
                    Default: None
        alpha (float, optional): Opacity of the map.
                    Default: 0.5
        cmap (str, optional): A matplotlib colour map name.
                    Default: "jet"
        vmin (float, optional): As in :func:`overlay_frames`.
                    Default: None
        vmax (float, optional): As in :func:`overlay_frames`.
                    Default: None

    Returns:
        *str*: the path written.

    Examples::

        >>> from captum_legrad.viz import animate_video
        >>> animate_video(x[0], attr[0], "clip.gif", mean=MEAN, std=STD)
    """
    from matplotlib import colormaps
    from PIL import Image

    kind = (format or os.fspath(path).rsplit(".", 1)[-1]).lower()
    if kind not in ("gif", "mp4"):
        raise ValueError(f"animations are written as gif or mp4, got {kind!r}.")
    frames = overlay_frames(
        video, maps, mean=mean, std=std, alpha=alpha, cmap=cmap, vmin=vmin, vmax=vmax
    )
    count, height, width = frames.shape[:3]
    for what, values in (("times", times), ("indices", indices)):
        if values is not None and len(values) != count:
            raise ValueError(f"{what} has {len(values)} entries for {count} frames.")
    if fps is None:
        span = float(times[-1]) - float(times[0]) if times is not None and count > 1 else 0.0
        fps = min(max((count - 1) / span, 1.0), 30.0) if span > 0 else 4.0
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}.")
    scale = max(1, -(-min_size // min(height, width)))
    images = []
    for position, frame in enumerate(frames):
        image = Image.fromarray(frame)
        if scale > 1:
            image = image.resize((width * scale, height * scale), Image.Resampling.BILINEAR)
        array = np.asarray(image)
        if caption:
            index = int(indices[position]) if indices is not None else position
            text = f"{position + 1}/{count}  frame {index}"
            if times is not None:
                text += f"  {float(times[position]):.2f} s"
            array = _caption(array, text, colours=colormaps[cmap])
        images.append(array)
    if kind == "gif":
        # one palette per frame by fast octree quantisation: Pillow's default (median cut)
        # takes seconds per large frame
        first, *rest = [
            Image.fromarray(a).quantize(256, method=Image.Quantize.FASTOCTREE) for a in images
        ]
        first.save(
            path,
            format="GIF",
            save_all=True,
            append_images=rest,
            duration=max(round(1000.0 / fps), 20),
            loop=0,
            disposal=1,
        )
    else:
        _write_mp4(images, path, fps)
    return os.fspath(path)


def _write_mp4(images: Sequence[np.ndarray], path: PathLike, fps: float) -> None:
    from fractions import Fraction

    try:
        import av
    except ImportError as error:
        raise ImportError(
            "writing MP4 needs PyAV: install the 'media' extra: pip install "
            '"captum-legrad[media]" (or pip install av), or write a .gif.'
        ) from error
    height, width = images[0].shape[:2]
    even = (height + height % 2, width + width % 2)  # yuv420p needs even sides
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(os.fspath(path), mode="w", format="mp4") as container:
        stream: Any = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = even
        stream.pix_fmt = "yuv420p"
        for array in images:
            padded = np.zeros((*even, 3), dtype=np.uint8)
            padded[:height, :width] = array
            for packet in stream.encode(av.VideoFrame.from_ndarray(padded, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _kaldi_mel(hz: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_bin_of(
    hz: float, bins: int, sampling_rate: int, fmin: float = 20.0, fmax: Optional[float] = None
) -> float:
    """The (fractional) mel bin whose centre is ``hz`` on Kaldi's mel scale
    (``1127 ln(1 + f / 700)``, ``bins`` triangular filters from ``fmin`` to ``fmax``, the
    Nyquist frequency by default), as ``torchaudio.compliance.kaldi.fbank`` and the Audio
    Spectrogram Transformer's feature extractor build them."""
    top = sampling_rate / 2.0 if fmax is None else fmax
    low, high = _kaldi_mel(np.array(fmin)), _kaldi_mel(np.array(top))
    step = (high - low) / (bins + 1)
    return float((_kaldi_mel(np.array(hz)) - low) / step - 1.0)


def plot_spectrogram(
    spectrogram: ArrayLike,
    maps: ArrayLike,
    labels: Optional[Sequence[str]] = None,
    *,
    sampling_rate: int = 16000,
    hop_length: Optional[int] = None,
    frequency: str = "mel",
    fmin: float = 20.0,
    fmax: Optional[float] = None,
    duration: Optional[float] = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    spectrogram_cmap: str = "gray",
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    figsize: Optional[Tuple[float, float]] = None,
    title: Optional[str] = None,
    save: Optional[PathLike] = None,
    dpi: int = 100,
) -> Figure:
    r"""An audio map over its spectrogram: time (s) across, frequency up, a colour bar.

    The first panel is the spectrogram alone, then one panel per target with its map over
    the spectrogram; all panels share the time axis and one colour scale. With
    ``duration``, the padding after the end of the audio (feature extractors pad to a
    fixed length) is hatched.

    Args:

        spectrogram (Tensor or numpy.ndarray): ``(time, mel)``, as the Audio Spectrogram
                    Transformer takes it (``input_values``; ``(1, time, mel)`` too).
        maps (Tensor or numpy.ndarray): In the same layout: one target's ``(time, mel)``
                    (``output="input"``) or K targets' ``(K, time, mel)``
                    (``attribute_multi(..., output="input")[0]``).
        labels (sequence of str, optional): One title per target.
                    Default: None ("target 0", ...)
        sampling_rate (int, optional): The audio's sampling rate (Hz).
                    Default: 16000
        hop_length (int, optional): Samples between spectrogram frames.
                    Default: None (10 ms: ``sampling_rate // 100``, Kaldi's frame shift)
        frequency (str, optional): ``"mel"`` (the axis counts mel bins) or ``"hz"`` (the
                    same axis labelled in Hz at the bins' centres, Kaldi's mel scale from
                    ``fmin`` to ``fmax``; see :func:`mel_bin_of`).
                    Default: "mel"
        fmin (float, optional): Lowest filter frequency (Hz), for ``frequency="hz"``.
                    Default: 20.0
        fmax (float, optional): Highest filter frequency (Hz).
                    Default: None (the Nyquist frequency)
        duration (float, optional): The audio's length in seconds; later frames are
                    padding and hatched.
                    Default: None
        alpha (float, optional): Opacity of the maps.
                    Default: 0.5
        cmap (str, optional): The maps' colour map.
                    Default: "jet"
        spectrogram_cmap (str, optional): The spectrogram's colour map.
                    Default: "gray"
        vmin (float, optional): Value of the colour map's first colour.
                    Default: None (the smallest value of all maps)
        vmax (float, optional): Value of the colour map's last colour.
                    Default: None (the largest value of all maps)
        figsize (tuple[float, float], optional): Figure size in inches.
                    Default: None (10 wide, 2.2 per panel)
        title (str, optional): The figure's title.
                    Default: None
        save (str or os.PathLike, optional): Save the figure there.
                    Default: None
        dpi (int, optional): Resolution when saving.
                    Default: 100

    Returns:
        *matplotlib.figure.Figure* with ``1 + K`` panels and a colour bar (the last axes).

    Examples::

        >>> from captum_legrad.viz import plot_spectrogram
        >>> x = extractor(wave, sampling_rate=16000, return_tensors="pt")["input_values"]
        >>> maps = LeGrad(ast).attribute_multi(x, targets=[0, 5], output="input")
        >>> fig = plot_spectrogram(x[0], maps[0], ["Speech", "Music"], frequency="hz")
    """
    if frequency not in ("mel", "hz"):
        raise ValueError(f"frequency must be 'mel' or 'hz', got {frequency!r}.")
    spec = _tensor(spectrogram, "spectrogram").float()
    if spec.dim() == 3 and spec.shape[0] == 1:
        spec = spec[0]
    if spec.dim() != 2:
        raise ValueError(
            f"spectrogram must be (time, mel), got shape {tuple(spec.shape)}; pick one clip "
            "of a batch with x[i]."
        )
    stack = _tensor(maps, "maps").float()
    if stack.dim() == 4 and stack.shape[0] == 1:
        stack = stack[0]
    if stack.dim() == 2:
        stack = stack[None]
    if stack.dim() != 3 or tuple(stack.shape[1:]) != tuple(spec.shape):
        raise ValueError(
            f"maps must be (time, mel) or (K, time, mel) like the spectrogram "
            f"{tuple(spec.shape)}, got {tuple(_tensor(maps, 'maps').shape)}; use "
            'output="input" for maps in the spectrogram\'s layout.'
        )
    k = stack.shape[0]
    names = [f"target {i}" for i in range(k)] if labels is None else list(labels)
    if len(names) != k:
        raise ValueError(f"{len(names)} labels for {k} maps: give one label per target.")
    steps, bins = spec.shape
    hop = hop_length if hop_length is not None else sampling_rate // 100
    seconds = steps * hop / float(sampling_rate)
    extent = (0.0, seconds, -0.5, bins - 0.5)
    low = float(np.nanmin(stack.numpy())) if vmin is None else vmin
    high = float(np.nanmax(stack.numpy())) if vmax is None else vmax
    fig = _matplotlib()(figsize=figsize or (10.0, 2.2 * (1 + k) + 0.4), layout="constrained")
    axes = fig.subplots(1 + k, 1, sharex=True, squeeze=False)[:, 0]
    image = None
    for row, ax in enumerate(axes):
        ax.imshow(
            spec.T.numpy(), origin="lower", aspect="auto", extent=extent, cmap=spectrogram_cmap
        )
        if row == 0:
            ax.set_title("spectrogram", fontsize="small")
        else:
            image = ax.imshow(
                stack[row - 1].T.numpy(),
                origin="lower",
                aspect="auto",
                extent=extent,
                cmap=cmap,
                alpha=alpha,
                vmin=low,
                vmax=high,
            )
            ax.set_title(names[row - 1], fontsize="small")
        if duration is not None and duration < seconds:
            ax.axvspan(duration, seconds, facecolor="none", edgecolor="white", hatch="//")
        if frequency == "mel":
            ax.set_ylabel("mel bin")
        else:
            top = sampling_rate / 2.0 if fmax is None else fmax
            marks = [f for f in (100, 250, 500, 1000, 2000, 4000, 8000, 16000) if fmin < f < top]
            ax.set_yticks([mel_bin_of(f, bins, sampling_rate, fmin, fmax) for f in marks])
            ax.set_yticklabels([f"{f:g}" for f in marks])
            ax.set_ylabel("frequency (Hz)")
        ax.set_ylim(-0.5, bins - 0.5)
    axes[-1].set_xlabel("time (s)")
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes), fraction=0.03, pad=0.01)
        bar.set_label("LeGrad relevance", fontsize="small")
    if title is not None:
        fig.suptitle(title)
    return _finish(fig, save, dpi)


__all__ += ["plot_video", "overlay_frames", "animate_video", "plot_spectrogram", "mel_bin_of"]


def blend(
    image: ArrayLike,
    attribution: ArrayLike,
    *,
    mean: Stats = None,
    std: Stats = None,
    alpha: Optional[float] = None,
    cmap: Optional[str] = None,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    style: Optional[FigureStyle] = None,
) -> np.ndarray:
    r"""The overlay of :func:`overlay` as an RGB array instead of a figure (for web pages,
    image files and galleries): ``(1 - alpha) * image + alpha * colours(map)``.

    Args:

        image (Tensor or numpy.ndarray): The image ``(C, H, W)`` or ``(1, C, H, W)``, as
                    given to the model.
        attribution (Tensor or numpy.ndarray): Its map, as for :func:`overlay` (a map of
                    another size is upsampled bilinearly to the image).
        mean (float, sequence or Tensor, optional): Normalisation mean to undo.
                    Default: None
        std (float, sequence or Tensor, optional): Normalisation std to undo.
                    Default: None
        alpha (float, optional): Opacity of the map, 0..1.
                    Default: the style's (0.5)
        cmap (str, optional): A matplotlib colour map name.
                    Default: the style's ("jet")
        vmin (float, optional): Value drawn with the colour map's first colour.
                    Default: the style's (None: the map's minimum)
        vmax (float, optional): Value drawn with the colour map's last colour.
                    Default: the style's (None: the map's maximum)
        style (FigureStyle, optional): Colour map, opacity and range in one object; the
                    keywords above win over it.
                    Default: None (``FigureStyle()``)

    Returns:
        *numpy.ndarray*: ``(H, W, 3)`` float32 RGB in ``[0, 1]``.

    Examples::

        >>> from PIL import Image
        >>> from captum_legrad.viz import blend
        >>> rgb = blend(x[0], attr[0], mean=MEAN, std=STD, alpha=0.5)
        >>> Image.fromarray((rgb * 255).round().astype("uint8")).save("legrad.png")
    """
    _matplotlib()
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    rgb = denormalize(image, mean, std)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    amap = _map(attribution, (rgb.shape[0], rgb.shape[1]))
    s = _resolve(style, alpha=alpha, cmap=cmap, vmin=vmin, vmax=vmax)
    scale = Normalize(vmin=s.vmin, vmax=s.vmax, clip=True)
    colours = np.asarray(colormaps[s.cmap](scale(amap))[..., :3], dtype=np.float32)
    mixed = (1 - s.alpha) * rgb + s.alpha * colours
    return np.asarray(np.clip(mixed, 0.0, 1.0), dtype=np.float32)


__all__ += ["blend"]
