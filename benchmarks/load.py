"""Conversion time and peak memory for a synthetic official-format checkpoint (default: the ``large`` size).

A random model of the given size is written as an official fairseq-style file (``{"cfg": ..., "model": ...}``,
official key names) in a child process; the conversion then runs in a fresh child process whose peak RSS is
reported as a ratio of the checkpoint's size (target <= 1.3). Loading the converted folder is timed too.

    python benchmarks/load.py                     # large, float32, in a temporary folder
    python benchmarks/load.py --size base --dtype float16 --workdir /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _make(size: str, dtype: str, path: str) -> None:
    import torch

    import one_peace
    from one_peace.checkpoint.official import official_name

    torch.manual_seed(0)
    model = one_peace.build_model(size, modalities=("text", "image", "audio"))
    state = {official_name(k): v.detach().to(getattr(torch, dtype)) for k, v in model.state_dict().items()}
    del model
    torch.save(
        {"cfg": {"model": {"_name": "one_peace_retrieval"}, "task": {"patch_image_size": 256}}, "model": state}, path
    )


def _convert(src: str, dst: str, shard_size: str) -> None:
    from one_peace.convert import main

    start = time.perf_counter()
    rc = main([src, dst, "--shard-size", shard_size])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rc": rc, "seconds": seconds, "peak_rss": peak}))


def _load(dst: str) -> None:
    import one_peace

    start = time.perf_counter()
    one_peace.load(dst)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def _child(*args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _baseline() -> int:
    code = (
        "import resource, one_peace, one_peace.convert; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="large")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--shard-size", default="1GB")
    p.add_argument("--workdir", help="where to write the files (default: a temporary folder, removed after)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src, dst = os.path.join(tmp, "official.pt"), os.path.join(tmp, "converted")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--_make", args.size, args.dtype, src], check=True)
        size = Path(src).stat().st_size
        print(
            f"synthetic official {args.size} checkpoint ({args.dtype}): {size / 2**30:.2f} GiB, written "
            f"in {time.perf_counter() - t0:.0f}s"
        )
        base = _baseline()
        conv = _child("--_convert", src, dst, args.shard_size)
        assert conv["rc"] == 0
        shards = sorted(f.name for f in Path(dst).iterdir() if f.suffix == ".safetensors")
        print(
            f"convert: {conv['seconds']:.1f}s, {size / 2**20 / conv['seconds']:.0f} MiB/s, "
            f"{len(shards)} shard(s) of <= {args.shard_size}"
        )
        print(
            f"  peak RSS {conv['peak_rss'] / 2**30:.2f} GiB = {conv['peak_rss'] / size:.2f} x checkpoint size "
            f"({(conv['peak_rss'] - base) / size:.2f} x above the {base / 2**20:.0f} MiB of an idle "
            f"interpreter with torch)"
        )
        load = _child("--_load", dst)
        print(
            f"load converted folder: {load['seconds']:.1f}s, peak RSS {load['peak_rss'] / 2**30:.2f} "
            f"GiB = {load['peak_rss'] / size:.2f} x"
        )
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("--_"):
        cmd, rest = sys.argv[1], sys.argv[2:]
        {"--_make": _make, "--_convert": _convert, "--_load": _load}[cmd](*rest)
    else:
        sys.exit(main())
