"""Manifests: JSONL (one object per sample) or TSV with a header, read as a stream with exact resume state.

Media fields (of a modality whose plugin has ``media = True``) hold a path (relative to the manifest's folder, or
absolute), a base64 data URI (``data:<mime>;base64,<payload>``) or, for in-memory rows and shards, raw bytes. What
each value must be is asked of its modality's plugin (``ModalityPlugin.check_value`` / ``resolve``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from one_peace.media import resolve_media as resolve_media  # on the ground floor; re-exported here

logger = logging.getLogger(__name__)


#: the UTF-8 byte-order mark spreadsheet programs (Excel's "CSV UTF-8") put before a file's first line
BOM = b"\xef\xbb\xbf"


class ManifestError(ValueError):
    """A manifest is malformed; the message names the file, the line and the field."""


def manifest_format(path: Path) -> str:
    """``"jsonl"`` or ``"tsv"`` from the file name."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".tsv", ".txt"):
        return "tsv"
    raise ManifestError(f"{path}: unknown manifest format {suffix!r} (use .jsonl or .tsv)")


def parse_line(line: str, fmt: str, header: list[str] | None, path: Path, line_no: int) -> dict[str, Any]:
    """One manifest line as a row dict; :class:`ManifestError` names the file and line when it does not parse."""
    if fmt == "jsonl":
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}:{line_no}: malformed JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(row, dict):
            raise ManifestError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
        return row
    if header is None:
        raise ManifestError(f"{path}:{line_no}: a TSV manifest needs a header line first")
    values = next(csv.reader([line.rstrip("\r\n")], delimiter="\t", quoting=csv.QUOTE_NONE))
    if len(values) != len(header):
        raise ManifestError(f"{path}:{line_no}: {len(values)} columns, the header has {len(header)}")
    return dict(zip(header, values))


class ManifestReader:
    """Streaming iterator over ``(line_no, row)`` of a manifest (validation, tokenizer training, ``embed``);
    picklable, its state is the file offset. The loader reads rows by index instead (:mod:`one_peace.data.rows`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fmt = manifest_format(self.path)
        self.offset = 0
        self.line_no = 0
        self.header: list[str] | None = None
        self._fh: io.BufferedReader | None = None

    def reset(self) -> ManifestReader:
        """Start again from the top."""
        self.close()
        self.offset = 0
        self.line_no = 0
        return self

    def close(self) -> None:
        """Close the file handle (reopened lazily)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __getstate__(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "fmt": self.fmt,
            "offset": self.offset,
            "line_no": self.line_no,
            "header": self.header,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])
        self.fmt = state["fmt"]
        self.offset = state["offset"]
        self.line_no = state["line_no"]
        self.header = state["header"]
        self._fh = None

    def __iter__(self) -> ManifestReader:
        return self

    def __next__(self) -> tuple[int, dict[str, Any]]:
        if self._fh is None:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open across calls
            self._fh.seek(self.offset)
        while True:
            raw = self._fh.readline()
            if not raw:
                self.close()
                raise StopIteration
            start = self.offset
            self.offset += len(raw)
            if start == 0 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            self.line_no += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ManifestError(
                    f"{self.path}:{self.line_no}: not valid UTF-8 (byte {exc.start}: "
                    f"{raw[exc.start : exc.start + 4]!r}); manifests must be UTF-8 text"
                ) from None
            if not line.strip():
                continue
            if self.fmt == "tsv" and self.header is None:
                self.header = line.rstrip("\r\n").split("\t")
                continue
            return self.line_no, parse_line(line, self.fmt, self.header, self.path, self.line_no)


def iter_manifest(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line_no, row)`` for every row of a manifest, streaming."""
    reader = ManifestReader(path)
    try:
        yield from reader
    finally:
        reader.close()


def check_text(value: str, where: str) -> None:
    """Raise :class:`ManifestError` at ``where`` unless ``value`` is encodable text (no lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ManifestError(
            f"{where}: character {exc.start} is a lone surrogate ({value[exc.start]!r}), not text; "
            "fix the escape sequence (JSON \\ud800-\\udfff need a pair)"
        ) from None


def default_fields(modalities: Sequence[str]) -> dict[str, str]:
    """Without a field map, a field named after a modality feeds that modality."""
    return {m: m for m in modalities}


def validate_manifest(path: str | Path, fields: Mapping[str, str], known_modalities: Sequence[str]) -> int:
    """Check a manifest's structure up front, streaming; return its number of rows.

    Checks: every line parses, every modality in ``fields`` is registered, and each mapped field is present with a
    value its modality's plugin takes (``check_value``) in at least one row. Rows where it is missing or wrong are
    only counted and logged here: the loader skips them as bad samples (``missing field`` / ``invalid value``, the
    labels ``embed`` and ``eval`` use), so one bad row never stops a run.

    Raises:
        ManifestError: naming the file (and the line, for a line that does not parse); a field missing or wrong in
            every row (the field map does not fit the manifest) names the field and the first line.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    for modality in fields:
        if modality not in known_modalities:
            raise ManifestError(
                f"{path}: unknown modality {modality!r} in the field map; registered: {sorted(known_modalities)}"
            )
    from one_peace.registry import get_plugin

    plugins = {m: get_plugin(m) for m in fields}
    rows = 0
    usable = dict.fromkeys(fields, 0)
    first_bad: dict[str, str] = {}
    for line_no, row in iter_manifest(path):
        rows += 1
        for modality, field in fields.items():
            if field not in row:
                first_bad.setdefault(
                    modality,
                    f"{path}:{line_no}: missing field {field!r} (needed for {modality}); the row has {sorted(row)}",
                )
                continue
            try:
                plugins[modality].check_value(row[field])
            except ValueError as exc:
                first_bad.setdefault(modality, f"{path}:{line_no}: field {field!r}: {exc}")
                continue
            usable[modality] += 1
    if rows == 0:
        raise ManifestError(f"{path}: the manifest has no rows")
    for modality, good in usable.items():
        if good == 0:
            raise ManifestError(f"{first_bad[modality]} (and in every other row: check the field map)")
        if good < rows:
            logger.warning(
                "%s; %d of %d rows lack a usable %r field: they are skipped as bad samples",
                first_bad[modality],
                rows - good,
                rows,
                fields[modality],
            )
    return rows
