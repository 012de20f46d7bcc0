"""``python -m one_peace.serve index=DIR [index=DIR2 ...] [checkpoint=...] [host=127.0.0.1] [port=8000]``.

Serves the search page and its JSON API over one or more embedding folders written by ``python -m one_peace.embed``
(each holds one modality; the page picks which to search). The query model is each folder's recorded checkpoint
(loaded once, shared by folders that record the same one) unless ``checkpoint=`` names one for all. The server binds
to 127.0.0.1 unless ``host=`` says otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

from one_peace.cli import parse
from one_peace.serve.limits import Limits


@dataclass
class ServeConfig:
    """Serve the search page.

    Attributes:
        index: Embedding folders (repeat ``index=DIR`` or give ``index=[DIR1,DIR2]``).
        checkpoint: The query model for every index (default: each folder's recorded checkpoint).
        bpe_dir: Official GPT-2 BPE files (official ``.pt`` checkpoints).
        host: Address to bind (``0.0.0.0`` exposes the page to the network: only do that on purpose).
        port: Port (0: a free one, printed).
        device: Where the query models run.
        max_upload_mb: Largest accepted request body (cut off there, chunked uploads too).
        max_top_k: Largest ``top_k`` a request may ask for.
        max_batch: Most concurrent queries embedded in one forward.
        max_image_pixels: Largest image (from its header) decoded; larger ones get 413 before decoding.
        max_media_seconds: Longest audio/video (from its container) decoded; longer ones get 413 before decoding.
        max_queue: Queries waiting at most; above it 429 with ``Retry-After``.
        request_timeout_s: A query not embedded within this is dropped (503).
        header_timeout_s: A connection must finish its request line and headers within this (else it is closed).
        body_timeout_s: A request body must keep arriving within this (408).
        max_decodes: Uploads decoded at once (bounds the decoding memory).
        api_key_env: The environment variable holding the API key (required when ``host`` is not loopback).
        api_key_file: A file holding the API key (instead of the environment variable). The key is never a
            command-line value: command lines are visible to every user of the machine.
    """

    index: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    bpe_dir: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    max_upload_mb: float = Limits.max_upload_mb
    max_top_k: int = 100
    max_batch: int = 32
    max_image_pixels: int = Limits.max_image_pixels
    max_media_seconds: float = Limits.max_media_seconds
    max_queue: int = Limits.max_queue
    request_timeout_s: float = Limits.request_timeout_s
    header_timeout_s: float = Limits.header_timeout_s
    body_timeout_s: float = Limits.body_timeout_s
    max_decodes: int = Limits.max_decodes
    api_key_env: str = "ONE_PEACE_API_KEY"
    api_key_file: str | None = None


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def api_key(cfg: ServeConfig) -> str | None:
    """The API key from ``api_key_file`` or the ``api_key_env`` variable; required when binding beyond loopback.

    Raises:
        SystemExit: a non-loopback ``host`` without a key, or an unreadable / empty key file.
    """
    import os
    from pathlib import Path

    key = None
    if cfg.api_key_file:
        try:
            key = Path(cfg.api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SystemExit(f"error: api_key_file={cfg.api_key_file}: cannot be read ({exc})") from None
        if not key:
            raise SystemExit(f"error: api_key_file={cfg.api_key_file} is empty")
    else:
        key = os.environ.get(cfg.api_key_env, "").strip() or None
    if key is None and cfg.host not in LOOPBACK:
        raise SystemExit(
            f"error: host={cfg.host} exposes the server beyond this machine: set an API key first "
            f"(the {cfg.api_key_env} environment variable, or api_key_file=FILE); clients then send "
            "'Authorization: Bearer <key>'"
        )
    return key


def _gather_indexes(argv: list[str]) -> list[str]:
    """Repeated ``index=DIR`` arguments become one ``index=[...]`` list."""
    folders = [a.split("=", 1)[1] for a in argv if a.startswith("index=") and not a.startswith("index=[")]
    rest = [a for a in argv if not (a.startswith("index=") and not a.startswith("index=["))]
    return [*rest, f"index=[{','.join(folders)}]"] if folders else rest


def main(argv: list[str] | None = None) -> int:
    """Start the server (blocks until interrupted)."""
    import sys

    from one_peace.extras import require

    require("serve", "fastapi", feature="the search page (python -m one_peace.serve)")
    require("serve", "uvicorn", feature="the search page (python -m one_peace.serve)")
    require("serve", "multipart", feature="uploads on the search page (python-multipart)")
    import uvicorn

    from one_peace.serve.app import create_app
    from one_peace.serve.limits import header_timeout_protocol
    from one_peace.serve.service import SearchService

    cfg = parse(ServeConfig, _gather_indexes(list(sys.argv[1:] if argv is None else argv)), "python -m one_peace.serve")
    key = api_key(cfg)  # before anything loads: a non-loopback bind without a key never starts
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = Limits(**{f.name: getattr(cfg, f.name) for f in fields(Limits)})  # the config carries every bound
    service = SearchService(list(cfg.index), cfg.checkpoint, cfg.bpe_dir, cfg.device, cfg.max_batch, limits)
    for d in service.describe():
        print(f"index {d['name']}: {d['count']} {d['modality']} items; queries by {', '.join(d['query_modalities'])}")
    app = create_app(service, max_top_k=cfg.max_top_k, api_key=key)
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="info",
        http=header_timeout_protocol(cfg.header_timeout_s),
        timeout_keep_alive=5,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
