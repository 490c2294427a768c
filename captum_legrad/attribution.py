"""LeGrad as a Captum attribution: the public surface (``LeGrad``).

Argument handling, Captum's target forms and the output forms live here; the computation is
:mod:`captum_legrad._core.compute`, the output shaping :mod:`captum_legrad._core.maps`.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
    _is_tuple,
)
from captum._utils.typing import TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor

from ._core.arguments import (
    check_image,
    check_inputs_are_tensors,
    check_patches,
    check_values,
    dtype_mismatch,
    image_format,
    resolve_layers,
)
from ._core.compute import layer_maps, run_forward
from ._core.maps import aggregate_layers, empty_maps, empty_prompt_correction, finish, grid_mask
from ._core.options import AttributeOptions, check_pooling, check_route
from ._core.resize import at_input_size
from ._core.routes import get_route
from ._core.targets import TargetIndex, count_targets, multi_target_index, target_index
from .discovery import discover, unwrap
from .errors import UnsupportedModelError
from .spec import PatchLayout, ViTSpec

__all__ = ["LeGrad", "AttributeOptions"]

#: Builds the target index of a call for a model output of the given shape.
MakeIndex = Callable[[torch.Size, torch.device], TargetIndex]


def _pad_to(maps: Tensor, grid: Sequence[int]) -> Tensor:
    """``(…, *own)`` maps padded with zeros at the end of each grid axis to ``grid``."""
    pad: list = []
    for axis in range(len(grid)):
        pad = [0, int(grid[axis]) - maps.shape[maps.dim() - len(grid) + axis], *pad]
    return torch.nn.functional.pad(maps, pad)


def _slice_batch(arg: Any, batch: int, rows: slice) -> Any:
    """A chunk of an additional forward argument: tensors with the batch on dim 0 are cut."""
    if isinstance(arg, Tensor) and arg.dim() > 0 and arg.shape[0] == batch:
        return arg[rows]
    return arg


def _features_message(forward_func: Any, spec: ViTSpec) -> str:
    """Why ``LeGrad(model)`` refuses a model whose outputs are features, and what to use."""
    name = type(unwrap(forward_func)).__name__
    return (
        f"{name} ({spec.family}) returns an image embedding, not class scores: its outputs "
        "are feature dimensions, not classes, and target=k would explain dimension k as if "
        "it were a class. Explain a score of the embedding instead: "
        "ImageImageSimilarity(model, reference_embeddings) or "
        "ImageImageSimilarity.from_images(model, reference_images) (why an image is similar "
        "to references), ImageTextSimilarity(model, text_embeddings) (prompts), or "
        "FeatureDirection(model, directions) (projections on (K, D) directions: a linear "
        "probe's weight rows, SAE decoder rows; torch.eye(D) gives the dimensions "
        "themselves); e.g. LeGrad(ImageImageSimilarity.from_images(model, refs))"
        ".attribute(x, target=0)."
    )


class LeGrad(GradientAttribution):
    r"""LeGrad: the sensitivity of a Vision Transformer's own feature formation.

    For every selected block :math:`l` with residual stream :math:`Z^l` and attention
    probabilities :math:`A^l` (heads :math:`h`, query rows :math:`i`), the layer's tokens are
    read out through the model's head, :math:`s^l = \mathrm{head}(\mathrm{norm}(\mathrm{mean}
    \, Z^l))[\mathrm{target}]`, and

    .. math::

        E^l = \frac{1}{H N_q} \sum_{h, i} \max\!\left(\frac{\partial s^l}{\partial A^l_{h,i,:}},
        0\right), \qquad
        \mathrm{LeGrad} = \mathrm{norm}_{[0,1]}\,\mathrm{up}\Big(\sum_{l} E^l_{\text{patches}}\Big),

    the prefix keys (CLS, registers) dropped, the patch keys laid out on the patch grid,
    upsampled to the input and min-max normalised per sample and target
    (``docs/method.md``).

    All selected layers come from one forward and one backward: every selected block's
    input is cut from the graph, so :math:`\partial s^l / \partial A^m = 0` for
    :math:`m \ne l`. On the default lean route the model's own attention (fused
    ``F.scaled_dot_product_attention`` included) runs as it is and the gradient is formed
    from the attention output :math:`O^l = A^l V^l`, :math:`\partial s^l/\partial A^l =
    (\partial s^l/\partial O^l)\, {V^l}^\top`, in query chunks: the :math:`N \times N`
    matrix is never materialised and memory grows linearly with the tokens.
    ``route="explicit"`` differentiates the probabilities themselves (the cross-check).
    Several targets for the same images reuse the forward; the model is left exactly as it
    was.

    More details about the approach can be found in the following paper:
        https://arxiv.org/abs/2404.03214

    Args:
        forward_func (Callable): The model (a Vision Transformer, or a module
                    containing one), returning scores ``(B, C)``. A feature model
                    (its outputs are an image embedding: timm ``num_classes=0``,
                    HF ``Dinov2Model``, OpenCLIP, ...) raises
                    :class:`~captum_legrad.UnsupportedModelError`: explain a score
                    of its embedding through
                    :class:`~captum_legrad.ImageImageSimilarity`,
                    :class:`~captum_legrad.ImageTextSimilarity` or
                    :class:`~captum_legrad.FeatureDirection`.
        layers (Sequence[int], optional): Indices of the blocks whose maps are summed;
                    negative indices count from the end. ``[-2, -1]`` reproduces the
                    reference code's default.
                    Default: None (all blocks, as in the paper)
        pooling (str, optional): How a layer's tokens are read out: ``"mean"`` (mean
                    over all tokens, then the final norm and the head; the paper and
                    the reference code) or ``"model"`` (the model's own pooling, so the
                    last layer's score is the model's output). Attention-pool heads
                    (SigLIP's MAP) always use their pooler.
                    Default: "mean"
        spec (ViTSpec, optional): Describes a custom ViT instead of
                    :func:`~captum_legrad.discover`.
                    Default: None
        resize_pos_embed (bool, optional): Images of another size than the model's
                    training size (any multiple of the patch size, also non-square)
                    are explained with the position embedding resampled for the call
                    (bicubic with antialias, prefix tokens kept, as the reference code
                    and timm do; HF models use their own ``interpolate_pos_encoding``),
                    without changing the model. The model then runs outside its
                    training resolution. ``False`` raises a ``ValueError`` for such
                    sizes instead. Models that take any size themselves (timm
                    ``dynamic_img_size=True``) are run as they are either way.
                    Default: True
        route (str, optional): How the attention gradient is computed: ``"lean"``
                    from the attention output, ``∂s/∂A = (∂s/∂O)·Vᵀ``, never
                    materialising the attention matrix (the model's fused attention
                    runs as it is); ``"explicit"`` computes the probabilities
                    and differentiates them. Both give the same maps (to float
                    rounding); see the design notes for which models use which.
                    Default: "lean"

    Examples::

        >>> import timm, torch
        >>> from captum_legrad import LeGrad
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
        >>> legrad = LeGrad(model)
        >>> x = torch.randn(2, 3, 224, 224)
        >>> attr = legrad.attribute(x, target=torch.tensor([3, 7]))
        >>> attr.shape
        torch.Size([2, 3, 224, 224])
    """

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        layers: Optional[Sequence[int]] = None,
        *,
        pooling: str = "mean",
        spec: Optional[ViTSpec] = None,
        resize_pos_embed: bool = True,
        route: str = "lean",
    ) -> None:
        GradientAttribution.__init__(self, forward_func)
        self.pooling = check_pooling(pooling)
        self.route = check_route(route)
        if spec is not None and not isinstance(spec, ViTSpec):
            raise TypeError(f"spec must be a captum_legrad.ViTSpec, got {type(spec).__name__}.")
        self.spec: ViTSpec = spec if spec is not None else discover(forward_func)
        if self.spec.scores_are_features:
            raise UnsupportedModelError(_features_message(forward_func, self.spec))
        get_route(self.route).refuse(self.spec)  # differential attention: lean only
        self.layers: Tuple[int, ...] = resolve_layers(layers, self.spec.num_layers)
        self.resize_pos_embed = bool(resize_pos_embed)
        self._format = image_format(self.spec.root, self.spec.blocks)
        self._warned_zero = False

    @classmethod
    def get_name(cls) -> str:
        """The method's name in Captum's tools and Insights' menu: ``"LeGrad"``."""
        return "LeGrad"

    def attribute_future(self) -> None:
        raise NotImplementedError("attribute_future is not implemented for LeGrad")

    # ------------------------------------------------------------------ internals

    def _prepare(
        self, inputs: Any, additional_forward_args: Any
    ) -> Tuple[Tuple[Tensor, ...], Tuple[Any, ...]]:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "LeGrad needs gradients, which cannot be taken inside torch.inference_mode(); "
                "call attribute() outside it (an outer torch.no_grad() is fine)."
            )
        check_inputs_are_tensors(inputs)
        formatted = _format_tensor_into_tuples(inputs)
        if not formatted:
            raise ValueError("inputs is empty: pass the image batch (B, C, H, W).")
        if self.spec.samples is not None:  # dim 0 is not the batch (Qwen-VL's patches)
            check_values(formatted[0])
        elif (
            self.spec.patch_inputs and isinstance(formatted[0], Tensor) and formatted[0].dim() != 4
        ):
            check_patches(formatted[0])  # NaFlex: flattened patches, grids from the layout
        else:
            check_image(formatted[0], expected=self._format, axes=self.spec.input_axes)
        batch = formatted[0].shape[0]
        for extra in formatted[1:]:
            if self.spec.samples is not None:
                break
            if not isinstance(extra, Tensor) or extra.shape[:1] != (batch,):
                raise ValueError("every input tensor must have the batch size on dimension 0.")
        # Inference tensors cannot enter autograd; a clone made here can.
        formatted = tuple(t.clone() if t.is_inference() else t for t in formatted)
        args = _format_additional_forward_args(additional_forward_args) or ()
        if self.spec.root.training:
            warnings.warn(
                "The model is in training mode: dropout makes LeGrad maps random. Call "
                "model.eval() first.",
                stacklevel=3,
            )
        return formatted, args

    def _maps(
        self,
        inputs: Tuple[Tensor, ...],
        args: Tuple[Any, ...],
        make_index: MakeIndex,
        internal_batch_size: Optional[int],
    ) -> Tuple[Tensor, Optional[PatchLayout]]:
        """(B, K, L, g_h, g_w) per-layer maps for the targets ``make_index`` names.

        With ``internal_batch_size``, at most that many samples go through one forward and
        at most that many (sample, target) maps through one backward. With per-sample grids
        (NaFlex), also the batch's layout: the maps are then on its padded grid, each
        sample's in the top-left corner of its own grid, zero elsewhere; otherwise ``None``.
        """
        image = inputs[0]
        whole = self.spec.samples is not None  # an input without a batch dimension: one forward
        batch = self.spec.batch_size((*inputs, *args)) if whole else image.shape[0]
        step = batch if internal_batch_size is None or whole else internal_batch_size
        # A compiled or data-parallel model is explained through the module it wraps, eagerly.
        forward: Callable[..., Any] = unwrap(self.forward_func)
        image_forward = self.spec.image_forward
        if image_forward is not None and getattr(image_forward, "__self__", None) is forward:
            forward = image_forward  # e.g. HF CLIPModel, whose forward takes text first
        parts, layouts = [], []
        for start in range(0, batch, step):
            rows = slice(start, min(batch, start + step))
            try:
                with at_input_size(
                    self.spec.input_size,
                    (image.shape[-2], image.shape[-1]),
                    resize_pos_embed=self.resize_pos_embed,
                    family=self.spec.family,
                ):
                    result = run_forward(
                        self.spec,
                        forward,
                        inputs if whole else tuple(t[rows] for t in inputs),
                        args if whole else tuple(_slice_batch(arg, batch, rows) for arg in args),
                        self.layers,
                        self.pooling,
                        self.route,
                    )
            except RuntimeError as error:
                clearer = dtype_mismatch(image, self._format, error)
                if clearer is not None:
                    raise clearer from error
                raise
            full_shape = torch.Size((batch, *result.output_shape[1:]))
            index = tuple(i[rows] for i in make_index(full_shape, result.scores.device))
            chunk = None if internal_batch_size is None else internal_batch_size // len(index[0])
            parts.append(layer_maps(self.spec, result, index, chunk))
            layouts.append(result.layout)
        if all(layout.grids is None for layout in layouts):
            maps = torch.cat(parts).to(image.device)
            self._warn_if_zero(maps)
            return maps, None
        sizes = [part.shape[0] for part in parts]
        layout = PatchLayout.concat(layouts, sizes)
        parts = [_pad_to(p, layout.grid) for p in parts]
        maps = torch.cat(parts).to(image.device)
        self._warn_if_zero(maps)
        return maps, layout

    def _warn_if_zero(self, maps: Tensor) -> None:
        """Warn (once per LeGrad instance) when some (sample, target) map is all zeros."""
        if self._warned_zero or maps.numel() == 0:
            return
        zero = ~maps.flatten(start_dim=2).any(dim=-1)  # (B, K)
        if not zero.any():
            return
        self._warned_zero = True
        frame, level = sys._getframe(0), 1  # point the warning at the caller's line
        while frame.f_back is not None and str(frame.f_globals.get("__name__", "")).startswith(
            ("captum_legrad", "captum.")
        ):
            frame, level = frame.f_back, level + 1
        warnings.warn(
            f"LeGrad's maps are all zeros for {int(zero.sum())} of {zero.numel()} "
            "(sample, target) pairs: the score does not depend on the attention of the "
            "selected layers. The usual cause is a zero-initialised classification head "
            "(torchvision's and HF transformers' default init), whose logits are constant; "
            "load trained weights or initialise the head. (Warned once per LeGrad instance.)",
            stacklevel=level,
        )

    def _grid_maps(
        self,
        inputs: Tuple[Tensor, ...],
        args: Tuple[Any, ...],
        make_index: MakeIndex,
        options: AttributeOptions,
    ) -> Tuple[Tensor, Optional[PatchLayout]]:
        """(B, K, g_h, g_w) layer-summed maps, with the empty-prompt correction if asked,
        and the per-sample layout (``None`` for one grid)."""
        batch_size = options.internal_batch_size
        empty_target = options.empty_target
        if empty_target is None:
            maps, layout = self._maps(inputs, args, make_index, batch_size)
            return aggregate_layers(maps), layout

        def with_empty(shape: torch.Size, device: torch.device) -> TargetIndex:
            extra = target_index(empty_target, shape, device)
            return tuple(torch.cat(both, dim=1) for both in zip(make_index(shape, device), extra))

        maps, layout = self._maps(inputs, args, with_empty, batch_size)
        maps = aggregate_layers(maps)
        valid = None
        if layout is not None:
            valid = grid_mask(layout.sample_grids(0), layout.grid, maps.device)
        corrected = empty_prompt_correction(
            maps[:, :-1], maps[:, -1:], options.empty_threshold, valid
        )
        return corrected, layout

    def _explain(
        self,
        inputs: Any,
        additional_forward_args: Any,
        make_index: MakeIndex,
        k: int,
        options: AttributeOptions,
        per_target: bool,
    ) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        """The maps in ``options.output``'s form, and the formatted inputs."""
        formatted, args = self._prepare(inputs, additional_forward_args)
        image = formatted[0]
        if image.shape[0] == 0:
            grid_maps = empty_maps(image, k, self._grid(image))
            layout = None
        else:
            grid_maps, layout = self._grid_maps(formatted, args, make_index, options)
        maps = finish(
            grid_maps,
            layout,
            image,
            output=options.output,
            patch_size=self.spec.patch_size,
            interpolate_mode=options.interpolate_mode,
            normalize=options.normalize,
            per_target=per_target,
            axes=self.spec.input_axes,
            patch_stride=self.spec.patch_stride,
            forms=self.spec.map_forms,
            arguments=(*formatted, *args),
        )
        return maps, formatted

    def _grid(self, inputs: Tensor) -> Tuple[int, ...]:
        """The patch grid of ``inputs`` (zeros for patch sequences, whose grid is per sample)."""
        axes = self.spec.input_axes
        return self.spec.input_grid(inputs) if inputs.dim() == axes.ndim else (0,) * len(axes.grid)

    # ------------------------------------------------------------------ public API

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        *,
        interpolate_mode: str = "bilinear",
        normalize: bool = True,
        output: str = "input",
        empty_target: Optional[object] = None,
        empty_threshold: float = 0.8,
        internal_batch_size: Optional[int] = None,
    ) -> TensorOrTupleOfTensorsGeneric:
        r"""
        Args:

            inputs (Tensor or tuple[Tensor, ...]): Images ``(B, C, H, W)`` to explain. If
                        forward_func takes several tensors, pass a tuple whose first
                        element is the image batch; dimension 0 of every tensor is the
                        batch. NaFlex models (HF SigLIP2, timm ``NaFlexVit``) also take
                        flattened patches ``(B, N, p·p·C)``, with their mask / coordinates
                        / grids in ``additional_forward_args`` (see ``docs/models.md``).
            target (int, tuple, Tensor, or list, optional): Output indices to explain,
                        with Captum's meaning: an int or tuple (the same for every
                        sample), a 0-d tensor, or a list / 1-D tensor with one entry per
                        sample. ``None`` only for models with one score per sample.
                        Default: None
            additional_forward_args (Any, optional): Extra arguments passed to
                        forward_func after the inputs, as in Captum.
                        Default: None
            interpolate_mode (str, optional): Upsampling mode from the patch grid to the
                        input size (``align_corners=False``).
                        Default: "bilinear"
            normalize (bool, optional): Min-max normalise each map to [0, 1] (all zeros
                        for a constant map).
                        Default: True
            output (str, optional): ``"input"``: the input's shape, the map repeated over
                        channels; ``"map"``: ``(B, 1, H, W)``; ``"grid"``: ``(B, 1, g_h,
                        g_w)``, not upsampled. Per-sample grids (NaFlex patches): each
                        sample at its own size ``grid · patch_size``, padded to the batch's
                        largest with zeros; ``"input"`` is then the patch sequence's shape.
                        Default: "input"
            empty_target (int or tuple, optional): The target of an "empty" prompt
                        (e.g. ``"a photo of a"``) for the reference code's SigLIP
                        correction: where that prompt's min-max normalised map exceeds
                        ``empty_threshold``, the map is set to zero before upsampling and
                        normalisation. Off by default.
                        Default: None
            empty_threshold (float, optional): Threshold of the correction.
                        Default: 0.8
            internal_batch_size (int, optional): Bounds memory: at most this many samples
                        per forward and this many (sample, target) maps per backward.
                        Results do not depend on it.
                        Default: None (everything at once)

        Returns:
            *Tensor* or *tuple[Tensor, ...]* of **attributions**:
            - **attributions** (*Tensor* or *tuple[Tensor, ...]*):
                        The LeGrad maps, detached, on the input's device. A tensor input
                        gives a tensor, a tuple input a tuple of the same length; inputs
                        after the first (not images) get zeros of their own shape.

        Examples::

            >>> legrad = LeGrad(model)
            >>> attr = legrad.attribute(images, target=labels)
            >>> heat = legrad.attribute(images, target=3, output="map")  # (B, 1, H, W)
        """
        options = AttributeOptions(
            interpolate_mode, normalize, output, empty_target, empty_threshold, internal_batch_size
        )
        maps, formatted = self._explain(
            inputs,
            additional_forward_args,
            lambda shape, device: target_index(target, shape, device),
            1,
            options,
            per_target=False,
        )
        rest = tuple(torch.zeros_like(t) for t in formatted[1:])
        return _format_output(_is_tuple(inputs), (maps, *rest))

    @log_usage()
    def attribute_multi(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        targets: Union[Sequence[object], Tensor],
        additional_forward_args: Optional[object] = None,
        *,
        interpolate_mode: str = "bilinear",
        normalize: bool = True,
        output: str = "map",
        empty_target: Optional[object] = None,
        empty_threshold: float = 0.8,
        internal_batch_size: Optional[int] = None,
    ) -> Tensor:
        r"""Explain ``K`` targets for every image from a single forward.

        Args:

            inputs (Tensor or tuple[Tensor, ...]): As in :meth:`attribute`.
            targets (sequence or Tensor): ``K`` class indices (ints or tuples) explained
                        for every sample, or a ``(B, K)`` long tensor of per-sample
                        targets.
            additional_forward_args (Any, optional): As in :meth:`attribute`.
            interpolate_mode (str, optional): As in :meth:`attribute`.
                        Default: "bilinear"
            normalize (bool, optional): Min-max normalise each (sample, target) map.
                        Default: True
            output (str, optional): ``"map"``: ``(B, K, H, W)``; ``"grid"``: ``(B, K,
                        g_h, g_w)``; ``"input"``: ``(B, K, C, H, W)``, each target's map
                        in the input's shape.
                        Default: "map"
            empty_target (int or tuple, optional): As in :meth:`attribute`.
                        Default: None
            empty_threshold (float, optional): As in :meth:`attribute`.
                        Default: 0.8
            internal_batch_size (int, optional): As in :meth:`attribute`; with ``K =
                        1000`` classes, e.g. ``internal_batch_size=64`` keeps memory bounded.
                        Default: None

        Returns:
            *Tensor* of **attributions**: ``maps[:, k]`` equals ``attribute(inputs,
            target=targets[k], output=...)``.

        Examples::

            >>> maps = LeGrad(model).attribute_multi(images, targets=[3, 7, 9])
            >>> maps.shape  # (B, 3, H, W)
        """
        options = AttributeOptions(
            interpolate_mode, normalize, output, empty_target, empty_threshold, internal_batch_size
        )
        k = count_targets(targets)
        maps, _ = self._explain(
            inputs,
            additional_forward_args,
            lambda shape, device: multi_target_index(targets, shape, device),
            k,
            options,
            per_target=True,
        )
        return maps

    @log_usage()
    def attribute_layers(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        *,
        internal_batch_size: Optional[int] = None,
    ) -> Tensor:
        r"""The per-layer maps ``E^l`` before aggregation: ``(B, n_layers, g_h, g_w)``.

        Unnormalised and not upsampled, in float32 whatever the model's precision (half
        precision would flush 1e-7-scale maps of LayerScale models); layer ``i`` of the
        result is block ``self.layers[i]``. Summing over dimension 1, upsampling and min-max
        normalising gives :meth:`attribute` with ``output="map"``. With per-sample grids
        (NaFlex patches), the batch's padded grid: sample ``b``'s maps fill its own grid's
        top-left corner, zeros elsewhere.

        Args:

            inputs (Tensor or tuple[Tensor, ...]): As in :meth:`attribute`.
            target (int, tuple, Tensor, or list, optional): As in :meth:`attribute`.
            additional_forward_args (Any, optional): As in :meth:`attribute`.
            internal_batch_size (int, optional): As in :meth:`attribute`.

        Returns:
            *Tensor* ``(B, n_layers, g_h, g_w)``.

        Examples::

            >>> per_layer = LeGrad(model).attribute_layers(images, target=3)
        """
        options = AttributeOptions(output="grid", internal_batch_size=internal_batch_size)
        formatted, args = self._prepare(inputs, additional_forward_args)
        image = formatted[0]
        if image.shape[0] == 0:
            return empty_maps(image, 1, self._grid(image), len(self.layers)).float()[:, 0]
        maps, layout = self._maps(
            formatted,
            args,
            lambda shape, device: target_index(target, shape, device),
            options.internal_batch_size,
        )
        forms = self.spec.map_forms
        if forms is not None and layout is not None:  # the layers on the model's own grid
            maps, _ = forms.shape(maps[:, 0], layout, (*formatted, *args), "grid", "bilinear")
            return maps
        return maps[:, 0]
