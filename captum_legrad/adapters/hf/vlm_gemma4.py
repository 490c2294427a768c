"""Gemma 4 (``Gemma4ForConditionalGeneration``): one pooled patch grid per image.

The image processor resizes every image, keeping its aspect ratio, to ``H_r × W_r`` (both
multiples of ``k·p``, at most ``max_soft_tokens · k²`` patches), cuts it into ``p × p``
patches, row-major, and pads the patch list to a fixed length; ``image_position_ids``
``(images, patches, 2)`` holds each patch's ``(x, y)`` (``-1`` for padding). The vision
tower average-pools the patches ``k × k`` by position (``pooling_kernel_size``): soft token
``x // k + (W_r/p // k) · (y // k)``, i.e. row-major on the ``H_r/(k·p) × W_r/(k·p)``
grid, padding dropped. The processor writes ``<boi>`` + ``<image>`` × tokens + ``<eoi>``:
one run of image tokens per image, covering the whole (stretched) image.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .vlm_tiles import ImageView, as_samples, image_size_of, runs

__all__ = ["CLASSES", "token_grids", "views", "rules", "token_step"]


def token_grids(image_position_ids: Tensor, pooling: int) -> List[Tuple[int, int]]:
    """Each image's soft-token grid ``(g_h, g_w)`` from the processor's patch positions."""
    grids = []
    for positions in image_position_ids:
        valid = positions[(positions != -1).all(dim=-1)]
        if valid.numel() == 0:
            raise ValueError("An image of image_position_ids has no patch (all -1).")
        width = int(valid[:, 0].max()) + 1
        height = int(valid[:, 1].max()) + 1
        if height % pooling or width % pooling:
            raise ValueError(
                f"A Gemma 4 image is {height}x{width} patches, not a multiple of the pooling "
                f"kernel {pooling}: build the inputs with the model's image processor."
            )
        grids.append((height // pooling, width // pooling))
    return grids


def views(
    input_ids: Tensor,
    image_token_id: int,
    image_position_ids: Tensor,
    pooling: int,
    patch: int,
    image_sizes: Optional[Sequence[Sequence[int]]] = None,
) -> List[List[ImageView]]:
    """Each sample's views: one per image, its whole soft-token grid.

    Args:
        input_ids: ``(B, S)`` prompts as the processor built them.
        image_token_id: ``config.image_token_id``.
        image_position_ids: ``(images, patches, 2)`` as the processor returns it.
        pooling: ``vision_config.pooling_kernel_size``.
        patch: ``vision_config.patch_size``.
        image_sizes: The original ``(H, W)`` of every image; None gives the boxes in the
            resized image's pixels.
    """
    grids = token_grids(image_position_ids, pooling)
    out: List[List[ImageView]] = []
    image = 0
    for row in input_ids:
        sample: List[ImageView] = []
        for start, end in runs(row, image_token_id):
            if image >= len(grids):
                raise ValueError(
                    f"The prompts hold more images than image_position_ids' {len(grids)} rows."
                )
            grid = grids[image]
            if end - start != grid[0] * grid[1]:
                raise ValueError(
                    f"Gemma 4 image {image} has {end - start} image tokens but its patches pool "
                    f"to a {grid[0]}x{grid[1]} grid: build the inputs with the model's processor."
                )
            if image_sizes is None:
                size = (grid[0] * pooling * patch, grid[1] * pooling * patch)
            else:
                size = image_size_of(image_sizes, image, "Gemma 4", "")
            box = (0.0, 0.0, float(size[0]), float(size[1]))
            positions = torch.arange(start, end, device=row.device)
            sample.append(ImageView(image, positions, grid, box, size, "image"))
            image += 1
        out.append(sample)
    if image != len(grids):
        raise ValueError(
            f"image_position_ids has {len(grids)} images but the prompts hold {image}."
        )
    return out


#: The classes this module describes.
CLASSES = ("Gemma4ForConditionalGeneration",)


def rules(config: Any) -> Any:
    """Gemma 4's :class:`~captum_legrad.views.ViewRules`: one view per image, from
    ``image_position_ids``; ``mm_token_type_ids`` (the bidirectional image-token mask of
    the sliding layers) is built as the processor builds it unless given and is 0 over the
    answer. ``image_sizes`` (the original sizes, optional) and the processor's
    ``num_soft_tokens_per_image`` are read here, not passed to the model."""
    from ...views import ViewRules

    vision = config.vision_config
    pooling = int(vision.pooling_kernel_size)
    patch = int(vision.patch_size)
    image_id = int(config.image_token_id)
    video_id = getattr(config, "video_token_id", None)

    def describe(ids: Tensor, mask: Tensor, inputs: Mapping[str, Any]) -> List[Any]:
        positions = inputs.get("image_position_ids")
        if positions is None:
            raise ValueError(
                "Gemma 4's answer maps need image_position_ids (the patch positions its "
                "image processor returns): pass it to AnswerLogits by that name."
            )
        positions = torch.as_tensor(positions).cpu()
        given = inputs.get("image_sizes")
        sizes = None if given is None else torch.as_tensor(given).view(-1, 2).tolist()
        found = views(
            ids.masked_fill(mask == 0, -1).cpu(), image_id, positions, pooling, patch, sizes
        )
        return as_samples(found)

    def build(ids: Tensor) -> Dict[str, Tensor]:
        types = (ids == image_id).long()
        if video_id is not None:
            types = types + 2 * (ids == int(video_id)).long()
        return {"mm_token_type_ids": types}

    def to_input(canvases: List[List[Tensor]], name: str, inputs: Mapping[str, Any]) -> Tensor:
        """Canvas maps → ``pixel_values``' layout ``(K, images, patches, 3·p²)``: each map
        resized to the image the processor made and patchified as it does (row-major
        patches, ``(p, p, C)`` within a patch, the map repeated over the channels), padding
        patches 0."""
        from ..._core.maps import upsample

        positions = torch.as_tensor(inputs["image_position_ids"])
        pixels = torch.as_tensor(inputs[name])
        grids = token_grids(positions.cpu(), pooling)
        maps = [canvas for sample in canvases for canvas in sample]
        k = maps[0].shape[0]
        out = maps[0].new_zeros((k, *pixels.shape))
        channels = pixels.shape[-1] // (patch * patch)
        for i, (canvas, grid) in enumerate(zip(maps, grids)):
            hp, wp = grid[0] * pooling, grid[1] * pooling
            resized = upsample(canvas.unsqueeze(0), (hp * patch, wp * patch))[0]
            cells = resized.reshape(k, hp, patch, wp, patch).permute(0, 1, 3, 2, 4)
            cells = cells.reshape(k, hp * wp, patch * patch, 1).expand(-1, -1, -1, channels)
            out[:, i, : hp * wp] = cells.reshape(k, hp * wp, -1)
        return out

    return ViewRules(
        describe=describe,
        main_input=lambda inputs: "pixel_values",
        per_token={"mm_token_type_ids": 0},
        build=build,
        batch_first=False,
        to_input=to_input,
        consumed=("image_sizes", "num_soft_tokens_per_image"),
    )


def token_step(config: Any) -> int:
    """The pixels one soft token covers per side: ``patch_size · pooling_kernel_size``."""
    vision = config.vision_config
    return int(vision.patch_size) * int(vision.pooling_kernel_size)
