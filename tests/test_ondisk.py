"""#27 (part): the on-disk index of an embedding folder: trained on a sample, filled by two worker processes in
blocks, merged into one memory-mapped ``index.ivfdata`` that ``open_index`` (search, the page) reads; recall against
exact search on held-out queries from another region of the space (a modality gap)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from one_peace.retrieval.faiss_index import exact_top_k, faiss, recall_at_k
from one_peace.retrieval.ondisk import FolderChunks, build_for_folder, exact_top_k_streaming, plan
from one_peace.retrieval.store import EmbeddingStore, open_index, write_json_atomic


def _folder(root, n: int = 24_000, d: int = 32, part: int = 5_000, seed: int = 0):
    """An embedding folder of clustered unit vectors in parts (as embed writes them), and queries shifted off the
    corpus (the gap between a query modality and the corpus)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, d)).astype(np.float32)
    x = centres[rng.integers(0, 200, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    gap = rng.standard_normal(d).astype(np.float32) * 0.4 / np.sqrt(d)
    q = centres[rng.integers(0, 200, 300)] + gap + 0.6 * rng.standard_normal((300, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    store = EmbeddingStore(root)
    for p, start in enumerate(range(0, n, part)):
        rows = [{"id": f"v{i}", "row": i} for i in range(start, min(n, start + part))]
        store.write_part(p, x[start : start + part].astype(np.float16), rows, {"count": len(rows)})
    info = {"format": 1, "modality": "image", "dim": d, "model": {}, "sources": [{"complete": True}]}
    write_json_atomic(store.info_path, info)
    return x.astype(np.float16).astype(np.float32), q


def test_an_on_disk_index_built_by_two_workers_is_memory_mapped_and_searchable(tmp_path):
    x, q = _folder(tmp_path / "emb")
    source = FolderChunks(str(tmp_path / "emb"))
    assert len(source) == 5 and source.dim == 32
    truth = exact_top_k(x, q[:100], 10)
    assert np.array_equal(exact_top_k_streaming(source, q[:100], 10), truth)  # streamed over parts, same answer

    report = build_for_folder(tmp_path / "emb", memory="8MB", workers=2, queries=q[100:])
    assert report["vectors"] == len(x) and report["on_disk"] and report["blocks"] >= 2
    assert report["factory"] == "OPQ16,IVF256,PQ16" and report["workers"] == 2
    assert (tmp_path / "emb" / "index.ivfdata").stat().st_size > (tmp_path / "emb" / "index.faiss").stat().st_size
    assert not (tmp_path / "emb" / ".ondisk").exists()
    assert json.loads((tmp_path / "emb" / "info.json").read_text())["index"]["tuned_on"] == "queries"

    index = open_index(tmp_path / "emb")
    ivf = faiss().extract_index_ivf(index.index)
    assert isinstance(faiss().downcast_InvertedLists(ivf.invlists), faiss().OnDiskInvertedLists)
    hits = index.search_vectors(q[:100], top_k=10, nprobe=64)
    found = np.array([[int(h.id[1:]) for h in row] for row in hits])
    assert recall_at_k(found, truth) >= 0.8  # PQ16 codes of 32-d vectors; the held-out tuning figure is recorded
    assert report["recall_at_10"] >= 0.7


def test_the_plan_keeps_blocks_and_the_sample_within_the_budget():
    for n, d, budget, workers in ((10**7, 64, 256 << 20, 2), (10**9, 768, 64 << 30, 16), (20_000, 32, 8 << 20, 2)):
        factory, nlist, points, block = plan(n, d, budget, workers)
        m = int(factory.split("PQ")[-1])
        assert points * d * 4 <= max(budget // 4, 39 * 256 * d * 4) and points >= 39 * min(nlist, n // 39)
        assert block * (m + 8) * workers <= budget // 2 or block == 8192
        assert d % m == 0 and 8 <= m <= 64
    assert plan(10**9, 768, 64 << 30, 16)[0] == "OPQ64,IVF65536,PQ64"


def test_a_folder_still_embedding_is_refused(tmp_path):
    _folder(tmp_path / "emb", n=2000, part=1000)
    info = json.loads((tmp_path / "emb" / "info.json").read_text())
    info["sources"][0]["complete"] = False
    write_json_atomic(tmp_path / "emb" / "info.json", info)
    with pytest.raises(ValueError, match="not a finished embedding folder"):
        build_for_folder(tmp_path / "emb")
