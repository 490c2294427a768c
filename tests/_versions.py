"""Skips for classes, models and options an older library release lacks.

``pyproject.toml`` allows timm>=0.9.16, transformers>=4.40 and open-clip-torch>=2.20;
``scripts/check_oldest.sh`` runs the family tests on those releases. A test of something
the installed release does not have is skipped with the release that introduced it
(``docs/versions.md`` lists them). Feature detection, not version strings: the skip happens
exactly when the thing is missing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any, Callable, Optional

import pytest

#: import name -> distribution name, for the skip reasons.
_DIST = {"timm": "timm", "transformers": "transformers", "open_clip": "open-clip-torch"}


def version(module: str) -> str:
    """The installed release of ``module``'s distribution (``"?"`` if unknown)."""
    try:
        return importlib.metadata.version(_DIST.get(module, module))
    except importlib.metadata.PackageNotFoundError:
        return "?"


def has(module: str, attribute: Optional[str] = None) -> bool:
    """Whether ``module`` imports and (if given) has ``attribute`` (a dotted path)."""
    try:
        obj: Any = importlib.import_module(module)
    except ImportError:
        return False
    for part in (attribute or "").split(".") if attribute else ():
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return True


def reason(module: str, what: str, since: str) -> str:
    top = module.split(".")[0]
    return f"{_DIST.get(top, top)} {version(top)} has no {what} (added in {since})"


def requires(module: str, attribute: Optional[str] = None, *, since: str) -> pytest.MarkDecorator:
    """A ``skipif`` mark: skip unless ``module`` (and ``attribute``) exist."""
    what = f"{module}.{attribute}" if attribute else module
    return pytest.mark.skipif(not has(module, attribute), reason=reason(module, what, since))


def require(module: str, attribute: Optional[str] = None, *, since: str) -> None:
    """Skip the running test unless ``module`` (and ``attribute``) exist."""
    if not has(module, attribute):
        what = f"{module}.{attribute}" if attribute else module
        pytest.skip(reason(module, what, since))


def require_that(condition: Callable[[], bool], module: str, what: str, *, since: str) -> None:
    """Skip the running test unless ``condition()`` holds (a feature of ``module``)."""
    if not condition():
        pytest.skip(reason(module, what, since))


# ---------------------------------------------------------------- what came when
#: timm model name prefix -> the timm release that added it (first with the module).
TIMM_SINCE = {
    "naflexvit_": "timm 1.0.16",
    "gemma4_vit_": "timm 1.0.27",
    "qwen3_vit_": "timm 1.0.30",
    "deepseek_vit_": "timm 1.0.30",
    "vit_dwee_": "timm 1.0.23",
    "vit_dpwee_": "timm 1.0.23",
    "vit_dlittle_": "timm 1.0.23",
}


def require_timm_model(name: str) -> None:
    """Skip unless the installed timm knows the architecture ``name``."""
    import timm

    if name in timm.list_models(name):
        return
    since = next((s for p, s in TIMM_SINCE.items() if name.startswith(p)), "a later timm")
    pytest.skip(reason("timm", f"model {name}", since))


#: transformers class -> the release that added it.
HF_SINCE = {
    "PaliGemma": "transformers 4.41",
    "Gemma2": "transformers 4.42",
    "IJepa": "transformers 4.47",
    "Dinov2WithRegisters": "transformers 4.48",
    "Gemma3": "transformers 4.50",
    "Siglip2": "transformers 4.50",
    "Aimv2": "transformers 4.54",
    "DINOv3ViT": "transformers 4.56",
    "MetaClip2": "transformers 4.56",
}

#: transformers class prefix -> the release whose class supports ``attn_implementation="sdpa"``.
HF_SDPA_SINCE = {
    "ViT": "transformers 4.41",
    "DeiT": "transformers 4.41",
    "ViTMAE": "transformers 4.41",
    "ViTMSN": "transformers 4.41",
    "CLIP": "transformers 4.43",
    "Siglip": "transformers 4.43",
    "Dinov2": "transformers 4.45",
    "Beit": "transformers 4.48",
    "Data2VecVision": "transformers 4.48",
}


def hf_since(class_name: str) -> str:
    found = [p for p in HF_SINCE if class_name.startswith(p)]
    return HF_SINCE[max(found, key=len)] if found else "a later transformers"


def require_hf(class_name: str) -> Any:
    """The transformers class ``class_name``; skips the test where the release lacks it."""
    import transformers

    cls = getattr(transformers, class_name, None)
    if cls is None:
        pytest.skip(reason("transformers", class_name, hf_since(class_name)))
    return cls


def hf_supports_sdpa(model_class: Any) -> bool:
    """Whether this transformers release runs ``model_class`` with ``sdpa`` (4.40 has no SDPA
    for ViT, CLIP, SigLIP, DINOv2, BEiT, ...; 5.x has no ``_supports_sdpa = False`` vision
    classes among ours)."""
    return bool(getattr(model_class, "_supports_sdpa", True))


def hf_attn(model_class: Any, attn: Optional[str]) -> str:
    """The attention implementation to build ``model_class`` with: ``attn`` as asked (a test
    that asks for ``sdpa`` is skipped where the class has none); ``None``: ``sdpa`` where the
    class supports it, else ``eager``."""
    if attn is None:
        return "sdpa" if hf_supports_sdpa(model_class) else "eager"
    if attn == "sdpa" and not hf_supports_sdpa(model_class):
        name = model_class.__name__
        found = [p for p in HF_SDPA_SINCE if name.startswith(p)]
        since = HF_SDPA_SINCE[max(found, key=len)] if found else "a later transformers"
        pytest.skip(reason("transformers", f"sdpa attention for {name}", since))
    return attn


#: open_clip configurations / options -> the release that added them.
OPEN_CLIP_SINCE = {
    "ViT-B-16-quickgelu": "open-clip-torch 2.23",
    "ViT-L-14-CLIPA": "open-clip-torch 2.23",
    "ViT-B-16-SigLIP": "open-clip-torch 2.23",
    "ViT-B-16-SigLIP2": "open-clip-torch 2.31",
    "MobileCLIP-S1": "open-clip-torch 2.26",
    "MobileCLIP-B": "open-clip-torch 2.26",
    "ViTamin-S": "open-clip-torch 2.26",
    "PE-Core-T-16-384": "open-clip-torch 3.0",
}


def require_open_clip_config(name: str) -> None:
    """Skip unless the installed open_clip has the model configuration ``name``."""
    import open_clip

    if open_clip.get_model_config(name) is None:
        since = OPEN_CLIP_SINCE.get(name, "a later open-clip-torch")
        pytest.skip(reason("open_clip", f"model configuration {name}", since))


def hf_interpolates(model: Any) -> bool:
    """Whether this transformers model runs at other input sizes: its embeddings take
    ``interpolate_pos_encoding`` or interpolate by themselves (DINOv2), and no
    relative-position bias is fixed to one window (BEiT before 4.42)."""
    from captum_legrad import discover

    spec = discover(model)
    rule = spec.input_size
    if rule is None or rule.enter is None:
        return True
    return "cannot_resize" not in getattr(rule.enter, "__qualname__", "")


def expect_size_refused(call: Callable[[], Any], model: Any, since: str) -> None:
    """Where the release cannot run ``model`` at another size, ``call()`` (a LeGrad call at
    another size) must be refused with what to do; the test is then skipped."""
    with pytest.raises(ValueError, match="cannot interpolate its learned position"):
        call()
    pytest.skip(
        reason("transformers", f"interpolation to other sizes for {type(model).__name__}", since)
        + "; the refusal was checked"
    )
