"""Typed errors for bad input data, raised by preprocessors (built-in and plugin) and the media resolver.

The training loader skips, counts and reports a sample that raises a :class:`DataError` (by its ``reason``);
anything else a preprocessor raises is a bug and stops the run at once. Every class is a ``ValueError`` so code
that catches ``ValueError`` around ``encode`` keeps working.
"""

from __future__ import annotations

from typing import Any


class DataError(ValueError):
    """A sample that cannot be used. ``reason`` is the short category the loader counts it under."""

    reason = "bad sample"


class MissingMedia(DataError, FileNotFoundError):
    """A media file or shard member that does not exist."""

    reason = "missing file"


class UndecodableMedia(DataError):
    """Bytes that do not decode as the modality's media (corrupt or unsupported file)."""

    reason = "undecodable"


class NonFiniteData(DataError):
    """Decoded values with NaN or infinity."""

    reason = "non-finite values"


class EmptyMedia(DataError):
    """Media with nothing in it (no samples, no frames)."""

    reason = "empty"


class OversizedMedia(DataError):
    """Media larger than a decoder is allowed to expand (PIL's decompression-bomb pixel limit)."""

    reason = "too large"


def bomb_pixels(exc: BaseException) -> int | None:
    """The pixel count in PIL's ``DecompressionBombError`` message (``Image size (N pixels) exceeds ...``), if any."""
    import re

    found = re.search(r"\((\d+) pixels\)", str(exc))
    return int(found.group(1)) if found else None


class MissingField(DataError):
    """A manifest row without a field the recipe reads."""

    reason = "missing field"


class InvalidValue(DataError):
    """A field of the wrong kind (e.g. a caption that is not a string)."""

    reason = "invalid value"


#: reasons of media problems: their label names the modality ("undecodable image", "empty audio")
_MEDIA_REASONS = ("undecodable", "empty", "too large")


def reason_label(exc: BaseException, modality: str | None = None) -> str:
    """The one label a bad sample is counted and reported under, by training, ``embed`` and ``eval`` alike.

    The error's ``reason`` (lower-case words: ``missing field``, ``missing file``, ``invalid value``, ``non-finite
    values``), with the modality for media that does not decode or holds nothing (``undecodable image``, ``empty
    audio``, ``too large image``); anything that is not a :class:`DataError` is ``bad sample``.
    """
    reason = getattr(exc, "reason", DataError.reason) if isinstance(exc, DataError) else DataError.reason
    return f"{reason} {modality}" if modality and reason in _MEDIA_REASONS else reason


def detail(exc: BaseException) -> str:
    """The error as a report line: its public class name and message (``MissingField: missing field 'image'``)."""
    return f"{type(exc).__name__}: {exc}"


def bad_record(sample_id: Any, exc: BaseException, modality: str | None = None, **where: Any) -> dict[str, Any]:
    """One skipped sample as the reports list it: ``id``, ``where`` (e.g. ``row``), ``modality``, ``reason``
    (:func:`reason_label`) and ``detail``."""
    return {
        "id": sample_id,
        **where,
        "modality": modality,
        "reason": reason_label(exc, modality),
        "detail": detail(exc),
    }
