"""A real browser (Debian's Chromium, headless, Playwright) asks a tiny Qwen2-VL served by
the explorer about a photo and about a video, and sees the token table and the overlays
(the strip and the animations for the video); a file that is no image is one message."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator

import pytest
from test_app_browser import GEOMETRY, LOGS, artifact, local_page, photo, serve

pytest.importorskip("av")
pytest.importorskip("gradio")
pytest.importorskip("tokenizers")
sync_api = pytest.importorskip("playwright.sync_api")
transformers = pytest.importorskip("transformers")

from _versions import requires  # noqa: E402
from test_cli_ask_vlm import _qwen_folder  # noqa: E402
from test_media import write_clip  # noqa: E402

pytestmark = requires("transformers", "Qwen2VLForConditionalGeneration", since="transformers 4.45")


@pytest.fixture(scope="module")
def vlm_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("vlm_app")
    _qwen_folder(root / "qwen2-vl-tiny")  # served by this clean name (the page's header)
    yield from serve(root, "--model", "hf:qwen2-vl-tiny", cwd=root)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm_files")
    notes = root / "notes.png"
    notes.write_text("not an image\n")
    return {
        "photo": photo(root / "photo.png"),
        "clip": write_clip(root / "clip.mp4", frames=10, size=32),
        "notes": notes,
    }


def ask(
    url: str, tmp_path: Path, file: Path, question: str, shot: str, error: str = ""
) -> Dict[str, Any]:
    found: Dict[str, Any] = {}
    video = file.suffix == ".mp4"
    with local_page() as page:
        page.goto(url)
        page.locator("#explain").wait_for(timeout=60_000)
        found["inputs"] = page.locator("input[type=file]").count()
        found["header"] = page.get_by_text("Model: ").first.inner_text()
        page.locator("#media input[type=file]").set_input_files(str(file))
        page.get_by_text(file.name).first.wait_for(timeout=60_000)
        page.locator("#question textarea").fill(question)
        longest = page.locator("#longest input[type=number]")
        longest.fill("4")  # a short answer: every overlay on the first screen
        longest.press("Enter")
        page.locator("#explain").click()
        if error:
            page.locator("#message").get_by_text(error).wait_for(timeout=120_000)
        else:
            results = "#animations img" if video else "#maps img"
            page.locator(results).first.wait_for(timeout=120_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.legrad-results img')]"
                ".every(img => img.complete && img.naturalWidth > 0)",
                timeout=60_000,
            )
            found["summary"] = page.locator("#summary").inner_text()
            found["rows"] = page.locator("#summary tbody tr").count()
            found["maps"] = page.evaluate(GEOMETRY, "#maps img")
            found["figure"] = page.evaluate(GEOMETRY, "#figure img")
            found["animations"] = page.evaluate(GEOMETRY, "#animations img")
            found["tokens"] = page.locator("#summary tbody tr td:nth-child(2)").all_inner_texts()
        page.screenshot(path=str(artifact(shot, tmp_path)), full_page=True)
    return found


def test_ask_about_a_photo(vlm_app: str, files: Dict[str, Path], tmp_path: Path) -> None:
    found = ask(vlm_app, tmp_path, files["photo"], "w3 w4", "app_vlm.png")
    assert found["inputs"] == 1  # one image-or-video input, none of the image page's
    assert "hf:qwen2-vl-tiny" in found["header"] and "/tmp" not in found["header"]
    assert "photo.png" in found["summary"] and "w3 w4 →" in found["summary"]
    assert "probability" in found["summary"] and 1 <= found["rows"] <= 4
    assert all(t.startswith('"') and t.endswith('"') for t in found["tokens"])
    assert len(found["maps"]) == found["rows"] + 1  # one per token, then the whole answer
    for image in found["maps"]:
        assert image["inside"] and image["covered"] == 0 and image["width"] > 100, image
        assert abs(image["drawn"] - 160 / 120) < 0.01, image  # the original photo's shape
    assert found["maps"][0]["caption"].startswith('photo.png: "')
    assert found["maps"][-1]["caption"].startswith('photo.png: whole answer "')
    assert found["figure"] == [] and found["animations"] == []
    assert artifact("app_vlm.png", tmp_path).stat().st_size > 10_000


def test_ask_about_a_video(vlm_app: str, files: Dict[str, Path], tmp_path: Path) -> None:
    found = ask(vlm_app, tmp_path, files["clip"], "w5", "app_vlm_video.png")
    assert "clip.mp4" in found["summary"] and found["rows"] >= 1
    assert len(found["figure"]) == 1 and len(found["animations"]) == found["rows"]
    for image in found["figure"] + found["animations"]:
        assert image["inside"] and image["covered"] == 0 and image["width"] > 100, image
        assert abs(image["drawn"] - image["natural"]) < 0.01, image
    assert found["animations"][0]["caption"].startswith('clip.mp4: "')
    assert found["maps"] == []


def test_a_file_that_is_no_image_is_one_message(
    vlm_app: str, files: Dict[str, Path], tmp_path: Path
) -> None:
    ask(vlm_app, tmp_path, files["notes"], "w3", "app_vlm_bad.png", error="notes.png")
    log = LOGS[vlm_app].read_text()
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "notes.png" in line]
    assert lines == ["captum-legrad app: Cannot read image notes.png: not an image Pillow reads."]
