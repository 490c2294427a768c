"""The explorer's "ask" page for a vision-language model (captum_legrad.app.AskExplorer),
without a browser: tiny random Qwen2-VL (a photo and a video) and LLaVA-NeXT (a tiled,
non-square photo) saved with their real processor classes (the builders of
``tests/test_cli_ask_vlm.py``) and loaded back from the folder as the page loads them.

The page's maps are compared with :func:`captum_legrad.explain_answer` on the in-memory
model (whose exactness against the independent oracle is tested in
``tests/test_vlm_qwen.py`` and ``tests/test_vlm_tiles.py``); the token table's logits with
:class:`~captum_legrad.AnswerLogits` (the score LeGrad explains, another code path) and,
for a generated answer, the logits and probabilities with ``generate``'s own per-step
logits (softmax over the vocabulary).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch

tf = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
av = pytest.importorskip("av")
pytest.importorskip("gradio")

from _versions import requires  # noqa: E402
from conftest import assert_not_vacuous  # noqa: E402
from PIL import Image  # noqa: E402
from test_cli_ask_vlm import _llava_next_folder, _photo, _qwen_folder  # noqa: E402
from test_media import write_clip  # noqa: E402

from captum_legrad import explain_answer  # noqa: E402
from captum_legrad.app import AskExplorer, ExplorerError, build  # noqa: E402
from captum_legrad.eval.ask import load_vlm, vlm_model  # noqa: E402
from captum_legrad.eval.media import read_video  # noqa: E402

pytestmark = requires("transformers", "Qwen2VLForConditionalGeneration", since="transformers 4.45")


def _prompt(processor: Any, question: str, kind: str = "image") -> str:
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
    return str(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def _answer_logits(
    model: Any, processor: Any, media: Any, prompt: str, answer_ids: torch.Tensor, video: bool
) -> torch.Tensor:
    """The answer tokens' logits by :class:`AnswerLogits` (the processor's inputs by name)."""
    from captum_legrad import AnswerLogits
    from captum_legrad.adapters.hf.vlm import describe

    given = {"videos": [media]} if video else {"images": [media]}
    batch = dict(processor(text=[prompt], return_tensors="pt", **given))
    input_ids, mask = batch.pop("input_ids"), batch.pop("attention_mask")
    rules = describe(model).views
    assert rules is not None
    pixels = batch.pop(rules.main_input(batch))
    with torch.no_grad():
        return AnswerLogits(model, input_ids, answer_ids, mask, **batch)(pixels)[0]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    root = tmp_path_factory.mktemp("qwen_app")
    model, processor = _qwen_folder(root / "qwen")
    explorer = AskExplorer(*load_vlm(f"hf:{root / 'qwen'}"), workdir=root / "work")
    return {"root": root, "model": model, "processor": processor, "explorer": explorer}


def _displayed(path: Path, height: int) -> np.ndarray:
    """The photo as the page draws an overlay of opacity 0: upscaled bilinearly."""
    with Image.open(path) as handle:
        photo = handle.convert("RGB")
    scale = -(-256 // min(photo.size))
    size = (photo.size[0] * scale, photo.size[1] * scale)
    shown = np.asarray(photo.resize(size, Image.Resampling.BILINEAR)).astype(int)
    assert shown.shape[0] == height
    return shown


def test_a_vlm_folder_is_told_apart(qwen: Dict[str, Any], tmp_path: Path) -> None:
    """config.json decides: a VLM folder gets the ask page, others do not."""
    assert vlm_model(f"hf:{qwen['root'] / 'qwen'}")
    assert not vlm_model("default") and not vlm_model(f"timm:{qwen['root'] / 'qwen'}")
    assert not vlm_model(f"hf:{tmp_path}")  # no config.json
    assert not vlm_model("hf:no-such-org/no-such-model")  # not resolvable: the other loaders
    (tmp_path / "config.json").write_text('{"model_type": "videomae"}')
    assert not vlm_model(f"hf:{tmp_path}")
    page = build(qwen["explorer"])
    ids = {getattr(block, "elem_id", None) for block in page.blocks.values()}
    assert {"media", "question", "answer", "maps", "figure", "animations"} <= ids
    assert "reference" not in ids  # none of the image page's inputs


def test_qwen2_vl_photo_the_generated_answer(qwen: Dict[str, Any]) -> None:
    """The model's own answer: one overlay per token on the ORIGINAL photo, captioned
    ``pic.png: "w3"``, the maps equal explain_answer's, the table's logits and
    probabilities equal generate's per-step logits; downloads = what --ask writes."""
    root, model, processor = qwen["root"], qwen["model"], qwen["processor"]
    photo = _photo(root / "pic.png", 22, 38, seed=1)
    view = qwen["explorer"].ask(root / "pic.png", "w3 w4", max_new_tokens=3, opacity=0.0)
    prompt = _prompt(processor, "w3 w4")
    expected = explain_answer(model, processor, photo, prompt, max_new_tokens=3)
    result = view.explained.result
    assert result.tokens == expected.tokens and len(expected.tokens) >= 1
    assert_not_vacuous(expected.maps)
    torch.testing.assert_close(result.maps, expected.maps, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.answer_map, expected.answer_map, atol=1e-5, rtol=0)
    assert [Path(f).name for f in view.files] == ["pic_answer.npy", "pic_answer.png"]
    np.testing.assert_allclose(np.load(view.files[0]), expected.maps.numpy(), atol=1e-5)
    # generate's own scores at each step: the oracle of the table
    batch = processor(text=[prompt], images=[photo], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=3, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )  # fmt: skip
    steps = torch.stack(out.logits)[: len(expected.tokens), 0].float()  # (T, vocabulary)
    ids = expected.answer_ids
    logits = steps.gather(1, ids[:, None])[:, 0]
    probabilities = steps.softmax(-1).gather(1, ids[:, None])[:, 0]
    assert [row[0] for row in view.rows] == expected.tokens
    np.testing.assert_allclose([float(r[1]) for r in view.rows], logits.numpy(), atol=0.006)
    np.testing.assert_allclose([float(r[2]) for r in view.rows], probabilities.numpy(), atol=0.0006)
    np.testing.assert_allclose(view.explained.probabilities, probabilities.numpy(), atol=1e-4)
    assert (probabilities > 0).all() and float(probabilities.max()) < 1  # not vacuous
    # one overlay per token and the whole answer; at opacity 0 each is the photo itself
    assert [c for _, c in view.maps] == [
        *[f'pic.png: "{t.strip()}"' for t in expected.tokens],
        f'pic.png: whole answer "{expected.text}"',
    ]
    for image, _ in view.maps:
        assert image.shape[1] * 22 == image.shape[0] * 38  # the photo's aspect, not 32x32
        diff = np.abs(image.astype(int) - _displayed(root / "pic.png", image.shape[0]))
        assert diff.max() <= 1
    assert f"pic.png**: w3 w4 → **{expected.text}**" in view.summary
    assert view.strip is None and view.animations == []


def test_qwen2_vl_overlays_are_the_maps(qwen: Dict[str, Any]) -> None:
    """At opacity 1 an overlay is the colour map of its token's map: brightest (red in
    jet) where the map is 1, darkest blue where it is 0."""
    root = qwen["root"]
    _photo(root / "pic2.png", 24, 40, seed=3)
    view = qwen["explorer"].ask(root / "pic2.png", "w3", answer="w9 w10", opacity=1.0)
    maps = view.explained.result.maps
    assert_not_vacuous(maps)
    for (image, caption), heat, token in zip(view.maps, maps, ("w9", "w10")):
        assert caption == f'pic2.png: "{token}"'
        scale = image.shape[0] // 24
        hot = np.unravel_index(int(heat.argmax()), heat.shape)
        cold = np.unravel_index(int(heat.argmin()), heat.shape)
        red = image[hot[0] * scale + scale // 2, hot[1] * scale + scale // 2]
        blue = image[cold[0] * scale + scale // 2, cold[1] * scale + scale // 2]
        assert red[0] > 100 and red[2] < 60, red  # jet(1): dark red
        assert blue[2] > 100 and blue[0] < 60, blue  # jet(0): dark blue


def test_qwen2_vl_video(qwen: Dict[str, Any]) -> None:
    """A clip: the maps ``(T, F, H, W)`` equal explain_answer on the same frames, the frame
    strip is the figure --ask writes, one GIF per token (one frame per sampled frame),
    logits equal AnswerLogits'."""
    root, model, processor = qwen["root"], qwen["model"], qwen["processor"]
    clip = write_clip(root / "clip.mp4", frames=10, size=24)
    view = qwen["explorer"].ask(clip, "w5", answer="w7 w8")
    frames = np.stack(read_video(clip, 8).frames)
    prompt = _prompt(processor, "w5", "video")
    expected = explain_answer(model, processor, frames, prompt, answer="w7 w8")
    result = view.explained.result
    assert result.maps.shape == (2, 8, 24, 24)
    assert_not_vacuous(expected.maps)
    torch.testing.assert_close(result.maps, expected.maps, atol=1e-5, rtol=0)
    assert [Path(f).name for f in view.files] == ["clip_answer.npy", "clip_answer.png"]
    np.testing.assert_allclose(np.load(view.files[0]), expected.maps.numpy(), atol=1e-5)
    assert view.strip is not None and view.strip[0] == view.files[1]
    assert view.strip[1] == "clip.mp4: w5 → w7 w8"
    assert [c for _, c in view.animations] == ['clip.mp4: "w7"', 'clip.mp4: "w8"']
    for gif, _ in view.animations:
        with Image.open(gif) as handle:
            assert handle.n_frames == 8
    assert view.maps == []
    logits = _answer_logits(model, processor, frames, prompt, expected.answer_ids, video=True)
    np.testing.assert_allclose(view.explained.logits, logits.numpy(), atol=1e-4)
    assert all(0 < p < 1 for p in view.explained.probabilities or [])


def test_llava_next_tiles_on_the_original_photo(tmp_path: Path) -> None:
    """LLaVA-NeXT (base view and AnyRes crops) on a non-square photo: the maps on the whole
    original photo (40x72) equal explain_answer's, each overlay drawn on the photo itself."""
    model, processor = _llava_next_folder(tmp_path / "next")
    photo = _photo(tmp_path / "pic.png", 40, 72, seed=2)
    explorer = AskExplorer(*load_vlm(f"hf:{tmp_path / 'next'}"), workdir=tmp_path / "work")
    assert not explorer.takes_video
    view = explorer.ask(tmp_path / "pic.png", "what is this ?", answer="a b c", opacity=0.0)
    prompt = "USER: <image>\nwhat is this ? ASSISTANT:"
    expected = explain_answer(model, processor, photo, prompt, answer="a b c")
    result = view.explained.result
    assert result.maps.shape == (3, 40, 72)
    assert_not_vacuous(expected.maps)
    torch.testing.assert_close(result.maps, expected.maps, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.load(view.files[0]), expected.maps.numpy(), atol=1e-5)
    assert [c for _, c in view.maps] == [
        'pic.png: "a"',
        'pic.png: "b"',
        'pic.png: "c"',
        'pic.png: whole answer "a b c"',
    ]
    for image, _ in view.maps:
        diff = np.abs(image.astype(int) - _displayed(tmp_path / "pic.png", image.shape[0]))
        assert diff.max() <= 1
    logits = _answer_logits(model, processor, photo, prompt, expected.answer_ids, video=False)
    np.testing.assert_allclose(view.explained.logits, logits.numpy(), atol=1e-4)
    assert [r[0] for r in view.rows] == ["a", "b", "c"]
    # a video to this image-only model: one message
    clip = write_clip(tmp_path / "clip.mp4")
    with pytest.raises(ExplorerError) as caught:
        explorer.ask(clip, "what")
    message = str(caught.value)
    assert message.startswith("A video needs a vision-language model that takes videos")
    assert "LlavaNextForConditionalGeneration" in message and "\n" not in message


def test_bad_input_is_one_message(qwen: Dict[str, Any], tmp_path: Path) -> None:
    explorer = qwen["explorer"]
    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(bytes(range(256)) * 4)
    _photo(tmp_path / "pic.png", 16, 16, seed=4)
    cases: List[Tuple[Any, str, str]] = [
        (None, "w3", "Upload an image or a video first."),
        (tmp_path / "pic.png", "  ", "Type a question"),
        (bad, "w3", "Cannot read image notes.png"),
        (corrupt, "w3", "corrupt.mp4"),
    ]
    for file, question, start in cases:
        with pytest.raises(ExplorerError) as caught:
            explorer.ask(file, question)
        message = str(caught.value)
        assert start in message and "\n" not in message, message
        assert str(tmp_path) not in message  # the file by its name only


def test_llava_one_grid_on_the_processed_image(tmp_path: Path) -> None:
    """LLaVA-1.5 (one grid): the maps are on the image as the processor resized and cropped
    it (as --ask draws them), its normalisation undone; the table equals generate's."""
    from test_cli import _tiny_llava_folder, require

    require("transformers", "LlavaModel", since="transformers 4.52")  # the VLM layout
    model, processor = _tiny_llava_folder(tmp_path / "llava")
    photo = _photo(tmp_path / "pic.png", 40, 50, seed=5)
    explorer = AskExplorer(*load_vlm(f"hf:{tmp_path / 'llava'}"), workdir=tmp_path / "work")
    assert not explorer.takes_video
    view = explorer.ask(tmp_path / "pic.png", "w3 w4", max_new_tokens=3, opacity=0.0)
    expected = explain_answer(model, processor, photo, "<image> w3 w4", max_new_tokens=3)
    assert_not_vacuous(expected.maps)
    torch.testing.assert_close(view.explained.result.maps, expected.maps, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.load(view.files[0]), expected.maps.numpy(), atol=1e-6)
    # the processed image (CLIP's resize and centre crop to 32x32), un-normalised, upscaled
    pixels = processor.image_processor(photo, return_tensors="pt")["pixel_values"][0]
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    rgb = ((pixels * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
    seen = Image.fromarray(rgb.astype(np.uint8)).resize((256, 256), Image.Resampling.BILINEAR)
    for image, _ in view.maps:
        assert image.shape == (256, 256, 3)
        assert np.abs(image.astype(int) - np.asarray(seen).astype(int)).max() <= 2
    batch = processor(text=["<image> w3 w4"], images=[photo], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=3, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )  # fmt: skip
    steps = torch.stack(out.logits)[: len(expected.tokens), 0].float()
    ids = expected.answer_ids[:, None]
    np.testing.assert_allclose(view.explained.logits, steps.gather(1, ids)[:, 0], atol=1e-4)
    np.testing.assert_allclose(
        view.explained.probabilities, steps.softmax(-1).gather(1, ids)[:, 0], atol=1e-5
    )


def test_launch_refuses_weights_for_a_vlm(qwen: Dict[str, Any]) -> None:
    from captum_legrad import app

    with pytest.raises(ExplorerError, match="vision-language model: it loads its own weights"):
        app.launch(f"hf:{qwen['root'] / 'qwen'}", weights="vit.safetensors", block=False)
