"""The standard retrieval protocol (#22): unique items per side, every caption a positive of its image, honest ties,
checked against an independent computation written here."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import one_peace
from one_peace.eval import EvalContext, RetrievalEvaluator, recall_at_k


def _independent(sim: np.ndarray, positives: list[set[int]], k: int) -> float:
    """Recall@k with ties broken at random, in expectation: a plain loop over queries."""
    scores = []
    for q, pos in enumerate(positives):
        if not pos:
            continue
        best = max(sim[q, j] for j in pos)
        above = sum(1 for j in range(sim.shape[1]) if j not in pos and sim[q, j] > best + 1e-6)
        tied_neg = sum(1 for j in range(sim.shape[1]) if j not in pos and abs(sim[q, j] - best) <= 1e-6)
        tied_pos = sum(1 for j in pos if abs(sim[q, j] - best) <= 1e-6)
        slots = k - above
        if slots <= 0:
            scores.append(0.0)
        else:  # missed when every free slot goes to a tied negative
            miss = math.comb(tied_neg, slots) / math.comb(tied_neg + tied_pos, slots) if slots <= tied_neg else 0.0
            scores.append(1.0 - miss)
    return float(np.mean(scores))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_with_repeats_groups_and_ties_equals_the_independent_loop(seed):
    rng = np.random.default_rng(seed)
    # integer-valued vectors from a tiny alphabet: many exact ties
    q = torch.tensor(rng.integers(-1, 2, (12, 3)), dtype=torch.float32)
    g = torch.tensor(rng.integers(-1, 2, (15, 3)), dtype=torch.float32)
    positives = [sorted(set(rng.choice(15, size=rng.integers(0, 4), replace=False).tolist())) for _ in range(12)]
    sim = (q @ g.T).numpy()
    for k in (1, 2, 5):
        got = recall_at_k(q, g, ks=(k,), positives=positives, chunk=5)[f"R@{k}"]
        assert got == pytest.approx(_independent(sim, [set(p) for p in positives], k), abs=1e-9)


def test_ties_no_longer_count_as_hits_and_a_constant_model_scores_chance():
    """A collapsed tower (every caption the same vector) scored image->text R@1 = 1.00 at chance 0.002."""
    q = torch.randn(20, 8)
    g = torch.ones(50, 8)
    groups_q = [f"g{i % 10}" for i in range(20)]
    groups_g = [f"g{i % 10}" for i in range(50)]
    res = recall_at_k(q, g, groups_q, groups_g, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert res[f"R@{k}"] == pytest.approx(res[f"chance@{k}"], abs=1e-9)
    assert res["R@1"] == pytest.approx(0.1)


def _coco_rows(images: int = 6, captions: int = 5) -> list[dict]:
    return [
        {"id": f"{i}-{c}", "image": f"img{i}.png", "text": f"image {i} caption {c}"}
        for i in range(images)
        for c in range(captions)
    ]


def _fake_embed(vectors):
    """An ``embed_rows`` returning designed vectors per item (the protocol's logic, no model)."""

    def embed_rows(ctx, modality, values=None):
        emb = torch.stack([vectors(modality, row) for row in ctx.rows])
        return emb, torch.ones(len(ctx.rows), dtype=torch.bool), []

    return embed_rows


def test_coco_layout_with_an_oracle_model_scores_one_both_ways(monkeypatch):
    """Counting an image's other captions as negatives gave image->text R@1 0.20 where the protocol gives 1.00."""
    import one_peace.eval.retrieval as retrieval

    def oracle(modality, row):
        image = int(row["image"][3:-4])
        return torch.nn.functional.one_hot(torch.tensor(image), 6).float()

    monkeypatch.setattr(retrieval, "embed_rows", _fake_embed(oracle))
    res = RetrievalEvaluator(("image", "text"), ks=(1, 5))(EvalContext(None, _coco_rows()))
    assert res["image->text/R@1"] == 1.0 and res["text->image/R@1"] == 1.0 and res["text->image/R@5"] == 1.0
    assert (res["image_items"], res["text_items"], res["samples"]) == (6, 30, 30)
    assert res["image->text/chance@1"] == pytest.approx(5 / 30)  # 5 positives among 30 captions
    assert res["text->image/chance@1"] == pytest.approx(1 / 6)  # ranked against unique images


def test_a_constant_model_scores_chance_on_the_coco_layout(monkeypatch):
    import one_peace.eval.retrieval as retrieval

    monkeypatch.setattr(retrieval, "embed_rows", _fake_embed(lambda m, row: torch.ones(4)))
    res = RetrievalEvaluator(("image", "text"), ks=(1, 5, 10))(EvalContext(None, _coco_rows()))
    for direction in ("image->text", "text->image"):
        for k in (1, 5, 10):
            assert res[f"{direction}/R@{k}"] == pytest.approx(res[f"{direction}/chance@{k}"], abs=1e-9)


def test_group_field_makes_a_class_positive_across_rows(monkeypatch):
    import one_peace.eval.retrieval as retrieval

    rows = [{"image": f"i{n}.png", "text": f"t{n}", "label": n % 2} for n in range(6)]
    # every image looks like the *other* image of its class's first caption: only the class groups make hits
    monkeypatch.setattr(
        retrieval,
        "embed_rows",
        _fake_embed(lambda m, row: torch.tensor([1.0, 0.0]) if row["label"] else torch.tensor([0.0, 1.0])),
    )
    plain = RetrievalEvaluator(("image", "text"), ks=(1,))(EvalContext(None, rows))
    grouped = RetrievalEvaluator(("image", "text"), group_field="label", ks=(1,))(EvalContext(None, rows))
    assert plain["image->text/R@1"] == pytest.approx(1 / 3)  # three tied captions of the class, one positive
    assert grouped["image->text/R@1"] == 1.0


@pytest.mark.parametrize(
    ("kwargs", "rows", "message"),
    [
        ({"ks": [5, 10]}, None, None),  # ks without 1 used to crash after all the work
        ({"ks": [0, 5]}, None, "ks: expected a list of positive integers"),
        ({}, [], "no rows to evaluate"),
        ({"pair": ("image", "video")}, None, "pair: the model has no 'video' modality"),
        ({}, [{"image": "a.png", "caption": "x"}], "fields.text: no row has a field 'text'"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(monkeypatch, kwargs, rows, message):
    import one_peace.eval.retrieval as retrieval

    monkeypatch.setattr(retrieval, "embed_rows", _fake_embed(lambda m, row: torch.ones(3)))
    ctx = EvalContext(
        SimpleNamespace(adapters={"image": None, "text": None}), _coco_rows(2, 2) if rows is None else rows
    )
    if message is None:
        res = RetrievalEvaluator(**kwargs)(ctx)
        assert "image->text/R@5" in res and "retrieval: image->text R@5" in RetrievalEvaluator(**kwargs).summary(res)
        return
    with pytest.raises(ValueError, match=message):
        RetrievalEvaluator(**kwargs)(ctx)


def test_eval_cli_on_a_coco_layout_equals_the_independent_computation(tmp_path):
    """``python -m one_peace.eval task=retrieval`` on 5 captions per image, a real tiny model."""
    from one_peace.adapters.text import TextTokenizer
    from PIL import Image

    from one_peace.eval.__main__ import main

    rows = _coco_rows(8, 5)
    for i in range(8):
        arr = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"img{i}.png")
    manifest = tmp_path / "coco.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = TextTokenizer.train([r["text"] for r in rows] * 2, vocab_size=300)
    torch.manual_seed(0)
    cfg = one_peace.model_config("tiny", ("text", "image"), layer_scale_init=1.0)
    cfg.modality_options = {"text": {"vocab_size": tok.vocab_size}, "image": {"image_size": 32}}
    model = one_peace.build_model(cfg).eval()
    model.tokenizer = tok
    checkpoint = one_peace.save(model, tmp_path / "ck")
    out = tmp_path / "r.json"
    buf = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(buf):
        assert main(["task=retrieval", f"checkpoint={checkpoint}", f"data={manifest}", f"out={out}"]) == 0
    res = json.loads(out.read_text())

    images = model.encode("image", [tmp_path / f"img{i}.png" for i in range(8)]).numpy()
    texts = model.encode("text", [r["text"] for r in rows]).numpy()
    owner = [i for i in range(8) for _ in range(5)]
    forward = [{t for t in range(40) if owner[t] == i} for i in range(8)]
    backward = [{owner[t]} for t in range(40)]
    for k in (1, 5, 10):
        assert res[f"image->text/R@{k}"] == pytest.approx(_independent(images @ texts.T, forward, k), abs=1e-6)
        assert res[f"text->image/R@{k}"] == pytest.approx(_independent(texts @ images.T, backward, k), abs=1e-6)
    assert res["text->image/R@10"] == 1.0  # 8 unique images: every caption finds its own in the top 10
    assert Path(out).is_file()


# ------------------------------------------------------------------------------------- cross-modal indexes
def _gap_data(n: int, q: int, d: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered corpus vectors and queries from another modality: the same concepts shifted by a common gap (a
    CLIP-like modality gap), then normalised. Returns the corpus, a tuning pool and held-out queries."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1024, d))
    concept = centres[rng.integers(0, 1024, n)] + 0.3 * rng.normal(size=(n, d))
    gap = 1.5 * rng.normal(size=d)

    def norm(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    corpus = norm(concept + gap)
    picks = rng.integers(0, n, 2 * q)
    queries = norm(concept[picks] + 0.1 * rng.normal(size=(2 * q, d)) - gap)
    return corpus, queries[:q], queries[q:]


def test_an_index_tuned_on_query_vectors_reports_the_recall_held_out_queries_get():
    """Tuned on corpus vectors, the reported 10-recall@10 (0.96 here) said nothing about queries of another modality
    (0.39 measured here); tuned on query vectors, the report is what held-out queries get."""
    pytest.importorskip("faiss")
    from one_peace.retrieval.faiss_index import build_index, exact_top_k
    from one_peace.retrieval.faiss_index import recall_at_k as overlap

    corpus, pool, held = _gap_data(20_000, 1000)
    truth = exact_top_k(corpus, held, 10)

    index, report = build_index(corpus, kind="ivf", memory="64MB", query_vectors=pool, queries=500)
    measured = overlap(index.search(held, 10)[1], truth)
    assert report.tuned_on == "queries" and report.recall_queries == 500
    assert abs(report.recall_at_10 - measured) <= 0.02, (report.recall_at_10, measured)

    blind, blind_report = build_index(corpus, kind="ivf", memory="64MB", queries=500)
    blind_measured = overlap(blind.search(held, 10)[1], truth)
    assert blind_report.tuned_on == "corpus"
    assert blind_report.recall_at_10 - blind_measured > 0.3, "the corpus-tuned report overstates cross-modal recall"


def test_training_in_stages_matches_faiss_own_training_and_the_size_is_counted_without_a_copy():
    """The staged training (rotation on its own sample, IVF sample gathered into the rotated space) builds an index
    as good as ``IndexPreTransform.train`` on the same sample, and the size reported is the written size."""
    faiss = pytest.importorskip("faiss")
    from one_peace.retrieval.faiss_index import (
        _quick_pq_training,
        add_in_chunks,
        exact_top_k,
        serialized_bytes,
        train_in_stages,
    )
    from one_peace.retrieval.faiss_index import recall_at_k as overlap

    corpus, queries, _ = _gap_data(20_000, 500)
    corpus, queries = corpus.astype(np.float32), corpus[:500].astype(np.float32)
    truth = exact_top_k(corpus, queries, 10)
    recalls = {}
    for way in ("staged", "faiss"):
        index = faiss.index_factory(corpus.shape[1], "OPQ8,IVF64,PQ8", faiss.METRIC_INNER_PRODUCT)
        _quick_pq_training(index)
        faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0)).niter = 8  # a faster rotation, both
        if way == "staged":
            train_in_stages(index, corpus, 12_000, np.random.default_rng(0))
        else:
            index.train(corpus[np.random.default_rng(0).choice(len(corpus), 12_000, replace=False)])
        assert index.is_trained
        add_in_chunks(index, corpus, chunk=3000)
        assert index.ntotal == len(corpus)
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", 8)
        recalls[way] = overlap(index.search(queries, 10)[1], truth)
        assert serialized_bytes(index) == faiss.serialize_index(index).nbytes
    assert recalls["staged"] >= recalls["faiss"] - 0.03, recalls


def test_search_time_nprobe_changes_the_result_and_bad_values_are_refused(tmp_path):
    pytest.importorskip("faiss")
    from one_peace.retrieval import RetrievalIndex
    from one_peace.retrieval.faiss_index import build_index, save_index
    from one_peace.retrieval.store import EmbeddingStore

    corpus, pool, held = _gap_data(8000, 200, seed=1)
    index, report = build_index(corpus, kind="ivf", memory="64MB", query_vectors=pool, queries=100)
    store = EmbeddingStore(tmp_path / "f")
    store.write_part(0, corpus, [{"id": f"i{n}"} for n in range(len(corpus))], {"count": len(corpus), "bad": []})
    save_index(index, str(store.index_path))
    store.save_info({"format": 2, "modality": "image", "dim": 32, "index": report.to_json(), "model": {}})
    found = RetrievalIndex(tmp_path / "f")
    narrow = [[h.id for h in hits] for hits in found.search_vectors(held[:50], top_k=10, nprobe=1)]
    wide = [[h.id for h in hits] for hits in found.search_vectors(held[:50], top_k=10, nprobe=64)]
    assert narrow != wide
    tuned = [[h.id for h in hits] for hits in found.search_vectors(held[:50], top_k=10)]
    again = [[h.id for h in hits] for hits in found.search_vectors(held[:50], top_k=10)]
    assert tuned == again  # the override did not stick
    with pytest.raises(ValueError, match=r"ef_search: the index .* has no such parameter"):
        found.search_vectors(held[:1], ef_search=32)
    with pytest.raises(ValueError, match="top_k: expected an integer >= 1"):
        found.search_vectors(held[:1], top_k=0)


# ------------------------------------------------------------------------------------------- folder format
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from one_peace.adapters.text import TextTokenizer

    tok = TextTokenizer.train(["a red square", "a blue circle"] * 4, vocab_size=280)
    torch.manual_seed(0)
    cfg = one_peace.model_config("tiny", ("text", "image"), layer_scale_init=1.0)
    cfg.modality_options = {"text": {"vocab_size": tok.vocab_size}, "image": {"image_size": 32}}
    model = one_peace.build_model(cfg).eval()
    model.tokenizer = tok
    return one_peace.save(model, tmp_path_factory.mktemp("ck") / "model")


def _images(root: Path, rows: list[dict]) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for n, row in enumerate(rows):
        arr = np.random.default_rng(n).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{n}.png")
        row.setdefault("image", f"{n}.png")
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def _embed(checkpoint: Path, data: Path, out: Path, **kw):
    from one_peace import embed as embed_mod

    cfg = embed_mod.EmbedConfig(
        checkpoint=str(checkpoint), data=str(data), modality="image", out=str(out), progress=False, workers=0, **kw
    )
    return embed_mod.embed(cfg)


def test_row_fields_never_overwrite_what_embed_computed(tiny_checkpoint, tmp_path):
    """A row field named ``id``, ``row``, ``source`` or ``source_kind`` used to replace embed's own: wrong ids with
    ``id_field=``, and a ``source`` the page would serve."""
    from one_peace.retrieval import open_index

    rows = [
        {
            "key": f"k{n}",
            "id": "x",
            "row": 99,
            "source": "/etc/passwd",
            "source_kind": "file",
            "source_member": "0:9:png",
        }
        for n in range(4)
    ]
    manifest = _images(tmp_path / "d", rows)
    info = _embed(tiny_checkpoint, manifest, tmp_path / "e", id_field="key")
    assert info["format"] == 2 and info["reserved"] == ["id", "row", "source", "source_kind", "source_member"]
    index = open_index(tmp_path / "e")
    meta = index.store.metadata(2)
    assert meta["id"] == "k2" and meta["row"] == 2 and meta["source"] == str((tmp_path / "d" / "2.png").resolve())
    assert meta["field.source"] == "/etc/passwd" and meta["field.id"] == "x" and meta["source_kind"] == "file"
    assert meta["field.source_member"] == "0:9:png" and meta.get("source_member") is None
    assert info["plugin"]["options"]["image_size"] == 32 and set(info["plugins"]) == {"text", "image"}


def test_the_model_identity_ignores_the_runtime_dtype_and_search_refuses_another_model(tiny_checkpoint, tmp_path):
    from one_peace.retrieval import open_index
    from one_peace.retrieval.format import model_hash

    model = one_peace.load(tiny_checkpoint)
    assert model_hash(model) == model_hash(one_peace.load(tiny_checkpoint, dtype=torch.bfloat16))
    manifest = _images(tmp_path / "d", [{"id": f"i{n}"} for n in range(3)])
    _embed(tiny_checkpoint, manifest, tmp_path / "e")
    torch.manual_seed(1)
    other = one_peace.build_model(model.config).eval()  # same width, other weights
    other.tokenizer = model.tokenizer
    other_ck = one_peace.save(other, tmp_path / "other")
    with pytest.raises(ValueError, match=r"embedded with model [0-9a-f]+ .*the query model .*other is [0-9a-f]+"):
        open_index(tmp_path / "e", checkpoint=str(other_ck)).search(text="a red square")
    assert open_index(tmp_path / "e").search(text="a red square", top_k=2)  # the recorded model is accepted


def test_metadata_types_that_change_between_parts_read_back_as_text(tiny_checkpoint, tmp_path):
    """int values in one part, strings in the next: ``open_index`` failed with ArrowTypeError after the embed."""
    from one_peace.retrieval import open_index

    rows = [{"id": f"i{n}", "n": n} for n in range(4)] + [{"id": f"i{n}", "n": f"{n}a"} for n in range(4, 8)]
    manifest = _images(tmp_path / "d", rows)
    info = _embed(tiny_checkpoint, manifest, tmp_path / "e", part_size=4)
    assert info["schema"]["n"] == "string" and info["schema"]["id"] == "string"
    index = open_index(tmp_path / "e")
    assert [index.store.metadata(i)["n"] for i in (0, 5)] == ["0", "5a"]


def test_duplicate_ids_are_refused_before_the_index_and_kept_on_request(tiny_checkpoint, tmp_path):
    rows = [{"id": "same"}, {"id": "other"}, {"id": "same"}, {}]  # the last has no id: '#3'
    manifest = _images(tmp_path / "d", rows)
    with pytest.raises(ValueError, match=r"1 ids name several items .*'same' at rows \[0, 2\].*duplicate_ids=keep"):
        _embed(tiny_checkpoint, manifest, tmp_path / "e")
    from one_peace.retrieval import open_index

    with pytest.raises(FileNotFoundError, match=r"stopped on 1 duplicate id .*duplicate_ids=keep mode=resume"):
        open_index(tmp_path / "e")  # the folder says why it has no index (mode=resume alone would stop again)
    info = _embed(tiny_checkpoint, manifest, tmp_path / "e", mode="resume", duplicate_ids="keep")
    assert info["duplicates"] == 1 and info["index"]["factory"] == "Flat"
    assert open_index(tmp_path / "e").store.ids() == ["same", "other", "same", "#3"]


def test_an_interrupted_embed_says_resume_and_resume_repairs_a_truncated_part(tiny_checkpoint, tmp_path, monkeypatch):
    from one_peace import embed as embed_mod
    from one_peace.retrieval import open_index

    manifest = _images(tmp_path / "d", [{"id": f"i{n}"} for n in range(6)])

    def stop(part):
        if part == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(embed_mod, "PART_DONE_HOOK", stop)
    with pytest.raises(KeyboardInterrupt):
        _embed(tiny_checkpoint, manifest, tmp_path / "e", part_size=2)
    with pytest.raises(FileNotFoundError, match=r"did not finish .* mode=resume"):
        open_index(tmp_path / "e")
    monkeypatch.setattr(embed_mod, "PART_DONE_HOOK", None)
    first = _embed(tiny_checkpoint, manifest, tmp_path / "e", part_size=2, mode="resume")
    npy = tmp_path / "e" / "embeddings" / "part-00001.npy"
    npy.write_bytes(npy.read_bytes()[:-40])  # a finished part, truncated since
    again = _embed(tiny_checkpoint, manifest, tmp_path / "e", part_size=2, mode="resume")
    assert again["count"] == first["count"] == 6
    assert open_index(tmp_path / "e").store.vectors().shape == (6, 64)


# ------------------------------------------------------------------------------------------------- shards
def _png_bytes(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_damaged_member_costs_its_sample_only(tmp_path):
    """One bad header used to drop the rest of its shard, reported as one bad item ("missing field")."""
    from one_peace.data.shards import iter_rows

    members = []
    for n in range(5):
        header = (
            b"{broken" if n == 1 else json.dumps({"id": f"s{n}", "caption": "x", "__members__": ["image"]}).encode()
        )
        members += [(f"s{n}.json", header), (f"s{n}.image.png", _png_bytes(n))]
    folder = tmp_path / "shards"
    folder.mkdir()
    _tar(folder / "a-000000.tar", members)
    rows = [row for _, row in iter_rows(folder)]
    assert len(rows) == 5
    assert [r.get("id") for r in rows] == ["s0", "s1", "s2", "s3", "s4"]
    assert "invalid JSON" in rows[1]["__error__"] and all("__error__" not in r for i, r in enumerate(rows) if i != 1)
    assert rows[4]["image"][:4] == b"\x89PNG"


def test_standard_webdataset_shards_read_as_they_are_and_embed(tiny_checkpoint, tmp_path):
    """img2dataset's layout (key.jpg + key.txt + key.json) read as one bad row per sample."""
    from one_peace.data.shards import iter_rows
    from one_peace.retrieval import open_index

    members = []
    for n in range(4):
        image = b"not an image" if n == 2 else _png_bytes(n)
        members += [
            (f"{n:05d}.jpg", image),
            (f"{n:05d}.txt", f"caption {n}".encode()),
            (f"{n:05d}.json", json.dumps({"width": 32, "url": f"http://x/{n}"}).encode()),
        ]
    folder = tmp_path / "wds"
    folder.mkdir()
    _tar(folder / "00000.tar", members)
    rows = [row for _, row in iter_rows(folder)]
    assert [r["text"] for r in rows] == [f"caption {n}" for n in range(4)] and rows[0]["width"] == 32
    assert rows[0]["image"] == rows[0]["jpg"]
    renamed = [row for _, row in iter_rows(folder, {"txt": "caption"})]  # a user's extension map, over the defaults
    assert renamed[1]["caption"] == "caption 1" and renamed[1]["image"] == rows[1]["jpg"]

    info = _embed(tiny_checkpoint, folder, tmp_path / "e")
    assert info["count"] == 3
    (bad,) = open_index(tmp_path / "e").store.bad()
    assert bad["id"] == "00002" and bad["reason"] == "undecodable image"
    ids = open_index(tmp_path / "e").store.ids()
    assert ids == ["00000", "00001", "00003"]
    source = open_index(tmp_path / "e").store.metadata(0)["source"]
    assert source == f"{(folder / '00000.tar').resolve()}#00000"  # absolute: a page started elsewhere finds it


def test_resume_refuses_a_manifest_edited_at_the_same_size(tiny_checkpoint, tmp_path, monkeypatch):
    """Two rows swapped between a kill and ``mode=resume``: the size and both ends are the same, and the resume went
    on silently (one id twice, another missing)."""
    from one_peace import embed as embed_mod

    # rows of 400+ bytes: the swapped rows lie outside the first and the last KiB the old identity hashed
    manifest = _images(tmp_path / "d", [{"id": f"i{n}", "pad": "x" * 400} for n in range(10)])
    lines = manifest.read_text().splitlines()

    def stop(part):
        raise KeyboardInterrupt

    monkeypatch.setattr(embed_mod, "PART_DONE_HOOK", stop)
    with pytest.raises(KeyboardInterrupt):
        _embed(tiny_checkpoint, manifest, tmp_path / "e", part_size=2)
    monkeypatch.setattr(embed_mod, "PART_DONE_HOOK", None)
    lines[4], lines[5] = lines[5], lines[4]
    manifest.write_text("\n".join(lines) + "\n")
    assert manifest.read_text().index(lines[4]) > 1024 and manifest.stat().st_size - 1024 > 6 * len(lines[0])
    with pytest.raises(ValueError, match="changed since it was embedded"):
        _embed(tiny_checkpoint, manifest, tmp_path / "e", part_size=2, mode="resume")


def test_the_training_loader_reads_standard_shards_with_a_users_extension_map(tmp_path):
    from one_peace.adapters.text import TextTokenizer

    from one_peace.data import LoaderConfig, MultimodalLoader

    members = []
    for n in range(4):
        members += [(f"{n:05d}.png", _png_bytes(n)), (f"{n:05d}.cap", f"a caption {n}".encode())]
    folder = tmp_path / "wds"
    folder.mkdir()
    _tar(folder / "00000.tar", members)
    tok = TextTokenizer.train(["a caption 0 1 2 3"] * 4, vocab_size=280)
    cfg = one_peace.model_config("tiny", ("text", "image"), modality_options={"image": {"image_size": 32}})

    def load(extensions):
        loader = MultimodalLoader(
            folder,
            fields={"image": "image", "text": "text"},
            model_config=cfg,
            tokenizer=tok,
            config=LoaderConfig(batch_size=4, shuffle_window=0, extensions=extensions, max_bad_fraction=1.0),
        )
        return list(loader), loader

    batches, loader = load({"cap": "text"})
    assert int(batches[0]["valid"].sum()) == 4 and not loader.total_bad
    with pytest.raises(ValueError, match=r"every sample read was bad \(\{'missing field': 4\}\)"):
        load({})  # `.cap` is no default: every sample lacks its text
