"""``python -m one_peace.generate checkpoint=CK data=MANIFEST_OR_FILES out=FILE.jsonl [key=value ...]``.

Captions, answers, closed-set labels or boxes for every row of a manifest (``.jsonl``/``.tsv``), a folder or file of
``.tar`` shards, a folder of media files or one media file, with a seq2seq checkpoint (:mod:`one_peace.generation`).
``out`` gets one JSON line per item, in data order: ``{"id", "row", "output", "score"}`` (``output``: the text, or
``[x0, y0, x1, y1]`` in pixels for BOX targets). Rows that cannot be read are skipped and listed in
``<out stem>.bad.jsonl``; ``<out stem>.info.json`` records the checkpoint, the settings and the counts. Lines are
flushed to disk batch by batch: ``mode=resume`` continues a killed run with the rows it had not finished (same
checkpoint and settings, or it refuses).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from one_peace.cli import parse

MODES = ("new", "resume", "overwrite")
#: called with the number of rows written after each batch (fault injection in tests)
BATCH_DONE_HOOK: Any = None


@dataclass
class GenerateConfig:
    """Generate text or boxes with a seq2seq checkpoint for every row of a manifest, shards or media files.

    Attributes:
        checkpoint: A seq2seq run's checkpoint folder, or its output folder (the newest complete checkpoint).
        data: A manifest (``.jsonl``/``.tsv``), a folder or file of ``.tar`` shards, a folder of media files (read
            recursively; links leading out of it are skipped) or one media file.
        out: The JSON-lines file to write (one line per item: id, row, output, score).
        instruction: The instruction (default: the trained one). A source side alone (``[IMAGE:image] what is
            it?``) keeps the trained target.
        beams: Beam size (default: the run's validation beam; 1 is greedy).
        max_tokens: Most generated tokens (default: the run's: 30 for text, 6 for boxes).
        constraints: Allowed outputs (closed-set decoding): a list, or a file (one per line, or a JSON list).
            Default: the training labels when the target is ``closed_set``.
        generator: Which decoder, for a multi-task checkpoint with several.
        template: Which template of a ``|||`` instruction.
        id_field: The row field holding the item id (else a shard key, a file's relative path or ``#<row>``).
        batch_size: Items per forward.
        workers: Decoding threads (0: decode in the main thread).
        device: Where the model runs (``cpu``, ``cuda``...).
        limit: Generate for the first ``limit`` rows only.
        mode: ``new`` (refuses an existing ``out``), ``resume`` (continue a killed run) or ``overwrite``.
        progress: Show a progress bar.
        extensions: Shards without a one-peace header: member extension -> the field it also fills (as ``embed``).
    """

    checkpoint: str = "???"
    data: str = "???"
    out: str = "???"
    instruction: str | None = None
    beams: int | None = None
    max_tokens: int | None = None
    constraints: Any = None
    generator: str | None = None
    template: int = 0
    id_field: str = "id"
    batch_size: int = 16
    workers: int = 0
    device: str = "cpu"
    limit: int | None = None
    mode: str = "new"
    progress: bool = True
    extensions: dict[str, str] = field(default_factory=dict)


def sidecars(out: Path) -> tuple[Path, Path]:
    """``(bad rows file, info file)`` beside ``out``."""
    stem = out.name.removesuffix(".jsonl")
    return out.parent / f"{stem}.bad.jsonl", out.parent / f"{stem}.info.json"


def read_constraints(value: Any) -> list[str] | None:
    """``constraints=``: ``None``, a list, or a file (a JSON list, or one value per line)."""
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    path = Path(str(value))
    if not path.is_file():
        raise FileNotFoundError(f"constraints: {value} is neither a list nor a file")
    text = path.read_text()
    if text.lstrip().startswith("["):
        return [str(v) for v in json.loads(text)]
    return [line.strip() for line in text.splitlines() if line.strip()]


def media_rows(folder: Path, plugin: Any, field_name: str) -> list[dict[str, Any]]:
    """Rows ``{id, field: path}`` of the files under ``folder`` the modality takes (sorted; a link that leads out
    of ``folder`` is skipped)."""
    root = folder.resolve()
    rows = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if not path.resolve().is_relative_to(root) or not plugin.media_types().accepts(path.name):
            continue
        rel = path.relative_to(folder).as_posix()
        rows.append({"id": rel, field_name: rel})
    return rows


def _count_lines(path: Path) -> int | None:
    if path.suffix not in (".jsonl", ".tsv"):
        return None
    with open(path, "rb") as fh:
        lines = sum(1 for line in fh if line.strip())
    return lines - 1 if path.suffix == ".tsv" else lines


def _source(cfg: GenerateConfig, generator: Any, settings: Any) -> tuple[Iterator[tuple[int, dict]], Path, int | None]:
    """``((row number, row) pairs, base folder, row count or None)`` of ``cfg.data``."""
    from one_peace.data.shards import iter_rows

    data = Path(cfg.data)
    if not data.exists():
        raise FileNotFoundError(f"data: {cfg.data} not found")
    is_shards = (data.is_file() and data.suffix == ".tar") or (data.is_dir() and any(data.glob("*.tar")))
    if (data.is_file() and data.suffix in (".jsonl", ".tsv")) or is_shards:
        total = _count_lines(data) if data.is_file() else None
        return iter_rows(str(data), cfg.extensions or None), (data.parent if data.is_file() else data), total
    t = settings.instruction.templates[settings.template]
    media = [s for s in t.source_slots if s.kind in generator.modalities]
    if len(media) != 1 or len(t.source_slots) != 1:
        raise ValueError(
            f"data: {cfg.data} is media, but the instruction reads {[s.field for s in t.source_slots]}: "
            "give a manifest with those fields"
        )
    plugin = generator.model.plugins[media[0].kind]
    if data.is_dir():
        rows = media_rows(data, plugin, media[0].field)
        if not rows:
            raise FileNotFoundError(f"data: no {media[0].kind} files in {data} (and no .tar shards)")
        return iter(enumerate(rows)), data, len(rows)
    return iter([(0, {"id": data.name, media[0].field: data.name})]), data.parent, 1


def _fingerprint(generator: Any) -> str:
    """The encoder's identity (:func:`~one_peace.retrieval.format.model_hash`) and the decoder's weights."""
    from one_peace.retrieval.format import model_hash

    h = hashlib.sha256(model_hash(generator.model).encode())
    for name, tensor in sorted(generator.task.decoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _atomic_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _finished_rows(path: Path) -> set[int]:
    """Row numbers of the complete lines of ``path``; a torn last line (a kill mid-write) is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(end)
    rows = set()
    for line in data[:end].splitlines():
        if line.strip():
            rows.add(int(json.loads(line)["row"]))
    return rows


def generate(cfg: GenerateConfig, generator: Any = None) -> dict[str, Any]:
    """Run ``cfg``; returns the info written beside ``out`` (counts, settings, seconds)."""
    from one_peace.embed import row_id
    from one_peace.errors import bad_record
    from one_peace.generation import get_generator
    from one_peace.hub import locate

    if cfg.mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {cfg.mode!r}")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {cfg.batch_size}")
    out = Path(cfg.out)
    bad_path, info_path = sidecars(out)
    if generator is None:
        import one_peace

        checkpoint, _ = locate(cfg.checkpoint)
        model = one_peace.load(checkpoint, device=cfg.device)
        generator = get_generator(model, cfg.generator)
    else:
        checkpoint = Path(cfg.checkpoint)
    settings = generator.settings(
        cfg.instruction, cfg.beams, cfg.max_tokens, read_constraints(cfg.constraints), cfg.template
    )
    ident = {"checkpoint": str(Path(checkpoint).resolve()), "model": _fingerprint(generator), **settings.describe()}
    done: set[int] = set()
    if out.exists() and cfg.mode == "new":
        raise ValueError(f"out: {out} exists; mode=resume continues it, mode=overwrite replaces it")
    if cfg.mode == "resume" and out.exists():
        before = json.loads(info_path.read_text()) if info_path.is_file() else {}
        differs = {k: (before.get(k), v) for k, v in ident.items() if before.get(k) != v}
        if differs:
            raise ValueError(f"mode=resume: {out} was written with other settings: {differs} (was, now)")
        done = _finished_rows(out) | _finished_rows(bad_path)
    elif cfg.mode != "resume" or not out.exists():
        for p in (out, bad_path):
            p.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {**ident, "data": str(Path(cfg.data).resolve()), "status": "running"}
    _atomic_json(info_path, info)
    rows, base, total = _source(cfg, generator, settings)
    if cfg.limit is not None:
        total = min(total, cfg.limit) if total is not None else cfg.limit

    def todo() -> Iterator[tuple[tuple[int, str], dict[str, Any]]]:
        for number, (_, row) in enumerate(rows):
            if cfg.limit is not None and number >= cfg.limit:
                return
            if number in done:
                continue
            yield (number, row_id(row, cfg.id_field, number)), row

    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=len(done), desc=f"generate ({generator.name})", unit="item")
    start = time.perf_counter()
    written = bad = 0
    pending_good: list[str] = []
    pending_bad: list[str] = []
    with open(out, "a") as fh, open(bad_path, "a") as bh:

        def flush() -> None:
            for handle, lines in ((fh, pending_good), (bh, pending_bad)):
                if lines:
                    handle.write("".join(lines))
                    handle.flush()
                    os.fsync(handle.fileno())
                    lines.clear()

        for (number, item_id), got in generator.stream(todo(), settings, base, cfg.batch_size, cfg.workers):
            if isinstance(got, Exception):
                bad += 1
                pending_bad.append(json.dumps(bad_record(item_id, got, "row", row=number)) + "\n")
            else:
                written += 1
                line = {"id": item_id, "row": number, "output": got.output, "score": round(got.score, 6)}
                pending_good.append(json.dumps(line) + "\n")
            if bar is not None:
                bar.update(1)
            if len(pending_good) + len(pending_bad) >= cfg.batch_size:
                flush()
                if BATCH_DONE_HOOK is not None:
                    BATCH_DONE_HOOK(written + bad)
        flush()
    if bar is not None:
        bar.close()
    info.update(
        status="complete",
        generated=sum(1 for _ in _lines(out)),
        bad=sum(1 for _ in _lines(bad_path)),
        this_run={"generated": written, "bad": bad, "seconds": round(time.perf_counter() - start, 3)},
    )
    _atomic_json(info_path, info)
    if info["bad"]:
        print(f"generate: {info['bad']} row(s) skipped, listed in {bad_path}", file=sys.stderr)
    return info


def _lines(path: Path) -> Iterator[str]:
    if path.exists():
        with open(path) as fh:
            yield from (line for line in fh if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: the info (counts, settings) as JSON on stdout."""
    from one_peace.checkpoint.safe_pickle import CheckpointError
    from one_peace.extras import MissingExtraError

    cfg = parse(GenerateConfig, argv, "python -m one_peace.generate")
    try:
        info = generate(cfg)
    except (ValueError, KeyError, FileNotFoundError, MissingExtraError, CheckpointError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(info, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
