"""Video and audio files: reading (PyAV), the pictures (frame strip, animation, spectrogram)
and ``captum-legrad explain clip.mp4 / sound.wav``.

Every file is made here, offline, with PyAV: an MP4 of 8 frames 32×32 at 8 fps whose frame
``i`` has a white bar at columns ``4i..4i+3`` (so a frame's index can be read back from its
pixels) and a WAV of 1 s of a 440 Hz sine at 22050 Hz. The maps of the explain pipeline are
checked against an oracle written here from the definition (per layer, ``autograd.grad`` of
the layer's score w.r.t. the attention probabilities the toy model keeps), on toy video and
spectrogram transformers described by a hand-written ViTSpec.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_not_vacuous
from torch import Tensor, nn

av = pytest.importorskip("av")
transformers = pytest.importorskip("transformers")

from captum_legrad import ViTSpec, viz  # noqa: E402
from captum_legrad.cli import main  # noqa: E402
from captum_legrad.eval import explain_media as media_explain  # noqa: E402
from captum_legrad.eval.explain_media import MediaModel, explain_media  # noqa: E402
from captum_legrad.eval.files import OutputFolder  # noqa: E402
from captum_legrad.eval.media import (  # noqa: E402
    MediaError,
    media_kind,
    read_audio,
    read_video,
    sample_indices,
)
from captum_legrad.eval.models import ModelError  # noqa: E402
from captum_legrad.spec import InputAxes  # noqa: E402

# --------------------------------------------------------------------------- files


def write_clip(path: Path, frames: int = 8, size: int = 32, fps: int = 8) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for i in range(frames):
            array = np.full((size, size, 3), 40, dtype=np.uint8)
            array[:, 4 * i : 4 * i + 4] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_wav(path: Path, rate: int = 22050, seconds: float = 1.0, hz: float = 440.0) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        t = np.arange(int(rate * seconds)) / rate
        samples = (0.5 * np.sin(2 * np.pi * hz * t) * 32767).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def raw_wav(path: Path, rate: int, samples: int) -> Path:
    """A PCM WAV written byte by byte (for headers PyAV would not write)."""
    data = np.zeros(samples, np.int16).tobytes()
    header = (
        b"RIFF"
        + struct.pack("<I", 36 + len(data))
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", len(data))
    )
    path.write_bytes(header + data)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    clip = write_clip(root / "clip.mp4")
    good = clip.read_bytes()
    corrupt = root / "corrupt.mp4"
    corrupt.write_bytes(good[:40] + bytes(range(256)) * 4)
    truncated = root / "truncated.mp4"
    truncated.write_bytes(good[: len(good) // 2])
    text = root / "notes.mp4"
    text.write_text("this is not a video\n")
    return {
        "clip": clip,
        "sound": write_wav(root / "sound.wav"),
        "corrupt": corrupt,
        "truncated": truncated,
        "text": text,
        "empty_wav": raw_wav(root / "empty.wav", 16000, 0),
        "zero_bytes": (root / "zero.wav", (root / "zero.wav").write_bytes(b""))[0],
        "rate_100": raw_wav(root / "slow.wav", 100, 100),
    }


def bar_column(frame: np.ndarray) -> int:
    return int(np.argmax(frame[..., 0].mean(0)))


# --------------------------------------------------------------------------- reading


def test_sample_indices_spread_over_the_clip() -> None:
    assert sample_indices(8, 4) == [0, 2, 5, 7]
    assert sample_indices(8, 8) == list(range(8))
    assert sample_indices(2, 4) == [0, 0, 1, 1]
    assert sample_indices(1, 3) == [0, 0, 0]
    with pytest.raises(ValueError):
        sample_indices(0, 4)


def test_a_video_is_read_as_uniformly_sampled_frames(files: Dict[str, Path]) -> None:
    video = read_video(files["clip"], 4)
    assert (video.total, video.fps, video.size) == (8, 8.0, (32, 32))
    assert video.indices == [0, 2, 5, 7]
    assert video.times == pytest.approx([0.0, 0.25, 0.625, 0.875])
    # each sampled frame is the frame its index names: its bar is at 4 * index
    assert [bar_column(f) // 4 for f in video.frames] == [0, 2, 5, 7]
    assert all(f.dtype == np.uint8 and f.shape == (32, 32, 3) for f in video.frames)
    longer = read_video(files["clip"], 16)  # more frames than the clip: frames repeat
    assert longer.indices == [i // 2 for i in range(16)]
    assert [bar_column(f) // 4 for f in longer.frames] == longer.indices


def test_audio_is_resampled_to_the_models_rate(files: Dict[str, Path]) -> None:
    audio = read_audio(files["sound"], 16000)
    assert (audio.sampling_rate, audio.source_rate) == (16000, 22050)
    assert audio.waveform.dtype == np.float32
    assert abs(len(audio.waveform) - 16000) <= 16 and audio.duration == pytest.approx(1.0, 1e-3)
    spectrum = np.abs(np.fft.rfft(audio.waveform))
    peak = np.argmax(spectrum) * 16000 / len(audio.waveform)
    assert peak == pytest.approx(440.0, abs=2.0)  # the tone survives resampling
    assert float(np.abs(audio.waveform[100:-100]).max()) == pytest.approx(0.5, abs=0.02)
    native = read_audio(files["sound"], 22050)
    assert len(native.waveform) == 22050


@pytest.mark.parametrize(
    "name, reader, message",
    [
        ("corrupt", "video", "cannot read video .*corrupt.mp4: Invalid data"),
        ("truncated", "video", "cannot read video .*truncated.mp4: "),
        ("text", "video", "cannot read video .*notes.mp4: Invalid data"),
        ("sound", "video", "no video stream"),
        ("empty_wav", "audio", "empty.wav: it has no samples"),
        ("zero_bytes", "audio", "cannot read audio .*zero.wav"),
        ("rate_100", "audio", "sample rate 100 Hz cannot be resampled to 16000 Hz"),
        ("clip", "audio", "no audio stream"),
    ],
)
def test_bad_files_raise_one_clear_error(
    files: Dict[str, Path], name: str, reader: str, message: str
) -> None:
    with pytest.raises(MediaError, match=message) as caught:
        if reader == "video":
            read_video(files[name], 4)
        else:
            read_audio(files[name], 16000)
    assert "\n" not in str(caught.value) and "Errno" not in str(caught.value)


def test_the_file_kind_comes_from_the_extension_or_the_content(
    files: Dict[str, Path], tmp_path: Path
) -> None:
    assert media_kind(files["clip"]) == "video"
    assert media_kind(files["sound"]) == "audio"
    assert media_kind(files["text"]) == "video"  # by extension: its reader then refuses it
    renamed = tmp_path / "clip.data"
    renamed.write_bytes(files["clip"].read_bytes())
    assert media_kind(renamed) == "video"  # by content
    sound = tmp_path / "sound.data"
    sound.write_bytes(files["sound"].read_bytes())
    assert media_kind(sound) == "audio"
    picture = tmp_path / "x.png"
    picture.write_bytes(b"not even a png")
    assert media_kind(picture, (".png",)) is None
    assert media_kind(tmp_path) is None
    assert media_kind(tmp_path / "missing.mp4") == "video"
    assert media_kind(tmp_path / "missing.data") is None


# --------------------------------------------------------------------------- pictures


def test_the_frame_strip_names_frames_and_times_and_shares_one_colour_scale() -> None:
    gen = torch.Generator().manual_seed(0)
    video = torch.rand(4, 3, 32, 32, generator=gen)
    maps = torch.rand(2, 4, 32, 32, generator=gen)
    maps[1] *= 3.0  # the second target's values are larger: one scale for all panels
    fig = viz.plot_video(
        video,
        maps,
        ["cat", "dog"],
        times=[0.0, 0.5, 1.0, 1.5],
        indices=[0, 4, 8, 12],
        title="clip",
    )
    *panels, bar = fig.axes
    assert len(panels) == 3 * 4  # frames row + one row per target, one column per frame
    assert [ax.get_title() for ax in panels[:4]] == [
        "frame 0\n0.00 s",
        "frame 4\n0.50 s",
        "frame 8\n1.00 s",
        "frame 12\n1.50 s",
    ]
    assert [panels[4 * r].get_ylabel() for r in range(3)] == ["frames", "cat", "dog"]
    assert bar.get_ylabel() == "LeGrad relevance"
    limits = {panel.get_images()[-1].get_clim() for panel in panels[4:]}
    assert limits == {(float(maps.min()), float(maps.max()))}
    shown = panels[4 * 2 + 3].get_images()[-1].get_array()
    np.testing.assert_allclose(np.asarray(shown), maps[1, 3].numpy(), rtol=1e-6)
    assert fig._suptitle is not None and fig._suptitle.get_text() == "clip"


def test_a_tubelet_grid_gives_each_frame_its_tubelets_map() -> None:
    gen = torch.Generator().manual_seed(1)
    video = torch.rand(1, 4, 3, 16, 16, generator=gen)  # (B=1, T, C, H, W)
    grid = torch.rand(2, 4, 4, generator=gen)  # 2 tubelets of 2 frames, 4×4 patches
    fig = viz.plot_video(video, grid, show_frames=False)
    panels = fig.axes[:-1]
    assert len(panels) == 4
    for frame, panel in enumerate(panels):
        expected = F.interpolate(
            grid[frame // 2][None, None], size=(16, 16), mode="bilinear", align_corners=False
        )[0, 0]
        np.testing.assert_allclose(
            np.asarray(panel.get_images()[-1].get_array()), expected.numpy(), rtol=1e-5
        )
    assert panels[2].get_title() == "frame 2"


def test_the_gif_has_one_frame_per_video_frame_and_the_map_colours(tmp_path: Path) -> None:
    from matplotlib import colormaps
    from PIL import Image

    video = torch.zeros(6, 3, 20, 24)  # black frames: the overlay shows the colours alone
    maps = torch.zeros(6, 20, 24)
    maps[:, :, :12] = 1.0  # left half relevant in every frame
    path = viz.animate_video(video, maps, tmp_path / "a.gif", alpha=1.0, fps=5)
    with Image.open(path) as gif:
        assert gif.n_frames == 6
        assert gif.info["loop"] == 0 and gif.info["duration"] == 200
        frame = np.asarray(gif.convert("RGB"))
    scale = math.ceil(160 / 20)
    assert frame.shape == (20 * scale + 16, 24 * scale, 3)  # enlarged, with a caption band
    hot = np.asarray(colormaps["jet"](1.0)[:3]) * 255
    cold = np.asarray(colormaps["jet"](0.0)[:3]) * 255
    np.testing.assert_allclose(frame[10, 10], hot, atol=12)
    np.testing.assert_allclose(frame[10, -10], cold, atol=12)


def test_the_mp4_animation_decodes_to_one_frame_per_video_frame(tmp_path: Path) -> None:
    video = torch.rand(5, 3, 21, 21, generator=torch.Generator().manual_seed(2))
    path = viz.animate_video(video, torch.rand(5, 21, 21), tmp_path / "a.mp4", min_size=21)
    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5
    assert frames[0].shape == (21 + 16 + 1, 22, 3)  # 21 + caption 16 → padded to even sides


def _kaldi_centre_bins(bins: int, rate: int, fmin: float) -> Tuple[np.ndarray, np.ndarray]:
    """Each mel filter's peak frequency, from transformers' own Kaldi filter bank."""
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(
        num_frequency_bins=2049,
        num_mel_filters=bins,
        min_frequency=fmin,
        max_frequency=rate / 2,
        sampling_rate=rate,
        norm=None,
        mel_scale="kaldi",
        triangularize_in_mel_space=True,
    )
    peaks = np.argmax(bank, axis=0) * (rate / 2) / 2048
    return np.arange(bins), peaks


def test_mel_bins_are_placed_where_the_feature_extractors_filters_peak() -> None:
    bins, peaks = _kaldi_centre_bins(64, 16000, 20.0)
    placed = np.array([viz.mel_bin_of(f, 64, 16000, 20.0) for f in peaks])
    np.testing.assert_allclose(placed[8:], bins[8:], atol=0.1)  # coarse FFT at the bottom
    assert viz.mel_bin_of(20.0, 64, 16000) == pytest.approx(-1.0)  # the lower edge


def test_the_spectrogram_figure_has_time_and_frequency_axes() -> None:
    gen = torch.Generator().manual_seed(3)
    spectrogram = torch.randn(1, 300, 64, generator=gen)  # (B=1, time, mel)
    maps = torch.rand(2, 300, 64, generator=gen)
    fig = viz.plot_spectrogram(
        spectrogram, maps, ["speech", "music"], frequency="hz", duration=2.0, title="s.wav"
    )
    *panels, bar = fig.axes
    assert [p.get_title() for p in panels] == ["spectrogram", "speech", "music"]
    assert panels[-1].get_xlabel() == "time (s)"
    assert {p.get_ylabel() for p in panels} == {"frequency (Hz)"}
    assert panels[0].get_xlim() == pytest.approx((0.0, 3.0))  # 300 frames × 10 ms
    labels = [t.get_text() for t in panels[1].get_yticklabels()]
    assert labels == ["100", "250", "500", "1000", "2000", "4000"]
    ticks = panels[1].get_yticks()
    assert ticks[3] == pytest.approx(viz.mel_bin_of(1000.0, 64, 16000))
    assert bar.get_ylabel() == "LeGrad relevance"
    overlay = panels[2].get_images()[-1]
    np.testing.assert_allclose(np.asarray(overlay.get_array()), maps[1].T.numpy())
    assert overlay.origin == "lower"
    assert len(panels[1].patches) == 1  # the padding after 2.0 s is hatched
    mel = viz.plot_spectrogram(spectrogram[0], maps[0])
    assert mel.axes[0].get_ylabel() == "mel bin" and mel.axes[1].get_title() == "target 0"
    with pytest.raises(ValueError, match='output="input"'):
        viz.plot_spectrogram(spectrogram, torch.rand(8, 30))


# --------------------------------------------------------------------------- toy models


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.kept: List[Tensor] = []
        self.explicit = False

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.explicit:
            probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), -1)
            self.kept.append(probs)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim, 2), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ToyVideo(nn.Module):
    """Tubelets of 2 frames × 8 × 8 pixels of ``(B, T, C, H, W)``, a CLS token, two blocks."""

    def __init__(self, dim: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Conv3d(3, dim, kernel_size=(2, 8, 8), stride=(2, 8, 8))
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.blocks = nn.ModuleList([Block(dim), Block(dim)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def tokens(self, video: Tensor) -> Tensor:
        x = self.embed(video.transpose(1, 2)).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)

    def read(self, z: Tensor) -> Tensor:
        return self.head(self.norm(z.mean(dim=1)))

    def forward(self, video: Tensor) -> Tensor:
        x = self.tokens(video)
        for block in self.blocks:
            x = block(x)
        return self.read(x)


class ToySpectrogram(nn.Module):
    """``(B, time, mel)``; 4×4 patches over (frequency, time), frequency first; one block."""

    def __init__(self, dim: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, kernel_size=4, stride=4)
        self.blocks = nn.ModuleList([Block(dim), Block(dim)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def tokens(self, spec: Tensor) -> Tensor:
        return self.embed(spec.transpose(1, 2).unsqueeze(1)).flatten(2).transpose(1, 2)

    def read(self, z: Tensor) -> Tensor:
        return self.head(self.norm(z.mean(dim=1)))

    def forward(self, spec: Tensor) -> Tensor:
        x = self.tokens(spec)
        for block in self.blocks:
            x = block(x)
        return self.read(x)


def toy_spec(model: nn.Module, video: bool) -> ViTSpec:
    blocks = tuple(model.blocks)
    return ViTSpec(
        family="toy video" if video else "toy audio",
        root=model,
        blocks=blocks,
        attentions=tuple(b.attn for b in blocks),
        readout=model.read,
        model_readout=model.read,
        num_prefix_tokens=1 if video else 0,
        patch_size=(2, 8, 8) if video else (4, 4),
        grid=(lambda t, h, w: (t // 2, h // 8, w // 8))
        if video
        else (lambda f, t: (f // 4, t // 4)),
        input_axes=InputAxes(grid=(1, 3, 4), channels=2, name="video")
        if video
        else InputAxes(grid=(2, 1), channels=None, name="spectrogram"),
    )


def oracle(model: nn.Module, x: Tensor, target: int, prefix: int) -> Tensor:
    """LeGrad from the definition: per layer ReLU(∂s_l/∂A_l) averaged over heads and
    queries, patch keys only, summed over the layers → the token grid's values."""
    for block in model.blocks:
        block.attn.explicit, block.attn.kept = True, []
    try:
        with torch.enable_grad():
            z = model.tokens(x)
            outs = []
            for block in model.blocks:
                z = block(z)
                outs.append(z)
            total = 0.0
            for block, out in zip(model.blocks, outs):
                score = model.read(out)[:, target].sum()
                (grad,) = torch.autograd.grad(score, block.attn.kept[0], retain_graph=True)
                total = total + grad.clamp(min=0).mean(dim=(1, 2))[:, prefix:]
    finally:
        for block in model.blocks:
            block.attn.explicit, block.attn.kept = False, []
    assert isinstance(total, Tensor)
    return total.detach()


def minmax(x: Tensor) -> Tensor:
    return (x - x.min()) / (x.max() - x.min())


def video_processor() -> Any:
    return transformers.VideoMAEImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )


def toy_video_model(classes: List[str]) -> MediaModel:
    torch.manual_seed(0)
    model = ToyVideo(classes=len(classes)).eval()
    processor = video_processor()
    return MediaModel(
        model=model,
        kind="video",
        prepare=lambda v: processor(v.frames, return_tensors="pt")["pixel_values"],
        classes=classes,
        num_frames=8,
        mean=processor.image_mean,
        std=processor.image_std,
        spec=toy_spec(model, video=True),
    )


def audio_extractor() -> Any:
    return transformers.ASTFeatureExtractor(num_mel_bins=16, max_length=64)


def toy_audio_model(classes: List[str]) -> MediaModel:
    torch.manual_seed(1)
    model = ToySpectrogram(classes=len(classes)).eval()
    extractor = audio_extractor()
    return MediaModel(
        model=model,
        kind="audio",
        prepare=lambda a: extractor(a.waveform, sampling_rate=a.sampling_rate, return_tensors="pt")[
            "input_values"
        ],
        classes=classes,
        sampling_rate=16000,
        hop_length=160,
        window=64,
        spec=toy_spec(model, video=False),
    )


def video_oracle(loaded: MediaModel, clip: Path, target: int) -> Tensor:
    """The (T, H, W) map on the processed frames: the tubelet grid, trilinear, min-max."""
    frames = read_video(clip, 8).frames
    x = video_processor()(frames, return_tensors="pt")["pixel_values"]
    tokens = oracle(loaded.model, x, target, prefix=1).view(1, 1, 4, 4, 4)
    assert_not_vacuous(tokens)
    up = F.interpolate(tokens, size=(8, 32, 32), mode="trilinear", align_corners=False)
    return minmax(up[0, 0])


def audio_oracle(loaded: MediaModel, sound: Path, target: int) -> Tensor:
    """The (time, mel) map on the spectrogram."""
    waveform = read_audio(sound, 16000).waveform
    x = audio_extractor()(waveform, sampling_rate=16000, return_tensors="pt")["input_values"]
    tokens = oracle(loaded.model, x, target, prefix=0).view(1, 1, 4, 16)  # (F, T) grid
    assert_not_vacuous(tokens)
    up = F.interpolate(tokens, size=(16, 64), mode="bilinear", align_corners=False)
    return minmax(up[0, 0]).T


def test_a_video_is_explained_frame_by_frame(files: Dict[str, Path], tmp_path: Path) -> None:
    loaded = toy_video_model(["a", "b", "c"])
    out = OutputFolder(tmp_path / "out")
    result = explain_media(loaded, files["clip"], out, targets=["b", "0"])
    assert result.targets == [1, 0] and result.names == ["b", "a"]
    names = sorted(p.name for p in result.files)
    assert names == ["clip.png", "clip_a.npy", "clip_a_anim.gif", "clip_b.npy", "clip_b_anim.gif"]
    for target, name in ((1, "clip_b.npy"), (0, "clip_a.npy")):
        saved = np.load(tmp_path / "out" / name)
        assert saved.shape == (8, 32, 32) and saved.dtype == np.float32
        expected = video_oracle(loaded, files["clip"], target)
        np.testing.assert_allclose(saved, expected.numpy(), rtol=1e-4, atol=1e-5)
    from PIL import Image

    with Image.open(tmp_path / "out" / "clip_b_anim.gif") as gif:
        assert gif.n_frames == 8
    assert "8 frames sampled uniformly from 8" in result.notes[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names  # no temporary files


def test_a_sound_is_explained_on_its_spectrogram(files: Dict[str, Path], tmp_path: Path) -> None:
    loaded = toy_audio_model(["hum", "tone", "noise"])
    out = OutputFolder(tmp_path / "out")
    result = explain_media(loaded, files["sound"], out, top_k=2)
    assert len(result.targets) == 2
    assert [p.suffix for p in result.files] == [".npy", ".npy", ".png"]
    for target, path in zip(result.targets, result.files):
        saved = np.load(path)
        assert saved.shape == (64, 16)  # the spectrogram's (time, mel)
        expected = audio_oracle(loaded, files["sound"], target)
        np.testing.assert_allclose(saved, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert result.notes == ["the model sees the first 0.64 s of 1.00 s of sound"]


# --------------------------------------------------------------------------- saved HF models


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    video = transformers.VideoMAEForVideoClassification(
        transformers.VideoMAEConfig(
            image_size=32,
            patch_size=8,
            num_frames=8,
            tubelet_size=2,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=3,
            id2label={0: "run", 1: "jump", 2: "sit"},
            label2id={"run": 0, "jump": 1, "sit": 2},
        )
    )
    _zero_params_random(video).save_pretrained(root / "videomae")
    video_processor().save_pretrained(root / "videomae")
    audio = transformers.ASTForAudioClassification(
        transformers.ASTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            patch_size=16,
            frequency_stride=10,
            time_stride=10,
            max_length=64,
            num_mel_bins=32,
            num_labels=3,
            id2label={0: "speech", 1: "music", 2: "dog"},
            label2id={"speech": 0, "music": 1, "dog": 2},
        )
    )
    _zero_params_random(audio, 1).save_pretrained(root / "ast")
    transformers.ASTFeatureExtractor(num_mel_bins=32, max_length=64).save_pretrained(root / "ast")
    bare = root / "bare"
    video.save_pretrained(bare)  # no processor
    return {"video": root / "videomae", "audio": root / "ast", "bare": bare}


def test_hf_video_and_audio_models_load_with_their_processors(
    hf_folders: Dict[str, Path], files: Dict[str, Path]
) -> None:
    video = media_explain.load_media_model(f"hf:{hf_folders['video']}", "video")
    assert (video.kind, video.num_frames, video.classes) == ("video", 8, ["run", "jump", "sit"])
    x = video.prepare(read_video(files["clip"], video.num_frames))
    assert x.shape == (1, 8, 3, 32, 32)
    assert video.model(x).shape == (1, 3)
    audio = media_explain.load_media_model(f"hf:{hf_folders['audio']}", "audio")
    assert (audio.sampling_rate, audio.hop_length, audio.window) == (16000, 160, 64)
    values = audio.prepare(read_audio(files["sound"], audio.sampling_rate))
    assert values.shape == (1, 64, 32)
    assert audio.model(values).shape == (1, 3)
    with pytest.raises(ModelError, match="is videomae \\(a video model\\); a audio file"):
        media_explain.load_media_model(f"hf:{hf_folders['video']}", "audio")
    with pytest.raises(ModelError, match="has no image/video processor"):
        media_explain.load_media_model(f"hf:{hf_folders['bare']}", "video")
    with pytest.raises(ModelError, match="needs a Hugging Face video classifier"):
        media_explain.load_media_model("timm:vit_tiny_patch16_224", "video")


# --------------------------------------------------------------------------- command line


@pytest.fixture
def toy_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    """``hf:toy`` loads the toy models (the command line's own loader is tested above)."""

    def load(spec: str, kind: str, random_weights: bool = False) -> MediaModel:
        if spec != "hf:toy":
            raise ModelError(f"unexpected {spec}")
        return (
            toy_video_model(["a", "b", "c"])
            if kind == "video"
            else toy_audio_model(["x", "y", "z"])
        )

    monkeypatch.setattr(media_explain, "load_media_model", load)


def test_cli_explains_a_clip_and_a_sound(
    files: Dict[str, Path], tmp_path: Path, toy_loader: None, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    code = main(
        ["explain", str(files["clip"]), "--model", "hf:toy", "--target", "c", "--out", str(out)]
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["clip.png", "clip_c.npy", "clip_c_anim.gif"]
    np.testing.assert_allclose(
        np.load(out / "clip_c.npy"),
        video_oracle(toy_video_model(["a", "b", "c"]), files["clip"], 2).numpy(),
        rtol=1e-4,
        atol=1e-5,
    )
    printed = capsys.readouterr().out
    assert "clip.mp4: c (" in printed and "wrote 3 files" in printed
    mp4 = tmp_path / "mp4"
    assert (
        main(
            [
                "explain",
                str(files["clip"]),
                "--model",
                "hf:toy",
                "--animation",
                "mp4",
                "--out",
                str(mp4),
            ]
        )
        == 0
    )
    animation = next(mp4.glob("*.mp4"))
    with av.open(str(animation)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 8
    sound = tmp_path / "sound"
    assert main(["explain", str(files["sound"]), "--model", "hf:toy", "--out", str(sound)]) == 0
    assert sorted(p.suffix for p in sound.iterdir()) == [".npy", ".png"]


@pytest.mark.parametrize(
    "name, message",
    [
        ("corrupt", "cannot read video .*corrupt.mp4: Invalid data found"),
        ("truncated", "cannot read video .*truncated.mp4"),
        ("text", "cannot read video .*notes.mp4: Invalid data found"),
        ("empty_wav", "cannot read audio .*empty.wav: it has no samples"),
        ("rate_100", "sample rate 100 Hz cannot be resampled"),
    ],
)
def test_cli_bad_files_get_one_line_exit_2_and_no_output(
    files: Dict[str, Path],
    tmp_path: Path,
    toy_loader: None,
    capsys: pytest.CaptureFixture,
    name: str,
    message: str,
) -> None:
    out = tmp_path / "new" / "out"
    code = main(["explain", str(files[name]), "--model", "hf:toy", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("captum-legrad: error: ")
    import re

    assert re.search(message, lines[0])
    assert not (tmp_path / "new").exists()  # nothing written, the folders removed again


def test_cli_refuses_options_and_models_that_do_not_fit_a_video(
    files: Dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cases = [
        (["--model", "default"], "a video file needs a Hugging Face video classifier"),
        (["--model", "hf:x/y", "--input-missing"], "no such video file: "),
        (["--model", "hf:x/y", "--prompt", "a cat"], "--prompt does not apply to a video file"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        clip = str(files["clip"])
        if "--input-missing" in extra:
            extra, clip = extra[:-1], str(tmp_path / "gone.mp4")
        assert main(["explain", clip, *extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
        assert not out.exists()


def _hf_oracle_video(folder: Path, clip: Path, target: int) -> Tensor:
    """The CLI's video map from the definition: the eager twin's per-layer maps on the
    tubelet grid (tests/oracle_video.py), summed, trilinear to (T, H, W), min-max."""
    from oracle_video import layer_maps

    model = transformers.VideoMAEForVideoClassification.from_pretrained(
        folder, attn_implementation="eager"
    ).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    x = processor(read_video(clip, 8).frames, return_tensors="pt")["pixel_values"]
    layers = layer_maps(model, x, target)  # (1, L, t, h, w)
    assert_not_vacuous(layers)
    total = layers.sum(1, keepdim=True)
    up = F.interpolate(total, size=(8, 32, 32), mode="trilinear", align_corners=False)
    return minmax(up[0, 0])


def _hf_oracle_audio(folder: Path, sound: Path, target: int) -> Tensor:
    """The CLI's audio map from the definition: per-layer maps on AST's (F, T) patch grid,
    summed, each spectrogram cell the mean of the patches covering it (0 if none), min-max,
    in the input's (time, mel) layout."""
    from oracle_video import layer_maps

    model = transformers.ASTForAudioClassification.from_pretrained(
        folder, attn_implementation="eager"
    ).eval()
    extractor = transformers.AutoFeatureExtractor.from_pretrained(folder)
    waveform = read_audio(sound, 16000).waveform
    x = extractor(waveform, sampling_rate=16000, return_tensors="pt")["input_values"]
    layers = layer_maps(model, x, target)  # (1, L, F, T)
    assert_not_vacuous(layers)
    grid = layers.sum(1)[0]
    config = model.config
    size, (fs, ts) = config.patch_size, (config.frequency_stride, config.time_stride)
    total, count = torch.zeros(32, 64), torch.zeros(32, 64)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            total[i * fs : i * fs + size, j * ts : j * ts + size] += grid[i, j]
            count[i * fs : i * fs + size, j * ts : j * ts + size] += 1
    cells = torch.where(count > 0, total / count.clamp(min=1), torch.zeros(()))
    return minmax(cells).T


def test_cli_explains_with_saved_hf_videomae_and_ast(
    files: Dict[str, Path], hf_folders: Dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "video"
    args = ["explain", str(files["clip"]), "--model", f"hf:{hf_folders['video']}"]
    assert main([*args, "--target", "jump", "sit", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "clip.png",
        "clip_jump.npy",
        "clip_jump_anim.gif",
        "clip_sit.npy",
        "clip_sit_anim.gif",
    ]
    for target, name in ((1, "jump"), (2, "sit")):
        expected = _hf_oracle_video(hf_folders["video"], files["clip"], target)
        saved = np.load(out / f"clip_{name}.npy")
        np.testing.assert_allclose(saved, expected.numpy(), rtol=1e-4, atol=1e-4)
    sound = tmp_path / "sound"
    args = ["explain", str(files["sound"]), "--model", f"hf:{hf_folders['audio']}"]
    assert main([*args, "--target", "music", "--out", str(sound)]) == 0
    assert sorted(p.name for p in sound.iterdir()) == ["sound.png", "sound_music.npy"]
    saved = np.load(sound / "sound_music.npy")
    assert saved.shape == (64, 32)
    expected = _hf_oracle_audio(hf_folders["audio"], files["sound"], 1)
    np.testing.assert_allclose(saved, expected.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["corrupt", "empty_wav", "text"])
def test_cli_bad_files_with_a_saved_hf_model(
    files: Dict[str, Path],
    hf_folders: Dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    name: str,
) -> None:
    folder = hf_folders["audio" if name.endswith("wav") else "video"]
    out = tmp_path / "out"
    assert main(["explain", str(files[name]), "--model", f"hf:{folder}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("captum-legrad: error: cannot read")
    assert not out.exists()


def _zero_params_random(model: nn.Module, seed: int = 0) -> nn.Module:
    """HF's all-zero tensors at HF's init scale 0.02 (no constant score)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model


#: The other video families: model class, config, processor (16×16 frames, 4 frames).
OTHER_VIDEO = {
    "vivit": (
        "VivitForVideoClassification",
        lambda: transformers.VivitConfig(
            image_size=16, tubelet_size=[2, 8, 8], num_frames=4, hidden_size=32,
            num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3,
        ),
        lambda: transformers.VivitImageProcessor(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
        ),
    ),
    "timesformer": (
        "TimesformerForVideoClassification",
        lambda: transformers.TimesformerConfig(
            image_size=16, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, num_labels=3,
        ),
        lambda: transformers.VideoMAEImageProcessor(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
        ),
    ),
    "vjepa2": (
        "VJEPA2ForVideoClassification",
        lambda: transformers.VJEPA2Config(
            crop_size=16, patch_size=8, frames_per_clip=4, tubelet_size=2, hidden_size=48,
            num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2.0, num_pooler_layers=1,
            pred_hidden_size=32, pred_num_hidden_layers=1, pred_num_attention_heads=2,
            num_labels=3,
        ),
        lambda: transformers.VJEPA2VideoProcessor(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
        ),
    ),
}  # fmt: skip


@pytest.mark.parametrize("key", sorted(OTHER_VIDEO))
def test_the_other_video_families_run_through_explain(
    key: str, files: Dict[str, Path], tmp_path: Path
) -> None:
    """ViViT, TimeSformer, V-JEPA 2 saved with their processors: the written map is LeGrad's
    map of the processor's input (its exactness: tests/test_video_audio.py), one per model
    frame, and the animation has one frame per model frame."""
    from PIL import Image

    from captum_legrad import LeGrad

    class_name, make_config, make_processor = OTHER_VIDEO[key]
    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        pytest.skip(f"transformers has no {class_name}")
    torch.manual_seed(0)
    model = _zero_params_random(model_class(make_config()).eval())
    folder = tmp_path / key
    model.save_pretrained(folder)
    make_processor().save_pretrained(folder)
    loaded = media_explain.load_media_model(f"hf:{folder}", "video")
    assert loaded.num_frames == 4
    result = explain_media(loaded, files["clip"], OutputFolder(tmp_path / "out"), targets=["0"])
    saved = np.load(result.files[0])
    x = loaded.prepare(read_video(files["clip"], 4))
    assert x.shape == (1, 4, 3, 16, 16)
    expected = LeGrad(loaded.model).attribute(x, target=0)[0, :, 0]  # (T, H, W)
    assert float(expected.max() - expected.min()) > 0
    np.testing.assert_allclose(saved, expected.numpy(), rtol=1e-5, atol=1e-6)
    with Image.open(result.files[-1]) as gif:
        assert gif.n_frames == 4


def test_cli_ctrl_c_while_writing_a_clip_leaves_nothing_and_exits_130(
    files: Dict[str, Path],
    tmp_path: Path,
    toy_loader: None,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C after the clip's first file was written: one line, exit 130, no files."""
    save_figure = OutputFolder.save_figure

    def interrupted(self: OutputFolder, *args: Any, **kwargs: Any) -> Path:
        written = save_figure(self, *args, **kwargs)
        assert written.is_file()  # the run was in the middle of writing
        raise KeyboardInterrupt

    monkeypatch.setattr(OutputFolder, "save_figure", interrupted)
    out = tmp_path / "new" / "out"
    code = main(["explain", str(files["clip"]), "--model", "hf:toy", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 130
    assert captured.err.strip().splitlines() == ["interrupted: nothing written"]
    assert captured.out == ""
    assert not (tmp_path / "new").exists()
