"""Class names to class indices: the one parser of ``explain --target`` and the explorer.

A class is given by its index or by its name. A name matches a class's full name or one of
its comma-separated synonyms (ImageNet's ``"tabby, tabby cat"``), ignoring case and repeated
spaces. A typo gets the closest names as a hint.

- :func:`resolve_class`: one entry (``--target`` gives one per argument);
- :func:`parse_classes`: a typed list (the explorer's text field): entries separated by
  newlines or ``;``, or by commas where the comma-joined text is not itself a class name.

Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import re
from typing import Dict, List, Optional, Sequence

__all__ = ["ClassNameError", "resolve_class", "parse_classes"]


class ClassNameError(ValueError):
    """A class index out of range, or a name that matches no class or several (one line)."""


def _words(text: str) -> str:
    return " ".join(text.lower().split())


def _synonyms(name: str) -> List[str]:
    return [_words(part) for part in name.split(",") if part.strip()]


def resolve_class(text: str, classes: Optional[Sequence[str]], outputs: int) -> int:
    """One class entry (an index or a class name) → a class index.

    Args:
        text (str): ``"281"``, ``"tabby cat"``, ``"Tabby, tabby cat"``.
        classes (sequence of str, optional): The model's class names (line ``i`` names
                    class ``i``); None when the model has none.
        outputs (int): The model's number of classes.

    Returns:
        The class index, in ``0..outputs - 1``.

    Raises:
        ClassNameError: An index out of range (negative ones too), a name when the model
                    has no class names, a name that matches no class (with the closest
                    names) or several (listed, to pick by index).

    Examples::

        >>> resolve_class("tabby cat", ["tiger cat", "tabby, tabby cat"], 2)
        1
    """
    entry = text.strip()
    if re.fullmatch(r"[+-]?\d+", entry):
        index = int(entry)
        if not 0 <= index < outputs:
            raise ClassNameError(
                f"target {index} is out of range: the model has {outputs} outputs "
                f"(0..{outputs - 1})"
            )
        return index
    if not classes:
        raise ClassNameError(
            f"{entry!r} is a class name, but this model has no class names: give a class "
            "index, or the names with --labels FILE"
        )
    wanted = _words(entry)
    hits = [
        i for i, name in enumerate(classes) if wanted == _words(name) or wanted in _synonyms(name)
    ]
    if len(hits) == 1:
        return hits[0]
    if hits:
        listed = ", ".join(f"{i} ({classes[i]})" for i in hits)
        raise ClassNameError(f"{entry!r} names several classes: {listed}; give the index")
    words: Dict[str, int] = {}
    for i, name in enumerate(classes):
        for synonym in _synonyms(name):
            words.setdefault(synonym, i)
    close = difflib.get_close_matches(wanted, list(words), n=3, cutoff=0.6)
    hint = (
        "; did you mean " + ", ".join(f"{c!r} ({words[c]})" for c in close) + "?" if close else ""
    )
    raise ClassNameError(f"unknown class name {entry!r} for this model{hint}")


def parse_classes(text: str, classes: Optional[Sequence[str]], outputs: int) -> List[int]:
    """A typed list of classes → class indices, in order, each once.

    Entries are separated by newlines or ``;``; within one, commas separate entries unless
    the whole text names a class (``"tabby, tabby cat"`` is one class, ``"tabby cat,
    remote control"`` two). Each entry is read by :func:`resolve_class`.

    Args:
        text (str): What was typed; empty entries are skipped.
        classes (sequence of str, optional): The model's class names.
        outputs (int): The model's number of classes.

    Returns:
        The class indices (empty if nothing was typed).

    Raises:
        ClassNameError: As :func:`resolve_class`, for the first bad entry.

    Examples::

        >>> parse_classes("circle, 3", ["circle", "square", "triangle", "cross"], 4)
        [0, 3]
    """
    indices: List[int] = []
    for chunk in re.split(r"[;\n]", text):
        if not chunk.strip():
            continue
        whole = _words(chunk)
        if classes and any(whole == _words(name) for name in classes):
            entries = [chunk]
        else:
            entries = [part for part in chunk.split(",") if part.strip()]
        for entry in entries:
            index = resolve_class(entry, classes, outputs)
            if index not in indices:
                indices.append(index)
    return indices
