"""Attention-based baselines for Vision Transformers, through Captum's ``attribute`` interface.

All of them find the model's blocks with :func:`~captum_legrad.discover` and read the
attention probabilities (recorded on the explicit route, as LeGrad records them) on
``spec.attentions`` (fused attention included, nothing about the model changed), so they
support every model family LeGrad supports, at any input size LeGrad takes (the position
embedding resampled for the call).

- :class:`RawAttention`: last layer's attention, mean over heads, the CLS row (the mean over
  query rows for models without prefix tokens). Class-agnostic.
- :class:`AttentionRollout`: Abnar & Zuidema (2020), ``Â^l = ½ mean_h A^l + ½ I``, rolled out
  over all layers. Class-agnostic.
- :class:`GenericAttention`: Chefer et al. (2021) "Generic Attention-model Explainability":
  ``R = I``, ``R ← R + mean_h(relu(∇A^l ⊙ A^l)) · R`` over all layers.
- :class:`ViTGradCAM`: Grad-CAM on the tokens entering the last block, the prefix tokens
  dropped and the patch tokens reshaped to the grid of the discovered spec.

Each returns maps upsampled bilinearly to the input size, not normalised (as Captum's own
methods), repeated over the channels unless ``output="map"`` or ``"grid"``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
from captum._utils.common import _format_additional_forward_args
from captum._utils.typing import TargetType
from captum.attr import GradientAttribution
from torch import Tensor, nn

from .._core.arguments import (
    check_image,
    check_inputs_are_tensors,
    check_patches,
    dtype_mismatch,
    image_format,
    resolve_layer,
)
from .._core.capture import record_attention
from .._core.hooks import ScopedHooks
from .._core.maps import finish
from .._core.options import check_output
from .._core.resize import at_input_size
from .._core.targets import select_targets
from ..discovery import discover, unwrap
from ..errors import CaptureError
from ..spec import PatchLayout, ViTSpec

__all__ = ["RawAttention", "AttentionRollout", "GenericAttention", "ViTGradCAM"]


class _ViTBaseline(GradientAttribution):
    """Shared plumbing: discovery, argument checks, prefix dropping and output shapes."""

    def __init__(self, forward_func: Callable[..., Tensor], *, spec: Optional[ViTSpec] = None):
        GradientAttribution.__init__(self, forward_func)
        if spec is not None and not isinstance(spec, ViTSpec):
            raise TypeError(f"spec must be a captum_legrad.ViTSpec, got {type(spec).__name__}.")
        self.spec: ViTSpec = spec if spec is not None else discover(forward_func)
        self._format = image_format(self.spec.root, self.spec.blocks)

    def attribute_future(self) -> None:
        raise NotImplementedError(f"attribute_future is not implemented for {self.get_name()}")

    def _check(self, inputs: Tensor, output: str) -> None:
        check_output(output)
        check_inputs_are_tensors(inputs, self.get_name())
        if self.spec.patch_inputs and isinstance(inputs, Tensor) and inputs.dim() != 4:
            check_patches(inputs, self.get_name())  # NaFlex patch sequence
        else:
            check_image(inputs, self.get_name(), self._format)

    def _forward(self, image: Tensor, args: Tuple[Any, ...]) -> Any:
        """The model on ``image``; a dtype mismatch gets LeGrad's one-line error."""
        try:
            return unwrap(self.forward_func)(image, *args)
        except RuntimeError as error:
            clearer = dtype_mismatch(image, self._format, error)
            if clearer is not None:
                raise clearer from error
            raise

    def _layout(self, image: Tensor, args: Tuple[Any, ...], n_keys: int) -> PatchLayout:
        """The patch keys among ``n_keys`` (per sample for NaFlex inputs), unscaled (the
        layout's ``scale`` corrects LeGrad's query mean only)."""
        return dataclasses.replace(self.spec.patch_layout((image, *args), n_keys), scale=None)

    def _query_row(self, matrix: Tensor, layout: PatchLayout) -> Tensor:
        """``(B, N, N)`` → ``(B, N)``: the CLS row, or the mean over rows without prefix
        (over each sample's own patch rows with per-sample grids: padding rows excluded)."""
        if self.spec.num_prefix_tokens > 0:
            return matrix[:, 0]
        if layout.grids is None:
            return matrix.mean(dim=1)
        batch, n = matrix.shape[0], matrix.shape[-1]
        keys = layout.keys.to(matrix.device)
        rows = torch.zeros(batch, n + 1, dtype=matrix.dtype, device=matrix.device)
        rows.scatter_(1, torch.where(keys >= 0, keys, n), 1.0)
        rows = rows[:, :n]
        return (rows.unsqueeze(-1) * matrix).sum(dim=1) / rows.sum(dim=1, keepdim=True)

    def _finish(
        self, grid: Tensor, image: Tensor, output: str, layout: Optional[PatchLayout] = None
    ) -> Tensor:
        """Grid maps → ``output`` as LeGrad shapes them, not normalised (Captum's methods
        are not)."""
        return finish(
            grid.detach(),
            layout,
            image,
            output=output,
            patch_size=self.spec.patch_size,
            normalize=False,
        )

    def _sized(self, image: Tensor) -> ContextManager[None]:
        """The model at ``image``'s size for the call (position embedding resampled)."""
        size = (image.shape[-2], image.shape[-1])
        return at_input_size(self.spec.input_size, size, family=self.spec.family)

    def _record(
        self,
        image: Tensor,
        args: Tuple[Any, ...],
        layers: Sequence[int],
        differentiable: bool,
    ) -> Tuple[Any, List[Tensor]]:
        """Run the model once, returning its output and ``A^l`` (B, H, N, N) of ``layers``."""
        split = [
            layer
            for layer in layers
            if layer in self.spec.parallel_attentions or layer in self.spec.product_inputs
        ]
        if split:
            raise CaptureError(
                f"{self.get_name()} needs each block's attention probabilities as one tensor, "
                f"but blocks {split} of this {self.spec.family} model compute their attention "
                "as parallel head groups or as a differential matrix (softmax1 - lambda * "
                "softmax2) that is never one tensor. LeGrad itself explains these blocks."
            )
        modules = [self.spec.attentions[layer] for layer in layers]
        with (
            torch.set_grad_enabled(differentiable),
            self._sized(image),
            record_attention(modules, route="explicit") as records,
        ):
            output = self._forward(image, args)
        attentions = []
        for layer, found in zip(layers, records):
            if len(found) != 1:
                raise CaptureError(
                    f"Expected one attention computation in block {layer}, saw {len(found)}."
                )
            record = found[0]  # the explicit route records the probabilities
            attentions.append(record.leaf)
        return output, attentions

    def _scores(self, output: Any, target: TargetType) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"{self.get_name()} needs the model to return a tensor of scores, got "
                f"{type(output).__name__}."
            )
        return select_targets(output, target)


class RawAttention(_ViTBaseline):
    r"""Raw attention of the last layer (class-agnostic).

    The last block's attention probabilities averaged over heads; the CLS token's row over
    the patch keys, or for models without prefix tokens the mean over all query rows.

    Args:
        forward_func (Callable): A Vision Transformer (or a module containing one).
        layer (int, optional): The block whose attention is shown.
                    Default: -1
        spec (ViTSpec, optional): Overrides :func:`~captum_legrad.discover`.

    Examples::

        >>> attr = RawAttention(model).attribute(images)  # (B, C, H, W)
    """

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        layer: int = -1,
        *,
        spec: Optional[ViTSpec] = None,
    ) -> None:
        super().__init__(forward_func, spec=spec)
        self.layer = resolve_layer(layer, self.spec.num_layers)

    @classmethod
    def get_name(cls) -> str:
        return "Raw attention"

    def attribute(
        self,
        inputs: Tensor,
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        *,
        output: str = "input",
    ) -> Tensor:
        r"""
        Args:

            inputs (Tensor): Images ``(B, C, H, W)``.
            target (int, tuple, Tensor, or list, optional): Ignored (the method is
                        class-agnostic); accepted for Captum compatibility.
                        Default: None
            additional_forward_args (Any, optional): Passed to the model after the images.
                        Default: None
            output (str, optional): ``"input"`` (B, C, H, W), ``"map"`` (B, 1, H, W) or
                        ``"grid"`` (B, 1, g_h, g_w).
                        Default: "input"

        Returns:
            *Tensor* of **attributions**, detached.
        """
        self._check(inputs, output)
        args = _format_additional_forward_args(additional_forward_args) or ()
        _, (attention,) = self._record(inputs, args, [self.layer], differentiable=False)
        layout = self._layout(inputs, args, attention.shape[-1])
        row = self._query_row(attention.mean(dim=1), layout)
        return self._finish(layout.gather(row).unsqueeze(1), inputs, output, layout)


class AttentionRollout(_ViTBaseline):
    r"""Attention rollout (Abnar & Zuidema, 2020), class-agnostic.

    ``Â^l = ½ mean_h(A^l) + ½ I`` (rows re-normalised), ``R = Â^L ⋯ Â^1``; the CLS token's
    row of ``R`` over the patch keys (the mean over rows without prefix tokens).

    More details: https://arxiv.org/abs/2005.00928

    Args:
        forward_func (Callable): A Vision Transformer (or a module containing one).
        spec (ViTSpec, optional): Overrides :func:`~captum_legrad.discover`.

    Examples::

        >>> attr = AttentionRollout(model).attribute(images)
    """

    @classmethod
    def get_name(cls) -> str:
        return "Attention rollout"

    def attribute(
        self,
        inputs: Tensor,
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        *,
        output: str = "input",
    ) -> Tensor:
        r"""
        Args:

            inputs (Tensor): Images ``(B, C, H, W)``.
            target (int, tuple, Tensor, or list, optional): Ignored (class-agnostic).
                        Default: None
            additional_forward_args (Any, optional): Passed to the model after the images.
                        Default: None
            output (str, optional): ``"input"``, ``"map"`` or ``"grid"``.
                        Default: "input"

        Returns:
            *Tensor* of **attributions**, detached.
        """
        self._check(inputs, output)
        args = _format_additional_forward_args(additional_forward_args) or ()
        layers = range(self.spec.num_layers)
        _, attentions = self._record(inputs, args, list(layers), differentiable=False)
        rollout: Optional[Tensor] = None
        for attention in attentions:
            mean = attention.mean(dim=1).double()
            eye = torch.eye(mean.shape[-1], dtype=mean.dtype, device=mean.device)
            step = 0.5 * mean + 0.5 * eye
            step = step / step.sum(dim=-1, keepdim=True)
            rollout = step if rollout is None else step @ rollout
        assert rollout is not None
        layout = self._layout(inputs, args, rollout.shape[-1])
        row = self._query_row(rollout, layout)
        return self._finish(layout.gather(row).unsqueeze(1), inputs, output, layout)


class GenericAttention(_ViTBaseline):
    r"""Chefer et al. (2021), "Generic Attention-model Explainability" (GAE, CheferCAM).

    With the target score's gradients ``∇A^l`` of every block's attention probabilities:
    ``R = I`` and, block by block, ``R ← R + mean_h(relu(∇A^l ⊙ A^l)) · R``; the CLS row of
    ``R`` over the patch keys (the mean over rows without prefix tokens).

    More details: https://arxiv.org/abs/2103.15679

    Args:
        forward_func (Callable): A Vision Transformer (or a module containing one) returning
                    scores ``(B, C)``.
        spec (ViTSpec, optional): Overrides :func:`~captum_legrad.discover`.

    Examples::

        >>> attr = GenericAttention(model).attribute(images, target=labels)
    """

    @classmethod
    def get_name(cls) -> str:
        return "Chefer GAE"

    def attribute(
        self,
        inputs: Tensor,
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        *,
        output: str = "input",
    ) -> Tensor:
        r"""
        Args:

            inputs (Tensor): Images ``(B, C, H, W)``.
            target (int, tuple, Tensor, or list, optional): Output indices to explain, with
                        Captum's meaning.
                        Default: None
            additional_forward_args (Any, optional): Passed to the model after the images.
                        Default: None
            output (str, optional): ``"input"``, ``"map"`` or ``"grid"``.
                        Default: "input"

        Returns:
            *Tensor* of **attributions**, detached.
        """
        self._check(inputs, output)
        args = _format_additional_forward_args(additional_forward_args) or ()
        layers = list(range(self.spec.num_layers))
        image = inputs.detach().requires_grad_()
        with torch.enable_grad():
            out, attentions = self._record(image, args, layers, differentiable=True)
            scores = self._scores(out, target)
            grads = torch.autograd.grad(scores.sum(), attentions)
        relevance: Optional[Tensor] = None
        for attention, grad in zip(attentions, grads):
            cam = (grad * attention).clamp(min=0).mean(dim=1).detach().double()
            if relevance is None:
                relevance = torch.eye(cam.shape[-1], dtype=cam.dtype, device=cam.device)
                relevance = relevance.expand_as(cam).clone()
            relevance = relevance + cam @ relevance
        assert relevance is not None
        layout = self._layout(inputs, args, relevance.shape[-1])
        row = self._query_row(relevance, layout)
        return self._finish(layout.gather(row).unsqueeze(1), inputs, output, layout)


class ViTGradCAM(_ViTBaseline):
    r"""Grad-CAM on the patch tokens entering a transformer block.

    ``X`` (B, N, D) = the input of block ``layer`` (default: the last). With the target
    score's gradient ``∂s/∂X``, the channel weights are its mean over the patch tokens,
    ``α = mean_patches ∂s/∂X``, and the map is ``relu(Σ_d α_d X_{:, d})`` over the patch
    tokens (prefix tokens dropped, the ``num_prefix_tokens`` of the discovered spec),
    reshaped to the spec's patch grid. The last block's *input* is used because in a
    CLS-token model the patch tokens it outputs no longer reach the head.

    More details: https://arxiv.org/abs/1610.02391

    Args:
        forward_func (Callable): A Vision Transformer (or a module containing one) returning
                    scores ``(B, C)``.
        layer (int, optional): The block whose input tokens are used.
                    Default: -1
        spec (ViTSpec, optional): Overrides :func:`~captum_legrad.discover`.

    Examples::

        >>> attr = ViTGradCAM(model).attribute(images, target=labels)
    """

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        layer: int = -1,
        *,
        spec: Optional[ViTSpec] = None,
    ) -> None:
        super().__init__(forward_func, spec=spec)
        self.layer = resolve_layer(layer, self.spec.num_layers)

    @classmethod
    def get_name(cls) -> str:
        return "GradCAM"

    def attribute(
        self,
        inputs: Tensor,
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        *,
        output: str = "input",
    ) -> Tensor:
        r"""
        Args:

            inputs (Tensor): Images ``(B, C, H, W)``.
            target (int, tuple, Tensor, or list, optional): Output indices to explain, with
                        Captum's meaning.
                        Default: None
            additional_forward_args (Any, optional): Passed to the model after the images.
                        Default: None
            output (str, optional): ``"input"``, ``"map"`` or ``"grid"``.
                        Default: "input"

        Returns:
            *Tensor* of **attributions**, detached.
        """
        self._check(inputs, output)
        args = _format_additional_forward_args(additional_forward_args) or ()
        kept: Dict[str, Tensor] = {}

        def keep(module: nn.Module, hook_args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
            kept["tokens"] = self.spec.tokens.get(hook_args, kwargs)

        image = inputs.detach().requires_grad_()
        with self._sized(image), ScopedHooks() as hooks, torch.enable_grad():
            hooks.forward_pre(self.spec.blocks[self.layer], keep, with_kwargs=True)
            out = self._forward(image, args)
            scores = self._scores(out, target)
            tokens = kept["tokens"]
            (grad,) = torch.autograd.grad(scores.sum(), tokens)
        if not self.spec.batch_first:
            tokens, grad = tokens.transpose(0, 1), grad.transpose(0, 1)
        layout = self._layout(inputs, args, tokens.shape[1])
        # The layout gathers (…, B, N) over the tokens: (D, B, N) → (D, B, g_h, g_w).
        patches = layout.gather(tokens.detach().permute(2, 0, 1))
        patch_grads = layout.gather(grad.permute(2, 0, 1))
        # mean over each sample's own patches (cells outside a per-sample grid are zero)
        count = layout.sample_grids(inputs.shape[0]).prod(dim=1).to(patch_grads)
        weights = patch_grads.sum(dim=(-2, -1), keepdim=True) / count.view(1, -1, 1, 1)
        cam = (weights * patches).sum(dim=0).unsqueeze(1).clamp(min=0)  # (B, 1, g_h, g_w)
        return self._finish(cam, inputs, output, layout)
