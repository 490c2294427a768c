"""Any input size: the position embedding resampled for one call, in one thread.

A ViT learns one position embedding per patch of its training grid, so an image of
another size (the authors run CLIP at 448² on models trained at 224²) needs an embedding
for the new grid. The reference code (``legrad-torch``) resamples it with timm's
``resample_abs_pos_embed`` (bicubic, antialias, prefix tokens kept) and writes the result
into the user's model. Here nothing is written anywhere, not even for the duration of
the call, since other threads may run the same model at the same time:

* where the model has its own mechanism, it is used: timm ``dynamic_img_size=True``
  models take any size as built, HF ``interpolate_pos_encoding`` is switched on in the
  keyword arguments of the calling thread's call of the embeddings module
  (``InputSize.enter`` registers a forward pre-hook through
  :class:`~captum_legrad._core.hooks.ScopedHooks`);
* otherwise (OpenCLIP, torchvision, static timm ViT and Eva) a ``TorchFunctionMode``,
  pushed by a forward pre-hook of the module that uses the embedding and popped by its
  forward hook, both acting only in the calling thread, hands every torch function that
  receives the embedding parameter (``x + pos_embed``, ``pos_embed.to(dtype)``, its
  ``.shape``) the resampled tensor instead; the model's own input-size assertions
  (timm's strict ``PatchEmbed``, torchvision's ``_process_input``), named by their
  messages, are waived in the same scope.

:func:`resample_position_embedding` is timm's ``resample_abs_pos_embed`` written out, so
it gives what the reference code and timm's dynamic models give; the tests compare it
with timm's function.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .hooks import ScopedHooks, mode_stack_guard

__all__ = [
    "InputSize",
    "Enter",
    "Replacements",
    "resample_position_embedding",
    "substitute_during",
    "at_input_size",
]

#: Registers, on the given :class:`ScopedHooks`, what makes the model run at the input
#: size ``(H, W)`` in the calling thread.
Enter = Callable[[ScopedHooks, Tuple[int, int]], None]

#: Given the new patch grid ``(g_h, g_w)``: ``(tensor of the model, tensor to use
#: instead)`` pairs.
Replacements = Callable[[Tuple[int, int]], List[Tuple[Tensor, Tensor]]]


@dataclass(frozen=True)
class InputSize:
    """How a model runs at an input size other than its training size.

    Args:
        native: The training input size ``(H, W)`` in pixels.
        patch_size: ``(p_h, p_w)``; other sizes must be multiples of it unless ``pads``.
        enter: Registers the hooks that make the model accept another size for one call
            in the calling thread; ``None`` when the model takes any size by itself (timm
            ``dynamic_img_size=True``, HF DINOv2).
        mechanism: What is used, in words (for messages and documentation).
        pads: The model pads inputs that are not a multiple of the patch size itself
            (timm ``dynamic_img_pad=True``).
    """

    native: Tuple[int, int]
    patch_size: Tuple[int, int]
    enter: Optional[Enter] = None
    mechanism: str = "the model's own"
    pads: bool = False


def resample_position_embedding(
    embedding: Tensor,
    old_grid: Tuple[int, int],
    new_grid: Tuple[int, int],
    num_prefix_tokens: int,
) -> Tensor:
    """Resample a learned position embedding to a new patch grid, as timm does.

    The ``num_prefix_tokens`` leading rows (CLS, registers) are kept as they are; the
    patch rows, row-major over ``old_grid``, are resized bicubically with antialiasing
    (``F.interpolate(..., mode="bicubic", antialias=True, align_corners=False)``) in
    float32 and cast back, as timm's ``resample_abs_pos_embed`` does.

    Args:
        embedding: ``(N, D)`` (OpenCLIP) or ``(1, N, D)`` (timm, torchvision), with
            ``N = num_prefix_tokens + old_grid[0] * old_grid[1]``.
        old_grid: The grid the embedding was learned for, ``(g_h, g_w)``.
        new_grid: The grid of the input, ``(g_h', g_w')``.
        num_prefix_tokens: Rows before the patch rows in ``embedding``.

    Returns:
        The embedding for ``new_grid``, of the same rank and dtype; ``embedding`` itself
        when the grids are equal.
    """
    if tuple(old_grid) == tuple(new_grid):
        return embedding
    width = embedding.shape[-1]
    rows = embedding.reshape(-1, width)
    expected = num_prefix_tokens + old_grid[0] * old_grid[1]
    if rows.shape[0] != expected:
        raise ValueError(
            f"The position embedding has {rows.shape[0]} rows, not {num_prefix_tokens} prefix "
            f"rows + a {old_grid[0]}x{old_grid[1]} grid; describe the model with a ViTSpec "
            "whose input_size matches it, or input_size=None."
        )
    prefix, patches = rows[:num_prefix_tokens], rows[num_prefix_tokens:]
    image = patches.float().reshape(1, old_grid[0], old_grid[1], width).permute(0, 3, 1, 2)
    image = F.interpolate(
        image, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False
    )
    patches = image.permute(0, 2, 3, 1).reshape(-1, width).to(embedding.dtype)
    resampled = torch.cat([prefix, patches]) if num_prefix_tokens else patches
    return resampled.reshape(*embedding.shape[:-2], -1, width)


class _Substitute(TorchFunctionMode):
    """Hands torch functions replacement tensors in place of the model's own, and waives
    the model's failing ``torch._assert`` calls whose message starts with ``waived``."""

    def __init__(self, pairs: Sequence[Tuple[Tensor, Tensor]], waived: Tuple[str, ...]) -> None:
        super().__init__()
        self.table: Dict[int, Tuple[Tensor, Tensor]] = {
            id(old): (old, new) for old, new in pairs if new is not old
        }
        self.waived = waived

    def _swap(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            entry = self.table.get(id(value))
            if entry is not None and entry[0] is value:
                return entry[1]
        return value

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch._assert and self.waived and args:
            message = args[1] if len(args) > 1 else kwargs.get("message")
            if not args[0] and isinstance(message, str) and message.startswith(self.waived):
                return None
        if self.table:
            args, kwargs = tree_map(self._swap, (tuple(args), kwargs))
        return func(*args, **kwargs)


def substitute_during(
    module: nn.Module,
    replacements: Replacements,
    patch_size: Tuple[int, int],
    waived: Tuple[str, ...] = (),
) -> Enter:
    """An :data:`Enter` that substitutes tensors while ``module``'s forward runs.

    A forward pre-hook of ``module`` computes the replacements for the input's grid (under
    ``no_grad``: the parameters get no gradient through them) and pushes a torch-function
    mode that hands them to every torch function receiving the originals; the forward
    hook (also run when the forward raises) pops it. Both act in the calling thread only.

    Args:
        module: The module whose forward uses the tensors (the ViT, OpenCLIP's
            ``.visual``).
        replacements: ``(g_h, g_w) → [(original, replacement), ...]``.
        patch_size: ``(p_h, p_w)``, giving the grid from the input size.
        waived: Messages (prefixes) of the model's input-size assertions to skip.
    """

    def enter(hooks: ScopedHooks, size: Tuple[int, int]) -> None:
        grid = (size[0] // patch_size[0], size[1] // patch_size[1])
        active: List[_Substitute] = []

        def push(mod: nn.Module, args: Any) -> None:
            with torch.no_grad():
                pairs = replacements(grid)
            mode = _Substitute(pairs, waived)
            mode.__enter__()
            active.append(mode)

        def pop(mod: nn.Module, args: Any, output: Any) -> None:
            if active:
                active.pop().__exit__(None, None, None)

        hooks.forward_pre(module, push)
        hooks.forward(module, pop, always_call=True)

    return enter


def _multiple(size: int, patch: int) -> int:
    return max(patch, size // patch * patch)


@contextmanager
def at_input_size(
    rule: Optional[InputSize],
    size: Tuple[int, int],
    *,
    resize_pos_embed: bool = True,
    family: str = "",
) -> Iterator[None]:
    """Run the model at ``size`` for the forwards inside the ``with`` block.

    Args:
        rule: The model's :class:`InputSize` (``ViTSpec.input_size``); ``None`` runs the
            model as it is (custom specs).
        size: The input's ``(H, W)``.
        resize_pos_embed: ``False`` refuses sizes other than the native one that the model
            does not take by itself.
        family: The model family, for messages.

    Raises:
        ValueError: ``size`` is not a multiple of the patch size (and is not the native
            size, and the model does not pad), or is not the native size while
            ``resize_pos_embed=False``.
    """
    if rule is None:
        yield
        return
    height, width = int(size[0]), int(size[1])
    p_h, p_w = rule.patch_size
    name = f"{family} model" if family else "model"
    native = (height, width) == tuple(rule.native)
    # the native size always runs as the model was built for it, even when it is not a
    # multiple of the patch (SigLIP so400m/14 at 384: the patch embedding drops the last
    # 6 pixels, as it does outside LeGrad)
    if not native and not rule.pads and (height % p_h or width % p_w):
        raise ValueError(
            f"The input is {height}x{width} pixels, not a multiple of the {name}'s {p_h}x{p_w} "
            f"patches. Resize or crop the images to a multiple of the patch size (e.g. "
            f"{_multiple(height, p_h)}x{_multiple(width, p_w)}); the native size is "
            f"{rule.native[0]}x{rule.native[1]}."
        )
    if native or rule.enter is None:
        yield
        return
    if not resize_pos_embed:
        raise ValueError(
            f"The input is {height}x{width} pixels but the {name} was trained at "
            f"{rule.native[0]}x{rule.native[1]}, and resize_pos_embed=False refuses other "
            f"sizes. Resize the images to {rule.native[0]}x{rule.native[1]}, or leave "
            "resize_pos_embed=True to resample the position embedding for the call "
            f"({rule.mechanism}; the model then runs outside its training resolution)."
        )
    with mode_stack_guard(), ScopedHooks() as hooks:
        rule.enter(hooks, (height, width))
        yield
