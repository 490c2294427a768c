"""One evaluation run, as the command line and ``torchrun`` use it."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from . import distributed
from .batches import BatchFactory
from .distributed import Context
from .harness import EvalConfig, EvalOutcome, build_methods, evaluate_batches
from .progress import progress_bar

__all__ = ["run_evaluation"]


def run_evaluation(
    model: nn.Module,
    factories: Sequence[BatchFactory],
    method_names: Sequence[str],
    config: EvalConfig,
    context: Context,
    *,
    show_progress: bool = True,
    examples: int = 0,
    description: str = "",
) -> EvalOutcome:
    """Evaluate this process's shard of ``factories`` and reduce over processes.

    Args:
        model (nn.Module): The model to explain.
        factories (Sequence[BatchFactory]): All batches (:mod:`~captum_legrad.eval.batches`);
                    this process builds only its own shard.
        method_names (Sequence[str]): Keys of :data:`~captum_legrad.eval.harness.METHODS`.
        config (EvalConfig): What to measure.
        context (Context): This process's rank, world size and device.
        show_progress (bool, optional): Draw a progress bar.
                    Default: True
        examples (int, optional): Keep the maps of this many pairs of this process's first
                    batch (for a figure).
                    Default: 0
        description (str, optional): The progress bar's text.
                    Default: "" (``eval [rank r/w]: batches``)

    Returns:
        The :class:`~captum_legrad.eval.harness.EvalOutcome`, summed over all processes.
    """
    methods = build_methods(model, method_names)
    mine = distributed.shard(list(factories), context)
    text = description or f"eval [rank {context.rank}/{context.world}]: batches"
    bar = progress_bar(len(mine), text, disable=not show_progress)
    outcome = evaluate_batches(
        model,
        methods,
        (factory() for factory in mine),
        config,
        progress=bar.update,
        examples=examples,
    )
    bar.close()
    outcome.all_reduce(context.device if context.device.type == "cuda" else None)
    return outcome
