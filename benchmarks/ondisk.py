"""On-disk index build at scale, simulated: ``--n`` synthetic vectors (default 1e7 x 64) generated chunk by chunk
(never whole in memory or on disk), with clusters and a modality gap (queries come from another region of the space
than the corpus, as text queries against images do), built by :func:`one_peace.retrieval.ondisk.build_ondisk`.

Reports build time per stage, peak memory of the process and its workers (anonymous = the process's own memory;
file = pages of memory-mapped files, which the kernel may drop), index size, and 10-recall@10 against exact search
(streamed over the chunks) on held-out queries at two or more ``nprobe`` values.

    python -m benchmarks.ondisk                       # 1e7 x 64, 256 MB budget, 2 workers (~10 minutes)
    python -m benchmarks.ondisk --n 200000 --chunk 50000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from one_peace.retrieval.ondisk import build_ondisk, exact_top_k_streaming, read_ondisk, tune


@dataclass
class SyntheticChunks:
    """``n`` unit vectors of dimension ``dim`` around ``clusters`` centres, chunk ``i`` generated from seed
    ``(seed, i)`` (the same chunk every time it is asked for, in any process)."""

    n: int
    dim: int = 64
    chunk_rows: int = 100_000
    clusters: int = 1000
    noise: float = 1.0
    seed: int = 0

    def __len__(self) -> int:
        return -(-self.n // self.chunk_rows)

    @property
    def rows(self) -> int:
        return self.n

    def sizes(self) -> list[int]:
        return [min(self.chunk_rows, self.n - i * self.chunk_rows) for i in range(len(self))]

    def centres(self) -> np.ndarray:
        c = np.random.default_rng(self.seed).standard_normal((self.clusters, self.dim)).astype(np.float32)
        return c / np.linalg.norm(c, axis=1, keepdims=True)

    def chunk(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.sizes()[i]
        rng = np.random.default_rng((self.seed, i))
        x = self.centres()[rng.integers(0, self.clusters, rows)] + self.noise * rng.standard_normal(
            (rows, self.dim)
        ) / np.sqrt(self.dim).astype(np.float32)
        x = x.astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return np.arange(i * self.chunk_rows, i * self.chunk_rows + rows, dtype=np.int64), x

    def queries(self, count: int) -> np.ndarray:
        """Held-out queries near the clusters, shifted by a common offset (the modality gap), normalised."""
        rng = np.random.default_rng((self.seed, 10**9))
        gap = rng.standard_normal(self.dim).astype(np.float32)
        gap *= 0.6 / np.linalg.norm(gap)
        q = (
            self.centres()[rng.integers(0, self.clusters, count)]
            + gap
            + self.noise * rng.standard_normal((count, self.dim)).astype(np.float32) / np.sqrt(self.dim)
        )
        q = q.astype(np.float32)
        return q / np.linalg.norm(q, axis=1, keepdims=True)


def _memory(pids: list[int]) -> tuple[int, int]:
    anon = file = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    anon += int(line.split()[1]) * 1024
                elif line.startswith("RssFile:") or line.startswith("RssShmem:"):
                    file += int(line.split()[1]) * 1024
        except OSError:
            pass
    return anon, file


class PeakTree:
    """Peak anonymous and file-backed resident memory of this process and its children (sampled every 50 ms)."""

    def __enter__(self) -> PeakTree:
        import os

        self.base = _memory([os.getpid()])[0]
        self.peak_anon = self.peak_file = self.peak_main = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        import os

        me = os.getpid()
        while not self._stop.is_set():
            try:
                kids = [int(p) for p in Path(f"/proc/{me}/task/{me}/children").read_text().split()]
            except OSError:
                kids = []
            anon, file = _memory([me, *kids])
            self.peak_anon, self.peak_file = max(self.peak_anon, anon), max(self.peak_file, file)
            self.peak_main = max(self.peak_main, _memory([me])[0])
            time.sleep(0.05)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


class _StdoutToStderr:
    """FAISS's C++ code prints progress to file descriptor 1: send it to stderr (stdout is the JSON)."""

    def __enter__(self) -> None:
        import os

        sys.stdout.flush()
        self.saved = os.dup(1)
        os.dup2(2, 1)

    def __exit__(self, *exc: Any) -> None:
        import os

        sys.stdout.flush()
        os.dup2(self.saved, 1)
        os.close(self.saved)


def main(argv: list[str] | None = None) -> int:
    """Run the simulation and print JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=100_000)
    p.add_argument("--memory", default="256MB")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--queries", type=int, default=200)
    args = p.parse_args(argv)
    source = SyntheticChunks(args.n, args.dim, args.chunk)
    queries = source.queries(args.queries)
    with tempfile.TemporaryDirectory(prefix="one-peace-ondisk-") as tmp, _StdoutToStderr():
        with PeakTree() as mem:
            t0 = time.perf_counter()
            report = build_ondisk(source, tmp, memory=args.memory, workers=args.workers)
            build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        truth = exact_top_k_streaming(source, queries, 10)
        exact_s = time.perf_counter() - t0
        index = read_ondisk(tmp)
        half = len(queries) // 2
        chosen, tuning = tune(index, queries[:half], truth[:half])
        from one_peace.retrieval.faiss_index import recall_at_k, set_search_params

        held: dict[str, float] = {}
        for nprobe in (1, 16, 64, 256):
            set_search_params(index, {"nprobe": nprobe})
            t0 = time.perf_counter()
            found = index.search(queries[half:], 10)[1]
            ms = (time.perf_counter() - t0) * 1e3 / (len(queries) - half)
            held[str(nprobe)] = {
                "recall_at_10": round(recall_at_k(found, truth[half:]), 4),
                "ms_per_query": round(ms, 2),
            }
    out = {
        "n": args.n,
        "dim": args.dim,
        "chunk_rows": args.chunk,
        "memory_budget": args.memory,
        "workers": args.workers,
        "build_seconds": round(build_s, 1),
        "stages_seconds": {
            "train": round(report.train_s, 1),
            "fill": round(report.fill_s, 1),
            "merge": round(report.merge_s, 1),
        },
        "factory": report.factory,
        "blocks": report.blocks,
        "block_rows": report.block_rows,
        "train_points": report.train_points,
        "peak_anon_mb_above_start_main": round((mem.peak_main - mem.base) / 2**20, 1),
        "peak_anon_mb_above_start_workers": [round(b / 2**20, 1) for b in report.worker_peak_bytes],
        "peak_anon_mb_tree_incl_worker_imports": round(mem.peak_anon / 2**20, 1),
        "peak_file_backed_mb": round(mem.peak_file / 2**20, 1),
        "index_mb": round(report.index_bytes / 2**20, 1),
        "ivfdata_mb": round(report.ivfdata_bytes / 2**20, 1),
        "raw_vectors_mb_never_held": round(args.n * args.dim * 4 / 2**20, 1),
        "exact_ground_truth_seconds": round(exact_s, 1),
        "tuned_nprobe_for_0.95": chosen,
        "tuning_recall": tuning,
        "held_out": held,
    }
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
