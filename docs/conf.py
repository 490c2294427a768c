"""Sphinx configuration: ``sphinx-build -W -b html docs docs/_build/html``."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import captum_legrad  # noqa: E402

project = "captum_legrad"
author = "captum_legrad developers"
copyright = "captum_legrad developers, BSD-3-Clause"
release = captum_legrad.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Markdown: heading anchors so pages can link to sections; dollar maths off (the pages
# write formulas as code).
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# API reference: Captum-style (Google) docstrings, types written in the docstrings.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_inherit_docstrings = False  # e.g. nn.Module.forward's text is not ours
autodoc_default_options: dict = {}

html_theme = "alabaster"
html_title = f"captum_legrad {release}"
# docs/_static/custom.css: tables and code blocks scroll inside their column
html_static_path: list = ["_static"]
html_css_files = ["custom.css"]


def _captum_returns(
    app: object, what: str, name: str, obj: object, options: object, lines: list
) -> None:
    """Captum writes ``Returns:`` as ``*Tensor* or *tuple[Tensor, ...]* of **attributions**:``.

    Napoleon reads the text before the colon as the return type and sets it in italics, which
    the emphasis inside that text breaks; drop the inner markers (before napoleon runs).
    """
    for i, line in enumerate(lines):
        if line.strip() != "Returns:":
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j < len(lines) and ":" in lines[j]:
            head, colon, tail = lines[j].partition(":")
            lines[j] = head.replace("*", "") + colon + tail


def setup(app: object) -> None:
    app.connect("autodoc-process-docstring", _captum_returns, priority=100)  # type: ignore[attr-defined]
