"""Reading video and audio files for the command line, with PyAV (the ``media`` extra).

A video is decoded into the frames a video classifier takes: ``num_frames`` RGB frames
(the model config's ``num_frames``) sampled uniformly over the whole clip, as the Hugging
Face examples for VideoMAE, ViViT and TimeSformer sample them (``np.linspace(0, n - 1,
num_frames)``, rounded); a clip with fewer frames than that repeats frames. The frames go
to the model's own image processor unchanged (it resizes, crops and normalises them).

An audio file is decoded, mixed down to mono and resampled to the feature extractor's
sampling rate with PyAV's :class:`av.AudioResampler` (FFmpeg's swresample), as a float32
waveform in [-1, 1]; the model's feature extractor (``ASTFeatureExtractor``) then builds the
spectrogram.

Every problem with a file (missing, not a video or audio file, corrupt, no frames or no
samples, a sample rate that cannot be resampled) raises :class:`MediaError` with one line
naming the file, before anything is written. PyAV is imported when a file is read, not
when this module is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Type

import numpy as np

__all__ = [
    "MediaError",
    "VIDEO_EXTENSIONS",
    "AUDIO_EXTENSIONS",
    "Video",
    "Audio",
    "media_kind",
    "sample_indices",
    "read_video",
    "read_audio",
    "check_media",
]

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ogv")
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aiff")

#: Source sample rates PyAV's resampler is asked to convert (Hz); others are refused.
RESAMPLE_RANGE = (1000, 768000)


class MediaError(ValueError):
    """A video or audio file that cannot be used; the message is one line."""


def _av() -> Any:
    try:
        import av
    except ImportError as error:
        raise MediaError(
            "reading video and audio needs PyAV: pip install 'captum-legrad[media]' "
            "(or pip install av)"
        ) from error
    return av


def _reason(error: BaseException) -> str:
    """FFmpeg's own words (``strerror``), without its error number and the path."""
    text = getattr(error, "strerror", None) or str(error)
    text = " ".join(str(text).split())
    return text[:200] or type(error).__name__


def _decode_errors(av: Any) -> Tuple[Type[BaseException], ...]:
    return (av.error.FFmpegError, OSError, ValueError, EOFError, RuntimeError)


@dataclass
class Video:
    """Frames sampled from a video file.

    Attributes:
        frames: ``num_frames`` RGB frames, each ``(h, w, 3)`` uint8.
        indices: Each frame's index in the clip (0-based; repeated for short clips).
        times: Each frame's time in seconds.
        fps: The clip's frame rate (frames per second), 0.0 if unknown.
        total: The number of frames in the clip.
    """

    frames: List[np.ndarray]
    indices: List[int]
    times: List[float]
    fps: float
    total: int

    @property
    def size(self) -> Tuple[int, int]:
        """``(h, w)`` of the frames."""
        return int(self.frames[0].shape[0]), int(self.frames[0].shape[1])


@dataclass
class Audio:
    """A mono waveform resampled for a model.

    Attributes:
        waveform: ``(samples,)`` float32 in [-1, 1].
        sampling_rate: Its rate in Hz (the feature extractor's).
        source_rate: The file's own rate in Hz.
    """

    waveform: np.ndarray
    sampling_rate: int
    source_rate: int

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self.waveform) / float(self.sampling_rate)


def _probe(path: Path) -> Optional[str]:
    """``"video"`` or ``"audio"`` from the streams of a file PyAV can open, else None."""
    try:
        av = _av()
    except MediaError:
        return None
    try:
        with av.open(str(path)) as container:
            if container.streams.video:
                return "video"
            if container.streams.audio:
                return "audio"
    except _decode_errors(av):
        return None
    return None


def media_kind(path: Path, image_extensions: Sequence[str] = ()) -> Optional[str]:
    """Whether ``path`` is a video or audio file: ``"video"``, ``"audio"`` or None.

    The extension decides (:data:`VIDEO_EXTENSIONS`, :data:`AUDIO_EXTENSIONS`); a file with
    another extension that is not an image extension is probed with PyAV (a file with a
    video stream is a video, one with only audio streams is audio). Folders are None; a
    missing file with a video or audio extension is that kind (its reader then says it is
    missing).

    Args:
        path (Path): The file.
        image_extensions (Sequence[str], optional): Extensions never probed.
                    Default: ()

    Returns:
        *str* or None.
    """
    path = Path(path)
    if path.is_dir():
        return None
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return "video"  # also when missing: its reader says so
    if suffix in AUDIO_EXTENSIONS:
        return "audio"
    if suffix in image_extensions or not path.is_file():
        return None
    return _probe(path)


def sample_indices(total: int, num_frames: int) -> List[int]:
    """``num_frames`` frame indices spread uniformly over ``total`` frames (first and last
    included): ``round(linspace(0, total - 1, num_frames))``.

    Examples::

        >>> sample_indices(8, 4)
        [0, 2, 5, 7]
        >>> sample_indices(2, 4)
        [0, 0, 1, 1]
    """
    if total < 1 or num_frames < 1:
        raise ValueError(f"need at least one frame, got total={total}, num_frames={num_frames}")
    return [int(i) for i in np.rint(np.linspace(0, total - 1, num_frames))]


def _count_frames(av: Any, path: Path) -> int:
    """Video frames in the file: its packets with data (no decoding)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def read_video(path: Path, num_frames: int) -> Video:
    r"""Decode ``num_frames`` RGB frames sampled uniformly over a video file.

    Args:
        path (Path): The video (any container and codec FFmpeg decodes).
        num_frames (int): How many frames the model takes (its config's ``num_frames``).

    Returns:
        :class:`Video`.

    Raises:
        MediaError: The file is missing, no video, corrupt, or has no frames.

    Examples::

        >>> from captum_legrad.eval.media import read_video
        >>> video = read_video(Path("clip.mp4"), num_frames=16)
        >>> inputs = processor(video.frames, return_tensors="pt")
    """
    path = Path(path)
    av = _av()
    if not path.is_file():
        raise MediaError(f"no such video file: {path}")
    if num_frames < 1:
        raise MediaError(f"num_frames must be at least 1, got {num_frames}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(
                    f"cannot read video {path}: no video stream in it (not a video, or the "
                    "file is damaged)"
                )
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
        total = _count_frames(av, path)
        for _ in range(2):  # a second pass if fewer frames decode than packets were counted
            if total < 1:
                raise MediaError(f"cannot read video {path}: it has no frames")
            wanted = sample_indices(total, num_frames)
            keep = set(wanted)
            found: dict = {}
            decoded = 0
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                for index, frame in enumerate(container.decode(stream)):
                    decoded = index + 1
                    if index in keep:
                        time = frame.time if frame.time is not None else index / (fps or 1.0)
                        found[index] = (frame.to_ndarray(format="rgb24"), float(time))
            if decoded >= total or decoded == 0:
                break
            total = decoded
    except MediaError:
        raise
    except _decode_errors(av) as error:
        raise MediaError(f"cannot read video {path}: {_reason(error)}") from error
    missing = [i for i in wanted if i not in found]
    if missing:
        raise MediaError(f"cannot read video {path}: frame {missing[0]} does not decode")
    return Video(
        frames=[found[i][0] for i in wanted],
        indices=wanted,
        times=[found[i][1] for i in wanted],
        fps=fps,
        total=total,
    )


def read_audio(path: Path, sampling_rate: int) -> Audio:
    r"""Decode an audio file to a mono float32 waveform at ``sampling_rate``.

    Channels are mixed down to mono and the audio is resampled with PyAV's
    ``AudioResampler`` (FFmpeg's swresample).

    Args:
        path (Path): The audio file (WAV, FLAC, MP3, ... or a video's sound track).
        sampling_rate (int): The rate the model's feature extractor expects (Hz).

    Returns:
        :class:`Audio`.

    Raises:
        MediaError: The file is missing, has no audio, is corrupt, has no samples, or a
            sample rate outside :data:`RESAMPLE_RANGE`.

    Examples::

        >>> from captum_legrad.eval.media import read_audio
        >>> audio = read_audio(Path("sound.wav"), extractor.sampling_rate)
        >>> inputs = extractor(audio.waveform, sampling_rate=audio.sampling_rate,
        ...                    return_tensors="pt")
    """
    path = Path(path)
    av = _av()
    if not path.is_file():
        raise MediaError(f"no such audio file: {path}")
    low, high = RESAMPLE_RANGE
    if not low <= int(sampling_rate) <= high:
        raise MediaError(
            f"the model expects audio at {sampling_rate} Hz, outside what can be resampled "
            f"({low}–{high} Hz)"
        )
    chunks: List[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(
                    f"cannot read audio {path}: no audio stream in it (not an audio file, or "
                    "the file is damaged)"
                )
            stream = container.streams.audio[0]
            source = int(stream.rate or stream.sample_rate or 0)
            if not low <= source <= high:
                raise MediaError(
                    f"cannot read audio {path}: its sample rate {source} Hz cannot be "
                    f"resampled to {sampling_rate} Hz (supported: {low}–{high} Hz)"
                )
            resampler = av.AudioResampler(format="flt", layout="mono", rate=int(sampling_rate))
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except MediaError:
        raise
    except _decode_errors(av) as error:
        raise MediaError(f"cannot read audio {path}: {_reason(error)}") from error
    waveform = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if waveform.size == 0:
        raise MediaError(f"cannot read audio {path}: it has no samples (zero length)")
    if not np.isfinite(waveform).all():
        raise MediaError(f"cannot read audio {path}: it decodes to non-finite samples")
    return Audio(waveform=waveform, sampling_rate=int(sampling_rate), source_rate=source)


def check_media(path: Path, kind: str) -> None:
    """Check, cheaply, that a file is a readable video or audio file, before a model is
    loaded: its stream is there, a first video frame decodes, or the audio has a sample
    rate that can be resampled and a first sample.

    Args:
        path (Path): The file.
        kind (str): ``"video"`` or ``"audio"``.

    Raises:
        MediaError: As :func:`read_video` and :func:`read_audio` would.
    """
    path = Path(path)
    av = _av()
    if not path.is_file():
        raise MediaError(f"no such {kind} file: {path}")
    low, high = RESAMPLE_RANGE
    try:
        with av.open(str(path)) as container:
            streams = container.streams.video if kind == "video" else container.streams.audio
            if not streams:
                other = "a video" if kind == "video" else "an audio file"
                raise MediaError(
                    f"cannot read {kind} {path}: no {kind} stream in it (not {other}, or the "
                    "file is damaged)"
                )
            stream = streams[0]
            if kind == "audio":
                source = int(stream.rate or stream.sample_rate or 0)
                if not low <= source <= high:
                    raise MediaError(
                        f"cannot read audio {path}: its sample rate {source} Hz cannot be "
                        f"resampled (supported: {low}–{high} Hz)"
                    )
            for frame in container.decode(stream):
                if kind == "video" or frame.samples > 0:
                    return
    except MediaError:
        raise
    except _decode_errors(av) as error:
        raise MediaError(f"cannot read {kind} {path}: {_reason(error)}") from error
    if kind == "video":
        raise MediaError(f"cannot read video {path}: it has no frames")
    raise MediaError(f"cannot read audio {path}: it has no samples (zero length)")
