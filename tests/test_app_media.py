"""The explorer with a Hugging Face video or audio classifier (captum_legrad.app.MediaExplorer),
without a browser: tiny VideoMAE and AST models saved with their processors."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
from conftest import assert_not_vacuous
from torch import Tensor, nn

av = pytest.importorskip("av")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gradio")

from test_media import write_clip, write_wav  # noqa: E402  (the same clip and tone)

from captum_legrad import LeGrad  # noqa: E402
from captum_legrad.app import ExplorerError, MediaExplorer, build  # noqa: E402
from captum_legrad.eval.explain_media import load_media_model, media_model_kind  # noqa: E402
from captum_legrad.eval.media import read_audio, read_video  # noqa: E402

VIDEO_CLASSES = {0: "run", 1: "jump", 2: "sit"}
AUDIO_CLASSES = {0: "speech", 1: "music", 2: "dog"}


def randomise_zeros(model: nn.Module, seed: int = 0) -> nn.Module:
    """HF's all-zero tensors at HF's init scale 0.02 (no constant score)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_media")
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
            id2label=VIDEO_CLASSES,
            label2id={v: k for k, v in VIDEO_CLASSES.items()},
        )
    )
    randomise_zeros(video).save_pretrained(root / "videomae")
    transformers.VideoMAEImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(root / "videomae")
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
            id2label=AUDIO_CLASSES,
            label2id={v: k for k, v in AUDIO_CLASSES.items()},
        )
    )
    randomise_zeros(audio, 1).save_pretrained(root / "ast")
    transformers.ASTFeatureExtractor(num_mel_bins=32, max_length=64).save_pretrained(root / "ast")
    return {"video": root / "videomae", "audio": root / "ast"}


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("media_files")
    clip = write_clip(root / "clip.mp4")
    corrupt = root / "corrupt.mp4"
    corrupt.write_bytes(clip.read_bytes()[:40] + bytes(range(256)) * 4)
    text = root / "notes.mp4"
    text.write_text("this is not a video\n")
    empty = root / "empty.wav"
    empty.write_bytes(b"")
    readme = root / "readme.wav"
    readme.write_text("not a sound\n")
    return {
        "clip": clip,
        "sound": write_wav(root / "sound.wav"),
        "corrupt": corrupt,
        "text": text,
        "empty": empty,
        "readme": readme,
    }


@pytest.fixture(scope="module")
def video_explorer(
    folders: Dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> MediaExplorer:
    loaded = load_media_model(f"hf:{folders['video']}", "video")
    return MediaExplorer(loaded, workdir=tmp_path_factory.mktemp("video_work"))


@pytest.fixture(scope="module")
def audio_explorer(
    folders: Dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> MediaExplorer:
    loaded = load_media_model(f"hf:{folders['audio']}", "audio")
    return MediaExplorer(loaded, workdir=tmp_path_factory.mktemp("audio_work"))


class Logits(nn.Module):
    """The HF classifier's logits from its main input (the test's own wrapper)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model, self.name = model, name

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.model(**{self.name: x}).logits
        return out


def video_reference(folder: Path, clip: Path) -> Dict[str, Tensor]:
    """The processor's output, the logits and the model read straight from the folder."""
    processor = transformers.VideoMAEImageProcessor.from_pretrained(folder)
    frames = read_video(clip, 8).frames
    x = processor(frames, return_tensors="pt")["pixel_values"]
    model = Logits(
        transformers.VideoMAEForVideoClassification.from_pretrained(folder).eval(), "pixel_values"
    ).eval()
    with torch.no_grad():
        logits = model(x)[0]
    return {"x": x, "logits": logits, "model": model}  # type: ignore[dict-item]


def test_the_explorer_knows_video_and_audio_folders(folders: Dict[str, Path]) -> None:
    assert media_model_kind(f"hf:{folders['video']}") == "video"
    assert media_model_kind(f"hf:{folders['audio']}") == "audio"
    assert media_model_kind("default") is None
    assert media_model_kind("hf:google/vit-base-patch16-224") is None  # not a folder


def test_a_video_is_explained_with_the_strip_and_one_gif_per_target(
    video_explorer: MediaExplorer, folders: Dict[str, Path], media: Dict[str, Path]
) -> None:
    view = video_explorer.explain(str(media["clip"]), "", 2)
    ref = video_reference(folders["video"], media["clip"])
    probabilities = ref["logits"].softmax(-1)
    top = probabilities.topk(2).indices.tolist()
    assert view.explained.result.targets == top
    expected = (
        LeGrad(ref["model"]).attribute_multi(ref["x"], targets=top, output="input")[0].mean(2)
    )
    assert_not_vacuous(expected)
    assert view.explained.maps.shape == (2, 8, 32, 32)
    np.testing.assert_allclose(view.explained.maps.numpy(), expected.numpy(), atol=1e-5)
    npys = [f for f in view.files if f.endswith(".npy")]
    for index, npy in enumerate(npys):
        np.testing.assert_allclose(np.load(npy), expected[index].numpy(), atol=1e-5)
    names = [VIDEO_CLASSES[t] for t in top]
    assert view.captions == [
        f"clip.mp4: {n} (p = {float(probabilities[t]):.2f})" for n, t in zip(names, top)
    ]
    assert f"**{names[0]}**" in view.summary and "8 frames sampled uniformly" in view.summary
    assert view.figure._suptitle.get_text() == "clip.mp4: LeGrad (8 of 8 frames)"
    assert len(view.animations) == 2
    from PIL import Image

    for gif in view.animations:
        with Image.open(gif) as handle:
            assert handle.n_frames == 8
    assert [Path(f).suffix for f in view.files] == [".npy", ".npy", ".png", ".gif", ".gif"]
    assert Path(view.figure_file).stat().st_size > 0


def test_typed_classes_are_read_by_the_shared_parser(
    video_explorer: MediaExplorer, media: Dict[str, Path]
) -> None:
    view = video_explorer.explain(media["clip"], "sit; 0")
    assert view.explained.result.targets == [2, 0]
    assert [row[1] for row in view.rows] == ["sit", "run"]
    with pytest.raises(ExplorerError, match="did you mean 'jump'"):
        video_explorer.explain(media["clip"], "jumb")


def test_a_sound_is_explained_on_its_spectrogram(
    audio_explorer: MediaExplorer, folders: Dict[str, Path], media: Dict[str, Path]
) -> None:
    view = audio_explorer.explain(str(media["sound"]), "music")
    extractor = transformers.ASTFeatureExtractor.from_pretrained(folders["audio"])
    audio = read_audio(media["sound"], 16000)
    x = extractor(audio.waveform, sampling_rate=16000, return_tensors="pt")["input_values"]
    model = Logits(
        transformers.ASTForAudioClassification.from_pretrained(folders["audio"]).eval(),
        "input_values",
    ).eval()
    with torch.no_grad():
        probability = float(model(x)[0].softmax(-1)[1])
    expected = LeGrad(model).attribute_multi(x, targets=[1], output="input")[0]
    assert_not_vacuous(expected, lead=1)  # (target, time, mel): the last frames are uncovered
    np.testing.assert_allclose(view.explained.maps.numpy(), expected.numpy(), atol=1e-5)
    assert view.captions == [f"sound.wav: music (p = {probability:.2f})"]
    assert view.figure._suptitle.get_text().startswith("sound.wav: LeGrad (1.00 s, resampled")
    assert view.animations == []
    assert [Path(f).suffix for f in view.files] == [".npy", ".png"]
    assert "the model sees the first 0.64 s of 1.00 s" in view.summary


@pytest.mark.parametrize(
    "kind, name, message",
    [
        ("video", "corrupt", "corrupt.mp4"),
        ("video", "text", "notes.mp4"),
        ("video", "sound", "sound.wav"),
        ("audio", "empty", "empty.wav"),
        ("audio", "readme", "readme.wav"),
    ],
)
def test_bad_files_give_one_line(
    kind: str,
    name: str,
    message: str,
    video_explorer: MediaExplorer,
    audio_explorer: MediaExplorer,
    media: Dict[str, Path],
) -> None:
    explorer = video_explorer if kind == "video" else audio_explorer
    with pytest.raises(ExplorerError) as caught:
        explorer.explain(media[name])
    text = str(caught.value)
    assert message in text and "\n" not in text and "Traceback" not in text
    assert str(media[name].parent) not in text  # named by its file name, not its folder
    upload = "Upload an audio" if kind == "audio" else "Upload a video"
    with pytest.raises(ExplorerError, match=upload):
        explorer.explain(None)


def test_the_page_shows_only_the_input_of_the_models_kind(
    video_explorer: MediaExplorer, audio_explorer: MediaExplorer
) -> None:
    for explorer, label in ((video_explorer, "Video file"), (audio_explorer, "Audio file")):
        page = build(explorer)
        inputs = [
            block
            for block in page.blocks.values()
            if type(block).__name__ in ("File", "Image", "Video", "Audio")
            and getattr(block, "interactive", None) is not False
            and "Downloads" not in str(getattr(block, "label", ""))
        ]
        assert [block.label for block in inputs] == [label]
        extensions = inputs[0].file_types
        assert (".mp4" in extensions) == (label == "Video file")
        assert (".wav" in extensions) == (label == "Audio file")
