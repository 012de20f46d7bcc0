"""Indexes larger than one machine's memory: (OPQ +) IVF-PQ trained on a sample, filled by parallel workers in
blocks of bounded size, and merged on disk into one inverted-list file that searches memory-map.

The build never holds the corpus: vectors arrive in chunks from a :class:`ChunkSource` (an embedding folder's
parts, or generated chunks), each worker adds its chunks to a copy of the trained (empty) index and writes a block
whenever the block reaches its share of the memory budget, and FAISS's ``merge_ondisk`` joins the blocks' inverted
lists into ``index.ivfdata`` beside ``index.faiss`` (the index file holds the coarse quantiser, the codebooks and
the list offsets; the codes and ids stay in the ``.ivfdata`` file, memory-mapped when the index is read).

Memory: the training sample (``train_points`` rows of ``d`` floats), one chunk per worker, one block per worker
(``block_rows`` codes + ids), FAISS's scratch. The merge writes through a memory map: the pages it touches are file
pages the kernel may drop, not the process's own memory (``benchmarks/ondisk.py`` reports both).

    python -m one_peace.retrieval.ondisk out=index/photos index_memory=2GB workers=4
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from one_peace.retrieval.faiss_index import (
    NPROBES,
    _quick_pq_training,
    faiss,
    parse_memory,
    recall_at_k,
    release_memory,
    set_search_params,
    train_in_stages,
)

INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"


class ChunkSource(Protocol):
    """Where an on-disk build reads its vectors: numbered chunks of ``(ids int64 (n,), vectors float32 (n, d))``.
    Picklable (workers are separate processes)."""

    dim: int
    rows: int  # vectors over all chunks (plans the index before any chunk is read)

    def __len__(self) -> int: ...

    def chunk(self, i: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class FolderChunks:
    """An embedding folder's finished parts as chunks; ids are row numbers in index order."""

    root: str
    dim: int = 0
    rows: int = 0
    parts: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        from one_peace.retrieval.store import EmbeddingStore

        store = EmbeddingStore(self.root)
        self.parts = store.part_numbers()
        self.offsets, total = [], 0
        for p in self.parts:
            self.offsets.append(total)
            total += len(np.load(store.root / "embeddings" / f"{store.part_name(p)}.npy", mmap_mode="r"))
        self.rows = total
        self.dim = int(store.info().get("dim", 0))

    def __len__(self) -> int:
        return len(self.parts)

    def chunk(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Part ``i``'s vectors (float32) and their row numbers."""
        from one_peace.retrieval.store import EmbeddingStore

        store = EmbeddingStore(self.root)
        x = np.asarray(np.load(store.root / "embeddings" / f"{store.part_name(self.parts[i])}.npy"), dtype=np.float32)
        return np.arange(self.offsets[i], self.offsets[i] + len(x), dtype=np.int64), np.ascontiguousarray(x)


@dataclass
class OnDiskReport:
    """What an on-disk build did (sizes in bytes, times in seconds)."""

    factory: str
    nlist: int
    vectors: int = 0
    blocks: int = 0
    workers: int = 1
    block_rows: int = 0
    train_points: int = 0
    train_s: float = 0.0
    fill_s: float = 0.0
    merge_s: float = 0.0
    index_bytes: int = 0
    ivfdata_bytes: int = 0
    search_params: dict[str, int] = field(default_factory=dict)
    recall_at_10: dict[str, float] = field(default_factory=dict)
    worker_peak_bytes: list[int] = field(default_factory=list)
    on_disk: bool = True

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly dict (what ``info.json`` records under ``index``)."""
        return asdict(self)


def plan(n: int, d: int, budget: int, workers: int = 1) -> tuple[str, int, int, int]:
    """``(factory, nlist, train points, block rows)`` for ``n`` vectors of dimension ``d`` under ``budget`` bytes.

    PQ with ``d/2`` bytes per code (8 to 64, a divisor of ``d``: 1e9 vectors take 72 GB with their ids at 64) after an
    OPQ rotation; a training sample within a
    quarter of the budget, at most 39 points per list; ``nlist`` ~ 4 sqrt(n), a power of two from 256 to 65,536, and
    no more lists than the sample trains (39 points each, so k-means does not run short); each worker's block gets an
    equal share of half of the budget (codes + 8-byte ids).
    """
    wanted = int(min(65536, max(256, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(max(n, 1))))))))
    m = max(8, min(64, d // 2))
    while d % m:
        m -= 1
    points = int(min(n, 39 * wanted, max(39 * 256, budget // 4 // (4 * d))))
    nlist = max(256, min(wanted, 2 ** int(math.log2(max(1, points // 39)))))
    block = max(8192, budget // 2 // max(1, workers) // (m + 8))
    return f"OPQ{m},IVF{nlist},PQ{m}", nlist, points, block


def sample_rows(source: ChunkSource, size: int, seed: int = 0) -> np.ndarray:
    """``size`` vectors drawn evenly across the chunks (each chunk read once; at most ``size`` rows held)."""
    rng = np.random.default_rng(seed)
    n = len(source)
    per = [size // n + (1 if i < size % n else 0) for i in range(n)]
    out = np.empty((size, source.dim), dtype=np.float32)
    at = 0
    for i in range(n):
        if per[i] == 0:
            continue
        _, x = source.chunk(i)
        take = min(per[i], len(x))
        out[at : at + take] = x[np.sort(rng.choice(len(x), size=take, replace=False))]
        at += take
    return out[:at]


def anon_rss() -> int:
    """This process's anonymous resident memory in bytes (its own pages, not memory-mapped files; 0 off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _fill(args: tuple[str, ChunkSource, list[int], int, str]) -> tuple[list[str], int, int]:
    """A worker: add chunks to copies of the trained index, writing a block every ``block_rows`` rows. Returns the
    blocks and the worker's anonymous memory at its start and at its peak (sampled after every add)."""
    trained_path, source, chunks, block_rows, prefix = args
    fs = faiss()
    start = peak = anon_rss()
    written: list[str] = []
    index = None

    def flush() -> None:
        nonlocal index
        if index is not None and index.ntotal:
            path = f"{prefix}-{len(written):05d}.index"
            fs.write_index(index, path)
            written.append(path)
        index = None
        release_memory()

    for i in chunks:
        ids, x = source.chunk(i)
        for at in range(0, len(x), 8192):
            if index is None:
                index = fs.read_index(trained_path)
            index.add_with_ids(x[at : at + 8192], ids[at : at + 8192])
            peak = max(peak, anon_rss())
            if index.ntotal >= block_rows:
                flush()
        del ids, x
    flush()
    return written, start, peak


def build_ondisk(
    source: ChunkSource,
    out_dir: str | Path,
    memory: int | str = "4GB",
    workers: int = 1,
    seed: int = 0,
    nlist: int | None = None,
) -> OnDiskReport:
    """Build ``index.faiss`` + ``index.ivfdata`` in ``out_dir`` from ``source`` (see the module docstring).

    Args:
        source: The vectors, in chunks.
        out_dir: Where the index files go (existing ones are replaced once the new ones are complete).
        memory: The budget the build stays within (plus one chunk per worker and FAISS's scratch).
        workers: Processes adding chunks in parallel (1: in this process).
        seed: Seed of the training sample.
        nlist: Inverted lists (default: :func:`plan`'s).
    """
    import multiprocessing

    from faiss.contrib.ondisk import merge_ondisk

    fs = faiss()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    budget = parse_memory(memory)
    d = source.dim
    factory, planned, points, block_rows = plan(source.rows, d, budget, workers)
    if nlist is not None:
        factory, planned = factory.replace(f"IVF{planned}", f"IVF{nlist}"), nlist
    report = OnDiskReport(factory, planned, workers=workers, block_rows=block_rows, train_points=points)
    work = Path(out) / ".ondisk-build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        t0 = time.perf_counter()
        index = fs.index_factory(d, factory, fs.METRIC_INNER_PRODUCT)
        _quick_pq_training(index)
        sample = sample_rows(source, points, seed)
        train_in_stages(index, sample, len(sample), np.random.default_rng(seed))
        del sample
        release_memory()
        trained = str(work / "trained.index")
        fs.write_index(index, trained)
        report.train_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        jobs = [
            (trained, source, list(range(w, len(source), workers)), block_rows, str(work / f"w{w}"))
            for w in range(workers)
        ]
        if workers > 1:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                results = pool.map(_fill, jobs)
        else:
            results = [_fill(jobs[0])]
        blocks = [b for got, _, _ in results for b in got]
        report.worker_peak_bytes = [peak - start for _, start, peak in results]
        report.fill_s = time.perf_counter() - t0
        report.blocks = len(blocks)

        t0 = time.perf_counter()
        merged = fs.read_index(trained)
        ivfdata = work / IVFDATA_FILE
        merge_ondisk(merged, blocks, str(ivfdata))
        report.vectors = int(merged.ntotal)
        fs.write_index(merged, str(work / INDEX_FILE))
        del merged
        release_memory()
        for b in blocks:
            os.unlink(b)
        os.replace(ivfdata, out / IVFDATA_FILE)  # the index names the data file by its name (same folder)
        os.replace(work / INDEX_FILE, out / INDEX_FILE)
        report.merge_s = time.perf_counter() - t0
        report.index_bytes = (out / INDEX_FILE).stat().st_size
        report.ivfdata_bytes = (out / IVFDATA_FILE).stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def read_ondisk(folder: str | Path) -> Any:
    """The index of ``folder`` with its inverted lists memory-mapped from ``index.ivfdata`` beside it."""
    fs = faiss()
    return fs.read_index(str(Path(folder) / INDEX_FILE), fs.IO_FLAG_ONDISK_SAME_DIR)


def exact_top_k_streaming(source: ChunkSource, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact inner-product top-``k`` ids of ``queries`` over every chunk (one chunk in memory at a time)."""
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for i in range(len(source)):
        ids, x = source.chunk(i)
        scores = queries @ x.T
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        s = np.take_along_axis(scores, top, 1)
        all_s, all_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, ids[top]], 1)
        order = np.argsort(-all_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)
    return best_i


def tune(index: Any, queries: np.ndarray, truth: np.ndarray, target: float = 0.95) -> tuple[dict[str, int], dict]:
    """The smallest ``nprobe`` reaching ``target`` 10-recall@10 on ``queries`` (else the best), and the recall
    at every ``nprobe`` tried."""
    nlist = int(faiss().extract_index_ivf(index).nlist)
    tried: dict[str, float] = {}
    chosen = {"nprobe": 1}
    for nprobe in (p for p in NPROBES if p <= nlist):
        set_search_params(index, {"nprobe": nprobe})
        tried[str(nprobe)] = recall_at_k(index.search(queries, truth.shape[1])[1], truth)
        chosen = {"nprobe": nprobe}
        if tried[str(nprobe)] >= target:
            break
    set_search_params(index, chosen)
    return chosen, tried


def build_for_folder(
    root: str | Path,
    memory: int | str = "4GB",
    workers: int = 1,
    queries: np.ndarray | None = None,
    target: float = 0.95,
) -> dict[str, Any]:
    """Build the on-disk index of an embedding folder (from its parts, never all of them in memory), tune its
    ``nprobe`` on ``queries`` (vectors of the query modality; else corpus vectors) against exact search, and record
    it in ``info.json`` where ``search``, ``open_index`` and the page find it."""
    from one_peace.retrieval.store import EmbeddingStore, write_json_atomic

    store = EmbeddingStore(root)
    info = store.info()
    if not info or any(not s.get("complete") for s in info.get("sources", [])):
        raise ValueError(f"{root}: not a finished embedding folder (run python -m one_peace.embed ... mode=resume)")
    source = FolderChunks(str(root))
    if not len(source):
        raise ValueError(f"{root}: no embedded parts")
    report = build_ondisk(source, store.root / ".ondisk", memory=memory, workers=workers)
    tuned_on = "queries" if queries is not None and len(queries) else "corpus"
    if queries is None or not len(queries):
        queries = sample_rows(source, min(1000, report.vectors), seed=1)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    truth = exact_top_k_streaming(source, queries, min(10, report.vectors))
    index = read_ondisk(store.root / ".ondisk")
    half = max(1, len(queries) // 2)
    report.search_params, tried = tune(index, queries[:half], truth[:half], target)
    held = queries[half:] if len(queries) > 1 else queries
    found = index.search(held, truth.shape[1])[1]
    report.recall_at_10 = {**tried, "held_out": recall_at_k(found, truth[half:] if len(queries) > 1 else truth)}
    del index
    for name in (IVFDATA_FILE, INDEX_FILE):  # the data file first: the index (index.faiss, as always) names it
        os.replace(store.root / ".ondisk" / name, store.root / name)
    shutil.rmtree(store.root / ".ondisk", ignore_errors=True)
    info["index"] = {
        **report.to_json(),
        "recall_at_10": report.recall_at_10["held_out"],
        "tuning": tried,
        "tuned_on": tuned_on,
        "memory_bytes": report.index_bytes + report.ivfdata_bytes,
    }
    write_json_atomic(store.info_path, info)
    return dict(info["index"])


@dataclass
class OnDiskConfig:
    """Build the on-disk (memory-mapped) index of an embedding folder: for corpora whose index does not fit memory.

    Attributes:
        out: The embedding folder (embed it with ``index=none``, or replace its in-memory index).
        index_memory: The memory budget of the build (``4GB``, ``512MB``...).
        workers: Processes filling the index in parallel.
        index_queries: A ``.npy`` of query-modality vectors to tune ``nprobe`` on (default: corpus vectors).
        target: The 10-recall@10 the tuned ``nprobe`` must reach (the largest one tried when none does).
    """

    out: str = "???"
    index_memory: str = "4GB"
    workers: int = 1
    index_queries: str | None = None
    target: float = 0.95


def main(argv: list[str] | None = None) -> int:
    """``python -m one_peace.retrieval.ondisk out=FOLDER [index_memory=4GB] [workers=N]``."""
    import json

    from one_peace.cli import parse

    cfg = parse(OnDiskConfig, argv, "python -m one_peace.retrieval.ondisk")
    queries = np.load(cfg.index_queries, allow_pickle=False) if cfg.index_queries else None
    try:
        report = build_for_folder(cfg.out, cfg.index_memory, cfg.workers, queries, cfg.target)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps({k: report[k] for k in ("factory", "vectors", "search_params", "recall_at_10", "memory_bytes")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
