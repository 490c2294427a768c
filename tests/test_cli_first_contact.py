"""The command line as a new user meets it (#24, #23): Ctrl-C, file modes, unreadable images,
the hub's timeout, honest figures, small messages, ``explain --like``.

Every test runs offline: the autouse fixture of ``test_cli`` (imported here) refuses any
connection to another host, and the hub's first connection is a monkeypatched function.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import restore_sigint
from PIL import Image
from test_cli import ROOT, no_network, project_by_hand, run, save_png  # noqa: F401

from captum_legrad import ImageImageSimilarity, LeGrad
from captum_legrad.data import ShapesDataset
from captum_legrad.eval import files, models, report
from captum_legrad.eval.classes import ClassNameError, parse_classes, resolve_class
from captum_legrad.eval.files import OutputFolder, atomic_path


def shapes_folder(folder: Path, count: int = 3) -> List[Path]:
    folder.mkdir()
    paths = []
    for i in range(count):
        paths.append(folder / f"s{i}.png")
        save_png(paths[-1], ShapesDataset(count, seed=5)[i].image)
    return paths


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_in_explain_leaves_whole_photos_and_exits_130(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the 2nd photo's figure is written (its .npy already on disk)."""
    shapes_folder(tmp_path / "photos")
    calls = []
    save = OutputFolder.save_figure

    def interrupted(self: OutputFolder, name: str, figure: Any, *args: Any) -> Path:
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return save(self, name, figure, *args)

    monkeypatch.setattr(OutputFolder, "save_figure", interrupted)
    out = tmp_path / "out"
    argv = ["explain", str(tmp_path / "photos"), "--model", "default", "--target", "circle"]
    code, _, err = run([*argv, "--quiet", "--out", str(out)], capsys)
    assert code == 130
    assert err.strip().splitlines() == ["interrupted: 1 of 3 images written"]
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["s0.png", "s0_circle.npy"]


SIGINT_SCRIPT = """
import os, signal, sys
from captum_legrad import viz
from captum_legrad.cli import main
draw, count = viz.plot_photo, [0]
def plot_photo(*args, **kwargs):
    count[0] += 1
    if count[0] == 2:  # a real Ctrl-C while the 2nd photo is being drawn
        os.kill(os.getpid(), signal.SIGINT)
    return draw(*args, **kwargs)
viz.plot_photo = plot_photo
sys.exit(main(sys.argv[1:]))
"""


def test_sigint_in_a_real_process(tmp_path: Path) -> None:
    shapes_folder(tmp_path / "photos")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-c", SIGINT_SCRIPT, "explain", str(tmp_path / "photos")]
    argv += ["--model", "default", "--target", "circle", "--quiet", "--out", str(out)]
    done = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=120, preexec_fn=restore_sigint
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == ["interrupted: 1 of 3 images written"]
    assert sorted(p.name for p in out.iterdir()) == ["s0.png", "s0_circle.npy"]
    assert signal.SIGINT + 128 == 130


def test_ctrl_c_in_eval_and_demo_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after results.md was written, before results.csv: both gone, folder too."""

    def interrupted(path: Path, results: Any) -> None:
        assert (path.parent / "results.md").is_file()  # the run was in the middle of it
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_csv", interrupted)
    out = tmp_path / "ev"
    argv = ["eval", "--dataset", "shapes", "--num-images", "2", "--batch-size", "2"]
    argv += ["--methods", "legrad", "--no-perturbation", "--quiet", "--out", str(out)]
    code, stdout, err = run(argv, capsys)
    assert code == 130 and len(err.strip().splitlines()) == 1
    assert err.strip().startswith("interrupted: nothing written")
    assert not out.exists() and stdout == ""
    code, _, err = run(
        ["demo", "--num-images", "2", "--quiet", "--out", str(tmp_path / "d")], capsys
    )
    assert code == 130 and err.strip() == "interrupted: nothing written"
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_mode_of_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        assert files.file_mode() == mode
        out = OutputFolder(tmp_path / "o")
        written = [
            out.write_text("a.txt", "x"),
            out.save_npy("m.npy", np.zeros(3, dtype=np.float32)),
        ]
        with atomic_path(tmp_path / "o" / "b.bin") as temporary:
            temporary.write_bytes(b"1")
        written.append(tmp_path / "o" / "b.bin")
        with open(tmp_path / "plain.txt", "w") as handle:  # what open() gives, for reference
            handle.write("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == mode
    for path in written:
        assert path.stat().st_mode & 0o777 == mode, path


# --------------------------------------------------------------------------- unreadable images


def test_unreadable_images_are_listed_and_the_rest_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shapes_folder(tmp_path / "photos", 2)
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "photos" / "text.jpg").write_text("not a picture")
    out = tmp_path / "out"
    argv = ["explain", str(tmp_path / "photos"), "--model", "default", "--target", "circle"]
    code, stdout, err = run([*argv, "--quiet", "--out", str(out)], capsys)
    assert code == 1, err
    assert sorted(p.name for p in out.iterdir()) == [
        "s0.png", "s0_circle.npy", "s1.png", "s1_circle.npy",
    ]  # fmt: skip
    assert "2 of 4 images could not be read and were skipped" in err
    listed = [line.strip() for line in err.splitlines() if line.startswith("  ")]
    assert [line.split(":")[0] for line in listed] == [
        str(tmp_path / "photos" / "broken.png"),
        str(tmp_path / "photos" / "text.jpg"),
    ]
    assert all(len(line.split(": ", 1)[1]) > 5 for line in listed)  # each with its reason
    assert "wrote 4 files" in stdout
    # --strict: refused at once, nothing written
    code, _, err = run([*argv, "--strict", "--out", str(tmp_path / "strict")], capsys)
    assert code == 2 and "cannot read image" in err and "broken.png" in err
    assert not (tmp_path / "strict").exists()


# --------------------------------------------------------------------------- the hub


def test_hub_unreachable_fails_at_once_with_the_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first connection does not open: said first, no download tried, one line."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    probes: List[Any] = []
    downloads: List[str] = []

    def unanswered(host: str, port: int, timeout: float) -> bool:
        probes.append((host, port, timeout))
        return False

    def download(repo_id: str, filename: str, **kwargs: Any) -> str:
        downloads.append(filename)  # offline now: huggingface_hub looks in the cache only
        assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
        raise FileNotFoundError("not in the cache")

    monkeypatch.setattr(models, "probe_host", unanswered)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", download)
    said: List[str] = []
    with pytest.raises(models.ModelError) as caught:
        models.load_model("timm:vit_tiny_patch16_224", announce=said.append, hub_timeout=2.5)
    assert said == ["loading pretrained weights of timm:vit_tiny_patch16_224 from the hub..."]
    assert probes == [("huggingface.co", 443, 2.5)]
    assert "huggingface.co did not answer within 2.5 s" in str(caught.value)
    assert "--weights FILE" in str(caught.value)
    assert not constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "0"  # restored


def test_hub_timeouts_are_scoped_to_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_ETAG_TIMEOUT", raising=False)
    before = (constants.HF_HUB_ETAG_TIMEOUT, constants.HF_HUB_DOWNLOAD_TIMEOUT)
    seen: Dict[str, Any] = {}

    def download(repo_id: str, filename: str, **kwargs: Any) -> str:
        seen.update(
            etag=constants.HF_HUB_ETAG_TIMEOUT,
            download=constants.HF_HUB_DOWNLOAD_TIMEOUT,
            env=os.environ.get("HF_HUB_ETAG_TIMEOUT"),
            socket=socket.getdefaulttimeout(),
        )
        raise ConnectionError("Failed to establish a new connection")

    monkeypatch.setattr(models, "probe_host", lambda host, port, timeout: True)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", download)
    with pytest.raises(models.ModelError, match="hub cannot be reached"):
        models.load_model("timm:vit_tiny_patch16_224", hub_timeout=3)
    assert seen == {"etag": 3, "download": 3, "env": "3", "socket": 3.0}
    assert (constants.HF_HUB_ETAG_TIMEOUT, constants.HF_HUB_DOWNLOAD_TIMEOUT) == before
    assert "HF_HUB_ETAG_TIMEOUT" not in os.environ and socket.getdefaulttimeout() is None


# --------------------------------------------------------------------------- honest figures


def capture_figures(monkeypatch: pytest.MonkeyPatch) -> List[Dict[str, Any]]:
    from captum_legrad import viz

    drawn: List[Dict[str, Any]] = []
    draw = viz.plot_photo

    def plot_photo(photo: Any, maps: Any, titles: Any, **kwargs: Any) -> Any:
        drawn.append({"titles": list(titles), **kwargs})
        return draw(photo, maps, titles, **kwargs)

    monkeypatch.setattr(viz, "plot_photo", plot_photo)
    return drawn


def test_figure_titles_name_the_model_and_print_the_terminals_score(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn = capture_figures(monkeypatch)
    save_png(tmp_path / "s.png", ShapesDataset(1)[0].image)
    argv = ["explain", str(tmp_path / "s.png"), "--model", "default", "--target", "circle"]
    code, stdout, err = run([*argv, "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    (figure,) = drawn
    assert figure["suptitle"] == "s.png: LeGrad, default (bundled synthetic-shapes model)"
    (title,) = figure["titles"]
    score = title.split()[-1]  # "circle\nprobability 0.123"
    assert f"circle ({score})" in stdout  # the same number, the same rounding
    # random weights say so in the title (and in a warning, even with --quiet)
    save_png(tmp_path / "p.png", torch.rand(3, 40, 40))
    argv = ["explain", str(tmp_path / "p.png"), "--model", "timm:vit_tiny_patch16_224"]
    code, _, err = run([*argv, "--random-weights", "--quiet", "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    assert drawn[-1]["suptitle"] == "p.png: LeGrad, timm:vit_tiny_patch16_224 (random weights)"
    assert "random weights" in err


def test_shapes_note_once_per_run_silenced_by_quiet_and_the_true_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        save_png(
            folder / f"p{i}.png", torch.rand(3, 50, 70, generator=torch.Generator().manual_seed(i))
        )
    argv = ["explain", str(folder), "--model", "default", "--image-size", "128", "--top-k", "9"]
    code, _, err = run([*argv, "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 2, err  # the shapes note and the top-k note, once each
    shapes = next(line for line in warnings if "synthetic" in line)
    assert "trained on synthetic 64×64 shapes" in shapes and "128" not in shapes
    capped = next(line for line in warnings if "--top-k" in line)
    assert "--top-k 9: the model has only 5 classes, so all 5 are explained" in capped
    code, _, err = run([*argv, "--quiet", "--out", str(tmp_path / "q")], capsys)
    assert code == 0 and err == ""


def test_curves_and_csv_say_what_they_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from captum_legrad import viz

    drawn: Dict[str, Any] = {}
    curves, methods = viz.plot_curves, viz.plot_methods

    def plot_curves(*args: Any, **kwargs: Any) -> Any:
        drawn["curves"] = kwargs
        return curves(*args, **kwargs)

    def plot_methods(*args: Any, **kwargs: Any) -> Any:
        drawn["methods"] = (args, kwargs)
        return methods(*args, **kwargs)

    monkeypatch.setattr(viz, "plot_curves", plot_curves)
    monkeypatch.setattr(viz, "plot_methods", plot_methods)
    out = tmp_path / "d"
    code, _, _ = run(
        ["demo", "--num-images", "2", "--examples", "2", "--quiet", "--out", str(out)], capsys
    )
    assert code == 0
    assert drawn["curves"]["ylabel"] == "accuracy on the explained class (share of pairs)"
    assert drawn["curves"]["title"].startswith("Model accuracy on the explained class as patches")
    (_, columns, _), kwargs = drawn["methods"]
    assert list(columns) == ["LeGrad", "Chefer GAE", "GradCAM"]  # the methods the title names
    assert kwargs["masks"] is not None and "white line on the image" in kwargs["title"]
    assert "row label: the explained class" in kwargs["title"]
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert "p_miou" not in header and "pointing_game" in header  # no always-NaN column


# --------------------------------------------------------------------------- small messages


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import captum_legrad

    code, stdout, _ = run(["--version"], capsys)
    assert code == 0 and stdout.strip() == f"captum-legrad {captum_legrad.__version__}"


def test_image_text_models_are_asked_of_the_adapters() -> None:
    transformers = pytest.importorskip("transformers")
    from captum_legrad.adapters.hf import image_text_class

    for name in ("CLIPConfig", "SiglipConfig", "Siglip2Config", "MetaClip2Config", "Aimv2Config"):
        config_class = getattr(transformers, name, None)
        if config_class is None:
            continue
        found = image_text_class(config_class())
        assert found is not None and found.__name__.endswith("Model"), name
    assert image_text_class(transformers.ViTConfig()) is None
    assert image_text_class(transformers.Dinov2Config()) is None


def test_one_class_name_parser() -> None:
    classes = ["tiger cat", "tabby, tabby cat", "remote control, remote", "cat"]
    assert resolve_class("Tabby  Cat", classes, 4) == 1
    assert resolve_class("tabby, tabby cat", classes, 4) == 1
    assert resolve_class(" 3 ", classes, 4) == 3
    assert parse_classes("tabby, tabby cat", classes, 4) == [1]
    assert parse_classes("tabby cat, remote\n0; 0", classes, 4) == [1, 2, 0]
    assert parse_classes("  ", classes, 4) == []
    with pytest.raises(ClassNameError, match=r"target -1 is out of range"):
        resolve_class("-1", classes, 4)
    with pytest.raises(ClassNameError, match=r"did you mean 'tabby cat' \(1\)"):
        resolve_class("taby cat", classes, 4)
    with pytest.raises(ClassNameError, match="no class names"):
        resolve_class("cat", None, 4)


# --------------------------------------------------------------------------- --like


def tiny_timm(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=3, depth=2, embed_dim=48,
        num_heads=2,
    )  # fmt: skip
    torch.save(model.state_dict(), tmp_path / "w.pth")
    return tmp_path / "w.pth"


def test_explain_like_writes_one_map_per_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--like on a timm classifier: its pooled feature; references of other sizes resized by
    the model's preprocessing; the similarity is the cosine of the features (oracle)."""
    monkeypatch.setattr(timm, "create_model", _tiny_create(timm.create_model))
    weights = tiny_timm(tmp_path)
    query = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(1))
    save_png(tmp_path / "q.png", query)
    save_png(tmp_path / "a.png", torch.rand(3, 64, 48, generator=torch.Generator().manual_seed(2)))
    save_png(tmp_path / "b.png", torch.rand(3, 30, 30, generator=torch.Generator().manual_seed(3)))
    drawn = capture_figures(monkeypatch)
    argv = ["explain", str(tmp_path / "q.png"), "--model", "timm:vit_tiny_patch16_224"]
    argv += ["--weights", str(weights), "--num-classes", "3"]
    argv += [
        "--like",
        str(tmp_path / "a.png"),
        str(tmp_path / "b.png"),
        "--out",
        str(tmp_path / "o"),
    ]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "q_like.png", "q_like_a.npy", "q_like_b.npy",
    ]  # fmt: skip
    # the oracle: the same weights without a head, timm's own transform, cosines by hand
    features = _tiny_create(timm.create_model)("vit_tiny_patch16_224", num_classes=0)
    state = torch.load(weights)
    features.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")})
    features.eval()
    config = timm.data.resolve_data_config({}, model=features)
    transform = timm.data.create_transform(**config)

    def prepared(name: str) -> torch.Tensor:
        with Image.open(tmp_path / name) as handle:
            return transform(handle.convert("RGB"))

    x = prepared("q.png")[None]
    refs = torch.stack([prepared("a.png"), prepared("b.png")])
    with torch.no_grad():
        cosines = F.cosine_similarity(features(x), features(refs), dim=-1)
    for name, cosine in zip(("a.png", "b.png"), cosines):
        assert f"q.png like {name}: similarity {float(cosine):.3f}" in stdout
    (figure,) = drawn
    assert figure["titles"] == [
        f"like a.png\nsimilarity {float(cosines[0]):.3f}",
        f"like b.png\nsimilarity {float(cosines[1]):.3f}",
    ]
    sim = ImageImageSimilarity.from_images(features, refs)
    heat = LeGrad(sim).attribute_multi(x, targets=[0, 1], output="map")[0]
    for k, name in enumerate(("a", "b")):
        expected = project_by_hand(heat[k].numpy(), (40, 50), (248, 310), (12, 43))
        assert np.nanmax(expected) > np.nanmin(expected)  # not vacuous
        np.testing.assert_allclose(
            np.load(tmp_path / "o" / f"q_like_{name}.npy"), expected, atol=1e-5
        )


def _tiny_create(create: Any) -> Any:
    def tiny(name: str, **kwargs: Any) -> Any:
        kwargs.update(depth=2, embed_dim=48, num_heads=2, pretrained=False)
        return create(name, **kwargs)

    return tiny


def test_explain_like_bad_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import VisionTransformer

    save_png(tmp_path / "q.png", torch.rand(3, 32, 32))
    save_png(tmp_path / "r.png", torch.rand(3, 20, 28))
    tiny = VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    monkeypatch.setattr(torchvision.models, "get_model", lambda name, **kwargs: tiny)
    cases = [
        (["--model", "default", "--like", "missing.png"], "no such reference image: missing.png"),
        (
            ["--model", "torchvision:vit_b_16", "--random-weights", "--like", "REF"],
            "--like needs a model with an image embedding",
        ),
        (["--model", "default", "--like", "REF", "--target", "1"], "not allowed with argument"),
        (["--model", "default", "--like", "REF", "--labels", "REF"], "drop --labels"),
    ]
    for extra, message in cases:
        extra = [str(tmp_path / "r.png") if a == "REF" else a for a in extra]
        out = tmp_path / "out"
        code, _, err = run(["explain", str(tmp_path / "q.png"), *extra, "--out", str(out)], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and message in lines[-1], err
        assert len([line for line in lines if "error" in line]) == 1
        assert not out.exists()
