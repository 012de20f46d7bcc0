"""Rows addressed by index: manifests (byte offsets), in-memory rows, and WebDataset shards (member offsets).

A row source is what the sampler and the decoding workers share: ``len(source)`` rows, ``source[i]`` gives
``(line_no_or_index, row)``. Sources are picklable and open their files lazily in each process (a handle opened
before a ``fork`` is never shared: its file position would be), so ``DataLoader`` worker processes started by
``fork``, ``spawn`` or ``forkserver`` all read the same rows. A row that cannot be read (a damaged line, a broken
shard) is returned as ``{"id": ..., "__error__": reason}``: the loader counts it as a bad sample, it never stops the
run.
"""

from __future__ import annotations

import json
import os
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from one_peace.data.manifest import BOM, ManifestError, manifest_format, parse_line

Row = tuple[int, Mapping[str, Any]]


class RowSource:
    """Base class: ``len(source)`` rows, ``source[i] -> (line_no_or_index, row)``, picklable."""

    #: the folder relative media paths are resolved against
    base_dir: Path = Path(".")

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Row:
        raise NotImplementedError

    def files(self) -> list[Path]:
        """The files this source reads (for the resume identity check); none for in-memory rows."""
        return []

    def close(self) -> None:
        """Close open file handles (they are reopened on demand)."""


class MemoryRows(RowSource):
    """Rows held in memory (values may be raw bytes); row ``i`` reports line number ``i + 1``."""

    def __init__(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not all(isinstance(r, Mapping) for r in rows):
            raise TypeError("in-memory data must be a sequence of dict rows")
        self.rows = list(rows)
        self.base_dir = Path.cwd()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Row:
        return index + 1, self.rows[index]


_SEEK_LOCK = threading.Lock()


def read_at(fh: IO[bytes], offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset``, safe when threads share ``fh`` (fairseq2's parallel map): ``os.pread`` where the
    platform has it (no shared file position), else seek + read under a lock."""
    if hasattr(os, "pread"):
        return os.pread(fh.fileno(), size, offset)
    with _SEEK_LOCK:
        fh.seek(offset)
        return fh.read(size)


class _Handles:
    """Open file handles of the current process and thread only (a forked child or another thread opens its own),
    at most ``keep`` per thread."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.pid = -1
        self.local = threading.local()

    def _open(self) -> OrderedDict[str, IO[bytes]]:
        if self.pid != os.getpid():  # a forked child: never share the parent's file positions
            self.local = threading.local()
            self.pid = os.getpid()
        handles = getattr(self.local, "open", None)
        if handles is None:
            handles = self.local.open = OrderedDict()
        return handles  # type: ignore[no-any-return]

    def get(self, path: str) -> IO[bytes]:
        handles = self._open()
        fh = handles.get(path)
        if fh is None:
            fh = open(path, "rb")  # noqa: SIM115 - kept open across reads, closed by close()
            handles[path] = fh
            while len(handles) > self.keep:
                handles.popitem(last=False)[1].close()
        else:
            handles.move_to_end(path)
        return fh

    def close(self) -> None:
        """Close this thread's handles (other threads' close when they end)."""
        if self.pid == os.getpid():
            for fh in self._open().values():
                fh.close()
            self.local.open = OrderedDict()


class ManifestRows(RowSource):
    """The rows of a JSONL or TSV manifest, read by byte offset (one scan at construction, no parsing).

    The index is three int64 arrays (offset, length and line number of every non-blank data line): 24 bytes a row.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fmt = manifest_format(self.path)
        self.base_dir = self.path.parent
        self.header: list[str] | None = None
        offsets: list[int] = []
        sizes: list[int] = []
        line_nos: list[int] = []
        with open(self.path, "rb") as fh:
            offset = 0
            for line_no, raw in enumerate(fh, start=1):
                if offset == 0 and raw.startswith(BOM):  # a byte-order mark is not part of the first line
                    offset, raw = len(BOM), raw[len(BOM) :]
                if raw.strip():
                    if self.fmt == "tsv" and self.header is None:
                        self.header = raw.decode("utf-8", errors="replace").rstrip("\r\n").split("\t")
                    else:
                        offsets.append(offset)
                        sizes.append(len(raw))
                        line_nos.append(line_no)
                offset += len(raw)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.line_nos = np.asarray(line_nos, dtype=np.int64)
        self._handles = _Handles(keep=1)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._handles = _Handles(keep=1)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> Row:
        line_no = int(self.line_nos[index])
        raw = read_at(self._handles.get(str(self.path)), int(self.offsets[index]), int(self.sizes[index]))
        try:
            line = raw.decode("utf-8")
            return line_no, parse_line(line, self.fmt, self.header, self.path, line_no)
        except UnicodeDecodeError as exc:
            reason = f"{self.path}:{line_no}: not valid UTF-8 (byte {exc.start})"
        except ManifestError as exc:
            reason = str(exc)
        return line_no, {"id": f"line {line_no}", "__error__": reason}

    def files(self) -> list[Path]:
        """The manifest."""
        return [self.path]

    def close(self) -> None:
        """Close the manifest (reopened on demand)."""
        self._handles.close()


#: a sample of a shard: key, header fields, members ``(field, offset, size, extension)``, its own error, one-peace
#: header or not
_Sample = tuple[str, dict[str, Any], list[tuple[str, int, int, str]], str | None, bool]
#: standard WebDataset extensions and the field they also fill (shards without a one-peace header)
DEFAULT_EXTENSIONS = {
    "jpg": "image",
    "jpeg": "image",
    "png": "image",
    "webp": "image",
    "txt": "text",
    "caption": "text",
    "wav": "audio",
    "flac": "audio",
    "mp3": "audio",
    "mp4": "video",
    "webm": "video",
}
#: extensions read as UTF-8 text
TEXT_EXTENSIONS = ("txt", "text", "caption", "cls")


def _is_text_modality(name: str) -> bool:
    """Whether ``name`` is a registered modality whose values are not media (text): its members decode as UTF-8."""
    from one_peace.registry import get_plugin

    try:
        return not get_plugin(name).media
    except KeyError:
        return False


class ShardRows(RowSource):
    """The samples of WebDataset shards, addressed as (shard, sample within it).

    Sample counts come from ``shards.json`` (written by ``python -m one_peace.data.shard``) or, without it, from one
    scan of the tar headers. Each process indexes a shard's members (name, offset, size: headers only) the first
    time it reads from it and keeps the index of the last few shards, so memory does not grow with the data. A shard
    that cannot be read, or holds fewer samples than its count, yields error rows for what is missing (counted as
    bad samples).
    """

    def __init__(self, files: Sequence[str | Path], extensions: Mapping[str, str] | None = None) -> None:
        from one_peace.data.shards import shard_counts

        #: WebDataset extensions read as fields of a modality's name (``jpg`` -> ``image``) in shards without a
        #: one-peace header; the extension's own field stays too
        self.extensions = dict(DEFAULT_EXTENSIONS if extensions is None else extensions)
        self.text_extensions = set(TEXT_EXTENSIONS) | {e for e, m in self.extensions.items() if _is_text_modality(m)}
        self.paths = [str(f) for f in files]
        self.base_dir = Path(self.paths[0]).parent if self.paths else Path(".")
        self._indexes: OrderedDict[int, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._handles = _Handles(keep=2)
        counts = shard_counts(self.paths)
        if counts is None:  # one scan: the readable samples, and one error row for a shard that breaks off
            counts = [len(ok) + (err is not None) for ok, err in map(self._index, range(len(self.paths)))]
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_indexes"] = OrderedDict()
        state["_handles"] = state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._handles = _Handles(keep=2)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def files(self) -> list[Path]:
        """The shard files."""
        return [Path(p) for p in self.paths]

    def close(self) -> None:
        """Close open shards (reopened on demand)."""
        self._handles.close()

    def _index(self, shard: int) -> tuple[list[_Sample], str | None]:
        """One shard's samples (key, header fields, ``[(field, offset, size), ...]``, the sample's own error) and the
        error that broke the shard off, if any. The header is read while indexing, so each sample's media are the
        only reads later.

        Members group into samples as WebDataset groups them: by key (the name up to its first dot). A one-peace
        header (``key.json`` with ``__members__``, written by ``python -m one_peace.data.shard``) opens a sample and
        says which members it needs; any other shard (img2dataset's ``key.jpg`` + ``key.txt`` / ``key.json``) is
        read as it is: fields named by extension, a ``.json`` member's fields merged into the row. A damaged member
        costs its sample only (an error row with the reason); a shard that breaks off costs what follows."""
        with self._lock:
            cached = self._indexes.get(shard)
            if cached is not None:
                self._indexes.move_to_end(shard)
                return cached  # type: ignore[no-any-return]
        samples: list[_Sample] = []
        error = None
        current: dict[str, Any] | None = None

        def flush() -> None:
            if current is None:
                return
            problem = current["error"]
            if problem is None and current["expected"] is not None:
                missing = sorted(current["expected"] - {m[0] for m in current["members"]})
                if missing:
                    problem = f"sample {current['key']}: missing members {missing}"
            if problem is None and not current["members"] and not current["meta"]:
                problem = f"sample {current['key']}: no members"
            samples.append(
                (current["key"], current["meta"], current["members"], problem, current["expected"] is not None)
            )

        def start(key: str, header: bool) -> dict[str, Any]:
            return {"key": key, "members": [], "meta": {}, "expected": set() if header else None, "error": None}

        try:
            with tarfile.open(self.paths[shard], mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, name = os.path.split(member.name)
                    stem, _, ext = name.partition(".")
                    key = f"{folder}/{stem}" if folder else stem
                    ext = ext.lower()
                    if ext == "json":
                        fh = tar.extractfile(member)
                        raw = fh.read() if fh is not None else b""
                        try:
                            meta: Any = json.loads(raw)
                            bad = None
                        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                            meta, bad = None, f"{name}: invalid JSON ({exc})"
                        if isinstance(meta, dict) and "__members__" in meta:  # a one-peace header opens a sample
                            flush()
                            current = start(key, header=True)
                            current["expected"] = set(meta.pop("__members__"))
                            current["meta"] = meta
                            continue
                        if current is None or current["key"] != key:
                            flush()
                            current = start(key, header=False)
                        if bad is not None:
                            current["error"] = current["error"] or bad
                        elif isinstance(meta, dict):
                            current["meta"].update(meta)
                        else:
                            current["meta"]["json"] = meta
                        continue
                    if current is None or current["key"] != key:
                        flush()
                        current = start(key, header=False)
                    field = ext.split(".", 1)[0] if current["expected"] is not None else ext
                    current["members"].append((field, member.offset_data, member.size, ext))
            flush()
            current = None
        except (tarfile.TarError, OSError, ValueError) as exc:
            error = f"unreadable shard from sample {len(samples)} on: {type(exc).__name__}: {exc}"
        with self._lock:
            self._indexes[shard] = (samples, error)
            while len(self._indexes) > 4:
                self._indexes.popitem(last=False)
        return samples, error

    def __getitem__(self, index: int) -> Row:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        within = index - int(self.starts[shard])
        path = self.paths[shard]
        samples, error = self._index(shard)
        if within >= len(samples):
            reason = error or f"sample {within} missing (the shard holds {len(samples)}; shards.json is stale)"
            return index + 1, {"id": f"{Path(path).name}#{within}", "__error__": reason, "__shard__": path}
        key, meta, members, problem, ours = samples[within]
        if problem is not None:
            return index + 1, {"id": key, "__error__": problem, "__shard__": path, "__key__": key}
        row: dict[str, Any] = {"__key__": key, "__shard__": path, **meta}
        try:
            fh = self._handles.get(path)
            located: dict[str, list[Any]] = {}
            for fld, offset, size, ext in members:
                located[fld] = [offset, size, ext]
                data = read_at(fh, offset, size)
                if not ours and fld in self.text_extensions:
                    try:
                        row[fld] = data.decode("utf-8").strip()
                    except UnicodeDecodeError as exc:
                        reason = f"{key}.{fld}: not UTF-8 text ({exc})"
                        return index + 1, {"id": key, "__error__": reason, "__shard__": path, "__key__": key}
                else:
                    row[fld] = data
        except OSError as exc:
            return index + 1, {"id": f"{Path(path).name}#{within}", "__error__": f"unreadable sample: {exc}"}
        if not ours:
            for ext, alias in self.extensions.items():
                if ext in row and alias not in row:
                    row[alias] = row[ext]
                    located.setdefault(alias, located.get(ext, []))
        row["__members__"] = located  # where each member's bytes are: served later without scanning the tar
        return index + 1, row


def open_rows(
    source: str | Path | Sequence[Mapping[str, Any]] | Sequence[str | Path],
    extensions: Mapping[str, str] | None = None,
) -> RowSource:
    """The row source of a manifest path, a shard folder / file / list of shard files, or in-memory rows.
    ``extensions``: shard member extensions -> the field they also fill, over :data:`DEFAULT_EXTENSIONS`."""
    ext = {**DEFAULT_EXTENSIONS, **(extensions or {})}
    from one_peace.data.shards import list_shards

    if isinstance(source, str | Path):
        path = Path(source)
        if path.is_file() and path.suffix != ".tar":
            return ManifestRows(path)
        return ShardRows(list_shards(path), ext)
    if source and all(isinstance(s, str | Path) for s in source):
        return ShardRows(list_shards(list(source)), ext)  # type: ignore[arg-type]
    return MemoryRows(source)  # type: ignore[arg-type]
