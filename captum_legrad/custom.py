"""A :class:`~captum_legrad.ViTSpec` for your own ViT from a few lines: :func:`vit_spec`.

You name the transformer blocks and the head; one forward on an example batch finds the
rest: in each block, the submodule whose own forward computes the attention (calls
``F.scaled_dot_product_attention``, ``F.multi_head_attention_forward`` or a softmax over
3-D/4-D scores), the token layout (batch- or sequence-first), the prefix count (tokens
minus patches) and the patch size (the patch embedding's strided ``Conv2d``; for video or
spectrogram transformers, described by ``input_axes``, the ``Conv3d`` / ``Conv1d`` /
``Conv2d`` of the grid's rank, overlapping patches included).

The forward runs with gradients on (as LeGrad runs the blocks: ``nn.MultiheadAttention``
takes its fused fast path only without them) and with hooks that act only in the calling
thread and are removed afterwards; nothing of the model is changed.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._core.attention import is_attention
from ._core.hooks import ScopedHooks
from .adapters.common import floor_grid
from .errors import UnsupportedModelError
from .spec import IMAGE_AXES, InputAxes, Readout, TokenInput, ViTSpec

__all__ = ["find_attentions", "vit_spec"]

_POOLS = ("token", "avg")


class _Watcher(TorchFunctionMode):
    """Notes, for every attention computation, the innermost running module of a block."""

    def __init__(self, stack: List[Tuple[int, nn.Module]], calls: List[Tuple[int, nn.Module]]):
        super().__init__()
        self.stack = stack
        self.calls = calls

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        if is_attention(func, result) and self.stack:
            self.calls.append((self.stack[0][0], self.stack[-1][1]))
        return result


def _watch(
    blocks: Sequence[nn.Module], run: Callable[[], Any]
) -> Tuple[List[Tuple[int, nn.Module]], Dict[str, Any]]:
    """Run ``run()`` once; the (block, module) of every attention call, and the first
    block's input."""
    stack: List[Tuple[int, nn.Module]] = []
    calls: List[Tuple[int, nn.Module]] = []
    seen: Dict[str, Any] = {}

    def push(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            stack.append((index, module))

        return hook

    def pop(module: nn.Module, args: Any, output: Any) -> None:
        if stack and stack[-1][1] is module:
            stack.pop()

    def first_input(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        seen.setdefault("args", args)
        seen.setdefault("kwargs", kwargs)

    with ScopedHooks() as hooks:
        hooks.forward_pre(blocks[0], first_input, with_kwargs=True)
        for index, block in enumerate(blocks):
            for module in block.modules():
                hooks.forward_pre(module, push(index))
                hooks.forward(module, pop, always_call=True)
        with torch.enable_grad(), _Watcher(stack, calls):  # as LeGrad runs the blocks
            run()
    return calls, seen


def find_attentions(blocks: Sequence[nn.Module], run: Callable[[], Any]) -> Tuple[nn.Module, ...]:
    """The attention module of each block: the innermost submodule whose forward computes
    the block's attention during ``run()`` (one forward of the model).

    Args:
        blocks (Sequence[nn.Module]): The transformer blocks, in order.
        run (Callable): Runs the model once, e.g. ``lambda: model(example)``.

    Returns:
        One module per block.

    Raises:
        UnsupportedModelError: a block computes no attention LeGrad can record, or
            computes it more than once.

    Examples::

        >>> attentions = find_attentions(model.layers, lambda: model(images))
    """
    blocks = list(blocks)
    if not blocks:
        raise ValueError("blocks is empty: name the transformer blocks in order.")
    calls, _ = _watch(blocks, run)
    return _attentions(blocks, calls)


def _attentions(
    blocks: Sequence[nn.Module], calls: List[Tuple[int, nn.Module]]
) -> Tuple[nn.Module, ...]:
    found: List[nn.Module] = []
    for index, block in enumerate(blocks):
        modules = [module for which, module in calls if which == index]
        if not modules:
            raise UnsupportedModelError(
                f"Block {index} ({type(block).__name__}) computed no attention that LeGrad can "
                "record (F.scaled_dot_product_attention, nn.MultiheadAttention or a softmax "
                "over 3-D/4-D scores) during the forward; check that these are the "
                "transformer blocks and that the forward runs them, or build the ViTSpec by "
                "hand with the module whose output is the attention (output_attentions)."
            )
        if len(modules) > 1:
            names = ", ".join(type(m).__name__ for m in modules)
            raise UnsupportedModelError(
                f"Block {index} ({type(block).__name__}) computes attention {len(modules)} "
                f"times ({names}); LeGrad differentiates one attention per block. Name finer "
                "blocks, or build the ViTSpec by hand."
            )
        found.append(modules[0])
    return tuple(found)


_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _sizes(value: Any, rank: int, what: str) -> Tuple[int, ...]:
    """``value`` (an int, or one int per grid axis) as ``rank`` positive ints."""
    sizes = (
        tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * rank
    )
    if len(sizes) != rank or min(sizes) < 1:
        raise ValueError(f"{what} must be one positive size per grid axis ({rank}), got {value!r}.")
    return sizes


def _patch_embedding(
    model: nn.Module, blocks: Sequence[nn.Module], rank: int
) -> Tuple[Tuple[int, ...], Optional[Tuple[int, ...]]]:
    """``(patch size, stride or None)`` of the patch embedding: the first ``Conv{rank}d``
    outside the blocks whose stride equals its kernel, else the first whose stride is
    smaller (overlapping patches, as the Audio Spectrogram Transformer's)."""
    conv = _CONVS[rank]
    inside = {id(m) for block in blocks for m in block.modules()}
    candidates = [m for m in model.modules() if isinstance(m, conv) and id(m) not in inside]
    for module in candidates:
        if tuple(module.kernel_size) == tuple(module.stride):
            return tuple(module.kernel_size), None
    for module in candidates:
        kernel, stride = tuple(module.kernel_size), tuple(module.stride)
        if all(1 < s <= k for s, k in zip(stride, kernel)):
            return kernel, stride
    raise ValueError(
        f"{type(model).__name__} has no patch embedding vit_spec recognises (a "
        f"{conv.__name__} whose stride equals its kernel size, or is smaller); pass "
        "patch_size= (one size per grid axis) and, for overlapping patches, patch_stride="
    )


def _grid_rule(
    patch: Tuple[int, ...], stride: Optional[Tuple[int, ...]]
) -> Callable[..., Tuple[int, ...]]:
    """``sizes → grid``: ``n // p`` per axis for tiling patches, ``(n − p) // s + 1`` for
    patches every ``s`` cells."""
    if stride is None:
        if len(patch) == 2:
            return floor_grid((patch[0], patch[1]))

        def tiled(*sizes: int) -> Tuple[int, ...]:
            return tuple(int(n) // p for n, p in zip(sizes, patch))

        return tiled

    def strided(*sizes: int) -> Tuple[int, ...]:
        return tuple((int(n) - p) // s + 1 for n, p, s in zip(sizes, patch, stride))

    return strided


def vit_spec(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    head: Callable[[Tensor], Tensor],
    example: Tensor,
    *,
    norm: Optional[Callable[[Tensor], Tensor]] = None,
    pool: Optional[str] = None,
    patch_size: Optional[Any] = None,
    num_prefix_tokens: Optional[int] = None,
    model_readout: Optional[Readout] = None,
    token_input: Optional[TokenInput] = None,
    input_axes: Optional[InputAxes] = None,
    patch_stride: Optional[Any] = None,
    family: str = "custom",
) -> ViTSpec:
    """Describe a custom ViT from its blocks and its head; one forward on ``example``
    finds the attention modules, the prefix count and the token layout.

    The grid may have any rank: a video transformer's ``(t, h, w)`` tubelets or a
    spectrogram transformer's ``(f, t)`` patches are described by ``input_axes`` (where
    the grid's axes and the channels lie in the input); the patch size then comes from the
    patch embedding's ``Conv1d`` / ``Conv2d`` / ``Conv3d`` of that rank (kernel in grid
    order), overlapping patches (stride below the kernel) included.

    Args:
        model (nn.Module): The model LeGrad will run (its forward takes the image batch).
        blocks (Sequence[nn.Module]): The transformer blocks, in order (e.g. ``model.layers``).
        head (Callable): Pooled features ``(B, D)`` → scores ``(B, C)`` (the classifier).
        example (Tensor): An input batch the model accepts: images ``(B, C, H, W)``, or
                    the layout ``input_axes`` names.
        norm (Callable, optional): The final norm, applied before the head.
                    Default: None (none)
        pool (str, optional): The model's own pooling for ``pooling="model"``: ``"token"``
                    (the first token) or ``"avg"`` (mean over the patch tokens).
                    ``pooling="mean"`` always uses the mean over all tokens.
                    Default: None (``"token"`` with prefix tokens, else ``"avg"``)
        patch_size (int or tuple, optional): The patch size, one per grid axis.
                    Default: None (from the patch embedding's strided convolution)
        num_prefix_tokens (int, optional): ``P``.
                    Default: None (tokens at the first block minus patches)
        model_readout (Callable, optional): ``Z (B, N, D)`` → scores, replacing ``pool``.
                    Default: None
        token_input (TokenInput, optional): How the blocks take the tokens.
                    Default: None (their first parameter)
        input_axes (InputAxes, optional): Where the grid's axes and the channels are in
                    the input (video ``InputAxes(grid=(1, 3, 4), channels=2)`` for ``(B,
                    T, C, H, W)``; a spectrogram ``(B, time, mel)`` with frequency-first
                    tokens ``InputAxes(grid=(2, 1), channels=None)``).
                    Default: None (images ``(B, C, H, W)``)
        patch_stride (int or tuple, optional): The step between patches where they
                    overlap (``output="input"`` then gives each cell the mean of the
                    patches covering it).
                    Default: None (from the patch embedding, or tiling patches with
                    ``patch_size``)
        family (str, optional): Name in messages.
                    Default: "custom"

    Returns:
        A :class:`~captum_legrad.ViTSpec` for ``LeGrad(model, spec=...)``.

    Raises:
        UnsupportedModelError: a block computes no attention, or several.
        ValueError: the patch size or the prefix count cannot be determined.

    Examples::

        >>> spec = vit_spec(model, model.layers, model.classifier, images, norm=model.final)
        >>> attr = LeGrad(model, spec=spec).attribute(images, target=1)
        >>> video_axes = InputAxes(grid=(1, 3, 4), channels=2, name="video")
        >>> spec = vit_spec(video_model, video_model.blocks, video_model.head, videos,
        ...                 input_axes=video_axes)
    """
    blocks = tuple(blocks)
    if not blocks:
        raise ValueError("blocks is empty: name the transformer blocks in order.")
    calls, seen = _watch(blocks, lambda: model(example))
    attentions = _attentions(blocks, calls)
    tokens_in = token_input if token_input is not None else TokenInput.of(blocks[0])
    tokens = tokens_in.get(seen["args"], seen["kwargs"])
    if not isinstance(tokens, Tensor) or tokens.dim() != 3:
        raise ValueError(
            "vit_spec handles blocks that take (B, N, D) or (N, B, D) tokens; describe this "
            "model with a ViTSpec by hand."
        )
    batch = example.shape[0]
    batch_first = not (tokens.shape[1] == batch and tokens.shape[0] != batch)
    n_tokens = tokens.shape[1] if batch_first else tokens.shape[0]
    axes = input_axes if input_axes is not None else IMAGE_AXES
    rank = len(axes.grid)
    stride: Optional[Tuple[int, ...]] = None
    if patch_stride is not None:
        stride = _sizes(patch_stride, rank, "patch_stride")
    if patch_size is not None:
        patch = _sizes(patch_size, rank, "patch_size")
    else:
        patch, found = _patch_embedding(model, blocks, rank)
        stride = stride if stride is not None else found
    if stride == patch:
        stride = None
    grid = _grid_rule(patch, stride)
    cells = grid(*axes.sizes(example))
    n_patches = 1
    for size in cells:
        n_patches *= int(size)
    prefix = n_tokens - n_patches if num_prefix_tokens is None else int(num_prefix_tokens)
    if prefix < 0:
        shape = "x".join(str(int(c)) for c in cells)
        raise ValueError(
            f"The blocks see {n_tokens} tokens but a {shape} grid of {patch} patches has "
            f"{n_patches}: pass patch_size= (and num_prefix_tokens=)."
        )
    pooling = pool if pool is not None else ("token" if prefix else "avg")
    if pooling not in _POOLS:
        raise ValueError(f"pool must be one of {_POOLS}, got {pooling!r}.")
    final: Callable[[Tensor], Tensor] = norm if norm is not None else (lambda z: z)

    def mean_readout(z: Tensor) -> Tensor:
        return head(final(z.mean(dim=1)))

    def own_readout(z: Tensor) -> Tensor:
        pooled = z[:, 0] if pooling == "token" else z[:, prefix:].mean(dim=1)
        return head(final(pooled))

    return ViTSpec(
        family=family,
        root=model,
        blocks=blocks,
        attentions=attentions,
        readout=mean_readout,
        model_readout=model_readout if model_readout is not None else own_readout,
        num_prefix_tokens=prefix,
        patch_size=patch,
        grid=grid,
        batch_first=batch_first,
        token_input=tokens_in,
        input_axes=axes,
        patch_stride=stride,
    )
