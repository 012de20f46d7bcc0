"""``python -m one_peace.embed checkpoint=CK data=MANIFEST_OR_SHARDS modality=image out=DIR [key=value ...]``.

Embeds one field of every row of a manifest (``.jsonl``/``.tsv``) or a folder of shards into an embedding folder
(see :mod:`one_peace.retrieval.store`): float16 parts, parquet metadata in the same order, a FAISS index chosen
for the memory budget and tuned to 10-recall@10 >= 0.95, ``info.json`` and ``bad.jsonl``. Rows are decoded on a
thread pool by the modality's own preprocessor (no fairseq2); a row that cannot be decoded is skipped, listed in
``bad.jsonl`` and counted. Work is saved part by part: ``mode=resume`` continues a killed run without redoing
finished parts, ``mode=append`` adds new data to an existing folder (and index) without re-embedding the old.
Under ``torchrun`` each rank embeds its own parts and rank 0 builds the index from all of them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field as _field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from one_peace.cli import parse
from one_peace.data.shards import iter_rows
from one_peace.errors import DataError, UndecodableMedia, bad_record
from one_peace.models.precision import PRECISIONS
from one_peace.registry import get_plugin
from one_peace.retrieval.folder import prepare_folder, update_index
from one_peace.retrieval.format import (
    DUPLICATE_POLICIES,
    RESERVED_COLUMNS,
    SEGMENT_COLUMNS,
    model_hash,
    row_metadata,
    schema_json,
)
from one_peace.retrieval.store import EmbeddingStore
from one_peace.tokenizer import LANGUAGE

logger = logging.getLogger(__name__)

MODES = ("new", "resume", "append")
#: called with the part number after each part is written (fault injection in tests)
PART_DONE_HOOK: Callable[[int], None] | None = None


@dataclass
class SegmentsConfig:
    """``segments.*`` of :class:`EmbedConfig` (all seconds; no window: items are embedded whole)."""

    window: float | None = None
    hop: float | None = None
    min_length: float | None = None


@dataclass
class EmbedConfig:
    """Embed a manifest or shard folder into an embedding folder with a FAISS index.

    Attributes:
        checkpoint: Our checkpoint folder, a converted folder, or an official ``.pt`` (with ``bpe_dir``).
        data: A manifest (``.jsonl``/``.tsv``) or a folder (or file) of ``.tar`` shards.
        modality: The modality to embed (any modality of the model).
        out: The embedding folder to write.
        field: The row field holding the item (default: the modality's name).
        id_field: The row field holding the item id (rows without it get their row number).
        bpe_dir: Official GPT-2 BPE files (official ``.pt`` checkpoints).
        batch_size: Items per forward.
        workers: Decoding threads (0: decode in the main thread).
        device: ``auto`` (``cuda:$LOCAL_RANK`` / ``cuda`` when present, else ``cpu``), or a device.
        precision: ``auto`` (bf16 where a measured matmul peak says it is faster: CUDA, CPUs with AMX; else fp32),
            ``fp32``, ``bf16``, ``fp16`` or ``int8`` (ONNX Runtime's int8 graph: the ``export`` extra). Recorded in the
            folder: a resume or append must embed in the same precision.
        dtype: How vectors are stored: ``float16`` or ``float32``.
        index: ``auto``, ``flat``, ``hnsw``, ``ivf`` (IVF + SQ8), ``ivfpq`` or ``none``.
        index_memory: Memory budget of the index (``4GB``, ``512MB``...).
        index_queries: Vectors of the modality that will query the index, to tune and measure it on: a ``.npy``
            file of ``(Q, D)`` vectors or another embedding folder (e.g. the captions' embeddings). Default: the
            ``query_field`` values, else corpus vectors (right for same-modality search only).
        query_field: A row field holding a query for the row's item (e.g. ``caption``): up to 2000 of them are
            embedded (as ``query_modality``) to tune the index for cross-modal search.
        query_modality: The modality of ``query_field`` (default ``text``).
        extensions: Shards without a one-peace header: member extension -> the field it also fills, over the
            defaults (``jpg``/``png``/``webp`` -> ``image``, ``txt`` -> ``text``, ``wav``/``flac`` -> ``audio``...),
            e.g. ``extensions.tif=image``.
        mode: ``new`` (refuses a folder that holds parts), ``resume`` or ``append``.
        duplicate_ids: ``error`` (an id naming several items stops before the index is built: the parts are kept)
            or ``keep``.
        part_size: Rows per part (the unit of saved work).
        long_text: ``truncate`` or ``chunks`` (see ``OnePeaceModel.encode``).
        compile: Run the forward through ``torch.compile`` (one compilation, then faster per item: for corpora).
        progress: Show a progress bar.
        segments: Long audio / video as timed windows, one row each (``id`` ``<parent>#t=<start>,<end>``, with
            ``parent_id``, ``start``, ``end``): ``segments.window=10`` seconds, ``segments.hop`` (default: the window),
            ``segments.min_length`` (default 1 s); media are decoded a window at a time. Recorded in the folder: a
            resume or append must cut the same way.
    """

    checkpoint: str = "???"
    data: str = "???"
    modality: str = "???"
    out: str = "???"
    field: str | None = None
    id_field: str = "id"
    bpe_dir: str | None = None
    batch_size: int = 64
    workers: int = 4
    device: str = "auto"
    precision: str = "auto"
    dtype: str = "float16"
    index: str = "auto"
    index_memory: str = "4GB"
    index_queries: str | None = None
    query_field: str | None = None
    query_modality: str = LANGUAGE
    extensions: dict[str, str] = _field(default_factory=dict)  # (`field` is one of the keys)
    mode: str = "new"
    duplicate_ids: str = "error"
    part_size: int = 10_000
    long_text: str = "truncate"
    compile: bool = False
    progress: bool = True
    segments: SegmentsConfig = _field(default_factory=lambda: SegmentsConfig())

    def __post_init__(self) -> None:
        if isinstance(self.segments, dict):  # rebuilt from dataclasses.asdict (the Ray route's actors)
            self.segments = SegmentsConfig(**self.segments)


def _check(cfg: EmbedConfig) -> None:
    for key, value, allowed in (
        ("mode", cfg.mode, MODES),
        ("dtype", cfg.dtype, ("float16", "float32")),
        ("precision", cfg.precision, PRECISIONS),
        ("index", cfg.index, ("auto", "flat", "hnsw", "ivf", "ivfpq", "none")),
        ("long_text", cfg.long_text, ("truncate", "chunks")),
        ("duplicate_ids", cfg.duplicate_ids, DUPLICATE_POLICIES),
    ):
        if value not in allowed:
            raise ValueError(f"{key}: expected one of {list(allowed)}, got {value!r}")
    for key, number in (("batch_size", cfg.batch_size), ("part_size", cfg.part_size)):
        if number < 1:
            raise ValueError(f"{key}: must be >= 1, got {number}")
    if cfg.workers < 0:
        raise ValueError(f"workers: must be >= 0, got {cfg.workers}")
    if not Path(cfg.data).exists():
        raise FileNotFoundError(f"data: {cfg.data} not found (a manifest or a folder of .tar shards)")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {cfg.out} is a file; embed writes a folder (parts, index, info.json) there")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise ValueError(f"out: a parent of {cfg.out} is a file, not a folder")
    _device(cfg.device)  # an unknown device name is refused before the model loads
    if cfg.index != "none":
        from one_peace.retrieval.faiss_index import faiss, parse_memory

        faiss()
        parse_memory(cfg.index_memory)
    if cfg.index_queries is not None and not Path(cfg.index_queries).exists():
        raise FileNotFoundError(
            f"index_queries: {cfg.index_queries} not found (a .npy of vectors or an embedding folder)"
        )


def _device(name: str) -> torch.device:
    from one_peace.train.device import resolve_device

    return resolve_device(name, key="device")


def _precision(name: str, device: torch.device) -> tuple[str, torch.dtype]:
    """The resolved precision and the dtype the model is loaded in (int8 runs ONNX Runtime on fp32 weights)."""
    from one_peace.models.precision import DTYPES, resolve_precision

    resolved = resolve_precision(name, device)
    if resolved == "int8":
        from one_peace.extras import require

        require("export", "onnxruntime", "onnx", "onnxscript", feature="precision=int8")
    return resolved, DTYPES.get(resolved, torch.float32)


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, ahead: int) -> Iterator[Any]:
    """``map(fn, items)`` on a thread pool, in order, with at most ``ahead`` results pending (bounded memory)."""
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="one-peace-decode") as pool:
        pending: deque[Any] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _source_of(value: Any, row: dict[str, Any], resolved: Any, media: bool) -> tuple[str | None, str]:
    """Where an item came from, for the metadata: ``(source, kind)``."""
    if "__shard__" in row:
        return f"{Path(row['__shard__']).resolve()}#{row['__key__']}", "shard"
    if isinstance(value, str) and value.startswith("data:"):
        return value.split(",", 1)[0], "inline"
    if media and isinstance(resolved, Path):
        return str(resolved.resolve()), "file"
    if media and isinstance(resolved, list):
        return json.dumps([str(Path(p).resolve()) for p in resolved]), "files"
    return None, "value"


class _Embedder:
    """One embed job on one rank (see :func:`embed`)."""

    def __init__(self, cfg: EmbedConfig, model: Any, rank: int, world: int, model_id: str, precision: str) -> None:
        from one_peace.models.encoding import chunker, preprocessor

        self.cfg, self.model, self.rank, self.world, self.model_id = cfg, model, rank, world, model_id
        self.precision = precision  # resolved; the model was loaded in its dtype (fp32 for int8)
        self.field = cfg.field or cfg.modality
        self.plugin = get_plugin(cfg.modality)
        self.media = self.plugin.media
        self.base_dir = Path(cfg.data).parent if Path(cfg.data).is_file() else Path(cfg.data)
        self.prep = preprocessor(model, cfg.modality)
        self.split = chunker(model, cfg.modality) if cfg.long_text == "chunks" else None
        self.segments = segment_spec_of(cfg, model)
        self.store = EmbeddingStore(cfg.out)
        self.truncated = 0

    def decode(self, job: tuple[int, str, dict[str, Any]]) -> tuple[int, str, dict[str, Any], Any]:
        pos, item_id, row = job
        try:
            if "__error__" in row:  # a row that could not be read (a damaged line, a broken shard)
                raise UndecodableMedia(str(row["__error__"]))
            resolved = self.plugin.read_field(row, self.field, self.base_dir)
            value = row[self.field]
            if self.segments is not None:  # windows are decoded as they are embedded (memory bounded by one)
                return pos, item_id, row, (resolved, _source_of(value, row, resolved, self.media))
            group = self.split(resolved) if self.split is not None else [self.prep(resolved)]
            return pos, item_id, row, (group, _source_of(value, row, resolved, self.media))
        except DataError as exc:
            return pos, item_id, row, exc

    def embed_part(self, part: int, jobs: list[tuple[int, str, dict[str, Any]]], source: int) -> dict[str, Any]:
        from one_peace.models.encoding import WINDOW_BATCHES, embed_samples

        bad: list[dict[str, Any]] = []
        meta: dict[Any, dict[str, Any]] = {}
        ahead = self.cfg.batch_size * 4

        def samples() -> Iterator[tuple[int, list[dict[str, Any]]]]:
            for pos, item_id, row, got in _ordered_map(self.decode, jobs, self.cfg.workers, ahead):
                if isinstance(got, Exception):
                    modality = "row" if isinstance(got, UndecodableMedia) and "__error__" in row else self.cfg.modality
                    bad.append(bad_record(item_id, got, modality, row=pos))
                    continue
                group, (src, kind) = got
                reserved = RESERVED_COLUMNS + (SEGMENT_COLUMNS if self.segments is not None else ())
                fields = row_metadata(row, skip=(self.field,) if self.media else (), reserved=reserved)
                record = {**fields, "id": item_id, "row": pos, "source": src, "source_kind": kind}
                located = (row.get("__members__") or {}).get(self.field)
                if kind == "shard" and located:
                    record["source_member"] = ":".join(str(x) for x in located)
                if self.segments is not None:
                    yield from self._segments(pos, item_id, group, record, bad, meta)
                    continue
                self.truncated += any(s.get("truncated") for s in group)
                meta[pos] = record
                yield pos, group

        vectors, rows = [], []
        int8 = "int8" if self.precision == "int8" else None  # otherwise the model is already in its dtype
        for pos, emb in embed_samples(
            self.model,
            self.cfg.modality,
            samples(),
            self.cfg.batch_size,
            compile=self.cfg.compile,
            precision=int8,
            window_batches=1 if self.segments is not None else WINDOW_BATCHES,  # segments: one batch held at a time
        ):
            vectors.append(emb.float().cpu().numpy())
            rows.append(meta.pop(pos))
        dim = self.model.config.embed_dim
        arr = np.stack(vectors) if vectors else np.zeros((0, dim), dtype=np.float32)
        arr = arr.astype(np.float16 if self.cfg.dtype == "float16" else np.float32)
        first, last = jobs[0][0], jobs[-1][0] + 1
        record = {"source": source, "rows": [first, last], "count": len(rows), "bad": bad, "model": self.model_id}
        self.store.write_part(part, arr, rows, record)
        if PART_DONE_HOOK is not None:
            PART_DONE_HOOK(part)
        return record

    def _segments(
        self,
        pos: int,
        item_id: str,
        resolved: Any,
        record: dict[str, Any],
        bad: list[dict[str, Any]],
        meta: dict[Any, dict[str, Any]],
    ) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
        """One row per window of one item; a window that fails to decode ends the item (the windows before it are
        kept, and the item is listed in ``bad.jsonl`` with how many were embedded)."""
        from one_peace.segments import fragment_id

        done = 0
        try:
            for k, seg in enumerate(self.plugin.iter_segments(resolved, self.model.config, self.segments)):
                sample = self.prep(seg.item)
                meta[(pos, k)] = {
                    **record,
                    "id": fragment_id(item_id, seg.start, seg.end),
                    "parent_id": item_id,
                    "start": float(seg.start),
                    "end": float(seg.end),
                }
                done += 1
                yield (pos, k), [sample]
        except DataError as exc:
            bad.append({**bad_record(item_id, exc, self.cfg.modality, row=pos), "segments_embedded": done})


def segment_spec_of(cfg: EmbedConfig, model: Any) -> Any:
    """The resolved :class:`~one_peace.segments.SegmentSpec` of ``cfg.segments`` (``None``: items are whole)."""
    if cfg.segments.window is None:
        if cfg.segments.hop is not None or cfg.segments.min_length is not None:
            raise ValueError("segments: hop and min_length need segments.window")
        return None
    from one_peace.segments import segment_spec

    return segment_spec(model, cfg.modality, vars(cfg.segments))


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def embed(cfg: EmbedConfig, model: Any = None) -> dict[str, Any]:
    """Run one embed job (every rank under ``torchrun``); returns ``info.json``'s content on rank 0."""
    import one_peace

    _check(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")  # only barriers cross ranks: files carry the work
    device = _device(cfg.device)
    precision, dtype = _precision(cfg.precision, device)
    if model is None:
        model = one_peace.load(cfg.checkpoint, bpe_dir=cfg.bpe_dir, device=device, dtype=dtype)
    model.eval()
    if cfg.modality not in model.adapters:
        raise ValueError(f"modality: {cfg.modality!r} is not in the model (it has {list(model.adapters)})")
    if rank == 0:
        from one_peace.checkpoint import warn_unless_trained_for

        warn_unless_trained_for(model, "retrieval", f"embed checkpoint={cfg.checkpoint}")
    digest = model_hash(model)
    store = EmbeddingStore(cfg.out)
    if rank == 0:
        info = prepare_folder(cfg, store, model, digest, precision, segment_spec_of(cfg, model))
        store.save_info(info)
    _barrier(world)
    info = store.info()
    key = str(Path(cfg.data).resolve())
    source_no, source = next((i, s) for i, s in enumerate(info["sources"]) if s["data"] == key)
    job = _Embedder(cfg, model, rank, world, digest, precision)
    done = store.finished_parts()
    t0 = time.perf_counter()
    rows = _run_parts(cfg, job, source, source_no, done)
    _barrier(world)
    result: dict[str, Any] = {}
    if rank == 0:
        queries = query_vectors(cfg, model, precision) if cfg.index != "none" else None
        result = _finish(cfg, store, info, source_no, rows, job.truncated, time.perf_counter() - t0, queries)
    _barrier(world)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


def row_id(row: dict[str, Any], id_field: str, number: int) -> str:
    """The row's ``id_field``; else a shard sample's key; else ``#<row number>`` (the duplicate-id check catches a
    clash with a real id)."""
    if row.get(id_field) is not None:
        return str(row[id_field])
    if row.get("__key__"):
        return str(row["__key__"])
    return f"#{number}"


def _run_parts(
    cfg: EmbedConfig, job: _Embedder, source: dict[str, Any], source_no: int, done: dict[int, dict[str, Any]]
) -> int:
    """Embed this rank's unfinished parts of ``source``; returns the source's row count."""
    part_size = int(cfg.part_size)
    first_part, offset = int(source["first_part"]), int(source["row_offset"])
    bar = None
    if cfg.progress and job.rank == 0:
        from tqdm import tqdm

        total = source.get("rows")
        bar = tqdm(total=total, desc=f"embed {cfg.modality}", unit="item")
    jobs: list[tuple[int, str, dict[str, Any]]] = []
    current = -1
    count = 0

    def flush() -> None:
        if jobs and current >= 0:
            job.embed_part(first_part + current, list(jobs), source_no)

    for pos, (_, row) in enumerate(iter_rows(cfg.data, cfg.extensions)):
        count = pos + 1
        part = pos // part_size
        if part != current:
            flush()
            jobs.clear()
            current = part
        mine = (first_part + part) % job.world == job.rank and (first_part + part) not in done
        if mine:
            item_id = row_id(row, cfg.id_field, offset + pos)
            jobs.append((pos, item_id, row))
        if bar is not None:
            bar.update(1)
    flush()
    if bar is not None:
        bar.close()
    return count


def _finish(
    cfg: EmbedConfig,
    store: EmbeddingStore,
    info: dict[str, Any],
    source_no: int,
    rows: int,
    truncated: int,
    secs: float,
    queries: np.ndarray | None = None,
) -> dict[str, Any]:
    """Rank 0: check every part of the source is there, write ``bad.jsonl``, build or extend the index."""
    source = info["sources"][source_no]
    n_parts = math.ceil(rows / cfg.part_size)
    done = store.finished_parts()
    wanted = range(source["first_part"], source["first_part"] + n_parts)
    missing = [p for p in wanted if p not in done]
    if missing:
        raise RuntimeError(
            f"parts {missing} of {cfg.data} were not written (a rank failed): run again with mode=resume"
        )
    source.update(rows=rows, parts=n_parts, complete=True)
    bad = [b for p in sorted(done) for b in done[p]["bad"]]
    lines = "".join(json.dumps(b) + "\n" for b in bad)
    tmp = store.root / ".bad.jsonl.tmp"
    tmp.write_text(lines)
    os.replace(tmp, store.root / "bad.jsonl")
    info["count"] = sum(done[p]["count"] for p in done)
    info["schema"] = schema_json(store.schema())
    duplicates = store.duplicate_ids()
    info["duplicates"] = len(duplicates)
    if duplicates and info.get("duplicate_ids", "error") == "error":
        store.save_info(info)
        first, rows_of = next(iter(duplicates.items()))
        raise ValueError(
            f"{len(duplicates)} ids name several items in {store.root} (first: {first!r} at rows {rows_of[:5]}); "
            f"ids must be unique ({cfg.id_field!r}; rows without one get '#<row>'): fix the data and embed into a "
            "new folder, or accept them with duplicate_ids=keep mode=resume (the index is built then)"
        )
    info["bad"] = len(bad)
    if info["count"] == 0:
        store.save_info(info)
        raise ValueError(
            f"no item of {cfg.data} could be embedded ({rows} rows, {len(bad)} skipped: see {store.root / 'bad.jsonl'}"
            f"; field {cfg.field or cfg.modality!r})"
        )
    if truncated:
        logger.warning(
            "%d texts were truncated to the tokenizer's limit (long_text=chunks embeds them whole)", truncated
        )
    if cfg.index != "none":
        info["index"] = update_index(cfg, store, info, list(wanted), queries)
    else:
        info["index"] = None
    store.save_info(info)
    report = info.get("index") or {}
    recall = report.get("recall_at_10")
    print(
        f"embedded {sum(done[p]['count'] for p in wanted)} {cfg.modality} items of {cfg.data} "
        f"({sum(len(done[p]['bad']) for p in wanted)} bad, listed in {store.root / 'bad.jsonl'}) in {secs:.1f} s; "
        f"{info['count']} in {store.root}"
        + (
            f"; index {report['factory']} {report.get('search_params') or ''}: 10-recall@10 {recall:.3f}, "
            f"{report.get('latency_ms', 0):.3f} ms/query, {report.get('memory_bytes', 0) / 1e6:.1f} MB"
            if report and recall is not None
            else ""
        )
    )
    return info


#: query values embedded from ``query_field`` to tune an index
QUERY_SAMPLE = 2000


def query_vectors(cfg: EmbedConfig, model: Any, precision: str | None = None) -> np.ndarray | None:
    """The vectors an index is tuned and measured on (``index_queries``, or ``query_field`` values embedded as
    ``query_modality`` in the corpus's ``precision``); ``None``: tune on corpus vectors."""
    if cfg.index_queries is not None:
        path = Path(cfg.index_queries)
        if path.is_dir():
            vectors = EmbeddingStore(path).vectors()
        else:
            try:
                vectors = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ValueError(f"index_queries: {path} is not a .npy array of vectors ({exc})") from None
        dim = model.config.embed_dim
        if vectors.ndim != 2 or vectors.shape[1] != dim:
            raise ValueError(f"index_queries: {path} holds shape {tuple(vectors.shape)}, expected (Q, {dim})")
        return np.ascontiguousarray(vectors, dtype=np.float32)
    if cfg.query_field is None:
        return None
    if cfg.query_modality not in model.adapters:
        raise ValueError(f"query_modality: {cfg.query_modality!r} is not in the model (it has {list(model.adapters)})")
    plugin = get_plugin(cfg.query_modality)
    base_dir = Path(cfg.data).parent if Path(cfg.data).is_file() else Path(cfg.data)
    values = []
    for _, row in iter_rows(cfg.data, cfg.extensions):
        try:
            values.append(plugin.read_field(row, cfg.query_field, base_dir))
        except DataError:
            continue
        if len(values) >= QUERY_SAMPLE:
            break
    if not values:
        raise ValueError(f"query_field: no row of {cfg.data} has a usable {cfg.query_field!r} field")
    int8 = "int8" if precision == "int8" else None  # other precisions: the model was loaded in their dtype
    return np.asarray(model.encode(cfg.query_modality, values, output="numpy", precision=int8), dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse(EmbedConfig, argv, "python -m one_peace.embed")
    from one_peace.extras import MissingExtraError

    try:
        embed(cfg)
    except (ValueError, FileNotFoundError, RuntimeError, MissingExtraError) as exc:
        raise SystemExit(f"error: {exc}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
