"""Models as users load them: half precision, and models that accelerate dispatches.

A 7B–72B VLM does not fit one device for a backward, so users load it with
``device_map="auto"`` (accelerate's hooks move tensors between devices, and offloaded
weights exist only during their module's own forward: on the meta device before and
after). Here a tiny LLaVA-1.5 (``tests/test_vlm.py``), an HF ViT classifier and a timm ViT
are dispatched with CPU and disk offload on this CPU-only machine; their maps must equal
the undispatched model's, and the dispatched model must be as it was after the call. In
bf16 and fp16 the scores and the maps are float32 and close to the float32 model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
import torch
from torch import Tensor, nn

tf = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from conftest import assert_not_vacuous, make_model  # noqa: E402
from test_hf import images, make_hf  # noqa: E402
from test_side_effects import _HOOK_DICTS  # noqa: E402
from test_vlm import _llava, _Processor, case, left_padded  # noqa: E402

from captum_legrad import AnswerLogits, LeGrad, explain_answer  # noqa: E402

#: The tiny LLaVA's modules and where they go: decoder layer 0, the final norm and
#: ``lm_head`` to disk, the rest on the CPU.
LLAVA_DEVICE_MAP = {
    "model.vision_tower": "cpu",
    "model.multi_modal_projector": "cpu",
    "model.language_model.embed_tokens": "cpu",
    "model.language_model.layers.0": "disk",
    "model.language_model.layers.1": "cpu",
    "model.language_model.norm": "disk",
    "model.language_model.rotary_emb": "cpu",
    "lm_head": "disk",
}


def _structure(model: nn.Module) -> Dict[str, Any]:
    """What a call could leave behind on a dispatched model (whose parameters accelerate
    itself replaces on every forward): hooks, forwards, accelerate's hooks, attributes,
    flags, gradients."""
    modules = dict(model.named_modules())
    return {
        "hooks": {
            n: {d: list(getattr(m, d, {}).keys()) for d in _HOOK_DICTS} for n, m in modules.items()
        },
        "forwards": {n: (m.__dict__.get("forward"), type(m).forward) for n, m in modules.items()},
        "accelerate": {n: id(getattr(m, "_hf_hook", None)) for n, m in modules.items()},
        "attrs": {n: sorted(vars(m)) for n, m in modules.items()},
        "training": {n: m.training for n, m in modules.items()},
        "devices": {n: p.device for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": [n for n, p in model.named_parameters() if p.grad is not None],
        "grad_mode": torch.is_grad_enabled(),
    }


def _llava_case() -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    prompts, answers, pixels = case("llava", seed=11)
    ids, mask = left_padded(prompts)
    return ids, mask, answers, pixels


def _answer_maps(model: nn.Module) -> Tuple[Tensor, Tensor, Tensor]:
    """Raw token maps, per-layer maps and the logits of the tiny LLaVA case."""
    ids, mask, answers, pixels = _llava_case()
    explained = AnswerLogits(model, ids, answers, mask)
    legrad = LeGrad(explained)
    raw = legrad.attribute_multi(pixels, targets=range(3), output="grid", normalize=False)
    layers = legrad.attribute_layers(pixels, target=1)
    with torch.no_grad():
        logits = explained(pixels)
    return raw, layers, logits


@pytest.fixture(scope="module")
def llava_saved(tmp_path_factory: pytest.TempPathFactory) -> Tuple[nn.Module, Path]:
    model = _llava("sdpa", seed=3)
    folder = tmp_path_factory.mktemp("llava")
    model.save_pretrained(folder)
    return model, folder


def _dispatched_llava(folder: Path, how: str) -> nn.Module:
    if how == "device_map":  # from_pretrained(..., device_map=..., offload_folder=...)
        return tf.LlavaForConditionalGeneration.from_pretrained(
            folder, device_map=LLAVA_DEVICE_MAP, offload_folder=str(folder / "offload")
        ).eval()
    model = tf.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    if how == "cpu_offload":  # every weight kept aside, loaded per module call
        return accelerate.cpu_offload(model, execution_device="cpu")
    return accelerate.disk_offload(model, str(folder / f"disk-{how}"), execution_device="cpu")


@pytest.mark.parametrize("how", ["device_map", "cpu_offload", "disk_offload"])
def test_dispatched_vlm_maps_equal_the_models(llava_saved: Any, how: str) -> None:
    model, folder = llava_saved
    raw, layers, logits = _answer_maps(model)
    assert_not_vacuous(layers, lead=2)  # every (sample, layer)
    dispatched = _dispatched_llava(folder, how)
    assert any(p.device.type == "meta" for p in dispatched.parameters())  # really offloaded
    ids, mask, _answers, pixels = _llava_case()
    with torch.no_grad():  # transformers adds its output-recording hooks on a first forward
        dispatched(input_ids=ids, pixel_values=pixels, attention_mask=mask)
    before = _structure(dispatched)
    got_raw, got_layers, got_logits = _answer_maps(dispatched)
    torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_layers, layers, rtol=1e-5, atol=1e-6 * float(layers.max()))
    torch.testing.assert_close(got_raw, raw, rtol=1e-5, atol=1e-6 * float(raw.max()))
    assert _structure(dispatched) == before
    with torch.no_grad():  # the model itself still computes what it did
        out = dispatched(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        ref = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_explain_answer_on_a_dispatched_vlm(llava_saved: Any) -> None:
    model, folder = llava_saved
    dispatched = _dispatched_llava(folder, "device_map")
    image = torch.randn(3, 40, 40, generator=torch.Generator().manual_seed(5))
    prompt = "w1 <image> w5 w6"
    expected = explain_answer(model, _Processor(), image, prompt, max_new_tokens=3)
    got = explain_answer(dispatched, _Processor(), image, prompt, max_new_tokens=3)
    assert got.answer_ids.tolist() == expected.answer_ids.tolist()
    torch.testing.assert_close(got.maps, expected.maps, rtol=1e-5, atol=1e-5)


def test_dispatched_vit_classifiers(tmp_path: Path) -> None:
    hf = make_hf("vit_cls", "sdpa")
    x = images()
    expected = LeGrad(hf).attribute_layers(x, target=1)
    assert_not_vacuous(expected, lead=2)
    hf.save_pretrained(tmp_path / "vit")
    # Every other top-level piece and block (the first block, the final norm, the head) on disk.
    blocks = next(n for n, m in hf.named_modules() if isinstance(m, nn.ModuleList))
    pieces = [f"vit.{n}" for n, _ in hf.vit.named_children() if f"vit.{n}" != blocks]
    pieces += [f"{blocks}.{i}" for i in range(hf.config.num_hidden_layers)] + ["classifier"]
    device_map = {n: ("disk" if i % 2 else "cpu") for i, n in enumerate(pieces)}
    loaded = tf.ViTForImageClassification.from_pretrained(
        tmp_path / "vit", device_map=device_map, offload_folder=str(tmp_path / "off")
    ).eval()
    with torch.no_grad():  # transformers adds its output-recording hooks on a first forward
        loaded(x)
    before = _structure(loaded)
    got = LeGrad(loaded).attribute_layers(x, target=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * float(expected.max()))
    assert _structure(loaded) == before

    vit = make_model("vit")
    offloaded = accelerate.cpu_offload(make_model("vit"), execution_device="cpu")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = LeGrad(vit).attribute_layers(x, target=2)
    assert_not_vacuous(expected, lead=2)
    before = _structure(offloaded)
    got = LeGrad(offloaded).attribute_layers(x, target=2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * float(expected.max()))
    assert _structure(offloaded) == before


# ------------------------------------------------------------------------ half precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_vlm(dtype: torch.dtype) -> None:
    half = _llava("sdpa", seed=4).to(dtype)
    full = _llava("sdpa", seed=4).to(dtype).float()  # the same (rounded) weights, float32
    ids, mask, answers, pixels = _llava_case()
    explained = AnswerLogits(half, ids, answers, mask)
    with torch.no_grad():
        logits = explained(pixels.to(dtype))
        ref_logits = AnswerLogits(full, ids, answers, mask)(pixels)
    assert logits.dtype == torch.float32  # the scores are read in float32
    scale = float(ref_logits.abs().max())
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0.05 * scale)
    raw = LeGrad(explained).attribute_multi(
        pixels.to(dtype), targets=range(3), output="grid", normalize=False
    )
    ref = LeGrad(AnswerLogits(full, ids, answers, mask)).attribute_multi(
        pixels, targets=range(3), output="grid", normalize=False
    )
    assert_not_vacuous(ref, lead=2)
    # Maps come back in the input's dtype (Captum's convention), computed in float32: the
    # per-layer maps, before that cast, are float32.
    assert raw.dtype == dtype
    raw = raw.float()
    layers = LeGrad(explained).attribute_layers(pixels.to(dtype), target=1)
    assert layers.dtype == torch.float32
    torch.testing.assert_close(layers.sum(1), raw[:, 1], rtol=1e-2, atol=1e-2 * float(raw.max()))
    # bf16 keeps 8 bits of mantissa: activations differ by ~1%, the maps by a few percent.
    torch.testing.assert_close(raw, ref, rtol=0, atol=0.08 * float(ref.max()))
    flat, ref_flat = raw.flatten(2), ref.flatten(2)
    corr = torch.nn.functional.cosine_similarity(
        flat - flat.mean(-1, keepdim=True), ref_flat - ref_flat.mean(-1, keepdim=True), dim=-1
    )
    assert corr.min() > 0.95, corr
