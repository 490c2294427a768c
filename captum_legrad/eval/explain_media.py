"""``captum-legrad explain`` for a video or an audio file: LeGrad maps on the frames or on
the spectrogram.

For a video (``clip.mp4``):

1. the model's ``num_frames`` frames are sampled uniformly over the clip
   (:func:`~captum_legrad.eval.media.read_video`) and given to the model's own image (or
   video) processor, which resizes, crops and normalises them into ``(1, T, C, H, W)``;
2. the targets are the given classes (indices or names) or the model's ``top_k``
   predicted classes;
3. :meth:`LeGrad.attribute_multi <captum_legrad.LeGrad.attribute_multi>` gives one map per
   target in the model's input layout (``output="input"``, min-max normalised over all
   frames together);
4. written: ``<clip>_<target>.npy`` (float32 ``(T, H, W)``, one map per model frame, on the
   processed frames), one figure ``<clip>.<format>`` (a strip of the frames, one row per
   target, :func:`~captum_legrad.viz.plot_video`) and one animation per target,
   ``<clip>_<target>.gif`` (or ``.mp4``, :func:`~captum_legrad.viz.animate_video`).

For an audio file (``sound.wav``): the waveform is resampled to the feature extractor's
rate (:func:`~captum_legrad.eval.media.read_audio`), the extractor builds the spectrogram
``(1, time, mel)``, and the maps are written as ``<sound>_<target>.npy`` (float32
``(time, mel)``, the spectrogram's layout) and drawn over the spectrogram in
``<sound>.<format>`` (:func:`~captum_legrad.viz.plot_spectrogram`, time in seconds,
frequency in Hz on the mel axis, the padding after the sound hatched).

Everything is computed before the first file is written, and every file is written
atomically, so a bad file or a failing model leaves nothing behind.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .explain import ExplainError, resolve_target, safe_name
from .files import OutputFolder, atomic_path, unique_name
from .media import Audio, Video, read_audio, read_video
from .models import ModelError, hub_unreachable, import_extra, one_line, quiet_libraries

__all__ = [
    "MediaModel",
    "MediaResult",
    "VIDEO_MODEL_TYPES",
    "AUDIO_MODEL_TYPES",
    "ANIMATIONS",
    "MediaExplanation",
    "load_media_model",
    "media_model_kind",
    "compute_media",
    "save_media",
    "explain_media",
    "media_summary",
]

#: HF ``model_type`` of the video classifiers → the name of their main input.
VIDEO_MODEL_TYPES: Dict[str, str] = {
    "videomae": "pixel_values",
    "vivit": "pixel_values",
    "timesformer": "pixel_values",
    "vjepa2": "pixel_values_videos",
}
#: HF ``model_type`` of the audio classifiers → the name of their main input.
AUDIO_MODEL_TYPES: Dict[str, str] = {"audio-spectrogram-transformer": "input_values"}
#: ``--animation`` choices.
ANIMATIONS = ("gif", "mp4", "none")


@dataclass
class MediaModel:
    """A video or audio classifier ready for explanation.

    Attributes:
        model: Scores ``(B, K)`` from the main input (``(B, T, C, H, W)`` video or
                    ``(B, time, mel)`` spectrogram).
        kind: ``"video"`` or ``"audio"``.
        prepare: A :class:`~captum_legrad.eval.media.Video` or
                    :class:`~captum_legrad.eval.media.Audio` → the model's input, batch 1
                    (the model's own processor).
        classes: Class names, when known.
        num_frames: Frames the video model takes.
        sampling_rate: The rate the audio model's feature extractor expects (Hz).
        hop_length: Samples between spectrogram frames (audio).
        window: Spectrogram frames the extractor pads or cuts to (audio), 0 if none.
        mean, std: The processor's normalisation (to draw the frames).
        spec: A :class:`~captum_legrad.ViTSpec` for a model discovery does not know.
        multilabel: The classes are independent (sigmoid) rather than exclusive (softmax).
        weights: Where the weights came from, in words.
        random_init: The weights are random.
        num_classes: The model's number of classes (0: not known before a forward pass).
    """

    model: nn.Module
    kind: str
    prepare: Callable[[Union[Video, Audio]], Tensor]
    classes: Optional[List[str]] = None
    num_frames: int = 16
    sampling_rate: int = 16000
    hop_length: int = 160
    window: int = 0
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    spec: Any = None
    multilabel: bool = False
    weights: str = ""
    random_init: bool = False
    num_classes: int = 0


@dataclass
class MediaResult:
    """What was explained in one video or audio file and where it was written.

    Attributes:
        file: The video or audio file.
        kind: ``"video"`` or ``"audio"``.
        targets: The explained class indices.
        names: Their class names.
        scores: The model's probabilities.
        files: The files written.
        notes: What the reader should know (frames sampled, audio cut), one line each.
    """

    file: Path
    kind: str
    targets: List[int]
    names: List[str]
    scores: List[float]
    files: List[Path] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


class _Logits(nn.Module):
    """An HF video or audio classifier returning its logits from its main input."""

    def __init__(self, model: nn.Module, input_name: str) -> None:
        super().__init__()
        self.model = model
        self.input_name = input_name

    def forward(self, inputs: Tensor) -> Tensor:
        logits: Tensor = self.model(**{self.input_name: inputs}).logits
        return logits


@contextlib.contextmanager
def _no_progress_bars(transformers: Any) -> Iterator[None]:
    """transformers' "Loading weights" bars off while the model loads (the command prints
    one line on an error), on again after if they were on."""
    logging: Any = getattr(getattr(transformers, "utils", None), "logging", None)
    enabled = getattr(logging, "is_progress_bar_enabled", None)
    was_on = bool(enabled()) if callable(enabled) else False
    if was_on:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()


def media_model_kind(spec: str) -> Optional[str]:
    """``"video"`` or ``"audio"`` when ``spec`` names a local Hugging Face folder
    (``hf:FOLDER``) holding a video or audio classifier LeGrad explains, else None (a hub
    name or an image model: the image path loads it).

    Args:
        spec (str): A ``--model`` value.

    Returns:
        ``"video"``, ``"audio"`` or None.
    """
    prefix, _, name = spec.partition(":")
    config = Path(name) / "config.json"
    if prefix != "hf" or not name or not config.is_file():
        return None
    import json

    try:
        model_type = str(json.loads(config.read_text(encoding="utf-8")).get("model_type", ""))
    except (OSError, ValueError, AttributeError):
        return None
    if model_type in VIDEO_MODEL_TYPES:
        return "video"
    if model_type in AUDIO_MODEL_TYPES:
        return "audio"
    return None


def load_media_model(spec: str, kind: str, random_weights: bool = False) -> MediaModel:
    r"""An HF video or audio classifier and its own processor, from ``hf:FOLDER`` or
    ``hf:ORG/NAME``.

    Video models (VideoMAE, ViViT, TimeSformer, V-JEPA 2) are loaded with
    ``AutoModelForVideoClassification`` and ``AutoImageProcessor`` (V-JEPA 2:
    ``AutoVideoProcessor``); the number of frames is the config's ``num_frames``
    (``frames_per_clip``). The Audio Spectrogram Transformer is loaded with
    ``AutoModelForAudioClassification`` and ``AutoFeatureExtractor``.

    Args:
        spec (str): ``hf:FOLDER`` (``save_pretrained``) or ``hf:ORG/NAME``.
        kind (str): ``"video"`` or ``"audio"``: the file to explain.
        random_weights (bool, optional): Random weights (the config only).
                    Default: False

    Returns:
        :class:`MediaModel`.

    Raises:
        ModelError: Not an ``hf:`` model, a model of the other kind, no processor, or
            weights that cannot be loaded; one line.
    """
    prefix, _, name = spec.partition(":")
    if prefix != "hf" or not name:
        raise ModelError(
            f"a {kind} file needs a Hugging Face {kind} classifier: --model hf:FOLDER or "
            "hf:ORG/NAME (video: VideoMAE, ViViT, TimeSformer, V-JEPA 2; audio: AST), got "
            f"{spec!r}"
        )
    path = Path(name)
    local = path.is_dir()
    transformers = import_extra("transformers", "transformers")
    source = str(path) if local else name
    how = "save it with save_pretrained where the hub is reachable and pass hf:FOLDER"
    try:
        with quiet_libraries():
            config = transformers.AutoConfig.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as error:
        if local:
            raise ModelError(
                f"cannot read the model folder {path}: {one_line(str(error))}"
            ) from error
        raise hub_unreachable(f"hf:{name}", error, how) from error
    model_type = str(getattr(config, "model_type", ""))
    types = VIDEO_MODEL_TYPES if kind == "video" else AUDIO_MODEL_TYPES
    if model_type not in types:
        known = ", ".join(sorted(types))
        other = "audio" if kind == "video" else "video"
        what = (
            f"a {other} model"
            if model_type in (AUDIO_MODEL_TYPES if kind == "video" else VIDEO_MODEL_TYPES)
            else "not a video or audio classifier LeGrad explains"
        )
        raise ModelError(
            f"hf:{name} is {model_type or 'unknown'} ({what}); a {kind} file needs one of: {known}"
        )
    input_name = types[model_type]
    try:
        with quiet_libraries(), _no_progress_bars(transformers):
            if kind == "video":
                loader = transformers.AutoModelForVideoClassification
                processor_class = (
                    transformers.AutoVideoProcessor
                    if model_type == "vjepa2"
                    else transformers.AutoImageProcessor
                )
            else:
                loader = transformers.AutoModelForAudioClassification
                processor_class = transformers.AutoFeatureExtractor
            if random_weights:
                model = loader.from_config(config).eval()
            else:
                model = loader.from_pretrained(source, local_files_only=local).eval()
            try:
                processor = processor_class.from_pretrained(source, local_files_only=local)
            except (OSError, ValueError) as error:
                part = "image/video processor" if kind == "video" else "feature extractor"
                raise ModelError(
                    f"hf:{name} has no {part}"
                    f" ({one_line(str(error), 120)}); save it with processor.save_pretrained "
                    "into the model folder"
                ) from error
    except OSError as error:
        if local:
            raise ModelError(
                f"cannot read the model folder {path}: {one_line(str(error))}"
            ) from error
        raise hub_unreachable(f"hf:{name}", error, how) from error
    labels = getattr(config, "id2label", None) or {}
    multilabel = getattr(config, "problem_type", None) == "multi_label_classification"
    weights = (
        "random (--random-weights)"
        if random_weights
        else (f"folder {path}" if local else "pretrained (Hugging Face hub)")
    )
    common: Dict[str, Any] = dict(
        model=_Logits(model, input_name).eval(),
        kind=kind,
        classes=[labels[i] for i in sorted(labels)] if labels else None,
        multilabel=multilabel,
        weights=weights,
        random_init=random_weights,
        num_classes=int(getattr(config, "num_labels", 0) or len(labels)),
    )
    if kind == "video":
        frames = int(
            getattr(config, "num_frames", None) or getattr(config, "frames_per_clip", None) or 16
        )

        def prepare_video(media: Union[Video, Audio]) -> Tensor:
            assert isinstance(media, Video)
            if model_type == "vjepa2":
                batch = processor(videos=[media.frames], return_tensors="pt")
            else:
                batch = processor(media.frames, return_tensors="pt")
            pixels: Tensor = batch[input_name]
            return pixels

        return MediaModel(
            prepare=prepare_video,
            num_frames=frames,
            mean=getattr(processor, "image_mean", None),
            std=getattr(processor, "image_std", None),
            **common,
        )
    rate = int(getattr(processor, "sampling_rate", 16000))

    def prepare_audio(media: Union[Video, Audio]) -> Tensor:
        assert isinstance(media, Audio)
        batch = processor(media.waveform, sampling_rate=media.sampling_rate, return_tensors="pt")
        values: Tensor = batch[input_name]
        return values

    return MediaModel(
        prepare=prepare_audio,
        sampling_rate=rate,
        hop_length=max(rate // 100, 1),  # Kaldi fbank: 10 ms frame shift
        window=int(getattr(processor, "max_length", 0) or 0),
        **common,
    )


@contextlib.contextmanager
def _all_or_nothing(out: OutputFolder) -> Iterator[None]:
    """Remove the files written in the block if it fails (each is written atomically)."""
    before = len(out.written)
    try:
        yield
    except BaseException:
        for written in out.written[before:]:
            written.unlink(missing_ok=True)
        del out.written[before:]
        raise


def _scores(raw: Tensor, multilabel: bool) -> Tensor:
    return raw.sigmoid() if multilabel else raw.softmax(dim=-1)


@dataclass
class MediaExplanation:
    """LeGrad maps and the figure for one video or audio file, nothing written yet
    (:func:`compute_media`; :func:`save_media` writes them).

    Attributes:
        result: What was explained (its ``files`` still empty).
        media: The frames or the waveform read from the file.
        inputs: The model's input, batch 1: ``(1, T, C, H, W)`` or ``(1, time, mel)``.
        maps: One map per target: ``(K, T, H, W)`` on the processed frames (video) or
            ``(K, time, mel)`` on the spectrogram (audio), min-max normalised.
        figure: The frame strip (:func:`~captum_legrad.viz.plot_video`) or the spectrogram
            figure (:func:`~captum_legrad.viz.plot_spectrogram`), one row per target.
        mean, std: The processor's normalisation (to draw the frames).
    """

    result: MediaResult
    media: Union[Video, Audio]
    inputs: Tensor
    maps: Tensor
    figure: Any
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None


def compute_media(
    loaded: MediaModel,
    path: Path,
    *,
    targets: Optional[Sequence[str]] = None,
    top_k: int = 1,
    labels: Optional[Sequence[str]] = None,
    layers: Optional[Sequence[int]] = None,
    device: Optional[torch.device] = None,
    warn: Callable[[str], None] = lambda message: None,
) -> MediaExplanation:
    r"""Read one video or audio file, run the model's processor and compute LeGrad's maps
    and the figure, without writing anything (the explorer shows them; :func:`explain_media`
    writes them).

    Args:
        loaded (MediaModel): The model (:func:`load_media_model`).
        path (Path): The video or audio file.
        targets (Sequence[str], optional): Class indices or names (``--target``).
                    Default: None (the ``top_k`` predicted classes)
        top_k (int, optional): Without targets, explain this many classes.
                    Default: 1
        labels (Sequence[str], optional): Class names replacing the model's.
                    Default: None
        layers (Sequence[int], optional): LeGrad's blocks.
                    Default: None (all)
        device (torch.device, optional): Where to run.
                    Default: None (CPU)
        warn (callable, optional): Called with each warning (one line).

    Returns:
        :class:`MediaExplanation`.

    Raises:
        MediaError: The file cannot be read (see :mod:`captum_legrad.eval.media`).
        ExplainError: Bad targets or labels, or a model LeGrad cannot explain; one line.

    Examples::

        >>> loaded = load_media_model("hf:videomae-kinetics", "video")
        >>> explained = compute_media(loaded, Path("clip.mp4"), top_k=2)
        >>> explained.maps.shape  # (2, 16, 224, 224)
    """
    from .. import viz
    from ..attribution import LeGrad

    if top_k < 1:
        raise ExplainError(f"--top-k must be at least 1, got {top_k}")
    path = Path(path)
    media: Union[Video, Audio]
    if loaded.kind == "video":
        media = read_video(path, loaded.num_frames)
    else:
        media = read_audio(path, loaded.sampling_rate)
    try:
        x = loaded.prepare(media)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ExplainError(
            f"the model's processor cannot prepare {path.name}: {one_line(str(error))}"
        ) from error
    device = device if device is not None else torch.device("cpu")
    model = loaded.model.to(device).eval()
    x = x.to(device)
    try:
        legrad = LeGrad(model, spec=loaded.spec, layers=layers)
    except (TypeError, ValueError) as error:
        raise ExplainError(" ".join(str(error).split())) from error
    if loaded.random_init:
        warn("the model has random weights: its maps and scores show nothing learned")
    with torch.no_grad():
        raw = model(x)[0].float().cpu()
    outputs = int(raw.shape[-1])
    classes = list(labels) if labels is not None else loaded.classes
    if labels is not None and len(labels) != outputs:
        raise ExplainError(f"--labels has {len(labels)} names but the model has {outputs} outputs")
    if targets:
        chosen = [resolve_target(t, classes, outputs) for t in targets]
        doubled = sorted({t for t in chosen if chosen.count(t) > 1})
        if doubled:
            raise ExplainError(f"--target names class {doubled[0]} more than once")
    else:
        chosen = [int(i) for i in raw.topk(min(top_k, outputs)).indices]
    scores = _scores(raw, loaded.multilabel)
    names = [
        classes[t] if classes is not None and t < len(classes) else f"class {t}" for t in chosen
    ]
    result = MediaResult(
        file=path,
        kind=loaded.kind,
        targets=chosen,
        names=names,
        scores=[float(scores[t]) for t in chosen],
    )
    what = "probability (sigmoid)" if loaded.multilabel else "probability"
    row_labels = [f"{n.split(',')[0]}\n{what} {s:.3f}" for n, s in zip(names, result.scores)]
    maps = legrad.attribute_multi(x, targets=chosen, output="input")[0].float().cpu()
    inputs = x.detach().cpu()
    if isinstance(media, Video):
        frame_maps = maps.mean(2)  # (K, T, C, H, W) → (K, T, H, W): the channels are equal
        if int(frame_maps.shape[1]) != len(media.frames):
            result.notes.append(
                f"the model takes {frame_maps.shape[1]} frames; {len(media.frames)} were sampled"
            )
        distinct = len(set(media.indices))
        result.notes.append(
            f"{len(media.frames)} frames sampled uniformly from {media.total}"
            + (
                f" (the clip is shorter: {distinct} distinct)"
                if distinct < len(media.indices)
                else ""
            )
        )
        figure = viz.plot_video(
            inputs[0],
            frame_maps,
            row_labels,
            times=media.times,
            indices=media.indices,
            mean=loaded.mean,
            std=loaded.std,
            title=f"{path.name}: LeGrad ({len(media.frames)} of {media.total} frames)",
        )
        return MediaExplanation(
            result, media, inputs, frame_maps, figure, mean=loaded.mean, std=loaded.std
        )
    seen = float(x.shape[1]) * loaded.hop_length / loaded.sampling_rate
    if media.duration > seen + 1e-6:
        result.notes.append(
            f"the model sees the first {seen:.2f} s of {media.duration:.2f} s of sound"
        )
    figure = viz.plot_spectrogram(
        inputs[0],
        maps,  # (K, time, mel)
        row_labels,
        sampling_rate=loaded.sampling_rate,
        hop_length=loaded.hop_length,
        frequency="hz",
        duration=media.duration,
        title=f"{path.name}: LeGrad ({media.duration:.2f} s, resampled "
        f"{media.source_rate} → {media.sampling_rate} Hz)",
    )
    return MediaExplanation(result, media, inputs, maps, figure)


def save_media(
    explained: MediaExplanation,
    out: OutputFolder,
    *,
    animation: str = "gif",
    fmt: str = "png",
) -> List[Path]:
    r"""Write what :func:`compute_media` computed: ``<file>_<target>.npy`` per target, the
    figure ``<file>.<fmt>`` and, for a video, one animation per target
    (``<file>_<target>_anim.gif`` or ``.mp4``). All or nothing: on an error the files
    written so far are removed.

    Args:
        explained (MediaExplanation): From :func:`compute_media`; its ``result.files``
                    gets the files written.
        out (OutputFolder): Where to write.
        animation (str, optional): ``"gif"``, ``"mp4"`` or ``"none"`` (video only).
                    Default: "gif"
        fmt (str, optional): Figure format, ``png``, ``jpg`` or ``pdf``.
                    Default: "png"

    Returns:
        The files written, in order.

    Raises:
        ExplainError: An unknown ``animation``.
    """
    from .. import viz

    if animation not in ANIMATIONS:
        raise ExplainError(f"--animation must be one of {', '.join(ANIMATIONS)}, got {animation}")
    result = explained.result
    path = result.file
    base = safe_name(path.stem)
    taken: set = set()
    if path.parent.resolve() == out.path.resolve():
        taken.add(path.name.lower())
    stems = [unique_name(f"{base}_{safe_name(n.split(',')[0])}", taken) for n in result.names]
    written: List[Path] = []
    with _all_or_nothing(out):
        for stem, amap in zip(stems, explained.maps):
            written.append(out.save_npy(f"{stem}.npy", amap.numpy().astype("float32")))
        figure_name = unique_name(base, taken) + f".{fmt}"
        written.append(out.save_figure(figure_name, explained.figure, fmt))
        if result.kind == "video" and animation != "none":
            assert isinstance(explained.media, Video)
            for stem, amap in zip(stems, explained.maps):
                target = out.file(unique_name(f"{stem}_anim", taken) + f".{animation}")
                with atomic_path(target) as temporary:
                    viz.animate_video(
                        explained.inputs[0],
                        amap,
                        temporary,
                        times=explained.media.times,
                        indices=explained.media.indices,
                        format=animation,
                        mean=explained.mean,
                        std=explained.std,
                    )
                out.written.append(target)
                written.append(target)
    result.files.extend(written)
    return written


def explain_media(
    loaded: MediaModel,
    path: Path,
    out: OutputFolder,
    *,
    targets: Optional[Sequence[str]] = None,
    top_k: int = 1,
    labels: Optional[Sequence[str]] = None,
    layers: Optional[Sequence[int]] = None,
    animation: str = "gif",
    fmt: str = "png",
    device: Optional[torch.device] = None,
    warn: Callable[[str], None] = lambda message: None,
) -> MediaResult:
    r"""Explain one video or audio file and write its maps, figure and animations
    (:func:`compute_media`, then :func:`save_media`).

    Args:
        loaded (MediaModel): The model (:func:`load_media_model`).
        path (Path): The video or audio file.
        out (OutputFolder): Where to write.
        targets (Sequence[str], optional): Class indices or names (``--target``).
                    Default: None (the ``top_k`` predicted classes)
        top_k (int, optional): Without targets, explain this many classes.
                    Default: 1
        labels (Sequence[str], optional): Class names replacing the model's.
                    Default: None
        layers (Sequence[int], optional): LeGrad's blocks.
                    Default: None (all)
        animation (str, optional): ``"gif"``, ``"mp4"`` or ``"none"`` (video only).
                    Default: "gif"
        fmt (str, optional): Figure format, ``png``, ``jpg`` or ``pdf``.
                    Default: "png"
        device (torch.device, optional): Where to run.
                    Default: None (CPU)
        warn (callable, optional): Called with each warning (one line).

    Returns:
        :class:`MediaResult`.

    Raises:
        MediaError: The file cannot be read (see :mod:`captum_legrad.eval.media`).
        ExplainError: Bad targets or labels, or a model LeGrad cannot explain; one line.

    Examples::

        >>> loaded = load_media_model("hf:videomae-kinetics", "video")
        >>> result = explain_media(loaded, Path("clip.mp4"), OutputFolder(Path("out")))
    """
    if animation not in ANIMATIONS:
        raise ExplainError(f"--animation must be one of {', '.join(ANIMATIONS)}, got {animation}")
    explained = compute_media(
        loaded,
        path,
        targets=targets,
        top_k=top_k,
        labels=labels,
        layers=layers,
        device=device,
        warn=warn,
    )
    save_media(explained, out, animation=animation, fmt=fmt)
    return explained.result


def media_summary(result: MediaResult, out: Path) -> List[str]:
    """Lines for the terminal: what was explained, the notes, the files written."""
    what = "; ".join(
        f"{name.split(',')[0]} ({score:.2f})" for name, score in zip(result.names, result.scores)
    )
    lines = [f"{result.file.name}: {what} → {', '.join(p.name for p in result.files)}"]
    lines += [f"note: {note}" for note in result.notes]
    lines.append(f"wrote {len(result.files)} files to {out}")
    return lines
