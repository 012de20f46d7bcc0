"""The fairseq2 backend of the loader (``data.backend=fairseq2``, the ``fairseq2`` extra, torch 2.9.1 only).

It decodes the sampler's plan with fairseq2's native parallel map and prefetch (C++ threads) instead of
``DataLoader`` worker processes; the plan, the decoding and the collation are the loader's own, so both backends
yield the same batches and share one resume state (the sampler position).

fairseq2n needs ``libsndfile.so.1`` at import time; a fresh machine lacks the system package, but soundfile's
wheel ships the same library (SONAME ``libsndfile.so.1``). Loading it with ``RTLD_GLOBAL`` first satisfies
fairseq2n, so users need no system package (``apt-get install libsndfile1`` remains a fallback).
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import glob
import os
import weakref
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from one_peace.data.decode import BatchDecoder
    from one_peace.data.loader import LoaderConfig
    from one_peace.data.sampler import Plan


def _preload_libsndfile() -> None:
    import soundfile

    folder = os.path.join(os.path.dirname(soundfile.__file__), "_soundfile_data")
    for path in sorted(glob.glob(os.path.join(folder, "libsndfile*.so*"))):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            continue


def data_pipeline() -> ModuleType:
    """``fairseq2.data.data_pipeline``, importable without a system libsndfile.

    Raises:
        MissingExtraError: fairseq2 (the ``fairseq2`` extra) is not installed.
    """
    from one_peace.extras import require

    require("fairseq2", "fairseq2", feature="data.backend=fairseq2")
    _preload_libsndfile()
    import fairseq2.data.data_pipeline as dp

    return dp


_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()  # pipelines still alive
_HOOK: list[bool] = []


def _close_live() -> None:
    """Reset live pipelines at exit, before fairseq2n's own exit hook runs (it crashes on live pipelines)."""
    for pipeline in list(_LIVE):
        pipeline.reset()
    _LIVE.clear()
    gc.collect()


def pipeline_batches(decoder: BatchDecoder, plans: Sequence[Plan], config: LoaderConfig) -> Iterator[dict[str, Any]]:
    """Decoded batches of ``plans`` in order: ``read_sequence(plans).map(decode, num_parallel_calls).prefetch()``.

    ``num_workers`` is the number of parallel calls (at least 1); ``prefetch_factor * num_workers`` batches are
    decoded ahead. The pipeline holds no resume state of its own: the loader's position is the state.
    """
    dp = data_pipeline()
    calls = max(1, int(config.num_workers))
    pipeline = (
        dp.read_sequence(list(plans))
        .map(decoder.__getitem__, num_parallel_calls=calls)
        .prefetch(config.prefetch_factor * calls)
        .and_return()
    )
    if not _HOOK:  # registered after fairseq2n's hook (imported above), so it runs first (LIFO)
        atexit.register(_close_live)
        _HOOK.append(True)
    _LIVE.add(pipeline)
    try:
        yield from pipeline
    finally:
        pipeline.reset()
