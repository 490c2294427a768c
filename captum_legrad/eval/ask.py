"""``captum-legrad explain PHOTO --model hf:VLM --ask QUESTION``: which image regions each
word of a vision-language model's answer came from (:mod:`captum_legrad.scores.vlm`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from .files import OutputFolder, unique_name
from .models import ModelError

__all__ = ["load_vlm", "vlm_prompt", "ask_photos", "ask_video", "takes_video"]

#: Frames read from a clip for ``--ask`` when the video processor names no count.
VIDEO_FRAMES = 8


def load_vlm(spec: str, random_weights: bool = False) -> Tuple[Any, Any]:
    """The model and processor of ``hf:ORG/NAME`` or ``hf:FOLDER`` (transformers' own loaders).

    Raises:
        ModelError: not an ``hf:`` model, transformers missing, or the model cannot be
            loaded (offline and not cached, not a supported VLM); one line.
    """
    family, _, name = spec.partition(":")
    if family != "hf" or not name:  # first: whatever the weights, this model cannot answer
        raise ModelError(
            f"--ask needs a vision-language model from transformers, not {spec}: --model "
            "hf:ORG/NAME or hf:FOLDER (LLaVA-1.5, PaliGemma, Gemma 3)"
        )
    if random_weights:
        raise ModelError("--ask explains a trained VLM's answer: drop --random-weights")
    try:
        import transformers
    except ImportError as error:
        raise ModelError(
            "--ask needs transformers: pip install 'captum-legrad[transformers]'"
        ) from error
    try:
        processor = transformers.AutoProcessor.from_pretrained(name)
        model = transformers.AutoModelForImageTextToText.from_pretrained(name).eval()
    except (OSError, ValueError, KeyError) as error:
        first = " ".join(str(error).split())[:300]
        raise ModelError(
            f"cannot load the vision-language model {name!r}: {first} (offline, pass a local "
            "folder with the model and its processor: --model hf:FOLDER)"
        ) from error
    return model, processor


def vlm_prompt(processor: Any, question: str, video: bool = False) -> str:
    """The prompt for ``question``: the processor's chat template with one image (or, with
    ``video``, one video) when it has one, else the image (video) token followed by the
    question (a prompt that already holds that token is used as it is)."""
    kind = "video" if video else "image"
    token = str(getattr(processor, f"{kind}_token", None) or f"<{kind}>")
    if token in question:
        return question
    if getattr(processor, "chat_template", None):
        messages = [
            {"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}
        ]
        return str(
            processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )
    return f"{token} {question}"


def _on_original(model: Any) -> bool:
    """Whether :func:`~captum_legrad.explain_answer` gives this model's maps on the original
    image (families described by views: tiles, crops, dynamic resolution), not on the
    processed (normalised) ``pixel_values``."""
    from ..adapters.hf.vlm import describe

    return describe(model).views is not None


def _explained(model: Any, processor: Any, media: Any, prompt: str, **options: Any) -> Any:
    """:func:`~captum_legrad.explain_answer`, a refused model reported as :class:`ModelError`."""
    from ..errors import UnsupportedModelError
    from ..scores.vlm import explain_answer

    try:
        return explain_answer(model, processor, media, prompt, **options)
    except UnsupportedModelError as error:
        raise ModelError(f"--ask: {' '.join(str(error).split())}") from error


def takes_video(model: Any, processor: Any) -> bool:
    """Whether ``model`` answers about a video here: its processor has a video processor,
    its forward takes ``pixel_values_videos`` and its answer maps are on the original media
    (Qwen-VL)."""
    import inspect

    if getattr(processor, "video_processor", None) is None:
        return False
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "pixel_values_videos" in parameters and _on_original(model)


def ask_photos(
    model: Any,
    processor: Any,
    files: Sequence[Path],
    out: OutputFolder,
    question: str,
    *,
    answer: Optional[str] = None,
    max_new_tokens: int = 32,
    layers: Optional[Sequence[int]] = None,
    fmt: str = "png",
) -> List[Tuple[Path, str]]:
    """Answer ``question`` about each photo and save one figure (a map per answer token) and
    the maps (``.npy``, ``(T, H, W)``): on the original photo for the families described by
    views (Qwen-VL, LLaVA-NeXT, Idefics3, ...: every tile and view placed back), else on the
    processed image; returns (photo, answer)."""
    import numpy as np
    from PIL import Image

    from .. import viz

    prompt = vlm_prompt(processor, question)
    mean = std = None
    if not _on_original(model):  # the maps are on the processed, normalised image
        image_processor = getattr(processor, "image_processor", None)
        mean = getattr(image_processor, "image_mean", None)
        std = getattr(image_processor, "image_std", None)
    results = []
    taken: set = set()
    for path in files:
        with Image.open(path) as handle:
            photo = handle.convert("RGB")
        result = _explained(
            model,
            processor,
            photo,
            prompt,
            answer=answer,
            max_new_tokens=max_new_tokens,
            layers=layers,
        )
        stem = unique_name(f"{path.stem}_answer", taken)
        out.save_npy(f"{stem}.npy", result.maps.numpy().astype(np.float32))
        figure = viz.plot_answer(
            result.pixel_values[0],
            result.maps,
            result.tokens,
            answer_map=result.answer_map,
            mean=mean,
            std=std,
            title=f"{question} → {result.text}",
        )
        out.save_figure(f"{stem}.{fmt}", figure)
        results.append((path, result.text))
    return results


def ask_video(
    model: Any,
    processor: Any,
    path: Path,
    out: OutputFolder,
    question: str,
    *,
    answer: Optional[str] = None,
    max_new_tokens: int = 32,
    layers: Optional[Sequence[int]] = None,
    fmt: str = "png",
    num_frames: Optional[int] = None,
) -> str:
    """Answer ``question`` about the clip at ``path`` (frames sampled uniformly with
    :func:`~captum_legrad.eval.media.read_video`) and save the figure (a frame strip per
    answer token and one for the whole answer, :func:`~captum_legrad.viz.plot_video`) and the
    maps (``.npy``, ``(T, F, H, W)``: per token, per frame, on the frames); returns the answer.

    Raises:
        ModelError: the model answers about images only (one line).
        MediaError: the file is no readable video.
    """
    import numpy as np
    import torch

    from .. import viz
    from .media import read_video

    if not takes_video(model, processor):
        raise ModelError(
            f"--ask on a video needs a vision-language model that takes videos (Qwen2-VL, "
            f"Qwen2.5-VL, Qwen3-VL); {type(model).__name__} answers about images: give it "
            "a photo, or a frame saved as an image"
        )
    if num_frames is None:
        video_processor = getattr(processor, "video_processor", None)
        num_frames = int(getattr(video_processor, "num_frames", None) or VIDEO_FRAMES)
    clip = read_video(path, num_frames)
    result = _explained(
        model,
        processor,
        np.stack(clip.frames),
        vlm_prompt(processor, question, video=True),
        answer=answer,
        max_new_tokens=max_new_tokens,
        layers=layers,
    )
    stem = unique_name(f"{path.stem}_answer", set())
    out.save_npy(f"{stem}.npy", result.maps.numpy().astype(np.float32))
    rows = torch.cat([result.maps, result.answer_map.unsqueeze(0)])
    figure = viz.plot_video(
        result.pixel_values,
        rows,
        [*result.tokens, "whole answer"],
        times=clip.times,
        indices=clip.indices,
        vmin=0.0,
        vmax=1.0,
        title=f"{question} → {result.text}",
    )
    out.save_figure(f"{stem}.{fmt}", figure)
    return str(result.text)
