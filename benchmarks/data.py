"""Loader throughput and memory: samples/s for images and audio with 1 and 2 decoding threads, and peak RSS
over a 20k-sample manifest versus a 2k-sample one (memory must not grow with the manifest).

Each measurement runs in a fresh child process so its peak RSS is its own.

    python benchmarks/data.py                  # defaults: 2k/20k rows, 256 px images, 1-3 s audio clips
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _make(root: Path, rows: int) -> Path:
    import numpy as np
    import soundfile as sf
    from PIL import Image

    media = root / "media"
    media.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(16):
        if not (media / f"{i}.jpg").exists():
            Image.fromarray(rng.integers(0, 255, (320, 240, 3), dtype=np.uint8)).save(media / f"{i}.jpg", quality=90)
            sf.write(
                media / f"{i}.wav", (rng.standard_normal(int(16000 * (1 + i % 3))) * 0.1).astype(np.float32), 16000
            )
    path = root / f"m{rows}.jsonl"
    with open(path, "w") as fh:
        for r in range(rows):
            fh.write(json.dumps({"id": f"r{r}", "image": f"media/{r % 16}.jpg", "audio": f"media/{r % 16}.wav"}) + "\n")
    return path


def _run(manifest: str, modality: str, threads: str, limit: str) -> None:
    from one_peace.data import LoaderConfig, MultimodalLoader

    cfg = LoaderConfig(batch_size=16, shuffle_window=1000, num_parallel_calls=int(threads))
    loader = MultimodalLoader(manifest, fields={modality: modality}, config=cfg)
    batches = iter(loader)
    next(batches)  # warm-up: imports, pipeline construction, first decode
    n, start = 0, time.perf_counter()
    for batch in batches:
        n += int(batch["valid"].sum())
        if int(limit) and n >= int(limit):
            break
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"samples": n, "seconds": seconds, "peak_rss": peak}))


def _child(*args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--_run", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", type=int, default=2000)
    p.add_argument("--large", type=int, default=20000)
    p.add_argument("--throughput-samples", type=int, default=480, help="samples read per throughput measurement")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        small, large = _make(root, args.small), _make(root, args.large)
        _child(str(small), "image", "2", "64")  # warm the page cache with the media files
        print("loader alone (decode + preprocess + collate, batch 16):")
        for modality in ("image", "audio"):
            for threads in ("1", "2"):
                r = _child(str(small), modality, threads, str(args.throughput_samples))
                print(f"  {modality:>5}, {threads} thread(s): {r['samples'] / r['seconds']:7.1f} samples/s")
        print("peak RSS over a whole epoch (audio, 2 decoding threads), by manifest size:")
        for path, rows in ((small, args.small), (large, args.large)):
            r = _child(str(path), "audio", "2", "0")
            print(f"  {rows:>6} rows: {r['peak_rss'] / 2**20:7.0f} MiB ({r['samples']} samples, {r['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_run":
        _run(*sys.argv[2:])
    else:
        sys.exit(main())
