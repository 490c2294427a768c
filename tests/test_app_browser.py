"""A real browser (Debian's Chromium, headless, Playwright) drives the LeGrad explorer."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

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


def serve(tmp_path: Path, *extra: str, cwd: Optional[Path] = None) -> Iterator[str]:
    """Start ``tests/app_server.py`` (in ``cwd``: a model folder by a clean relative name,
    as the page's header shows it) and yield its address."""
    port = free_port()
    script = Path(__file__).with_name("app_server.py")
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port), *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=cwd,
    )
    url = f"http://127.0.0.1:{port}/"
    LOGS[url] = tmp_path / "server.log"
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


#: The server log of each served address.
LOGS: Dict[str, Path] = {}


@pytest.fixture(scope="module")
def default_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from serve(tmp_path_factory.mktemp("default_app"))


@pytest.fixture(scope="module")
def clip_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from serve(tmp_path_factory.mktemp("clip_app"), "--clip")


def photo(path: Path) -> Path:
    """A photo-like picture (smooth colours and an object), as a person would upload."""
    from PIL import Image

    y, x = np.mgrid[0:120, 0:160] / 160.0
    rgb = np.stack([0.4 + 0.4 * x, 0.5 + 0.3 * y, 0.7 - 0.3 * x], axis=-1)
    rgb[30:90, 50:110] = [0.9, 0.2, 0.1]
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path)
    return path


def shape_images(tmp_path: Path) -> List[Path]:
    """Two images of the bundled model's own domain with different top classes."""
    from PIL import Image

    from captum_legrad.data import ShapesDataset

    data = ShapesDataset(2, seed=1)  # top classes: circle and ring
    paths = []
    for i in range(2):
        array = (data[i].image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).resize((128, 128)).save(tmp_path / f"shapes_{i}.png")
        paths.append(tmp_path / f"shapes_{i}.png")
    return paths


def artifact(name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("LEGRAD_ARTIFACTS", str(tmp_path)))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


#: For every result image: its natural and drawn aspect ratios, whether the drawn picture
#: lies whole inside the box and every clipping ancestor, and whether a caption covers it.
GEOMETRY = """(selector) => [...document.querySelectorAll(selector)].map(img => {
  const box = img.getBoundingClientRect();
  const fit = getComputedStyle(img).objectFit;
  const nw = img.naturalWidth, nh = img.naturalHeight;
  let w = box.width, h = box.height;
  if (fit === 'contain' || fit === 'scale-down') {
    const k = Math.min(box.width / nw, box.height / nh, fit === 'scale-down' ? 1 : Infinity);
    w = nw * k; h = nh * k;
  } else if (fit === 'cover') {
    const k = Math.max(box.width / nw, box.height / nh); w = nw * k; h = nh * k;
  } else if (fit === 'none') { w = nw; h = nh; }
  const drawn = {left: box.left + (box.width - w) / 2, top: box.top + (box.height - h) / 2};
  drawn.right = drawn.left + w; drawn.bottom = drawn.top + h;
  let clip = {left: box.left, top: box.top, right: box.right, bottom: box.bottom};
  for (let el = img.parentElement; el; el = el.parentElement) {
    const style = getComputedStyle(el);
    const clips = ['hidden', 'clip'];
    if (clips.includes(style.overflowX) || clips.includes(style.overflowY)) {
      const r = el.getBoundingClientRect();
      clip = {left: Math.max(clip.left, r.left), top: Math.max(clip.top, r.top),
              right: Math.min(clip.right, r.right), bottom: Math.min(clip.bottom, r.bottom)};
    }
  }
  const inside = drawn.left >= clip.left - 1 && drawn.top >= clip.top - 1
    && drawn.right <= clip.right + 1 && drawn.bottom <= clip.bottom + 1;
  const caption = img.parentElement.querySelector('.caption-label');
  let covered = 0, text = '', truncated = false;
  if (caption) {
    const c = caption.getBoundingClientRect();
    covered = Math.max(0, Math.min(c.right, drawn.right) - Math.max(c.left, drawn.left))
      * Math.max(0, Math.min(c.bottom, drawn.bottom) - Math.max(c.top, drawn.top));
    text = caption.innerText;
    truncated = caption.scrollWidth > caption.clientWidth + 1
      || caption.scrollHeight > caption.clientHeight + 1;
  }
  return {natural: nw / nh, drawn: w / h, inside, covered, caption: text, truncated,
          alt: img.alt, width: w};
})"""


@contextmanager
def local_page() -> Iterator[Any]:
    """A page of Debian's Chromium (headless, 1400 × 1000) whose requests off the local
    server are aborted; the block fails after the browser closes if the page asked the
    internet for anything."""
    outside: List[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})

            def local_only(route: Any) -> None:
                request_url = route.request.url
                if request_url.startswith(("http://127.0.0.1", "data:", "blob:")):
                    route.continue_()
                else:
                    outside.append(request_url)
                    route.abort()

            page.route("**/*", local_only)
            yield page
        finally:
            browser.close()
    assert outside == [], f"the page asked the internet for {outside[:5]}"


def explore(
    url: str,
    tmp_path: Path,
    uploads: Sequence[Path],
    what: str,
    shot: str,
    reference: Optional[Path] = None,
    error: str = "",
) -> Dict[str, Any]:
    """Upload, type, press Explain; returns the summary and the geometry of the results
    (or, with ``error``, waits for that message). Fails on any request off the server."""
    found: Dict[str, Any] = {}
    with local_page() as page:
        page.goto(url)
        page.locator("#explain").wait_for(timeout=60_000)
        page.locator("input[type=file]").first.set_input_files([str(p) for p in uploads])
        previews = page.locator("#previews img")
        previews.nth(len(uploads) - 1).wait_for(timeout=60_000)
        if reference is not None:
            page.locator("#reference input[type=file]").set_input_files(str(reference))
            page.get_by_text(reference.name).first.wait_for(timeout=60_000)
        if what:
            page.locator("#what textarea, #what input").first.fill(what)
        page.locator("#explain").click()
        if error:
            page.locator("#message").get_by_text(error).wait_for(timeout=120_000)
            page.screenshot(path=str(artifact(shot, tmp_path)), full_page=True)
            return found
        page.locator("#maps img").first.wait_for(timeout=120_000)
        page.locator("#layers img").first.wait_for(timeout=120_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('.legrad-results img')]"
            ".every(img => img.complete && img.naturalWidth > 0)",
            timeout=60_000,
        )
        found["summary"] = page.locator("#summary").inner_text()
        found["previews"] = page.evaluate(GEOMETRY, "#previews img")
        found["maps"] = page.evaluate(GEOMETRY, "#maps img")
        found["layers"] = page.evaluate(GEOMETRY, "#layers img")
        found["colour bar"] = page.locator("#colourbar").inner_text()
        page.screenshot(path=str(artifact(shot, tmp_path)), full_page=True)
    return found


def assert_whole(results: List[Dict[str, Any]], count: int) -> None:
    """``count`` images, each drawn whole at its own aspect ratio, no caption over it."""
    assert len(results) == count
    for image in results:
        assert abs(image["drawn"] - image["natural"]) < 0.01, image
        assert image["inside"] and image["covered"] == 0, image
        assert not image["truncated"] and image["width"] > 100, image


def test_one_image_drawn_whole_with_its_caption(default_app: str, tmp_path: Path) -> None:
    from captum_legrad.data import CLASSES

    found = explore(default_app, tmp_path, [photo(tmp_path / "photo.png")], "", "app_one_image.png")
    assert "photo.png" in found["summary"] and "p = " in found["summary"]
    assert any(name in found["summary"] for name in CLASSES)
    assert "0 (low)" in found["colour bar"] and "1 (high)" in found["colour bar"]
    assert_whole(found["previews"], 1)
    assert_whole(found["maps"], 1)
    assert_whole(found["layers"], 4)  # the bundled model's 4 blocks
    caption = found["maps"][0]["caption"]
    assert re.fullmatch(rf"photo\.png: ({'|'.join(CLASSES)}) \(p = [01]\.\d\d\)", caption)
    assert found["previews"][0]["caption"] == "photo.png"
    assert artifact("app_one_image.png", tmp_path).stat().st_size > 10_000


def test_two_images_each_caption_names_its_image_and_target(
    default_app: str, tmp_path: Path
) -> None:
    first, second = shape_images(tmp_path)
    found = explore(default_app, tmp_path, [first, second], "", "app_two_images.png")
    assert_whole(found["previews"], 2)
    assert_whole(found["maps"], 2)
    assert_whole(found["layers"], 4)
    captions = [image["caption"] for image in found["maps"]]
    assert re.fullmatch(r"shapes_0\.png: circle \(p = 1\.00\)", captions[0]), captions
    assert re.fullmatch(r"shapes_1\.png: ring \(p = 1\.00\)", captions[1]), captions
    for caption, image in zip(captions, found["maps"]):
        assert image["alt"] == caption
    assert "shapes_0.png\tcircle" in found["summary"] and "shapes_1.png\tring" in found["summary"]


def test_a_typo_is_a_message_on_the_page_and_one_line_on_the_console(
    default_app: str, tmp_path: Path
) -> None:
    explore(
        default_app,
        tmp_path,
        [photo(tmp_path / "photo.png")],
        "circel",
        "app_typo.png",
        error="Unknown class name 'circel'",
    )
    log = LOGS[default_app].read_text()
    assert "Traceback" not in log
    assert [line for line in log.splitlines() if "circel" in line] == [
        "captum-legrad app: Unknown class name 'circel' for this model; did you mean 'circle' (0)?"
    ]


def test_a_prompt_gets_its_map(clip_app: str, tmp_path: Path) -> None:
    found = explore(
        clip_app, tmp_path, [photo(tmp_path / "photo.png")], "a red square", "app_prompt.png"
    )
    assert "a red square" in found["summary"] and "cosine" in found["summary"]
    assert_whole(found["maps"], 1)


def test_compare_with_an_image(clip_app: str, tmp_path: Path) -> None:
    first, second = shape_images(tmp_path)
    found = explore(clip_app, tmp_path, [first, second], "", "app_compare.png", reference=second)
    assert_whole(found["maps"], 2)
    captions = [image["caption"] for image in found["maps"]]
    assert re.fullmatch(
        r"shapes_0\.png: like shapes_1\.png \(cosine similarity 0\.\d{3}\)", captions[0]
    )
    assert captions[1] == "shapes_1.png: like shapes_1.png (cosine similarity 1.000)"


def test_compare_with_a_classifier_is_one_message(default_app: str, tmp_path: Path) -> None:
    first, second = shape_images(tmp_path)
    explore(
        default_app,
        tmp_path,
        [first],
        "",
        "app_compare_classifier.png",
        reference=second,
        error="This model has no image embedding",
    )
