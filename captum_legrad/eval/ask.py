"""``captum-legrad explain PHOTO --model hf:VLM --ask QUESTION``: which image regions each
word of a vision-language model's answer came from (:mod:`captum_legrad.scores.vlm`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from .files import OutputFolder, atomic_path, unique_name
from .models import ModelError

__all__ = [
    "load_vlm",
    "vlm_model",
    "vlm_prompt",
    "AskExplanation",
    "compute_ask",
    "save_ask",
    "ask_photos",
    "ask_video",
    "takes_video",
]

#: Frames read from a clip for ``--ask`` when the video processor names no count.
VIDEO_FRAMES = 8


def vlm_model(spec: str) -> bool:
    """Whether ``spec`` names a Hugging Face vision-language model (one
    ``AutoModelForImageTextToText`` loads): ``hf:FOLDER`` by the ``model_type`` of its
    ``config.json``, ``hf:ORG/NAME`` by its configuration when transformers can read it
    (cached, or the hub reachable); nothing else is loaded.

    Args:
        spec (str): A ``--model`` value.

    Returns:
        True for a vision-language model, else False (an image or media model, a name
        that cannot be resolved: the other loaders report it).
    """
    import json

    prefix, _, name = spec.partition(":")
    if prefix != "hf" or not name:
        return False
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as names,
        )
    except ImportError:
        return False
    config = Path(name) / "config.json"
    if Path(name).is_dir():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type", "")
        except (OSError, ValueError, AttributeError):
            return False
        return str(model_type) in names
    try:
        import transformers

        from .models import quiet_libraries

        with quiet_libraries():
            found = transformers.AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError, ImportError):  # not cached offline, not a model
        return False
    return str(getattr(found, "model_type", "")) in names


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


@dataclass
class AskExplanation:
    """A vision-language model's answer about one photo or video with its maps and figure,
    nothing written yet (:func:`compute_ask`; :func:`save_ask` writes them).

    Attributes:
        file: The photo or video.
        question: The question asked.
        result: :class:`~captum_legrad.scores.vlm.AnswerExplanation`: the answer's tokens,
            one map per token (``(T, H, W)``, or ``(T, F, H, W)`` for a video) and the
            whole-answer map.
        figure: The figure ``--ask`` writes: one overlay per token and the whole answer
            (:func:`~captum_legrad.viz.plot_answer`), or a frame strip per token and one
            for the whole answer (:func:`~captum_legrad.viz.plot_video`).
        clip: The frames read from a video (None for a photo).
        on_original: The maps lie on the original photo (families described by views),
            not on the processed image.
        mean, std: The processor's normalisation of ``result.pixel_values`` (None when the
            maps lie on the original photo or video).
        logits: Each answer token's logit (the score LeGrad explains), when computed.
        probabilities: Each answer token's probability (softmax over the vocabulary at
            the position that predicts it), when computed.
    """

    file: Path
    question: str
    result: Any
    figure: Any
    clip: Any = None
    on_original: bool = True
    mean: Any = None
    std: Any = None
    logits: Optional[List[float]] = None
    probabilities: Optional[List[float]] = None

    @property
    def video(self) -> bool:
        """Whether a video was explained."""
        return self.clip is not None


def compute_ask(
    model: Any,
    processor: Any,
    path: Path,
    question: str,
    *,
    video: bool = False,
    answer: Optional[str] = None,
    max_new_tokens: int = 32,
    layers: Optional[Sequence[int]] = None,
    num_frames: Optional[int] = None,
    scores: bool = False,
) -> AskExplanation:
    r"""Answer ``question`` about the photo (or, with ``video``, the clip) at ``path`` and
    compute one map per answer token and the figure, without writing anything (the
    explorer shows them; :func:`save_ask` writes them).

    A photo's maps lie on the original photo for the families described by views (Qwen-VL,
    LLaVA-NeXT, Idefics3, ...: every tile and view placed back), else on the processed
    image. A clip's frames are sampled uniformly (:func:`~captum_legrad.eval.media.read_video`,
    the video processor's ``num_frames`` or :data:`VIDEO_FRAMES`); its maps are
    ``(T, F, H, W)``: per token, per frame, on the frames.

    Args:
        model (Any): The vision-language model (:func:`load_vlm`).
        processor (Any): Its processor.
        path (Path): The photo or video file.
        question (str): The question (put in the processor's chat template,
                    :func:`vlm_prompt`).
        video (bool, optional): ``path`` is a video. Default: False
        answer (str, optional): The answer to explain; None: the model's greedy answer.
        max_new_tokens (int, optional): Longest generated answer. Default: 32
        layers (Sequence[int], optional): Decoder layers. Default: None (all)
        num_frames (int, optional): Frames read from a video. Default: None (the video
                    processor's, else :data:`VIDEO_FRAMES`)
        scores (bool, optional): Also compute each token's logit and probability
                    (:meth:`~captum_legrad.AnswerLogits.vocabulary_logits`, one more
                    forward). Default: False

    Returns:
        :class:`AskExplanation`.

    Raises:
        ModelError: a video with a model that answers about images only, or a model
            :func:`~captum_legrad.explain_answer` refuses (one line).
        MediaError: the file is no readable image or video.

    Examples::

        >>> model, processor = load_vlm("hf:qwen2-vl-2b")
        >>> explained = compute_ask(model, processor, Path("cat.png"), "What is this?")
        >>> explained.result.tokens, explained.result.maps.shape
    """
    import numpy as np

    from .. import viz
    from .media import MediaError, read_video

    path = Path(path)
    if video:
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
        media: Any = np.stack(clip.frames)
        prompt = vlm_prompt(processor, question, video=True)
    else:
        from PIL import Image, UnidentifiedImageError

        clip = None
        try:
            with Image.open(path) as handle:
                media = handle.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise MediaError(f"cannot read image {path.name}: not an image Pillow reads") from error
        prompt = vlm_prompt(processor, question)
    result = _explained(
        model,
        processor,
        media,
        prompt,
        answer=answer,
        max_new_tokens=max_new_tokens,
        layers=layers,
        scores=scores,
    )
    title = f"{question} → {result.text}"
    mean = std = None
    on_original = video or _on_original(model)
    if not on_original:  # the maps are on the processed, normalised image
        image_processor = getattr(processor, "image_processor", None)
        mean = getattr(image_processor, "image_mean", None)
        std = getattr(image_processor, "image_std", None)
    if clip is not None:
        import torch

        rows = torch.cat([result.maps, result.answer_map.unsqueeze(0)])
        figure = viz.plot_video(
            result.pixel_values,
            rows,
            [*result.tokens, "whole answer"],
            times=clip.times,
            indices=clip.indices,
            vmin=0.0,
            vmax=1.0,
            title=title,
        )
    else:
        figure = viz.plot_answer(
            result.pixel_values[0],
            result.maps,
            result.tokens,
            answer_map=result.answer_map,
            mean=mean,
            std=std,
            title=title,
        )
    explained = AskExplanation(
        path, question, result, figure, clip, on_original=on_original, mean=mean, std=std
    )
    if result.logits is not None and result.probabilities is not None:
        explained.logits = [float(v) for v in result.logits]
        explained.probabilities = [float(v) for v in result.probabilities]
    return explained


def save_ask(
    explained: AskExplanation,
    out: OutputFolder,
    *,
    fmt: str = "png",
    taken: Optional[set] = None,
    animation: str = "none",
) -> List[Path]:
    r"""Write what :func:`compute_ask` computed, as ``explain --ask`` writes it:
    ``<file>_answer.npy`` (float32 maps, ``(T, H, W)`` or ``(T, F, H, W)``) and the figure
    ``<file>_answer.<fmt>``; for a video with ``animation="gif"`` (or ``"mp4"``) also one
    animated overlay per answer token, ``<file>_answer_<j>_<token>_anim.gif``. All or
    nothing: on an error the files written so far are removed.

    Args:
        explained (AskExplanation): From :func:`compute_ask`.
        out (OutputFolder): Where to write.
        fmt (str, optional): Figure format. Default: "png"
        taken (set, optional): File names already used in ``out`` (lower case), updated.
        animation (str, optional): ``"none"``, ``"gif"`` or ``"mp4"`` (video only).
                    Default: "none"

    Returns:
        The files written, in order (the maps, the figure, the animations).
    """
    import numpy as np

    from .. import viz
    from .explain import safe_name
    from .explain_media import _all_or_nothing

    taken = set() if taken is None else taken
    result = explained.result
    stem = unique_name(f"{explained.file.stem}_answer", taken)
    written: List[Path] = []
    with _all_or_nothing(out):
        written.append(out.save_npy(f"{stem}.npy", result.maps.numpy().astype(np.float32)))
        written.append(out.save_figure(f"{stem}.{fmt}", explained.figure))
        if explained.clip is not None and animation != "none":
            for j, (token, amap) in enumerate(zip(result.tokens, result.maps), start=1):
                name = unique_name(f"{stem}_{j}_{safe_name(token.strip())}_anim", taken)
                target = out.file(f"{name}.{animation}")
                with atomic_path(target) as temporary:
                    viz.animate_video(
                        result.pixel_values,
                        amap,
                        temporary,
                        times=explained.clip.times,
                        indices=explained.clip.indices,
                        format=animation,
                    )
                out.written.append(target)
                written.append(target)
    return written


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
    processed image (:func:`compute_ask`, then :func:`save_ask`); returns (photo, answer)."""
    results = []
    taken: set = set()
    for path in files:
        explained = compute_ask(
            model,
            processor,
            path,
            question,
            answer=answer,
            max_new_tokens=max_new_tokens,
            layers=layers,
        )
        save_ask(explained, out, fmt=fmt, taken=taken)
        results.append((path, str(explained.result.text)))
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
    maps (``.npy``, ``(T, F, H, W)``: per token, per frame, on the frames); returns the answer
    (:func:`compute_ask`, then :func:`save_ask`).

    Raises:
        ModelError: the model answers about images only (one line).
        MediaError: the file is no readable video.
    """
    explained = compute_ask(
        model,
        processor,
        path,
        question,
        video=True,
        answer=answer,
        max_new_tokens=max_new_tokens,
        layers=layers,
        num_frames=num_frames,
    )
    save_ask(explained, out, fmt=fmt)
    return str(explained.result.text)
