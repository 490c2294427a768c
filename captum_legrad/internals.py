"""Documented internals: the building blocks of the computation, for extension authors and
for tests that check one piece on its own.

The implementation lives in the private package ``captum_legrad._core``; what is named here
is documented (``docs/architecture.md``) and kept stable across minor releases. Everything
else under ``_core`` may change without notice.

* Attention calls (:mod:`captum_legrad._core.attention`): :class:`AttentionKind`,
  :func:`attention_kind`, :func:`explicit_sdpa`, :func:`additive_mask`,
  :class:`MultiheadCall`, :class:`SdpaCall`.
* Attention records (:mod:`captum_legrad._core.records`): the :class:`AttentionRecord`
  protocol, :class:`ProbabilityRecord`, :class:`OutputRecord`, :func:`reduce_lean`,
  :func:`prune_direct`.
* Routes and capture: :class:`Route`, :func:`get_route`, :func:`record_attention`,
  :func:`capture_blocks`, :class:`LinearInputGrad`, :func:`linear_input_grad_hooks`,
  :class:`ReadRows` (a decoder layer's graph kept at the read rows, :class:`RowsKept`).
* The computation: :func:`run_forward`, :func:`layer_maps`, :class:`ForwardResult`.
* Maps: :func:`minmax_normalize`, :func:`upsample`, :func:`finish`.
* Options: :data:`ROUTES`, :data:`POOLINGS`, :data:`OUTPUTS`, :data:`INTERPOLATE_MODES`.
* Scoping: :class:`ScopedHooks`; resizing: :func:`resample_position_embedding`,
  :class:`InputSize`, :func:`at_input_size` (run a model at another input size for the
  forwards inside a ``with`` block, as LeGrad does).
"""

from __future__ import annotations

from ._core.attention import (
    AttentionKind,
    MultiheadCall,
    SdpaCall,
    additive_mask,
    attention_kind,
    explicit_sdpa,
)
from ._core.capture import Captured, capture_blocks, record_attention
from ._core.compute import ForwardResult, Part, layer_maps, run_forward
from ._core.hooks import ScopedHooks
from ._core.linear import LinearInputGrad, linear_input_grad_hooks
from ._core.maps import finish, minmax_normalize, upsample
from ._core.options import INTERPOLATE_MODES, OUTPUTS, POOLINGS, ROUTES
from ._core.records import (
    AttentionRecord,
    OutputRecord,
    ProbabilityRecord,
    prune_direct,
    reduce_lean,
)
from ._core.resize import InputSize, at_input_size, resample_position_embedding
from ._core.routes import Route, get_route
from ._core.saved import ReadRows, RowsKept

__all__ = [
    "AttentionKind",
    "attention_kind",
    "explicit_sdpa",
    "additive_mask",
    "MultiheadCall",
    "SdpaCall",
    "AttentionRecord",
    "ProbabilityRecord",
    "OutputRecord",
    "reduce_lean",
    "prune_direct",
    "Route",
    "get_route",
    "record_attention",
    "capture_blocks",
    "Captured",
    "ReadRows",
    "RowsKept",
    "LinearInputGrad",
    "linear_input_grad_hooks",
    "run_forward",
    "layer_maps",
    "ForwardResult",
    "Part",
    "minmax_normalize",
    "upsample",
    "finish",
    "ROUTES",
    "POOLINGS",
    "OUTPUTS",
    "INTERPOLATE_MODES",
    "ScopedHooks",
    "InputSize",
    "at_input_size",
    "resample_position_embedding",
]
