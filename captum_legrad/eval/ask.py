"""``captum-legrad explain PHOTO --model hf:VLM --ask QUESTION``: which image regions each
word of a vision-language model's answer came from (:mod:`captum_legrad.scores.vlm`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from .files import OutputFolder, unique_name
from .models import ModelError

__all__ = ["load_vlm", "vlm_prompt", "ask_photos"]


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


def vlm_prompt(processor: Any, question: str) -> str:
    """The prompt for ``question``: the processor's chat template with one image when it has
    one, else the image token followed by the question (a prompt that already holds the image
    token is used as it is)."""
    token = str(getattr(processor, "image_token", "<image>"))
    if token in question:
        return question
    if getattr(processor, "chat_template", None):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        ]
        return str(processor.apply_chat_template(messages, add_generation_prompt=True))
    return f"{token} {question}"


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
    the maps (``.npy``, ``(T, H, W)`` on the processed image); returns (photo, answer)."""
    import numpy as np
    from PIL import Image

    from .. import viz
    from ..scores.vlm import explain_answer

    prompt = vlm_prompt(processor, question)
    image_processor = getattr(processor, "image_processor", None)
    mean = getattr(image_processor, "image_mean", None)
    std = getattr(image_processor, "image_std", None)
    results = []
    taken: set = set()
    for path in files:
        with Image.open(path) as handle:
            photo = handle.convert("RGB")
        result = explain_answer(
            model, processor, photo, prompt, answer, max_new_tokens=max_new_tokens, layers=layers
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
