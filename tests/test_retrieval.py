"""Retrieval (#11): batched encode, composed queries, the embed / search / eval tools, FAISS index choice, metrics."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from one_peace.adapters.text import TextTokenizer

import one_peace
from one_peace import embed as embed_mod
from one_peace.config import model_config

pytestmark = pytest.mark.core

WORDS = [
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "square",
    "triangle",
    "on",
    "a",
    "white",
    "black",
    "background",
    "dog",
    "barking",
    "cat",
]


@pytest.fixture(scope="module")
def model() -> one_peace.OnePeaceModel:
    """A tiny text+image+audio model with a real tokenizer; layer scale 1 so that fused tokens interact."""
    torch.manual_seed(0)
    tok = TextTokenizer.train([" ".join(WORDS)] * 4, vocab_size=300, max_tokens=20)
    cfg = model_config("tiny", ("text", "image", "audio"), layer_scale_init=1.0)
    cfg.modality_options = {"text": {"vocab_size": tok.vocab_size}, "image": {"image_size": 32}}
    m = one_peace.build_model(cfg).eval()
    m.tokenizer = tok
    return m


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    return one_peace.save(model, tmp_path_factory.mktemp("ck") / "model")


def _png(seed: int, size: int = 32) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _corpus(root: Path, n: int, corrupt: tuple[int, ...] = (), start: int = 0, name: str = "m.jsonl") -> Path:
    """``n`` distinct random PNGs with captions; rows in ``corrupt`` point at garbage or a missing file."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        path = root / "img" / f"{i}.png"
        if i in corrupt:
            if i % 2:
                path.write_bytes(b"not a png")
            else:
                path = root / "img" / "missing.png"
        else:
            path.write_bytes(_png(i))
        rows.append({"id": f"item{i}", "image": f"img/{path.name}", "caption": f"{WORDS[i % 4]} {WORDS[4 + i % 3]}"})
    manifest = root / name
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def _embed(checkpoint: Path, data: Path, out: Path, **kw) -> dict:
    cfg = embed_mod.EmbedConfig(
        checkpoint=str(checkpoint),
        data=str(data),
        modality=kw.pop("modality", "image"),
        out=str(out),
        batch_size=kw.pop("batch_size", 4),
        workers=2,
        progress=False,
        precision=kw.pop("precision", "fp32"),  # compared with fp32 encode() (auto is bf16 on AMX CPUs)
        **kw,
    )
    return embed_mod.embed(cfg)


# ------------------------------------------------------------------------------------------------- encode
def test_encode_accepts_every_input_form_and_keeps_input_order(model, tmp_path):
    from PIL import Image

    data = _png(1)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    pil = Image.open(io.BytesIO(data))
    arr = np.array(pil)
    forms = [str(path), path, data, pil, arr, torch.from_numpy(arr).permute(2, 0, 1).float() / 255]
    embs = [model.encode("image", f) for f in forms]
    for e in embs[1:]:
        torch.testing.assert_close(e, embs[0], atol=2e-3, rtol=0)  # the float tensor round-trips through uint8
    assert embs[0].shape == (1, 64) and torch.allclose(embs[0].norm(dim=-1), torch.ones(1))
    texts = ["dog", "a red circle on a white background", "cat", "blue square", "a green triangle on a black"]
    together = model.encode("text", texts, batch_size=2)  # sorted by length into batches, returned in input order
    for i, t in enumerate(texts):
        torch.testing.assert_close(together[i : i + 1], model.encode("text", [t]), atol=1e-5, rtol=1e-5)
    assert isinstance(model.encode("text", texts, output="numpy"), np.ndarray)
    raw = model.encode("text", texts, normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(texts)))
    wave = np.sin(np.linspace(0, 600, 16000)).astype(np.float32)
    torch.testing.assert_close(
        model.encode("audio", [(wave, 16000)]), model.encode("audio", [torch.from_numpy(wave)]), atol=1e-6, rtol=0
    )
    model.train()  # encode runs in eval mode and restores the caller's mode
    model.encode("text", ["dog"])
    assert model.training
    model.eval()


def test_long_text_is_truncated_with_one_warning_or_embedded_as_chunk_mean(model):
    long = " ".join(WORDS * 3)  # ~45 tokens, the tokenizer keeps 20
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cut = model.encode("text", [long, long, "dog"])
    assert len([w for w in caught if "truncated" in str(w.message)]) == 1
    assert "2 of 3" in str(caught[0].message)
    chunks = model.tokenizer.chunks(long)
    assert len(chunks) > 1
    direct = torch.nn.functional.normalize(
        torch.stack([model.encode("text", {"tokens": torch.tensor([c])})[0] for c in chunks]).mean(0), dim=-1
    )
    whole = model.encode("text", [long, "dog"], long_text="chunks")
    torch.testing.assert_close(whole[0], direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole[1], cut[2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(whole[0], cut[0], atol=1e-3)


def test_joint_query_differs_from_mean_and_equals_a_direct_fused_forward(model):
    img, text = [_png(3)], ["a red circle"]
    joint = model.encode_multimodal({"image": img, "text": text}, fuse="joint")
    mean = model.encode_multimodal({"image": img, "text": text}, fuse="mean")
    assert not torch.allclose(joint, mean, atol=1e-3)
    single = torch.nn.functional.normalize(model.encode("image", img) + model.encode("text", text), dim=-1)
    torch.testing.assert_close(mean, single, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        out = model.forward_features({"image": model.prepare("image", img), "text": model.prepare("text", text)})
        heads = [model.embed("image", out.hidden["image"]), model.embed("text", out.hidden["text"])]
    direct = torch.nn.functional.normalize(0.25 * heads[0] + 0.75 * heads[1], dim=-1)
    weighted = model.encode_multimodal({"image": img, "text": text}, weights={"image": 1.0, "text": 3.0})
    torch.testing.assert_close(weighted, direct, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same number of items"):
        model.encode_multimodal({"image": img, "text": text * 2})


# ------------------------------------------------------------------------------------------------ metrics
def test_recall_with_several_positives_and_chance_equal_hand_computed_values():
    from one_peace.eval import chance_recall, recall_at_k

    q = torch.eye(3)
    g = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 1.0], [0.1, 0.9, 0.0], [0.0, 0.0, 0.5]])
    # query 0's positives: gallery 0 and 3 (best 0.9, rank 0); query 1's: gallery 1 (0.2; 0.9 beats it: rank 1);
    # query 2's: gallery 2 (0.0; 1.0 and 0.5 beat it, and gallery 0 ties with it at 0.0: at k=3 the last slot goes
    # to either of the two tied items, a hit half the time)
    res = recall_at_k(q, g, ["a", "b", "c"], ["a", "b", "c", "a"], ks=(1, 2, 3), chunk=2)
    assert res["R@1"] == pytest.approx(1 / 3) and res["R@2"] == pytest.approx(2 / 3)
    assert res["R@3"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert res["chance@1"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4) / 3)
    assert chance_recall(torch.tensor([1]), 4, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert res["queries"] == 3 and res["gallery"] == 4


def test_zero_shot_accuracy_equals_a_hand_computed_example(model, tmp_path):
    from one_peace.eval import EvalContext, ZeroShotEvaluator, class_embeddings

    rows = [{"id": i, "image": _png(i), "label": ["dog", "cat"][i % 2]} for i in range(6)]
    ev = ZeroShotEvaluator("image", "label", classes=["dog", "cat"], templates=["a {}", "the {} barking"])
    res = ev(EvalContext(model, rows, tmp_path))
    classes = class_embeddings(model, {"dog": ["a dog", "the dog barking"], "cat": ["a cat", "the cat barking"]})
    pred = (model.encode("image", [r["image"] for r in rows]) @ classes.T).argmax(1)
    truth = torch.tensor([i % 2 for i in range(6)])
    assert res["top1"] == pytest.approx(float((pred == truth).float().mean()))
    assert res["top5"] == 1.0 and sum(map(sum, res["confusion"])) == 6
    for c, name in enumerate(["dog", "cat"]):
        mask = truth == c
        assert res["per_class"][name] == pytest.approx(float((pred[mask] == c).float().mean()))


# ----------------------------------------------------------------------------------------------- embed CLI
def test_embed_skips_corrupt_files_and_each_clean_item_finds_itself(checkpoint, tmp_path):
    manifest = _corpus(tmp_path / "data", 12, corrupt=(3, 8))
    out = tmp_path / "emb"
    info = _embed(checkpoint, manifest, out, part_size=5)
    bad = [json.loads(x) for x in (out / "bad.jsonl").read_text().splitlines()]
    assert sorted(b["id"] for b in bad) == ["item3", "item8"]
    assert {b["reason"] for b in bad} == {"undecodable image", "missing file"}
    assert info["count"] == 10 and info["index"]["factory"] == "Flat" and info["index"]["recall_at_10"] == 1.0
    from one_peace.retrieval import EmbeddingStore, open_index

    index = open_index(out)
    vecs = index.store.vectors()
    assert vecs.dtype == np.float32 and len(vecs) == 10
    assert np.load(out / "embeddings" / "part-00000.npy").dtype == np.float16
    hits = index.search_vectors(vecs, top_k=1)
    ids = index.store.ids()
    assert [h[0].id for h in hits] == ids == [f"item{i}" for i in range(12) if i not in (3, 8)]
    meta = index.store.metadata(ids.index("item5"))
    assert meta["source"] == str((tmp_path / "data" / "img" / "5.png").resolve())
    assert meta["caption"] == f"{WORDS[1]} {WORDS[4 + 2]}" and meta["row"] == 5
    direct = index.model.encode("image", [tmp_path / "data" / "img" / "5.png"], output="numpy")
    np.testing.assert_allclose(vecs[ids.index("item5")], direct[0], atol=2e-3)  # float16 storage
    with pytest.raises(ValueError, match="already holds an embedding folder"):
        _embed(checkpoint, manifest, out)
    with pytest.raises(ValueError, match=r"no item of .* could be embedded .*field 'photo'"):
        _embed(checkpoint, manifest, tmp_path / "none", field="photo")
    assert len(EmbeddingStore(tmp_path / "none").bad()) == 12


def test_killed_embed_resumes_without_redoing_parts_and_matches_one_run(checkpoint, model, tmp_path, monkeypatch):
    manifest = _corpus(tmp_path / "data", 14)
    ref = tmp_path / "ref"
    _embed(checkpoint, manifest, ref, part_size=4)
    done: list[int] = []

    def crash_after_two(part: int) -> None:
        done.append(part)
        if len(done) == 2:
            raise KeyboardInterrupt("injected fault after part 1")

    out = tmp_path / "out"
    monkeypatch.setattr(embed_mod, "PART_DONE_HOOK", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        _embed(checkpoint, manifest, out, part_size=4)
    first = {p: (out / "embeddings" / f"part-{p:05d}.npy").stat().st_mtime_ns for p in (0, 1)}
    done.clear()
    monkeypatch.setattr(embed_mod, "PART_DONE_HOOK", done.append)
    _embed(checkpoint, manifest, out, part_size=4, mode="resume")
    assert done == [2, 3]  # parts 0 and 1 were not embedded again
    assert first == {p: (out / "embeddings" / f"part-{p:05d}.npy").stat().st_mtime_ns for p in (0, 1)}
    from one_peace.retrieval import EmbeddingStore

    a, b = EmbeddingStore(ref), EmbeddingStore(out)
    assert a.ids() == b.ids() and np.array_equal(a.vectors(), b.vectors())
    other = tmp_path / "other"
    torch.manual_seed(1)
    changed = one_peace.load(checkpoint)
    with torch.no_grad():
        changed.heads["image"].weight.add_(0.01)
    one_peace.save(changed, other)
    with pytest.raises(ValueError, match="another model"):
        _embed(other, manifest, out, part_size=4, mode="resume")
    with pytest.raises(ValueError, match="another model"):
        _embed(other, _corpus(tmp_path / "more", 3, name="x.jsonl"), out, part_size=4, mode="append")


def test_append_equals_one_embed_over_the_union(checkpoint, tmp_path):
    first = _corpus(tmp_path / "d", 9, name="a.jsonl")
    second = _corpus(tmp_path / "d", 5, start=9, name="b.jsonl")
    union = tmp_path / "d" / "union.jsonl"
    union.write_text(first.read_text() + second.read_text())
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _embed(checkpoint, union, whole, part_size=4)
    _embed(checkpoint, first, parts, part_size=4)
    before = (parts / "embeddings" / "part-00000.npy").stat().st_mtime_ns
    info = _embed(checkpoint, second, parts, part_size=4, mode="append")
    assert (parts / "embeddings" / "part-00000.npy").stat().st_mtime_ns == before
    assert info["count"] == 14 and info["index"]["appended"] == 1
    from one_peace.retrieval import open_index

    a, b = open_index(whole), open_index(parts)
    assert a.store.ids() == b.store.ids()  # batches differ (parts split elsewhere): equal up to float16 rounding
    np.testing.assert_allclose(a.store.vectors(), b.store.vectors(), atol=2e-3, rtol=0)
    q = a.store.vectors()[:5]
    assert [[h.id for h in r] for r in a.search_vectors(q, 10)] == [[h.id for h in r] for r in b.search_vectors(q, 10)]
    with pytest.raises(ValueError, match="already a source"):
        _embed(checkpoint, second, parts, part_size=4, mode="append")


def test_search_and_eval_clis(checkpoint, tmp_path):
    manifest = _corpus(tmp_path / "data", 6)
    out = tmp_path / "emb"
    _embed(checkpoint, manifest, out)
    query = tmp_path / "data" / "img" / "4.png"
    run = [sys.executable, "-m", "one_peace.search", f"index={out}", f"query.image={query}", "top_k=3", "format=json"]
    got = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr
    hits = json.loads(got.stdout)
    assert len(hits) == 3 and hits[0]["id"] == "item4" and hits[0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert set(hits[0]) == {"id", "score", "metadata"} and hits[0]["metadata"]["id"] == "item4"
    bad = subprocess.run([*run[:3], f"index={out}", "top_k=abc"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "top_k" in bad.stderr and "Traceback" not in bad.stderr
    res = tmp_path / "r.json"
    cmd = [
        sys.executable,
        "-m",
        "one_peace.eval",
        "task=retrieval",
        f"checkpoint={checkpoint}",
        f"data={manifest}",
        "pair=[image,text]",
        "fields.text=caption",
        f"out={res}",
    ]
    got = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr
    printed = json.loads(got.stdout)
    assert printed == json.loads(res.read_text()) and printed["samples"] == 6
    assert {"image->text/R@1", "text->image/R@10", "text->image/chance@1"} <= set(printed)


# ---------------------------------------------------------------------------------------------- the index
def test_auto_index_on_a_200k_corpus_fits_32mb_and_reaches_the_target_recall():
    from one_peace.retrieval.faiss_index import build_index, parse_memory

    rng = np.random.default_rng(0)
    n, d, clusters, rank = 200_000, 256, 1000, 16  # clustered, each cluster on a low-dimensional patch
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    basis = rng.standard_normal((clusters, rank, d)).astype(np.float32) * (3 / np.sqrt(d))
    label = rng.integers(0, clusters, n)
    x = centers[label] + np.einsum("nr,nrd->nd", rng.standard_normal((n, rank)).astype(np.float32), basis[label])
    x += 0.05 * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index, report = build_index(x, "auto", "32MB")
    assert "PQ" in report.factory or "SQ" in report.factory  # a compressed index, not Flat or HNSW
    assert report.memory_bytes <= parse_memory("32MB")
    assert report.tuning_recall_at_10 is not None and report.tuning_recall_at_10 >= 0.95  # the target, when tuning
    assert report.recall_at_10 is not None and report.recall_at_10 >= 0.93  # held-out queries: what is reported
    assert report.recall_queries == 1000 and report.search_params.get("nprobe", 0) >= 1
    assert index.ntotal == n


# --------------------------------------------------------------------------------- after a real training run
def test_vl_contrastive_then_eval_embed_and_search_by_text(tmp_path):
    """After vl_contrastive on the demo data: text->image R@1 >= 5x chance; a text search finds its kind first."""
    from hydra import compose, initialize_config_module

    from one_peace.eval.__main__ import EvalConfig, evaluate
    from one_peace.retrieval import open_index
    from one_peace.run import run

    overrides = [
        "recipe=vl_contrastive",
        f"output_dir={tmp_path / 'run'}",
        "data.demo_train=192",
        "data.demo_valid=48",
        "data.image_size=32",
        "trainer.batch_size=16",
        "trainer.max_steps=150",
        "trainer.log_every=50",
        "data.vocab_size=300",
        "trainer.eval_every=75",
        "eval.max_samples=16",
    ]
    with initialize_config_module(config_module="one_peace.recipes", version_base=None):
        results = run(compose(config_name="config", overrides=overrides))
    during = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [d["step"] for d in during] == [75, 150] and all(d["samples"] == 16 for d in during)
    assert results["samples"] == 48  # the final evaluation uses every validation row
    valid = tmp_path / "run" / "demo_data" / "valid.jsonl"
    res = evaluate(
        EvalConfig(
            task="retrieval",
            checkpoint=results["checkpoint"],
            data=str(valid),
            pair=["text", "image"],
            fields={"text": "caption"},
            out=str(tmp_path / "eval.json"),
        )
    )
    assert res["text->image/R@1"] >= 5 * res["text->image/chance@1"], res
    out = tmp_path / "emb"
    _embed(Path(results["checkpoint"]), valid, out, batch_size=16)
    index = open_index(out)
    captions = sorted({index.store.metadata(i)["caption"] for i in range(len(index))})
    first = [index.search(text=c, top_k=1)[0].metadata["caption"] == c for c in captions]
    chance = np.mean([np.mean([index.store.metadata(i)["caption"] == c for i in range(len(index))]) for c in captions])
    assert np.mean(first) >= 5 * chance, (np.mean(first), chance)


def test_official_pt_and_its_converted_folder_embed_alike(official_tiny, parity, tmp_path):
    """The embed tool takes an official .pt (bpe_dir=) and the converted folder: one model hash, the same vectors."""
    from one_peace.convert import convert
    from one_peace.retrieval import EmbeddingStore

    converted = tmp_path / "converted"
    convert(official_tiny, converted, bpe_dir=parity / "bpe")
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(WORDS[:6])))
    a, b = tmp_path / "a", tmp_path / "b"
    ia = _embed(official_tiny, data, a, modality="text", bpe_dir=str(parity / "bpe"))
    ib = _embed(converted, data, b, modality="text")
    assert ia["model"]["hash"] == ib["model"]["hash"]
    np.testing.assert_array_equal(EmbeddingStore(a).vectors(), EmbeddingStore(b).vectors())
    # appending with the other form of the same model is allowed: it is the same model
    more = tmp_path / "more.jsonl"
    more.write_text(json.dumps({"id": "t9", "text": "a dog barking"}) + "\n")
    assert _embed(converted, more, a, modality="text", mode="append")["count"] == 7


@pytest.mark.skipif(not __import__("one_peace.extras").extras.available("av"), reason="needs the video extra")
def test_the_sound_track_of_a_video_file_is_accepted_as_audio(model, tmp_path):
    import av
    from one_peace.adapters.audio import load_audio

    from one_peace.errors import UndecodableMedia

    path = tmp_path / "clip.mp4"
    rate, tone = 44100, np.sin(2 * np.pi * 440 * np.arange(44100) / 44100).astype(np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=rate)
        stream.layout = "mono"
        for start in range(0, len(tone), 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    wave, sr = load_audio(path)
    assert sr == 16000 and abs(len(wave) - 16000) < 2048
    spectrum = np.abs(np.fft.rfft(wave[2000:14000]))
    assert abs(np.argmax(spectrum) * 16000 / 12000 - 440) < 5  # the tone survived decoding and resampling
    assert model.encode("audio", [path]).shape == (1, 64)
    silent = tmp_path / "silent.mp4"
    with av.open(str(silent), "w") as out:
        v = out.add_stream("mpeg4", rate=4)
        v.width = v.height = 16
        v.pix_fmt = "yuv420p"
        for packet in v.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")):
            out.mux(packet)
        for packet in v.encode(None):
            out.mux(packet)
    with pytest.raises(UndecodableMedia, match="no audio stream"):
        load_audio(silent)


def test_embed_reads_shards_and_names_each_member_as_the_source(checkpoint, tmp_path):
    from one_peace.data.shards import write_shards
    from one_peace.retrieval import EmbeddingStore

    manifest = _corpus(tmp_path / "data", 5, corrupt=(1,))
    shards = tmp_path / "shards"
    write_shards(manifest, shards, shard_size=2)
    out = tmp_path / "emb"
    _embed(checkpoint, shards, out)
    store = EmbeddingStore(out)
    assert store.ids() == ["item0", "item2", "item3", "item4"] and [b["id"] for b in store.bad()] == ["item1"]
    meta = store.metadata(1)
    assert meta["source"] == f"{shards / 'shard-000001.tar'}#item2" and meta["source_kind"] == "shard"
    plain = tmp_path / "plain"
    _embed(checkpoint, manifest, plain)
    np.testing.assert_array_equal(store.vectors(), EmbeddingStore(plain).vectors())


def test_zero_shot_cli_reads_a_class_file_and_draws_the_confusion_matrix(checkpoint, tmp_path):
    from one_peace.eval.__main__ import EvalConfig, evaluate

    (tmp_path / "img").mkdir()
    rows = []
    for i in range(4):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(i))
        rows.append({"id": i, "image": f"img/{i}.png", "label": ["dog", "cat"][i % 2]})
    data = tmp_path / "z.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    out = tmp_path / "zs.json"
    res = evaluate(
        EvalConfig(
            task="zero_shot",
            checkpoint=str(checkpoint),
            data=str(data),
            classes=str(tmp_path / "classes.txt"),
            templates=["a {}"],
            out=str(out),
        )
    )
    assert (
        res["classes"] == ["dog", "cat"] and res["samples"] == 4 and json.loads(out.read_text())["top1"] == res["top1"]
    )
    png = res["confusion_png"]
    assert (png is not None and Path(png).is_file()) == __import__("one_peace.extras").extras.available("matplotlib")
    (tmp_path / "classes.txt").write_text("dog\n")
    with pytest.raises(ValueError, match=r"labels \['cat'\]"):
        evaluate(
            EvalConfig(
                task="zero_shot",
                checkpoint=str(checkpoint),
                data=str(data),
                classes=str(tmp_path / "classes.txt"),
                out=str(out),
            )
        )


@pytest.mark.slow
def test_compiled_encode_equals_eager_for_images_and_texts_of_several_lengths(model):
    """``encode(compile=True)`` (one torch.compile per model) gives the eager embeddings, for a partial last batch
    and for texts of different lengths, and reuses its compiled forward."""
    from one_peace.models.encoding import compiled_forward

    images = [_png(i) for i in range(5)]
    texts = ["a red circle", "a dog barking on a white background", "cat", "a blue square on black", "green"]
    for modality, items in (("image", images), ("text", texts)):
        want = model.encode(modality, items, batch_size=2)
        got = model.encode(modality, items, batch_size=2, compile=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert compiled_forward(model) is compiled_forward(model)
