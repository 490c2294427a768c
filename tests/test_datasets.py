"""Paper-format loaders on tiny files written here in the original formats."""

from __future__ import annotations

from pathlib import Path
from typing import List

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from captum_legrad.eval.datasets import ImageNetSegmentation, OpenImagesPoints


def write_gtsegs(path: Path, images: List[np.ndarray], masks: List[np.ndarray]) -> None:
    """A gtsegs_ijcv.mat look-alike: MATLAB v7.3 stores arrays transposed, cells as refs."""
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img_refs = np.empty((len(images), 1), dtype=h5py.ref_dtype)
        gt_refs = np.empty((len(images), 1), dtype=h5py.ref_dtype)
        for i, (image, mask) in enumerate(zip(images, masks)):
            img = refs.create_dataset(f"img{i}", data=image.transpose(2, 1, 0))  # (3, W, H)
            gt = refs.create_dataset(f"gt{i}", data=mask.transpose(1, 0))  # (W, H)
            cell = refs.create_dataset(f"cell{i}", data=np.array([[gt.ref]], dtype=h5py.ref_dtype))
            img_refs[i, 0] = img.ref
            gt_refs[i, 0] = cell.ref
        value = f.create_group("value")
        value.create_dataset("img", data=img_refs)
        value.create_dataset("gt", data=gt_refs)


def test_imagenet_segmentation_reads_chefer_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(2)]  # H=5, W=7
    masks = [np.zeros((5, 7), dtype=np.uint8) for _ in range(2)]
    masks[0][1:3, 2:6] = 1
    masks[1][4, 0] = 1
    path = tmp_path / "gtsegs_ijcv.mat"
    write_gtsegs(path, images, masks)
    data = ImageNetSegmentation(path, image_size=None)
    assert len(data) == 2
    image, mask = data[0]
    assert image.shape == (3, 5, 7) and mask.shape == (5, 7) and mask.dtype == torch.bool
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), images[0] / 255.0, atol=1e-6)
    assert mask.numpy().tolist() == masks[0].astype(bool).tolist()
    assert data[1][1].nonzero().tolist() == [[4, 0]]
    resized_image, resized_mask = ImageNetSegmentation(path, image_size=(10, 14))[0]
    assert resized_image.shape == (3, 10, 14)
    assert resized_mask.numpy().tolist() == np.kron(masks[0], np.ones((2, 2))).astype(bool).tolist()
    with pytest.raises(IndexError):
        data[2]


def test_imagenet_segmentation_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ImageNetSegmentation(tmp_path / "missing.mat")
    other = tmp_path / "other.mat"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(ValueError, match="value/img"):
        ImageNetSegmentation(other)


def write_image(path: Path, height: int = 6, width: int = 8) -> None:
    Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8)).save(path)


def test_openimages_official_columns(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    write_image(tmp_path / "images" / "img1.jpg")
    write_image(tmp_path / "images" / "img2.png")
    csv = tmp_path / "points.csv"
    csv.write_text(
        "ImageId,X,Y,Label,EstimatedYesNo,Source,YesVotes,NoVotes,UnsureVotes,QuestionVersion\n"
        "img1,0.25,0.5,/m/cat,yes,ih,3,0,0,1\n"
        "img1,0.75,0.5,/m/cat,no,ih,0,3,0,1\n"
        "img1,0.5,0.5,/m/cat,unsure,ih,1,1,1,1\n"
        "img1,0.1,0.9,/m/dog,no,ih,0,3,0,1\n"
        "img2,0.5,0.25,/m/dog,yes,ih,3,0,0,1\n"
        "img3,0.5,0.25,/m/dog,yes,ih,3,0,0,1\n"  # no such image: left out
    )
    names = tmp_path / "classes.csv"
    names.write_text("/m/cat,Cat\n/m/dog,Dog\n")
    data = OpenImagesPoints(csv, tmp_path / "images", names, image_size=(12, 16))
    assert len(data) == 2
    assert data.classes == ["/m/cat", "/m/dog"] and data.names == ["Cat", "Dog"]
    image, labels = data[0]
    assert image.shape == (3, 12, 16)
    assert [entry.label for entry in labels] == ["/m/cat", "/m/dog"]
    cat = labels[0]
    assert cat.points.tolist() == [[0.25, 0.5], [0.75, 0.5]]  # the unsure point is skipped
    assert cat.positive.tolist() == [True, False]
    assert data[1][1][0].positive.tolist() == [True]


def test_openimages_alternative_columns_and_errors(tmp_path: Path) -> None:
    write_image(tmp_path / "a.jpg")
    csv = tmp_path / "points.csv"
    csv.write_text("ImageID,LabelName,X,Y,IsPositive\na,/m/x,0.5,0.5,1\na,/m/x,0.1,0.1,0\n")
    data = OpenImagesPoints(csv, tmp_path, image_size=None)
    assert data.names == ["/m/x"]  # no descriptions: the label itself
    image, labels = data[0]
    assert image.shape == (3, 6, 8)
    assert labels[0].positive.tolist() == [True, False]
    bad = tmp_path / "bad.csv"
    bad.write_text("Image,Where\n")
    with pytest.raises(ValueError, match="ImageId"):
        OpenImagesPoints(bad, tmp_path)
    with pytest.raises(FileNotFoundError):
        OpenImagesPoints(tmp_path / "nope.csv", tmp_path)
