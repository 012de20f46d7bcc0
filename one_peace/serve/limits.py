"""The server's own bounds: what one request may cost before anything is decoded, and how long a client may take.

* :class:`Limits`: upload bytes, image pixels (read from the image header), media duration (read from the
  container, or summed from its packets without decoding when the header does not say), the query queue, the
  request deadline, header and body timeouts, concurrent decodes.
* :func:`check_media`: the pixel and duration caps of one upload, before its plugin decodes it.
* :class:`BodyLimit`: an ASGI middleware that cuts a request body off at the byte limit (chunked uploads without a
  ``Content-Length`` included) and at the body timeout, before anything is spooled past them.
* :func:`header_timeout_protocol`: uvicorn's HTTP protocol with a deadline on the request line and headers (a
  connection that never finishes its headers is closed).
"""

from __future__ import annotations

import asyncio
import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

from one_peace.errors import bomb_pixels
from one_peace.serve.service import QueryError


@dataclass(frozen=True)
class Limits:
    """What one request may cost.

    Attributes:
        max_upload_mb: Largest request body (uploads and JSON).
        max_image_pixels: Largest image (width x height, from its header) decoded.
        max_media_seconds: Longest audio or video (from its container) decoded.
        max_queue: Queries waiting to be embedded; above it a request gets 429 with ``Retry-After``.
        request_timeout_s: A query not embedded within this is dropped (503).
        header_timeout_s: A connection must send its request line and headers within this.
        body_timeout_s: A request body must arrive within this (each chunk within it too).
        max_decodes: Uploads decoded at once (bounds the decoding memory).
    """

    max_upload_mb: float = 20.0
    max_image_pixels: int = 25_000_000
    max_media_seconds: float = 120.0
    max_queue: int = 64
    request_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_decodes: int = 4

    @property
    def max_upload_bytes(self) -> int:
        """``max_upload_mb`` in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)


def _image_size(data: bytes) -> tuple[int, str] | None:
    """The pixel count from an image header (nothing decoded) and how to show it (``"W x H = N"``), or ``None`` for
    bytes PIL does not read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # PIL warns past MAX_IMAGE_PIXELS at open: the cap below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header only
                pixels = img.width * img.height
                return pixels, f"{img.width} x {img.height} = {pixels:,}"
    except Image.DecompressionBombError as exc:  # over PIL's own limit: the pixel count is in its message
        pixels = bomb_pixels(exc) or 2**31
        return pixels, f"{pixels:,}"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def _duration(data: bytes, cap: float) -> float | None:
    """Seconds of audio or video in ``data`` from its header (soundfile, then PyAV's container), else by summing its
    packets' durations without decoding them (stopping past ``cap``); ``None`` for bytes neither reads."""
    try:
        import soundfile as sf

        info = sf.info(io.BytesIO(data))
        if info.samplerate > 0:
            return float(info.frames) / float(info.samplerate)
    except Exception:  # not a file soundfile reads: try a container
        pass
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(io.BytesIO(data), "r") as container:
            if container.duration is not None and container.duration > 0:
                return float(container.duration) / 1_000_000
            total = 0.0
            streams = [s for s in container.streams if s.type in ("audio", "video")]
            if not streams:
                return None
            first = streams[0]
            for packet in container.demux(first):
                if packet.duration and packet.time_base is not None:
                    total += float(packet.duration * packet.time_base)
                if total > cap:
                    break
            return total
    except Exception:  # bytes PyAV cannot open: the plugin decides what they are
        return None


def check_media(name: str, data: bytes, limits: Limits) -> None:
    """Refuse an upload over the pixel or duration cap, from its header alone (413, naming the limit).

    Bytes that are neither an image nor audio/video a container library reads pass (a plugin's own format: the
    byte limit bounds them).
    """
    size = _image_size(data)
    if size is not None:
        pixels, shown = size
        if pixels > limits.max_image_pixels:
            raise QueryError(
                f"the {name} upload is {shown} pixels; this server decodes at most {limits.max_image_pixels:,} "
                "(max_image_pixels)",
                413,
            )
        return
    seconds = _duration(data, limits.max_media_seconds)
    if seconds is not None and seconds > limits.max_media_seconds:
        raise QueryError(
            f"the {name} upload is {seconds:.0f} s long; this server decodes at most {limits.max_media_seconds:g} s "
            "(max_media_seconds)",
            413,
        )


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body is cut off at ``limits.max_upload_bytes`` (413) and must keep arriving within
    ``limits.body_timeout_s`` (408), however it is sent (``Content-Length`` or chunked)."""

    def __init__(self, app: Any, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_upload_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit + 65536:
            await _json(
                send,
                413,
                f"the request is {int(declared) / 2**20:.1f} MB; uploads are limited to "
                f"{self.limits.max_upload_mb:g} MB (max_upload_mb)",
            )
            return
        seen = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), timeout=self.limits.body_timeout_s)
            except TimeoutError:
                raise _BodyTimeout from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit + 65536:  # multipart framing beside the upload itself
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _json(
                    send,
                    413,
                    f"the request body passed {self.limits.max_upload_mb:g} MB; uploads are "
                    "limited to that (max_upload_mb)",
                )
        except _BodyTimeout:
            if not started:
                await _json(
                    send,
                    408,
                    f"the request body did not arrive within {self.limits.body_timeout_s:g} s (body_timeout_s)",
                )


async def _json(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status in (408, 413):
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request line and headers are not complete within
    ``seconds`` of its opening (or of the end of its previous response): uvicorn has no such deadline of its own, so
    connections that never finish their headers held their file descriptors for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            self._header_deadline = self.loop.call_later(seconds, self._header_timeout)

        def _header_timeout(self) -> None:
            if self.cycle is None or self.cycle.response_complete:  # no request under way: its headers are late
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._header_deadline.cancel()  # the headers arrived: the body has its own timeout

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._header_deadline.cancel()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm_header_deadline()  # the next request's headers have the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._header_deadline.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
