"""torchvision adapter: ``torchvision.models.VisionTransformer`` (vit_b_16, vit_l_32, ...).

Blocks are ``encoder.layers``; each block's ``self_attention`` is an
``nn.MultiheadAttention`` called with ``need_weights=False`` (recorded through
``F.multi_head_attention_forward``). The readout is ``heads(encoder.ln(·))``.

Other input sizes: ``encoder.pos_embedding`` is resampled for the call (bicubic with
antialias, the class token's row kept) and the model's image-size assertions are waived,
in the calling thread only (:mod:`captum_legrad._core.resize`).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from torch import Tensor, nn

from .._core.resize import InputSize, resample_position_embedding, substitute_during
from ..spec import TokenInput, ViTSpec
from .common import floor_grid, mlp_outputs

__all__ = ["match"]


def match(model: nn.Module) -> Optional[ViTSpec]:
    """Describe a torchvision ``VisionTransformer``; ``None`` for anything else."""
    from torchvision.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        return None
    vit: Any = model
    blocks = tuple(vit.encoder.layers)
    patch = int(vit.patch_size)

    def mean_readout(tokens: Tensor) -> Tensor:
        return vit.heads(vit.encoder.ln(tokens.mean(dim=1)))

    def model_readout(tokens: Tensor) -> Tensor:
        return vit.heads(vit.encoder.ln(tokens)[:, 0])

    native = int(vit.image_size)
    old_grid = (native // patch, native // patch)

    def replacements(grid: Tuple[int, int]) -> List[Tuple[Tensor, Tensor]]:
        table = vit.encoder.pos_embedding
        return [(table, resample_position_embedding(table, old_grid, grid, 1))]

    return ViTSpec(
        family="torchvision",
        token_mean_readout=True,
        root=vit,
        blocks=blocks,
        attentions=tuple(block.self_attention for block in blocks),
        readout=mean_readout,
        model_readout=model_readout,
        num_prefix_tokens=1,
        patch_size=(patch, patch),
        grid=floor_grid((patch, patch)),
        token_input=TokenInput("input"),
        input_size=InputSize(
            (native, native),
            (patch, patch),
            enter=substitute_during(
                vit, replacements, (patch, patch), ("Wrong image height!", "Wrong image width!")
            ),
            mechanism="encoder.pos_embedding resampled bicubic with antialias for the call",
        ),
        mlp_outputs=mlp_outputs(blocks, {"EncoderBlock": ("mlp.3",)}),
        # ``model.heads = nn.Identity()``, the usual way to take torchvision's features
        scores_are_features=isinstance(vit.heads, nn.Identity),
    )
