"""Output files of the command line: a checked output folder and atomic writes.

Every file is written under a temporary name in its folder and renamed into place
(:func:`os.replace`) only once it is complete, so an interrupted or failed run never
leaves a half-written file under the final name. :class:`OutputFolder` checks that the
folder can be written before any work starts, records every file written (for the
command's summary) and removes the folders it created when the run fails before writing
anything into them.

Nothing here imports torch or matplotlib.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional

__all__ = ["OutputError", "OutputFolder", "atomic_path", "file_mode", "unique_name"]


class OutputError(ValueError):
    """An output folder that cannot be used (a file, not writable, not creatable)."""


def file_mode() -> int:
    """The mode ``open()`` gives a new file under the process's umask: ``0o666 & ~umask``.

    The umask can only be read by setting it; it is set back at once (the command line is
    single-threaded when it writes files).
    """
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that is renamed to ``path`` when the block ends.

    The temporary name keeps ``path``'s suffix (libraries that infer the format from the
    suffix still work). If the block raises, the temporary file is removed and ``path`` is
    left as it was.

    Args:
        path (Path): The final file.

    Yields:
        *Path*: where to write.
    """
    handle, name = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".part{path.suffix}", dir=path.parent
    )
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, file_mode())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_2``, ``base_3``, ... if taken; the result is added to ``taken``."""
    name, count = base, 1
    while name.lower() in taken:
        count += 1
        name = f"{base}_{count}"
    taken.add(name.lower())
    return name


class OutputFolder:
    r"""A folder for a command's outputs, checked before any work starts.

    Args:
        path (Path): The folder (``--out``). Missing folders are created; an existing file,
                    a folder that cannot be created or one that cannot be written raise
                    :class:`OutputError`.

    Use :meth:`write_text`, :meth:`save_npy` and :meth:`save_figure` (all atomic); each
    records the path in :attr:`written`. :meth:`cleanup` (call it when the run fails)
    removes the folders this object created if they are still empty.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.written: List[Path] = []
        self.created: List[Path] = []
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"--out {self.path} is a file, not a folder")
        missing = []
        parent = self.path
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"cannot create --out {self.path}: {parent} is a file")
        try:
            for folder in reversed(missing):
                folder.mkdir(exist_ok=True)  # exist_ok: torchrun's ranks race here
                self.created.append(folder)
            probe, probe_name = tempfile.mkstemp(prefix=".write-test.", dir=self.path)
            os.close(probe)
            os.unlink(probe_name)
        except OSError as error:
            self.cleanup()
            reason = error.strerror or str(error)
            raise OutputError(f"cannot write to --out {self.path}: {reason}") from error

    def file(self, name: str) -> Path:
        """The path of ``name`` in the folder."""
        return self.path / name

    def _record(self, path: Path) -> None:
        if path not in self.written:
            self.written.append(path)

    def write_text(self, name: str, text: str) -> Path:
        """Write ``text`` (UTF-8) to ``name`` atomically; returns the path."""
        path = self.file(name)
        with atomic_path(path) as temporary:
            temporary.write_text(text, encoding="utf-8")
        self._record(path)
        return path

    def save_npy(self, name: str, array: Any) -> Path:
        """``numpy.save`` ``array`` to ``name`` atomically; returns the path."""
        import numpy as np

        path = self.file(name)
        with atomic_path(path) as temporary:
            with open(temporary, "wb") as handle:
                np.save(handle, array)
        self._record(path)
        return path

    def save_figure(
        self, name: str, figure: Any, fmt: Optional[str] = None, dpi: int = 100
    ) -> Path:
        """Save a matplotlib ``figure`` to ``name`` atomically (``fmt`` from the suffix)."""
        path = self.file(name)
        kind = fmt or path.suffix.lstrip(".") or "png"
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format=kind, dpi=dpi, bbox_inches="tight")
        self._record(path)
        return path

    def cleanup(self) -> None:
        """Remove the folders this object created, deepest first, if they are empty."""
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                break
        self.created = [f for f in self.created if f.exists()]

    def summary(self) -> str:
        """The written files, relative to the folder, one per line."""
        return "\n".join(f"  {path}" for path in self.written)
