"""Relative-position bucket indices (ONE-PEACE / BEiT rules), computed on the fly and cached.

Index matrices address rows of a per-modality relative-position table of shape ``(rows, heads)``.
Position 0 of every block is CLS, which has three extra table rows (query CLS, key CLS, CLS-CLS).

A traced graph with symbolic sizes (``torch.export`` / ONNX export with dynamic lengths) computes the index in the
graph instead. The caches are keyed by (shape, device): an index is computed once on the CPU, copied to each device
it is asked for once, and every caller gets its own copy (``clone``), never the cached tensor, so nothing a caller
does to it can change what the next caller gets. Every tensor is created with an explicit device.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def bucket_1d_rows(bucket_size: int) -> int:
    """Table rows needed by the 1-D rule: ``2B - 1`` distances plus three CLS rows."""
    return 2 * bucket_size + 2


def bucket_2d_rows(grid: int) -> int:
    """Table rows needed by the 2-D rule for a ``grid x grid`` patch grid plus three CLS rows."""
    return (2 * grid - 1) ** 2 + 3


@lru_cache(maxsize=32)
def _bucket_1d(length: int, bucket_size: int) -> torch.Tensor:
    m = bucket_size // 2
    pos = torch.arange(length, dtype=torch.int64, device="cpu")
    rel = pos[:, None] - pos[None, :]
    abs_rel = rel.abs()
    # Logarithmic buckets beyond m, with the official constant max distance 1023 (float64 then ceil).
    log_ratio = torch.log(abs_rel.clamp(min=1).double() / m) / math.log(1023 / m) * (m - 1)
    log_pos = (m + torch.ceil(log_ratio)).to(torch.int64).clamp(max=bucket_size - 1)
    bucket = torch.where(abs_rel <= m, rel, torch.sign(rel) * log_pos) + bucket_size - 1
    n = 2 * bucket_size - 1
    bucket[0, :] = n
    bucket[:, 0] = n + 1
    bucket[0, 0] = n + 2
    return bucket


@lru_cache(maxsize=64)
def _on_device(kind: str, args: tuple[int, ...], device: torch.device) -> torch.Tensor:
    cpu = _bucket_1d(*args) if kind == "1d" else _bucket_2d(*args)
    return cpu if device.type == "cpu" else cpu.to(device)


def _get(kind: str, args: tuple[int, ...], device: torch.device | str | None) -> torch.Tensor:
    if any(isinstance(a, torch.SymInt) for a in args):  # traced with symbolic sizes (export): computed in the graph
        build = _bucket_1d.__wrapped__ if kind == "1d" else _bucket_2d.__wrapped__
        return build(*args).to(torch.device(device if device is not None else "cpu"))
    with torch.inference_mode(False):  # a cache filled under encode()'s inference mode must serve training too
        return _on_device(kind, args, torch.device(device if device is not None else "cpu")).clone()


def bucket_1d(length: int, bucket_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(length, length)`` table-row indices of the 1-D bucketed rule (text and audio; CLS at 0), on ``device``
    (default CPU); a fresh copy of the cached index."""
    return _get("1d", (length, bucket_size), device)


@lru_cache(maxsize=32)
def _bucket_2d(height: int, width: int, grid: int) -> torch.Tensor:
    hh, ww = torch.meshgrid(torch.arange(height, device="cpu"), torch.arange(width, device="cpu"), indexing="ij")
    hh, ww = hh.reshape(-1), ww.reshape(-1)
    dh = (hh[:, None] - hh[None, :]).clamp(-(grid - 1), grid - 1)
    dw = (ww[:, None] - ww[None, :]).clamp(-(grid - 1), grid - 1)
    span = 2 * grid - 1
    inner = (dh + grid - 1) * span + (dw + grid - 1)
    n = span * span
    out = torch.empty(height * width + 1, height * width + 1, dtype=torch.int64, device="cpu")
    out[1:, 1:] = inner
    out[0, :] = n
    out[:, 0] = n + 1
    out[0, 0] = n + 2
    return out


def bucket_2d(height: int, width: int, grid: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(1+H*W, 1+H*W)`` table-row indices of the BEiT 2-D rule for a table built for ``grid``, on ``device``.

    Offsets beyond the table's range are clamped to its border (only when the run-time grid is larger
    than the one the table was built for). A fresh copy of the cached index.
    """
    return _get("2d", (height, width, grid), device)
