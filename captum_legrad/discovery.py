"""Finding the Vision Transformer in a model: :func:`discover`.

The adapters of :data:`captum_legrad.families.FAMILIES` are tried on the model, then on
its submodules breadth-first; a module that describes itself
(:class:`~captum_legrad.spec.DescribesViT`) is taken at its word. Recognising a model
never imports an optional library: an adapter is consulted only once its library has been
imported by the user.
"""

from __future__ import annotations

import importlib
import sys
from collections import deque
from typing import Any, List, Optional, Tuple

from torch import nn

from .errors import UnsupportedModelError
from .families import FAMILIES
from .spec import DescribesViT, ViTSpec

__all__ = ["discover", "match_model", "supported_families", "unwrap", "is_compiled"]


def is_compiled(module: object) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper (``OptimizedModule``)."""
    return isinstance(module, nn.Module) and type(module).__name__ == "OptimizedModule"


def unwrap(model: Any) -> Any:
    """The module a wrapper runs: ``nn.DataParallel`` / ``DistributedDataParallel``
    (``.module``) and ``torch.compile``'s ``OptimizedModule`` (``._orig_mod``), repeatedly.
    Anything else is returned as it is."""
    while isinstance(model, nn.Module):
        inner = None
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module
        elif is_compiled(model):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def match_model(model: nn.Module) -> Optional[ViTSpec]:
    """The :class:`ViTSpec` of ``model`` itself if a family recognises it, else ``None``."""
    if isinstance(model, DescribesViT):
        return model.legrad_spec()
    for row in FAMILIES:
        if row.library not in sys.modules:
            continue
        adapter = importlib.import_module(f"captum_legrad.adapters.{row.adapter}")
        spec: Optional[ViTSpec] = adapter.match(model)
        if spec is not None:
            return spec
    return None


def supported_families() -> str:
    """Human-readable list of the model families the adapters recognise."""
    return "; ".join(row.description for row in FAMILIES)


def discover(model: object) -> ViTSpec:
    """Find the Vision Transformer in ``model`` and describe it as a :class:`ViTSpec`.

    Wrappers (``nn.DataParallel``, ``DistributedDataParallel``, ``torch.compile``) are
    looked through: LeGrad then runs the module they wrap, eagerly, in the calling thread
    (``docs/design.md``, "Threads, processes and compiled models"). A compiled *submodule*
    is refused, since the model's own forward would run it compiled. The model itself is
    tried first, then its submodules breadth-first, so a wrapper such as
    ``nn.Sequential(normalize, vit)`` is recognised too (the scores LeGrad differentiates
    then come from the inner ViT's head).

    Args:
        model: A supported ViT (see the model-family table in the documentation), or a
            module containing exactly one at the shallowest depth where one occurs.

    Returns:
        The model's :class:`ViTSpec`.

    Raises:
        UnsupportedModelError: No supported ViT was found, or several were found at
            the same depth. The message lists what was looked for.

    Examples::

        >>> import timm
        >>> from captum_legrad import discover
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
        >>> spec = discover(vit)
        >>> spec.family, spec.num_layers, spec.num_prefix_tokens
        ('timm', 12, 1)
    """
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"LeGrad needs the model as an nn.Module to find its attention layers, got "
            f"{type(model).__name__}. Pass the model itself (not a function), or describe "
            "it with spec=ViTSpec(...)."
        )
    for name, module in model.named_modules():
        if name and is_compiled(module):
            raise UnsupportedModelError(
                f"{type(model).__name__} contains a torch.compile'd module ({name}); LeGrad runs "
                f"models eagerly and cannot look inside it: pass the uncompiled model (the "
                f"compiled one's ._orig_mod), or torch.compile the whole model instead."
            )
    spec = match_model(model)
    if spec is not None:
        return spec
    queue = deque((name, child, 1) for name, child in model.named_children())
    found_depth: Optional[int] = None
    found: List[Tuple[str, ViTSpec]] = []
    while queue:
        name, module, depth = queue.popleft()
        if found_depth is not None and depth > found_depth:
            break
        spec = match_model(module)
        if spec is not None:
            found_depth = depth
            found.append((name, spec))
            continue
        queue.extend((f"{name}.{n}", c, depth + 1) for n, c in module.named_children())
    if len(found) == 1:
        return found[0][1]
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise UnsupportedModelError(
            f"{type(model).__name__} contains several Vision Transformers ({names}); LeGrad "
            "cannot tell which one to explain. Pass spec=discover(model.<the one>)."
        )
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a Vision Transformer that captum_legrad recognises. "
        f"Looked for: {supported_families()}, in the model and its submodules. For a custom "
        "ViT, build a captum_legrad.ViTSpec (blocks, attention modules, readouts, prefix "
        "tokens, patch size, grid rule) and pass it as LeGrad(model, spec=...)."
    )
