"""The captum-legrad command line: outputs against direct calls, bad input, torchrun.

Nothing here touches the network. Pretrained weights "by name" are simulated by
monkeypatching the library's download function (to return a local file, or to raise as an
unreachable hub does), and by ``HF_HUB_OFFLINE=1`` (set in conftest.py).

Bad input, each case exits with code 2, one line on stderr and no output folder left
behind (the same table is in docs/cli.md):

| case | message (excerpt) |
|---|---|
| image or folder missing | no such image or folder |
| unreadable / corrupt image | cannot read image |
| --out is an existing file | is a file, not a folder |
| --out below a file (cannot be created) | cannot create --out |
| target index out of range (5, -1) | target 5 is out of range |
| unknown class name | unknown class name |
| a class given twice (--target 2 2, 2 triangle) | more than once |
| --labels with the wrong number of names | --labels has 3 names |
| --top-k 0, --num-images 0, --batch-size 0 | must be at least 1 |
| unknown model / family / timm / torchvision name | unknown model ... |
| torchvision model that is no ViT | not a VisionTransformer |
| --prompt for a classifier | no text tower |
| weights file missing | weights file not found |
| corrupt .safetensors | not a valid .safetensors file |
| garbage .pth | not a PyTorch state dict |
| whole-model pickle | hold a pickled Python object |
| checkpoint of another architecture | do not fit ... missing ... |
| --model default with another model's weights | do not fit --model default |
| --device cuda without a GPU | no CUDA GPU is available |
| pretrained weights, hub unreachable or offline | cannot load the pretrained weights |
| open_clip name without a tag or weights | names no weights |
| eval: unwritable --out (before any evaluation) | is a file, not a folder |
"""

from __future__ import annotations

import functools
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from _versions import require
from PIL import Image

from captum_legrad import LeGrad
from captum_legrad.cli import main
from captum_legrad.data import ShapesDataset, load_default_model, normalize
from captum_legrad.eval import models
from captum_legrad.eval.datasets import load_image

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
_LOCAL = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Offline, with an empty hub cache, and any attempt to reach another host fails.

    ``HF_HUB_OFFLINE=1`` from conftest.py does not reach huggingface_hub when it was
    imported before conftest ran (its constant is read at import), so it is set here too.
    """
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    resolve, connect = socket.getaddrinfo, socket.socket.connect

    def local_only(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in _LOCAL and host is not None:
            raise AssertionError(f"a test tried to reach the network: {host}")
        return resolve(host, *args, **kwargs)

    def connect_local(self: socket.socket, address: Any) -> Any:
        if isinstance(address, tuple) and address[0] not in _LOCAL:
            raise AssertionError(f"a test tried to reach the network: {address}")
        return connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    monkeypatch.setattr(socket.socket, "connect", connect_local)


def save_png(path: Path, image: torch.Tensor) -> None:
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)


def run(argv: List[str], capsys: pytest.CaptureFixture[str]) -> Any:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def bilinear(amap: np.ndarray, y: float, x: float) -> float:
    """``amap`` at continuous pixel position (y, x) (pixel centres at i + 0.5), edges clamped."""
    h, w = amap.shape
    py, px = min(max(y - 0.5, 0.0), h - 1.0), min(max(x - 0.5, 0.0), w - 1.0)
    y0, x0 = int(np.floor(py)), int(np.floor(px))
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    wy, wx = py - y0, px - x0
    top = amap[y0, x0] * (1 - wx) + amap[y0, x1] * wx
    bottom = amap[y1, x0] * (1 - wx) + amap[y1, x1] * wx
    return float(top * (1 - wy) + bottom * wy)


def project_by_hand(
    amap: np.ndarray, photo: Tuple[int, int], resized: Tuple[int, int], offset: Tuple[int, int]
) -> np.ndarray:
    """The map on the photo as docs/cli.md specifies it, pixel by pixel."""
    (h, w), (crop_h, crop_w) = photo, amap.shape
    out = np.full((h, w), np.nan)
    for y in range(h):
        cy = (y + 0.5) * resized[0] / h - offset[0]
        if not 0 <= cy < crop_h:
            continue
        for x in range(w):
            cx = (x + 0.5) * resized[1] / w - offset[1]
            if 0 <= cx < crop_w:
                out[y, x] = bilinear(amap, cy, cx)
    return out


# --------------------------------------------------------------------------- explain


def test_explain_default_model_equals_legrad(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image_path = tmp_path / "shape.png"
    save_png(image_path, ShapesDataset(1)[0].image)
    out = tmp_path / "out"
    argv = ["explain", str(image_path), "--model", "default", "--target", "0", "cross"]
    code, stdout, err = run([*argv, "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "shape.png",
        "shape_circle.npy",
        "shape_cross.npy",
    ]
    x = normalize(load_image(image_path))[None]
    expected = LeGrad(load_default_model()).attribute(x, target=3, output="map")[0, 0]
    np.testing.assert_allclose(np.load(out / "shape_cross.npy"), expected.numpy(), atol=1e-6)
    assert "warning" not in err  # a shapes image: the bundled model is on its own ground
    assert "wrote 3 files" in stdout and "shape_cross.npy" in stdout
    with Image.open(out / "shape.png") as picture:  # photo + 2 overlays with colour bars
        assert picture.size[0] > 2.5 * picture.size[1]


def test_explain_projects_onto_the_photo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 80×120 photo: resized to 64×96, centre crop 64×64; the map goes back at 80×120."""
    photo = torch.rand(3, 80, 120, generator=torch.Generator().manual_seed(3))
    save_png(tmp_path / "wide.png", photo)
    out = tmp_path / "out"
    code, stdout, err = run(
        ["explain", str(tmp_path / "wide.png"), "--model", "default", "--out", str(out)], capsys
    )
    assert code == 0, err
    image = load_image(tmp_path / "wide.png")
    resized = F.interpolate(
        image[None], size=(64, 96), mode="bilinear", align_corners=False, antialias=True
    ).clamp(0, 1)
    x = normalize(resized[:, :, :, 16:80])  # int(64 * 120 / 80) = 96; left = (96 - 64) / 2
    model = load_default_model()
    top = int(model(x).argmax())  # no --target: the top-1 class
    name = ["circle", "square", "triangle", "cross", "ring"][top]
    assert sorted(p.name for p in out.iterdir()) == sorted(["wide.png", f"wide_{name}.npy"])
    saved = np.load(out / f"wide_{name}.npy")
    assert saved.shape == (80, 120) and saved.dtype == np.float32
    heat = LeGrad(model).attribute(x, target=top, output="map")[0, 0].numpy()
    expected = project_by_hand(heat, (80, 120), (64, 96), (0, 16))
    assert np.isnan(saved[:, :20]).all() and np.isnan(saved[:, 100:]).all()  # cropped away
    assert not np.isnan(saved[:, 20:100]).any()
    np.testing.assert_allclose(saved, expected, atol=1e-5)
    assert "warning: --model default is a tiny model trained on synthetic" in err
    assert f"wide.png: {name}" in stdout


def test_explain_timm_with_local_weights_matches_direct_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """timm's own transform (resize 248 bicubic, centre crop 224), then the map on the photo."""
    torch.manual_seed(0)
    name = "vit_tiny_patch16_224"
    model = timm.create_model(name, pretrained=False, num_classes=3).eval()
    weights = tmp_path / "w.pth"
    torch.save(model.state_dict(), weights)
    save_png(tmp_path / "im.png", torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(1)))
    out = tmp_path / "out"
    argv = ["explain", str(tmp_path / "im.png"), "--model", f"timm:{name}", "--num-classes", "3"]
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nremote control\n")
    argv += ["--weights", str(weights), "--labels", str(labels), "--target", "remote control"]
    code, stdout, err = run([*argv, "--out", str(out), "--format", "pdf"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["im.pdf", "im_remote_control.npy"]
    config = timm.data.resolve_data_config({}, model=model)
    with Image.open(tmp_path / "im.png") as handle:
        x = timm.data.create_transform(**config)(handle.convert("RGB"))[None]
    heat = LeGrad(model).attribute(x, target=2, output="map")[0, 0].numpy()
    # 40×50: shortest edge to floor(224 / 0.9) = 248 → 248×310; crop 224 at (12, 43)
    expected = project_by_hand(heat, (40, 50), (248, 310), (12, 43))
    np.testing.assert_allclose(np.load(out / "im_remote_control.npy"), expected, atol=1e-5)
    with torch.no_grad():
        probability = float(model(x).softmax(-1)[0, 2])
    assert f"remote control ({probability:.3f})" in stdout  # as the figure prints it
    assert f"weights: file {weights}" in stdout  # says where the weights came from


def test_explain_name_collisions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """pic.png and pic.jpg: two figures, two maps, and the summary counts what is on disk."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for suffix, seed in ((".png", 0), (".jpg", 1)):
        image = ShapesDataset(2)[seed].image
        save_png(folder / f"pic{suffix}", image)
    out = tmp_path / "out"
    argv = ["explain", str(folder), "--model", "default", "--target", "circle", "--quiet"]
    code, stdout, err = run([*argv, "--out", str(out)], capsys)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["pic_jpg.png", "pic_jpg_circle.npy", "pic_png.png", "pic_png_circle.npy"]
    assert f"wrote {len(names)} files" in stdout


def test_explain_top_k_and_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = ShapesDataset(1)[0].image
    save_png(tmp_path / "s.png", image)
    labels = tmp_path / "names.txt"
    labels.write_text("ball\nbox\nwedge\nplus\ndonut\n")
    argv = ["explain", str(tmp_path / "s.png"), "--model", "default", "--top-k", "3"]
    code, stdout, err = run([*argv, "--labels", str(labels), "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    logits = load_default_model()(normalize(image)[None])[0]
    order = [["ball", "box", "wedge", "plus", "donut"][int(i)] for i in logits.topk(3).indices]
    assert sorted(p.stem for p in (tmp_path / "o").glob("*.npy")) == sorted(f"s_{n}" for n in order)
    assert stdout.splitlines()[0] == "model default, weights: bundled"
    shown = stdout.splitlines()[1]
    assert shown.index(order[0]) < shown.index(order[1]) < shown.index(order[2])


# --------------------------------------------------------------------------- weights by name


def test_timm_pretrained_weights_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """timm:NAME loads timm's pretrained weights: the hub download returns a local file here."""
    from safetensors.torch import save_file

    from captum_legrad.eval.models import load_model

    torch.manual_seed(1)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    save_file(reference.state_dict(), str(tmp_path / "model.safetensors"))
    asked: List[Tuple[str, str]] = []

    def download(repo_id: str, filename: str, **kwargs: Any) -> str:
        asked.append((repo_id, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", download)
    loaded = load_model("timm:vit_tiny_patch16_224")
    assert asked == [("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", "model.safetensors")]
    for (key, value), expected in zip(
        loaded.model.state_dict().items(), reference.state_dict().values()
    ):
        assert torch.equal(value, expected), key
    assert loaded.classes is not None and loaded.classes[281] == "tabby, tabby cat"
    assert not loaded.random_init and "pretrained" in loaded.weights
    assert loaded.preprocessing().geometry(300, 400).resized == (248, 330)


@pytest.mark.parametrize("offline", [True, False])
def test_timm_hub_unreachable_says_how_to_pass_weights(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    offline: bool,
) -> None:
    save_png(tmp_path / "x.png", torch.rand(3, 32, 32))
    calls: List[str] = []
    if not offline:  # the hub "is unreachable": the download raises as without a network
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        # the host answers the first connection (else the loader goes offline at once)
        monkeypatch.setattr(models, "probe_host", lambda host, port, timeout: True)

        def unreachable(repo_id: str, filename: str, **kwargs: Any) -> str:
            calls.append(filename)
            raise ConnectionError("Failed to establish a new connection")

        monkeypatch.setattr(timm.models._hub, "hf_hub_download", unreachable)
    out = tmp_path / "out"
    argv = ["explain", str(tmp_path / "x.png"), "--model", "timm:vit_tiny_patch16_224"]
    code, _, err = run([*argv, "--out", str(out)], capsys)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 + (not offline), err
    if not offline:  # said before trying (offline: the cache only, nothing to wait for)
        assert lines[0] == "loading pretrained weights of timm:vit_tiny_patch16_224 from the hub..."
    assert "cannot load the pretrained weights of timm:vit_tiny_patch16_224" in err
    assert "--weights FILE" in err and "--random-weights" in err
    assert ("HF_HUB_OFFLINE is set" in err) == offline
    assert ("hub cannot be reached" in err) == (not offline)
    assert bool(calls) == (not offline)
    assert not out.exists()


def test_torchvision_hub_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline: no download is tried. Online but unreachable: the download's error is caught."""
    torchvision = pytest.importorskip("torchvision")
    calls: List[str] = []

    def unreachable(url: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(url)
        raise OSError("urlopen error [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", unreachable)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    save_png(tmp_path / "x.png", torch.rand(3, 32, 32))
    argv = ["explain", str(tmp_path / "x.png"), "--model", "torchvision:vit_b_16"]
    argv += ["--out", str(tmp_path / "out")]
    code, _, err = run(argv, capsys)
    assert code == 2 and "HF_HUB_OFFLINE is set" in err and "--weights FILE" in err
    assert calls == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(models, "probe_host", lambda host, port, timeout: True)
    code, _, err = run(argv, capsys)
    assert code == 2 and "hub cannot be reached" in err and err.count("\n") == 2
    assert err.startswith("loading pretrained weights of torchvision:vit_b_16 from the hub...")
    assert calls == ["https://download.pytorch.org/models/vit_b_16-c867db91.pth"]


def test_open_clip_prompts_with_local_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """open_clip:NAME --weights: no "initialized randomly" message, OpenCLIP's preprocess."""
    open_clip = pytest.importorskip("open_clip")
    import json

    from test_open_clip import known_options  # without options open_clip < 2.23 lacks

    from captum_legrad import ImageTextSimilarity

    config: Dict[str, Any] = json.loads((ROOT / "tests/fixtures/reference/config.json").read_text())
    config = known_options(config)
    config["text_cfg"]["vocab_size"] = 49408  # the real tokenizer's vocabulary
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "TinyCLIP", config)
    torch.manual_seed(0)
    model = open_clip.create_model("TinyCLIP", pretrained=None).eval()
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    save_png(tmp_path / "x.png", torch.rand(3, 40, 30, generator=torch.Generator().manual_seed(2)))
    argv = ["explain", str(tmp_path / "x.png"), "--model", "open_clip:TinyCLIP"]
    argv += ["--weights", str(tmp_path / "clip.pt"), "--prompt", "a cat", "a dog"]
    code, stdout, err = run([*argv, "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert "initialized randomly" not in err + stdout
    _, _, preprocess = open_clip.create_model_and_transforms("TinyCLIP")
    with Image.open(tmp_path / "x.png") as handle:
        x = preprocess(handle.convert("RGB"))[None]
    tokenizer = open_clip.get_tokenizer("TinyCLIP")
    if getattr(tokenizer, "context_length", None) is None:  # open_clip < 2.23: always 77
        tokenizer = functools.partial(tokenizer, context_length=model.context_length)
    sim = ImageTextSimilarity.from_prompts(model, ["a cat", "a dog"], tokenizer)
    heat = LeGrad(sim).attribute(x, target=1, output="map")[0, 0].numpy()
    # 40×30 (h×w): shortest edge 30 → 32, long int(32 * 40 / 30) = 42; crop 32 at top 5
    expected = project_by_hand(heat, (40, 30), (42, 32), (5, 0))
    np.testing.assert_allclose(np.load(tmp_path / "o" / "x_a_dog.npy"), expected, atol=1e-5)
    with torch.no_grad():
        assert f"a dog ({float(sim(x)[0, 1]):.3f})" in stdout


def test_explain_hf_folder_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "vit"
    )
    save_png(tmp_path / "x.png", torch.rand(3, 32, 48))
    argv = ["explain", str(tmp_path / "x.png"), "--model", f"hf:{tmp_path / 'vit'}"]
    code, _, err = run([*argv, "--target", "2", "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    heat = np.load(tmp_path / "out" / "x_LABEL_2.npy")
    # the ViT processor stretches to 32×32: nothing is cropped, the map covers the photo
    assert heat.shape == (32, 48) and not np.isnan(heat).any()
    assert heat.min() >= 0.0 and heat.max() <= 1.0 and heat.max() > 0.9


def test_explain_torchvision_matches_direct_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision:NAME --random-weights goes through the registry's loader (a tiny ViT)."""
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    tiny = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=3,
    )  # fmt: skip
    with torch.no_grad():  # torchvision zero-initialises the head: give it values
        tiny.heads.head.weight.normal_()
    asked = {}

    def get_model(name: str, **kwargs: Any) -> torch.nn.Module:
        asked.update(kwargs, name=name)
        return tiny

    monkeypatch.setattr(torchvision.models, "get_model", get_model)
    save_png(tmp_path / "x.png", torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)))
    argv = ["explain", str(tmp_path / "x.png"), "--model", "torchvision:vit_b_16", "--quiet"]
    argv += ["--random-weights", "--num-classes", "3", "--target", "2", "--out", str(tmp_path)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert "random weights" in err  # warned
    assert asked == {"name": "vit_b_16", "weights": None, "num_classes": 3}
    # the preset of vit_b_16 scaled to 32: resize 37 (= round(32 * 256 / 224)), crop 32
    preset = torchvision.transforms._presets.ImageClassification(crop_size=32, resize_size=37)
    with Image.open(tmp_path / "x.png") as handle:
        x = preset(handle.convert("RGB"))[None]
    expected = LeGrad(tiny.eval()).attribute(x, target=2, output="map")[0, 0].numpy()
    assert float(expected.max()) == 1.0  # a real map, not the zero map of a zero head
    saved = np.load(tmp_path / "x_class_2.npy")
    assert (tmp_path / "x_legrad.png").is_file()  # --out is the photo's folder: not overwritten
    np.testing.assert_allclose(saved, project_by_hand(expected, (32, 32), (37, 37), (2, 2)),
                               atol=1e-5)  # fmt: skip


# --------------------------------------------------------------------------- bad input


def bad_files(tmp_path: Path) -> Dict[str, Path]:
    """The files the bad-input table uses."""
    from safetensors.torch import save_file

    files = {"IMG": tmp_path / "x.png", "FILE": tmp_path / "a_file.txt"}
    save_png(files["IMG"], torch.rand(3, 64, 64))
    files["FILE"].write_text("not a folder")
    files["BROKEN_IMG"] = tmp_path / "broken.png"
    files["BROKEN_IMG"].write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    files["CORRUPT_ST"] = tmp_path / "corrupt.safetensors"
    files["CORRUPT_ST"].write_bytes(os.urandom(300))
    files["GARBAGE_PTH"] = tmp_path / "garbage.pth"
    files["GARBAGE_PTH"].write_bytes(pickle.dumps([1, 2]) + os.urandom(50))
    files["PICKLED_MODEL"] = tmp_path / "whole.pth"
    torch.save(torch.nn.Linear(2, 2), files["PICKLED_MODEL"])
    files["OTHER_ST"] = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(files["OTHER_ST"]))
    files["LABELS3"] = tmp_path / "labels.txt"
    files["LABELS3"].write_text("a\nb\nc\n")
    return files


D = ["explain", "IMG", "--model", "default"]
BAD_INPUT = [
    (["explain", "missing.png", "--model", "default"], "no such image or folder"),
    (["explain", "BROKEN_IMG", "--model", "default"], "cannot read image"),
    ([*D, "--out", "FILE"], "is a file, not a folder"),
    ([*D, "--out", "FILE/sub"], "cannot create --out"),
    ([*D, "--target", "5"], "target 5 is out of range"),
    ([*D, "--target", "-1"], "target -1 is out of range"),
    ([*D, "--target", "tabby cat"], "unknown class name 'tabby cat'"),
    ([*D, "--target", "2", "2"], "names class 2 more than once"),
    ([*D, "--target", "2", "triangle"], "names class 2 more than once"),
    ([*D, "--labels", "LABELS3"], "--labels has 3 names but the model has 5 outputs"),
    ([*D, "--top-k", "0"], "--top-k must be at least 1"),
    ([*D, "--prompt", "a cat"], "no text tower"),
    ([*D, "--weights", "nope.pt"], "weights file not found"),
    ([*D, "--weights", "CORRUPT_ST"], "not a valid .safetensors file"),
    ([*D, "--weights", "GARBAGE_PTH"], "not a PyTorch state dict"),
    ([*D, "--weights", "PICKLED_MODEL"], "hold a pickled Python object"),
    ([*D, "--weights", "OTHER_ST"], "do not fit --model default"),
    ([*D, "--random-weights"], "drop --random-weights"),
    ([*D, "--num-classes", "3"], "drop --num-classes"),
    ([*D, "--device", "cuda"], "no CUDA GPU is available"),
    ([*D, "--device", "tpu9"], "is not a device"),
    (["explain", "IMG", "--model", "resnet"], "unknown model 'resnet'"),
    (["explain", "IMG", "--model", "torch:vit"], "unknown model family"),
    (["explain", "IMG", "--model", "timm:no_such_vit"], "unknown timm model"),
    (["explain", "IMG", "--model", "torchvision:no_such_vit"], "unknown torchvision model"),
    (
        ["explain", "IMG", "--model", "torchvision:resnet18", "--random-weights"],
        "not a VisionTransformer",
    ),
    (["explain", "IMG", "--model", "hf:/no/such/dir"], "local model folder"),
    (["explain", "IMG", "--model", "hf:google/vit-base-patch16-224"], "HF_HUB_OFFLINE is set"),
    (["explain", "IMG", "--model", "open_clip:ViT-B-32"], "names no weights: add a pretrained"),
    (["explain", "IMG", "--model", "open_clip:ViT-B-32/nope"], "unknown pretrained tag 'nope'"),
    (["explain", "IMG", "--model", "open_clip:ViT-B-32/openai"], "HF_HUB_OFFLINE is set"),
    (["eval", "--dataset", "shapes", "--num-images", "0"], "must be at least 1, got 0"),
    (["eval", "--dataset", "shapes", "--batch-size", "0"], "must be at least 1, got 0"),
    (["eval", "--dataset", "shapes", "--out", "FILE"], "is a file, not a folder"),
    (["eval", "--dataset", "shapes", "--device", "cuda"], "no CUDA GPU is available"),
    (["eval", "--dataset", "imagenet-seg", "--data", "nope.mat"], "not found"),
    (["eval", "--dataset", "imagenet-seg"], "needs --data"),
    (
        ["eval", "--dataset", "imagenet-seg", "--data", "LABELS3"],
        "labels.txt is not an HDF5 file",
    ),
    (
        [
            "explain",
            "IMG",
            "--model",
            "timm:vit_tiny_patch16_224",
            "--random-weights",
            "--ask",
            "q",
        ],
        "--ask needs a vision-language model from transformers, not timm:",
    ),
    (["eval", "--dataset", "shapes", "--methods", "legrad", "lime"], "unknown method"),
    (["eval", "--dataset", "shapes", "--threshold", "half"], "--threshold"),
    (["demo", "--num-images", "0"], "must be at least 1, got 0"),
    (["demo", "--out", "FILE"], "is a file, not a folder"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUT, ids=[m for _, m in BAD_INPUT])
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: List[str],
    message: str,
) -> None:
    if "cuda" in argv and CUDA:
        pytest.skip("a GPU is present")
    import captum_legrad.eval.runner as runner

    def no_evaluation(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the evaluation ran before the error was found")

    monkeypatch.setattr(runner, "run_evaluation", no_evaluation)
    files = bad_files(tmp_path)
    out = tmp_path / "out"
    argv = [str(files[a]) if a in files else a for a in argv]
    argv = [a.replace("FILE/", f"{files['FILE']}/") for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(out)]
    if argv[0] != "explain":
        argv.append("--quiet")
    code, _, err = run(argv, capsys)
    assert code == 2, err
    assert message in err, err
    assert err.startswith("captum-legrad") and ": error: " in err and err.count("\n") == 1
    assert "Traceback" not in err and "\x1b[" not in err
    assert not out.exists()  # nothing left behind
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in files.values()}


def test_mismatched_checkpoint_is_described_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import save_file

    name = "vit_tiny_patch16_224"
    small = timm.create_model(name, pretrained=False, num_classes=3, depth=2)
    save_file(small.state_dict(), str(tmp_path / "w.safetensors"))
    save_png(tmp_path / "x.png", torch.rand(3, 40, 50))
    argv = ["explain", str(tmp_path / "x.png"), "--model", f"timm:{name}", "--num-classes", "3"]
    argv += ["--weights", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "out")]
    code, _, err = run(argv, capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"do not fit timm:{name}: 120 missing (blocks.2.norm1.weight, " in err
    head = timm.create_model(name, pretrained=False, num_classes=7)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    argv[argv.index(str(tmp_path / "w.safetensors"))] = str(tmp_path / "head.pth")
    code, _, err = run(argv, capsys)
    assert code == 2 and "classifier has 7 classes: pass --num-classes 7" in err


# --------------------------------------------------------------------------- help


def test_help_imports_no_torch_and_documents_every_option() -> None:
    code = (
        "import sys, time; start = time.perf_counter()\n"
        "from captum_legrad.cli import build_parser\n"
        "parser = build_parser()\n"
        "for command in ('demo', 'explain', 'eval'):\n"
        "    try: parser.parse_args([command, '--help'])\n"
        "    except SystemExit: pass\n"
        "print('torch' in sys.modules, round(time.perf_counter() - start, 3))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    last = done.stdout.strip().splitlines()[-1]
    assert last.split()[0] == "False", done.stdout[-500:]
    assert "(default: 1)" in done.stdout and "synthetic 64×64 shapes" in done.stdout
    from captum_legrad.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    for command, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"{command} {action.option_strings or action.dest} has no help"


def test_cli_method_names_are_the_harness_names() -> None:
    from captum_legrad.cli import METHOD_NAMES
    from captum_legrad.eval.harness import METHOD_NAMES as HARNESS

    assert METHOD_NAMES == HARNESS


def test_every_family_has_a_loader() -> None:
    """The registry serves discover and the command line: each row's loader exists."""
    import importlib

    from captum_legrad.eval.models import model_choices
    from captum_legrad.families import FAMILIES

    for row in FAMILIES:
        assert row.loader is not None, row.name
        module, _, function = row.loader.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), row.loader
        assert f"{row.name}:{row.name_hint}" in model_choices()
        assert importlib.import_module(f"captum_legrad.adapters.{row.adapter}").match


# --------------------------------------------------------------------------- eval and demo


def eval_argv(out: Path) -> List[str]:
    return [
        "eval",
        "--dataset",
        "shapes",
        "--num-images",
        "6",
        "--batch-size",
        "2",
        "--methods",
        "legrad",
        "gae",
        "saliency",
        "--no-plots",
        "--quiet",
        "--out",
        str(out),
    ]


def test_eval_shapes_counts_pairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = eval_argv(tmp_path / "o")
    argv.remove("--no-plots")
    code, stdout, _ = run(argv, capsys)
    assert code == 0
    objects = sum(len(ShapesDataset(6)[i].labels) for i in range(6))
    assert f"6 images, {objects} (image, target) pairs" in stdout
    table = (tmp_path / "o" / "results.md").read_text()
    for row in ("| LeGrad |", "| Chefer GAE |", "| Saliency |"):
        assert row in table
    assert "Pointing game" in table and "Pos. pert. AUC" in table and "p-mIoU" not in table
    assert f"with {torch.get_num_threads()} torch thread(s)" in table
    assert (tmp_path / "o" / "results.csv").read_text().count("\n") == 4
    listed = [line.strip() for line in stdout.splitlines() if line.startswith("  ")]
    assert listed == ["results.md", "results.csv", "curves.png", "examples.png"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted(listed)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def table_lines(path: Path) -> List[str]:
    return [line for line in path.read_text().splitlines() if line.startswith(("|", "Dataset"))]


def test_eval_torchrun_two_processes_equals_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two processes under torchrun give the table of one (run here, in this process)."""
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1)
    try:
        assert run(eval_argv(one), capsys)[0] == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_port", str(free_port()), "-m", "captum_legrad.cli", *eval_argv(two)]
    done = subprocess.run(launcher, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "6 images" in (one / "results.md").read_text()
    assert table_lines(two / "results.md") == table_lines(one / "results.md")
    assert "× 2 process(es)" in (two / "results.md").read_text()
    assert not (two / "curves.png").exists()


def test_demo_writes_and_lists_pictures_and_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--num-images", "4", "--examples", "2", "--out", str(tmp_path / "d")]
    code, stdout, err = run(argv, capsys)
    assert code == 0
    assert "| LeGrad |" in stdout and "| IntegratedGradients |" in stdout
    assert "demo: LeGrad and 7 baselines on 4" in err and "demo: explaining" in err  # progress
    listed = [line.strip() for line in stdout.splitlines() if line.startswith("  ")]
    assert listed == ["results.md", "results.csv", "curves.png", "demo.png"]
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(listed)
    assert "every label right, on these 4 images; 93.9 % on the 1000" in stdout


def test_eval_imagenet_seg_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_datasets import write_gtsegs

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (80, 96, 3), dtype=np.uint8) for _ in range(3)]
    masks = [np.ones((80, 96), dtype=np.uint8) for _ in range(3)]  # the object is everything
    path = tmp_path / "gtsegs_ijcv.mat"
    write_gtsegs(path, images, masks)
    argv = ["eval", "--dataset", "imagenet-seg", "--data", str(path), "--methods", "legrad"]
    argv += ["--no-perturbation", "--no-plots", "--quiet", "--out", str(tmp_path / "out")]
    code, stdout, _ = run(argv, capsys)
    assert code == 0
    assert "3 images, 3 (image, target) pairs" in stdout
    row = next(line for line in stdout.splitlines() if line.startswith("| LeGrad |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "100.0"  # pointing game: every pixel is on the object
    assert cells[4] == "100.0"  # AP with only positive pixels


def test_openimages_pipeline_p_miou(tmp_path: Path) -> None:
    from conftest import make_model

    from captum_legrad.eval.batches import openimages_batches
    from captum_legrad.eval.distributed import Context
    from captum_legrad.eval.harness import EvalConfig
    from captum_legrad.eval.metrics import point_counts
    from captum_legrad.eval.models import LoadedModel
    from captum_legrad.eval.runner import run_evaluation

    for i in range(2):
        save_png(
            tmp_path / f"img{i}.png",
            torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)),
        )
    csv = tmp_path / "points.csv"
    csv.write_text(
        "ImageId,X,Y,Label,EstimatedYesNo\n"
        "img0,0.2,0.2,/m/a,yes\nimg0,0.8,0.8,/m/a,no\nimg0,0.5,0.1,/m/b,yes\n"
        "img1,0.9,0.1,/m/b,yes\nimg1,0.1,0.9,/m/b,no\nimg1,0.6,0.6,/m/b,yes\n"
    )
    vit = make_model("vit", num_classes=2)
    loaded = LoadedModel(
        model=vit,
        image_size=(32, 32),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        with_prompts=lambda prompts: vit,
        patch_size=(8, 8),
    )
    factories, model, classes = openimages_batches(
        loaded, csv, tmp_path, None, None, 4, torch.device("cpu")
    )
    config = EvalConfig(patch_size=(8, 8), perturbation=False, num_point_classes=classes)
    context = Context(rank=0, world=1, device=torch.device("cpu"))
    outcome = run_evaluation(model, factories, ["legrad"], config, context, show_progress=False)
    results = outcome.results(config)
    assert outcome.images == 2 and classes == 2
    legrad = LeGrad(vit)
    table = torch.zeros(2, 3, dtype=torch.float64)
    annotations = {
        (0, 0): ([[0.2, 0.2], [0.8, 0.8]], [True, False]),
        (0, 1): ([[0.5, 0.1]], [True]),
        (1, 1): ([[0.9, 0.1], [0.1, 0.9], [0.6, 0.6]], [True, False, True]),
    }
    for (index, cls), (points, positive) in annotations.items():
        x = loaded.normalize(load_image(tmp_path / f"img{index}.png"))[None]
        heat = legrad.attribute(x, target=cls, output="map")[0, 0]
        table[cls] += point_counts(heat, torch.tensor(points) * 32, torch.tensor(positive))
    expected = float(100 * (table[:, 0] / table.sum(1)).mean())
    assert results["legrad"]["p_miou"] == pytest.approx(expected)


def test_explain_at_another_image_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--image-size 128 on the 64×64 bundled model: LeGrad at 128² (finer grid), as a direct
    call with the position embedding resampled; a size off the patch grid is one line."""
    from captum_legrad.data import ShapesDataset, load_default_model, normalize

    picture = ShapesDataset(1, seed=3, image_size=128)[0].image  # (3, 128, 128) in [0, 1]
    save_png(tmp_path / "big.png", picture)
    argv = ["explain", str(tmp_path / "big.png"), "--model", "default", "--target", "2"]
    code, _, err = run([*argv, "--image-size", "128", "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    (saved,) = sorted((tmp_path / "o").glob("*.npy"))
    x = normalize(load_image(tmp_path / "big.png"))[None]
    expected = LeGrad(load_default_model()).attribute(x, target=2, output="map")[0, 0]
    assert expected.shape == (128, 128)
    np.testing.assert_allclose(np.load(saved), expected.numpy(), atol=1e-5)
    code, _, err = run([*argv, "--image-size", "100", "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "not a multiple of the model's 8x8 patches" in err
    assert len(err.strip().splitlines()) == 1


def _tiny_llava_folder(folder: Path) -> Any:
    """A tiny random LLaVA-1.5 with a real (offline-built) processor, saved as hf:FOLDER."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>", "<image>", *[f"w{i}" for i in range(60)]]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=inner,
        pad_token="<pad>",
        eos_token="<eos>",
        extra_special_tokens={"image_token": "<image>"},
    )
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=63,
        ),
        image_token_id=2,
    )
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def test_explain_ask_a_vlm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--ask: the answer's tokens, one map each, equal to explain_answer on the same folder."""
    from captum_legrad import explain_answer

    require("transformers", "LlavaModel", since="transformers 4.52")  # the VLM layout
    model, processor = _tiny_llava_folder(tmp_path / "llava")
    save_png(
        tmp_path / "pic.png", torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(1))
    )
    argv = ["explain", str(tmp_path / "pic.png"), "--model", f"hf:{tmp_path / 'llava'}"]
    argv += ["--ask", "w3 w4", "--max-new-tokens", "3", "--out", str(tmp_path / "o")]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    with Image.open(tmp_path / "pic.png") as handle:
        photo = handle.convert("RGB")
    expected = explain_answer(model, processor, photo, "<image> w3 w4", max_new_tokens=3)
    assert f"pic.png: w3 w4 → {expected.text}" in stdout
    np.testing.assert_allclose(np.load(tmp_path / "o" / "pic_answer.npy"), expected.maps, atol=1e-6)
    assert (tmp_path / "o" / "pic_answer.png").stat().st_size > 0
    code, _, err = run(
        [*argv[:3], "timm:vit_tiny_patch16_224", *argv[4:-2], "--out", str(tmp_path / "p")], capsys
    )
    assert code == 2 and "--ask needs a vision-language model from transformers" in err
    assert not (tmp_path / "p").exists()
