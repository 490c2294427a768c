"""A progress bar: ``tqdm`` when it is installed, otherwise a small one of our own."""

from __future__ import annotations

import importlib
import sys
import time
from typing import Any, Optional, TextIO

__all__ = ["progress_bar", "SimpleBar"]


class SimpleBar:
    """A minimal text progress bar on stderr (used when tqdm is not installed)."""

    def __init__(
        self, total: int, desc: str = "", disable: bool = False, stream: Optional[TextIO] = None
    ) -> None:
        self.total, self.desc, self.disable = max(total, 0), desc, disable
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self.start = time.perf_counter()
        self._draw()

    def _draw(self) -> None:
        if self.disable:
            return
        width = 30
        done = int(width * self.count / self.total) if self.total else width
        elapsed = time.perf_counter() - self.start
        self.stream.write(
            f"\r{self.desc}: [{'#' * done}{'.' * (width - done)}] {self.count}/{self.total} "
            f"{elapsed:.0f}s"
        )
        self.stream.flush()

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` items."""
        self.count += n
        self._draw()

    def close(self) -> None:
        """Finish the line."""
        if not self.disable:
            self.stream.write("\n")
            self.stream.flush()


def progress_bar(total: int, desc: str, disable: bool = False) -> Any:
    """A bar with ``update(n)`` and ``close()``: tqdm's if available, else :class:`SimpleBar`."""
    try:
        tqdm: Any = importlib.import_module("tqdm.auto").tqdm
    except ImportError:
        return SimpleBar(total, desc, disable)
    return tqdm(total=total, desc=desc, disable=disable, leave=True)
