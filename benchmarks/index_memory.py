"""Peak memory of building an index over an embedding folder: RSS above the loaded corpus, against the budget.

An embedding folder of ``--n`` x ``--dim`` float16 vectors (clustered, unit length) is written in parts; then, in
a fresh process each:

* ``load``: ``EmbeddingStore.vectors()`` (the corpus as float32: what every build starts from);
* ``build``: ``build_index(corpus, kind, index_memory)`` (training on a sample, adding in chunks, tuning with
  exact ground truth from ``faiss.knn``), reporting peak RSS above the loaded corpus;
* ``--legacy FILE``: the same build with another version of ``one_peace/retrieval/faiss_index.py`` (e.g. the one
  before #22: ``git show 11b8f47:one_peace/retrieval/faiss_index.py > /tmp/old_faiss.py``), for the figure beside.

    python -m benchmarks.index_memory --n 1000000 --dim 256 --index-memory 64MB
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import PeakRSS, machine, rss_bytes


def write_folder(root: Path, n: int, dim: int, part: int = 100_000, seed: int = 0) -> None:
    """An embedding folder of ``n`` clustered unit vectors (float16 parts, ids only)."""
    from one_peace.retrieval.store import EmbeddingStore

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1024, dim)).astype(np.float32)
    store = EmbeddingStore(root)
    for p, start in enumerate(range(0, n, part)):
        m = min(part, n - start)
        x = centres[rng.integers(0, 1024, m)] + 0.5 * rng.normal(size=(m, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        store.write_part(p, x.astype(np.float16), [{"id": f"i{start + i}"} for i in range(m)], {"count": m, "bad": []})
    store.save_info({"format": 2, "modality": "image", "dim": dim, "model": {}, "sources": []})


def measure(root: str, kind: str, memory: str, module: str | None) -> dict[str, object]:
    """In this process: load the corpus, then build; RSS figures in MB."""
    from one_peace.retrieval.store import EmbeddingStore

    if module:
        spec = importlib.util.spec_from_file_location("legacy_faiss_index", module)
        assert spec is not None and spec.loader is not None
        lib = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = lib  # dataclasses look their module up
        spec.loader.exec_module(lib)
        build = lib.build_index
    else:
        from one_peace.retrieval.faiss_index import build_index as build
    base = rss_bytes()
    with PeakRSS() as load_peak:
        corpus = EmbeddingStore(root).vectors()
    loaded = rss_bytes()
    t0 = time.perf_counter()
    with PeakRSS() as build_peak:
        _, report = build(corpus, kind, memory)
    return {
        "corpus_mb": round(corpus.nbytes / 1e6, 1),
        "load_peak_above_start_mb": round((load_peak.peak - base) / 1e6, 1),
        "build_peak_above_loaded_mb": round((build_peak.peak - loaded) / 1e6, 1),
        "index_mb": round(report.memory_bytes / 1e6, 1),
        "factory": report.factory,
        "recall_at_10": report.recall_at_10,
        "build_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--kind", default="ivfpq")
    ap.add_argument("--index-memory", default="64MB")
    ap.add_argument("--legacy", default=None, help="another faiss_index.py to measure beside")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        module = None if args.child[1] == "-" else args.child[1]
        print(json.dumps(measure(args.child[0], args.kind, args.index_memory, module)))
        return
    with tempfile.TemporaryDirectory(prefix="one-peace-index-memory-") as tmp:
        write_folder(Path(tmp), args.n, args.dim)
        out = {"machine": machine(), "n": args.n, "dim": args.dim, "index_memory": args.index_memory}
        runs = [("current", "-")] + ([("legacy", args.legacy)] if args.legacy else [])
        for name, module in runs:
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.index_memory",
                "--kind",
                args.kind,
                "--index-memory",
                args.index_memory,
                "--child",
                tmp,
                module,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            out[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(name, out[name], file=sys.stderr)
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
