"""The bookkeeping of an embedding folder: the model's identity and ``info.json`` for new / resume / append."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from one_peace.data.shards import files_identity, same_identity, source_files
from one_peace.retrieval.format import FORMAT_VERSION, RESERVED_COLUMNS, SEGMENT_COLUMNS, model_hash
from one_peace.retrieval.store import EmbeddingStore

__all__ = ["model_hash", "prepare_folder", "update_index"]


def prepare_folder(
    cfg: Any, store: EmbeddingStore, model: Any, digest: str, precision: str | None = None, segments: Any = None
) -> dict[str, Any]:
    """Create or check ``info.json`` for ``cfg.mode`` (``cfg``: an :class:`one_peace.embed.EmbedConfig`;
    ``precision``: the resolved precision the vectors are computed in; ``segments``: the resolved
    :class:`~one_peace.segments.SegmentSpec` items are cut by, or ``None``; both recorded and checked on
    resume/append).

    Returns the info with this run's source recorded.
    """
    data_files = [str(p) for p in source_files(cfg.data)]
    identity = files_identity(data_files)
    key = str(Path(cfg.data).resolve())
    info = store.info()
    cut = None if segments is None else {"window": segments.window, "hop": segments.hop, "min": segments.min_length}
    if cfg.mode == "new":
        if store.has_parts() or info:
            raise ValueError(
                f"out: {cfg.out} already holds an embedding folder; mode=resume continues it, mode=append adds new "
                "data to it, or choose another out"
            )
        plugin = model.plugins[cfg.modality]
        info = {
            "format": FORMAT_VERSION,
            "model": {
                "checkpoint": str(Path(cfg.checkpoint).resolve()),
                "bpe_dir": str(Path(cfg.bpe_dir).resolve()) if cfg.bpe_dir else None,
                "hash": digest,
                "size": {"embed_dim": model.config.embed_dim, "layers": model.config.layers},
                "precision": precision,
            },
            "modality": cfg.modality,
            "field": cfg.field or cfg.modality,
            "id_field": cfg.id_field,
            "dim": model.config.embed_dim,
            "dtype": cfg.dtype,
            "metric": "inner_product",
            "normalized": True,
            "preprocessing": {
                "options": plugin.options(model.config).as_dict(),
                "long_text": cfg.long_text,
                "description": plugin.describe_preprocessing(model.config),
            },
            "plugin": plugin.record(model.config),
            "plugins": {m: p.record(model.config) for m, p in model.plugins.items()},
            "reserved": list(RESERVED_COLUMNS) + (list(SEGMENT_COLUMNS) if segments is not None else []),
            "duplicate_ids": cfg.duplicate_ids,
            "segments": cut,
            "schema": {},
            "part_size": cfg.part_size,
            "sources": [],
        }
    else:
        if not info:
            raise ValueError(f"mode={cfg.mode}: {cfg.out} holds no embedding folder (info.json); use mode=new")
        recorded = info.get("model", {}).get("hash")
        if recorded != digest:
            raise ValueError(
                f"mode={cfg.mode}: {cfg.out} was embedded with another model (hash {recorded}, checkpoint "
                f"{info.get('model', {}).get('checkpoint')}); this checkpoint hashes {digest}. Vectors of two models "
                "do not mix: embed into a new folder"
            )
        had = info.get("model", {}).get("precision")
        if had is not None and precision is not None and had != precision:
            raise ValueError(
                f"mode={cfg.mode}: {cfg.out} was embedded in precision {had}, this run would embed in {precision} "
                f"(precision={cfg.precision}); vectors of two precisions do not mix: pass precision={had}"
            )
        if info.get("segments") != cut:
            raise ValueError(
                f"mode={cfg.mode}: {cfg.out} was cut into segments {info.get('segments')}, this run cuts {cut}: rows "
                "cut two ways do not mix (pass the same segments.*)"
            )
        info["duplicate_ids"] = cfg.duplicate_ids  # the policy of the latest run (resume may accept duplicates)
        for k in ("modality", "id_field"):
            if info.get(k) != getattr(cfg, k):
                raise ValueError(f"mode={cfg.mode}: {cfg.out} holds {k}={info.get(k)!r}, not {getattr(cfg, k)!r}")
        if info.get("field") != (cfg.field or cfg.modality):
            raise ValueError(f"mode={cfg.mode}: {cfg.out} holds field={info.get('field')!r}, not {cfg.field!r}")
    sources = info["sources"]
    known = [s for s in sources if s["data"] == key]
    if cfg.mode == "resume":
        if not known:
            raise ValueError(f"mode=resume: {cfg.data} is not a source of {cfg.out} (mode=append adds it)")
        if not same_identity(known[0]["identity"], identity):
            raise ValueError(f"mode=resume: {cfg.data} changed since it was embedded into {cfg.out} (size or content)")
        if cfg.part_size != info["part_size"]:
            raise ValueError(f"mode=resume: part_size must stay {info['part_size']} (got {cfg.part_size})")
    else:
        if known:
            raise ValueError(f"mode={cfg.mode}: {cfg.data} is already a source of {cfg.out} (mode=resume finishes it)")
        unfinished = [s["data"] for s in sources if not s.get("complete")]
        if unfinished:
            raise ValueError(f"mode=append: finish {unfinished[0]} first (mode=resume data={unfinished[0]})")
        info["part_size"] = cfg.part_size
        first_part = max((s["first_part"] + s["parts"] for s in sources), default=0)
        offset = sum(s["rows"] for s in sources)
        sources.append(
            {
                "data": key,
                "identity": identity,
                "first_part": first_part,
                "row_offset": offset,
                "rows": None,
                "parts": 0,
                "complete": False,
            }
        )
    return info


def update_index(
    cfg: Any,
    store: EmbeddingStore,
    info: dict[str, Any],
    new_parts: Sequence[int],
    queries: np.ndarray | None = None,
) -> dict[str, Any]:
    """Build the index over every part, or (append) add the new parts to the existing index. ``queries``: vectors
    of the query modality to tune and measure the index on (corpus vectors otherwise)."""
    from one_peace.retrieval.faiss_index import (
        add_in_chunks,
        build_index,
        exact_top_k,
        faiss,
        load_index,
        recall_at_k,
        save_index,
    )

    previous = info.get("index")
    if cfg.mode == "append" and previous and store.index_path.is_file():
        index = load_index(str(store.index_path), previous.get("search_params"))
        add_in_chunks(index, store.vectors(new_parts))
        everything = store.vectors()
        rng = np.random.default_rng(0)
        pool = queries if queries is not None and len(queries) else everything
        q = pool[rng.choice(len(pool), size=min(1000, len(pool)), replace=False)]
        k = min(10, len(everything))
        t0 = time.perf_counter()
        found = index.search(q, k)[1]
        latency = (time.perf_counter() - t0) * 1e3 / max(1, len(q))
        save_index(index, str(store.index_path))
        return {
            **previous,
            "recall_at_10": recall_at_k(found, exact_top_k(everything, q, k)),
            "recall_queries": len(q),
            "tuned_on": previous.get("tuned_on", "corpus"),
            "measured_on": "queries" if pool is queries else "corpus",
            "latency_ms": latency,
            "memory_bytes": int(faiss().serialize_index(index).nbytes),
            "appended": previous.get("appended", 0) + 1,
        }
    index, report = build_index(store.vectors(), cfg.index, cfg.index_memory, query_vectors=queries)
    save_index(index, str(store.index_path))
    return report.to_json()
