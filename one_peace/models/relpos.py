"""Relative-position bucket indices (ONE-PEACE / BEiT rules), computed on the fly and cached.

Index matrices address rows of a per-modality relative-position table of shape ``(rows, heads)``.
Position 0 of every block is CLS, which has three extra table rows (query CLS, key CLS, CLS-CLS).
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
    pos = torch.arange(length, dtype=torch.int64)
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


def bucket_1d(length: int, bucket_size: int) -> torch.Tensor:
    """``(length, length)`` table-row indices of the 1-D bucketed rule (text and audio; CLS at 0)."""
    with torch.inference_mode(False):  # a cache filled under encode()'s inference mode must serve training too
        return _bucket_1d(length, bucket_size)


@lru_cache(maxsize=32)
def _bucket_2d(height: int, width: int, grid: int) -> torch.Tensor:
    hh, ww = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    hh, ww = hh.reshape(-1), ww.reshape(-1)
    dh = (hh[:, None] - hh[None, :]).clamp(-(grid - 1), grid - 1)
    dw = (ww[:, None] - ww[None, :]).clamp(-(grid - 1), grid - 1)
    span = 2 * grid - 1
    inner = (dh + grid - 1) * span + (dw + grid - 1)
    n = span * span
    out = torch.empty(height * width + 1, height * width + 1, dtype=torch.int64)
    out[1:, 1:] = inner
    out[0, :] = n
    out[:, 0] = n + 1
    out[0, 0] = n + 2
    return out


def bucket_2d(height: int, width: int, grid: int) -> torch.Tensor:
    """``(1+H*W, 1+H*W)`` table-row indices of the BEiT 2-D rule for a table built for ``grid``.

    Offsets beyond the table's range are clamped to its border (only when the run-time grid is larger
    than the one the table was built for).
    """
    with torch.inference_mode(False):  # see bucket_1d
        return _bucket_2d(height, width, grid)
