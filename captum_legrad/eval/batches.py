"""Datasets as :class:`~captum_legrad.eval.harness.EvalBatch` factories for a loaded model.

Each function returns a list of zero-argument callables, one per batch, so that a process
under ``torchrun`` builds only the batches of its own shard
(:func:`~captum_legrad.eval.distributed.shard`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .datasets import ImageNetSegmentation, OpenImagesPoints
from .harness import EvalBatch
from .models import LoadedModel

__all__ = [
    "BatchFactory",
    "DataError",
    "PROMPT_TEMPLATE",
    "shapes_batches",
    "imagenet_seg_batches",
    "openimages_batches",
]

#: Builds one batch when called.
BatchFactory = Callable[[], EvalBatch]

#: The prompt each OpenImages class name is put into.
PROMPT_TEMPLATE = "a photo of a {}."


class DataError(ValueError):
    """A data set that cannot be used with the model (missing file, wrong kind of model)."""


def shapes_batches(
    loaded: LoadedModel, num_images: int, batch_size: int, seed: int, device: torch.device
) -> Tuple[List[BatchFactory], List[str]]:
    """The seeded shapes data set: one (image, object) pair per labelled object.

    Returns the batch factories and the class names.
    """
    from ..data import ShapesDataset

    if not loaded.multilabel or loaded.classes is None:
        raise DataError("the shapes data set needs a shapes model (--model default).")
    data = ShapesDataset(num_images, seed=seed, image_size=loaded.image_size[0])

    def make(start: int) -> BatchFactory:
        def build() -> EvalBatch:
            batch = data.batch(range(start, min(start + batch_size, num_images)))
            inputs = loaded.normalize(batch.images).to(device)
            with torch.no_grad():
                logits = loaded.model(inputs)
            exact = ((logits > 0) == (batch.targets.to(device) > 0.5)).all(dim=1).double()
            images, targets, masks, correct, first = [], [], [], [], []
            for i, sample in enumerate(batch.samples):
                for k, (label, mask) in enumerate(zip(sample.labels, sample.masks)):
                    images.append(inputs[i])
                    targets.append(int(label))
                    masks.append(mask)
                    correct.append(exact[i])
                    first.append(k == 0)
            return EvalBatch(
                images=torch.stack(images),
                targets=torch.tensor(targets, device=device),
                masks=torch.stack(masks).to(device),
                correct=torch.stack(correct),
                first=torch.tensor(first, device=device),
            )

        return build

    return [make(s) for s in range(0, num_images, batch_size)], list(data.classes)


def imagenet_seg_batches(
    loaded: LoadedModel,
    path: Path,
    num_images: Optional[int],
    batch_size: int,
    device: torch.device,
) -> List[BatchFactory]:
    """``gtsegs_ijcv.mat`` (ImageNet-segmentation), explaining the predicted class."""
    try:
        data = ImageNetSegmentation(path, image_size=loaded.image_size)
    except (FileNotFoundError, ValueError, OSError) as error:
        raise DataError(str(error).splitlines()[0]) from error
    total = len(data) if num_images is None else min(num_images, len(data))

    def make(start: int) -> BatchFactory:
        def build() -> EvalBatch:
            pairs = [data[i] for i in range(start, min(start + batch_size, total))]
            inputs = loaded.normalize(torch.stack([p[0] for p in pairs])).to(device)
            with torch.no_grad():
                predicted = loaded.model(inputs).argmax(dim=1)
            return EvalBatch(
                images=inputs,
                targets=predicted,
                masks=torch.stack([p[1] for p in pairs]).to(device),
            )

        return build

    return [make(s) for s in range(0, total, batch_size)]


def openimages_batches(
    loaded: LoadedModel,
    path: Path,
    images: Optional[Path],
    descriptions: Optional[Path],
    num_images: Optional[int],
    batch_size: int,
    device: torch.device,
) -> Tuple[List[BatchFactory], nn.Module, int]:
    """OpenImagesV7 point labels with an image-text model, one prompt per class.

    Returns the batch factories, the model whose scores are the prompts' similarities, and
    the number of classes.
    """
    if loaded.with_prompts is None:
        raise DataError("--dataset openimages needs an image-text model (open_clip:NAME, hf:PATH).")
    if images is None:
        raise DataError("--dataset openimages needs --images DIR with the <ImageId>.jpg files.")
    try:
        data = OpenImagesPoints(path, images, descriptions, image_size=loaded.image_size)
    except (FileNotFoundError, ValueError) as error:
        raise DataError(str(error)) from error
    if len(data) == 0:
        raise DataError(f"none of the images listed in {path} is in {images}")
    model = loaded.with_prompts([PROMPT_TEMPLATE.format(name) for name in data.names])
    model = model.to(device).eval()
    total = len(data) if num_images is None else min(num_images, len(data))
    height, width = loaded.image_size

    def make(start: int) -> BatchFactory:
        def build() -> EvalBatch:
            inputs, targets, points, labels, first = [], [], [], [], []
            for i in range(start, min(start + batch_size, total)):
                image, entries = data[i]
                normalised = loaded.normalize(image).to(device)
                for k, entry in enumerate(entries):
                    inputs.append(normalised)
                    targets.append(data.class_index[entry.label])
                    scale = torch.tensor([width, height], dtype=torch.float32)
                    points.append((entry.points * scale).to(device))
                    labels.append(entry.positive.to(device))
                    first.append(k == 0)
            return EvalBatch(
                images=torch.stack(inputs),
                targets=torch.tensor(targets, device=device),
                points=points,
                point_labels=labels,
                first=torch.tensor(first, device=device),
            )

        return build

    return [make(s) for s in range(0, total, batch_size)], model, len(data.classes)
