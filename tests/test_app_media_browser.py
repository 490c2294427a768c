"""A real browser (Debian's Chromium, headless, Playwright) uploads a video to the explorer
serving a tiny Hugging Face VideoMAE folder and sees the frame strip and the animation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator

import pytest
from test_app_browser import GEOMETRY, LOGS, artifact, local_page, serve

pytest.importorskip("av")
pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")
transformers = pytest.importorskip("transformers")

from test_app_media import folders as _folders  # noqa: E402  (the fixture)
from test_app_media import media as _media  # noqa: E402

folders = _folders
media = _media


@pytest.fixture(scope="module")
def video_app(folders: Dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # served from a folder holding the model as "videomae-tiny": the page's header names it
    # as a person would type it, not by a temporary path
    root = tmp_path_factory.mktemp("video_app")
    (root / "videomae-tiny").symlink_to(folders["video"], target_is_directory=True)
    yield from serve(root, "--model", "hf:videomae-tiny", cwd=root)


def upload(url: str, tmp_path: Path, clip: Path, shot: str, error: str = "") -> Dict[str, Any]:
    found: Dict[str, Any] = {}
    with local_page() as page:
        page.goto(url)
        page.locator("#explain").wait_for(timeout=60_000)
        found["inputs"] = page.locator("input[type=file]").count()
        page.locator("#media input[type=file]").set_input_files(str(clip))
        page.get_by_text(clip.name).first.wait_for(timeout=60_000)
        page.locator("#explain").click()
        if error:
            page.locator("#message").get_by_text(error).wait_for(timeout=120_000)
        else:
            page.locator("#figure img").first.wait_for(timeout=120_000)
            page.locator("#animations img").first.wait_for(timeout=120_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.legrad-results img')]"
                ".every(img => img.complete && img.naturalWidth > 0)",
                timeout=60_000,
            )
            found["summary"] = page.locator("#summary").inner_text()
            found["header"] = page.get_by_text("Model: ").first.inner_text()
            found["figure"] = page.evaluate(GEOMETRY, "#figure img")
            found["animations"] = page.evaluate(GEOMETRY, "#animations img")
            found["sources"] = page.evaluate(
                "() => [...document.querySelectorAll('#animations img')].map(i => i.src)"
            )
        page.screenshot(path=str(artifact(shot, tmp_path)), full_page=True)
    return found


def test_a_video_upload_shows_the_strip_and_the_animation(
    video_app: str, media: Dict[str, Path], tmp_path: Path
) -> None:
    found = upload(video_app, tmp_path, media["clip"], "app_video.png")
    assert found["inputs"] == 1  # the video input alone: no image inputs
    assert "hf:videomae-tiny" in found["header"] and "/tmp" not in found["header"]
    assert "clip.mp4" in found["summary"] and "p = " in found["summary"]
    assert len(found["figure"]) == 1 and len(found["animations"]) == 1
    for image in found["figure"] + found["animations"]:
        assert image["inside"] and image["covered"] == 0 and image["width"] > 100, image
        assert abs(image["drawn"] - image["natural"]) < 0.01, image
    assert found["sources"][0].split("?")[0].endswith(".gif")
    assert found["animations"][0]["caption"].startswith("clip.mp4: ")
    assert artifact("app_video.png", tmp_path).stat().st_size > 10_000


def test_a_corrupt_video_is_one_message_and_one_console_line(
    video_app: str, media: Dict[str, Path], tmp_path: Path
) -> None:
    upload(video_app, tmp_path, media["corrupt"], "app_video_corrupt.png", error="corrupt.mp4")
    log = LOGS[video_app].read_text()
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "corrupt.mp4" in line]
    assert len(lines) == 1 and lines[0].startswith("captum-legrad app: "), lines
    assert lines[0].startswith("captum-legrad app: Cannot read video corrupt.mp4: "), lines
