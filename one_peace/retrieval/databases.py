"""An embedding folder into vector databases, without embedding again: LanceDB (a table written directly), and the
files Milvus and Qdrant import (read part by part: the folder is never loaded whole).

* ``lancedb``: a LanceDB table (``id``, ``vector`` and every metadata column), with an IVF-PQ index from 65,536 rows
  (below that LanceDB's exact scan is used);
* ``milvus``: Parquet files for Milvus' bulk import (``id`` as the VARCHAR primary key, ``vector`` as FLOAT_VECTOR,
  every metadata column as a scalar; lists and structs as JSON text) and ``collection.json`` (the schema to create
  first); :func:`load_milvus` inserts them through ``pymilvus`` where bulk import is not available (Milvus Lite);
* ``qdrant``: one JSON body per part for Qdrant's ``PUT /collections/<name>/points`` (integer point ids = row numbers,
  the item id and metadata as payload) and ``collection.json`` (the ``PUT /collections/<name>`` body);
  :func:`load_qdrant` upserts them through ``qdrant-client`` (a server, or its local mode).

Vectors are the folder's (L2-normalised, so inner product = cosine), stored as float32.

    python -m one_peace.retrieval.databases out=index/photos target=lancedb dest=photos.lance
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from one_peace.extras import require

TARGETS = ("lancedb", "milvus", "qdrant")
#: rows from which the LanceDB table gets an IVF-PQ index (an exact scan below)
LANCE_INDEX_ROWS = 65_536


def iter_parts(root: str | Path) -> Iterator[tuple[Any, np.ndarray]]:
    """``(metadata arrow table, float32 vectors)`` of each finished part of an embedding folder, in index order."""
    import pyarrow.parquet as pq

    from one_peace.retrieval.store import EmbeddingStore

    store = EmbeddingStore(root)
    if not store.info():
        raise FileNotFoundError(f"{root}: no info.json (not an embedding folder from python -m one_peace.embed)")
    for p in store.part_numbers():
        name = store.part_name(p)
        table = pq.read_table(store.root / "metadata" / f"{name}.parquet")
        vectors = np.asarray(np.load(store.root / "embeddings" / f"{name}.npy"), dtype=np.float32)
        yield table, vectors


def _scalar_table(table: Any) -> Any:
    """Metadata with list / struct / map columns as JSON text (what Milvus' scalar fields and payloads take)."""
    import pyarrow as pa

    columns = {}
    for name, column in zip(table.column_names, table.columns):
        if pa.types.is_nested(column.type):
            columns[name] = pa.array([json.dumps(v, default=str) for v in column.to_pylist()], pa.string())
        elif pa.types.is_null(column.type):
            columns[name] = pa.array([None] * len(column), pa.string())
        else:
            columns[name] = column
    return pa.table(columns)


def _with_vectors(table: Any, vectors: np.ndarray) -> Any:
    import pyarrow as pa

    flat = pa.array(vectors.reshape(-1), pa.float32())
    return table.append_column("vector", pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))


def to_lancedb(root: str | Path, uri: str | Path, table: str = "embeddings") -> dict[str, Any]:
    """Write the folder into the LanceDB table ``table`` at ``uri`` (replaced); returns what was written."""
    require("databases", "lancedb", feature="exporting to LanceDB")
    import lancedb

    db = lancedb.connect(str(uri))
    handle = None
    rows = 0
    for meta, vectors in iter_parts(root):
        data = _with_vectors(meta, vectors)
        handle = db.create_table(table, data=data, mode="overwrite") if handle is None else handle
        if rows:
            handle.add(data)
        rows += len(vectors)
    if handle is None:
        raise ValueError(f"{root}: no embedded parts")
    indexed = rows >= LANCE_INDEX_ROWS
    if indexed:
        from lancedb.index import IvfPq

        handle.create_index("vector", config=IvfPq(distance_type="dot"))
    return {"uri": str(uri), "table": table, "rows": rows, "ivf_pq_index": indexed}


def _field(arrow_type: Any) -> dict[str, Any]:
    import pyarrow as pa

    if pa.types.is_integer(arrow_type):
        return {"type": "INT64"}
    if pa.types.is_floating(arrow_type):
        return {"type": "DOUBLE"}
    if pa.types.is_boolean(arrow_type):
        return {"type": "BOOL"}
    return {"type": "VARCHAR", "max_length": 65535}


def write_milvus(root: str | Path, out: str | Path, collection: str = "embeddings") -> dict[str, Any]:
    """Write Milvus bulk-import Parquet files (one per part) and ``collection.json`` into ``out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    fields: dict[str, dict[str, Any]] = {}
    rows = dim = 0
    for i, (meta, vectors) in enumerate(iter_parts(root)):
        table = _scalar_table(meta)
        if table.schema.field("id").type != pa.string():
            table = table.set_column(table.column_names.index("id"), "id", table.column("id").cast(pa.string()))
        for name, column in zip(table.column_names, table.columns):
            fields.setdefault(name, _field(column.type))
        vector = pa.array(list(vectors), pa.list_(pa.float32()))
        path = folder / f"part-{i:05d}.parquet"
        pq.write_table(table.append_column("vector", vector), path)
        files.append(path.name)
        rows, dim = rows + len(vectors), vectors.shape[1]
    schema = {
        "collection": collection,
        "fields": [{"name": "id", "type": "VARCHAR", "max_length": 512, "is_primary": True}]
        + [{"name": k, **v} for k, v in fields.items() if k != "id"]
        + [{"name": "vector", "type": "FLOAT_VECTOR", "dim": dim}],
        "index": {"field": "vector", "metric_type": "IP"},
        "files": files,
        "rows": rows,
    }
    (folder / "collection.json").write_text(json.dumps(schema, indent=2) + "\n")
    return schema


def load_milvus(files: str | Path, client: Any, index_type: str = "FLAT") -> int:
    """Create the collection ``collection.json`` describes in a ``pymilvus.MilvusClient`` and insert the Parquet
    files (for Milvus Lite and servers without bulk import); returns the rows inserted."""
    import pyarrow.parquet as pq
    from pymilvus import DataType

    folder = Path(files)
    spec = json.loads((folder / "collection.json").read_text())
    schema = client.create_schema(auto_id=False)
    for f in spec["fields"]:
        extra = {k: v for k, v in f.items() if k in ("max_length", "dim", "is_primary")}
        schema.add_field(f["name"], getattr(DataType, f["type"]), **extra)
    index = client.prepare_index_params()
    index.add_index(spec["index"]["field"], index_type=index_type, metric_type=spec["index"]["metric_type"])
    client.create_collection(spec["collection"], schema=schema, index_params=index)
    rows = 0
    for name in spec["files"]:
        batch = pq.read_table(folder / name).to_pylist()
        client.insert(spec["collection"], batch)
        rows += len(batch)
    return rows


def write_qdrant(root: str | Path, out: str | Path, collection: str = "embeddings") -> dict[str, Any]:
    """Write Qdrant's upsert bodies (``points-0000i.json``, one per part) and ``collection.json`` into ``out``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    rows = dim = 0
    for i, (meta, vectors) in enumerate(iter_parts(root)):
        payloads = _scalar_table(meta).to_pylist()
        points = [
            {"id": rows + j, "vector": [float(v) for v in vectors[j]], "payload": payloads[j]}
            for j in range(len(vectors))
        ]
        path = folder / f"points-{i:05d}.json"
        path.write_text(json.dumps({"points": points}))
        files.append(path.name)
        rows, dim = rows + len(vectors), vectors.shape[1]
    spec = {
        "collection": collection,
        "create": {"vectors": {"size": dim, "distance": "Dot"}},
        "files": files,
        "rows": rows,
    }
    (folder / "collection.json").write_text(json.dumps(spec, indent=2) + "\n")
    return spec


def load_qdrant(files: str | Path, client: Any) -> int:
    """Create the collection and upsert the point files into a ``qdrant_client.QdrantClient``; returns the rows."""
    from qdrant_client import models

    folder = Path(files)
    spec = json.loads((folder / "collection.json").read_text())
    vectors = spec["create"]["vectors"]
    client.create_collection(
        spec["collection"],
        vectors_config=models.VectorParams(size=vectors["size"], distance=models.Distance(vectors["distance"])),
    )
    rows = 0
    for name in spec["files"]:
        points = json.loads((folder / name).read_text())["points"]
        client.upsert(spec["collection"], points=[models.PointStruct(**p) for p in points])
        rows += len(points)
    return rows


@dataclass
class ExportDbConfig:
    """Export an embedding folder to a vector database (no re-embedding).

    Attributes:
        out: The embedding folder.
        target: ``lancedb`` (a table), ``milvus`` (bulk-import Parquet files) or ``qdrant`` (upsert bodies).
        dest: The LanceDB database folder, or the folder the Milvus / Qdrant files go to.
        collection: The table / collection name.
    """

    out: str = "???"
    target: str = "???"
    dest: str = "???"
    collection: str = "embeddings"


def main(argv: list[str] | None = None) -> int:
    """``python -m one_peace.retrieval.databases out=FOLDER target=lancedb|milvus|qdrant dest=PATH``."""
    from one_peace.cli import parse
    from one_peace.extras import MissingExtraError

    cfg = parse(ExportDbConfig, argv, "python -m one_peace.retrieval.databases")
    if cfg.target not in TARGETS:
        raise SystemExit(f"error: target: expected one of {list(TARGETS)}, got {cfg.target!r}")
    try:
        if cfg.target == "lancedb":
            done = to_lancedb(cfg.out, cfg.dest, cfg.collection)
        elif cfg.target == "milvus":
            done = write_milvus(cfg.out, cfg.dest, cfg.collection)
        else:
            done = write_qdrant(cfg.out, cfg.dest, cfg.collection)
    except (ValueError, FileNotFoundError, MissingExtraError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps({k: v for k, v in done.items() if k != "fields"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
