"""Loaders for the paper's evaluation data, for users who have the files.

- :class:`ImageNetSegmentation`: the ImageNet-segmentation file ``gtsegs_ijcv.mat`` used by
  Chefer et al. and LeGrad (4,276 images with foreground masks). The original is a MATLAB
  v7.3 file, i.e. HDF5; it is read with ``h5py`` exactly as Chefer's loader does:
  ``value/img[i, 0]`` references the image, stored transposed as ``(3, W, H)`` uint8, and
  ``value/gt[i, 0]`` references a cell whose ``[0, 0]`` references the mask ``(W, H)``.
- :class:`OpenImagesPoints`: OpenImagesV7 point labels (``oidv7-*-annotations-point-labels.csv``
  style: ``ImageId, X, Y, Label, EstimatedYesNo, ...`` with ``X, Y`` in [0, 1]; ``ImageID`` /
  ``LabelName`` / ``IsPositive`` spellings are accepted too), with images ``<ImageId>.jpg``
  in a folder and optionally the class-description CSV (``LabelName, DisplayName``) for the
  text prompts.

Both resize to the model's input size (images bilinearly with antialiasing, masks by nearest
neighbour; points are scaled) and return ``[0, 1]`` RGB tensors; normalisation is the
caller's.
"""

from __future__ import annotations

import csv
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ImageNetSegmentation",
    "OpenImagesPoints",
    "PointLabels",
    "load_image",
    "resize_image",
]

PathLike = Union[str, Path]


def _h5py() -> Any:
    try:
        h5py = importlib.import_module("h5py")
    except ImportError as error:
        raise ImportError(
            "Reading gtsegs_ijcv.mat needs h5py: pip install 'captum-legrad[eval]'."
        ) from error
    return h5py


def resize_image(image: Tensor, size: Tuple[int, int]) -> Tensor:
    """Resize a ``(3, H, W)`` float image to ``size`` (bilinear, antialiased)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    resized = F.interpolate(
        image[None], size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return resized[0].clamp(0, 1)


def _resize_mask(mask: Tensor, size: Tuple[int, int]) -> Tensor:
    if tuple(mask.shape) == tuple(size):
        return mask.bool()
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5


def load_image(path: PathLike) -> Tensor:
    """Read an image file as a ``(3, H, W)`` float tensor in [0, 1] (needs Pillow)."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            "Reading images needs Pillow: pip install 'captum-legrad[eval]'."
        ) from error
    with Image.open(path) as handle:
        array = np.asarray(handle.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class ImageNetSegmentation(torch.utils.data.Dataset):
    r"""The ImageNet-segmentation set of Chefer et al. (``gtsegs_ijcv.mat``).

    Args:
        path (str or Path): The ``.mat`` file (MATLAB v7.3 / HDF5).
        image_size (tuple[int, int], optional): Output size ``(H, W)``; None keeps the
                    file's size.
                    Default: (224, 224)

    ``dataset[i]`` is ``(image, mask)``: ``(3, H, W)`` float in [0, 1] and ``(H, W)`` bool.

    Examples::

        >>> data = ImageNetSegmentation("gtsegs_ijcv.mat")  # doctest: +SKIP
        >>> image, mask = data[0]  # doctest: +SKIP
    """

    def __init__(self, path: PathLike, image_size: Optional[Tuple[int, int]] = (224, 224)) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ImageNet-segmentation file not found: {self.path}")
        self.image_size = image_size
        h5py = _h5py()
        try:
            opened = h5py.File(self.path, "r")
        except OSError as error:  # h5py: "file signature not found", without the file
            reason = " ".join(str(error).split())
            raise ValueError(
                f"{self.path} is not an HDF5 file (the MATLAB v7.3 .mat format of "
                f"gtsegs_ijcv.mat): {reason}; pass the ImageNet-segmentation file "
                "gtsegs_ijcv.mat"
            ) from error
        with opened as handle:
            if "value/img" not in handle or "value/gt" not in handle:
                raise ValueError(
                    f"{self.path} has no value/img and value/gt datasets; expected the "
                    "gtsegs_ijcv.mat file of the ImageNet-segmentation benchmark."
                )
            self.length = int(handle["value/img"].shape[0])
        self._handle: Any = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        if self._handle is None:  # opened lazily, once per process
            self._handle = _h5py().File(self.path, "r")
        handle = self._handle
        image = np.array(handle[handle["value/img"][index, 0]]).transpose(2, 1, 0)
        cell = handle[handle["value/gt"][index, 0]]
        mask = np.array(handle[cell[0, 0]]).transpose(1, 0)
        tensor = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)
        truth = torch.from_numpy(mask > 0)
        if self.image_size is not None:
            tensor = resize_image(tensor, self.image_size)
            truth = _resize_mask(truth, self.image_size)
        return tensor.contiguous(), truth

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"] = None  # h5py handles do not pickle
        return state


@dataclass(frozen=True)
class PointLabels:
    """The labelled points of one class in one image.

    Attributes:
        label: The class's label name (e.g. ``/m/01g317``).
        points: ``(Q, 2)`` point coordinates ``(x, y)`` in [0, 1] of the image's width and
                    height.
        positive: ``(Q,)`` bool, True for a point on the class.
    """

    label: str
    points: Tensor
    positive: Tensor


_IMAGE_COLUMNS = ("ImageId", "ImageID")
_LABEL_COLUMNS = ("Label", "LabelName")
_POSITIVE_COLUMNS = ("EstimatedYesNo", "IsPositive")
_YES = {"yes", "1", "true", "y", "positive"}
_NO = {"no", "0", "false", "n", "negative"}
_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def _column(header: Sequence[str], names: Sequence[str], path: Path) -> str:
    for name in names:
        if name in header:
            return name
    raise ValueError(f"{path} has none of the columns {list(names)}; its header is {list(header)}.")


class OpenImagesPoints(torch.utils.data.Dataset):
    r"""OpenImagesV7 point labels for LeGrad's open-vocabulary p-mIoU.

    Args:
        annotations (str or Path): Point-label CSV (``ImageId, X, Y, Label, EstimatedYesNo``
                    or ``ImageID, LabelName, X, Y, IsPositive`` columns; "unsure" points
                    are skipped).
        images (str or Path): Folder with ``<ImageId>.jpg`` (or ``.png``) files. Images
                    listed in the CSV but missing from the folder are left out.
        class_descriptions (str or Path, optional): CSV of ``LabelName, DisplayName`` rows
                    (with or without a header) giving the prompts' class names.
                    Default: None (the label names themselves)
        image_size (tuple[int, int], optional): Output size ``(H, W)``; None keeps each
                    image's size.
                    Default: (224, 224)

    ``dataset[i]`` is ``(image, labels)``: a ``(3, H, W)`` float image in [0, 1] and a list
    of :class:`PointLabels`, one per class annotated in that image. :attr:`classes` lists
    all label names (sorted) and :attr:`names` their display names.
    """

    def __init__(
        self,
        annotations: PathLike,
        images: PathLike,
        class_descriptions: Optional[PathLike] = None,
        image_size: Optional[Tuple[int, int]] = (224, 224),
    ) -> None:
        self.annotations = Path(annotations)
        self.images = Path(images)
        if not self.annotations.is_file():
            raise FileNotFoundError(f"point-label CSV not found: {self.annotations}")
        if not self.images.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.images}")
        self.image_size = image_size
        table: Dict[str, Dict[str, List[Tuple[float, float, bool]]]] = {}
        with open(self.annotations, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            image_col = _column(header, _IMAGE_COLUMNS, self.annotations)
            label_col = _column(header, _LABEL_COLUMNS, self.annotations)
            positive_col = _column(header, _POSITIVE_COLUMNS, self.annotations)
            _column(header, ("X",), self.annotations)
            _column(header, ("Y",), self.annotations)
            for row in reader:
                answer = row[positive_col].strip().lower()
                if answer not in _YES and answer not in _NO:
                    continue  # "unsure"
                point = (float(row["X"]), float(row["Y"]), answer in _YES)
                table.setdefault(row[image_col], {}).setdefault(row[label_col], []).append(point)
        self.files: List[Path] = []
        self.labels: List[List[PointLabels]] = []
        for image_id in sorted(table):
            path = self._find(image_id)
            if path is None:
                continue
            self.files.append(path)
            self.labels.append(
                [
                    PointLabels(
                        label=label,
                        points=torch.tensor([[x, y] for x, y, _ in points], dtype=torch.float32),
                        positive=torch.tensor([p for _, _, p in points], dtype=torch.bool),
                    )
                    for label, points in sorted(table[image_id].items())
                ]
            )
        self.classes: List[str] = sorted(
            {entry.label for entries in self.labels for entry in entries}
        )
        descriptions = self._descriptions(class_descriptions)
        self.names: List[str] = [descriptions.get(label, label) for label in self.classes]
        self.class_index: Dict[str, int] = {label: i for i, label in enumerate(self.classes)}

    def _find(self, image_id: str) -> Optional[Path]:
        for extension in _EXTENSIONS:
            candidate = self.images / f"{image_id}{extension}"
            if candidate.is_file():
                return candidate
        return None

    @staticmethod
    def _descriptions(path: Optional[PathLike]) -> Dict[str, str]:
        if path is None:
            return {}
        if not Path(path).is_file():
            raise FileNotFoundError(f"class-description CSV not found: {path}")
        names: Dict[str, str] = {}
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.reader(handle):
                if len(row) >= 2 and row[0] != "LabelName":
                    names[row[0]] = row[1]
        return names

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tuple[Tensor, List[PointLabels]]:
        image = load_image(self.files[index])
        if self.image_size is not None:
            image = resize_image(image, self.image_size)
        return image, self.labels[index]
