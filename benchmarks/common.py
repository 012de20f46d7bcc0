"""Helpers shared by the benchmarks: matmul peak, FLOP counting, timing and peak memory."""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from one_peace.train.throughput import matmul_peak, synchronize

__all__ = ["PeakCUDA", "PeakRSS", "count_flops", "machine", "matmul_peak", "peak_memory", "synchronize", "time_call"]


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager sampling RSS every few milliseconds; ``peak`` and ``delta`` (above the start) in bytes."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta(self) -> int:
        """Peak RSS above the RSS at entry."""
        return self.peak - self.start


class PeakCUDA:
    """Context manager reading the CUDA caching allocator's peak; ``peak`` and ``delta`` (above the start) in bytes
    (the same interface as :class:`PeakRSS`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = self.peak = 0

    def __enter__(self) -> PeakCUDA:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start = self.peak = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def delta(self) -> int:
        """Peak allocated memory above the allocation at entry."""
        return self.peak - self.start


def peak_memory(device: torch.device) -> PeakRSS | PeakCUDA:
    """The peak-memory probe of ``device``: allocator peak on CUDA, resident set size on the CPU."""
    return PeakCUDA(device) if device.type == "cuda" else PeakRSS()


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions, attention) by PyTorch's flop counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def time_call(
    fn: Callable[[], Any],
    min_seconds: float = 3.0,
    warmup: int = 1,
    min_iters: int = 2,
    device: torch.device | None = None,
) -> float:
    """Mean seconds per call after ``warmup`` calls, running at least ``min_seconds`` and ``min_iters`` times
    (on a CUDA ``device``, synchronised before the clock starts and after every call)."""
    dev = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    synchronize(dev)
    iters, start = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < min_seconds:
        fn()
        synchronize(dev)
        iters += 1
    return (time.perf_counter() - start) / iters


def machine(device: torch.device | None = None) -> str:
    """One line describing the machine, torch build and (for CUDA) the GPU."""
    line = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
    )
    if device is not None and device.type == "cuda":
        line += f", {torch.cuda.get_device_name(device)}"
    return line
