"""The built documentation in a real browser (Debian's Chromium, headless, Playwright):
at 1280 px every page fits the window; wide tables and code blocks scroll inside their
column (docs/_static/custom.css)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu"]
ROOT = Path(__file__).resolve().parents[1]
WIDTH = 1280

pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None, reason="Debian's chromium is not installed"
)
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("sphinx")
pytest.importorskip("myst_parser")


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The docs built into a temporary folder (the repository is not written)."""
    out = tmp_path_factory.mktemp("docs") / "html"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-q", "-b", "html", str(ROOT / "docs"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_every_page_fits_a_1280_px_window(built_docs: Path, tmp_path: Path) -> None:
    pages = sorted(built_docs.glob("*.html"))
    assert {"cli.html", "models.html"} <= {p.name for p in pages}
    too_wide = {}
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": 900})
            for path in pages:
                page.goto(path.as_uri())
                page.screenshot(path=str(tmp_path / f"{path.stem}.png"))
                width = page.evaluate("document.documentElement.scrollWidth")
                if width > WIDTH:
                    too_wide[path.name] = width
            # the wide content is still there, scrolling inside its column
            page.goto((built_docs / "cli.html").as_uri())
            inner = page.evaluate(
                "Math.max(...[...document.querySelectorAll('div.highlight pre, table')]"
                ".map(e => e.scrollWidth - e.clientWidth))"
            )
        finally:
            browser.close()
    assert too_wide == {}, f"pages wider than {WIDTH} px: {too_wide}"
    assert inner > 0  # cli.html has a code line wider than its column: it scrolls
    assert (tmp_path / "cli.png").stat().st_size > 0
