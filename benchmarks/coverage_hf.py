"""Coverage of Hugging Face ``transformers`` vision models through LeGrad.

Every vision class of the families LeGrad recognises (ViT, CLIP, DINOv2, SigLIP, DeiT,
BEiT, data2vec-vision, ViT-MAE, ViT-MSN, I-JEPA, DINOv3, AIMv2, MetaCLIP 2; the video
classifiers VideoMAE, ViViT, TimeSformer and V-JEPA 2 on ``(2, T, 3, 32, 32)`` videos, the
Audio Spectrogram Transformer on ``(2, time, mel)`` spectrograms) and of the
hierarchical or local-attention families it refuses (Swin, Swin V2, Donut-Swin, Hiera, PVT,
PVT-v2, SegFormer, GLPN, MobileViT, MobileViT V2, LeViT, CvT, ViTDet, FocalNet,
SwiftFormer, PoolFormer, DiNAT) is built from a tiny random-init configuration (2 layers;
nothing is downloaded) and explained once.

A row is ``works`` when the ``sdpa`` and the ``eager`` build (same weights) give finite,
non-constant maps that agree, a batch of two gives what each image gives alone, and the
model's parameters and buffers are unchanged; ``refused`` when LeGrad raises
``UnsupportedModelError`` (its message is the detail); ``error`` otherwise. Classes the
installed transformers lacks, or that need a missing library (DiNAT: ``natten``), are
left out and listed on stderr. Exactness against an independent oracle is the job of
``tests/test_hf.py`` and ``tests/test_hf_families.py``.

Run alone: ``python benchmarks/coverage_hf.py`` prints a Markdown table and the fractions.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from _common import explainable  # the benchmarks folder is not a package

Row = Tuple[str, str, str, str]

_V: Dict[str, Any] = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)
_DINO: Dict[str, Any] = {
    **{k: v for k, v in _V.items() if k != "intermediate_size"},
    "mlp_ratio": 2,
}
_T: Dict[str, Any] = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=64,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
_HIER: Dict[str, Any] = dict(
    image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2]
)

#: (family, class name, config class, config kwargs, constructor kwargs).
Case = Tuple[str, str, str, Dict[str, Any], Dict[str, Any]]


def _vision(family: str, config: str, classes: Sequence[str], **extra: Any) -> List[Case]:
    base = _DINO if config.startswith("Dinov2") else _V
    return [
        (
            family,
            name,
            config,
            {**base, **extra, **({"num_labels": 5} if "Classif" in name else {})},
            {},
        )
        for name in classes
    ]


def _pair(family: str, config: str, classes: Sequence[str], **extra: Any) -> List[Case]:
    return [
        (
            family,
            name,
            config,
            {
                "vision_config": _V,
                "text_config": _T,
                **extra,
                **({"num_labels": 5} if "Classif" in name else {}),
            },
            {},
        )
        for name in classes
    ]


def cases() -> List[Case]:
    """Every class the sweep builds."""
    rows: List[Case] = []
    rows += _vision("ViT", "ViTConfig", ["ViTModel", "ViTForImageClassification"])
    rows += _pair(
        "CLIP", "CLIPConfig", ["CLIPModel", "CLIPForImageClassification"], projection_dim=16
    )
    rows += _vision(
        "CLIP",
        "CLIPVisionConfig",
        ["CLIPVisionModel", "CLIPVisionModelWithProjection"],
        projection_dim=16,
    )
    rows += _vision("DINOv2", "Dinov2Config", ["Dinov2Model", "Dinov2ForImageClassification"])
    rows += _vision(
        "DINOv2",
        "Dinov2WithRegistersConfig",
        ["Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification"],
        num_register_tokens=2,
    )
    rows += _pair("SigLIP", "SiglipConfig", ["SiglipModel", "SiglipForImageClassification"])
    rows += _vision("SigLIP", "SiglipVisionConfig", ["SiglipVisionModel"])
    rows += _vision(
        "DeiT",
        "DeiTConfig",
        ["DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"],
    )
    rows += _vision(
        "BEiT",
        "BeitConfig",
        ["BeitModel", "BeitForImageClassification"],
        use_relative_position_bias=True,
    )
    rows += _vision(
        "data2vec-vision",
        "Data2VecVisionConfig",
        ["Data2VecVisionModel", "Data2VecVisionForImageClassification"],
        use_relative_position_bias=True,
    )
    rows += _vision("ViT-MAE", "ViTMAEConfig", ["ViTMAEModel"], mask_ratio=0.0)
    rows.append(("ViT-MAE", "ViTMAEModel (mask_ratio=0.75)", "ViTMAEConfig", dict(_V), {}))
    rows += _vision("ViT-MAE", "ViTMAEConfig", ["ViTMAEForPreTraining"], mask_ratio=0.0)
    rows += _vision("ViT-MSN", "ViTMSNConfig", ["ViTMSNModel", "ViTMSNForImageClassification"])
    rows += _vision("I-JEPA", "IJepaConfig", ["IJepaModel", "IJepaForImageClassification"])
    rows += _vision("DINOv3", "DINOv3ViTConfig", ["DINOv3ViTModel"], num_register_tokens=2)
    rows += _vision(
        "DINOv3",
        "DINOv3ViTConfig",
        ["DINOv3ViTBackbone"],
        num_register_tokens=2,
        out_features=["stage2"],
    )
    rows += _vision("AIMv2", "Aimv2VisionConfig", ["Aimv2VisionModel"])
    rows += _pair("AIMv2", "Aimv2Config", ["Aimv2Model"], projection_dim=16)
    rows += _pair(
        "MetaCLIP 2",
        "MetaClip2Config",
        ["MetaClip2Model", "MetaClip2ForImageClassification"],
        projection_dim=16,
    )
    rows += _vision(
        "MetaCLIP 2",
        "MetaClip2VisionConfig",
        ["MetaClip2VisionModel", "MetaClip2VisionModelWithProjection"],
        projection_dim=16,
    )
    # hierarchical or local attention: refused
    swin = dict(_HIER, window_size=4)
    for family, config, classes, kwargs in (
        ("Swin", "SwinConfig", ["SwinModel", "SwinForImageClassification"], swin),
        ("Swin V2", "Swinv2Config", ["Swinv2Model", "Swinv2ForImageClassification"], swin),
        ("Donut-Swin", "DonutSwinConfig", ["DonutSwinModel"], swin),
        ("Hiera", "HieraConfig", ["HieraModel", "HieraForImageClassification"], {}),
        ("PVT", "PvtConfig", ["PvtModel", "PvtForImageClassification"], {}),
        ("PVT-v2", "PvtV2Config", ["PvtV2Model", "PvtV2ForImageClassification"], {}),
        ("SegFormer", "SegformerConfig", ["SegformerModel", "SegformerForImageClassification"], {}),
        ("GLPN", "GLPNConfig", ["GLPNModel"], {}),
        ("MobileViT", "MobileViTConfig", ["MobileViTModel", "MobileViTForImageClassification"], {}),
        (
            "MobileViT V2",
            "MobileViTV2Config",
            ["MobileViTV2Model", "MobileViTV2ForImageClassification"],
            {},
        ),
        ("LeViT", "LevitConfig", ["LevitModel", "LevitForImageClassificationWithTeacher"], {}),
        ("CvT", "CvtConfig", ["CvtModel", "CvtForImageClassification"], {}),
        (
            "ViTDet",
            "VitDetConfig",
            ["VitDetModel"],
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2),
        ),
        ("FocalNet", "FocalNetConfig", ["FocalNetModel", "FocalNetForImageClassification"], {}),
        (
            "SwiftFormer",
            "SwiftFormerConfig",
            ["SwiftFormerModel", "SwiftFormerForImageClassification"],
            {},
        ),
        (
            "PoolFormer",
            "PoolFormerConfig",
            ["PoolFormerModel", "PoolFormerForImageClassification"],
            {},
        ),
        ("DiNAT", "DinatConfig", ["DinatModel"], {}),
    ):
        rows += [(family, name, config, dict(kwargs), {}) for name in classes]
    return rows + media_cases()


_SMALL: Dict[str, Any] = {k: v for k, v in _V.items() if k not in ("image_size", "patch_size")}


def media_cases() -> List[Case]:
    """The video classifiers and the Audio Spectrogram Transformer (issue #22)."""
    frames = dict(image_size=32, num_frames=4)
    rows = _vision(
        "VideoMAE",
        "VideoMAEConfig",
        ["VideoMAEModel", "VideoMAEForVideoClassification"],
        **frames,
        tubelet_size=2,
    )
    rows += _vision(
        "ViViT",
        "VivitConfig",
        ["VivitModel", "VivitForVideoClassification"],
        **frames,
        tubelet_size=[2, 8, 8],
    )
    rows += _vision(
        "TimeSformer",
        "TimesformerConfig",
        ["TimesformerModel", "TimesformerForVideoClassification"],
        **frames,
    )
    rows += [
        (
            "V-JEPA 2",
            "VJEPA2ForVideoClassification",
            "VJEPA2Config",
            dict(
                crop_size=32,
                patch_size=8,
                frames_per_clip=4,
                tubelet_size=2,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                mlp_ratio=2.0,
                num_pooler_layers=1,
                pred_hidden_size=32,
                pred_num_hidden_layers=1,
                pred_num_attention_heads=2,
                num_labels=5,
            ),
            {},
        )
    ]
    audio = dict(_SMALL, patch_size=8, frequency_stride=4, time_stride=6, max_length=32,
                 num_mel_bins=24)  # fmt: skip
    rows += [
        (
            "AST",
            name,
            "ASTConfig",
            {**audio, **({"num_labels": 5} if "Classif" in name else {})},
            {},
        )
        for name in ("ASTModel", "ASTForAudioClassification")
    ]
    return rows  # fmt: skip


def _input(case: Case) -> torch.Tensor:
    """The input batch of two: images, videos ``(2, 4, 3, 32, 32)`` or spectrograms."""
    gen = torch.Generator().manual_seed(0)
    config = case[2]
    if config.startswith(("VideoMAE", "Vivit", "Timesformer", "VJEPA2")):
        return torch.randn(2, 4, 3, 32, 32, generator=gen)
    if config == "ASTConfig":
        return torch.randn(2, case[3]["max_length"], case[3]["num_mel_bins"], generator=gen)
    return torch.randn(2, 3, 32, 32, generator=gen)


def _has_sdpa(case: Case) -> bool:
    """TimeSformer has no ``sdpa`` (eager attention only); every other class has."""
    return case[2] != "TimesformerConfig"


_MEDIA_CONFIGS = ("VideoMAEConfig", "VivitConfig", "TimesformerConfig", "VJEPA2Config", "ASTConfig")


def _randomize(model: torch.nn.Module, scale: float = 0.3) -> None:
    """Random values for the all-zero tensors HF initialises (heads, tokens, tables)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def _build(case: Case, attn: str, state: Optional[Dict[str, torch.Tensor]] = None) -> Any:
    import transformers as tf

    _, name, config_name, config_kwargs, kwargs = case
    config = getattr(tf, config_name)(**config_kwargs)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = getattr(tf, name.split(" ")[0])(config, **kwargs).eval()
    if state is None:
        # the video and audio classes at HF's init scale (0.02), as tests/test_video_audio.py:
        # biases of 0.3 make every value vector nearly the shared bias, and V-JEPA 2's one
        # pooler query then gets all-zero maps
        _randomize(model, 0.02 if config_name in _MEDIA_CONFIGS else 0.3)
    else:
        model.load_state_dict(state)
    return model


def _state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check(case: Case) -> str:
    """Explain the class once in each attention implementation; the ``works`` detail."""
    from captum_legrad import LeGrad, discover

    eager = _build(case, "eager")
    spec = discover(eager)  # refusals raise here
    sdpa = _has_sdpa(case)  # TimeSformer: eager only
    model = _build(case, "sdpa" if sdpa else "eager", _state(eager))
    x = _input(case)
    target = torch.tensor([1, 3])
    maps = []
    for built in (model, eager):
        before = _state(built)
        explainer = LeGrad(explainable(built, x))  # feature models: their dimensions
        batch = explainer.attribute(x, target=target, output="grid", normalize=False)
        alone = torch.cat(
            [
                explainer.attribute(
                    x[i : i + 1], target=int(target[i]), output="grid", normalize=False
                )
                for i in range(2)
            ]
        )
        if not bool(torch.isfinite(batch).all()) or not bool(
            (batch.flatten(1).amax(1) > batch.flatten(1).amin(1)).all()
        ):
            raise AssertionError("a map is not finite or constant")
        if not torch.allclose(batch, alone, rtol=1e-4, atol=1e-7):
            raise AssertionError("batch and single maps differ")
        after = _state(built)
        if any(not torch.equal(before[k], after[k]) for k in before):
            raise AssertionError("the model changed")
        maps.append(batch)
    if not torch.allclose(maps[0], maps[1], rtol=1e-4, atol=1e-4 * float(maps[1].abs().max())):
        raise AssertionError("sdpa and eager maps differ")
    attention = type(spec.attentions[0]).__name__
    pool = (
        f", attention pool {type(spec.pool_attention).__name__}"
        if spec.pool_attention is not None
        else ""
    )
    same = "sdpa = eager" if sdpa else "eager only"
    grid = "x".join(str(g) for g in spec.input_grid(x))
    return (
        f"{attention}, {spec.num_prefix_tokens} prefix{pool}, grid {grid}; {same}, batch = single"
    )


def sweep_one(case: Case) -> Row:
    """``(family, name, status, detail)`` of one class."""
    from captum_legrad import UnsupportedModelError

    family, name = case[0], case[1]
    try:
        status, detail = "works", _check(case)
    except UnsupportedModelError as error:
        status, detail = "refused", str(error).split(". ")[0]
    except Exception as error:
        status, detail = "error", f"{type(error).__name__}: {error}"[:300]
    return (family, name, status, detail.replace("\n", " ").replace("|", "/"))


def _available(case: Case) -> Optional[str]:
    """Why the class cannot be built here, or ``None``."""
    import transformers as tf

    name = case[1].split(" ")[0]
    if not hasattr(tf, name) or not hasattr(tf, case[2]):
        return f"transformers {tf.__version__} has no {name}"
    if case[2] == "DinatConfig":
        import importlib.util

        if importlib.util.find_spec("natten") is None:
            return "DiNAT needs the natten library"
    return None


def sweep_hf() -> List[Row]:
    """Rows ``(family, name, status, detail)``; status ``works``, ``refused`` or ``error``."""
    rows = []
    for case in cases():
        missing = _available(case)
        if missing is not None:
            print(f"skipped {case[1]}: {missing}", file=sys.stderr)
            continue
        rows.append(sweep_one(case))
    return rows


def markdown(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table, with the fractions below it."""
    lines = ["| family | class | status | detail |", "|---|---|---|---|"]
    lines += [
        f"| {family} | `{name}` | {status} | {detail} |" for family, name, status, detail in rows
    ]
    total = len(rows)
    counts = {s: sum(1 for r in rows if r[2] == s) for s in ("works", "refused", "error")}
    lines += ["", ", ".join(f"{status}: {n}/{total}" for status, n in counts.items())]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    start = time.perf_counter()
    rows = sweep_hf()
    print(markdown(rows))
    print(f"\n({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
