"""The README's quickstarts and the example script run as written (offline, random init)."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quickstart_blocks() -> List[str]:
    """Python code blocks under README headings that start with 'Quickstart'."""
    blocks, heading = [], ""
    text = (ROOT / "README.md").read_text()
    for match in re.finditer(r"^(#+ [^\n]*)$|^```python\n(.*?)^```", text, re.M | re.S):
        if match.group(1):
            heading = match.group(1)
        elif "Quickstart" in heading:
            blocks.append(match.group(2))
    return blocks


def test_readme_has_quickstarts() -> None:
    assert len(quickstart_blocks()) >= 1


@pytest.mark.parametrize("index", range(len(quickstart_blocks())))
def test_readme_quickstart_runs(index: int) -> None:
    exec(compile(quickstart_blocks()[index], f"README quickstart {index}", "exec"), {})


def test_example_script_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = [
        "quickstart.py",
        "--model",
        "vit_tiny_patch16_224",
        "--out",
        str(tmp_path),
        "--repeats",
        "1",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    assert {p.name for p in tmp_path.iterdir()} == {"legrad.npy", "multi.npy", "layers.npy"}
