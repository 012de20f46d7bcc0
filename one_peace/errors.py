"""Typed errors for bad input data, raised by preprocessors (built-in and plugin) and the media resolver.

The training loader skips, counts and reports a sample that raises a :class:`DataError` (by its ``reason``);
anything else a preprocessor raises is a bug and stops the run at once. Every class is a ``ValueError`` so code
that catches ``ValueError`` around ``encode`` keeps working.
"""

from __future__ import annotations


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


class MissingField(DataError):
    """A manifest row without a field the recipe reads."""

    reason = "missing field"


class InvalidValue(DataError):
    """A field of the wrong kind (e.g. a caption that is not a string)."""

    reason = "invalid value"
