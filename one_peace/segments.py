"""Timed segments of long media: a 10-minute recording becomes one item per window, each with its start and end.

A modality with a time axis (audio, video; a plugin declares it with :meth:`~one_peace.registry.ModalityPlugin.
segment_defaults` and yields windows from :meth:`~one_peace.registry.ModalityPlugin.iter_segments`) decodes one
window at a time, so memory is bounded by the window, never the file. ``encode(..., segments=...)`` and
``python -m one_peace.embed segments.window=10`` embed each window as its own row: ``id`` is
``<parent id>#t=<start>,<end>`` (a W3C media fragment: a browser's ``<audio>``/``<video>`` plays just that span), with
``parent_id``, ``start`` and ``end`` (seconds) beside it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from one_peace.models.encoder import OnePeaceModel


@dataclass(frozen=True)
class SegmentSpec:
    """How long media are cut.

    Attributes:
        window: Seconds per segment.
        hop: Seconds between segment starts (default: ``window``, no overlap; less overlaps).
        min_length: A last, shorter segment is kept when it lasts at least this (default: the modality's, 1 s). A
            whole file shorter than it is still one segment.
    """

    window: float
    hop: float | None = None
    min_length: float | None = None

    def resolved(self, defaults: SegmentSpec | None = None) -> SegmentSpec:
        """Missing values from ``defaults`` (then ``hop = window``, ``min_length = 1``), checked.

        Raises:
            ValueError: a non-positive window or hop, or a minimum length outside ``(0, window]``.
        """
        hop = self.hop if self.hop is not None else (defaults.hop if defaults and defaults.hop else self.window)
        floor = self.min_length if self.min_length is not None else (defaults.min_length if defaults else None)
        spec = SegmentSpec(float(self.window), float(hop), float(floor if floor is not None else min(1.0, self.window)))
        if not (math.isfinite(spec.window) and spec.window > 0):
            raise ValueError(f"segments.window: expected seconds > 0, got {self.window!r}")
        if not (math.isfinite(spec.hop or 0) and (spec.hop or 0) > 0):
            raise ValueError(f"segments.hop: expected seconds > 0, got {self.hop!r}")
        if not 0 < (spec.min_length or 0) <= spec.window:
            raise ValueError(f"segments.min_length: expected seconds in (0, window={spec.window:g}], got {floor!r}")
        return spec

    @classmethod
    def parse(cls, value: Any) -> SegmentSpec | None:
        """``None``, a spec, a number (the window) or a mapping ``{window, hop, min_length}``."""
        if value is None or isinstance(value, SegmentSpec):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return cls(float(value))
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"window", "hop", "min_length"})
            if unknown:
                raise ValueError(f"segments: unknown key(s) {unknown} (it takes window, hop, min_length)")
            if value.get("window") is None:
                return None
            return cls(
                float(value["window"]),
                None if value.get("hop") is None else float(value["hop"]),
                None if value.get("min_length") is None else float(value["min_length"]),
            )
        raise ValueError(f"segments: expected seconds or {{window, hop, min_length}}, got {value!r}")


@dataclass
class Segment:
    """One window of a long input.

    Attributes:
        start: Seconds from the start of the file.
        end: Seconds (exclusive).
        item: What the modality's preprocessor reads (a ``(waveform, rate)`` pair, a list of frames...).
    """

    start: float
    end: float
    item: Any


@dataclass
class SegmentEmbeddings:
    """What ``encode(..., segments=...)`` returns: one row per window, in input order then time order.

    Attributes:
        vectors: ``(M, D)`` embeddings (torch or numpy, as ``output`` asked).
        item: The input each row belongs to (its position in the inputs).
        start: Seconds where each row's window starts.
        end: Seconds where it ends.
    """

    vectors: Any
    item: list[int]
    start: list[float]
    end: list[float]

    def __len__(self) -> int:
        return len(self.item)


def plan_windows(duration: float, spec: SegmentSpec) -> list[tuple[float, float]]:
    """``(start, end)`` of every window over ``duration`` seconds (``spec`` resolved): starts every ``hop``, the last
    window cut at the end and kept when at least ``min_length`` long (the first one always)."""
    window, hop, floor = spec.window, spec.hop or spec.window, spec.min_length or 0.0
    spans: list[tuple[float, float]] = []
    start = 0.0
    while start < duration - 1e-9 or not spans:
        end = min(start + window, duration)
        if not spans or end - start >= floor - 1e-9:
            spans.append((round(start, 6), round(end, 6)))
        if end >= duration - 1e-9:
            break
        start += hop
    return spans


def fragment_id(parent: str, start: float, end: float) -> str:
    """``<parent>#t=<start>,<end>``: the segment's id (a media fragment)."""
    return f"{parent}#t={start:g},{end:g}"


def stream_windows(chunks: Iterable[Any], rate: int, spec: SegmentSpec) -> Iterator[Segment]:
    """Windows of a sampled signal arriving in chunks (``(N,)`` arrays at ``rate`` Hz): each :class:`Segment` holds
    ``(samples, rate)``. Only the current window and one chunk are held, whatever the length; the windows are those
    :func:`plan_windows` gives for the signal's duration (``spec`` resolved)."""
    import numpy as np

    width = max(1, round(spec.window * rate))
    hop = max(1, round((spec.hop or spec.window) * rate))
    floor = (spec.min_length or 0.0) * rate
    buf = np.zeros(0, dtype=np.float32)
    buf_start = 0  # sample index of buf[0]
    start = 0  # sample index of the next window
    emitted = 0
    last_end = 0  # end of the last window given: none starts after one that reached the end
    for chunk in chunks:
        buf = np.concatenate([buf, np.asarray(chunk, dtype=np.float32).reshape(-1)])
        if start > buf_start:  # a hop longer than the window skips samples
            drop = min(start - buf_start, len(buf))
            buf, buf_start = buf[drop:], buf_start + drop
        while buf_start + len(buf) >= start + width:
            offset = start - buf_start
            yield Segment(start / rate, (start + width) / rate, (buf[offset : offset + width].copy(), rate))
            emitted += 1
            last_end = start + width
            start += hop
            drop = min(start - buf_start, len(buf))
            buf, buf_start = buf[drop:], buf_start + drop
    total = buf_start + len(buf)
    while (start < total and last_end < total) or not emitted:
        end = min(start + width, total)
        if not emitted or end - start >= floor - 1e-6:
            offset = max(0, start - buf_start)
            yield Segment(start / rate, end / rate, (buf[offset : offset + (end - start)].copy(), rate))
            emitted += 1
        if end >= total:
            break
        start += hop


def segment_spec(model: OnePeaceModel, modality: str, segments: Any) -> Any:
    """``segments`` (seconds, a mapping or a spec) resolved against the modality's defaults.

    Raises:
        ValueError: a modality without a time axis, a malformed spec, or one the modality cannot take.
    """
    defaults = model.plugins[modality].segment_defaults(model.config)
    if defaults is None:
        raise ValueError(f"segments: the {modality!r} modality has no time axis (audio and video have)")
    spec = (SegmentSpec.parse(segments) or defaults).resolved(defaults)
    model.plugins[modality].check_segments(spec, model.config)  # e.g. audio windows no longer than max_seconds
    return spec


def encode_segments(
    model: OnePeaceModel,
    modality: str,
    items: list[Any],
    segments: Any,
    batch_size: int,
    normalize: bool,
    output: str,
    progress: bool,
    precision: str | None,
) -> Any:
    """``encode(..., segments=...)``: one row per window of every item, windows decoded as they are embedded, one
    batch of windows held at a time."""
    import torch

    from one_peace.errors import DataError
    from one_peace.models.encoding import embed_samples, preprocessor

    spec = segment_spec(model, modality, segments)
    plugin = model.plugins[modality]
    prep = preprocessor(model, modality)
    spans: dict[tuple[int, int], tuple[float, float]] = {}

    def samples() -> Iterator[tuple[tuple[int, int], list[dict[str, Any]]]]:
        for i, item in enumerate(items):
            try:
                for k, seg in enumerate(plugin.iter_segments(item, model.config, spec)):
                    spans[(i, k)] = (seg.start, seg.end)
                    yield (i, k), [prep(seg.item)]
            except DataError as exc:
                raise type(exc)(f"{modality} input {i}: {exc}") from exc

    stream: Iterable[tuple[tuple[int, int], list[dict[str, Any]]]] = samples()
    if progress:
        from tqdm import tqdm

        stream = tqdm(stream, desc=f"encode {modality} segments", unit="segment")
    keys, rows = [], []
    for key, emb in embed_samples(model, modality, stream, batch_size, normalize, False, precision, window_batches=1):
        keys.append(key)
        rows.append(emb)
    vectors = torch.stack(rows)
    return SegmentEmbeddings(
        vectors.float().cpu().numpy() if output == "numpy" else vectors,
        [i for i, _ in keys],
        [spans[k][0] for k in keys],
        [spans[k][1] for k in keys],
    )
