"""A real browser (Debian's Chromium, headless, Playwright) drives the LeGrad explorer."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator, List

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic"]
SERVER_START_S = 120.0

pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None, reason="Debian's chromium is not installed"
)
pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(tmp_path: Path, *extra: str) -> Iterator[str]:
    port = free_port()
    script = Path(__file__).with_name("app_server.py")
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port), *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"explorer did not start:\n{(tmp_path / 'server.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture
def default_app(tmp_path: Path) -> Iterator[str]:
    yield from serve(tmp_path)


@pytest.fixture
def clip_app(tmp_path: Path) -> Iterator[str]:
    yield from serve(tmp_path, "--clip")


def photo(path: Path) -> Path:
    """A photo-like picture (smooth colours and an object), as a person would upload."""
    from PIL import Image

    y, x = np.mgrid[0:120, 0:160] / 160.0
    rgb = np.stack([0.4 + 0.4 * x, 0.5 + 0.3 * y, 0.7 - 0.3 * x], axis=-1)
    rgb[30:90, 50:110] = [0.9, 0.2, 0.1]
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path)
    return path


def artifact(name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("LEGRAD_ARTIFACTS", str(tmp_path)))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def explain_in_browser(url: str, tmp_path: Path, upload: Path, what: str, shot: str) -> List[str]:
    """Upload, type, press Explain; returns the gallery captions. Fails on any outside request."""
    outside: List[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})

            def local_only(route: object) -> None:
                request_url = route.request.url  # type: ignore[attr-defined]
                if request_url.startswith(("http://127.0.0.1", "data:", "blob:")):
                    route.continue_()  # type: ignore[attr-defined]
                else:
                    outside.append(request_url)
                    route.abort()  # type: ignore[attr-defined]

            page.route("**/*", local_only)
            page.goto(url)
            page.locator("#explain").wait_for(timeout=60_000)
            page.locator("input[type=file]").first.set_input_files(str(upload))
            if what:
                page.locator("#what textarea, #what input").first.fill(what)
            page.locator("#explain").click()
            images = page.locator("#maps img")
            images.first.wait_for(timeout=120_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#maps img')]"
                ".every(img => img.complete && img.naturalWidth > 0)",
                timeout=60_000,
            )
            summary = page.locator("#summary").inner_text()
            captions = [summary]
            page.screenshot(path=str(artifact(shot, tmp_path)), full_page=True)
        finally:
            browser.close()
    assert outside == [], f"the page asked the internet for {outside[:5]}"
    return captions


def test_upload_a_photo_and_see_the_top_class_explained(default_app: str, tmp_path: Path) -> None:
    from captum_legrad.data import CLASSES

    (summary,) = explain_in_browser(
        default_app, tmp_path, photo(tmp_path / "photo.png"), "", "app_default.png"
    )
    assert "photo.png" in summary and "p = " in summary
    assert any(name in summary for name in CLASSES)
    assert artifact("app_default.png", tmp_path).stat().st_size > 10_000


def test_a_prompt_gets_its_map(clip_app: str, tmp_path: Path) -> None:
    (summary,) = explain_in_browser(
        clip_app, tmp_path, photo(tmp_path / "photo.png"), "a red square", "app_prompt.png"
    )
    assert "a red square" in summary and "cosine" in summary
