"""Training throughput: samples/s, tokens/s, the fraction of time spent waiting for data, and MFU.

MFU is model FLOP/s over the device's peak. The FLOPs of one optimizer step are counted once (PyTorch's flop
counter over the first step's forward and backward passes, whatever the task runs: every view, the decoder), as
FLOPs per token; later intervals are charged that rate for the tokens they process. The peak is given
(``trainer.peak_tflops``) or measured once at start with a dense matmul in the training precision on the training
device. Tokens are the positions entering the shared stack (every view, padding included: what the compute sees),
counted from the adapters' output shapes, so counting never reads a device value.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0, device: str | torch.device = "cpu") -> float:
    """Measured dense matmul throughput (FLOP/s) for ``n x n`` operands of ``dtype`` on ``device``, now.

    On CUDA the operands are 8192 x 8192 (smaller ones do not fill an H100/H200) unless ``n`` is larger. On a CPU
    without fast kernels for ``dtype`` (bf16 without AVX-512/AMX) a small probe's rate is returned at once.
    """
    device = torch.device(device)
    if device.type == "cuda":
        n = max(n, 8192)
    elif dtype != torch.float32:
        probe = torch.randn(256, 256).to(dtype)
        probe_rate = 0.0
        for _ in range(3):  # the best of three: the first call pays for kernel selection and thread start-up
            start = time.perf_counter()
            probe @ probe
            probe_rate = max(probe_rate, 2 * 256**3 / (time.perf_counter() - start))
        if probe_rate < 5e9:  # no fast kernel for this dtype: don't spend minutes
            return probe_rate
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        iters += 1
        if device.type == "cuda" and iters % 10 == 0:
            synchronize(device)
    synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - start)


def batch_samples(batch: Any) -> int:
    """Valid samples of a batch (``valid`` read on the host only; a multi-task batch sums its tasks)."""
    if isinstance(batch, Mapping):
        valid = batch.get("valid")
        if isinstance(valid, torch.Tensor):
            return int(valid.sum()) if valid.device.type == "cpu" else int(valid.numel())
        return sum(batch_samples(v) for v in batch.values() if isinstance(v, Mapping))
    return 0


class TokenCounter:
    """Counts the token positions every adapter of ``model`` hands to the shared stack (shapes only)."""

    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        self._handles = []
        adapters = getattr(model, "adapters", None)
        for adapter in adapters.values() if isinstance(adapters, nn.ModuleDict) else ():
            self._handles.append(adapter.register_forward_hook(self._hook))

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        tokens = getattr(output, "tokens", None)
        if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2:
            self.count += int(tokens.shape[0]) * int(tokens.shape[1])

    def take(self) -> int:
        """The count since the last call."""
        count, self.count = self.count, 0
        return count

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class Throughput:
    """Per-log-interval throughput of one rank, reported for the whole job (``world`` ranks in step).

    Args:
        world: Ranks training together (samples and tokens scale with it; MFU is per device).
        peak_flops: The device's peak FLOP/s (``None``: no MFU).
    """

    def __init__(self, world: int = 1, peak_flops: float | None = None) -> None:
        self.world = world
        self.peak_flops = peak_flops
        self.flops_per_token: float | None = None
        self.restart()

    def restart(self) -> None:
        """Begin a new interval now (after a log step, an evaluation or a checkpoint)."""
        self.start = time.perf_counter()
        self.wait = 0.0
        self.samples = 0
        self.tokens = 0

    def add_wait(self, seconds: float) -> None:
        """Time the loop waited for a batch."""
        self.wait += seconds

    def add_step(self, samples: int, tokens: int) -> None:
        """What one optimizer step processed."""
        self.samples += samples
        self.tokens += tokens

    def set_step_flops(self, flops: int, tokens: int) -> None:
        """The counted FLOPs of one step and the tokens it processed (the rate charged from now on)."""
        if flops > 0 and tokens > 0:
            self.flops_per_token = flops / tokens

    def report(self) -> dict[str, float]:
        """``samples_per_s``, ``tokens_per_s`` (whole job), ``data_wait`` (fraction of wall time) and ``mfu``."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {
            "samples_per_s": self.samples * self.world / elapsed,
            "tokens_per_s": self.tokens * self.world / elapsed,
            "data_wait": min(1.0, self.wait / elapsed),
        }
        if self.peak_flops and self.flops_per_token:
            out["mfu"] = self.flops_per_token * self.tokens / elapsed / self.peak_flops
        return out
