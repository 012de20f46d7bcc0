"""``python -m one_peace.serve index=DIR [index=DIR2 ...] [checkpoint=...] [host=127.0.0.1] [port=8000]``.

Serves the search page and its JSON API over one or more embedding folders written by ``python -m one_peace.embed``
(each holds one modality; the page picks which to search). The query model is each folder's recorded checkpoint
(loaded once, shared by folders that record the same one) unless ``checkpoint=`` names one for all. The server binds
to 127.0.0.1 unless ``host=`` says otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from one_peace.cli import parse


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
        max_upload_mb: Largest accepted upload.
        max_top_k: Largest ``top_k`` a request may ask for.
        max_batch: Most concurrent queries embedded in one forward.
    """

    index: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    bpe_dir: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    max_upload_mb: float = 20.0
    max_top_k: int = 100
    max_batch: int = 32


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
    from one_peace.serve.service import SearchService

    cfg = parse(ServeConfig, _gather_indexes(list(sys.argv[1:] if argv is None else argv)), "python -m one_peace.serve")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = SearchService(list(cfg.index), cfg.checkpoint, cfg.bpe_dir, cfg.device, cfg.max_batch)
    for d in service.describe():
        print(f"index {d['name']}: {d['count']} {d['modality']} items; queries by {', '.join(d['query_modalities'])}")
    app = create_app(service, cfg.max_upload_mb, cfg.max_top_k)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info")
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
