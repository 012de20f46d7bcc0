"""Media on the ground floor: resolving manifest media values, the media types a modality accepts and previews.

Nothing here imports the data, training, retrieval or serving layers; the registry and every layer above use it.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from one_peace.errors import InvalidValue, MissingMedia


def resolve_media(value: Any, base_dir: Path) -> Any:
    """Turn a manifest media value into something a preprocessor reads: bytes (data URI / raw) or a path.

    Raises:
        one_peace.errors.MissingMedia: a path that does not exist.
        one_peace.errors.InvalidValue: a malformed data URI or an unsupported value.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str) and value.startswith("data:"):
        head, _, payload = value.partition(",")
        if ";base64" not in head:
            raise InvalidValue("data URI must be base64-encoded (data:<mime>;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error as exc:
            raise InvalidValue(f"invalid base64 in data URI: {exc}") from None
    if isinstance(value, str):
        p = Path(value)
        p = p if p.is_absolute() else base_dir / p
        if not p.exists():
            raise MissingMedia(f"missing file {p}")
        return p
    if isinstance(value, list):
        return [resolve_media(v, base_dir) for v in value]
    raise InvalidValue(f"unsupported media value of type {type(value).__name__}")


@dataclass(frozen=True)
class MediaTypes:
    """What a modality accepts as input files: MIME types (``image/*`` wildcards allowed) and file extensions.

    The search page's upload field and the export's input description read it; ``accepts`` answers for one file
    name or MIME type. An empty ``MediaTypes`` (the default of a non-file modality) accepts no file.
    """

    mime_types: tuple[str, ...] = ()
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for ext in self.extensions:
            if not ext.startswith(".") or ext != ext.lower():
                raise ValueError(f"media extensions are lower-case and start with '.', got {ext!r}")

    def accepts(self, name_or_mime: str) -> bool:
        """Whether a file name (by its extension) or a MIME type is accepted."""
        value = name_or_mime.strip().lower()
        if "/" in value and not value.startswith((".", "/")) and "." not in value.split("/")[0]:
            major = value.split("/")[0]
            return any(m == value or m == f"{major}/*" for m in self.mime_types)
        return Path(value).suffix in self.extensions

    def accept_attribute(self) -> str:
        """The HTML ``accept`` attribute listing the types (``image/*,.png``)."""
        return ",".join((*self.mime_types, *self.extensions))

    def as_dict(self) -> dict[str, list[str]]:
        """JSON-friendly form."""
        return {"mime_types": list(self.mime_types), "extensions": list(self.extensions)}


@dataclass(frozen=True)
class Preview:
    """A small rendering of one input for people: a thumbnail PNG, a short audio clip, or text.

    Attributes:
        mime_type: ``image/png``, ``audio/wav``, ``text/plain`` (or another type a browser shows).
        data: The encoded bytes (UTF-8 for text).
    """

    mime_type: str
    data: bytes

    def data_uri(self) -> str:
        """The preview as a ``data:`` URI (for an ``<img>``/``<audio>`` tag)."""
        return f"data:{self.mime_type};base64,{base64.b64encode(self.data).decode('ascii')}"

    @classmethod
    def text(cls, text: str, limit: int = 500) -> Preview:
        """A text preview (cut at ``limit`` characters, with an ellipsis)."""
        cut = text if len(text) <= limit else text[: limit - 1] + "\u2026"
        return cls("text/plain", cut.encode("utf-8"))

    @classmethod
    def png(cls, array: Any, max_size: int = 256) -> Preview:
        """A PNG thumbnail of an ``(H, W)`` or ``(H, W, 3)`` uint8 array (longest side at most ``max_size``)."""
        from PIL import Image

        image = Image.fromarray(array)
        image.thumbnail((max_size, max_size))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return cls("image/png", buf.getvalue())

    @classmethod
    def wav(cls, samples: Any, sample_rate: int, max_seconds: float = 10.0) -> Preview:
        """A 16-bit WAV clip of the first ``max_seconds`` of ``(N,)`` or ``(N, C)`` float samples in [-1, 1]."""
        import numpy as np
        import soundfile as sf

        clip = np.asarray(samples, dtype=np.float32)[: int(sample_rate * max_seconds)]
        buf = io.BytesIO()
        sf.write(buf, np.clip(clip, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
        return cls("audio/wav", buf.getvalue())
