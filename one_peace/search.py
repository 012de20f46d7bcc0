"""``python -m one_peace.search index=DIR query.text="a dog barking" [top_k=10] [format=table|json]``.

Queries an embedding folder written by ``python -m one_peace.embed``: ``query.<modality>=...`` for each modality
of the query (``query.text``, ``query.image=PATH``, or any registered modality's: ``--help`` lists them);
several at once form a composed query (``fuse=joint|mean``). The query model is the checkpoint recorded in the
folder's ``info.json`` unless ``checkpoint=`` is given. Prints ids, scores and metadata.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from one_peace.cli import parse


@dataclass
class SearchConfig:
    """Search an embedding folder by a query of any registered modality, or a composed query.

    Attributes:
        index: The embedding folder (``out`` of ``python -m one_peace.embed``).
        query: ``<modality>: <text or path>`` for each part of the query.
        top_k: Results to return.
        fuse: How a composed query is embedded: ``joint`` (one fused forward) or ``mean``.
        format: ``table`` or ``json`` (a list of ``{"id", "score", "metadata"}``).
        checkpoint: The query model (default: the one recorded in ``info.json``).
        bpe_dir: Official GPT-2 BPE files (official ``.pt`` checkpoints).
        device: Where the query model runs.
        nprobe: IVF indexes: inverted lists visited (default: the tuned value in ``info.json``).
        ef_search: HNSW indexes: the search beam (default: the tuned value).
    """

    index: str = "???"
    query: dict[str, Any] = field(default_factory=dict)
    top_k: int = 10
    fuse: str = "joint"
    format: str = "table"
    checkpoint: str | None = None
    bpe_dir: str | None = None
    device: str = "cpu"
    nprobe: int | None = None
    ef_search: int | None = None


def _cell(value: Any, width: int = 48) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    from one_peace.extras import MissingExtraError
    from one_peace.retrieval import open_index

    cfg = parse(SearchConfig, argv, "python -m one_peace.search")
    if cfg.format not in ("table", "json"):
        raise SystemExit(f"error: format: expected table or json, got {cfg.format!r}")
    if not cfg.query:
        from one_peace.registry import list_modalities

        keys = ", ".join(f"query.{m}=..." for m in list_modalities())
        raise SystemExit(f"error: give a query: one or more of {keys}")
    try:
        index = open_index(cfg.index, cfg.checkpoint, cfg.bpe_dir, cfg.device)
        t0 = time.perf_counter()
        hits = index.search(dict(cfg.query), top_k=cfg.top_k, fuse=cfg.fuse, nprobe=cfg.nprobe, ef_search=cfg.ef_search)
        secs = time.perf_counter() - t0
    except (ValueError, KeyError, FileNotFoundError, MissingExtraError) as exc:
        raise SystemExit(f"error: {exc}") from None
    if cfg.format == "json":
        print(json.dumps([h.to_json() for h in hits], indent=2, default=str))
        return 0
    print(f"{len(hits)} results from {cfg.index} ({index.modality}, {len(index)} items) in {secs * 1e3:.0f} ms")
    shown = [k for k in (hits[0].metadata if hits else {}) if k not in ("id", "row", "source_kind")]
    print(f"{'rank':>4}  {'score':>7}  {'id':<16}  " + "  ".join(shown))
    for i, h in enumerate(hits, 1):
        cells = "  ".join(_cell(h.metadata.get(k)) for k in shown)
        print(f"{i:>4}  {h.score:7.4f}  {_cell(h.id, 16):<16}  {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
