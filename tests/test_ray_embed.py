"""#27 (part): embedding on Ray Data writes the folder ``one_peace.embed`` writes (vectors, ids, metadata), and a
resume embeds only the unfinished parts (a local Ray on 2 CPUs, 2 actors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import one_peace
from one_peace import embed as embed_mod
from one_peace.retrieval.ray_embed import embed_on_ray
from one_peace.retrieval.store import EmbeddingStore

WORDS = ["red", "blue", "green", "circle", "square", "on", "grass", "a", "two", "small"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from one_peace.adapters.text import TextTokenizer

    root = tmp_path_factory.mktemp("ray")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 12)))) for _ in range(30)]
    torch.manual_seed(0)
    model = one_peace.build_model("tiny", modalities=("text",), layer_scale_init=0.5)
    model.tokenizer = TextTokenizer.train(texts, vocab_size=280)
    checkpoint = one_peace.save(model, root / "ck")
    rows = [{"id": f"t{i}", "text": t, "lang": "en"} for i, t in enumerate(texts)]
    rows[7]["text"] = ["not", "a", "string"]  # a bad row: skipped and counted by both routes
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return checkpoint, manifest


def _cfg(corpus, out, **kw):
    checkpoint, manifest = corpus
    base = dict(checkpoint=str(checkpoint), data=str(manifest), modality="text", out=str(out), part_size=8)
    return embed_mod.EmbedConfig(**{**base, "progress": False, "workers": 0, "index": "flat", **kw})


@pytest.fixture
def local_ray():
    """One local Ray for both runs (embed_on_ray leaves a Ray it did not start running)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_the_ray_route_writes_the_embed_folder_and_resumes_by_part(corpus, tmp_path, local_ray):
    import pyarrow.parquet as pq

    ref = embed_mod.embed(_cfg(corpus, tmp_path / "ref"))
    got = embed_on_ray(_cfg(corpus, tmp_path / "ray"), actors=2)
    assert got["count"] == ref["count"] == 29 and got["bad"] == ref["bad"] == 1
    a, b = EmbeddingStore(tmp_path / "ref"), EmbeddingStore(tmp_path / "ray")
    assert a.part_numbers() == b.part_numbers() == [0, 1, 2, 3]
    np.testing.assert_allclose(b.vectors(), a.vectors(), atol=1e-6, rtol=0)
    assert a.ids() == b.ids() and a.metadata_table().equals(b.metadata_table())
    assert a.bad() == b.bad()

    # a part lost (an actor killed while writing it): the resume embeds that part only
    marker = tmp_path / "ray" / "parts" / "part-00002.json"
    kept = {p: (tmp_path / "ray" / "embeddings" / f"part-0000{p}.npy").stat().st_mtime_ns for p in (0, 1, 3)}
    marker.unlink()
    (tmp_path / "ray" / "index.faiss").unlink()
    again = embed_on_ray(_cfg(corpus, tmp_path / "ray", mode="resume"), actors=2)
    assert again["count"] == 29 and marker.is_file()
    assert all((tmp_path / "ray" / "embeddings" / f"part-0000{p}.npy").stat().st_mtime_ns == t for p, t in kept.items())
    np.testing.assert_allclose(EmbeddingStore(tmp_path / "ray").vectors(), a.vectors(), atol=1e-6, rtol=0)
    assert pq.read_table(tmp_path / "ray" / "metadata" / "part-00002.parquet").num_rows == 8
