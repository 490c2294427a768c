"""Shared fixtures: tiny random-init timm models (no weights are ever downloaded)."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub (timm does), which reads it once at import.
os.environ["HF_HUB_OFFLINE"] = "1"

from typing import Any, Callable, Dict

import pytest
import timm
import torch
from torch import nn

torch.set_num_threads(2)


def explainable(model: nn.Module, *example: Any) -> nn.Module:
    """What ``LeGrad`` explains of ``model``: a classifier as it is; a feature model (whose
    outputs are an embedding, which ``LeGrad(model)`` refuses) through
    ``FeatureDirection(model, torch.eye(D))``, so target ``k`` is embedding dimension ``k``
    as before issue #23. ``example`` (the model's inputs) gives ``D``."""
    from captum_legrad import FeatureDirection, discover

    if not discover(model).scores_are_features:
        return model
    with torch.no_grad():
        dim = FeatureDirection(model, torch.eye(1)).embed(*example).shape[-1]
    return FeatureDirection(model, torch.eye(dim))


def assert_not_vacuous(ref: torch.Tensor, lead: int = 2) -> None:
    """No map of an oracle is all zeros: over the ``lead`` leading dims (sample and layer or
    target), every slice has a non-zero value. A comparison with an all-zero map passes for
    any all-zero answer (and LeGrad warns about such maps, an error in this suite)."""
    zero = ~ref.flatten(start_dim=lead).any(dim=-1)
    assert not zero.any(), f"oracle maps all zeros at {zero.nonzero().tolist()}: vacuous"


TINY: Dict[str, Any] = dict(
    pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5
)

#: name -> (timm architecture, extra kwargs). Each is a variant docs/models.md lists.
TIMM_MODELS: Dict[str, tuple] = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", {}),
    "siglip_map": ("vit_base_patch16_siglip_224", {}),
    "avgpool_fcnorm": ("vit_tiny_patch16_224", {"global_pool": "avg", "fc_norm": True}),
    "deit3": ("deit3_small_patch16_224", {}),
    "eva": ("eva02_tiny_patch14_224", {}),
    "vit_dynamic": ("vit_tiny_patch16_224", {"dynamic_img_size": True}),
}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give all-zero weight matrices (timm zero-inits some heads) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model


def make_model(key: str, seed: int = 0, **overrides: Any) -> nn.Module:
    arch, extra = TIMM_MODELS[key]
    torch.manual_seed(seed)
    model = timm.create_model(arch, **{**TINY, **extra, **overrides})
    return randomize(model, seed).eval()


@pytest.fixture(params=sorted(TIMM_MODELS))
def model_key(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def vit() -> nn.Module:
    return make_model("vit")


@pytest.fixture
def images() -> Callable[..., torch.Tensor]:
    def make(batch: int = 2, height: int = 32, width: int = 32, seed: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))

    return make


def restore_sigint() -> None:
    """``preexec_fn`` of a child that must see Ctrl-C: SIGINT back to its default action.

    A shell starts background jobs with SIGINT ignored, children inherit that, and Python
    then installs no KeyboardInterrupt handler: without this, a test run from a background
    job (``bash .ci/run &``) would see the child ignore the signal it sends."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
