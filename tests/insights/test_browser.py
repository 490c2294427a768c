"""A real browser: Debian's Chromium, headless, drives the Insights app with LeGrad chosen."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_START_S = 90.0

pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None, reason="Debian's chromium is not installed"
)
sync_api = pytest.importorskip("playwright.sync_api")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(params=[False, True], ids=["classifier", "open_vocabulary"])
def app_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """``AttributionVisualizer.serve(port=...)`` on 127.0.0.1 in a subprocess."""
    port = free_port()
    command = [sys.executable, str(Path(__file__).with_name("app_factory.py")), "--port", str(port)]
    if request.param:
        command.append("--open-vocabulary")
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(url + "init", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(
                    f"Insights server did not start:\n{(tmp_path / 'server.log').read_text()}"
                )
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_browser_fetches_legrad_heat_maps(app_url: str, tmp_path: Path) -> None:
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = context.new_page()
            errors: list = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(app_url)
            menu = page.locator('select[name="selected_method"]')
            menu.wait_for(timeout=30_000)
            assert "LeGrad" in menu.locator("option").all_inner_texts()
            menu.select_option("LeGrad")
            # LeGrad's arguments appear: the layers text field and the pooling menu
            page.locator('input[name="layers"]').wait_for(timeout=10_000)
            assert page.locator('input[name="layers"]').input_value() == "all"
            assert page.locator('select[name="pooling"]').input_value() == "mean"
            page.get_by_role("button", name="Fetch").click()
            heat_maps = page.locator('img[alt="attribution"]')
            heat_maps.first.wait_for(timeout=120_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('img[alt=\"attribution\"]')]"
                ".every(img => img.complete && img.naturalWidth > 0)",
                timeout=30_000,
            )
            assert heat_maps.count() == 4
            assert page.locator('img[alt="original"]').count() == 4
            for i in range(4):
                assert heat_maps.nth(i).get_attribute("src").startswith("data:image/png;base64,")
            shot = tmp_path / "insights.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert errors == []
        finally:
            context.close()
