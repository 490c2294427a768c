"""Bad input gets a clear error, and nothing is changed (docs/design.md)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import make_model

from captum_legrad import LeGrad, UnsupportedModelError, discover
from captum_legrad.errors import TargetError


def test_resnet_is_unsupported_and_names_spec() -> None:
    resnet = torchvision.models.resnet18(weights=None)
    with pytest.raises(UnsupportedModelError, match="spec=") as info:
        LeGrad(resnet)
    assert isinstance(info.value, TypeError)
    assert "timm VisionTransformer" in str(info.value)


def test_bare_function_is_unsupported() -> None:
    with pytest.raises(UnsupportedModelError, match="spec="):
        LeGrad(lambda x: x.sum(dim=(2, 3)))
    with pytest.raises(UnsupportedModelError):
        discover(object())


def test_two_vits_are_ambiguous() -> None:
    pair = torch.nn.ModuleDict({"a": make_model("vit"), "b": make_model("vit")})
    with pytest.raises(UnsupportedModelError, match="several"):
        discover(pair)


@pytest.mark.parametrize(
    "target, needle",
    [
        (5, "out of range"),
        (-1, "out of range"),
        (-6, "out of range"),
        ([1, 2, 3], "one entry per sample"),
        (torch.tensor([1, 2, 3]), "one entry per sample"),
        (None, "target=None"),
        ((1, 2), "index"),
        (torch.tensor([[1], [2]]), "0-d or 1-D"),
        (torch.tensor(1.0), "integers"),
        ("cat", "int"),
    ],
)
def test_bad_targets(vit: torch.nn.Module, images, target: object, needle: str) -> None:
    with pytest.raises(TargetError, match=needle) as info:
        LeGrad(vit).attribute(images(2), target=target)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError) and isinstance(info.value, AssertionError)
    assert "(2, 5)" in str(info.value)  # names the output shape


@pytest.mark.parametrize(
    "targets, needle",
    [
        ([], "no targets given"),
        ([1, 9], "index 9 is out of range for size 5"),
        (torch.tensor([[1, 2]]), r"must be \(2, K\)"),
        (torch.tensor(3), "got a 0-D tensor"),
        (torch.tensor([[[1]]]), "got a 3-D tensor"),
        ("ab", "sequence of class indices"),
        (7, "sequence of class indices"),
    ],
)
def test_bad_multi_targets(vit: torch.nn.Module, images, targets: object, needle: str) -> None:
    with pytest.raises(TargetError, match=needle):
        LeGrad(vit).attribute_multi(images(2), targets=targets)  # type: ignore[arg-type]


def test_baselines_raise_the_errors_legrad_raises(vit: torch.nn.Module, images) -> None:
    """One set of argument rules: the same mistake, the same Captum-style error."""
    from captum_legrad.baselines import GenericAttention, RawAttention, ViTGradCAM

    x = images(2)
    with pytest.raises(TargetError) as ours:
        LeGrad(vit).attribute(x, target=7)
    for method in (GenericAttention(vit), ViTGradCAM(vit)):
        with pytest.raises(TargetError) as theirs:
            method.attribute(x, target=7)
        assert str(theirs.value) == str(ours.value)
    with pytest.raises(ValueError) as ours_layer:
        LeGrad(vit, layers=[9])
    for make in (RawAttention, ViTGradCAM):
        with pytest.raises(ValueError) as theirs_layer:
            make(vit, layer=9)
        assert str(theirs_layer.value) == str(ours_layer.value)
        assert "out of range for a model with 3 blocks" in str(theirs_layer.value)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        GenericAttention(vit).attribute(torch.zeros(3, 32, 32), target=1)
    with pytest.raises(ValueError, match="output must be one of"):
        RawAttention(vit).attribute(x, output="picture")


@pytest.mark.parametrize(
    "bad, needle",
    [
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "floating point"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.long), "floating point"),
        (torch.full((2, 3, 32, 32), float("nan")), "NaN"),
        (torch.full((2, 3, 32, 32), float("inf")), "NaN or infinite"),
        (torch.zeros(3, 32, 32), r"\(B, C, H, W\)"),
        (torch.zeros(2, 1, 3, 32, 32), r"\(B, C, H, W\)"),
    ],
)
def test_bad_inputs(vit: torch.nn.Module, bad: torch.Tensor, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        LeGrad(vit).attribute(bad, target=1)


def test_a_negative_target_gets_the_out_of_range_message(vit: torch.nn.Module, images) -> None:
    """Captum's own methods fail on negative targets; LeGrad refuses them like 5 (not the
    last class, silently)."""
    x = images(2)
    for call in (
        lambda t: LeGrad(vit).attribute(x, target=t),
        lambda t: LeGrad(vit).attribute_multi(x, targets=[0, t]),
    ):
        with pytest.raises(TargetError) as negative:
            call(-1)
        with pytest.raises(TargetError) as large:
            call(5)
        assert "index -1 is out of range for size 5 (valid: 0..4)" in str(negative.value)
        assert (
            str(negative.value).split(": ", 1)[1].replace("-1", "5")
            == str(large.value).split(": ", 1)[1]
        )


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: torch.zeros(2, 32, 32, 3), r"channels-last .* x\.permute\(0, 3, 1, 2\)"),
        (
            lambda: torch.zeros(2, 1, 32, 32),
            r"1 channel \(grayscale\).* x\.expand\(-1, 3, -1, -1\)",
        ),
        (lambda: torch.zeros(2, 4, 32, 32), r"have 4 channels; the model takes \(B, 3, H, W\)"),
        (lambda: torch.zeros(3, 32, 32), r"one image of shape \(3, 32, 32\).* x\.unsqueeze\(0\)"),
        (lambda: torch.zeros(2, 3, 32, 32, dtype=torch.float64), r"torch\.float64 .*x\.float\(\)"),
        (lambda: __import__("numpy").zeros((2, 3, 32, 32)), r"numpy array .* torch\.from_numpy"),
    ],
)
def test_input_mistakes_get_one_sentence_with_the_fix(
    vit: torch.nn.Module, make: object, needle: str
) -> None:
    """What was given, what the model expects, how to fix it: for LeGrad and the baselines."""
    from captum_legrad.baselines import GenericAttention

    bad = make()  # type: ignore[operator]
    for method in (LeGrad(vit), GenericAttention(vit)):
        with pytest.raises(ValueError, match=needle) as info:
            method.attribute(bad, target=1)
        assert "\n" not in str(info.value)


def test_inference_mode_is_refused(vit: torch.nn.Module, images) -> None:
    with torch.inference_mode():
        x = images(1)
        with pytest.raises(RuntimeError, match="inference_mode"):
            LeGrad(vit).attribute(x, target=1)
    # an inference tensor used outside inference mode is fine
    out = LeGrad(vit).attribute(x, target=1)
    assert out.shape == x.shape


@pytest.mark.parametrize(
    "layers, error",
    [
        ([3], ValueError),
        ([-4], ValueError),
        ([], ValueError),
        ([0, -3], ValueError),
        (1, TypeError),
        (["a"], TypeError),
    ],
)
def test_bad_layers(vit: torch.nn.Module, layers: object, error: type) -> None:
    with pytest.raises(error, match="layer"):
        LeGrad(vit, layers)  # type: ignore[arg-type]


def test_bad_options(vit: torch.nn.Module, images) -> None:
    with pytest.raises(ValueError, match="pooling"):
        LeGrad(vit, pooling="cls")
    with pytest.raises(TypeError, match="ViTSpec"):
        LeGrad(vit, spec="timm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="output"):
        LeGrad(vit).attribute(images(1), target=1, output="pixels")
    with pytest.raises(ValueError, match="interpolate_mode"):
        LeGrad(vit).attribute(images(1), target=1, interpolate_mode="lanczos")


def test_wrong_image_size_for_static_model(vit: torch.nn.Module) -> None:
    # With resize_pos_embed=False LeGrad refuses a size the model was not trained at; sizes
    # that are not a multiple of the patch size are refused either way. Nothing is resized.
    before = vit.pos_embed.detach().clone()
    with pytest.raises(ValueError, match="trained at 32x32") as info:
        LeGrad(vit, resize_pos_embed=False).attribute(torch.randn(1, 3, 48, 48), target=1)
    assert not isinstance(info.value, TargetError)
    with pytest.raises(ValueError, match="multiple of the timm model's 8x8 patches"):
        LeGrad(vit).attribute(torch.randn(1, 3, 50, 48), target=1)
    assert torch.equal(vit.pos_embed, before)
