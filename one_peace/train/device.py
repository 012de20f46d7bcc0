"""Where training runs and in which precision: ``trainer.device`` and ``trainer.precision``, and the batch transfer.

``device``: ``auto`` is ``cuda:$LOCAL_RANK`` under torchrun when CUDA exists, else ``cuda`` when present, else
``cpu``; or an explicit ``cpu`` / ``cuda`` / ``cuda:N``. ``precision``:

- ``fp32``: float32 weights and compute (the CPU default);
- ``bf16-autocast``: float32 weights, bf16 autocast on the training device (the GPU default);
- ``bf16``: pure bfloat16 weights and compute (opt-in; the CPU fast path where AMX exists);
- ``fp16``: float16 autocast with a ``GradScaler`` (its state is saved with every checkpoint).

The old ``trainer.bf16`` (True: ``bf16-autocast``; False: ``fp32``) and ``trainer.mixed_precision`` (FSDP2's
``bf16``: ``bf16-autocast``) still work, with a deprecation warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch

PRECISIONS = ("fp32", "bf16-autocast", "bf16", "fp16")


def resolve_device(spec: str = "auto", key: str = "trainer.device") -> torch.device:
    """The device of ``spec`` (see the module docstring); ``key`` names the option in errors.

    Raises:
        ValueError: an unknown spec, or ``cuda`` asked for where there is none.
    """
    if spec == "auto":
        if torch.cuda.is_available():
            local = os.environ.get("LOCAL_RANK")
            return torch.device("cuda", int(local)) if local is not None else torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"{key} must be auto, cpu, cuda or cuda:N, got {spec!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{key} must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}={spec}: this machine has no CUDA device (use cpu or auto)")
    return device


def resolve_precision(
    precision: str | None, device: torch.device, bf16: bool | None = None, mixed_precision: str | None = None
) -> str:
    """``trainer.precision`` with its device default and the deprecated aliases applied (each warns once)."""
    if bf16 is not None:
        warnings.warn(
            "trainer.bf16 is deprecated: use trainer.precision=bf16-autocast (or fp32)",
            DeprecationWarning,
            stacklevel=2,
        )
        if precision is None:
            precision = "bf16-autocast" if bf16 else "fp32"
    if mixed_precision is not None:
        warnings.warn(
            "trainer.mixed_precision is deprecated: use trainer.precision=bf16-autocast (FSDP2 then computes in "
            "bf16 with float32 weights and gradients reduced in float32)",
            DeprecationWarning,
            stacklevel=2,
        )
        if precision is None:
            precision = "bf16-autocast" if mixed_precision == "bf16" else "fp32"
    if precision is None:
        precision = "bf16-autocast" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision (``None``: no autocast)."""
    return {"bf16-autocast": torch.bfloat16, "fp16": torch.float16}.get(precision)


#: Key under which the trainer hands a task the batch as it was before the transfer (a :class:`HostBatch`).
HOST_KEY = "_host"


class HostBatch:
    """The host (CPU) copy of a batch, carried next to its device copy under :data:`HOST_KEY`.

    Tasks read sizes from it that would otherwise take a device read (e.g. the padding masks masking starts from).
    An opaque object, so that the transfer step, DDP and FSDP2 leave it where it is.
    """

    __slots__ = ("batch",)

    def __init__(self, batch: Any) -> None:
        self.batch = batch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a CPU tensor going to CUDA is pinned and copied without blocking the host."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def move_batch(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """``batch`` with every tensor on ``device`` (dicts, lists and tuples followed); one transfer step.

    On CUDA, CPU tensors are pinned and copied with ``non_blocking=True``; on the same device nothing is copied.
    ``dtype`` (pure-bf16 training) also casts the floating-point tensors.
    """
    if isinstance(batch, torch.Tensor):
        cast = dtype if dtype is not None and batch.is_floating_point() and batch.dtype != dtype else None
        moved = to_device(batch, device)
        return moved.to(cast) if cast is not None else moved
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, list):
        return [move_batch(v, device, dtype) for v in batch]
    if isinstance(batch, tuple):
        return tuple(move_batch(v, device, dtype) for v in batch)
    return batch
