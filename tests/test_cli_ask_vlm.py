"""``captum-legrad explain --ask`` with the families described by views (Qwen2-VL on a photo
and on a video, LLaVA-NeXT's tiles), end to end through :func:`captum_legrad.cli.main`.

Each model and its real processor (the family's processor classes with a tiny offline
word-level tokenizer and a chat template of the family's form) are saved with
``save_pretrained`` into a temporary folder, loaded back by the command line
(``--model hf:FOLDER``), and the maps it writes are compared with
:func:`captum_legrad.explain_answer` on the in-memory model (whose exactness against the
independent oracle is tested in ``tests/test_vlm_qwen.py`` and ``tests/test_vlm_tiles.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Tuple

import numpy as np
import pytest
import torch

tf = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
av = pytest.importorskip("av")

from _versions import requires  # noqa: E402
from conftest import assert_not_vacuous  # noqa: E402
from PIL import Image  # noqa: E402
from test_cli import run, save_png  # noqa: E402
from test_media import write_clip  # noqa: E402

from captum_legrad import explain_answer  # noqa: E402

pytestmark = requires("transformers", "Qwen2VLForConditionalGeneration", since="transformers 4.45")

#: Qwen2-VL's chat template (the form of Qwen/Qwen2-VL-2B-Instruct's).
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|>"
    "<|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

#: LLaVA's chat template (the form of llava-hf's).
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ message['content'][0]['text'] }}{% else %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _qwen_processor() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers

    chat = ["system", "You", "are", "a", "helpful", "assistant.", "user", "assistant"]
    vision = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    specials = [*vision, "<|im_start|>", "<|im_end|>"]
    words = ["<pad>", "<eos>", *chat, *[f"w{i}" for i in range(48)], *specials]
    assert words.index("<|vision_start|>") == 58 and len(words) == 64  # the model's ids
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=inner, pad_token="<pad>", eos_token="<eos>"
    )
    tokenizer.add_tokens(specials, special_tokens=True)
    sizes = dict(min_pixels=8 * 8, max_pixels=32 * 32, patch_size=4, merge_size=2)
    plain = dict(temporal_patch_size=2, image_mean=[0.0] * 3, image_std=[1.0] * 3)
    return tf.Qwen2VLProcessor(
        image_processor=tf.Qwen2VLImageProcessor(**sizes, **plain),
        tokenizer=tokenizer,
        video_processor=tf.Qwen2VLVideoProcessor(**sizes, **plain),
        chat_template=QWEN_TEMPLATE,
    )


def _qwen_folder(folder: Path) -> Tuple[Any, Any]:
    from test_vlm_qwen import model_for

    model = model_for("qwen2", "sdpa")
    processor = _qwen_processor()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def _llava_next_folder(folder: Path) -> Tuple[Any, Any]:
    from test_vlm_tiles import model_for, processor

    model = model_for("llava_next", "sdpa")
    built = processor("llava_next")
    built.chat_template = LLAVA_TEMPLATE
    model.save_pretrained(folder)
    built.save_pretrained(folder)
    return model, built


def _round_trips(folder: Path, processor: Any, image: Any, text: str, **kind: Any) -> None:
    """The processor saved in ``folder`` loads back offline and processes as the original."""
    loaded = tf.AutoProcessor.from_pretrained(folder)
    assert type(loaded) is type(processor) and loaded.chat_template == processor.chat_template
    given = {"videos": [image]} if kind.get("video") else {"images": [image]}
    ours = processor(text=[text], return_tensors="pt", **given)
    theirs = loaded(text=[text], return_tensors="pt", **given)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name])


def _photo(path: Path, height: int, width: int, seed: int) -> Image.Image:
    save_png(path, torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed)))
    with Image.open(path) as handle:
        return handle.convert("RGB")


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> List[List[str]]:
    """The texts of every figure the command line saves (titles, panel titles)."""
    from captum_legrad.eval.files import OutputFolder

    seen: List[List[str]] = []
    save = OutputFolder.save_figure

    def spy(self: Any, name: str, figure: Any) -> Any:
        seen.append([t.get_text() for t in figure.findobj(lambda o: hasattr(o, "get_text"))])
        return save(self, name, figure)

    monkeypatch.setattr(OutputFolder, "save_figure", spy)
    return seen


def test_ask_qwen2_vl_on_a_photo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], figures: List[List[str]]
) -> None:
    """The chat template's prompt, the generated answer, one map per token on the ORIGINAL
    photo (its size, not the processor's resize), equal to explain_answer's."""
    model, processor = _qwen_folder(tmp_path / "qwen")
    photo = _photo(tmp_path / "pic.png", 22, 38, seed=1)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w3 w4"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt.endswith("<|im_start|>assistant\n") and "<|image_pad|>" in prompt
    _round_trips(tmp_path / "qwen", processor, photo, prompt)
    argv = ["explain", str(tmp_path / "pic.png"), "--model", f"hf:{tmp_path / 'qwen'}"]
    argv += ["--ask", "w3 w4", "--max-new-tokens", "3", "--out", str(tmp_path / "o")]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    expected = explain_answer(model, processor, photo, prompt, max_new_tokens=3)
    assert f"pic.png: w3 w4 → {expected.text}" in stdout
    maps = np.load(tmp_path / "o" / "pic_answer.npy")
    assert maps.shape == (len(expected.tokens), 22, 38)  # the photo's own size
    assert_not_vacuous(expected.maps)
    np.testing.assert_allclose(maps, expected.maps.numpy(), atol=1e-5)
    (texts,) = figures
    assert any(expected.text in t and "w3 w4" in t for t in texts)  # the title
    for token in expected.tokens:
        assert any(token in t for t in texts if t != "" and expected.text not in t)


def test_ask_qwen2_vl_on_a_video(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], figures: List[List[str]]
) -> None:
    """A clip: frames read with eval.media, one map per answer token with a time axis
    ``(T, F, H, W)`` on the frames, equal to explain_answer on the same frames; the figure is
    a frame strip per token and one for the whole answer."""
    from captum_legrad.eval.media import read_video

    model, processor = _qwen_folder(tmp_path / "qwen")
    clip = write_clip(tmp_path / "clip.mp4", frames=10, size=24)
    frames = np.stack(read_video(clip, 8).frames)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "w5"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert "<|video_pad|>" in prompt
    _round_trips(tmp_path / "qwen", processor, frames, prompt, video=True)
    argv = ["explain", str(clip), "--model", f"hf:{tmp_path / 'qwen'}", "--ask", "w5"]
    argv += ["--answer", "w7 w8", "--out", str(tmp_path / "o")]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    expected = explain_answer(model, processor, frames, prompt, answer="w7 w8")
    assert expected.tokens == ["w7", "w8"]
    assert "clip.mp4: w5 → w7 w8" in stdout
    maps = np.load(tmp_path / "o" / "clip_answer.npy")
    assert maps.shape == (2, 8, 24, 24)  # token, frame, height, width
    assert_not_vacuous(expected.maps)
    np.testing.assert_allclose(maps, expected.maps.numpy(), atol=1e-5)
    (texts,) = figures
    assert any("w5 → w7 w8" in t for t in texts)
    for label in ("w7", "w8", "whole answer"):
        assert label in texts


def test_ask_llava_next_tiles_on_the_original_photo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], figures: List[List[str]]
) -> None:
    """LLaVA-NeXT (base view and AnyRes crops): the maps on the original photo, from every
    view placed back, equal to explain_answer's; the figure draws the photo itself."""
    model, processor = _llava_next_folder(tmp_path / "next")
    photo = _photo(tmp_path / "pic.png", 40, 72, seed=2)
    prompt = "USER: <image>\nwhat is this ? ASSISTANT:"
    _round_trips(tmp_path / "next", processor, photo, prompt)
    argv = ["explain", str(tmp_path / "pic.png"), "--model", f"hf:{tmp_path / 'next'}"]
    argv += ["--ask", "what is this ?", "--answer", "a b c", "--out", str(tmp_path / "o")]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    expected = explain_answer(model, processor, photo, prompt, answer="a b c")
    assert "pic.png: what is this ? → a b c" in stdout
    maps = np.load(tmp_path / "o" / "pic_answer.npy")
    assert maps.shape == (3, 40, 72)
    assert_not_vacuous(expected.maps)
    np.testing.assert_allclose(maps, expected.maps.numpy(), atol=1e-5)
    (texts,) = figures
    assert any("what is this ? → a b c" in t for t in texts)
    for token in ("a", "b", "c"):
        assert any(token == t.strip().strip("'\"") for t in texts)


def test_ask_a_video_of_an_image_only_vlm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A video with a VLM that answers about images only: one line, exit 2, nothing written."""
    _llava_next_folder(tmp_path / "next")
    clip = write_clip(tmp_path / "clip.mp4")
    capsys.readouterr()  # save_pretrained's progress bars
    argv = ["explain", str(clip), "--model", f"hf:{tmp_path / 'next'}", "--ask", "what"]
    code, stdout, err = run([*argv, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and stdout == ""
    (line,) = [x for x in err.splitlines() if "captum-legrad" in x]  # (and loading bars)
    assert line.startswith("captum-legrad: error: --ask on a video needs a vision-language")
    assert "Traceback" not in err and "takes videos" in line
    assert "LlavaNextForConditionalGeneration" in line
    assert not (tmp_path / "o").exists()
