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
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    FrozenSet,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    runtime_checkable,
)

import torch
from torch import Tensor, nn

from ._core.resize import InputSize
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
    "InputAxes",
    "AttentionSite",
    "MapForms",
    "MapFormRule",
    "InputFormRule",
    "SampleCount",
]

#: Maps the residual stream ``Z`` of one layer, ``(B, N, D)`` batch-first, to
#: scores ``(B, ...)`` (logits or similarities) whose columns ``target`` selects.
Readout = Callable[[Tensor], Tensor]

#: Maps the sizes of the input's grid axes (:attr:`InputAxes.grid`: ``(H, W)`` for images,
#: ``(T, H, W)`` for video, ``(F, T)`` for spectrograms) to the patch grid.
GridRule = Callable[..., Tuple[int, ...]]


@dataclass(frozen=True)
class InputAxes:
    """Where the patch grid lies in the model's main input tensor.

    Attributes:
        grid: The input dimensions of the grid's axes, in the grid's (token) order: ``(2,
            3)`` for images ``(B, C, H, W)``; ``(1, 3, 4)`` for HF video ``(B, T, C, H,
            W)``; ``(2, 1)`` for an Audio Spectrogram Transformer's ``(B, time, mel)``
            input, whose tokens run over frequency first.
        channels: The channel dimension (repeated in ``output="input"``), or None.
        name: What one input is, for messages (``"image"``, ``"video"``, ``"spectrogram"``).
    """

    grid: Tuple[int, ...] = (2, 3)
    channels: Optional[int] = 1
    name: str = "image"

    def __post_init__(self) -> None:
        dims = [*self.grid, *(() if self.channels is None else (self.channels,))]
        if not self.grid or min(dims) < 1 or len(set(dims)) != len(dims):
            raise ValueError(
                f"InputAxes needs distinct input dimensions >= 1 (0 is the batch) for the grid "
                f"{self.grid} and the channels {self.channels}."
            )

    @property
    def ndim(self) -> int:
        """The dimensions of one input batch."""
        return 1 + len(self.grid) + (0 if self.channels is None else 1)

    def sizes(self, inputs: Tensor) -> Tuple[int, ...]:
        """The sizes of the grid axes of ``inputs``, in grid order."""
        return tuple(int(inputs.shape[d]) for d in self.grid)

    def shape(self) -> str:
        """The expected layout, e.g. ``(B, C, H, W)``."""
        names = {0: "B"}
        letters = {2: ("H", "W"), 3: ("T", "H", "W")}.get(len(self.grid))
        for i, d in enumerate(self.grid):
            names[d] = letters[i] if letters else f"G{i}"
        if self.channels is not None:
            names[self.channels] = "C"
        return "(" + ", ".join(names[d] for d in range(self.ndim)) + ")"


#: Images ``(B, C, H, W)``.
IMAGE_AXES = InputAxes()


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


def _cells(grid: Sequence[int]) -> int:
    total = 1
    for size in grid:
        total *= int(size)
    return total


def _shape(grid: Sequence[int]) -> str:
    return "x".join(str(int(g)) for g in grid)


@dataclass(frozen=True)
class PatchLayout:
    """Where the patches are among an attention's keys, for one batch.

    The grid may have any rank: ``(g_h, g_w)`` for images, ``(t, g_h, g_w)`` for video,
    ``(f, t)`` for spectrograms, ``(n,)`` for a sequence.

    Attributes:
        keys: Positions of the patch tokens in row-major grid order: ``(n,)`` when every
            sample has the same layout, or ``(B, n)`` per sample. A position indexes the
            sample's attention values flattened over ``(rows, N_k)``: with ``rows = 1`` it
            is the key. With ``grids``, ``-1`` marks grid cells a sample does not have (its
            own grid is smaller than ``grid``): padding keys never appear.
        grid: The patch grid; ``keys`` holds ``prod(grid)`` positions. With ``grids``: the
            batch's padded grid, at least every sample's own grid.
        grids: Optional per-sample grids ``(B, rank)`` (NaFlex: variable patch grids).
            Sample ``b``'s patches fill the leading ``grids[b]`` corner of ``grid``; the
            other cells are ``-1`` in ``keys`` and zero in :meth:`gather`'s result.
        scale: Optional per-sample factor ``(B,)`` that :meth:`gather` applies. With
            padded query rows (whose gradients are zero), the mean over all query rows is
            the mean over the sample's own rows times ``valid / N_q``; ``scale = N_q /
            valid`` turns it back, so a sample in a padded batch gets the values it gets
            alone.
        row_offset: For patch-sequence inputs (``ViTSpec.patch_inputs``): the key of input
            row 0, so row ``r`` is key ``row_offset + r`` (the prefix count for
            self-attention; 0 for an attention pool that sees only the patches).
        rows: The attention's batch rows per sample: an attention computed separately per
            frame or per spatial position (TimeSformer's divided attention) has ``B ·
            rows`` rows, each sample's consecutive; ``keys`` then index the sample's
            ``rows × N_k`` values. Default 1.
    """

    keys: Tensor
    grid: Tuple[int, ...]
    grids: Optional[Tensor] = None
    scale: Optional[Tensor] = None
    row_offset: int = 0
    rows: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        n = _cells(self.grid)
        if len(self.grid) == 0 or self.keys.dim() not in (1, 2) or self.keys.shape[-1] != n:
            raise ValueError(
                f"PatchLayout.keys must be (n,) or (B, n) with n = {_shape(self.grid)} = {n} "
                f"positions, got shape {tuple(self.keys.shape)}."
            )
        if self.rows < 1:
            raise ValueError(f"PatchLayout.rows must be >= 1, got {self.rows}.")
        if self.grids is not None:
            rank = len(self.grid)
            if self.keys.dim() != 2 or tuple(self.grids.shape) != (self.keys.shape[0], rank):
                raise ValueError(
                    f"PatchLayout.grids must be (B, {rank}), one grid per sample, with (B, n) "
                    f"keys; got grids {tuple(self.grids.shape)} and keys "
                    f"{tuple(self.keys.shape)}."
                )
            limit = torch.tensor(self.grid, dtype=self.grids.dtype)
            if bool((self.grids.cpu() > limit).any()):
                raise ValueError(
                    f"PatchLayout.grid {self.grid} must hold every per-sample grid; got "
                    f"{self.grids.tolist()}."
                )
        if self.scale is not None and (
            self.keys.dim() != 2 or self.scale.shape != self.keys.shape[:1]
        ):
            raise ValueError(
                "PatchLayout.scale must be (B,), one factor per sample, with (B, n) keys."
            )

    @property
    def batch(self) -> Optional[int]:
        """The batch size for a per-sample layout, else ``None``."""
        return int(self.keys.shape[0]) if self.keys.dim() == 2 else None

    def sample_grids(self, batch: int) -> Tensor:
        """Each sample's own grid ``(batch, rank)`` (``grid`` for all without ``grids``)."""
        if self.grids is not None:
            return self.grids
        return torch.tensor([self.grid], dtype=torch.long).expand(batch, len(self.grid))

    def gather(self, values: Tensor) -> Tensor:
        """``(…, B·rows, N_k)`` values over the keys → ``(…, B, *grid)`` over the patches.

        Cells marked ``-1`` (outside a sample's own grid) are zero.
        """
        if self.rows != 1:
            values = values.unflatten(-2, (-1, self.rows)).flatten(-2)  # (…, B, rows·N_k)
        keys = self.keys.to(values.device)
        if keys.dim() == 1:
            patches = values.index_select(-1, keys)
        else:
            missing = keys < 0
            patches = values.gather(-1, keys.clamp(min=0).expand(*values.shape[:-1], -1))
            if bool(missing.any()):
                patches = patches.masked_fill(missing, 0.0)
            if self.scale is not None:
                patches = patches * self.scale.to(patches).unsqueeze(-1)
        return patches.unflatten(-1, self.grid)

    def padded(self, grid: Sequence[int]) -> PatchLayout:
        """This layout per sample over the larger grid ``grid`` (new cells ``-1``)."""
        grid = tuple(int(g) for g in grid)
        if len(grid) != len(self.grid) or any(a < b for a, b in zip(grid, self.grid)):
            raise ValueError(f"Cannot pad the grid {self.grid} to {grid}.")
        batch = self.batch
        if batch is None:
            raise ValueError("padded() needs a per-sample layout ((B, n) keys).")
        keys = self.keys.new_full((batch, *grid), -1)
        keys[(slice(None), *(slice(0, g) for g in self.grid))] = self.keys.view(batch, *self.grid)
        return PatchLayout(
            keys.flatten(1),
            grid,
            self.sample_grids(batch),
            self.scale,
            self.row_offset,
            self.rows,
        )

    @staticmethod
    def concat(layouts: Sequence[PatchLayout], batches: Sequence[int]) -> PatchLayout:
        """One per-sample layout for consecutive chunks of ``batches[i]`` samples each.

        Chunks may have different grids (of one rank): all are padded to the largest.
        """
        rank = len(layouts[0].grid)
        grid = tuple(max(lay.grid[d] for lay in layouts) for d in range(rank))
        parts = []
        for layout, batch in zip(layouts, batches):
            keys = layout.keys if layout.keys.dim() == 2 else layout.keys.expand(batch, -1)
            scale = layout.scale
            if scale is None:
                scale = torch.ones(batch)
            per_sample = PatchLayout(
                keys, layout.grid, layout.sample_grids(batch), scale, layout.row_offset,
                layout.rows,
            )  # fmt: skip
            parts.append(per_sample.padded(grid))
        return PatchLayout(
            torch.cat([p.keys.cpu() for p in parts]),
            grid,
            torch.cat([p.sample_grids(0).cpu() for p in parts]),
            torch.cat([p.scale.cpu() for p in parts if p.scale is not None]),
            layouts[0].row_offset,
            layouts[0].rows,
        )


#: ``(inputs, n_keys) → PatchLayout``: the model's inputs as passed to its forward (the
#: image batch first) and the number of keys of its attention.
LayoutRule = Callable[[Tuple[Any, ...], int], PatchLayout]

#: ``inputs → (B, C)`` long tensor: for each score column, the one query row of the
#: attention it depends on (see :attr:`ViTSpec.score_rows`).
ScoreRowRule = Callable[[Tuple[Any, ...]], Tensor]


#: ``(maps, layout, arguments, output, interpolate_mode) → (maps, valid)``: raw
#: layer-summed maps ``(B, K, *layout.grid)`` of a forward on ``arguments`` (the inputs, then
#: the additional forward arguments) → the ``output`` form (``"grid"`` or ``"map"``) ``(B, K,
#: *cells)`` and the boolean mask of each sample's own cells (broadcastable to the maps; None:
#: all cells), over which the maps are normalised.
MapFormRule = Callable[
    [Tensor, PatchLayout, Tuple[Any, ...], str, str], Tuple[Tensor, Optional[Tensor]]
]

#: ``(maps, arguments, per_target) → Tensor``: normalised ``"map"``-form maps → the main
#: input's shape (``output="input"``).
InputFormRule = Callable[[Tensor, Tuple[Any, ...], bool], Tensor]

#: ``arguments → B``: the number of samples of a forward on ``arguments`` (the inputs, then
#: the additional forward arguments).
SampleCount = Callable[[Tuple[Any, ...]], int]


@dataclass(frozen=True)
class MapForms:
    """The output forms of a model whose patch keys are not one grid of its main input (a
    vision-language model's image tokens: several images, views, videos per sample; see
    :attr:`ViTSpec.map_forms`).

    Attributes:
        shape: Raw maps on the layout's cells → ``"grid"`` / ``"map"`` form and the mask
            of valid cells (:data:`MapFormRule`). LeGrad normalises the result (min-max
            over each sample's valid cells, per target) when asked.
        to_input: The normalised ``"map"`` form → the main input's shape
            (:data:`InputFormRule`); None refuses ``output="input"``.
    """

    shape: MapFormRule
    to_input: Optional[InputFormRule] = None


@dataclass(frozen=True)
class AttentionSite:
    """One of several attention modules of a block whose maps make the block's map
    (:attr:`ViTSpec.sites`; TimeSformer: the temporal and the spatial attention).

    Attributes:
        module: The module whose forward computes this attention (one call per forward).
        layout: Where this attention's keys land on the patch grid, for a batch
            (:data:`LayoutRule`; e.g. ``rows > 1`` for an attention computed per frame).
        share: Its weight in the block's map: the block's ``E^l`` is ``Σ share · E``.
    """

    module: nn.Module
    layout: LayoutRule
    share: float = 1.0


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
            attention probabilities ``A^l`` (B, heads, N, N): with
            ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention`` or an explicit
            ``softmax`` (``captum_legrad.internals.attention_kind``).
        readout: ``pooling="mean"`` readout: ``Z`` (B, N, D) to scores, through the
            mean over all tokens, the final norm and the head. ``None`` with
            ``pool_attention``: an attention-pool readout has no mean-pooled variant, so
            both poolings run ``model_readout``.
        model_readout: ``pooling="model"`` readout: the model's own pooling and head,
            so that the last layer's score equals the model output.
        num_prefix_tokens: ``P``, the tokens before the patch tokens (CLS,
            distillation, registers).
        patch_size: The input cells one patch spans along each grid axis: ``(p_h, p_w)``
            pixels for images, ``(tubelet, p_h, p_w)`` for video.
        grid: Rule giving the patch grid for the sizes of the input's grid axes
            (:attr:`input_axes`): ``grid(H, W) -> (g_h, g_w)`` for images; dynamic sizes
            and non-square grids are normal.
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
            inside a text sequence) give their own rule. Per-sample grids (NaFlex) are a
            layout with ``grids`` (see :class:`PatchLayout`).
        readout_inputs: For readouts that need more than the tokens (a padding mask for
            masked pooling): a rule taking the forward's arguments (the inputs, then the
            additional forward arguments) to a tuple of extra arguments. Both readouts are
            then called ``readout(tokens, *extra)``; an extra tensor whose first dimension
            is the batch ``B`` is repeated to the ``L·B`` rows of stacked layers.
        patch_inputs: The model also takes its image as a sequence of flattened patches
            ``(B, N, p_h·p_w·C)`` (each patch in ``(p_h, p_w, C)`` order, input row ``r``
            being key ``PatchLayout.row_offset + r``), described per sample by ``layout``
            (NaFlex: timm ``NaFlexVit``, HF SigLIP2).
        input_size: How the model runs at input sizes other than its training size (a
            :class:`~captum_legrad.internals.InputSize`: the native size, the patch size and
            the hooks that resample the position embedding for one call). ``None`` (the
            default, e.g. for custom specs): LeGrad runs the model at whatever size it is
            given and checks nothing.
        output_attentions: Blocks (indices) whose attention module's *output* is ``A^l``,
            recorded as it is: for attentions whose tensor multiplied with ``V`` is not a
            single softmax (timm ConViT's gated mix of two softmaxes, CaiT's talking
            heads), name the module that returns it (timm's ``attn_drop``). Default: none.
        score_rows: Optional rule (:data:`ScoreRowRule`) for readouts whose score
            column ``c`` of sample ``b`` depends on block ``l``'s attention only through
            query row ``rows[b, c]`` (a language model's logit at one position: every
            operation after the attention is per token). Targets on distinct rows then
            share one backward (each target's gradient is its own row of the summed
            gradient). Default None: one batched backward over the targets.
        read_rows: Optional rule (:data:`ScoreRowRule`) giving the rows ``(B, R)`` at
            which the readout reads each block's output (a language model's logits at the
            predicting positions), for models whose blocks compute per token after their
            attention (a decoder layer: output projection, residual, norms, MLP or MoE).
            On the lean route, whose block graphs start at the attention output, every
            tensor a block saves for the backward is then kept at these rows only
            (:mod:`captum_legrad._core.saved`): the gradient at the other rows is zero, so
            the maps are the same, and the memory of the graph is linear in ``R`` instead
            of the sequence. Default None: whole tensors are kept.
        parallel_attentions: Blocks (indices) whose attention module runs several attention
            calls side by side whose outputs are summed into the residual stream, each
            through its own output projection (timm's ``ParallelThingsBlock``). Those
            calls are one multi-head attention whose heads are all their heads
            (concatenated heads followed by one projection are the sum of per-group
            projections), so ``A^l`` is their heads together: the layer's map is the mean
            over all of them. Default: none (exactly one attention call per block).
        product_inputs: For blocks whose ``A^l`` no single attention call computes
            (timm's differential attention, ``A = softmax₁ − λ·softmax₂``): block index →
            the module inside ``attentions[l]`` whose first input is the attention output
            ``O^l = A^l V^l`` ``(B, H, N, d)``; ``V^l`` is the value of the last attention
            product inside ``attentions[l]`` (``F.scaled_dot_product_attention``'s
            ``value`` or the right operand of ``matmul``). Only the lean route can explain
            these blocks (``∂s/∂A = dO·Vᵀ`` holds whatever ``A`` is); ``route="explicit"``
            is refused. Default: none.
        token_mean_readout: The ``pooling="mean"`` readout reads each ``Z^l`` only through
            its mean over all tokens (the adapters' mean readouts). Every token's gradient
            is then the same, and the lean route's backward through a block's
            :attr:`mlp_outputs` linear takes one row per sample. Default False (no
            assumption); it does not apply with ``pool_attention`` or ``readout_inputs``.
        input_axes: Where the grid's axes and the channels are in the main input
            (:class:`InputAxes`). Default: images ``(B, C, H, W)``.
        patch_stride: The step between neighbouring patches along each grid axis, for
            patch embeddings whose patches overlap (the Audio Spectrogram Transformer:
            16×16 patches every 10 cells). ``output="map"`` / ``"input"`` then give each
            input cell the mean of the maps of the patches covering it. Default None:
            the patches tile the input (stride = ``patch_size``).
        sites: Blocks with several attention modules whose maps make the block's map
            (TimeSformer's divided space-time attention): block index → its
            :class:`AttentionSite` s, each recorded on its own and laid out by its own
            rule; the block's ``E^l`` is their share-weighted sum. ``attentions[l]`` of
            such a block is not recorded. Default: none.
        mlp_outputs: Block index → the ``nn.Linear`` inside that block whose output reaches
            the block's output token-wise: the block computes ``x + t(W h + b)`` with that
            linear ``W h + b`` and ``t`` acting alike on every token (dropout in eval mode,
            LayerScale, drop path, the residual add). With :attr:`token_mean_readout`, the
            lean route's backward through it is one row per sample (exact). The adapters
            name it for the block classes they know; default: none (no assumption).
        samples: For main inputs whose dimension 0 is not the batch (Qwen-VL's flattened
            patches of every image of every sample): the number of samples of a forward
            (:data:`SampleCount`). Such inputs are checked only for being finite floating
            point tensors, are never split into chunks (``internal_batch_size`` then bounds
            the backward only), and need :attr:`layout` and :attr:`map_forms`. Default None
            (dimension 0 is the batch).
        map_forms: For models whose patch keys are not one grid of the main input: how
            the raw maps on the layout's cells become the output forms (:class:`MapForms`).
            Needs :attr:`layout`. Default None (the grid of :attr:`input_axes`, upsampled by
            :attr:`patch_size`).
        scores_are_features: The readouts return a feature vector (an image embedding:
            timm ``num_classes=0``, HF ``*Model`` / ``*VisionModel``, OpenCLIP towers,
            ``get_image_features``), not class scores. ``LeGrad(model)`` then refuses the
            model, since a target would be a feature dimension; the score wrappers
            (:class:`~captum_legrad.ImageImageSimilarity`,
            :class:`~captum_legrad.ImageTextSimilarity`,
            :class:`~captum_legrad.FeatureDirection`) read the embedding and describe
            themselves with ``False``. Default False (the readouts are class scores).

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
    patch_size: Tuple[int, ...]
    grid: GridRule
    pool_attention: Optional[nn.Module] = None
    pool_query: Optional[int] = None
    batch_first: bool = True
    image_forward: Optional[Callable[..., Any]] = None
    token_input: Optional[TokenInput] = None
    layout: Optional[LayoutRule] = None
    input_size: Optional[InputSize] = None
    readout_inputs: Optional[Callable[[Tuple[Any, ...]], Tuple[Any, ...]]] = None
    patch_inputs: bool = False
    output_attentions: FrozenSet[int] = frozenset()
    token_mean_readout: bool = False
    score_rows: Optional[ScoreRowRule] = None
    read_rows: Optional[ScoreRowRule] = None
    parallel_attentions: FrozenSet[int] = frozenset()
    product_inputs: Mapping[int, nn.Module] = field(default_factory=dict)
    mlp_outputs: Mapping[int, nn.Module] = field(default_factory=dict)
    input_axes: InputAxes = IMAGE_AXES
    patch_stride: Optional[Tuple[int, ...]] = None
    sites: Mapping[int, Tuple[AttentionSite, ...]] = field(default_factory=dict)
    scores_are_features: bool = False
    samples: Optional[SampleCount] = None
    map_forms: Optional[MapForms] = None

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
        rank = len(self.input_axes.grid)
        if len(self.patch_size) != rank or min(self.patch_size) < 1:
            raise ValueError(
                f"ViTSpec.patch_size must give a positive size for each of the {rank} grid "
                f"axes ({self.input_axes.name}), got {self.patch_size!r}."
            )
        if self.patch_stride is not None and (
            len(self.patch_stride) != rank or min(self.patch_stride) < 1
        ):
            raise ValueError(
                f"ViTSpec.patch_stride must give a positive step for each of the {rank} grid "
                f"axes, got {self.patch_stride!r}."
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
        if not isinstance(self.scores_are_features, bool):
            raise ValueError(
                "ViTSpec.scores_are_features must be True or False, got "
                f"{self.scores_are_features!r}."
            )
        if self.patch_inputs and self.layout is None:
            raise ValueError(
                "ViTSpec.patch_inputs needs a layout rule: patch sequences carry no image "
                "size, so the grid of each sample must come from the layout."
            )
        if self.map_forms is not None and (
            self.layout is None or not isinstance(self.map_forms, MapForms)
        ):
            raise ValueError(
                "ViTSpec.map_forms must be a MapForms and needs a layout rule: the forms are "
                "built from the layout's cells."
            )
        if self.samples is not None and (self.map_forms is None or not callable(self.samples)):
            raise ValueError(
                "ViTSpec.samples (a main input whose dimension 0 is not the batch) needs "
                "map_forms: such an input has no image size to upsample to."
            )
        if self.pool_attention is not None or self.readout_inputs is not None:
            object.__setattr__(self, "token_mean_readout", False)
        if self.token_input is None:
            object.__setattr__(self, "token_input", TokenInput.of(self.blocks[0]))
        for name, indices in (
            ("output_attentions", self.output_attentions),
            ("parallel_attentions", self.parallel_attentions),
            ("product_inputs", self.product_inputs),
            ("mlp_outputs", self.mlp_outputs),
            ("sites", self.sites),
        ):
            outside = sorted(i for i in indices if not 0 <= i < len(self.blocks))
            if outside:
                raise ValueError(
                    f"ViTSpec.{name} names blocks {outside}, but there are "
                    f"{len(self.blocks)} blocks: give indices 0..{len(self.blocks) - 1}."
                )
        mapped = self.product_inputs.values()
        bad = [type(m).__name__ for m in mapped if not isinstance(m, nn.Module)]
        if bad:
            raise ValueError(f"ViTSpec.product_inputs must map to nn.Modules, got {bad[0]}.")
        for index, linear in self.mlp_outputs.items():
            if type(linear) is not nn.Linear or not any(
                m is linear for m in self.blocks[index].modules()
            ):
                raise ValueError(
                    f"ViTSpec.mlp_outputs[{index}] must be an nn.Linear inside block {index}, "
                    f"got {type(linear).__name__}."
                )
        for index, sites in self.sites.items():
            if not sites or not all(
                isinstance(site, AttentionSite) and isinstance(site.module, nn.Module)
                for site in sites
            ):
                raise ValueError(
                    f"ViTSpec.sites[{index}] must be a non-empty tuple of AttentionSite s "
                    "(module, layout rule, share)."
                )

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks)

    @property
    def tokens(self) -> TokenInput:
        """:attr:`token_input`, resolved."""
        assert self.token_input is not None  # set in __post_init__
        return self.token_input

    def mlp_output(self, layer: int) -> Optional[nn.Module]:
        """Block ``layer``'s :attr:`mlp_outputs` linear, or None: none is named, or the block
        is in training mode (dropout then acts differently on every token)."""
        linear = self.mlp_outputs.get(layer)
        if linear is None or self.blocks[layer].training:
            return None
        return linear

    def read(self, pooling: str) -> Readout:
        """The readout of ``pooling`` (``"mean"`` or ``"model"``)."""
        if pooling == "model":
            return self.model_readout
        assert self.readout is not None  # set in __post_init__
        return self.readout

    def extra_readout_inputs(self, arguments: Tuple[Any, ...], rows: int) -> Tuple[Any, ...]:
        """The extra readout arguments for a forward on ``arguments`` (inputs, then additional
        forward arguments), tensors with the batch on dim 0 repeated to ``rows`` rows."""
        if self.readout_inputs is None:
            return ()
        batch = arguments[0].shape[0] if arguments and isinstance(arguments[0], Tensor) else 0
        extra = []
        for value in self.readout_inputs(arguments):
            if isinstance(value, Tensor) and value.dim() > 0 and batch and rows != batch:
                if value.shape[0] == batch and rows % batch == 0:
                    value = value.repeat(rows // batch, *([1] * (value.dim() - 1)))
            extra.append(value)
        return tuple(extra)

    def batch_size(self, arguments: Tuple[Any, ...]) -> int:
        """The samples of a forward on ``arguments`` (inputs, then additional forward
        arguments): :attr:`samples`' count, else dimension 0 of the main input."""
        if self.samples is not None:
            return int(self.samples(arguments))
        return int(arguments[0].shape[0])

    def grid_size(self, *sizes: int) -> Tuple[int, ...]:
        """The patch grid for an input whose grid axes have ``sizes`` (``height, width``
        for images)."""
        return tuple(int(g) for g in self.grid(*sizes))

    def input_grid(self, inputs: Tensor) -> Tuple[int, ...]:
        """The patch grid of the input batch ``inputs`` (:attr:`input_axes`)."""
        return self.grid_size(*self.input_axes.sizes(inputs))

    def patch_layout(self, inputs: Tuple[Any, ...], n_keys: int) -> PatchLayout:
        """The patch keys among ``n_keys`` attention keys for a forward on ``inputs``.

        Raises:
            CaptureError: the default rule does not fit (the number of keys is neither
                the patches nor the patches plus the prefix tokens).
        """
        if self.layout is not None:
            return self.layout(inputs, n_keys)
        grid = self.input_grid(inputs[0])
        n = _cells(grid)
        n_prefix = n_keys - n
        if n_prefix not in (0, self.num_prefix_tokens):
            raise CaptureError(
                f"The attention has {n_keys} keys but the patch grid is {_shape(grid)} "
                f"({n} patches) with {self.num_prefix_tokens} prefix tokens; check "
                "the ViTSpec's grid rule and num_prefix_tokens."
            )
        return PatchLayout(torch.arange(n_prefix, n_keys), grid)


@runtime_checkable
class DescribesViT(Protocol):
    """A module that describes itself to LeGrad (as :class:`~captum_legrad.ImageTextSimilarity`
    does): :func:`~captum_legrad.discover` returns its ``legrad_spec()``."""

    def legrad_spec(self) -> ViTSpec:
        """The :class:`ViTSpec` LeGrad uses for this module."""
        ...
