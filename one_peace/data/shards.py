"""WebDataset tar shards: ``python -m one_peace.data.shard MANIFEST OUT_DIR --shard-size N`` and row iteration.

Each sample is a group of consecutive tar members sharing a key (the WebDataset convention open_clip and timm
users already have): ``<key>.json`` holds the non-media fields, and each media field is stored as
``<key>.<field>.<ext>`` with the original bytes. ``shards.json`` beside the shards records sample counts. Reading
is :class:`one_peace.data.rows.ShardRows` (by index), which :func:`iter_rows` walks in order.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from one_peace.data.manifest import ManifestError, iter_manifest
from one_peace.media import resolve_media
from one_peace.registry import get_plugin, list_modalities

INDEX = "shards.json"


def list_shards(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """The ``.tar`` files of a folder (sorted), a glob-free list, or a single file."""
    if isinstance(source, str | Path):
        p = Path(source)
        files = sorted(p.glob("*.tar")) if p.is_dir() else [p]
    else:
        files = [Path(s) for s in source]
    if not files:
        raise FileNotFoundError(f"no .tar shards found in {source}")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"shard {f} not found")
    return files


def shard_counts(files: Sequence[str | Path]) -> list[int] | None:
    """Each shard's sample count from the ``shards.json`` beside it; ``None`` when any is not recorded."""
    counts: list[int] = []
    indexes: dict[Path, dict[str, Any]] = {}
    for f in files:
        index = Path(f).parent / INDEX
        if index not in indexes:
            try:
                indexes[index] = json.loads(index.read_text()).get("counts", {}) if index.is_file() else {}
            except (OSError, ValueError, AttributeError):
                indexes[index] = {}
        count = indexes[index].get(Path(f).name)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            return None
        counts.append(count)
    return counts


def _ext(value: Any, field: str) -> str:
    if isinstance(value, str) and not value.startswith("data:"):
        return Path(value).suffix.lstrip(".").lower() or "bin"
    if isinstance(value, str):
        m = re.match(r"data:[^/]+/([\w.+-]+)", value)
        return m.group(1) if m else "bin"
    return "bin"


def write_shards(
    manifest: str | Path,
    out_dir: str | Path,
    shard_size: int = 1000,
    prefix: str = "shard",
    fields: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write WebDataset tar shards of ``shard_size`` samples from a manifest (streaming); returns their paths.

    Media are stored as members: the fields the field map ``fields`` (``modality -> field``) gives to a media
    modality (its plugin's ``media``), the fields named after a registered media modality, and any ``data:`` URI.
    A field of another name whose values are media file names (``img: cat.jpg``) is stored as text and warned
    about, with the ``--fields`` that would store the files. A line that does not parse is skipped, counted and
    listed in ``shards.json`` (``skipped``); each shard is written under a temporary name and renamed when
    complete, so an interrupted run leaves no partial ``.tar``.

    Raises:
        ManifestError: no line of the manifest could be read.
    """
    from tqdm import tqdm

    from one_peace.data.manifest import ManifestReader

    manifest, out = Path(manifest), Path(out_dir)
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: manifest not found")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    counts: dict[str, int] = {}
    skipped: list[str] = []
    tar: tarfile.TarFile | None = None
    in_shard = 0
    media_modalities = [m for m in list_modalities() if get_plugin(m).media]
    media_fields = set(media_modalities) | {f for m, f in (fields or {}).items() if get_plugin(m).media}
    looks_like_media: dict[str, tuple[int, str, str]] = {}  # field -> (first line, value, modality)

    def add(name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        assert tar is not None
        tar.addfile(info, io.BytesIO(data))

    def finish() -> None:
        assert tar is not None
        tar.close()
        os.replace(_partial(written[-1]), written[-1])
        counts[written[-1].name] = in_shard

    reader = ManifestReader(manifest)
    rows = tqdm(desc="sharding", unit="sample")
    try:
        while True:
            try:
                line_no, row = next(reader)
            except StopIteration:
                break
            except ManifestError as exc:  # one bad line costs that line
                skipped.append(str(exc))
                continue
            if tar is None or in_shard >= shard_size:
                if tar is not None:
                    finish()
                written.append(out / f"{prefix}-{len(written):06d}.tar")
                tar = tarfile.open(_partial(written[-1]), "w")  # noqa: SIM115 - closed when the shard is full
                in_shard = 0
            key = re.sub(r"[^\w-]", "_", str(row.get("id", f"line{line_no}")))
            meta = {
                k: v
                for k, v in row.items()
                if not (k in media_fields or (isinstance(v, str) and v.startswith("data:")))
            }
            for k, v in meta.items():
                if k not in looks_like_media and isinstance(v, str) and "\n" not in v and len(v) < 4096:
                    kind = next((m for m in media_modalities if get_plugin(m).media_types().accepts(v)), None)
                    if kind is not None:
                        looks_like_media[k] = (line_no, v, kind)
            media = {k: v for k, v in row.items() if k not in meta}
            meta["__members__"] = list(media)
            add(f"{key}.json", json.dumps(meta).encode())
            for k, v in media.items():
                try:
                    value = resolve_media(v, manifest.parent)
                    data = Path(value).read_bytes() if isinstance(value, Path) else value
                except (OSError, ValueError) as exc:
                    data = b""
                    print(f"warning: {manifest}:{line_no}: field {k!r}: {exc} (stored empty; counted as bad when read)")
                if isinstance(data, list):
                    data = json.dumps([str(d) for d in data]).encode()
                add(f"{key}.{k}.{_ext(v, k)}", data)
            in_shard += 1
            rows.update()
        if tar is not None:
            finish()
    except BaseException:
        if tar is not None:
            tar.close()
            _partial(written[-1]).unlink(missing_ok=True)
        raise
    finally:
        rows.close()
        reader.close()
    if not counts:
        raise ManifestError(
            f"{manifest}: no line could be read ({len(skipped)} skipped; first: {skipped[0] if skipped else 'empty'})"
        )
    for k, (line_no, value, kind) in looks_like_media.items():
        print(
            f"warning: {manifest}:{line_no}: field {k!r} holds {kind} file names ({value!r}) but is stored as text, "
            f"not as the files: pass --fields {kind}={k} (fields={{'{kind}': '{k}'}}) to store them in the shards"
        )
    if skipped:
        print(f"warning: {manifest}: skipped {len(skipped)} line(s) that do not parse (first: {skipped[0]})")
    index = {"counts": counts, "source": str(manifest), "skipped": skipped[:100], "skipped_count": len(skipped)}
    tmp = out / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, out / INDEX)
    return written


def _partial(path: Path) -> Path:
    """Where a shard is written until it is complete (``.shard-000000.tar.partial``: not a ``*.tar``)."""
    return path.with_name(f".{path.name}.partial")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m one_peace.data.shard``)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m one_peace.data.shard", description=__doc__.split("\n\n")[0])
    p.add_argument("manifest")
    p.add_argument("out_dir")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--fields", default="", help="field map of media fields named otherwise, e.g. image=img,audio=wav")
    args = p.parse_args(argv)
    fields = dict(part.split("=", 1) for part in args.fields.split(",") if part)
    files = write_shards(args.manifest, args.out_dir, args.shard_size, fields=fields)
    print(f"wrote {len(files)} shard(s) to {args.out_dir}")
    return 0


#: manifests up to this size are hashed whole; larger ones by 64 evenly spaced 64 KiB blocks and their mtime
FULL_HASH_LIMIT = 256 * 1024 * 1024


def files_identity(files: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Path, size and content hash of each file (``sha256``: a manifest whole up to 256 MiB, else sampled blocks with
    the modification time; a ``.tar`` shard by its ends and modification time, so that a folder of terabytes is not
    read at start-up), plus the older first-and-last-KiB hash (``sha256_ends``) that earlier runs recorded. A
    same-size edit in the middle of a manifest (two rows swapped) changes it."""
    import hashlib

    entries = []
    for f in files:
        stat = Path(f).stat()
        size = stat.st_size
        ends, content = hashlib.sha256(), hashlib.sha256()
        with open(f, "rb") as fh:
            ends.update(fh.read(1024))
            fh.seek(max(0, size - 1024))
            ends.update(fh.read(1024))
            fh.seek(0)
            if Path(f).suffix == ".tar":  # shards: written once, large and many; never read whole at start-up
                content.update(ends.digest() + str(stat.st_mtime_ns).encode())
            elif size <= FULL_HASH_LIMIT:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    content.update(block)
            else:
                for i in range(64):
                    fh.seek(i * (size - 65536) // 63)
                    content.update(fh.read(65536))
                content.update(str(stat.st_mtime_ns).encode())
        entries.append(
            {
                "path": str(Path(f).resolve()),
                "size": size,
                "sha256_ends": ends.hexdigest()[:16],
                "sha256": content.hexdigest()[:32],
            }
        )
    return entries


def same_identity(recorded: Any, now: Any) -> bool:
    """Whether two :func:`files_identity` results (or dicts / lists holding them) name the same data: equal paths and
    sizes, and equal hashes for every hash both recorded (an identity from before content hashes compares by its
    ends hash)."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        if "path" in recorded and "size" in recorded:
            return _same_file(recorded, now)
        return recorded.keys() == now.keys() and all(same_identity(recorded[k], now[k]) for k in recorded)
    if isinstance(recorded, list) and isinstance(now, list):
        return len(recorded) == len(now) and all(same_identity(a, b) for a, b in zip(recorded, now, strict=True))
    return bool(recorded == now)


def _same_file(recorded: dict[str, Any], now: dict[str, Any]) -> bool:
    shared = [k for k in ("sha256", "sha256_ends") if k in recorded and k in now]
    return bool(shared) and all(recorded[k] == now[k] for k in ("path", "size", *shared))


def describe_change(recorded: Any, now: Any) -> str:
    """What differs between two data identities (as :func:`same_identity` compares them), file by file: ``train.jsonl:
    same size (4,096 bytes), other content``; ``a.tar: 10 -> 12 bytes``; files that came or went; the row count."""

    def files(identity: Any) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        if isinstance(identity, dict) and "path" in identity and "size" in identity:
            found[str(identity["path"])] = identity
        elif isinstance(identity, dict):
            for value in identity.values():
                found.update(files(value))
        elif isinstance(identity, list):
            for value in identity:
                found.update(files(value))
        return found

    before, after = files(recorded), files(now)
    lines = []
    for path in sorted(before.keys() | after.keys()):
        old, new = before.get(path), after.get(path)
        if old is None:
            lines.append(f"{path}: not in the checkpoint's data")
        elif new is None:
            lines.append(f"{path}: gone")
        elif old.get("size") != new.get("size"):
            lines.append(f"{path}: {old.get('size'):,} -> {new.get('size'):,} bytes")
        elif not _same_file(old, new):
            lines.append(f"{path}: same size ({new.get('size'):,} bytes), other content")
    if isinstance(recorded, dict) and isinstance(now, dict) and recorded.get("rows") != now.get("rows"):
        lines.append(f"rows: {recorded.get('rows')} -> {now.get('rows')}")
    return "; ".join(lines) or "the data settings differ"


def source_files(source: str | Path) -> list[Path]:
    """The files a manifest path or shard folder / file stands for."""
    path = Path(source)
    if path.is_file() and path.suffix != ".tar":
        return [path]
    return list_shards(source)


def iter_rows(source: str | Path, extensions: Mapping[str, str] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(index, row)`` of a manifest file or a shard folder / shard file.

    Media of shards arrive as bytes; shard rows also carry ``__shard__`` (the file) and ``__key__`` (the sample's
    key), WebDataset's names, so that a media source can be named. ``extensions`` maps member extensions of shards
    without a one-peace header to the field they also fill (over ``rows.DEFAULT_EXTENSIONS``: ``jpg`` -> ``image``).
    """
    path = Path(source)
    if path.is_file() and path.suffix != ".tar":
        yield from iter_manifest(path)
        return
    files = list_shards(source)
    if not files:
        raise ManifestError(f"{source}: neither a manifest (.jsonl/.tsv) nor a folder of .tar shards")
    from one_peace.data.rows import DEFAULT_EXTENSIONS, ShardRows

    rows = ShardRows(files, {**DEFAULT_EXTENSIONS, **(extensions or {})})  # the loader's reader: one member parser
    try:
        for i in range(len(rows)):
            index, row = rows[i]
            yield index, dict(row)
    finally:
        rows.close()
