"""Running the evaluation under ``torchrun``: process group, sharding, reduction.

Nothing here is needed for a single process; under ``torchrun --nproc_per_node N`` the
environment variables ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are set and
:func:`init` starts a process group (``gloo`` on CPU, ``nccl`` on GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = ["Context", "init", "shard", "finish"]

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """This process's place: ``rank`` of ``world`` processes, on ``device``."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on the process that writes the results (rank 0)."""
        return self.rank == 0


def init(device: str = "auto") -> Context:
    """Join the process group when launched by ``torchrun``; a 1-process context otherwise.

    Args:
        device: ``"auto"`` (``cuda:LOCAL_RANK`` when CUDA is available, else CPU), ``"cpu"``
                or a device string.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        chosen = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        chosen = torch.device(device)
        if chosen.type == "cuda" and chosen.index is None:
            chosen = torch.device(f"cuda:{local_rank}")
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return Context(rank=rank, world=world, device=chosen)


def shard(items: Sequence[T], context: Context) -> List[T]:
    """Items ``rank, rank + world, ...``: round-robin, so every process gets a fair share."""
    return [item for index, item in enumerate(items) if index % context.world == context.rank]


def finish() -> None:
    """Leave the process group if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
