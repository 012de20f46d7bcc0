"""Peak memory of timed segments: embedding a 1-minute and a 1-hour recording, and sampling frames of a long video.

``python -m benchmarks.segments [--hour-minutes 60] [--out benchmarks/segments.json]``

Each measurement runs in a fresh process (``ru_maxrss`` of that process: the interpreter, torch and the model
included, so the import baseline is reported too):

* ``embed`` of one WAV (16 kHz, 16-bit) with ``segments.window=10`` (tiny model, fbank front end, batches of 64
  windows): 1, 20 and ``--hour-minutes`` minutes; and, for contrast, the same long file embedded whole (the clip
  is decoded whole and cut at 15 s: what a long file cost before segments);
* 8 frames sampled from a 25 fps video of ``--video-seconds`` seconds, by seeking (now) and by decoding every frame
  (before), with the frames each way decoded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RATE = 16000


def _write_wav(path: Path, minutes: float) -> None:
    import soundfile as sf

    rng = np.random.default_rng(0)
    with sf.SoundFile(str(path), "w", RATE, 1, subtype="PCM_16") as fh:
        for second in range(int(minutes * 60)):
            t = np.arange(RATE) / RATE
            tone = np.sin(2 * np.pi * (200 + 40 * (second // 10 % 12)) * t)
            fh.write((0.2 * tone + 0.05 * rng.normal(size=RATE)).astype(np.float32))


def _child(code: str, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line (with its own peak RSS)."""
    import os

    full = {**os.environ, **(env or {})}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=full)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


EMBED = """
import json, time, resource, torch, one_peace
from one_peace.embed import EmbedConfig, embed
torch.manual_seed(0)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
cfg = EmbedConfig(checkpoint={ck!r}, data={data!r}, modality="audio", out={out!r})
cfg.segments.window = {window}
cfg.progress, cfg.workers, cfg.index, cfg.precision = False, 0, "none", "fp32"
t = time.perf_counter()
info = embed(cfg)
peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
secs = round(time.perf_counter() - t, 2)
print(json.dumps({{"rows": info["count"], "seconds": secs, "before_embed_mb": round(base, 1), "peak_rss_mb": peak}}))
"""

VIDEO = """
import json, resource, time
from one_peace.adapters.video import _open_video, frames_at, sample_frame_indices, sample_times, video_duration
t = time.perf_counter()
if {seek}:
    with _open_video({path!r}) as c:
        frames, decoded = frames_at(c, sample_times(0.0, video_duration(c), 8))
else:  # what load_video_frames did before: every frame decoded into an image, then 8 kept
    with _open_video({path!r}) as c:
        every = [f.to_image() for f in c.decode(video=0)]
    decoded = len(every)
    frames = [every[i] for i in sample_frame_indices(len(every), 8)]
peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
secs = round(time.perf_counter() - t, 2)
print(json.dumps({{"frames": len(frames), "decoded": decoded, "seconds": secs, "peak_rss_mb": peak}}))
"""


def _video(path: Path, seconds: int, size: int = 224) -> None:
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        stream = c.add_stream("libx264", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt, stream.gop_size = "yuv420p", 50
        for i in range(seconds * 25):
            img = np.full((size, size, 3), i % 256, dtype=np.uint8)
            img[: size // 4] = rng.integers(0, 255, (size // 4, size, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)


def main() -> None:
    """Measure and print (and write ``--out``) the figures."""
    import one_peace

    parser = argparse.ArgumentParser()
    parser.add_argument("--hour-minutes", type=float, default=60.0)
    parser.add_argument("--video-seconds", type=int, default=40)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = one_peace.build_model(
            "tiny", ("text", "audio"), modality_options={"audio": {"frontend": "fbank", "feature_dim": 64}}
        )
        ck = str(one_peace.save(model, root / "ck"))
        sizes = (("1 min", 1), ("20 min", 20), ("long", args.hour_minutes))  # 20 min: past one batch of 64 windows
        # glibc raises its mmap threshold as large buffers are freed, and the heap then fragments: RSS creeps up with
        # the number of windows though nothing is kept. A fixed threshold shows the memory the job itself holds.
        fixed = {"MALLOC_MMAP_THRESHOLD_": "262144"}
        for (name, minutes), env in [(size, None) for size in sizes] + [(size, fixed) for size in sizes[1:]]:
            window = 10
            wav = root / f"{minutes}.wav"
            if not wav.exists():
                _write_wav(wav, minutes)
            data = root / f"{minutes}.jsonl"
            data.write_text(json.dumps({"id": "rec", "audio": wav.name}) + "\n")
            code = EMBED.format(ck=ck, data=str(data), out=str(root / f"e{minutes}{bool(env)}"), window=window)
            started = time.perf_counter()
            label = (
                name.replace("long", f"{minutes:g} min") + ", 10-s segments" + (", fixed mmap threshold" if env else "")
            )
            results[label] = {
                **_child(code, env),
                "file_mb": round(wav.stat().st_size / 1e6, 1),
                "wall_s": round(time.perf_counter() - started, 1),
            }
        whole = EMBED.replace("cfg.segments.window = {window}\n", "").format(
            ck=ck, data=str(root / f"{args.hour_minutes}.jsonl"), out=str(root / "whole"), window=0
        )
        results[f"{args.hour_minutes:g} min, whole (before: decoded whole, cut at 15 s)"] = _child(whole)
        try:
            video = root / "v.mp4"
            _video(video, args.video_seconds)
            for seek in (True, False):
                key = f"video {args.video_seconds} s, 8 frames, " + ("seeking" if seek else "every frame decoded")
                got = _child(VIDEO.format(seek=seek, path=str(video)))
                results[key] = {**got, "file_kb": video.stat().st_size // 1024}
        except ImportError:
            results["video"] = "PyAV missing (the video extra)"
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
