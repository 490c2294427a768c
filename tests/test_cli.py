"""The captum-legrad command line: outputs against direct calls, errors, torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, List

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from captum_legrad import LeGrad
from captum_legrad.cli import main
from captum_legrad.data import ShapesDataset, load_default_model, normalize
from captum_legrad.eval.datasets import load_image

ROOT = Path(__file__).resolve().parents[1]


def save_png(path: Path, image: torch.Tensor) -> None:
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)


def run(argv: List[str], capsys: pytest.CaptureFixture[str]) -> Any:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_explain_default_model_equals_legrad(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image_path = tmp_path / "shape.png"
    save_png(image_path, ShapesDataset(1)[0].image)
    out = tmp_path / "out"
    argv = ["explain", str(image_path), "--model", "default", "--target", "0", "3"]
    code, stdout, _ = run([*argv, "--out", str(out), "--quiet"], capsys)
    assert code == 0, stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "shape_circle.npy",
        "shape_circle.png",
        "shape_cross.npy",
        "shape_cross.png",
    ]
    x = normalize(load_image(image_path))[None]
    expected = LeGrad(load_default_model()).attribute(x, target=3, output="map")[0, 0]
    np.testing.assert_allclose(np.load(out / "shape_cross.npy"), expected.numpy(), atol=1e-6)
    with Image.open(out / "shape_cross.png") as picture:  # a titled viz.overlay figure
        assert min(picture.size) >= 64


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_explain_weights_that_do_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    torch.manual_seed(0)
    name = "vit_tiny_patch16_224"
    model = timm.create_model(name, pretrained=False, num_classes=3, depth=2).eval()
    weights = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(model.state_dict(), weights)
    else:
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(weights))
    folder = tmp_path / "images"
    folder.mkdir()
    save_png(folder / "im0.png", torch.rand(3, 40, 50))
    out = tmp_path / "out"
    # depth=2 is not a CLI option: the weights of a 2-block model do not fit 12 blocks
    argv = ["explain", str(folder), "--model", f"timm:{name}", "--num-classes", "3"]
    code, _, err = run(
        [*argv, "--weights", str(weights), "--target", "1", "--out", str(out)], capsys
    )
    assert code == 2 and "do not fit" in err and err.count("\n") == 1


def test_explain_timm_matches_direct_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    name = "vit_tiny_patch16_224"
    model = timm.create_model(name, pretrained=False, num_classes=3).eval()
    weights = tmp_path / "w.pth"
    torch.save(model.state_dict(), weights)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        save_png(
            folder / f"im{i}.png", torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(i))
        )
    out = tmp_path / "out"
    argv = ["explain", str(folder), "--model", f"timm:{name}", "--num-classes", "3"]
    code, stdout, _ = run(
        [*argv, "--weights", str(weights), "--target", "2", "--out", str(out)], capsys
    )
    assert code == 0
    assert "wrote 2 overlays" in stdout
    image = load_image(folder / "im1.png")
    resized = torch.nn.functional.interpolate(
        image[None], size=(224, 224), mode="bilinear", align_corners=False, antialias=True
    ).clamp(0, 1)
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)  # vit_tiny's pretrained_cfg
    expected = LeGrad(model).attribute((resized - mean) / mean, target=2, output="map")[0, 0]
    np.testing.assert_allclose(np.load(out / "im1_class2.npy"), expected.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["explain", "missing.png", "--model", "default", "--target", "0"], "no such image"),
        (["explain", "IMG", "--model", "default", "--target", "5"], "target 5 is out of range"),
        (["explain", "IMG", "--model", "default", "--target", "-1"], "target -1 is out of range"),
        (["explain", "IMG", "--model", "resnet", "--target", "0"], "unknown model"),
        (["explain", "IMG", "--model", "torch:vit", "--target", "0"], "unknown model family"),
        (["explain", "IMG", "--model", "timm:no_such_vit", "--target", "0"], "unknown timm model"),
        (
            ["explain", "IMG", "--model", "torchvision:no_such_vit", "--target", "0"],
            "unknown torchvision model",
        ),
        (
            ["explain", "IMG", "--model", "torchvision:resnet18", "--target", "0"],
            "not a VisionTransformer",
        ),
        (["explain", "IMG", "--model", "default", "--prompt", "a cat"], "no text tower"),
        (["explain", "IMG", "--model", "hf:/no/such/dir", "--target", "0"], "local model folder"),
        (
            ["explain", "IMG", "--model", "default", "--weights", "nope.pt", "--target", "0"],
            "weights file not found",
        ),
        (["eval", "--dataset", "imagenet-seg", "--data", "nope.mat"], "not found"),
        (["eval", "--dataset", "imagenet-seg"], "needs --data"),
        (["eval", "--dataset", "shapes", "--methods", "legrad", "lime"], "unknown method"),
        (["eval", "--dataset", "shapes", "--threshold", "half"], "--threshold"),
    ],
)
def test_errors_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: List[str], message: str
) -> None:
    image_path = tmp_path / "x.png"
    save_png(image_path, torch.rand(3, 64, 64))
    argv = [str(image_path) if a == "IMG" else a for a in argv]
    if argv[0] == "eval":
        argv += ["--out", str(tmp_path / "out"), "--quiet"]
    else:
        argv += ["--out", str(tmp_path / "out")]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert message in err
    assert err.startswith("captum-legrad: error: ") and err.count("\n") == 1


def eval_argv(out: Path) -> List[str]:
    return [
        "eval",
        "--dataset",
        "shapes",
        "--num-images",
        "8",
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
    argv = eval_argv(tmp_path)
    argv.remove("--no-plots")
    code, stdout, _ = run(argv, capsys)
    assert code == 0
    objects = sum(len(ShapesDataset(8)[i].labels) for i in range(8))
    assert f"8 images, {objects} (image, target) pairs" in stdout
    table = (tmp_path / "results.md").read_text()
    for row in ("| LeGrad |", "| Chefer GAE |", "| Saliency |"):
        assert row in table
    assert "Pointing game" in table and "Pos. pert. AUC" in table and "p-mIoU" not in table
    assert (tmp_path / "results.csv").read_text().count("\n") == 4
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "examples.png").is_file()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_eval_torchrun_two_processes_equals_one(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one, two = tmp_path / "one", tmp_path / "two"
    single = [sys.executable, "-m", "captum_legrad.cli", *eval_argv(one)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_port", str(free_port()), "-m", "captum_legrad.cli", *eval_argv(two)]
    for command in (single, launcher):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-2000:]
    table_one = (one / "results.md").read_text()
    assert "8 images" in table_one
    assert (two / "results.md").read_text() == table_one
    assert not (two / "results.md").with_name("curves.png").exists()


def test_demo_writes_pictures_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--num-images", "4", "--examples", "2", "--quiet", "--out", str(tmp_path)]
    code, stdout, _ = run(argv, capsys)
    assert code == 0
    assert "| LeGrad |" in stdout and "| IntegratedGradients |" in stdout
    assert (tmp_path / "demo.png").is_file() and (tmp_path / "results.md").is_file()


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
    save_png(tmp_path / "x.png", torch.rand(3, 32, 32))
    argv = ["explain", str(tmp_path / "x.png"), "--model", f"hf:{tmp_path / 'vit'}"]
    code, _, _ = run([*argv, "--target", "2", "--out", str(tmp_path / "out")], capsys)
    assert code == 0
    heat = np.load(tmp_path / "out" / "x_LABEL_2.npy")
    assert heat.shape == (32, 32) and heat.min() == 0.0 and heat.max() == 1.0


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


def test_explain_torchvision_matches_direct_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision:NAME goes through the registry's loader (builder swapped for a tiny ViT)."""
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    tiny = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=3,
    )
    with torch.no_grad():  # torchvision zero-initialises the head: give it values
        tiny.heads.head.weight.normal_()
    asked = {}

    def get_model(name: str, **kwargs: Any) -> torch.nn.Module:
        asked.update(kwargs, name=name)
        return tiny

    monkeypatch.setattr(torchvision.models, "get_model", get_model)
    save_png(tmp_path / "x.png", torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)))
    argv = ["explain", str(tmp_path / "x.png"), "--model", "torchvision:vit_b_16"]
    argv += ["--num-classes", "3", "--target", "2", "--out", str(tmp_path / "o")]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert asked == {"name": "vit_b_16", "weights": None, "num_classes": 3}
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    x = ((load_image(tmp_path / "x.png") - mean) / std)[None]
    expected = LeGrad(tiny.eval()).attribute(x, target=2, output="map")[0, 0]
    assert float(expected.max()) == 1.0  # a real map, not the zero map of a zero head
    np.testing.assert_allclose(np.load(tmp_path / "o" / "x_class2.npy"), expected, atol=1e-5)
