"""Where things are in a Vision Transformer: :class:`ViTSpec` and :func:`discover`.

A :class:`ViTSpec` is the only thing the LeGrad computation needs to know about a
model. Adapters (one module per library under :mod:`captum_legrad.adapters`) build
it by recognising a model; users with a custom ViT build one by hand and pass it
as ``LeGrad(model, spec=...)``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

from torch import Tensor, nn

from .errors import UnsupportedModelError
from .resize import InputSize

__all__ = ["ViTSpec", "discover", "Readout", "GridRule", "UnsupportedModelError"]

#: Maps the residual stream ``Z`` of one layer, ``(B, N, D)`` batch-first, to
#: scores ``(B, ...)`` (logits or similarities) whose columns ``target`` selects.
Readout = Callable[[Tensor], Tensor]

#: Maps the input's spatial size ``(H, W)`` to the patch grid ``(g_h, g_w)``.
GridRule = Callable[[int, int], Tuple[int, int]]


@dataclass(frozen=True)
class ViTSpec:
    """Description of a Vision Transformer for LeGrad.

    Args:
        family: Name of the library or model family (``"timm"``, ``"custom"``, ...).
            Informational; appears in error messages.
        root: The module whose forward runs the transformer (the ViT itself). LeGrad
            scopes its hooks to modules below it and switches gradients off in it
            outside the blocks that need them.
        blocks: The transformer blocks, in order. The output of block ``l`` is the
            residual stream ``Z^l``; its first positional argument is its input.
        attentions: For each block, the module whose forward computes that block's
            attention probabilities ``A^l`` (B, heads, N, N). The module may use
            ``F.scaled_dot_product_attention`` (LeGrad computes it explicitly during
            the call) or an explicit ``softmax`` (recorded as is).
        readout: ``pooling="mean"`` readout: ``Z`` (B, N, D) to scores, through the
            mean over all tokens, the final norm and the head.
        model_readout: ``pooling="model"`` readout: the model's own pooling and head,
            so that the last layer's score equals the model output.
        num_prefix_tokens: ``P``, the tokens before the patch tokens (CLS,
            distillation, registers).
        patch_size: ``(p_h, p_w)`` in pixels.
        grid: Rule giving the patch grid ``(g_h, g_w)`` for an input of size
            ``(H, W)``; dynamic sizes and non-square grids are normal.
        pool_attention: For attention-pool readouts (SigLIP's MAP head, CoCa): the
            pooler module. The differentiated attention at layer ``l`` is then the
            pooler's attention computed on ``Z^l`` inside the readout, not block
            ``l``'s self-attention, and both readouts must run the pooler.
        pool_query: With ``pool_attention``: the latent query row to use (CoCa: 0);
            ``None`` averages all latent queries.
        batch_first: ``False`` when blocks exchange ``(N, B, D)`` tensors
            (OpenCLIP up to 2.23). Readouts always receive batch-first tokens.
        image_forward: For a model whose forward does not take the image batch first
            (HF ``CLIPModel`` / ``SiglipModel`` take ``input_ids`` first): a bound method of
            that model that runs it on images (``get_image_features``). ``LeGrad(model)``
            calls it in place of the model; any other ``forward_func`` is called as given.
        input_size: How the model runs at input sizes other than its training size (a
            :class:`~captum_legrad.resize.InputSize`: the native size, the patch size and
            the hooks that resample the position embedding for one call). ``None`` (the
            default, e.g. for custom specs): LeGrad runs the model at whatever size it is
            given and checks nothing.
    """

    family: str
    root: nn.Module
    blocks: Tuple[nn.Module, ...]
    attentions: Tuple[nn.Module, ...]
    readout: Readout
    model_readout: Readout
    num_prefix_tokens: int
    patch_size: Tuple[int, int]
    grid: GridRule
    pool_attention: Optional[nn.Module] = None
    pool_query: Optional[int] = None
    batch_first: bool = True
    image_forward: Optional[Callable[..., Any]] = None
    input_size: Optional[InputSize] = None

    def __post_init__(self) -> None:
        if len(self.blocks) == 0:
            raise ValueError("ViTSpec.blocks is empty: list the transformer blocks in order.")
        if len(self.attentions) != len(self.blocks):
            raise ValueError(
                f"ViTSpec has {len(self.blocks)} blocks but {len(self.attentions)} attention "
                "modules: give one attention module per block."
            )
        if self.num_prefix_tokens < 0:
            raise ValueError(
                f"ViTSpec.num_prefix_tokens must be >= 0, got {self.num_prefix_tokens}."
            )

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks)

    def grid_size(self, height: int, width: int) -> Tuple[int, int]:
        """Patch grid ``(g_h, g_w)`` for an input of ``height`` × ``width`` pixels."""
        g_h, g_w = self.grid(height, width)
        return int(g_h), int(g_w)


def discover(model: object) -> ViTSpec:
    """Find the Vision Transformer in ``model`` and describe it as a :class:`ViTSpec`.

    The model itself is tried first, then its submodules breadth-first, so a
    wrapper such as ``nn.Sequential(normalize, vit)`` is recognised too (the scores
    LeGrad differentiates then come from the inner ViT's head).

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
    from .adapters import match_model, supported_families

    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"LeGrad needs the model as an nn.Module to find its attention layers, got "
            f"{type(model).__name__}. Pass the model itself (not a function), or describe "
            "it with spec=ViTSpec(...)."
        )
    spec = match_model(model)
    if spec is not None:
        return spec
    queue = deque((name, child, 1) for name, child in model.named_children())
    found_depth: Optional[int] = None
    found: list[tuple[str, ViTSpec]] = []
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
