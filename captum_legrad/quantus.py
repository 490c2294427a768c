"""LeGrad for `Quantus <https://github.com/understandable-machine-intelligence-lab/Quantus>`_,
the metrics library of XAI papers: :func:`explain_func`.

Every Quantus metric takes an ``explain_func`` and calls it on numpy batches as
``explain_func(model=model, inputs=x_batch, targets=y_batch, **explain_func_kwargs)``
(``device`` added to the keywords when the metric is given one), expecting a numpy array
of attributions with the batch first and as many dimensions as the inputs. So one
argument runs any metric on LeGrad maps of any model LeGrad explains (score wrappers
included)::

    import quantus
    from captum_legrad.quantus import explain_func

    metric = quantus.PointingGame()
    scores = metric(model=model, x_batch=x, y_batch=y, s_batch=masks,
                    explain_func=explain_func,
                    explain_func_kwargs={"layers": [-2, -1], "pooling": "mean"})

Needs ``pip install "captum-legrad[quantus]"``; the package root never imports this module.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

try:
    import quantus as _quantus  # noqa: F401  (what this module is for; fail early and clearly)
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "captum_legrad.quantus needs Quantus: install the extra with "
        '`pip install "captum-legrad[quantus]"` (or `pip install quantus`).'
    ) from error

from .attribution import LeGrad
from .spec import ViTSpec

__all__ = ["explain_func", "QUANTUS_KEYWORDS"]

#: Keywords of ``quantus.explain`` that mean nothing for LeGrad and are accepted as they
#: are: the library and method names, their options, the channel reduction (a LeGrad map has
#: one channel already).
QUANTUS_KEYWORDS = ("xai_lib", "method", "xai_lib_kwargs", "reduce_axes", "keepdims")


def _device(model: Any, device: Optional[Union[str, torch.device]]) -> torch.device:
    """The model's own device (LeGrad never moves a model); ``device`` for one without
    parameters or buffers."""
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", None)
    if isinstance(module, torch.nn.Module):
        for tensor in (*module.parameters(), *module.buffers()):
            return tensor.device
    return torch.device(device) if device is not None else torch.device("cpu")


def _dtype(model: Any) -> torch.dtype:
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", None)
    if isinstance(module, torch.nn.Module):
        for parameter in module.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
    return torch.float32


def explain_func(
    model: Callable[..., Tensor],
    inputs: Union[np.ndarray, Tensor],
    targets: Union[np.ndarray, Tensor, Sequence[int], int, None],
    *,
    device: Optional[Union[str, torch.device]] = None,
    layers: Optional[Sequence[int]] = None,
    pooling: str = "mean",
    output: str = "map",
    interpolate_mode: str = "bilinear",
    normalize: bool = True,
    route: str = "lean",
    spec: Optional[ViTSpec] = None,
    internal_batch_size: Optional[int] = None,
    channel_first: Optional[bool] = None,
    softmax: Optional[bool] = None,
    **quantus_kwargs: Any,
) -> np.ndarray:
    r"""LeGrad maps of ``inputs`` as a numpy array, in the form Quantus calls ``explain_func``.

    Args:
        model (Callable): What the metric explains: a model or a score wrapper LeGrad
                    takes (``LeGrad(model)``), e.g. the bundled classifier,
                    :class:`~captum_legrad.ImageImageSimilarity`,
                    :class:`~captum_legrad.ImageTextSimilarity`. It is neither moved nor
                    changed.
        inputs (np.ndarray or Tensor): ``(B, C, H, W)`` images, as the metric passes them
                    (``(B, H, W, C)`` with ``channel_first=False``).
        targets (np.ndarray, Tensor, sequence or int): One target per sample
                    (``y_batch``), or one for all.
        device (str or torch.device, optional): What Quantus passes (its ``device=``).
                    The maps are computed on the model's own device; ``device`` is used
                    only for a model without parameters.
                    Default: None
        layers (Sequence[int], optional): As in :class:`~captum_legrad.LeGrad`.
                    Default: None (all layers)
        pooling (str, optional): As in :class:`~captum_legrad.LeGrad`.
                    Default: "mean"
        output (str, optional): ``"map"``: ``(B, 1, H, W)``, one value per pixel, which
                    every metric expands over the channels; ``"input"``: ``(B, C, H, W)``.
                    Default: "map"
        interpolate_mode (str, optional): As in :meth:`~captum_legrad.LeGrad.attribute`.
                    Default: "bilinear"
        normalize (bool, optional): Min-max normalise each map, as in
                    :meth:`~captum_legrad.LeGrad.attribute`.
                    Default: True
        route (str, optional): As in :class:`~captum_legrad.LeGrad`.
                    Default: "lean"
        spec (ViTSpec, optional): As in :class:`~captum_legrad.LeGrad`.
                    Default: None
        internal_batch_size (int, optional): As in
                    :meth:`~captum_legrad.LeGrad.attribute`.
                    Default: None
        channel_first (bool, optional): Quantus' layout flag: ``False`` for ``(B, H, W,
                    C)`` inputs, whose maps are then ``(B, H, W, 1)`` (or ``(B, H, W,
                    C)``). Default: None (channel first, what the metrics pass).
        softmax (bool, optional): Quantus' flag; LeGrad explains the scores themselves,
                    never a softmax of them, so only ``None`` / ``False`` are accepted.
                    Default: None
        **quantus_kwargs: The other keywords of ``quantus.explain``
                    (:data:`QUANTUS_KEYWORDS`), accepted and unused.

    Returns:
        *np.ndarray* ``float32`` of the maps, detached, on the CPU: ``(B, 1, H, W)`` for
        ``output="map"``, ``(B, C, H, W)`` for ``"input"``.

    Raises:
        TypeError: A keyword that is neither a LeGrad option nor a Quantus one (a typo).
        ValueError: ``softmax=True``; inputs that are not a batch of images.

    Examples::

        >>> import quantus
        >>> from captum_legrad.quantus import explain_func
        >>> a = explain_func(model, x_batch, y_batch, layers=[-2, -1])  # (B, 1, H, W)
        >>> quantus.PixelFlipping(features_in_step=64)(
        ...     model=model, x_batch=x_batch, y_batch=y_batch,
        ...     explain_func=explain_func, device="cpu")
    """
    unknown = sorted(set(quantus_kwargs) - set(QUANTUS_KEYWORDS))
    if unknown:
        raise TypeError(
            f"captum_legrad.quantus.explain_func got unexpected keywords {unknown}: it takes "
            "LeGrad's options (layers, pooling, output, interpolate_mode, normalize, route, "
            "spec, internal_batch_size), device, and the keywords of quantus.explain "
            f"({', '.join(('channel_first', 'softmax', *QUANTUS_KEYWORDS))})."
        )
    if softmax:
        raise ValueError(
            "LeGrad explains the model's scores (logits or similarities), never a softmax of "
            "them: leave softmax unset (the metric's own softmax= affects only its "
            "predictions)."
        )
    place = _device(model, device)
    images = inputs if isinstance(inputs, Tensor) else torch.from_numpy(np.asarray(inputs))
    if images.dim() != 4:
        raise ValueError(
            f"explain_func takes a batch of images (B, C, H, W), got shape {tuple(images.shape)}."
        )
    if channel_first is False:
        images = images.permute(0, 3, 1, 2)
    images = images.to(device=place, dtype=_dtype(model))
    if isinstance(targets, Tensor):
        target: Any = targets.to(place).long().reshape(-1)
    elif targets is None or isinstance(targets, int):
        target = targets
    else:
        target = torch.as_tensor(np.asarray(targets), device=place).long().reshape(-1)
    if isinstance(target, Tensor) and target.numel() == 1:
        target = int(target.item())
    explainer = LeGrad(model, layers, pooling=pooling, spec=spec, route=route)
    maps = explainer.attribute(
        images,
        target=target,
        output=output,
        interpolate_mode=interpolate_mode,
        normalize=normalize,
        internal_batch_size=internal_batch_size,
    )
    assert isinstance(maps, Tensor)
    if channel_first is False:
        maps = maps.permute(0, 2, 3, 1)
    result: np.ndarray = maps.detach().float().cpu().numpy()
    return result
