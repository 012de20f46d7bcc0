"""Data loading: manifests, data URIs, in-memory bytes, shards, bad samples, ranks, exact resume, bucketing."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from one_peace.adapters.text import TextTokenizer
from PIL import Image

import one_peace
from one_peace.data import LoaderConfig, ManifestError, MultimodalLoader, TooManyBadSamples
from one_peace.data.demo import make_demo_dataset
from one_peace.data.shards import write_shards

CFG = one_peace.model_config("tiny", ("text", "image", "audio"), modality_options={"image": {"image_size": 32}})


def _png(path: Path | None = None, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 12), color).save(buf, format="PNG")
    if path is not None:
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _wav(path: Path | None, seconds: float, sr: int = 16000, channels: int = 1, value: float | None = None) -> bytes:
    n = int(seconds * sr)
    data = np.sin(np.arange(n) / 7.0).astype(np.float32) * 0.3
    if value is not None:
        data[:] = value
    if channels > 1:
        data = np.stack([data] * channels, axis=1)
    buf = io.BytesIO()
    sf.write(buf, data, sr, format="WAV", subtype="FLOAT")
    if path is not None:
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.train(["a red square", "a blue circle", "a tone"] * 5, vocab_size=280)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ids(loader) -> list[str]:
    return [i for b in loader for i, v in zip(b["ids"], b["valid"].tolist()) if v]


def test_paths_data_uris_and_raw_bytes_all_load(tmp_path, tokenizer):
    (tmp_path / "media").mkdir()
    _png(tmp_path / "media" / "a.png")
    _wav(tmp_path / "media" / "a.wav", 1.2)
    abs_png = tmp_path / "abs.png"
    _png(abs_png, (0, 0, 255))
    uri_img = "data:image/png;base64," + base64.b64encode(_png()).decode()
    uri_wav = "data:audio/wav;base64," + base64.b64encode(_wav(None, 0.5, sr=44100, channels=2)).decode()
    rows = [
        {"id": "rel", "image": "media/a.png", "text": "a red square", "audio": "media/a.wav"},
        {"id": "abs", "image": str(abs_png), "text": "", "audio": str(tmp_path / "media" / "a.wav")},
        {"id": "uri", "image": uri_img, "text": "A Tone", "audio": uri_wav},
    ]
    manifest = _write(tmp_path / "m.jsonl", rows)
    loader = MultimodalLoader(
        manifest, model_config=CFG, tokenizer=tokenizer, config=LoaderConfig(batch_size=3, shuffle_window=0)
    )
    batches = list(loader)
    assert len(batches) == 1 and batches[0]["ids"] == ["rel", "abs", "uri"]
    b = batches[0]
    assert b["image"]["pixels"].shape == (3, 3, 32, 32)
    assert b["text"]["tokens"][1].tolist()[:2] != [1, 1]  # empty text is valid: a space token + EOS
    assert b["audio"]["padding_mask"].shape[0] == 3 and loader.stats.bad_total == 0  # 44.1 kHz stereo resampled
    # in-memory rows with raw bytes, and a TSV manifest
    mem = MultimodalLoader(
        [{"id": "m1", "image": _png(), "audio": _wav(None, 1.0)}],
        model_config=CFG,
        config=LoaderConfig(batch_size=1, shuffle_window=0),
    )
    assert _ids(mem) == ["m1"]
    tsv = tmp_path / "m.tsv"
    tsv.write_text("id\timage\tcaption\nt1\tmedia/a.png\ta red square\n")
    loader = MultimodalLoader(
        tsv,
        fields={"image": "image", "text": "caption"},
        model_config=CFG,
        tokenizer=tokenizer,
        config=LoaderConfig(batch_size=1, shuffle_window=0),
    )
    assert _ids(loader) == ["t1"]


def _bad_manifest(tmp_path: Path) -> Path:
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _wav(tmp_path / "ok.wav", 1.0)
    _wav(tmp_path / "empty.wav", 0.0)
    _wav(tmp_path / "nan.wav", 1.0, value=float("nan"))
    rows = []
    for i in range(20):
        rows.append({"id": f"ok{i}", "image": "ok.png", "audio": "ok.wav"})
    rows[3] = {"id": "missing", "image": "nope.png", "audio": "ok.wav"}
    rows[7] = {"id": "corrupt", "image": "corrupt.png", "audio": "ok.wav"}
    rows[11] = {"id": "empty", "image": "ok.png", "audio": "empty.wav"}
    rows[15] = {"id": "nan", "image": "ok.png", "audio": "nan.wav"}
    return _write(tmp_path / "bad.jsonl", rows)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_counted_and_reported(tmp_path, caplog, workers):
    """The same counts, reasons and log lines whether samples are decoded in the training process or in workers."""
    manifest = _bad_manifest(tmp_path)
    loader = MultimodalLoader(
        manifest,
        model_config=CFG,
        config=LoaderConfig(batch_size=5, shuffle_window=0, max_bad_fraction=0.5, num_workers=workers),
    )
    with caplog.at_level("WARNING"):
        seen = _ids(loader)
    assert len(seen) == 16 and not {"missing", "corrupt", "empty", "nan"} & set(seen)
    assert dict(loader.stats.bad) == {
        "missing file": 1,
        "undecodable image": 1,
        "empty audio": 1,
        "non-finite values": 1,
    }
    assert "skipping sample corrupt: undecodable image" in caplog.text
    assert "4 bad skipped" in loader.stats.report()
    assert loader.stats.batches == 4  # bad slots are masked, the batch count stays that of the rows
    assert loader.bad_ids == {"missing", "corrupt", "empty", "nan"} and loader.total_seen == 20
    loader.close()


def test_bad_fraction_limit_stops_the_run_with_a_report(tmp_path):
    manifest = _bad_manifest(tmp_path)
    loader = MultimodalLoader(
        manifest,
        model_config=CFG,
        config=LoaderConfig(batch_size=5, shuffle_window=0, max_bad_fraction=0.1, min_samples_for_bad_check=10),
    )
    with pytest.raises(TooManyBadSamples, match=r"\d+ of \d+ distinct samples were bad .*> 10\.0%.*missing file"):
        list(loader)


@pytest.mark.parametrize(
    ("line", "fields", "message"),
    [
        ('{"id": 1, "image": "a.png"', None, r"m\.jsonl:3: malformed JSON"),
        ('{"id": 1, "image": "a.png"}', {"smell": "image"}, r"unknown modality 'smell'"),
    ],
)
def test_invalid_manifest_fails_up_front_naming_the_line(tmp_path, tokenizer, line, fields, message):
    good = '{"id": 0, "image": "a.png", "caption": "x"}\n'
    path = tmp_path / "m.jsonl"
    path.write_text(good + good + line + "\n" + good)
    with pytest.raises(ManifestError, match=message):
        MultimodalLoader(path, fields=fields or {"image": "image"}, model_config=CFG, tokenizer=tokenizer)


@pytest.mark.parametrize(
    ("line", "fields", "message"),
    [
        ('{"id": 1, "img": "a.png"}', None, r"m\.jsonl:1: missing field 'image'.*every other row"),
        (
            '{"id": 1, "image": "a.png", "caption": 5}',
            {"image": "image", "text": "caption"},
            r"m\.jsonl:1: field 'caption': must be a string.*every other row",
        ),
    ],
)
def test_a_field_map_that_fits_no_row_fails_up_front(tmp_path, tokenizer, line, fields, message):
    path = tmp_path / "m.jsonl"
    path.write_text((line + "\n") * 3)
    with pytest.raises(ManifestError, match=message):
        MultimodalLoader(path, fields=fields or {"image": "image"}, model_config=CFG, tokenizer=tokenizer)


def _many(tmp_path: Path, n: int, audio_lengths=None) -> Path:
    _png(tmp_path / "x.png")
    rows = []
    for i in range(n):
        row = {"id": f"s{i:03d}", "image": "x.png"}
        if audio_lengths is not None:
            name = f"a{i}.wav"
            _wav(tmp_path / name, audio_lengths[i])
            row["audio"] = name
        rows.append(row)
    return _write(tmp_path / "many.jsonl", rows)


def test_two_ranks_two_workers_cover_the_data_once(tmp_path):
    manifest = _many(tmp_path, 53)
    cfg = LoaderConfig(batch_size=4, shuffle_window=8, num_workers=2, seed=3)
    loaders = [
        MultimodalLoader(manifest, fields={"image": "image"}, model_config=CFG, config=cfg, rank=r, world_size=2)
        for r in range(2)
    ]
    seen = [_ids(ld) for ld in loaders]
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) == len(seen[1]) == 24  # 26 rows per rank (1 global remainder), 6 full batches of 4
    assert all(len(s) == len(set(s)) for s in seen)
    dropped = sum(ld.stats.remainder_dropped for ld in loaders) + 53 % 2
    assert len(seen[0]) + len(seen[1]) + dropped == 53
    assert loaders[0].stats.batches == loaders[1].stats.batches == loaders[0].batches_per_epoch() == 6
    # next epoch: a different order, same coverage
    again = _ids(loaders[0])
    assert again != seen[0] and len(again) == 24
    for ld in loaders:
        ld.close()


@pytest.mark.parametrize("buckets", [None, [60, 100, 160]], ids=["plain", "buckets"])
def test_resume_mid_epoch_sees_the_same_order(tmp_path, buckets):
    """The saved position is what the consumer received, not what the workers prefetched: 2 workers decode up to 4
    batches ahead, and none of them is lost or repeated after a resume."""
    lengths = list(np.random.default_rng(3).uniform(0.5, 3.0, size=40)) if buckets else None
    manifest = _many(tmp_path, 40, audio_lengths=lengths)
    fields = {"audio": "audio"} if buckets else {"image": "image"}
    cfg = LoaderConfig(batch_size=3, shuffle_window=10, num_workers=2, seed=7, length_buckets=buckets)
    ref = MultimodalLoader(manifest, fields=fields, model_config=CFG, config=cfg)
    full = [b["ids"] for b in ref] + [b["ids"] for b in ref]  # two epochs
    run = MultimodalLoader(manifest, fields=fields, model_config=CFG, config=cfg)
    it = iter(run)
    first = [next(it)["ids"] for _ in range(5)]
    state = run.state_dict()
    assert state["position"] == 5 and state["epoch"] == 0
    assert "pixels" not in repr(state)  # plain values: no decoded media, no pipeline
    resumed = MultimodalLoader(manifest, fields=fields, model_config=CFG, config=cfg)
    resumed.load_state_dict(state)
    rest = [b["ids"] for b in resumed] + [b["ids"] for b in resumed]
    assert first + rest == full
    for ld in (ref, run, resumed):
        ld.close()


def test_workers_started_by_spawn_yield_the_batches_of_the_training_process(tmp_path, tokenizer):
    """Worker processes started by ``spawn`` rebuild the preprocessors from the plugins (nothing is inherited)."""
    rows = [{"id": f"r{i}", "text": "a red square " * (1 + i % 3), "audio": "a.wav"} for i in range(10)]
    _wav(tmp_path / "a.wav", 0.7)
    manifest = _write(tmp_path / "m.jsonl", rows)
    batches = {}
    for workers, start in ((0, None), (2, "spawn")):
        cfg = LoaderConfig(batch_size=4, shuffle_window=10, seed=1, num_workers=workers, worker_start=start)
        loader = MultimodalLoader(manifest, model_config=CFG, tokenizer=tokenizer, config=cfg)
        batches[workers] = list(loader)
        loader.close()
    assert [b["ids"] for b in batches[0]] == [b["ids"] for b in batches[2]] and len(batches[0]) == 2
    for a, b in zip(batches[0], batches[2]):
        for m in ("text", "audio"):
            assert a[m].keys() == b[m].keys() and all(torch.equal(a[m][k], b[m][k]) for k in a[m])


def test_num_parallel_calls_still_works_with_a_deprecation_warning():
    with pytest.warns(FutureWarning, match=r"num_parallel_calls is deprecated.*use data\.num_workers"):
        cfg = LoaderConfig(num_parallel_calls=3)
    assert cfg.num_workers == 3 and cfg.num_parallel_calls is None


def test_a_state_of_the_old_fairseq2_pipeline_stops_with_one_line_saying_how(tmp_path, tokenizer):
    path = _write(tmp_path / "t.jsonl", [{"id": i, "text": "a red square"} for i in range(6)])
    loader = MultimodalLoader(path, model_config=CFG, tokenizer=tokenizer, config=LoaderConfig(batch_size=2))
    old = {"epoch": 0, "pipeline": {"state": b"..."}, "stats": {}, "seen": 2, "bad": 0, "bad_reasons": {}}
    old["data"] = loader.data_identity()
    with pytest.raises(ValueError, match=r"fairseq2 pipeline of one-peace 0\.1.*data\.allow_changed=true") as err:
        loader.load_state_dict(old)
    assert "\n" not in str(err.value)
    allowed = MultimodalLoader(
        path, model_config=CFG, tokenizer=tokenizer, config=LoaderConfig(batch_size=2, allow_changed=True)
    )
    allowed.load_state_dict(old)
    assert allowed.epoch == 1 and len(list(allowed)) == 3


def test_resuming_with_other_batching_is_an_error_naming_the_setting(tmp_path, tokenizer):
    path = _write(tmp_path / "t.jsonl", [{"id": i, "text": "a red square"} for i in range(8)])
    loader = MultimodalLoader(path, model_config=CFG, tokenizer=tokenizer, config=LoaderConfig(batch_size=2))
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    other = MultimodalLoader(path, model_config=CFG, tokenizer=tokenizer, config=LoaderConfig(batch_size=4))
    with pytest.raises(ValueError, match=r"batching differs .*batch_size: saved 2, now 4"):
        other.load_state_dict(state)


def test_length_bucketing_reduces_audio_padding(tmp_path):
    rng = np.random.default_rng(0)
    lengths = list(rng.uniform(0.5, 4.0, size=48))
    manifest = _many(tmp_path, 48, audio_lengths=lengths)
    base = dict(batch_size=4, shuffle_window=48, seed=1)
    plain = MultimodalLoader(manifest, fields={"audio": "audio"}, model_config=CFG, config=LoaderConfig(**base))
    list(plain)
    bucketed = MultimodalLoader(
        manifest,
        fields={"audio": "audio"},
        model_config=CFG,
        config=LoaderConfig(**base, length_buckets=[60, 90, 120, 150, 200], remainder="pad"),
    )
    got = _ids(bucketed)
    assert sorted(got) == sorted(f"s{i:03d}" for i in range(48))
    assert bucketed.stats.padding_fraction()["audio"] < 0.5 * plain.stats.padding_fraction()["audio"]


def test_webdataset_shards_round_trip_and_resume(tmp_path):
    manifest = _many(tmp_path, 11, audio_lengths=[1.0] * 11)
    shards = write_shards(manifest, tmp_path / "shards", shard_size=4)
    assert (
        len(shards) == 3
        and json.loads((tmp_path / "shards" / "shards.json").read_text())["counts"]["shard-000002.tar"] == 3
    )
    cfg = LoaderConfig(batch_size=2, shuffle_window=0)
    loader = MultimodalLoader(
        tmp_path / "shards", fields={"image": "image", "audio": "audio"}, model_config=CFG, config=cfg
    )
    assert loader.num_rows == 11
    ids = [b["ids"] for b in loader]
    assert [i for b in ids for i in b] == [f"s{i:03d}" for i in range(10)] and loader.stats.remainder_dropped == 1
    again = MultimodalLoader(
        tmp_path / "shards", fields={"image": "image", "audio": "audio"}, model_config=CFG, config=cfg
    )
    it = iter(again)
    head = [next(it)["ids"] for _ in range(3)]
    state = again.state_dict()
    resumed = MultimodalLoader(
        tmp_path / "shards", fields={"image": "image", "audio": "audio"}, model_config=CFG, config=cfg
    )
    resumed.load_state_dict(state)
    assert head + [b["ids"] for b in resumed] == ids
    # a corrupt shard counts as a bad sample; the rest still loads
    (tmp_path / "shards" / "shard-000001.tar").write_bytes(b"garbage" * 100)
    broken = MultimodalLoader(
        tmp_path / "shards",
        fields={"image": "image", "audio": "audio"},
        model_config=CFG,
        config=LoaderConfig(batch_size=1, shuffle_window=0, max_bad_fraction=1.0),
    )
    got = _ids(broken)
    # every sample the broken shard held is one bad row (its count comes from shards.json); the others load
    assert got == ["s000", "s001", "s002", "s003", "s008", "s009", "s010"]
    assert dict(broken.stats.bad) == {"undecodable row": 4}
    assert sorted(broken.bad_ids) == [f"shard-000001.tar#{i}" for i in range(4)]


def test_demo_dataset_is_generated_and_loads(tmp_path, tokenizer):
    paths = make_demo_dataset(tmp_path, n_train=8, n_valid=4, image_size=32)
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert len(rows) == 8 and {"image", "caption", "audio", "sound", "video", "motion"} <= set(rows[0])
    tok = TextTokenizer.train([r["caption"] for r in rows], vocab_size=280)
    cfg = one_peace.model_config(
        "tiny", ("text", "image", "audio", "video"), modality_options={"image": {"image_size": 32}}
    )
    loader = MultimodalLoader(
        paths["train"],
        fields={"image": "image", "text": "caption", "audio": "audio", "video": "video"},
        model_config=cfg,
        tokenizer=tok,
        config=LoaderConfig(batch_size=4, shuffle_window=0),
    )
    batches = list(loader)
    assert len(batches) == 2 and loader.stats.bad_total == 0
    assert batches[0]["video"]["frames"].shape == (4, 8, 3, 32, 32)
    model = one_peace.build_model(cfg)
    out = model.forward_features({m: batches[0][m] for m in ("text", "image", "audio")})
    assert out.hidden["image"].shape == (4, 5, 64)


def test_length_buckets_give_every_rank_the_same_batch_count(tmp_path):
    rng = np.random.default_rng(1)
    manifest = _many(tmp_path, 30, audio_lengths=list(rng.uniform(0.5, 3.0, size=30)))
    cfg = LoaderConfig(batch_size=3, shuffle_window=30, length_buckets=[60, 100, 160], seed=2)
    loaders = [
        MultimodalLoader(manifest, fields={"audio": "audio"}, model_config=CFG, config=cfg, rank=r, world_size=2)
        for r in range(2)
    ]
    seen = [[b["ids"] for b in ld] for ld in loaders]
    assert len(seen[0]) == len(seen[1]) > 0
    flat = [set(i for b in s for i in b) for s in seen]
    assert not flat[0] & flat[1]
    # coverage: the ranks together read every row once, or report the ones they dropped (#10.22)
    dropped = sum(ld.stats.remainder_dropped for ld in loaders)
    assert len(flat[0] | flat[1]) + dropped == 30 and sum(len(f) for f in flat) == len(flat[0] | flat[1])


def test_packing_plan_from_the_loader_feeds_forward_packed(tmp_path, tokenizer):
    from one_peace.data import train_tokenizer

    rows = [{"id": f"t{i}", "text": "a red square " * (1 + i % 4)} for i in range(8)]
    manifest = _write(tmp_path / "t.jsonl", rows)
    tok = train_tokenizer(str(manifest), "text", vocab_size=280)
    loader = MultimodalLoader(
        manifest, model_config=CFG, tokenizer=tok, config=LoaderConfig(batch_size=8, shuffle_window=0, pack_length=40)
    )
    batch = next(iter(loader))
    plan = batch["pack"]
    assert plan["modality"] == "text" and len(plan["rows"]) < 8
    model = one_peace.build_model(
        "tiny", modalities=("text",), modality_options={"text": {"vocab_size": tok.vocab_size}}
    )
    packed = model.forward_packed("text", batch["text"], row_length=plan["row_length"], rows=plan["rows"])
    ref = model.forward_features({"text": batch["text"]})
    real = ref.padding_mask["text"] is None or ~ref.padding_mask["text"]
    torch.testing.assert_close(packed.hidden[real], ref.hidden["text"][real], atol=2e-5, rtol=1e-5)


def test_an_epoch_that_yields_nothing_is_a_clear_error_not_a_hang(tmp_path, tokenizer):
    """#10.1: fewer rows than the batch size used to give 0 batches per epoch and an endless loop of empty epochs."""
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": f"a red square {i}"}) + "\n" for i in range(3)))
    loader = MultimodalLoader(
        path, fields={"text": "text"}, model_config=CFG, tokenizer=tokenizer, config=LoaderConfig(batch_size=8)
    )
    with pytest.raises(ValueError, match=r"yields no batch on rank 0 of 1: 3 rows per rank, batch size 8") as err:
        list(loader)
    assert "data.remainder=pad" in str(err.value) and str(path) in str(err.value)
    loader.close()
    padded = MultimodalLoader(
        path,
        fields={"text": "text"},
        model_config=CFG,
        tokenizer=tokenizer,
        config=LoaderConfig(batch_size=8, remainder="pad"),
    )
    (batch,) = list(padded)
    assert batch["valid"].tolist() == [True] * 3 + [False] * 5
    padded.close()


def test_bad_rows_are_counted_once_per_epoch_and_distinct_in_total(tmp_path, caplog):
    """#10.11: re-reads of the same bad rows used to accumulate ("1000 of 1000" for 40 bad rows over 25 epochs)."""
    manifest = _bad_manifest(tmp_path)  # 20 rows, 4 bad
    loader = MultimodalLoader(
        manifest, model_config=CFG, config=LoaderConfig(batch_size=5, shuffle_window=0, max_bad_fraction=0.5)
    )
    with caplog.at_level("WARNING"):
        for _ in range(3):
            _ids(loader)
            assert loader.stats.bad_total == 4 and loader.total_seen == 20
    assert loader.bad_ids == {"missing", "corrupt", "empty", "nan"}
    assert caplog.text.count("skipping sample corrupt") == 1  # logged once, not once per epoch
    strict = MultimodalLoader(
        manifest,
        model_config=CFG,
        config=LoaderConfig(batch_size=5, shuffle_window=0, max_bad_fraction=0.1, min_samples_for_bad_check=1000),
    )
    with pytest.raises(TooManyBadSamples, match=r"epoch 0: 4 of 20 distinct samples were bad"):
        _ids(strict)  # a whole epoch smaller than the sample size is judged at its end


def test_a_plugin_bug_stops_the_run_instead_of_becoming_bad_samples(tmp_path, tokenizer):
    """#10.12: a TypeError in a preprocessor used to be counted as a bad sample (999 warnings, masked slots)."""
    from one_peace.errors import InvalidValue

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": "a red square"}) + "\n" for i in range(4)))
    loader = MultimodalLoader(
        path, fields={"text": "text"}, model_config=CFG, tokenizer=tokenizer, config=LoaderConfig(batch_size=2)
    )

    def buggy(value):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    loader.preprocessors["text"] = buggy
    with pytest.raises(TypeError, match="unsupported operand"):
        list(loader)
    assert loader.total_bad == 0
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text(json.dumps({"id": "n", "text": 5}) + "\n" + json.dumps({"id": "ok", "text": "a tone"}) + "\n")
    typed = MultimodalLoader(
        numbers,
        fields={"text": "text"},
        model_config=CFG,
        tokenizer=tokenizer,
        config=LoaderConfig(batch_size=2, max_bad_fraction=0.5),
        validate=False,  # up-front validation would refuse the row; here it reaches the preprocessor
    )
    (batch,) = list(typed)
    assert batch["valid"].tolist() == [False, True] or batch["valid"].tolist() == [True, False]
    assert dict(typed.stats.bad) == {InvalidValue.reason: 1}


def test_length_bucketing_never_drops_long_audio(tmp_path):
    """#10.13: audio longer than the largest bucket was dropped silently (its estimate ignored max_seconds)."""
    manifest = _many(tmp_path, 12, audio_lengths=[1.0] * 8 + [20.0] * 4)  # 20 s clips are cut at 15 s
    cfg = LoaderConfig(batch_size=4, shuffle_window=0, length_buckets=[60, 200], remainder="pad")
    loader = MultimodalLoader(manifest, fields={"audio": "audio"}, model_config=CFG, config=cfg)
    got = _ids(loader)
    assert sorted(got) == sorted(f"s{i:03d}" for i in range(12))
    assert loader.stats.samples == 12


def test_resuming_over_other_data_is_an_error_unless_allowed(tmp_path, tokenizer):
    """#10.5: resuming with another data.train silently continued the old manifest for the rest of the epoch."""
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    old.write_text("".join(json.dumps({"id": f"o{i}", "text": "a red square"}) + "\n" for i in range(6)))
    new.write_text("".join(json.dumps({"id": f"n{i}", "text": "a blue circle"}) + "\n" for i in range(6)))
    cfg = LoaderConfig(batch_size=2, shuffle_window=0)
    first = MultimodalLoader(old, fields={"text": "text"}, model_config=CFG, tokenizer=tokenizer, config=cfg)
    it = iter(first)
    next(it)
    state = first.state_dict()
    again = MultimodalLoader(old, fields={"text": "text"}, model_config=CFG, tokenizer=tokenizer, config=cfg)
    again.load_state_dict(state)  # the same data: fine
    assert [b["ids"] for b in again] == [["o2", "o3"], ["o4", "o5"]]
    other = MultimodalLoader(new, fields={"text": "text"}, model_config=CFG, tokenizer=tokenizer, config=cfg)
    with pytest.raises(ValueError, match=r"the data differs from the checkpoint's .*data.allow_changed=true"):
        other.load_state_dict(state)
    allowed = MultimodalLoader(
        new,
        fields={"text": "text"},
        model_config=CFG,
        tokenizer=tokenizer,
        config=LoaderConfig(batch_size=2, shuffle_window=0, allow_changed=True),
    )
    allowed.load_state_dict(state)
    assert allowed.epoch == 1
    ids = [b["ids"] for b in allowed]
    assert ids == [["n0", "n1"], ["n2", "n3"], ["n4", "n5"]]  # a new epoch on the new data, from its start
    for loader in (first, again, other, allowed):
        loader.close()


@pytest.mark.fairseq2
@pytest.mark.skipif(not __import__("one_peace.extras").extras.available("fairseq2"), reason="needs the fairseq2 extra")
@pytest.mark.parametrize("buckets", [None, [60, 100, 160]], ids=["plain", "buckets"])
def test_torch_and_fairseq2_backends_yield_the_same_batches_and_resume_state(tmp_path, tokenizer, buckets):
    """The same sampler plan decoded by DataLoader workers and by fairseq2's parallel map: identical batches (ids and
    every tensor), bad-sample counts and resume states; a state saved by one backend resumes the other."""
    manifest = _bad_manifest(tmp_path)
    rng = np.random.default_rng(5)
    for i in range(20):
        _wav(tmp_path / f"v{i}.wav", float(rng.uniform(0.5, 3.0)))
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    for i, row in enumerate(rows):
        if row["audio"] == "ok.wav":
            row["audio"] = f"v{i}.wav"
    manifest = _write(tmp_path / "mixed.jsonl", rows)

    def loader(backend: str, workers: int) -> MultimodalLoader:
        cfg = LoaderConfig(
            batch_size=3,
            shuffle_window=7,
            seed=4,
            backend=backend,
            num_workers=workers,
            length_buckets=buckets,
            remainder="pad",
            max_bad_fraction=0.5,
        )
        return MultimodalLoader(manifest, model_config=CFG, config=cfg)

    def epochs(ld: MultimodalLoader, n: int = 2) -> list[dict]:
        return [b for _ in range(n) for b in ld]

    torch_batches = epochs(ref := loader("torch", 2))
    fs2 = loader("fairseq2", 2)
    fs2_batches = epochs(fs2)
    assert len(torch_batches) == len(fs2_batches) > 6
    for a, b in zip(torch_batches, fs2_batches):
        assert a["ids"] == b["ids"] and torch.equal(a["valid"], b["valid"])
        for m in ("image", "audio"):
            assert all(torch.equal(a[m][k], b[m][k]) for k in a[m])
    assert ref.stats == fs2.stats and dict(fs2.stats.bad) == {
        "missing file": 1,
        "undecodable image": 1,
        "empty audio": 1,
        "non-finite values": 1,
    }
    # a state saved mid-epoch by the torch backend resumes on fairseq2's (and the reverse)
    for first, second in (("torch", "fairseq2"), ("fairseq2", "torch")):
        run = loader(first, 1)
        it = iter(run)
        head = [next(it)["ids"] for _ in range(3)]
        other = loader(second, 2)
        other.load_state_dict(run.state_dict())
        assert head + [b["ids"] for b in epochs(other, 1)] + [b["ids"] for b in epochs(other, 1)] == [
            b["ids"] for b in torch_batches
        ]
        run.close()
        other.close()
    ref.close()
    fs2.close()
