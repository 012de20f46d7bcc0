"""Loader throughput and memory, per backend: samples/s for images and audio by number of decoding workers, peak
RSS over a 20k-row manifest versus a 2k-row one (memory must not grow with the manifest), and the data-wait
fraction of the README's main job by number of workers.

Each measurement runs in a fresh child process so its peak RSS is its own (workers' memory is not included).

    python benchmarks/data.py                                  # torch backend: 0, 1, 2 workers
    python benchmarks/data.py --backend fairseq2 --workers 1 2 # in the fairseq2 environment: parallel calls
    python benchmarks/data.py --main-job --workers 0 1 2       # also the main job's data-wait fraction
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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


def _run(manifest: str, modality: str, backend: str, workers: str, limit: str) -> None:
    import torch

    from one_peace.data import LoaderConfig, MultimodalLoader

    torch.set_num_threads(1)  # the training process's decoding (workers=0) on one core, as workers are
    cfg = LoaderConfig(batch_size=16, shuffle_window=1000, backend=backend, num_workers=int(workers))
    loader = MultimodalLoader(manifest, fields={modality: modality}, config=cfg)
    batches = iter(loader)
    next(batches)  # warm-up: imports, worker start, first decode
    n, start = 0, time.perf_counter()
    for batch in batches:
        n += int(batch["valid"].sum())
        if int(limit) and n >= int(limit):
            break
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loader.close()
    print(json.dumps({"samples": n, "seconds": seconds, "peak_rss": peak}))


def _child(*args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--_run", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main_job_wait(workers: int, root: Path, backend: str = "torch") -> dict[str, float]:
    """The README's main job (vl_seq2seq on the demo data) with ``data.num_workers=workers``: the mean data-wait
    fraction and samples/s of its log intervals after the first (which holds start-up and the FLOP count)."""
    out = root / f"job{workers}"
    cmd = [sys.executable, "-m", "one_peace.run", "recipe=vl_seq2seq", f"data.num_workers={workers}"]
    cmd.append(f"data.backend={backend}")
    subprocess.run([*cmd, f"output_dir={out}"], check=True, capture_output=True, timeout=1800, env=os.environ)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return {
        "data_wait": statistics.mean(r["data_wait"] for r in rows),
        "samples_per_s": statistics.mean(r["samples_per_s"] for r in rows),
        "mfu": statistics.mean(r["mfu"] for r in rows),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="torch", choices=("torch", "fairseq2"))
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker processes / parallel calls")
    p.add_argument("--small", type=int, default=2000)
    p.add_argument("--large", type=int, default=20000)
    p.add_argument("--throughput-samples", type=int, default=480, help="samples read per throughput measurement")
    p.add_argument("--main-job", action="store_true", help="also time the README's main job at each worker count")
    p.add_argument("--skip-memory", action="store_true", help="skip the 2k/20k-row peak RSS comparison")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    import torch

    result: dict[str, object] = {"backend": args.backend, "torch": torch.__version__, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        small = _make(root, args.small)
        _child(str(small), "image", args.backend, str(max(args.workers)), "64")  # warm the page cache
        what = "decode + preprocess + collate, batch 16"
        print(f"loader alone ({args.backend} backend, torch {torch.__version__}; {what}):")
        rates: dict[str, float] = {}
        for modality in ("image", "audio"):
            for workers in args.workers:
                r = _child(str(small), modality, args.backend, str(workers), str(args.throughput_samples))
                rates[f"{modality}/{workers}"] = r["samples"] / r["seconds"]
                print(f"  {modality:>5}, {workers} worker(s): {rates[f'{modality}/{workers}']:7.1f} samples/s")
        result["samples_per_s"] = rates
        if not args.skip_memory:
            large = _make(root, args.large)
            workers = str(max(args.workers))
            print(f"peak RSS of the training process over a whole epoch (audio, {workers} workers), by manifest size:")
            memory = {}
            for path, rows in ((small, args.small), (large, args.large)):
                r = _child(str(path), "audio", args.backend, workers, "0")
                memory[rows] = r["peak_rss"] / 2**20
                print(f"  {rows:>6} rows: {memory[rows]:7.0f} MiB ({r['samples']} samples, {r['seconds']:.0f}s)")
            result["peak_rss_mib"] = memory
        if args.main_job:
            print("the README's main job (vl_seq2seq), log intervals after the first:")
            jobs = {}
            for workers in args.workers:
                jobs[workers] = main_job_wait(workers, root, args.backend)
                j = jobs[workers]
                print(
                    f"  {workers} worker(s): data wait {j['data_wait']:.1%}, {j['samples_per_s']:.0f} samples/s, "
                    f"MFU {j['mfu']:.1%}"
                )
            result["main_job"] = jobs
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_run":
        _run(*sys.argv[2:])
    else:
        sys.exit(main())
