"""Embedding folders (what ``python -m one_peace.embed`` writes) and searching them.

A folder holds::

    info.json                      model identity, preprocessing, modality, dim, count, index and its recall
    embeddings/part-NNNNN.npy      L2-normalised vectors (float16 by default), one row per item
    metadata/part-NNNNN.parquet    id, source (path / URI / shard#key) and the row's other fields, same order
    parts/part-NNNNN.json          a finished part: its rows, count, bad items and model hash (written last)
    index.faiss                    the FAISS index over all parts, in part order
    bad.jsonl                      skipped items with the reason

Position ``i`` of the index is row ``i`` of the parts taken in part order, so metadata always lines up.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from one_peace.extras import require


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _arrow_table(rows: Sequence[Mapping[str, Any]]) -> Any:
    """A pyarrow table of metadata rows: scalars stay typed, lists/dicts become JSON text, mixed columns text."""
    require("retrieval", "pyarrow", feature="writing embedding metadata (parquet)")
    import pyarrow as pa

    names = list(dict.fromkeys(k for r in rows for k in r))
    columns = {}
    for name in names:
        values = [r.get(name) for r in rows]
        values = [json.dumps(v) if isinstance(v, list | dict | tuple) else v for v in values]
        values = [v.hex() if isinstance(v, bytes) else v for v in values]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name] = pa.array([None if v is None else str(v) for v in values], type=pa.string())
    return pa.table(columns) if columns else pa.table({"id": pa.array([], type=pa.string())})


@dataclass
class Hit:
    """One search result: the item's id, its score (inner product = cosine), and its metadata row."""

    id: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """``{"id", "score", "metadata"}``."""
        return {"id": self.id, "score": self.score, "metadata": self.metadata}


class EmbeddingStore:
    """Read and write the files of an embedding folder (see the module docstring).

    Args:
        root: The folder.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._table: Any = None

    # ------------------------------------------------------------------------------------------------ layout
    @property
    def info_path(self) -> Path:
        """``info.json``."""
        return self.root / "info.json"

    @property
    def index_path(self) -> Path:
        """``index.faiss``."""
        return self.root / "index.faiss"

    def part_name(self, part: int) -> str:
        """``part-NNNNN``."""
        return f"part-{part:05d}"

    def info(self) -> dict[str, Any]:
        """The folder's ``info.json``, checked (:func:`one_peace.retrieval.format.read_info`); empty when absent."""
        from one_peace.retrieval.format import read_info

        if not self.info_path.is_file():
            return {}
        return read_info(self.info_path)

    def save_info(self, info: Mapping[str, Any]) -> None:
        """Write ``info.json`` atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.info_path, dict(info))

    def finished_parts(self) -> dict[int, dict[str, Any]]:
        """Part number -> its record, for every part whose files were all written and read back whole (a part
        truncated or damaged since is not finished: ``mode=resume`` embeds it again)."""
        out = {}
        for marker in sorted((self.root / "parts").glob("part-*.json")):
            try:
                record = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if self._part_intact(marker.stem, record):
                out[int(record["part"])] = record
        return out

    def _part_intact(self, name: str, record: Mapping[str, Any]) -> bool:
        npy = self.root / "embeddings" / f"{name}.npy"
        meta = self.root / "metadata" / f"{name}.parquet"
        if not (npy.is_file() and meta.is_file()):
            return False
        try:
            import pyarrow.parquet as pq

            rows = np.load(npy, mmap_mode="r").shape[0]
            return bool(rows == record.get("count", rows) == pq.read_metadata(meta).num_rows)
        except Exception:  # a truncated or damaged file (numpy, arrow and OS errors alike)
            return False

    def has_parts(self) -> bool:
        """Whether any part (finished or not) is in the folder."""
        return any((self.root / "embeddings").glob("part-*.npy")) or any((self.root / "parts").glob("part-*.json"))

    def write_part(
        self, part: int, vectors: np.ndarray, metadata: Sequence[Mapping[str, Any]], record: Mapping[str, Any]
    ) -> None:
        """Write a part's vectors and metadata, then its record (the record marks the part as finished)."""
        require("retrieval", "pyarrow", feature="writing embedding metadata (parquet)")
        import pyarrow.parquet as pq

        if len(vectors) != len(metadata):
            raise ValueError(f"part {part}: {len(vectors)} vectors but {len(metadata)} metadata rows")
        name = self.part_name(part)
        for sub in ("embeddings", "metadata", "parts"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        npy = self.root / "embeddings" / f"{name}.npy"
        tmp = npy.with_name(f".{name}.npy.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, vectors)
        os.replace(tmp, npy)
        meta = self.root / "metadata" / f"{name}.parquet"
        tmp = meta.with_name(f".{name}.parquet.tmp")
        pq.write_table(_arrow_table(metadata), tmp)
        os.replace(tmp, meta)
        write_json_atomic(self.root / "parts" / f"{name}.json", {"part": part, **record})
        self._table = None

    # ----------------------------------------------------------------------------------------------- reading
    def part_numbers(self) -> list[int]:
        """Finished part numbers in index order."""
        return sorted(self.finished_parts())

    def vectors(self, parts: Sequence[int] | None = None) -> np.ndarray:
        """``(N, D)`` float32 vectors of ``parts`` (default: all), in part order."""
        chosen = self.part_numbers() if parts is None else list(parts)
        arrays = [np.load(self.root / "embeddings" / f"{self.part_name(p)}.npy", mmap_mode="r") for p in chosen]
        if not arrays:
            dim = int(self.info().get("dim", 0))
            return np.zeros((0, dim), dtype=np.float32)
        out = np.empty((sum(len(a) for a in arrays), arrays[0].shape[1]), dtype=np.float32)
        start = 0
        for a in arrays:  # filled part by part: no float16 copy of the whole corpus beside the result
            out[start : start + len(a)] = a
            start += len(a)
        return out

    def metadata_table(self) -> Any:
        """All metadata rows as one pyarrow table, in index order (cached)."""
        if self._table is None:
            require("retrieval", "pyarrow", feature="reading embedding metadata (parquet)")
            import pyarrow as pa
            import pyarrow.parquet as pq

            from one_peace.retrieval.format import conform, unify_schema

            tables = [
                pq.read_table(self.root / "metadata" / f"{self.part_name(p)}.parquet") for p in self.part_numbers()
            ]
            if tables:
                schema = unify_schema([t.schema for t in tables])
                self._table = pa.concat_tables([conform(t, schema) for t in tables])
            else:
                self._table = _arrow_table([])
        return self._table

    def schema(self) -> Any:
        """The metadata's arrow schema over every finished part (a column whose type differs between parts: text)."""
        require("retrieval", "pyarrow", feature="reading embedding metadata (parquet)")
        import pyarrow.parquet as pq

        from one_peace.retrieval.format import unify_schema

        return unify_schema(
            [pq.read_schema(self.root / "metadata" / f"{self.part_name(p)}.parquet") for p in self.part_numbers()]
        )

    def duplicate_ids(self) -> dict[str, list[int]]:
        """Ids held by several items, mapped to their index positions."""
        seen: dict[str, list[int]] = {}
        for position, item in enumerate(self.ids()):
            seen.setdefault(item, []).append(position)
        return {k: v for k, v in seen.items() if len(v) > 1}

    def ids(self) -> list[str]:
        """Item ids in index order."""
        return [str(v) for v in self.metadata_table().column("id").to_pylist()]

    def metadata(self, position: int) -> dict[str, Any]:
        """The metadata row at index ``position``."""
        row = self.metadata_table().slice(position, 1).to_pylist()
        if not row:
            raise IndexError(f"position {position} is not in {self.root} ({self.metadata_table().num_rows} items)")
        return dict(row[0])

    def bad(self) -> list[dict[str, Any]]:
        """Skipped items (``bad.jsonl``)."""
        path = self.root / "bad.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RetrievalIndex:
    """A searchable embedding folder: its FAISS index, its metadata, and (loaded on first use) its model.

    Args:
        root: An embedding folder written by ``python -m one_peace.embed``.
        checkpoint: The model that embeds queries (default: the one recorded in ``info.json``).
        bpe_dir: Official GPT-2 BPE files, for official ``.pt`` checkpoints.
        device: Where the query model runs.
    """

    def __init__(
        self, root: str | Path, checkpoint: str | None = None, bpe_dir: str | None = None, device: str = "cpu"
    ) -> None:
        from one_peace.retrieval.faiss_index import load_index

        self.store = EmbeddingStore(root)
        self.info = self.store.info()
        if not self.info:
            raise FileNotFoundError(f"{root}: no info.json (not an embedding folder from python -m one_peace.embed)")
        if not self.store.index_path.is_file():
            unfinished = [src["data"] for src in self.info.get("sources", []) if not src.get("complete")]
            duplicates = int(self.info.get("duplicates") or 0)
            if not unfinished and duplicates and "index" not in self.info:
                raise FileNotFoundError(
                    f"{root}: the embed stopped on {duplicates} duplicate id{'s' if duplicates > 1 else ''} before "
                    "building the index: fix the data and embed into a new folder, or run the same command with "
                    "duplicate_ids=keep mode=resume"
                )
            if unfinished or "index" not in self.info:
                raise FileNotFoundError(
                    f"{root}: the embed into this folder did not finish ({unfinished[0] if unfinished else 'no index'})"
                    ": run the same command again with mode=resume"
                )
            raise FileNotFoundError(f"{self.store.index_path} not found (the folder was embedded with index=none)")
        report = self.info.get("index") or {}
        self.index = load_index(str(self.store.index_path), report.get("search_params"))
        self.modality = str(self.info["modality"])
        model_info = self.info.get("model", {})
        self.checkpoint = checkpoint or model_info.get("checkpoint")
        self.bpe_dir = bpe_dir or model_info.get("bpe_dir")
        self.device = device
        self._model: Any = None
        self._lock = threading.Lock()
        rows = self.store.metadata_table().num_rows
        if self.index.ntotal != rows:
            raise ValueError(
                f"{root}: the index holds {self.index.ntotal} vectors but the metadata {rows} "
                "rows (an interrupted embed: run it again with mode=resume)"
            )

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def model(self) -> Any:
        """The query model (loaded on first use)."""
        if self._model is None:
            import one_peace

            if not self.checkpoint:
                raise ValueError(f"{self.store.info_path} records no checkpoint: pass checkpoint=")
            model = one_peace.load(self.checkpoint, bpe_dir=self.bpe_dir, device=self.device).eval()
            self.model = model
        return self._model

    @model.setter
    def model(self, model: Any) -> None:
        """Set the query model; refused when it is not the model the folder was embedded with."""
        from one_peace.retrieval.format import check_query_model

        check_query_model(self.info, model, str(self.store.root), self.checkpoint)
        self._model = model

    def embed_query(
        self, query: Mapping[str, Any], fuse: str = "joint", weights: Mapping[str, float] | None = None
    ) -> np.ndarray:
        """``(1, D)`` float32 embedding of a query ``{modality: item}`` (several modalities: a composed query)."""
        items = {m: v for m, v in query.items() if v is not None}
        if not items:
            raise ValueError("empty query: give at least one of " + ", ".join(self.model.adapters))
        if len(items) == 1:
            ((m, v),) = items.items()
            vectors = self.model.encode(m, [v], output="numpy", precision=self.precision)
            return np.asarray(vectors, dtype=np.float32)
        return np.asarray(
            self.model.encode_multimodal(
                {m: [v] for m, v in items.items()}, fuse=fuse, weights=weights, output="numpy"
            ),
            dtype=np.float32,
        )

    @property
    def precision(self) -> str | None:
        """The precision the folder's vectors were computed in (``info.json``; ``None`` for folders from before it
        was recorded): single-modality queries are embedded in it too, so an item finds itself exactly."""
        value = (self.info.get("model") or {}).get("precision")
        return str(value) if value else None

    def search_params(self) -> dict[str, int]:
        """The search parameters in force: the tuned ones recorded in ``info.json`` (``nprobe`` / ``efSearch``)."""
        return dict((self.info.get("index") or {}).get("search_params") or {})

    def check_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> dict[str, int]:
        """The search-parameter override ``{"nprobe": n}`` / ``{"efSearch": n}`` for this index.

        Raises:
            ValueError: not an integer >= 1, or a parameter this index does not have.
        """
        return self._params(nprobe, ef_search)

    def _params(self, nprobe: int | None, ef_search: int | None) -> dict[str, int]:
        tuned = self.search_params()
        asked = {k: v for k, v in (("nprobe", nprobe), ("efSearch", ef_search)) if v is not None}
        for name, value in asked.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"{'ef_search' if name == 'efSearch' else name}: expected an integer >= 1, got {value!r}"
                )
            if name not in tuned:
                kind = (self.info.get("index") or {}).get("factory", "?")
                raise ValueError(
                    f"{'ef_search' if name == 'efSearch' else name}: the index {kind} has no such parameter "
                    f"(it has {sorted(tuned) or 'none: exact search'})"
                )
        return asked

    def search_vectors(
        self, vectors: np.ndarray, top_k: int = 10, nprobe: int | None = None, ef_search: int | None = None
    ) -> list[list[Hit]]:
        """The ``top_k`` nearest items of each row of ``vectors (Q, D)``; ``nprobe`` (IVF indexes) / ``ef_search``
        (HNSW) override the tuned search parameter for this call (more: slower, higher recall)."""
        from one_peace.retrieval.faiss_index import set_search_params

        xq = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if xq.shape[1] != self.index.d:
            raise ValueError(f"query vectors have dimension {xq.shape[1]}, the index {self.index.d}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k: expected an integer >= 1, got {top_k!r}")
        asked = self._params(nprobe, ef_search)
        with self._lock:  # parameters live on the shared index: set, search, restore
            set_search_params(self.index, asked)
            try:
                scores, positions = self.index.search(xq, min(int(top_k), len(self)))
            finally:
                if asked:
                    set_search_params(self.index, self.search_params())
        out = []
        for row_scores, row_pos in zip(scores, positions):
            hits = []
            for s, p in zip(row_scores.tolist(), row_pos.tolist()):
                if p < 0:
                    continue
                meta = self.store.metadata(p)
                hits.append(Hit(str(meta.get("id")), float(s), meta))
            out.append(hits)
        return out

    def search(
        self,
        query: Mapping[str, Any] | None = None,
        top_k: int = 10,
        fuse: str = "joint",
        weights: Mapping[str, float] | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        **items: Any,
    ) -> list[Hit]:
        """Search by ``text=``, ``image=``, ``audio=``, ``video=`` (or any modality of the model), or a dict.

        Several modalities at once form a composed query (``fuse="joint"`` or ``"mean"``, see
        :meth:`OnePeaceModel.encode_multimodal`). ``nprobe`` / ``ef_search``: see :meth:`search_vectors`.
        """
        merged = {**(query or {}), **items}
        self._params(nprobe, ef_search)  # refused before the query is embedded
        return self.search_vectors(self.embed_query(merged, fuse, weights), top_k, nprobe, ef_search)[0]


def open_index(
    root: str | Path, checkpoint: str | None = None, bpe_dir: str | None = None, device: str = "cpu"
) -> RetrievalIndex:
    """Open an embedding folder for search (see :class:`RetrievalIndex`)."""
    return RetrievalIndex(root, checkpoint, bpe_dir, device)
