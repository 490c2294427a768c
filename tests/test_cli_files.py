"""The command line's pieces: preprocessing geometry against the libraries' own
transforms, map projection, atomic writes and the output folder, and the figures."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Tuple

import numpy as np
import pytest
import torch
from _versions import require
from PIL import Image

from captum_legrad.eval.files import OutputError, OutputFolder, atomic_path, unique_name
from captum_legrad.eval.preprocess import View


def ramp_photo(height: int, width: int) -> Image.Image:
    """Red encodes the column, green the row: a transformed pixel tells where it came from."""
    rows = (np.arange(height) + 0.5) / height
    cols = (np.arange(width) + 0.5) / width
    array = np.zeros((height, width, 3), dtype=np.float64)
    array[..., 0] = cols[None, :]
    array[..., 1] = rows[:, None]
    return Image.fromarray((array * 255).round().astype(np.uint8))


def check_geometry(
    view: View,
    transform: Callable[[Image.Image], torch.Tensor],
    mean: Tuple[float, ...],
    std: Tuple[float, ...],
    photo: Tuple[int, int] = (200, 300),
) -> None:
    """Where the library's transform takes each input pixel from, against ``view``."""
    height, width = photo
    x = transform(ramp_photo(height, width)).float()
    rgb = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    geometry = view.geometry(height, width)
    assert tuple(x.shape[-2:]) == geometry.crop
    crop_h, crop_w = geometry.crop
    inner = slice(4, -4)  # away from the edges, where resampling clamps
    ys = (torch.arange(crop_h) + 0.5 + geometry.offset[0]) * height / geometry.resized[0]
    xs = (torch.arange(crop_w) + 0.5 + geometry.offset[1]) * width / geometry.resized[1]
    seen_x = rgb[0].mean(0) * width  # the photo column each input column shows
    seen_y = rgb[1].mean(1) * height
    torch.testing.assert_close(seen_x[inner], xs[inner].float(), atol=2.0, rtol=0)
    torch.testing.assert_close(seen_y[inner], ys[inner].float(), atol=2.0, rtol=0)


@pytest.mark.parametrize("crop_mode", ["center", "squash"])
def test_timm_view_is_timms_transform(crop_mode: str) -> None:
    from timm.data import create_transform

    from captum_legrad.eval.models import timm_view

    config = {
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 0.875,
        "crop_mode": crop_mode,
    }
    view = timm_view(config)
    assert view.geometry(200, 300).resized == ((256, 384) if crop_mode == "center" else (256, 256))
    check_geometry(view, create_transform(**config), config["mean"], config["std"])


@pytest.mark.parametrize("mode", ["shortest", "squash"])
def test_open_clip_view_is_open_clips_preprocess(mode: str) -> None:
    pytest.importorskip("open_clip")
    from captum_legrad.eval.models import open_clip_view

    cfg = {"size": (224, 224), "mean": (0.5,) * 3, "std": (0.5,) * 3, "resize_mode": mode}
    cfg["interpolation"] = "bicubic"
    require("open_clip.transform", "PreprocessCfg", since="open-clip-torch 2.23")
    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    check_geometry(open_clip_view(cfg), transform, cfg["mean"], cfg["std"])


def test_torchvision_and_hf_views() -> None:
    torchvision = pytest.importorskip("torchvision")
    transformers = pytest.importorskip("transformers")
    from captum_legrad.eval.models import hf_view

    preset = torchvision.models.ViT_B_16_Weights.DEFAULT.transforms()
    view = View(crop=(224, 224), resize="shortest", size=(256, 256))
    check_geometry(view, lambda photo: preset(photo), preset.mean, preset.std)
    for processor in (
        transformers.ViTImageProcessor(),  # stretches to 224×224
        transformers.CLIPImageProcessor(),  # shortest edge 224, centre crop 224
    ):
        processor_view = hf_view(processor, (224, 224))

        def transform(photo: Any, processor: Any = processor) -> torch.Tensor:
            pixels: torch.Tensor = processor(images=photo, return_tensors="pt")["pixel_values"]
            return pixels[0]

        check_geometry(processor_view, transform, processor.image_mean, processor.image_std)


def test_projection_of_a_ramp_and_the_border() -> None:
    """A map that is its own column coordinate comes back as the photo's column coordinate."""
    view = View(crop=(4, 4), resize="shortest", size=(4, 4))
    geometry = view.geometry(8, 16)  # → 4×8, crop columns 2..5
    assert geometry.resized == (4, 8) and geometry.offset == (0, 2)
    ramp = (torch.arange(4, dtype=torch.float32) + 0.5).expand(4, 4)[None]
    out = geometry.project(ramp)[0]
    assert torch.isnan(out[:, :4]).all() and torch.isnan(out[:, 12:]).all()
    # photo column x has its centre at (x + 0.5) / 2 - 2 crop pixels
    expected = ((torch.arange(4, 12) + 0.5) / 2 - 2).clamp(0.5, 3.5)
    torch.testing.assert_close(out[3, 4:12], expected)
    padded = View(crop=(8, 8), resize="longest", size=(8, 8)).geometry(4, 8)
    assert padded.resized == (4, 8) and padded.offset == (-2, 0)
    assert padded.inside().all()  # the model saw all of the photo (and padding)


def test_view_apply_pads_and_crops() -> None:
    image = torch.rand(3, 4, 8)
    crop = View(crop=(4, 4), resize="shortest", size=(4, 4)).apply(image)
    torch.testing.assert_close(crop, image[:, :, 2:6])
    padded = View(crop=(8, 8), resize="longest", size=(8, 8)).apply(image)
    assert (padded[:, :2] == 0).all() and torch.equal(padded[:, 2:6], image)


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    target.write_text("old")
    with atomic_path(target) as temporary:
        assert temporary.parent == tmp_path and temporary.suffix == ".txt"
        temporary.write_text("new")
        assert target.read_text() == "old"  # until the block ends
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["a.txt"]


def test_output_folder_checks_and_cleans_up(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        OutputFolder(tmp_path / "file")
    with pytest.raises(OutputError, match="cannot create"):
        OutputFolder(tmp_path / "file" / "sub")
    folder = OutputFolder(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and folder.created == [
        tmp_path / "a",
        tmp_path / "a" / "b",
    ]
    folder.cleanup()
    assert not (tmp_path / "a").exists()
    kept = OutputFolder(tmp_path / "c")
    kept.save_npy("m.npy", np.arange(3))
    kept.cleanup()  # not empty: kept
    assert np.array_equal(np.load(tmp_path / "c" / "m.npy"), np.arange(3))
    assert kept.written == [tmp_path / "c" / "m.npy"]


def test_unique_name() -> None:
    taken: set = set()
    assert [unique_name("pic", taken) for _ in range(3)] == ["pic", "pic_2", "pic_3"]
    assert unique_name("PIC", taken) == "PIC_4"  # case-insensitive file systems


def test_plot_photo_titles_colour_bars_and_grey_border() -> None:
    pytest.importorskip("matplotlib")
    from captum_legrad import viz

    photo = Image.fromarray(np.full((40, 60, 3), 255, dtype=np.uint8))
    maps = torch.rand(2, 40, 60)
    maps[:, :, :10] = float("nan")
    fig = viz.plot_photo(photo, maps, ["cat\nprobability 0.90", "dog\nprobability 0.05"])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["photo (60×40)", "cat\nprobability 0.90", "dog\nprobability 0.05"]
    assert len(fig.axes) == 5  # photo, two overlays, two colour bars
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    assert rgba.shape[1] > rgba.shape[0] * 2
    overlay = fig.axes[1]
    assert len(overlay.images) == 3 and overlay.collections  # photo, map, grey; hatches
    grey = overlay.images[2].get_array()
    assert np.allclose(grey[:, :10, 3], 0.75) and np.allclose(grey[:, 10:, 3], 0.0)


def test_plot_curves_legend_covers_no_curve_and_methods_have_a_colour_bar() -> None:
    pytest.importorskip("matplotlib")
    from captum_legrad import viz

    fractions = [0.0, 0.5, 0.9]
    curves = {
        name: (torch.tensor([1.0, 0.5, 0.1]), torch.tensor([1.0, 0.9, 0.8])) for name in "ABC"
    }
    fig = viz.plot_curves(fractions, curves, title="Perturbation curves")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent(renderer))
    assert fig.get_suptitle() == "Perturbation curves"
    maps = {"LeGrad": torch.rand(2, 8, 8), "GAE": torch.rand(2, 8, 8) * 100}
    fig = viz.plot_methods(
        torch.rand(2, 3, 8, 8), maps, ["a", "b"], title="Examples", colorbar=True
    )
    assert fig.get_suptitle() == "Examples"
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1
    image = fig.axes[2].images[-1]  # GAE's map, scaled to [0, 1] like all others
    assert image.get_clim() == (0.0, 1.0) and float(np.max(image.get_array())) == 1.0
