"""The explorer's callbacks (captum_legrad.app.Explorer), without a browser."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Dict, List
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from conftest import assert_not_vacuous, restore_sigint
from PIL import Image

from captum_legrad import LeGrad
from captum_legrad.app import Explorer, ExplorerError, Settings
from captum_legrad.data import ShapesDataset
from captum_legrad.eval.classes import parse_classes
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


def test_class_names_are_read_by_the_parser_of_explain(
    explorer: Explorer, loaded: LoadedModel, shapes: List[str]
) -> None:
    classes = loaded.classes or []
    result = explorer.explain(shapes[:1], Settings(what=f"{classes[2].upper()}, 0, 0"))
    assert [caption.split(": ")[1].split(" (")[0] for _, caption in result.maps] == [
        classes[2],
        classes[0],
    ]
    with pytest.raises(ExplorerError, match=r"Unknown class name 'zebra'"):
        explorer.explain(shapes[:1], Settings(what="zebra"))
    with pytest.raises(ExplorerError, match=r"did you mean 'circle' \(0\)"):
        explorer.explain(shapes[:1], Settings(what="circel"))
    with pytest.raises(ExplorerError, match="Target 99 is out of range"):
        explorer.explain(shapes[:1], Settings(what="99"))
    with pytest.raises(ExplorerError, match="Target -1 is out of range"):
        explorer.explain(shapes[:1], Settings(what="-1"))


def test_synonyms_are_matched_as_explain_matches_them(
    loaded: LoadedModel, shapes: List[str], tmp_path: Path
) -> None:
    # ImageNet-style names with comma-separated synonyms: "tabby, tabby cat"
    names = ["circle, round thing", "square", "triangle", "cross, plus sign", "ring"]
    explorer = Explorer(dataclasses.replace(loaded, classes=names), workdir=tmp_path)
    for typed, indices in (
        ("round thing", [0]),
        ("PLUS SIGN", [3]),
        ("cross, plus sign", [3]),  # a whole class name with its comma is one class
        ("square, 4", [1, 4]),
        ("cross, plus sign; triangle", [3, 2]),
    ):
        result = explorer.explain(shapes[:1], Settings(what=typed))
        assert parse_classes(typed, names, 5) == indices  # the parser explain uses
        assert [caption.split(": ")[1].split(" (")[0] for _, caption in result.maps] == [
            names[i] for i in indices
        ]


def test_the_figure_names_every_image_target_and_score(
    explorer: Explorer, loaded: LoadedModel, shapes: List[str]
) -> None:
    # s0.png and s1.png have different top classes: each panel must name its own
    x = _inputs(loaded, shapes)
    with torch.no_grad():
        probs = torch.sigmoid(loaded.model(x))
    top = probs.argmax(-1).tolist()
    classes = loaded.classes or []
    assert top[0] != top[1]
    result = explorer.explain(shapes, Settings(top_k=1))
    assert result.figure is not None
    axes = result.figure.axes
    titles = [ax.get_title() for ax in axes if ax.get_title()]
    expected = [
        "s0.png\n(input)",
        f"s0.png\n{classes[top[0]]} (p = {float(probs[0, top[0]]):.2f})",
        "s1.png\n(input)",
        f"s1.png\n{classes[top[1]]} (p = {float(probs[1, top[1]]):.2f})",
    ]
    assert titles == expected
    # one colour bar per map panel, from 0 to 1
    bars = [ax for ax in axes if not ax.get_title()]
    assert len(bars) == 2
    assert [bar.get_ylim() for bar in bars] == [(0.0, 1.0)] * 2
    # the table and the captions say the same per image
    assert [row[0] for row in result.rows] == ["s0.png", "s1.png"]
    assert [row[1] for row in result.rows] == [classes[top[0]], classes[top[1]]]
    assert "| s1.png | **" + classes[top[1]] + "** |" in result.summary


def test_blend_is_the_weighted_sum_of_image_and_colours() -> None:
    from matplotlib import colormaps

    from captum_legrad.viz import blend

    torch.manual_seed(0)
    image = torch.rand(3, 8, 10)
    heat = torch.rand(8, 10) * 3 + 1
    out = blend(image, heat, alpha=0.3, cmap="viridis")
    scaled = ((heat - heat.min()) / (heat.max() - heat.min())).numpy()
    colours = np.array([[colormaps["viridis"](v)[:3] for v in row] for row in scaled])
    oracle = 0.7 * image.permute(1, 2, 0).numpy() + 0.3 * colours
    assert out.shape == (8, 10, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, oracle, atol=1e-6)
    assert oracle.std() > 0.05


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


def tiny_clip() -> LoadedModel:
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

    return LoadedModel(
        model=clip,
        image_size=(64, 64),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        with_prompts=lambda prompts: ImageTextSimilarity.from_prompts(clip, prompts, tokenizer),
        extra={"tokenizer": tokenizer},
    )


def test_prompts_for_an_image_text_model(tmp_path: Path, shapes: List[str]) -> None:
    from captum_legrad import ImageTextSimilarity

    loaded = tiny_clip()
    clip, tokenizer = loaded.model, loaded.extra["tokenizer"]
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


def test_compare_with_a_reference_image(tmp_path: Path, shapes: List[str]) -> None:
    from captum_legrad import ImageImageSimilarity

    loaded = tiny_clip()
    clip = loaded.model
    explorer = Explorer(loaded, workdir=tmp_path)
    # the prompts field is not used when a reference is given
    result = explorer.explain(shapes, Settings(what="ignored"), references=[shapes[1]])
    x = _inputs(loaded, shapes)
    with torch.no_grad():  # the oracle: the cosine of OpenCLIP's own embeddings
        emb = torch.nn.functional.normalize(clip.encode_image(x), dim=-1)
    cosine = emb @ emb[1]
    assert abs(float(cosine[1]) - 1.0) < 1e-5 and abs(float(cosine[0])) < 0.999
    assert [caption for _, caption in result.maps] == [
        f"s0.png: like s1.png (cosine similarity {float(cosine[0]):.3f})",
        f"s1.png: like s1.png (cosine similarity {float(cosine[1]):.3f})",
    ]
    assert result.rows[0] == ("s0.png", "like s1.png", f"cosine similarity {float(cosine[0]):.3f}")
    sim = ImageImageSimilarity.from_images(clip, x[1:])
    expected = LeGrad(sim).attribute_multi(x, targets=[0])
    saved = np.load(result.files[0])
    assert saved.shape == (2, 1, 64, 64)
    np.testing.assert_allclose(saved, expected.numpy(), atol=1e-6)
    assert_not_vacuous(expected)
    assert result.figure is not None
    titles = [a.get_title() for a in result.figure.axes]
    assert f"s0.png\nlike s1.png (cosine similarity {float(cosine[0]):.3f})" in titles


def test_compare_with_a_model_without_an_image_embedding(
    explorer: Explorer, shapes: List[str], tmp_path: Path
) -> None:
    # the bundled model is a classifier: one clear message, no library traceback text
    with pytest.raises(ExplorerError, match=r"no image embedding.*Load a feature model") as info:
        explorer.explain(shapes[:1], Settings(), references=[shapes[1]])
    assert "\n" not in str(info.value)
    broken = tmp_path / "ref.png"
    broken.write_bytes(b"GIF89a broken")
    with pytest.raises(ExplorerError, match=r"ref\.png is not an image.*reference"):
        Explorer(tiny_clip(), workdir=tmp_path).explain(
            shapes[:1], Settings(), references=[str(broken)]
        )


# --------------------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_launch_says_where_it_serves_logs_mistakes_in_one_line_and_cleans_up(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, shapes: List[str]
) -> None:
    pytest.importorskip("gradio")
    client_module = pytest.importorskip("gradio_client")
    from captum_legrad import app

    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    first = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:  # take Gradio's first port (if another process has it, it is taken all the same)
        blocker.bind(("127.0.0.1", first))
        blocker.listen(1)
    except OSError:
        pass
    try:
        page = app.launch("default", block=False)
    finally:
        blocker.close()
    try:
        out = capfd.readouterr().out
        line = [ln for ln in out.splitlines() if ln.startswith("LeGrad explorer running on")]
        assert len(line) == 1, out
        url = re.search(r"(http://\S+/)", line[0]).group(1)  # type: ignore[union-attr]
        port = urlparse(url).port
        assert port == urlparse(page.local_url).port and port != first
        assert f"(port {first} was taken)" in line[0] and "close()" in line[0]
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200
        workspace = Path(os.environ["GRADIO_TEMP_DIR"]).parent
        assert workspace.name.startswith("captum-legrad-app-") and workspace.is_dir()
        client = client_module.Client(url, verbose=False)
        inputs = dict(
            paths=[client_module.handle_file(shapes[0])],
            what_text="zebra",
            k=1,
            reference_path=None,
            layer_choice="all",
            custom_text="",
            pooling_choice="mean",
            alpha=0.5,
            chosen=[],
        )
        answer = client.predict(**inputs, api_name="/run")  # the page shows the message
        assert answer[0] == "**Could not explain:** Unknown class name 'zebra' for this model."
        assert answer[1] == "" and answer[2] == []
        answer = client.predict(**{**inputs, "what_text": "ring"}, api_name="/run")
        assert answer[0] == "" and "| s0.png | **ring** |" in answer[1]
        err = capfd.readouterr().err
        assert "Traceback" not in err
        assert [ln for ln in err.splitlines() if "zebra" in ln] == [
            "captum-legrad app: Unknown class name 'zebra' for this model."
        ]
    finally:
        page.close()
    assert not workspace.exists() and "GRADIO_TEMP_DIR" not in os.environ


def _server_env(tmp_path: Path) -> Dict[str, str]:
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = dict(os.environ)
    env.pop("GRADIO_TEMP_DIR", None)
    root = str(Path(__file__).resolve().parents[1])
    env.update(TMPDIR=str(temp), HF_HUB_OFFLINE="1", PYTHONPATH=root, PYTHONUNBUFFERED="1")
    return env


def _leftovers(tmp_path: Path) -> List[str]:
    return sorted(
        p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith(("captum", "gradio"))
    )


def test_ctrl_c_ends_the_explorer_with_130_in_one_line_and_no_leftovers(tmp_path: Path) -> None:
    pytest.importorskip("gradio")
    proc = subprocess.Popen(
        [sys.executable, "-m", "captum_legrad.cli", "app", "--port", str(_free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_server_env(tmp_path),
        preexec_fn=restore_sigint,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the address is printed (or it dies)
        assert line.startswith("LeGrad explorer running on http://127.0.0.1:"), line
        assert "Press Ctrl+C to stop it." in line
        assert [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("captum")]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["captum-legrad: explorer stopped (Ctrl+C)"], err
    assert _leftovers(tmp_path) == []


def test_temporary_folders_are_removed_at_exit(tmp_path: Path) -> None:
    pytest.importorskip("gradio")
    script = (
        "from captum_legrad import app\n"
        f"page = app.launch('default', port={_free_port()}, block=False)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=_server_env(tmp_path),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "LeGrad explorer running on" in done.stdout
    assert _leftovers(tmp_path) == []


def test_the_header_says_random_weights_in_plain_words(loaded: LoadedModel) -> None:
    from captum_legrad.app import describe

    random = dataclasses.replace(loaded, weights="random (--random-weights)", random_init=True)
    line = describe("timm:vit_small_patch16_224", random)
    assert line == (
        "Model: `timm:vit_small_patch16_224` with random weights (`--random-weights`): the "
        "maps show nothing the model learned."
    )
    pretrained = dataclasses.replace(loaded, weights="pretrained (hub)", random_init=False)
    assert describe("timm:vit_small_patch16_224", pretrained) == (
        "Model: `timm:vit_small_patch16_224`, weights: pretrained (hub)."
    )
    assert "bundled shapes ViT" in describe("default", loaded)
    for text in (line, describe("x", pretrained)):
        assert "((" not in text and "))" not in text and "(random (" not in text
