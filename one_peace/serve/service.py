"""The search service behind the page: indexes, their query models (loaded once), a batching query worker, media.

Queries are preprocessed in the request's worker thread (a bad upload fails there, alone, with a 4xx); the
embedding forward runs on one background thread that takes every query waiting in its queue and embeds those of
the same model and modality in one batch, so concurrent requests are batched and the event loop never blocks.
Media are served only from the sources an index's metadata records (a file, or a member of a shard); any other id
is unknown.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import queue
import re
import tarfile
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from one_peace.errors import DataError

logger = logging.getLogger(__name__)


def _no_paths(exc: BaseException) -> str:
    """An error message with any absolute file path replaced (answers never reveal the server's files)."""
    return re.sub(r"(?<![\w.])/(?:[\w.@+-]+/)*[\w.@+-]+", "<path>", str(exc))


class QueryError(ValueError):
    """A request that cannot be answered; ``status`` is the HTTP status (4xx, or 503 for a dropped query) and the
    message is shown to the user; ``retry_after`` (seconds) becomes a ``Retry-After`` header."""

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass
class _Job:
    index: Any  # None: an embedding request (no search)
    model: Any
    samples: dict[str, dict[str, Any]]  # modality -> preprocessed sample
    raw: dict[str, Any]
    top_k: int
    fuse: str
    nprobe: int | None = None
    ef_search: int | None = None
    queued: float = field(default_factory=time.perf_counter)
    deadline: float = float("inf")
    future: Future[dict[str, Any]] = field(default_factory=Future)


@dataclass
class _ModelIndex:
    """What :meth:`SearchService.prepare` reads of an index (its model), for embedding requests without one."""

    model: Any


class SearchService:
    """Indexes by name, the models that embed their queries, and the worker that runs them.

    Args:
        folders: Embedding folders written by ``python -m one_peace.embed`` (each holds one modality).
        checkpoint: One query model for every index (default: each index's recorded checkpoint; indexes recording
            the same checkpoint share one model).
        bpe_dir: Official GPT-2 BPE files (official ``.pt`` checkpoints).
        device: Where the query models run.
        max_batch: Most queries embedded in one forward.
        limits: The server's bounds (:class:`~one_peace.serve.limits.Limits`): queue length, deadlines, decode caps.
    """

    def __init__(
        self,
        folders: list[str],
        checkpoint: str | None = None,
        bpe_dir: str | None = None,
        device: str = "cpu",
        max_batch: int = 32,
        limits: Any = None,
    ) -> None:
        from one_peace.retrieval import open_index
        from one_peace.serve.limits import Limits

        self.limits = limits or Limits()

        if not folders:
            raise ValueError("index=: give at least one embedding folder (index=DIR [index=DIR2 ...])")
        self.indexes: dict[str, Any] = {}
        models: dict[tuple[str, str | None], Any] = {}
        for folder in folders:
            index = open_index(folder, checkpoint=checkpoint, bpe_dir=bpe_dir, device=device)
            name = Path(folder).resolve().name
            while name in self.indexes:
                name += "-2"
            key = (str(index.checkpoint), index.bpe_dir)
            if key not in models:
                models[key] = index.model  # loaded here, once
            index.model = models[key]
            self.indexes[name] = index
        self._models: dict[str, Any] = {}  # served model names (checkpoint folder names, then index names) -> model
        for index in self.indexes.values():
            self._models.setdefault(Path(str(index.checkpoint)).name, index.model)
        for name, index in self.indexes.items():
            self._models.setdefault(name, index.model)
        self._ids: dict[str, dict[str, int]] = {}
        self.max_batch = max_batch
        self.batches: deque[int] = deque(maxlen=1024)  # sizes of the last forwards (for tests and the health page)
        self.counts = {"embedded": 0, "abandoned": 0, "expired": 0, "refused_full": 0}
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._decodes = threading.BoundedSemaphore(self.limits.max_decodes)
        self._thread = threading.Thread(target=self._work, name="one-peace-query-worker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------- describing
    def describe(self) -> list[dict[str, Any]]:
        """Every index: name, modality, size, the modalities its model can take as a query (``inputs``: each with
        ``media`` and the upload ``accept`` list from its plugin's ``media_types``), whether its plugin draws
        previews, and its tuned search parameters (``{"nprobe": n}`` / ``{"efSearch": n}``; empty for exact)."""
        return [
            {
                "name": name,
                "modality": index.modality,
                "count": len(index),
                "field": index.info.get("field", index.modality),
                "query_modalities": list(index.model.adapters),
                "inputs": [_input_of(m, index.model.plugins[m]) for m in index.model.adapters],
                "preview": type(index.model.plugins[index.modality]).preview is not _base_preview(),
                "search_params": index.search_params(),
            }
            for name, index in self.indexes.items()
        ]

    def get(self, name: str | None) -> tuple[str, Any]:
        """``(name, index)`` of ``name`` (default: the first index).

        Raises:
            QueryError: 404 for an unknown index.
        """
        if not name:
            name = next(iter(self.indexes))
        if name not in self.indexes:
            raise QueryError(f"unknown index {name!r}; this server has {sorted(self.indexes)}", 404)
        return name, self.indexes[name]

    # ---------------------------------------------------------------------------------------------- search
    def prepare(self, index: Any, query: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Preprocess every part of a query (runs in a request thread; a bad part fails here, alone).

        Raises:
            QueryError: 400 for an empty query or a modality the model does not have, 422 for input its plugin
                cannot use (undecodable, empty, non-finite...), naming the part.
        """
        from one_peace.models.encoding import preprocessor

        model = index.model
        if not query:
            raise QueryError("empty query: type a text or add a file (" + ", ".join(model.adapters) + ")")
        unknown = [m for m in query if m not in model.adapters]
        if unknown:
            raise QueryError(f"the model of this index has no {unknown} modality; it takes {list(model.adapters)}")
        from one_peace.serve.limits import check_media

        for m, raw in query.items():  # bytes only: a server never opens a path or fetches a URL a client sent
            if model.plugins[m].media and not isinstance(raw, bytes):
                raise QueryError(
                    f"the {m} query must be an uploaded file (base64 in the JSON API), not text: a media field is "
                    "never read as a path or a URL on the server",
                    422,
                )
            if isinstance(raw, bytes):
                check_media(m, raw, self.limits)  # pixels / duration from the headers, before any decoding
        samples = {}
        with self._decodes:  # a bounded number of uploads decoded at once
            for m, raw in query.items():
                try:
                    samples[m] = preprocessor(model, m)(raw)
                except DataError as exc:
                    raise QueryError(f"the {m} query cannot be used: {_no_paths(exc)}", 422) from None
        return samples

    def submit(
        self,
        index: Any,
        samples: dict[str, dict[str, Any]],
        raw: dict[str, Any],
        top_k: int,
        fuse: str,
        nprobe: int | None = None,
        ef_search: int | None = None,
        model: Any = None,
    ) -> Future[dict[str, Any]]:
        """Queue a prepared query for the worker; the future resolves to ``{"results", "timings"}``.

        Raises:
            QueryError: 429 (with ``Retry-After``) when ``limits.max_queue`` queries already wait.
        """
        if self._queue.qsize() >= self.limits.max_queue:
            self.counts["refused_full"] += 1
            raise QueryError(
                f"the server is busy ({self._queue.qsize()} queries waiting, max_queue {self.limits.max_queue}); "
                "try again shortly",
                429,
                retry_after=1,
            )
        job = _Job(index, index.model if index is not None else model, samples, raw, top_k, fuse, nprobe, ef_search)
        job.deadline = job.queued + self.limits.request_timeout_s
        self._queue.put(job)
        return job.future

    async def search(
        self,
        name: str | None,
        query: Mapping[str, Any],
        top_k: int = 10,
        fuse: str = "joint",
        nprobe: int | None = None,
        ef_search: int | None = None,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> dict[str, Any]:
        """Preprocess (in a thread), embed (on the worker, batched with concurrent queries) and search
        (``nprobe`` / ``ef_search``: the index's search parameter for this query). ``disconnected`` says whether
        the client has gone: its query is then dropped before it is embedded."""
        t0 = time.perf_counter()
        name, index = self.get(name)
        samples = await asyncio.to_thread(self.prepare, index, dict(query))
        prepared = time.perf_counter()
        future = self.submit(index, samples, dict(query), top_k, fuse, nprobe, ef_search)
        out = await self.wait(future, disconnected)
        out["index"] = name
        out["modality"] = index.modality
        out["timings"]["preprocess_ms"] = round((prepared - t0) * 1000, 2)
        out["timings"]["total_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return out

    async def wait(
        self, future: Future[dict[str, Any]], disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> dict[str, Any]:
        """The result of a submitted query; when ``disconnected()`` turns true first (checked every 50 ms) the query is
        cancelled, so the worker drops it unembedded."""
        wrapped = asyncio.wrap_future(future)
        if disconnected is None:
            return await wrapped
        while True:
            done, _ = await asyncio.wait({wrapped}, timeout=0.05)
            if done:
                return wrapped.result()
            if await disconnected():
                future.cancel()
                raise QueryError("the client went away", 499)

    def _take(self, job: _Job) -> bool:
        """Whether ``job`` is still wanted: a cancelled one (its client went away) or one past its deadline is
        dropped here, before it is embedded, and counted."""
        if not job.future.set_running_or_notify_cancel():  # cancelled: its client went away
            self.counts["abandoned"] += 1
            return False
        if time.perf_counter() > job.deadline:
            self.counts["expired"] += 1
            job.future.set_exception(
                QueryError(
                    f"the query waited over {self.limits.request_timeout_s:g} s (request_timeout_s); the server is "
                    "overloaded, try again",
                    503,
                    retry_after=2,
                )
            )
            return False
        return True

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job] if self._take(job) else []
            time.sleep(0.002)  # let queries that arrive together share a forward
            while len(jobs) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                if self._take(nxt):
                    jobs.append(nxt)
            if not jobs:
                continue
            try:
                self._run(jobs)
            except Exception as exc:  # a bug: every waiting request gets it (as a 500), the worker lives on
                logger.exception("query worker failed")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)

    def _run(self, jobs: list[_Job]) -> None:
        import torch

        from one_peace.models.encoding import _EvalMode, forward_batch

        start = time.perf_counter()
        vectors: dict[int, np.ndarray] = {}
        groups: dict[tuple[int, str, str | None], list[int]] = {}
        for i, j in enumerate(jobs):
            if len(j.samples) == 1:  # batched per model, modality and the precision the folder was embedded in
                precision = j.index.precision if j.index is not None else None  # /v1/embeddings: the model's own
                groups.setdefault((id(j.model), next(iter(j.samples)), precision), []).append(i)
            else:  # a composed query: one fused forward of its own
                vectors[i] = j.index.embed_query(j.raw, fuse=j.fuse)
        for (_, modality, precision), members in groups.items():
            model = jobs[members[0]].model
            batch = model.plugins[modality].collate([jobs[i].samples[modality] for i in members])
            with _EvalMode(model), torch.inference_mode():
                emb = forward_batch(model, modality, batch, True, precision=precision).float().cpu().numpy()
            for row, i in enumerate(members):
                vectors[i] = emb[row : row + 1]
            self.batches.append(len(members))
            self.counts["embedded"] += len(members)
        embedded = time.perf_counter()
        for i, j in enumerate(jobs):
            if j.index is None:  # an embedding request
                j.future.set_result({"vector": vectors[i][0]})
                continue
            t = time.perf_counter()
            hits = j.index.search_vectors(vectors[i], top_k=j.top_k, nprobe=j.nprobe, ef_search=j.ef_search)[0]
            j.future.set_result(
                {
                    "results": [h.to_json() for h in hits],
                    "timings": {
                        "queue_ms": round((start - j.queued) * 1000, 2),
                        "embed_ms": round((embedded - start) * 1000, 2),
                        "search_ms": round((time.perf_counter() - t) * 1000, 2),
                        "batch": len(jobs),
                    },
                }
            )

    def queued(self) -> int:
        """Queries waiting for the worker."""
        return self._queue.qsize()

    def models(self) -> list[str]:
        """The names ``/v1/embeddings`` takes as ``model``: each query model's checkpoint folder name, then each
        index's name (the model that embeds its queries)."""
        return list(self._models)

    def model_named(self, name: Any) -> Any:
        """The query model served as ``name``.

        Raises:
            QueryError: 404 naming the served models.
        """
        if not isinstance(name, str) or name not in self._models:
            raise QueryError(f"model: {str(name)[:80]!r} is not served here; models: {self.models()}", 404)
        return self._models[name]

    async def embed(
        self,
        model: Any,
        items: list[tuple[str, Any]],
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> tuple[list[np.ndarray], int]:
        """Normalised embeddings of ``(modality, raw)`` items (as ``model.encode`` gives them) and the number of text
        tokens they held: each item is checked and preprocessed in a thread, then embedded on the worker, batched
        with concurrent queries."""

        def prepare_all() -> list[dict[str, Any]]:
            out, stub = [], _ModelIndex(model)
            for i, (modality, raw) in enumerate(items):
                try:
                    out.append(self.prepare(stub, {modality: raw})[modality])
                except QueryError as exc:
                    raise QueryError(f"input[{i}]: {exc}", exc.status) from None
            return out

        samples = await asyncio.to_thread(prepare_all)
        futures = [self.submit(None, {m: s}, {m: raw}, 0, "joint", model=model) for (m, raw), s in zip(items, samples)]
        vectors = [(await self.wait(f, disconnected))["vector"] for f in futures]
        tokens = sum(int(s["tokens"].numel()) for s in samples if "tokens" in s and hasattr(s["tokens"], "numel"))
        return vectors, tokens

    def close(self) -> None:
        """Stop the worker."""
        self._queue.put(None)
        self._thread.join(timeout=5)

    # ----------------------------------------------------------------------------------------------- media
    def preview(self, name: str, item_id: str, max_size: int = 256) -> tuple[bytes, str]:
        """A small rendering of item ``item_id`` by its plugin's ``preview`` hook (a PNG, a WAV clip, text) and its
        content type: how the page shows a plugin modality's hits.

        Raises:
            QueryError: 404 for an unknown item, one without served media, or a plugin that draws no preview;
                422 when the plugin cannot read the item.
        """
        name, index = self.get(name)
        media, _ = self.media(name, item_id)
        plugin = index.model.plugins[index.modality]
        try:
            shown = plugin.preview(media, index.model.config, max_size=max_size)
        except (DataError, ValueError, OSError) as exc:
            raise QueryError(f"no preview of {item_id!r}: {_no_paths(exc)}", 422) from None
        if shown is None:
            raise QueryError(f"the {index.modality} plugin draws no preview", 404)
        return shown.data, shown.mime_type

    def media(self, name: str, item_id: str) -> tuple[Path | bytes, str]:
        """The media of item ``item_id`` of index ``name`` and its content type, from its recorded source only.

        Raises:
            QueryError: 404 for an unknown index or id, or an item without a served source (a text, a video given
                as frames, an inline data URI), or a source that is gone.
        """
        name, index = self.get(name)
        ids = self._ids.get(name)
        if ids is None:
            ids = {str(i): p for p, i in enumerate(index.store.ids())}
            self._ids[name] = ids
        if item_id not in ids:
            raise QueryError(f"no item {item_id!r} in index {name!r}", 404)
        meta = index.store.metadata(ids[item_id])
        kind, source = meta.get("source_kind"), meta.get("source")
        if kind == "file" and source:
            path = Path(str(source))
            if not path.is_file():
                raise QueryError(f"the source of {item_id!r} is gone ({path.name})", 404)
            return path, mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if kind == "shard" and source and meta.get("source_member"):
            return _read_member(str(source).rpartition("#")[0], str(meta["source_member"]), item_id)
        if kind == "shard" and source:  # a folder embedded before members were located: one scan of the shard
            shard, _, key = str(source).rpartition("#")
            prefix = f"{key}.{index.info.get('field', index.modality)}."
            try:
                with tarfile.open(shard) as tar:
                    member = next((m for m in tar.getmembers() if m.name.startswith(prefix)), None)
                    data = tar.extractfile(member).read() if member is not None else None  # type: ignore[union-attr]
            except (OSError, tarfile.TarError):
                data = None
            if not data:
                raise QueryError(f"the shard member of {item_id!r} is gone", 404)
            return data, mimetypes.guess_type(member.name)[0] or "application/octet-stream"  # type: ignore[union-attr]
        raise QueryError(f"item {item_id!r} has no media to serve (its source is {kind or 'not recorded'})", 404)


def _read_member(shard: str, located: str, item_id: str) -> tuple[bytes, str]:
    """The bytes of a shard member at the ``"<offset>:<size>:<extension>"`` embed recorded (one read, no scan).

    Raises:
        QueryError: 404 when the record is malformed or the shard is not a regular file any more.
    """
    import os
    import stat

    try:
        offset, size, ext = located.split(":", 2)
        start, length = int(offset), int(size)
    except ValueError:
        raise QueryError(f"the shard member of {item_id!r} is not recorded readably", 404) from None
    try:
        fd = os.open(shard, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        raise QueryError(f"the shard of {item_id!r} is gone", 404) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or start < 0 or length < 0 or start + length > info.st_size:
            raise QueryError(f"the shard member of {item_id!r} is gone", 404)
        data = os.pread(fd, length, start)
    finally:
        os.close(fd)
    return data, mimetypes.guess_type(f"x.{ext}")[0] or "application/octet-stream"


def _input_of(modality: str, plugin: Any) -> dict[str, Any]:
    """How the page takes a query of ``modality``: text, or a file of the plugin's media types."""
    return {"modality": modality, "media": bool(plugin.media), "accept": plugin.media_types().accept_attribute()}


def _base_preview() -> Any:
    from one_peace.registry import ModalityPlugin

    return ModalityPlugin.preview
