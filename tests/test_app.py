"""The explorer's callbacks (captum_legrad.app.Explorer), without a browser."""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image

from captum_legrad import LeGrad
from captum_legrad.app import Explorer, ExplorerError, Settings
from captum_legrad.data import ShapesDataset
from captum_legrad.eval.models import LoadedModel, load_model


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model("default")


@pytest.fixture(scope="module")
def explorer(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Explorer:
    return Explorer(loaded, workdir=tmp_path_factory.mktemp("work"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> List[str]:
    folder = tmp_path_factory.mktemp("shapes")
    data = ShapesDataset(2, seed=1)
    paths = []
    for i in range(2):
        array = (data[i].image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"s{i}.png")
        paths.append(str(folder / f"s{i}.png"))
    return paths


def _inputs(loaded: LoadedModel, paths: List[str]) -> torch.Tensor:
    from captum_legrad.eval.datasets import load_image

    return loaded.normalize(torch.stack([load_image(p) for p in paths]))


def test_top_k_predictions_are_explained_with_names_and_scores(
    explorer: Explorer, loaded: LoadedModel, shapes: List[str]
) -> None:
    result = explorer.explain(shapes, Settings(top_k=2))
    x = _inputs(loaded, shapes)
    with torch.no_grad():
        logits = loaded.model(x)
    top = logits.topk(2, dim=-1).indices
    assert len(result.maps) == 4 and len(result.layers) == 4  # 2 images x 2; 4 blocks
    classes = loaded.classes or []
    for b in range(2):
        for k in range(2):
            caption = result.maps[2 * b + k][1]
            name = classes[int(top[b, k])]
            p = float(torch.sigmoid(logits[b, top[b, k]]))
            assert caption == f"s{b}.png: {name} (p = {p:.2f})"
            assert f"**{name}**" in result.summary
    saved = np.load(result.files[0])
    expected = LeGrad(loaded.model).attribute_multi(x, targets=top, output="map")
    np.testing.assert_allclose(saved, expected.numpy(), atol=1e-6)
    assert Path(result.files[1]).stat().st_size > 0 and result.files[1].endswith(".png")
    image = result.maps[0][0]
    assert image.dtype == np.uint8 and image.shape == (256, 256, 3)  # 64 px shown at 4x


def test_named_and_indexed_classes(
    explorer: Explorer, loaded: LoadedModel, shapes: List[str]
) -> None:
    classes = loaded.classes or []
    result = explorer.explain(shapes[:1], Settings(what=f"{classes[2].upper()}, 0, 0"))
    assert [caption.split(": ")[1].split(" (")[0] for _, caption in result.maps] == [
        classes[2],
        classes[0],
    ]
    with pytest.raises(ExplorerError, match=r"Unknown class name 'zebra'.*Known classes"):
        explorer.explain(shapes[:1], Settings(what="zebra"))
    with pytest.raises(ExplorerError, match="Class 99 does not exist"):
        explorer.explain(shapes[:1], Settings(what="99"))


def test_bad_input_is_a_message(explorer: Explorer, shapes: List[str], tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ExplorerError, match=r"broken\.png is not an image"):
        explorer.explain([str(broken)], Settings())
    with pytest.raises(ExplorerError, match="Upload an image"):
        explorer.explain([], Settings())
    with pytest.raises(ExplorerError, match="Layer 7 does not exist"):
        explorer.explain(shapes[:1], Settings(layers="custom", custom_layers="-1, 7"))
    with pytest.raises(ExplorerError, match="block indices"):
        explorer.explain(shapes[:1], Settings(layers="custom", custom_layers="last"))


def test_layers_pooling_and_baselines(
    explorer: Explorer, loaded: LoadedModel, shapes: List[str]
) -> None:
    settings = Settings(
        what="1", layers="last two", pooling="model", baselines=("Chefer GAE", "Saliency")
    )
    result = explorer.explain(shapes, settings)
    assert [caption.split(" (")[0] for _, caption in result.layers] == ["block 2", "block 3"]
    assert len(result.baselines) == 2 * 2  # 2 baselines x 2 images x 1 target
    x = _inputs(loaded, shapes)
    expected = LeGrad(loaded.model, [-2, -1], pooling="model").attribute_multi(x, targets=[1])
    np.testing.assert_allclose(np.load(result.files[0]), expected.numpy(), atol=1e-6)


def test_prompts_for_an_image_text_model(tmp_path: Path, shapes: List[str]) -> None:
    open_clip = pytest.importorskip("open_clip")
    from captum_legrad import ImageTextSimilarity

    torch.manual_seed(0)
    clip = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"layers": 2, "width": 32, "head_width": 16, "patch_size": 16, "image_size": 64},
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    ).eval()

    def tokenizer(texts: List[str]) -> torch.Tensor:
        return torch.tensor([[1 + (sum(map(ord, t)) + i) % 60 for i in range(8)] for t in texts])

    loaded = LoadedModel(
        model=clip,
        image_size=(64, 64),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        with_prompts=lambda prompts: ImageTextSimilarity.from_prompts(clip, prompts, tokenizer),
    )
    explorer = Explorer(loaded, workdir=tmp_path)
    result = explorer.explain(shapes[:1], Settings(what="a circle\na square, a cross"))
    assert [c.split(": ")[1].split(" (")[0] for _, c in result.maps] == [
        "a circle",
        "a square",
        "a cross",
    ]
    assert all("cosine" in caption for _, caption in result.maps)
    model = ImageTextSimilarity.from_prompts(clip, ["a circle", "a square", "a cross"], tokenizer)
    x = _inputs(loaded, shapes[:1])
    expected = LeGrad(model).attribute_multi(x, targets=[0, 1, 2])
    np.testing.assert_allclose(np.load(result.files[0]), expected.numpy(), atol=1e-6)
    with pytest.raises(ExplorerError, match="at least one prompt"):
        explorer.explain(shapes[:1], Settings(what="  ,\n "))
