"""Where things are in a Vision Transformer: :class:`ViTSpec`, plain validated data.

A :class:`ViTSpec` is the only thing the LeGrad computation (and every baseline) needs to
know about a model, and the single contract between the computation and the model
families: everything family-specific lives in it. Adapters (one module per library under
:mod:`captum_legrad.adapters`, listed in :mod:`captum_legrad.families`) build it by
recognising a model (:func:`captum_legrad.discover`); users with a custom ViT build one
by hand and pass it as ``LeGrad(model, spec=...)``. This module imports no adapter.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Dict,
    Optional,
    Protocol,
    Tuple,
    runtime_checkable,
)

import torch
from torch import Tensor, nn

from .errors import CaptureError

__all__ = [
    "ViTSpec",
    "TokenInput",
    "PatchLayout",
    "DescribesViT",
    "Readout",
    "GridRule",
    "LayoutRule",
    "ScoreRowRule",
]

#: Maps the residual stream ``Z`` of one layer, ``(B, N, D)`` batch-first, to
#: scores ``(B, ...)`` (logits or similarities) whose columns ``target`` selects.
Readout = Callable[[Tensor], Tensor]

#: Maps the input's spatial size ``(H, W)`` to the patch grid ``(g_h, g_w)``.
GridRule = Callable[[int, int], Tuple[int, int]]


@dataclass(frozen=True)
class TokenInput:
    """How a block receives the residual stream: a parameter of its ``forward``.

    A call binds the tokens either by position or by keyword, as Python does; both are
    named here so that LeGrad can cut the block's input from the graph whichever way the
    model calls its blocks.

    Attributes:
        name: The parameter's name (timm ``x``, HF ``hidden_states``, OpenCLIP ``q_x``,
            torchvision ``input``).
        position: Its position among the positional arguments (``self`` not counted).
    """

    name: str
    position: int = 0

    @classmethod
    def of(cls, block: nn.Module) -> TokenInput:
        """The first parameter of ``block.forward``: where blocks usually take tokens."""
        parameters = [
            p
            for p in inspect.signature(block.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if not parameters:
            raise ValueError(
                f"{type(block).__name__}.forward takes no positional parameter; give the "
                "ViTSpec a TokenInput(name, position) naming the one that carries the tokens."
            )
        return cls(parameters[0].name, 0)

    def get(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        """The tokens from a call's ``(args, kwargs)``."""
        if len(args) > self.position:
            return args[self.position]
        if self.name in kwargs:
            return kwargs[self.name]
        raise CaptureError(
            f"A transformer block was called without its token input {self.name!r} "
            f"(positional argument {self.position} or keyword {self.name}=); describe the "
            "model with a ViTSpec whose token_input names the parameter carrying the tokens."
        )

    def replace(
        self, args: Tuple[Any, ...], kwargs: Dict[str, Any], value: Any
    ) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        """``(args, kwargs)`` with the tokens replaced by ``value``."""
        if len(args) > self.position:
            return (*args[: self.position], value, *args[self.position + 1 :]), kwargs
        return args, {**kwargs, self.name: value}


@dataclass(frozen=True)
class PatchLayout:
    """Where the patches are among an attention's keys, for one batch.

    Attributes:
        keys: Key positions of the patch tokens in row-major grid order: ``(n,)`` when every
            sample has the same layout, or ``(B, n)`` per sample.
        grid: The patch grid ``(g_h, g_w)``; ``keys`` holds ``g_h · g_w`` positions.
    """

    keys: Tensor
    grid: Tuple[int, int]

    def __post_init__(self) -> None:
        g_h, g_w = self.grid
        if self.keys.dim() not in (1, 2) or self.keys.shape[-1] != g_h * g_w:
            raise ValueError(
                f"PatchLayout.keys must be (n,) or (B, n) with n = {g_h}x{g_w} = {g_h * g_w} "
                f"positions, got shape {tuple(self.keys.shape)}."
            )

    def gather(self, values: Tensor) -> Tensor:
        """``(…, B, N_k)`` values over the keys → ``(…, B, g_h, g_w)`` over the patches."""
        keys = self.keys.to(values.device)
        if keys.dim() == 1:
            patches = values.index_select(-1, keys)
        else:
            patches = values.gather(-1, keys.expand(*values.shape[:-1], -1))
        return patches.unflatten(-1, self.grid)


#: ``(inputs, n_keys) → PatchLayout``: the model's inputs as passed to its forward (the
#: image batch first) and the number of keys of its attention.
LayoutRule = Callable[[Tuple[Any, ...], int], PatchLayout]

#: ``inputs → (B, C)`` long tensor: for each score column, the one query row of the
#: attention it depends on (see :attr:`ViTSpec.score_rows`).
ScoreRowRule = Callable[[Tuple[Any, ...]], Tensor]


@dataclass(frozen=True)
class ViTSpec:
    """Description of a Vision Transformer for LeGrad.

    Args:
        family: Name of the library or model family (``"timm"``, ``"custom"``, ...).
            Informational; appears in error messages.
        root: The module whose forward runs the transformer (the ViT itself). LeGrad
            scopes its hooks to modules below it and switches gradients off in it
            outside the blocks that need them.
        blocks: The transformer blocks, in order. The output of block ``l`` (or its first
            element) is the residual stream ``Z^l``.
        attentions: For each block, the module whose forward computes that block's
            attention probabilities ``A^l`` (B, heads, N, N). The module may use
            ``F.scaled_dot_product_attention`` (LeGrad computes it explicitly during
            the call) or an explicit ``softmax`` (recorded as is).
        readout: ``pooling="mean"`` readout: ``Z`` (B, N, D) to scores, through the
            mean over all tokens, the final norm and the head. ``None`` with
            ``pool_attention``: an attention-pool readout has no mean-pooled variant, so
            both poolings run ``model_readout``.
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
            ``l``'s self-attention.
        pool_query: With ``pool_attention``: the latent query row to use (CoCa: 0);
            ``None`` averages all latent queries.
        batch_first: ``False`` when blocks exchange ``(N, B, D)`` tensors
            (OpenCLIP up to 2.23). Readouts always receive batch-first tokens.
        image_forward: For a model whose forward does not take the image batch first
            (HF ``CLIPModel`` / ``SiglipModel`` take ``input_ids`` first): a bound method of
            that model that runs it on images (``get_image_features``). ``LeGrad(model)``
            calls it in place of the model; any other ``forward_func`` is called as given.
        token_input: How the blocks receive the residual stream (a parameter of their
            ``forward``). Default: the first parameter of ``blocks[0].forward``.
        layout: Rule giving the patch key positions and grid for a batch
            (:data:`LayoutRule`). Default: the last ``g_h · g_w`` keys are the patches
            (after the ``num_prefix_tokens`` prefix keys), the grid from ``grid``. Models
            whose patches are not the last keys (padding, per-sample grids, image tokens
            inside a text sequence) give their own rule.
        score_rows: Optional rule (:data:`ScoreRowRule`) for readouts whose score
            column ``c`` of sample ``b`` depends on block ``l``'s attention only through
            query row ``rows[b, c]`` (a language model's logit at one position: every
            operation after the attention is per token). Targets on distinct rows then
            share one backward (each target's gradient is its own row of the summed
            gradient). Default None: one batched backward over the targets.

    Raises:
        ValueError: A field is inconsistent (no blocks, one attention module per block
            missing, a negative prefix count, a non-positive patch size, ``pool_query``
            without ``pool_attention``, a mean readout beside an attention pool).
    """

    family: str
    root: nn.Module
    blocks: Tuple[nn.Module, ...]
    attentions: Tuple[nn.Module, ...]
    readout: Optional[Readout]
    model_readout: Readout
    num_prefix_tokens: int
    patch_size: Tuple[int, int]
    grid: GridRule
    pool_attention: Optional[nn.Module] = None
    pool_query: Optional[int] = None
    batch_first: bool = True
    image_forward: Optional[Callable[..., Any]] = None
    token_input: Optional[TokenInput] = None
    layout: Optional[LayoutRule] = None
    score_rows: Optional[ScoreRowRule] = None

    def __post_init__(self) -> None:
        if not isinstance(self.root, nn.Module):
            raise ValueError(f"ViTSpec.root must be an nn.Module, got {type(self.root).__name__}.")
        if len(self.blocks) == 0:
            raise ValueError("ViTSpec.blocks is empty: list the transformer blocks in order.")
        if len(self.attentions) != len(self.blocks):
            raise ValueError(
                f"ViTSpec has {len(self.blocks)} blocks but {len(self.attentions)} attention "
                "modules: give one attention module per block."
            )
        for what, modules in (("blocks", self.blocks), ("attentions", self.attentions)):
            bad = [type(m).__name__ for m in modules if not isinstance(m, nn.Module)]
            if bad:
                raise ValueError(f"ViTSpec.{what} must hold nn.Modules, got {bad[0]}.")
        if isinstance(self.num_prefix_tokens, bool) or self.num_prefix_tokens < 0:
            raise ValueError(
                f"ViTSpec.num_prefix_tokens must be >= 0, got {self.num_prefix_tokens}."
            )
        if len(self.patch_size) != 2 or min(self.patch_size) < 1:
            raise ValueError(
                f"ViTSpec.patch_size must be (p_h, p_w) with positive sizes, got "
                f"{self.patch_size!r}."
            )
        if self.pool_query is not None and self.pool_attention is None:
            raise ValueError(
                "ViTSpec.pool_query selects a latent query of an attention pool: give "
                "pool_attention too, or leave pool_query=None."
            )
        if self.pool_attention is not None:
            if self.readout is not None and self.readout is not self.model_readout:
                raise ValueError(
                    "An attention-pool readout has no mean-pooled variant: with "
                    "pool_attention, leave readout=None (both poolings run model_readout)."
                )
            object.__setattr__(self, "readout", self.model_readout)
        elif self.readout is None:
            raise ValueError(
                "ViTSpec.readout (the pooling='mean' readout) is required without an "
                "attention pool."
            )
        if self.token_input is None:
            object.__setattr__(self, "token_input", TokenInput.of(self.blocks[0]))

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks)

    @property
    def tokens(self) -> TokenInput:
        """:attr:`token_input`, resolved."""
        assert self.token_input is not None  # set in __post_init__
        return self.token_input

    def read(self, pooling: str) -> Readout:
        """The readout of ``pooling`` (``"mean"`` or ``"model"``)."""
        if pooling == "model":
            return self.model_readout
        assert self.readout is not None  # set in __post_init__
        return self.readout

    def grid_size(self, height: int, width: int) -> Tuple[int, int]:
        """Patch grid ``(g_h, g_w)`` for an input of ``height`` × ``width`` pixels."""
        g_h, g_w = self.grid(height, width)
        return int(g_h), int(g_w)

    def patch_layout(self, inputs: Tuple[Any, ...], n_keys: int) -> PatchLayout:
        """The patch keys among ``n_keys`` attention keys for a forward on ``inputs``.

        Raises:
            CaptureError: the default rule does not fit (the number of keys is neither
                the patches nor the patches plus the prefix tokens).
        """
        if self.layout is not None:
            return self.layout(inputs, n_keys)
        image = inputs[0]
        g_h, g_w = self.grid_size(image.shape[-2], image.shape[-1])
        n_prefix = n_keys - g_h * g_w
        if n_prefix not in (0, self.num_prefix_tokens):
            raise CaptureError(
                f"The attention has {n_keys} keys but the patch grid is {g_h}x{g_w} "
                f"({g_h * g_w} patches) with {self.num_prefix_tokens} prefix tokens; check "
                "the ViTSpec's grid rule and num_prefix_tokens."
            )
        return PatchLayout(torch.arange(n_prefix, n_keys), (g_h, g_w))


@runtime_checkable
class DescribesViT(Protocol):
    """A module that describes itself to LeGrad (as :class:`~captum_legrad.ImageTextSimilarity`
    does): :func:`~captum_legrad.discover` returns its ``legrad_spec()``."""

    def legrad_spec(self) -> ViTSpec:
        """The :class:`ViTSpec` LeGrad uses for this module."""
        ...
