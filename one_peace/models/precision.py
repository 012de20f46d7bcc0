"""The precision ``encode`` and ``embed`` run in: ``fp32``, ``bf16``, ``fp16``, ``int8`` or ``auto``.

* ``fp32`` / ``bf16`` / ``fp16``: the model in that dtype. A model already in it runs as it is; otherwise a copy in
  that dtype is made once and kept beside the model (its weights are checked against the model's on every use: a
  model changed since, by training or ``load_state_dict``, gets a fresh copy).
* ``int8``: the modality's encoder exported to ONNX and quantised by ONNX Runtime (:mod:`one_peace.export`; the
  ``export`` extra), built once per modality and kept the same way; L2-normalised outputs only.
* ``auto``: ``bf16`` where it is measured to be fast, else ``fp32``: on CUDA, bf16 when the GPU supports it; on a
  CPU, bf16 when a dense bf16 matmul runs at least 1.5x the fp32 rate (CPUs with AMX: ~4x; AVX2-only CPUs: bf16 is
  ~100x slower), measured once per process (about a second). ``int8`` is never chosen automatically: it changes
  the embeddings (see ``benchmarks/RESULTS.md`` for what it costs in recall).
"""

from __future__ import annotations

import copy
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from one_peace.models.encoder import OnePeaceModel

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: bf16 is chosen by ``auto`` on a CPU when its measured matmul rate is at least this multiple of fp32's
AUTO_BF16_SPEEDUP = 1.5
_CACHE_ATTR = "_one_peace_precision_cache"


@lru_cache(maxsize=4)
def cpu_peaks() -> dict[str, float]:
    """Measured dense matmul FLOP/s of this CPU in fp32 and bf16 (1024 x 1024 operands, ~0.4 s each)."""
    from one_peace.train.throughput import matmul_peak

    return {name: matmul_peak(DTYPES[name], n=1024, seconds=0.4) for name in ("fp32", "bf16")}


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``precision`` with ``auto`` replaced by what is fast on ``device`` (see the module docstring).

    Raises:
        ValueError: an unknown precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        if device.type != "cpu":
            return "fp32"
        peaks = cpu_peaks()
        return "bf16" if peaks["bf16"] >= AUTO_BF16_SPEEDUP * peaks["fp32"] else "fp32"
    return precision


def _fingerprint(model: OnePeaceModel) -> tuple[Any, ...]:
    """Changes whenever a weight of ``model`` is replaced or changed in place (tensor version counters)."""
    return tuple((id(p), p._version) for p in model.parameters())


def _cached(model: OnePeaceModel, key: Any, build: Any) -> Any:
    cache = model.__dict__.setdefault(_CACHE_ATTR, {})  # a plain attribute: not a submodule, not in state_dict
    stamp = _fingerprint(model)
    hit = cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = build()
    # looked up again: tracing (torch.export) restores the module's attributes as they were, a new dict included
    model.__dict__.setdefault(_CACHE_ATTR, {})[key] = (stamp, value)
    return value


def model_in(model: OnePeaceModel, precision: str) -> OnePeaceModel:
    """``model`` itself when it already runs in ``precision`` (fp32/bf16/fp16), else its cached copy in it."""
    dtype = DTYPES[precision]
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    if first is None or first.dtype == dtype:
        return model

    def build() -> OnePeaceModel:
        from one_peace.models.encoding import _COMPILED_ATTR

        clone = copy.copy(model)  # the module tree is copied below; the caches must not be
        for attr in (_CACHE_ATTR, _COMPILED_ATTR):
            clone.__dict__.pop(attr, None)
        clone = copy.deepcopy(clone)
        return clone.to(dtype)  # type: ignore[no-any-return]

    return _cached(model, ("dtype", dtype), build)  # type: ignore[no-any-return]


def int8_runner(model: OnePeaceModel, modality: str) -> Any:
    """A callable ``batch -> L2-normalised embeddings`` running ``modality``'s int8 ONNX Runtime graph (exported
    and quantised once, then cached with the model)."""

    def build() -> Any:
        from one_peace.export import _session, export

        # tracing needs autograd's bookkeeping: not under encode()'s inference mode
        with torch.inference_mode(False), tempfile.TemporaryDirectory(prefix="one-peace-int8-") as tmp:
            export(model, modality, tmp, format="onnx", precision="int8", check_batch_sizes=())
            session = _session(Path(tmp) / "model.int8.onnx")  # loaded: the file may go

        def run(batch: dict[str, Any]) -> torch.Tensor:
            feeds = {i.name: batch[i.name].detach().cpu().numpy() for i in session.get_inputs()}
            (out,) = session.run(None, feeds)
            return torch.from_numpy(out)

        return run

    return _cached(model, ("int8", modality), build)
