"""#27 (part): an embedding folder into LanceDB (a table, written directly), Milvus (bulk-import Parquet files, loaded
into Milvus Lite) and Qdrant (upsert bodies, loaded into its local mode), without embedding again; each database's
top-10 on 100 queries overlaps exact search at least as much as our flat index (exact here: 1.0)."""

from __future__ import annotations

import json

import numpy as np

from one_peace.retrieval.databases import load_milvus, load_qdrant, main, write_milvus, write_qdrant
from one_peace.retrieval.faiss_index import exact_top_k, recall_at_k
from one_peace.retrieval.store import EmbeddingStore, write_json_atomic


def _folder(root, n: int = 3000, d: int = 24, part: int = 1000):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store = EmbeddingStore(root)
    for p, start in enumerate(range(0, n, part)):
        rows = [
            {"id": f"item{i}", "row": i, "caption": f"caption {i}", "box": [i, i + 1.5]}
            for i in range(start, min(n, start + part))
        ]
        store.write_part(p, x[start : start + part].astype(np.float16), rows, {"count": len(rows)})
    write_json_atomic(store.info_path, {"format": 1, "modality": "image", "dim": d, "model": {}, "sources": []})
    q = rng.standard_normal((100, d)).astype(np.float32)
    return x.astype(np.float16).astype(np.float32), q / np.linalg.norm(q, axis=1, keepdims=True)


def _ids(hits) -> np.ndarray:
    return np.array([[int(str(h).removeprefix("item")) for h in row] for row in hits])


def test_lancedb_milvus_and_qdrant_answer_like_exact_search(tmp_path, capsys):
    import lancedb
    from pymilvus import MilvusClient
    from qdrant_client import QdrantClient

    x, q = _folder(tmp_path / "emb")
    truth = exact_top_k(x, q, 10)

    assert main([f"out={tmp_path / 'emb'}", "target=lancedb", f"dest={tmp_path / 'lance'}"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 3000
    table = lancedb.connect(str(tmp_path / "lance")).open_table("embeddings")
    assert table.count_rows() == 3000 and {"id", "caption", "box", "vector"} <= set(table.schema.names)
    hits = [table.search(v).metric("dot").limit(10).to_list() for v in q]
    assert recall_at_k(_ids([[h["id"] for h in row] for row in hits]), truth) >= 0.99
    assert hits[0][0]["caption"] == f"caption {hits[0][0]['row']}"

    spec = write_milvus(tmp_path / "emb", tmp_path / "milvus")
    assert spec["rows"] == 3000 and spec["fields"][0]["name"] == "id" and len(spec["files"]) == 3
    client = MilvusClient(str(tmp_path / "milvus.db"))
    assert load_milvus(tmp_path / "milvus", client) == 3000
    res = client.search("embeddings", q.tolist(), limit=10, output_fields=["caption", "box"])
    assert recall_at_k(_ids([[h["id"] for h in row] for row in res]), truth) >= 0.99
    first = res[0][0]
    assert first["entity"]["caption"].startswith("caption ") and json.loads(first["entity"]["box"])[1] > 1

    spec = write_qdrant(tmp_path / "emb", tmp_path / "qdrant")
    assert spec["create"] == {"vectors": {"size": 24, "distance": "Dot"}}
    qc = QdrantClient(path=str(tmp_path / "qdrant.db"))
    assert load_qdrant(tmp_path / "qdrant", qc) == 3000
    found = [qc.query_points("embeddings", query=v.tolist(), limit=10).points for v in q]
    assert recall_at_k(np.array([[p.id for p in row] for row in found]), truth) >= 0.99
    assert found[0][0].payload["id"] == f"item{found[0][0].id}"
    qc.close()
