"""Sequence packing: place variable-length samples into fixed-length rows (first fit, in order)."""

from __future__ import annotations

from collections.abc import Sequence


def plan_packing(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Group sample indices into rows whose total length fits ``row_length`` (first fit, keeping order).

    Raises:
        ValueError: a sample is longer than a row.
    """
    if lengths and max(lengths) > row_length:
        raise ValueError(f"row_length {row_length} is shorter than the longest sample ({max(lengths)} tokens)")
    rows: list[list[int]] = []
    used: list[int] = []
    for i, n in enumerate(lengths):
        for r in range(len(rows)):
            if used[r] + n <= row_length:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)
    return rows
