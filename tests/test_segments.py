"""#28: long audio and video as timed segments (windowed decoding, encode/embed/search with start and end)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

import one_peace
from one_peace.segments import SegmentSpec, plan_windows, stream_windows

RATE = 16000


def _sound(kind: int, seconds: float, seed: int) -> np.ndarray:
    """Six clearly different 10-s sounds: tones, chirps, noise bands, pulse trains."""
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(seed)
    if kind == 0:
        wave = np.sin(2 * np.pi * 220 * t)
    elif kind == 1:
        wave = np.sin(2 * np.pi * (300 + 200 * t) * t)
    elif kind == 2:
        wave = rng.normal(size=t.size)
    elif kind == 3:
        wave = np.sign(np.sin(2 * np.pi * 3 * t)) * np.sin(2 * np.pi * 1200 * t)
    elif kind == 4:
        wave = np.sin(2 * np.pi * 60 * t) + 0.5 * np.sin(2 * np.pi * 2500 * t)
    else:
        wave = (np.sin(2 * np.pi * 7 * t) > 0.9) * rng.normal(size=t.size)
    return (0.3 * wave).astype(np.float32)


@pytest.mark.parametrize("duration", [0.4, 9.99, 10.0, 27.3, 60.0])
@pytest.mark.parametrize(("window", "hop", "floor"), [(10, 10, 1), (10, 5, 1), (4, 6, 0.5), (10, 10, 5)])
def test_streamed_windows_are_the_planned_windows(duration, window, hop, floor):
    """Windows cut from a signal arriving in uneven chunks hold exactly the samples of the planned spans."""
    spec = SegmentSpec(window, hop, floor).resolved()
    signal = np.arange(int(duration * 100), dtype=np.float32)
    cuts = np.cumsum(np.random.default_rng(0).integers(1, 150, size=200))
    chunks = [c for c in np.split(signal, cuts[cuts < signal.size]) if c.size]
    got = list(stream_windows(iter(chunks), 100, spec))
    plan = plan_windows(signal.size / 100, spec)
    assert [(round(g.start, 2), round(g.end, 2)) for g in got] == [(round(a, 2), round(b, 2)) for a, b in plan]
    for g in got:
        samples, rate = g.item
        assert rate == 100 and np.array_equal(samples, signal[round(g.start * 100) : round(g.end * 100)])


def _tiny_audio_model(tmp_path):
    options = {"audio": {"frontend": "fbank", "feature_dim": 64}}  # the cheaper front end
    # layer scale 0.1: an untrained model whose embeddings differ between sounds (at the default 1e-6 every clip
    # embeds alike and an exact match would win by rounding alone)
    torch.manual_seed(0)
    model = one_peace.build_model("tiny", ("text", "audio"), modality_options=options, layer_scale_init=0.1)
    return model, one_peace.save(model, tmp_path / "ck")


def test_a_query_for_the_fourth_sound_returns_its_segment(tmp_path):
    """Done-when of #28: a 60-s file of six 10-s sounds embedded with a 10-s window; the 4th sound as the query
    finds that file's segment starting at 30 s, top-1 (an exact-match construction: the query is the window)."""
    from one_peace.embed import EmbedConfig, embed
    from one_peace.retrieval import open_index

    sounds = [_sound(k, 10, seed=k) for k in range(6)]
    sf.write(tmp_path / "long.wav", np.concatenate(sounds), RATE, subtype="FLOAT")
    sf.write(tmp_path / "other.flac", np.concatenate([_sound(k, 10, seed=10 + k) for k in (2, 5)])[: 17 * RATE], RATE)
    sf.write(tmp_path / "query.wav", sounds[3], RATE, subtype="FLOAT")
    (tmp_path / "data.jsonl").write_text(
        json.dumps({"id": "long", "audio": "long.wav"})
        + "\n"
        + json.dumps({"id": "other", "audio": "other.flac"})
        + "\n"
    )
    model, ck = _tiny_audio_model(tmp_path)

    seg = model.encode("audio", [str(tmp_path / "long.wav")], segments=10)
    assert [(s, e) for s, e in zip(seg.start, seg.end)] == [(10.0 * k, 10.0 * (k + 1)) for k in range(6)]
    query = model.encode("audio", [str(tmp_path / "query.wav")])
    scores = (seg.vectors @ query.T).squeeze(1)
    assert int(scores.argmax()) == 3 and float(scores[3]) > 0.999
    assert float(torch.cat([scores[:3], scores[4:]]).max()) < 0.95  # the other sounds are told apart

    cfg = EmbedConfig(checkpoint=str(ck), data=str(tmp_path / "data.jsonl"), modality="audio", out=str(tmp_path / "e"))
    cfg.segments.window, cfg.segments.hop = 10, 5
    cfg.progress, cfg.workers, cfg.precision = False, 0, "fp32"
    info = embed(cfg)
    # long: starts 0, 5, ..., 50; other (17 s): 0-10, 5-15, 10-17
    assert info["count"] == 11 + 3 and info["segments"] == {"window": 10.0, "hop": 5.0, "min": 1.0}
    assert info["reserved"][-3:] == ["parent_id", "start", "end"]  # a row's own "start" goes to field.start
    top = open_index(tmp_path / "e").search({"audio": str(tmp_path / "query.wav")}, top_k=3)[0]
    assert top.id == "long#t=30,40" and abs(top.metadata["start"] - 30) <= 1
    assert top.metadata["parent_id"] == "long" and top.metadata["end"] == 40.0

    again = EmbedConfig(**{**vars(cfg), "mode": "resume"})
    again.segments.window, again.segments.hop = 10, 10
    with pytest.raises(ValueError, match="cut into segments"):
        embed(again)


def test_a_damaged_file_keeps_the_windows_read_before_the_damage(tmp_path):
    from one_peace.embed import EmbedConfig, embed

    sf.write(tmp_path / "a.wav", _sound(0, 25, 0), RATE)
    (tmp_path / "b.wav").write_bytes(b"RIFF not a wave at all")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"id": n, "audio": f"{n}.wav"}) + "\n" for n in ("a", "b")))
    _, ck = _tiny_audio_model(tmp_path)
    cfg = EmbedConfig(checkpoint=str(ck), data=str(tmp_path / "data.jsonl"), modality="audio", out=str(tmp_path / "e"))
    cfg.segments.window = 10
    cfg.progress, cfg.workers, cfg.index = False, 0, "none"
    info = embed(cfg)
    assert info["count"] == 3 and info["bad"] == 1  # a: 0-10, 10-20, 20-25; b does not open
    bad = [json.loads(line) for line in (tmp_path / "e" / "bad.jsonl").read_text().splitlines()]
    assert bad[0]["id"] == "b" and bad[0]["segments_embedded"] == 0


def test_segments_need_a_time_axis_and_a_window_the_model_takes(tmp_path):
    model, _ = _tiny_audio_model(tmp_path)
    with pytest.raises(ValueError, match="'text' modality has no time axis"):
        model.encode("text", ["a"], segments=10)
    with pytest.raises(ValueError, match="longer than audio max_seconds 15"):
        model.encode("audio", [np.zeros(RATE * 20, dtype=np.float32)], segments=20)
    from one_peace.embed import EmbedConfig, embed

    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "a", "audio": "a.wav"}) + "\n")
    cfg = EmbedConfig(checkpoint=str(tmp_path / "ck"), data=str(tmp_path / "d.jsonl"), modality="audio", out="o")
    cfg.out, cfg.segments.window = str(tmp_path / "o"), 20
    with pytest.raises(ValueError, match="longer than audio max_seconds 15"):
        embed(cfg)
    assert not (tmp_path / "o").exists()  # refused before the folder was made
    with pytest.raises(ValueError, match="min_length"):
        model.encode("audio", [np.zeros(RATE, dtype=np.float32)], segments={"window": 5, "min_length": 6})


def _video(path, seconds: int, fps: int = 25, size: int = 32) -> None:
    import av

    with av.open(str(path), "w") as c:
        stream = c.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt, stream.gop_size = "yuv420p", fps
        for i in range(seconds * fps):
            img = np.full((size, size, 3), (i // fps) * 6 % 256, dtype=np.uint8)  # the second, as a grey level
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)


def test_video_frames_are_reached_by_seeking_and_segments_carry_their_times(tmp_path):
    pytest.importorskip("av")
    from one_peace.adapters.video import _open_video, frames_at, load_video_frames, sample_frame_indices

    _video(tmp_path / "v.mp4", 40)
    with _open_video(tmp_path / "v.mp4") as container:
        images, decoded = frames_at(container, [0.5, 12.3, 39.9])
    assert decoded < 1000 / 10  # a 40-s, 25 fps clip: a few GOPs decoded, not all 1,000 frames
    assert [int(np.asarray(im).mean() / 6 + 0.5) for im in images] == [0, 12, 39]
    # the same frames as decoding everything and sampling indices (the behaviour before seeking)
    import av

    with av.open(str(tmp_path / "v.mp4")) as c:
        every = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    picked = [np.asarray(f) for f in load_video_frames(tmp_path / "v.mp4", 8)]
    assert all(np.array_equal(a, every[i]) for a, i in zip(picked, sample_frame_indices(len(every), 8)))

    model = one_peace.build_model("tiny", modalities=("image", "video"), modality_options={"image": {"image_size": 32}})
    seg = model.encode("video", [str(tmp_path / "v.mp4")], segments={"window": 10, "hop": 15})
    assert list(zip(seg.start, seg.end)) == [(0.0, 10.0), (15.0, 25.0), (30.0, 40.0)]
    with pytest.raises(ValueError, match="frames given as images carry no times"):
        model.encode("video", [[np.zeros((8, 8, 3), np.uint8)]], segments=10)
