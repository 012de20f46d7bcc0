"""Process-group set-up under ``torchrun`` and rank-ordered work."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from one_peace.train.checkpointing import barrier

__all__ = ["barrier", "init_distributed", "rank0_first", "shutdown"]


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Join the process group when launched by ``torchrun``; ``(rank, world)``.

    NCCL only when training runs on CUDA (``trainer.device``), gloo otherwise: DDP/FSDP2 over CPU parameters on a
    machine that merely has a GPU needs gloo.
    """
    import torch.distributed as dist

    from one_peace.train.device import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = resolve_device(device).type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def rank0_first(rank: int, world: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` on rank 0 first (it writes files), then on the other ranks (they read what it wrote)."""
    import torch.distributed as dist

    if rank == 0:
        result = fn(*args)
    if world > 1:
        dist.barrier()
    if rank != 0:
        result = fn(*args)
    return result


def shutdown() -> None:
    """Leave the process group, when one was joined: at the end of every run, success or failure.

    A process group still alive at interpreter exit is torn down during finalisation, where gloo can abort the
    process after all work is done ("terminate called without an active exception").
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
