"""Mistral 3 (Pixtral vision tower): one view per image, rows ended by ``[IMG_BREAK]``.

The processor resizes the whole image (aspect kept, each side rounded up to a multiple of
``patch_size · spatial_merge_size``) and reports that size in ``image_sizes``. Pixtral
embeds the ``h/p × w/p`` patches (the batch's padding cut off), and the 2×2 patch merger
(``spatial_merge_size``) folds them into an ``h/(p·m) × w/(p·m)`` grid, row-major. The text
holds each row's image tokens followed by ``[IMG_BREAK]`` (the last row by ``[IMG_END]``),
so the image-token placeholders are exactly the grid, and the one view covers the whole
image.
"""

from __future__ import annotations

from typing import Any, List, Mapping

from torch import Tensor

from ...views import SampleViews, ViewRules
from .vlm_tiles import ImageView, as_samples, padding_out, size_rows, split_images

__all__ = ["CLASSES", "pixtral_views", "pixtral_rules", "rules", "token_step"]


def pixtral_views(input_ids: Tensor, config: Any, image_sizes: Any) -> List[List[ImageView]]:
    """The view of every image of a Mistral 3 batch.

    Args:
        input_ids: ``(B, S)`` token ids as the processor builds them.
        config: The model's config (``image_token_id``, ``spatial_merge_size``,
            ``vision_config.patch_size``).
        image_sizes: ``(n_images, 2)``: each image's ``(h, w)`` after the processor's
            resize, as it returns them.

    Returns:
        Per sample, one ``"image"`` view per image, over the whole image (its grid's
        ``step`` pixels per cell).
    """
    step = int(config.vision_config.patch_size) * int(config.spatial_merge_size)
    sizes = [(int(h), int(w)) for h, w in size_rows(image_sizes)]
    grids = [(h // step, w // step) for h, w in sizes]
    images = split_images(
        input_ids, int(config.image_token_id), [g_h * g_w for g_h, g_w in grids], "Mistral 3"
    )
    views: List[List[ImageView]] = [[] for _ in range(input_ids.shape[0])]
    for image, ((sample, positions), grid, size) in enumerate(zip(images, grids, sizes)):
        box = (0.0, 0.0, float(grid[0] * step), float(grid[1] * step))
        views[sample].append(ImageView(image, positions, grid, box, size, "image"))
    return views


def pixtral_rules(config: Any) -> ViewRules:
    """The :class:`~captum_legrad.views.ViewRules` of a Mistral 3 model's ``config``:
    ``image_sizes`` as the processor returns them; ``pixel_values`` ``(n_images, C, H, W)``."""

    def describe(ids: Tensor, mask: Tensor, inputs: Mapping[str, Any]) -> List[SampleViews]:
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError(
                "Mistral 3's answer maps need image_sizes (each image's size after the "
                "processor's resize, which sets its token grid): pass the processor's "
                "image_sizes to AnswerLogits."
            )
        return as_samples(pixtral_views(padding_out(ids, mask), config, sizes))

    def to_input(canvases: List[List[Tensor]], name: str, inputs: Mapping[str, Any]) -> Tensor:
        pixels = inputs[name]  # (n_images, C, H, W), each image in its top-left corner
        images = [canvas for sample in canvases for canvas in sample]
        out = pixels.new_zeros((images[0].shape[0], *pixels.shape))
        for i, canvas in enumerate(images):
            height, width = canvas.shape[-2:]
            out[:, i, :, :height, :width] = canvas.unsqueeze(1)
        return out

    return ViewRules(
        describe=describe, main_input=lambda inputs: "pixel_values", batch_first=False,
        to_input=to_input,
    )  # fmt: skip


#: The classes this module describes.
CLASSES = ("Mistral3ForConditionalGeneration",)


def rules(config: Any) -> ViewRules:
    """The family's :class:`~captum_legrad.views.ViewRules` (:func:`pixtral_rules`)."""
    return pixtral_rules(config)


def token_step(config: Any) -> int:
    """1: the views' boxes carry the geometry (``VLMParts.grid`` is unused)."""
    return 1
