"""captum_legrad.viz: overlays, K targets and per-layer maps as matplotlib figures."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model
from torch import Tensor

from captum_legrad import LeGrad

pytest.importorskip("matplotlib")

from matplotlib.figure import Figure
from matplotlib.image import imread

from captum_legrad import viz

MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.3)


@pytest.fixture(scope="module")
def legrad() -> LeGrad:
    return LeGrad(make_model("vit"))


def pictures(n: int = 2, height: int = 32, width: int = 32) -> Tensor:
    """Images in [0, 1] as a person has them."""
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(4))


def normalize(images: Tensor) -> Tensor:
    return (images - torch.tensor(MEAN).view(-1, 1, 1)) / torch.tensor(STD).view(-1, 1, 1)


def drawn(ax: object, index: int) -> np.ndarray:
    return np.asarray(ax.images[index].get_array())  # type: ignore[attr-defined]


def test_denormalize_undoes_the_normalisation() -> None:
    images = pictures(1)
    rgb = viz.denormalize(normalize(images)[0], mean=MEAN, std=STD)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb, images[0].permute(1, 2, 0).numpy(), atol=1e-6)
    as_uint8 = (images[0] * 255).round().to(torch.uint8)
    np.testing.assert_allclose(
        viz.denormalize(as_uint8), as_uint8.permute(1, 2, 0).numpy() / 255.0, atol=1e-6
    )
    grey = viz.denormalize(torch.full((1, 1, 4, 5), 2.0))  # clipped to [0, 1], 2-D
    assert grey.shape == (4, 5) and float(grey.max()) == 1.0
    with pytest.raises(ValueError, match="channels"):
        viz.denormalize(images[0], mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="one channels-first image"):
        viz.denormalize(pictures(2))


@pytest.mark.parametrize("output", ["input", "map"])
def test_overlay_draws_image_and_map_and_saves_png(
    legrad: LeGrad, output: str, tmp_path: Path
) -> None:
    images = pictures()
    x = normalize(images)
    attr = legrad.attribute(x, target=[1, 3], output=output)
    path = tmp_path / "overlay.png"
    fig = viz.overlay(x[1], attr[1], mean=MEAN, std=STD, title="class 3", save=path, dpi=50)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ax.get_title() == "class 3" and len(ax.images) == 2
    np.testing.assert_allclose(drawn(ax, 0), images[1].permute(1, 2, 0).numpy(), atol=1e-6)
    np.testing.assert_allclose(drawn(ax, 1), attr[1, 0].numpy(), atol=1e-7)
    assert ax.images[1].get_alpha() == 0.5 and ax.images[1].get_cmap().name == "jet"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(path).shape[2] == 4


def test_overlay_upsamples_a_grid_as_legrad_does(legrad: LeGrad) -> None:
    """A patch-grid map, upsampled by the overlay, equals LeGrad's own upsampled map."""
    x = normalize(pictures(1, 40, 24))  # 5 x 3 patches, not square
    model = make_model("vit_dynamic")
    method = LeGrad(model)
    grid = method.attribute(x, target=2, output="grid", normalize=False)
    assert grid.shape == (1, 1, 5, 3)
    fig = viz.overlay(x[0], grid[0], mean=MEAN, std=STD, colorbar=True)
    full = method.attribute(x, target=2, output="map", normalize=False)
    np.testing.assert_allclose(drawn(fig.axes[0], 1), full[0, 0].numpy(), rtol=1e-5, atol=1e-9)
    assert len(fig.axes) == 2  # the map and its colour bar
    assert legrad.spec is not method.spec


def test_overlay_into_existing_axes(legrad: LeGrad) -> None:
    x = normalize(pictures(1))
    attr = legrad.attribute(x, target=0)
    fig = Figure()
    left, right = fig.subplots(1, 2)
    assert viz.overlay(x[0], attr[0], ax=right, mean=MEAN, std=STD) is fig
    assert len(right.images) == 2 and len(left.images) == 0


def test_plot_targets_grid_has_labels_and_maps(legrad: LeGrad, tmp_path: Path) -> None:
    x = normalize(pictures())
    targets, names = [0, 2, 4], ["a cat", "a dog", "a remote"]
    maps = legrad.attribute_multi(x, targets=targets)  # (B, K, H, W)
    fig = viz.plot_targets(x, maps, names, mean=MEAN, std=STD, save=tmp_path / "k.png", dpi=40)
    axes = np.asarray(fig.axes).reshape(2, 4)
    assert [ax.get_title() for ax in axes[0]] == ["image", *names]
    assert [ax.get_title() for ax in axes[1]] == [""] * 4
    for b in range(2):
        assert len(axes[b, 0].images) == 1
        for k in range(3):
            np.testing.assert_allclose(drawn(axes[b, k + 1], 1), maps[b, k].numpy(), atol=1e-7)
    height, width = imread(tmp_path / "k.png").shape[:2]
    assert width > 1.5 * height  # four columns, two rows
    # output="input" (B, K, C, H, W) and one image (K, H, W) give the same maps
    five = legrad.attribute_multi(x[:1], targets=targets, output="input")
    fig = viz.plot_targets(x[0], five[0], names, show_image=False)
    assert len(fig.axes) == 3
    np.testing.assert_allclose(drawn(fig.axes[2], 1), maps[0, 2].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="one label per target"):
        viz.plot_targets(x, maps, names[:2])
    default = viz.plot_targets(x[0], maps[0])
    assert [ax.get_title() for ax in default.axes] == ["image", "target 0", "target 1", "target 2"]


def test_plot_layers_one_panel_per_layer_and_their_sum(legrad: LeGrad) -> None:
    x = normalize(pictures(1))
    method = LeGrad(legrad.forward_func, layers=[-2, -1])
    per_layer = method.attribute_layers(x, target=3)  # (1, 2, 4, 4), unnormalised
    fig = viz.plot_layers(x[0], per_layer[0], method.layers, mean=MEAN, std=STD)
    assert [ax.get_title() for ax in fig.axes] == ["block 1", "block 2", "sum"]
    # The sum panel is LeGrad's map before normalisation (upsampling is linear).
    full = method.attribute(x, target=3, output="map", normalize=False)
    np.testing.assert_allclose(drawn(fig.axes[2], 1), full[0, 0].numpy(), rtol=1e-5, atol=1e-9)
    # each panel is coloured over its own range
    for ax, i in zip(fig.axes[:2], range(2)):
        lo, hi = ax.images[1].get_clim()
        assert lo == pytest.approx(float(drawn(ax, 1).min()))
        assert hi == pytest.approx(float(drawn(ax, 1).max()))
        assert float(per_layer[0, i].max()) > 0
    all_layers = legrad.attribute_layers(x, target=3)
    fig = viz.plot_layers(x[0], all_layers, ncols=2, show_sum=False)
    assert len(fig.axes) == 4 and [ax.get_title() for ax in fig.axes[:3]] == [
        "block 0",
        "block 1",
        "block 2",
    ]
    with pytest.raises(ValueError, match="layer indices"):
        viz.plot_layers(x[0], all_layers[0], [0, 1])


def test_bad_map_shape_is_explained() -> None:
    with pytest.raises(ValueError, match="one map"):
        viz.overlay(pictures(1)[0], torch.rand(2, 1, 32, 32))
    with pytest.raises(TypeError, match=r"torch\.Tensor or numpy array"):
        viz.overlay([[0.0]], torch.rand(32, 32))  # type: ignore[arg-type]


def test_numpy_inputs_work() -> None:
    image = pictures(1)[0].numpy()
    amap = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    fig = viz.overlay(image, amap)
    np.testing.assert_allclose(drawn(fig.axes[0], 1), amap)


def test_missing_matplotlib_names_the_viz_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # type: ignore[arg-type]
    with pytest.raises(ImportError, match=r"captum-legrad\[viz\]"):
        viz.overlay(pictures(1)[0], torch.rand(32, 32))


def test_plot_methods_one_row_per_image_one_column_per_method(legrad: LeGrad) -> None:
    images = pictures(2)
    maps = legrad.attribute(normalize(images), target=1, output="map")[:, 0]
    masks = torch.zeros(2, 32, 32)
    masks[:, 8:20, 8:20] = 1
    fig = viz.plot_methods(
        normalize(images),
        {"LeGrad": maps, "flipped": maps.flip(-1)},
        ["a", "b"],
        masks=masks,
        mean=MEAN,
        std=STD,
    )
    axes = np.asarray(fig.axes).reshape(2, 3)
    assert [ax.get_title() for ax in axes[0]] == ["image", "LeGrad", "flipped"]
    assert [axes[r, 0].get_ylabel() for r in range(2)] == ["a", "b"]
    np.testing.assert_allclose(drawn(axes[1, 0], 0), images[1].permute(1, 2, 0), atol=1e-6)
    np.testing.assert_allclose(drawn(axes[0, 2], 1), maps[0].flip(-1), atol=1e-6)
    assert len(axes[0, 0].collections) > 0  # the mask outline


def test_plot_curves_draws_both_curves_per_method(tmp_path: Path) -> None:
    positive, negative = torch.tensor([1.0, 0.5, 0.1]), torch.tensor([1.0, 0.9, 0.8])
    fig = viz.plot_curves(
        [0.0, 0.1, 0.2], {"LeGrad": (positive, negative)}, save=tmp_path / "c.png"
    )
    left, right = fig.axes
    np.testing.assert_allclose(left.lines[0].get_ydata(), positive.numpy())
    np.testing.assert_allclose(right.lines[0].get_ydata(), negative.numpy())
    np.testing.assert_allclose(left.lines[0].get_xdata(), [0.0, 10.0, 20.0])
    assert imread(tmp_path / "c.png").ndim == 3


def test_reports_leave_the_pyplot_backend_alone(tmp_path: Path) -> None:
    """The evaluation's figures go through viz: no library module switches the backend."""
    import matplotlib

    from captum_legrad.eval import report  # noqa: F401  (imported for its side effects, if any)

    before = matplotlib.get_backend()
    viz.plot_curves([0.0, 0.5], {"m": (torch.ones(2), torch.zeros(2))}, save=tmp_path / "c.png")
    assert matplotlib.get_backend() == before
    assert "matplotlib.use(" not in "".join(
        p.read_text() for p in (Path(__file__).parents[1] / "captum_legrad").rglob("*.py")
    )


def test_one_style_object_for_every_figure(tmp_path: Path) -> None:
    """FigureStyle sets cmap, alpha, colour bar, panel size, title size and dpi for every
    function; a keyword given to the function wins; no style draws what it always drew."""
    style = viz.FigureStyle(
        cmap="inferno", alpha=0.7, colorbar=True, panel_size=1.5, title_size=13, dpi=30
    )
    x, amap = pictures(2), torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(0))
    fig = viz.overlay(x[0], amap[0], title="t", style=style, save=tmp_path / "o.png")
    ax = fig.axes[0]
    assert ax.images[1].get_cmap().name == "inferno" and ax.images[1].get_alpha() == 0.7
    assert len(fig.axes) == 2  # the style's colour bar
    assert ax.title.get_fontsize() == 13
    assert tuple(fig.get_size_inches()) == (1.5, 1.5)
    assert imread(tmp_path / "o.png").shape[0] < 1.5 * 30 + 2  # saved at the style's dpi
    mine = viz.overlay(x[0], amap[0], style=style, alpha=0.2, cmap="gray", colorbar=False)
    assert mine.axes[0].images[1].get_alpha() == 0.2 and len(mine.axes) == 1
    assert mine.axes[0].images[1].get_cmap().name == "gray"
    plain = viz.overlay(x[0], amap[0])  # the old defaults
    assert plain.axes[0].images[1].get_cmap().name == "jet"
    assert plain.axes[0].images[1].get_alpha() == 0.5 and tuple(plain.get_size_inches()) == (4, 4)
    grid = viz.plot_targets(x, amap[:, None], ["a"], style=style)
    assert tuple(grid.get_size_inches()) == (3.0, 3.0)  # 2 × 2 panels of 1.5 in
    assert grid.axes[1].images[1].get_cmap().name == "inferno"
    assert grid.axes[1].title.get_fontsize() == 13
    layers = viz.plot_layers(x[0], torch.rand(3, 4, 4), show_sum=False, style=style)
    assert tuple(layers.get_size_inches()) == (4.5, 1.5)
    methods = viz.plot_methods(x, {"m": amap}, style=style)
    assert len(methods.axes) == 5 and methods.axes[1].images[1].get_alpha() == 0.7
    photo = viz.plot_photo(x[0].permute(1, 2, 0).numpy(), amap[:1], ["p"], style=style)
    assert photo.get_size_inches()[1] == pytest.approx(1.5 + 0.8)
    answer = viz.plot_answer(x[0], amap, ["a", "b"], style=style)
    assert answer.axes[1].images[1].get_cmap().name == "inferno"
    curves = viz.plot_curves([0.0, 0.5], {"m": (torch.ones(2), torch.zeros(2))}, style=style)
    assert curves.axes[0].title.get_fontsize() == 13
    with pytest.raises(TypeError, match="FigureStyle"):
        viz.overlay(x[0], amap[0], style={"cmap": "gray"})  # type: ignore[arg-type]
