"""Collect these tests only where Captum Insights exists (captum 0.8.0 and its extras).

The main suite runs with captum 0.9, which has no ``captum.insights``; there nothing in
this folder is collected. ``bash .ci/insights.sh`` runs them in a venv of their own.
"""

from __future__ import annotations

import importlib.util
from typing import List


def _have_insights() -> bool:
    try:
        return importlib.util.find_spec("captum.insights") is not None
    except ImportError:
        return False


collect_ignore_glob: List[str] = [] if _have_insights() else ["test_*.py"]
