"""The embedding-folder format, in one place: what ``info.json`` holds, which metadata columns are reserved, how
the metadata schema is fixed, and the model identity every reader checks.

``info.json`` (``format`` 2)::

    format            2
    model             {"checkpoint", "bpe_dir", "hash", "size"}: ``hash`` is the model's identity (config, weights
                      rounded to bfloat16, tokenizer): the same whether the model ran in float32 or bfloat16
    modality, field, id_field, dim, dtype ("float16" | "float32"), metric ("inner_product"), normalized (true)
    plugin            the embedded modality's plugin record (distribution, version, source, full options)
    plugins           every modality of the model -> its plugin record
    preprocessing     {"options", "long_text", "description"}
    schema            metadata column -> arrow type (fixed by the first parts; a column whose type changes is text)
    reserved          the columns embed computes (``id``, ``row``, ``source``, ``source_kind``, ``source_member``:
                      ``"<offset>:<size>:<extension>"`` of a shard item's member, read without scanning the tar)
    duplicate_ids     "error" (refused: ids name items) or "keep"
    sources           one record per embedded manifest / shard folder (absolute path, identity, parts, rows)
    part_size, count, bad, index

Row fields named like a reserved column are kept as ``field.<name>`` (they never overwrite what embed computed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 2
#: formats this version reads (format 1 folders are read as they are: no schema, no plugin record)
READABLE = (1, 2)
#: metadata columns embed computes; a row field of one of these names is stored as ``field.<name>``
RESERVED_COLUMNS = ("id", "row", "source", "source_kind", "source_member")
#: the columns of timed segments' rows, reserved too in folders cut into segments (``embed segments.window=``)
SEGMENT_COLUMNS = ("parent_id", "start", "end")
DUPLICATE_POLICIES = ("error", "keep")


def row_metadata(
    row: Mapping[str, Any], skip: Sequence[str] = (), reserved: Sequence[str] = RESERVED_COLUMNS
) -> dict[str, Any]:
    """A row's own fields for the metadata: internal (``__x__``) and byte fields dropped, ``skip`` dropped, reserved
    names moved to ``field.<name>``."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key.startswith("__") or isinstance(value, bytes | bytearray) or key in skip:
            continue
        out[f"field.{key}" if key in reserved else key] = value
    return out


def model_hash(model: Any) -> str:
    """The model's identity: sha256 of its config (run-time choices left out), its weights (names, shapes, and the
    values rounded to bfloat16, so a float32 and a bfloat16 run of one checkpoint hash alike) and its tokenizer.

    An official ``.pt`` and the folder converted from it hash alike, since the weights are the same.
    """
    h = hashlib.sha256()
    config = dict(vars(model.config))
    config.pop("attn_backend", None)  # a runtime choice, not part of what the model computes
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu")
        t = (t.to(torch.bfloat16) if t.is_floating_point() else t).contiguous()
        h.update(f"{name}:{'float' if tensor.is_floating_point() else t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    inner = getattr(getattr(model, "tokenizer", None), "tokenizer", None)
    if inner is not None and hasattr(inner, "to_str"):
        h.update(inner.to_str().encode())
    return h.hexdigest()[:32]


def check_query_model(info: Mapping[str, Any], model: Any, where: str, checkpoint: str | None) -> None:
    """Refuse a query model whose identity differs from the one the folder was embedded with.

    Raises:
        ValueError: naming both hashes and checkpoints.
    """
    recorded = (info.get("model") or {}).get("hash")
    if not recorded:
        return
    digest = model_hash(model)
    if digest != recorded:
        raise ValueError(
            f"{where}: embedded with model {recorded} ({(info.get('model') or {}).get('checkpoint')}); the query "
            f"model {checkpoint or '(given)'} is {digest}. Its vectors do not live in the folder's space: query with "
            "the folder's model, or embed again with this one"
        )


def read_info(path: Path) -> dict[str, Any]:
    """``info.json`` of an embedding folder, checked (format version, the keys readers rely on).

    Raises:
        ValueError: naming the file and the key.
    """
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if info.get("format") not in READABLE:
        raise ValueError(f"{path}: format {info.get('format')!r} is not one this version reads ({list(READABLE)})")
    for key, kind in (("modality", str), ("dim", int), ("model", dict), ("sources", list)):
        if key in info and not isinstance(info[key], kind):
            raise ValueError(f"{path}: {key!r} must be {kind.__name__}, got {type(info[key]).__name__}")
    return info


def unify_schema(schemas: Sequence[Any]) -> Any:
    """One arrow schema for tables of parts: a column keeps its type where every part agrees (nulls aside), and
    becomes text where parts disagree (``5`` in one part, ``"5a"`` in the next)."""
    import pyarrow as pa

    types: dict[str, Any] = {}
    for schema in schemas:
        for f in schema:
            seen = types.get(f.name)
            if seen is None or pa.types.is_null(seen):
                types[f.name] = f.type
            elif not pa.types.is_null(f.type) and f.type != seen:
                types[f.name] = pa.string()
    return pa.schema([(name, t if not pa.types.is_null(t) else pa.string()) for name, t in types.items()])


def conform(table: Any, schema: Any) -> Any:
    """``table`` with ``schema``'s columns (missing ones null) cast to its types (text for mismatches)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            if col.type != f.type:
                col = pc.cast(col, f.type) if pa.types.is_string(f.type) else col.cast(f.type)
            columns.append(col)
        else:
            columns.append(pa.nulls(table.num_rows, type=f.type))
    return pa.table(columns, schema=schema)


def schema_json(schema: Any) -> dict[str, str]:
    """Column -> type name (for ``info.json``)."""
    return {f.name: str(f.type) for f in schema}
