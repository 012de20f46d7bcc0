"""FAISS index choice, training, tuning and recall measurement (inner product on L2-normalised vectors).

``index=auto`` follows autofaiss's idea with our own rules: exact search (``Flat``) under
:data:`FLAT_LIMIT` items; beyond that, the most accurate of HNSW, IVF + 8-bit scalar quantisation and
(OPQ +) IVF + product quantisation whose estimated size fits the memory budget, trained on a sample, with its
search parameter (``efSearch`` / ``nprobe``) tuned to the smallest value that reaches the target
10-recall@10 (the fraction of the exact top-10 found in the index's top-10, over query vectors sampled from the
corpus, ground truth by exact search). A candidate that cannot reach the target at its largest parameter gives
way to the next; when none does, the best one found is kept and a warning says so.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from one_peace.extras import require

logger = logging.getLogger(__name__)

FLAT_LIMIT = 100_000
TARGET_RECALL = 0.95
KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq", "none")
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024)
HNSW_M = 32


def faiss() -> Any:
    """The ``faiss`` module (the ``retrieval`` extra), with a clear error when it is missing."""
    require("retrieval", "faiss", feature="building and searching FAISS indexes")
    import faiss as _faiss

    return _faiss


def parse_memory(value: str | int | float) -> int:
    """Bytes of ``"4GB"``, ``"512MB"``, ``"32MiB"``, ``"1.5G"`` or a number of bytes."""
    if isinstance(value, int | float):
        return int(value)
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(value))
    if not m:
        raise ValueError(f"index_memory: expected a size like 4GB or 512MB, got {value!r}")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    return int(number * base ** " KMGT".index(unit or " "))


@dataclass
class IndexReport:
    """What was built: the factory string, its search parameter, measured recall and latency, size.

    ``recall_at_10`` is measured on held-out queries that did not choose the search parameter (``recall_queries`` of
    them); ``tuned_on`` says what the queries were: ``"queries"`` (vectors of the query modality: cross-modal
    retrieval) or ``"corpus"`` (corpus vectors, when no query vectors were given).
    """

    factory: str
    metric: str = "inner_product"
    search_params: dict[str, int] = field(default_factory=dict)
    recall_at_10: float | None = None
    recall_queries: int = 0
    tuned_on: str = "corpus"
    tuning_recall_at_10: float | None = None
    tuning_queries: int = 0
    latency_ms: float | None = None
    memory_bytes: int = 0
    estimated_bytes: int = 0
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (for ``info.json``)."""
        return asdict(self)


#: training vectors at least, whatever the budget: 64 per list for 1,024 IVF lists. 40,960 (40 per list; FAISS's
#: k-means asks for 39) held 25 MB less at the build's peak, but the 200k x 256 / 32 MB build fell to 0.950 recall
MIN_TRAIN_POINTS = 65_536


def train_points(d: int, budget: int) -> int:
    """Training vectors a build uses at most: :data:`MIN_TRAIN_POINTS`, or more when a quarter of the memory budget
    holds more (:func:`train_in_stages` holds the sample once, with the coarse quantiser's scratch beside it). The
    same at any corpus size: the build's memory does not grow with the corpus."""
    return int(max(MIN_TRAIN_POINTS, budget // (4 * d * 4)))


def _nlist(n: int, points: int | None = None) -> int:
    """IVF lists: about ``4 sqrt(n)``, a power of two, with at least 39 training points each (of ``n``, and of the
    ``points`` the budget lets training use)."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** max(0, round(math.log2(target)))
    most = min(n, points if points is not None else n) // 39
    if most >= 1:
        most = 2 ** int(math.log2(most))  # a power of two at most the cap
    return int(max(1, min(nlist, most)))


def candidates(n: int, d: int, budget: int, kind: str = "auto") -> list[tuple[str, int]]:
    """``(factory, estimated bytes)`` to try, most accurate first, of those whose estimate fits ``budget``.

    ``kind="flat"`` / ``"hnsw"`` / ``"ivf"`` (IVF + 8-bit scalar quantisation) / ``"ivfpq"`` forces that family
    (the budget then picks the PQ size).
    """
    nlist = _nlist(n, train_points(d, budget))
    ivf_over = nlist * d * 4 + n * 8  # centroids + 64-bit ids in the inverted lists
    flat = ("Flat", n * d * 4)
    hnsw = (f"HNSW{HNSW_M},Flat", n * (d * 4 + HNSW_M * 2 * 4 + 16))
    sq8 = (f"IVF{nlist},SQ8", n * d + ivf_over)
    pqs = []
    for m in (d // 2, d // 4, d // 8, d // 16, d // 32):
        if m >= 4 and d % m == 0:
            opq = m < d // 4  # a rotation helps when each sub-quantiser covers many dimensions
            factory = (f"OPQ{m}," if opq else "") + f"IVF{nlist},PQ{m}"
            pqs.append((factory, n * m + ivf_over + (d * d * 4 if opq else 0) + 256 * d * 4))
    if kind == "flat":
        return [flat]
    if kind == "hnsw":
        return [hnsw]
    if kind == "ivf":
        return [sq8]
    if kind == "ivfpq":
        fitting = [c for c in pqs if c[1] <= budget]
        return fitting or pqs[-1:]
    if n < FLAT_LIMIT:
        return [flat]
    fitting = [c for c in (hnsw, sq8, *pqs) if c[1] <= budget]
    return fitting or pqs[-1:]


def exact_top_k(corpus: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """``(Q, k)`` positions of the exact top-``k`` by inner product (FAISS brute force over the corpus in place: no
    copy of it into a flat index)."""
    fs = faiss()
    xb = np.ascontiguousarray(corpus, dtype=np.float32)
    xq = np.ascontiguousarray(queries, dtype=np.float32)
    if len(xq) == 0 or len(xb) == 0:
        return np.zeros((len(xq), k), dtype=np.int64)
    return fs.knn(xq, xb, k, metric=fs.METRIC_INNER_PRODUCT)[1]  # type: ignore[no-any-return]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` that appears in the same row of ``found``."""
    hits = [len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 0.0


def _param_name(factory: str) -> str | None:
    if factory.startswith("HNSW"):
        return "efSearch"
    if "IVF" in factory:
        return "nprobe"
    return None


def set_search_params(index: Any, params: dict[str, int]) -> None:
    """Apply ``{"nprobe": n}`` or ``{"efSearch": n}`` to an index (any wrapping)."""
    if params:
        fs = faiss()
        ps = fs.ParameterSpace()
        for name, value in params.items():
            ps.set_index_parameter(index, name, int(value))


def _timed_search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    _, ids = index.search(queries, k)
    return ids, (time.perf_counter() - t0) * 1e3 / max(1, len(queries))


def build_index(
    vectors: np.ndarray,
    kind: str = "auto",
    memory: int | str = "4GB",
    target: float = TARGET_RECALL,
    queries: int = 1000,
    train_size: int = MIN_TRAIN_POINTS,
    seed: int = 0,
    query_vectors: np.ndarray | None = None,
) -> tuple[Any, IndexReport]:
    """Build (and tune) an inner-product index over ``vectors (N, D)``; returns the index and what was done.

    The search parameter is tuned on half of the tuning queries and the recall reported is measured on the other
    half. Tuning queries are ``query_vectors`` (vectors of the modality that will query the index: text queries
    against images sit in another region of the space than the images themselves) when given, else corpus vectors.
    """
    fs = faiss()
    if kind not in KINDS or kind == "none":
        raise ValueError(f"index: expected one of {[k for k in KINDS if k != 'none']}, got {kind!r}")
    xb = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = xb.shape
    budget = parse_memory(memory)
    rng = np.random.default_rng(seed)
    if query_vectors is not None and len(query_vectors):
        pool = np.ascontiguousarray(query_vectors, dtype=np.float32)
        if pool.ndim != 2 or pool.shape[1] != d:
            raise ValueError(f"index queries have shape {tuple(pool.shape)}; the corpus vectors have dimension {d}")
        tuned_on = "queries"
    else:
        pool, tuned_on = xb, "corpus"
    picked = pool[rng.choice(len(pool), size=min(2 * queries, len(pool)), replace=False)] if len(pool) else pool
    half = max(1, len(picked) // 2) if len(picked) > 1 else len(picked)
    xq_tune, xq_held = picked[:half], (picked[half:] if len(picked) > 1 else picked)
    k = min(10, n)
    truth_tune = exact_top_k(xb, xq_tune, k) if n else np.zeros((0, 10), dtype=np.int64)
    truth_held = exact_top_k(xb, xq_held, k) if n else np.zeros((0, 10), dtype=np.int64)
    tried: list[dict[str, Any]] = []
    best: tuple[Any, IndexReport] | None = None
    for factory, estimate in candidates(n, d, budget, kind):
        t0 = time.perf_counter()
        index = fs.index_factory(d, factory, fs.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            _quick_pq_training(index)
            lists = _nlist(n, train_points(d, budget)) if "IVF" in factory else 0
            train_in_stages(index, xb, min(n, train_points(d, budget), max(train_size, 39 * lists)), rng)
        add_in_chunks(index, xb)
        release_memory()
        built_s = time.perf_counter() - t0
        report = IndexReport(factory, estimated_bytes=int(estimate), tuned_on=tuned_on)
        report.memory_bytes = serialized_bytes(index)
        name = _param_name(factory)
        values: tuple[int, ...] = NPROBES if name == "nprobe" else EF_SEARCH if name == "efSearch" else (0,)
        if name == "nprobe":
            values = tuple(v for v in values if v <= _ivf_lists(index)) or (1,)
        reached = False
        for value in values:
            params = {name: value} if name else {}
            set_search_params(index, params)
            found, latency = _timed_search(index, xq_tune, k)
            recall = recall_at_k(found, truth_tune)
            report.search_params, report.tuning_recall_at_10, report.latency_ms = params, recall, latency
            if recall >= target:
                reached = True
                break
        report.tuning_queries = len(xq_tune)
        report.recall_at_10 = recall_at_k(index.search(xq_held, k)[1], truth_held) if len(xq_held) else None
        report.recall_queries = len(xq_held)
        tried.append(
            {
                "factory": factory,
                "estimated_bytes": int(estimate),
                "recall_at_10": report.recall_at_10,
                "search_params": report.search_params,
                "build_s": round(built_s, 2),
            }
        )
        logger.info("index %s: 10-recall@10 %.3f with %s", factory, report.recall_at_10 or 0, report.search_params)
        if best is None or (report.tuning_recall_at_10 or 0) > (best[1].tuning_recall_at_10 or 0):
            best = (index, report)
        if reached:
            best = (index, report)
            break
        if "PQ" in factory:  # the remaining candidates are smaller PQ codes: they cannot do better
            break
    assert best is not None
    index, report = best
    set_search_params(index, report.search_params)
    report.candidates = tried
    if (report.tuning_recall_at_10 or 0) < target:
        logger.warning(
            "no index within %s reached 10-recall@10 %.2f; kept %s at %.3f (raise index_memory for more)",
            memory,
            target,
            report.factory,
            report.tuning_recall_at_10 or 0,
        )
    return index, report


#: vectors added to an index at once (the add of a whole corpus holds its temporary buffers at once)
ADD_CHUNK = 8_192


def add_in_chunks(index: Any, vectors: np.ndarray, chunk: int | None = None) -> None:
    """``index.add`` in chunks of ``chunk`` rows (default :data:`ADD_CHUNK`: bounded temporary memory for encoding)."""
    chunk = chunk or ADD_CHUNK
    for start in range(0, len(vectors), chunk):
        index.add(np.ascontiguousarray(vectors[start : start + chunk], dtype=np.float32))
        release_memory()  # the chunk's scratch, freed between the growing lists, would otherwise stay resident


#: vectors an OPQ rotation is learnt from
OPQ_TRAIN_POINTS = 9_984


def release_memory() -> None:
    """Hand freed heap back to the operating system (glibc's ``malloc_trim``; nothing elsewhere).

    FAISS's OpenMP threads free their training and encoding buffers into per-thread heaps that glibc keeps resident:
    without this, each build stage's scratch memory stays and adds to the next stage's peak.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def serialized_bytes(index: Any) -> int:
    """Bytes of ``index`` as written to disk, counted as it streams (no serialised copy held in memory)."""
    fs = faiss()
    total = 0

    def count(chunk: bytes) -> int:
        nonlocal total
        total += len(chunk)
        return len(chunk)

    writer = fs.PyCallbackIOWriter(count)
    fs.write_index(index, writer)
    del writer  # flushes its buffer
    return total


def train_in_stages(index: Any, vectors: np.ndarray, size: int, rng: np.random.Generator) -> None:
    """Train ``index`` on ``size`` rows of ``vectors``, one stage at a time, holding one copy of the sample.

    ``IndexPreTransform.train`` holds the raw sample and its transformed copy at once, and an OPQ rotation learnt
    from the whole sample copies it several times. Here each transform of the chain learns from its own small
    sample (:data:`OPQ_TRAIN_POINTS` rows, drawn and freed first); the index's sample is then gathered straight
    into the transformed space, in chunks, and the inner index (IVF coarse quantiser and codes) trains on it.
    """
    fs = faiss()
    n = len(vectors)
    outer = fs.downcast_index(index)
    chain: list[Any] = []
    inner = outer
    if isinstance(outer, fs.IndexPreTransform):
        chain = [fs.downcast_VectorTransform(outer.chain.at(i)) for i in range(outer.chain.size())]
        inner = fs.downcast_index(outer.index)

    def gather(rows: np.ndarray, through: list[Any], width: int) -> np.ndarray:
        out = np.empty((len(rows), width), dtype=np.float32)
        for start in range(0, len(rows), ADD_CHUNK):
            x = np.ascontiguousarray(vectors[rows[start : start + ADD_CHUNK]], dtype=np.float32)
            for transform in through:
                x = transform.apply(x)
            out[start : start + len(x)] = x
        return out

    for i, transform in enumerate(chain):
        if not transform.is_trained:
            few = min(n, int(getattr(transform, "max_train_points", 0) or size), size)
            rows = np.sort(rng.choice(n, size=few, replace=False))
            transform.train(gather(rows, chain[:i], int(transform.d_in)))
            release_memory()
    rows = np.sort(rng.choice(n, size=size, replace=False))
    sample = gather(rows, chain, int(inner.d))
    del rows
    inner.train(sample)
    del sample
    outer.is_trained = True
    release_memory()


def _quick_pq_training(index: Any) -> None:
    """PQ training without polysemous re-ordering (minutes on 2 cores, only useful for Hamming filtering) and
    with 39 points per centroid and 10 k-means iterations per sub-quantiser (a 10x faster training whose recall
    was within 0.005 of the defaults on a clustered 200k x 256 corpus); an OPQ rotation learnt from at most
    :data:`OPQ_TRAIN_POINTS` vectors (its training copies its sample several times: learnt from the whole 65,536 x 256
    sample it added 345 MB to the build's peak)."""
    fs = faiss()
    chain = getattr(fs.downcast_index(index), "chain", None)
    if chain is not None:
        for i in range(chain.size()):
            transform = fs.downcast_VectorTransform(chain.at(i))
            if hasattr(transform, "max_train_points") and hasattr(transform, "niter_pq"):  # an OPQMatrix
                transform.max_train_points = OPQ_TRAIN_POINTS
    try:
        ivf = fs.downcast_index(fs.extract_index_ivf(index))
    except RuntimeError:
        return
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False
    pq = getattr(ivf, "pq", None)
    if pq is not None:
        pq.cp.max_points_per_centroid = 39
        pq.cp.niter = 10


def _ivf_lists(index: Any) -> int:
    fs = faiss()
    try:
        return int(fs.extract_index_ivf(index).nlist)
    except RuntimeError:
        return max(NPROBES)


def save_index(index: Any, path: str) -> None:
    """Write ``index`` to ``path`` atomically (a temporary file, then a rename)."""
    import os

    tmp = f"{path}.tmp"
    faiss().write_index(index, tmp)
    os.replace(tmp, path)


def load_index(path: str, params: dict[str, int] | None = None) -> Any:
    """Read an index written by :func:`save_index` (or an on-disk one, whose inverted lists are memory-mapped from
    the ``.ivfdata`` file beside it: :mod:`one_peace.retrieval.ondisk`) and apply its recorded search parameters."""
    fs = faiss()
    index = fs.read_index(path, fs.IO_FLAG_ONDISK_SAME_DIR)
    set_search_params(index, params or {})
    return index
