"""The evaluator protocol, what evaluators are given, and reading evaluation rows."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from one_peace.errors import DataError, UndecodableMedia, bad_record
from one_peace.registry import get_plugin


@dataclass
class EvalContext:
    """What an evaluator may use.

    Attributes:
        model: The encoder (:class:`one_peace.OnePeaceModel`).
        rows: The evaluation rows (manifest rows; shard rows carry media as bytes).
        base_dir: Folder that relative media paths of ``rows`` are resolved against.
        task: The training task (evaluators that generate text or boxes need its decoder).
        loader: Batches of ``rows`` for the task (generating evaluators).
        train_rows: Training rows, for baselines that must not come from the evaluation split.
        batch_size: Items per forward.
        fields: Modality -> row field (default: the modality's name).
    """

    model: Any
    rows: list[dict[str, Any]]
    base_dir: Path = Path(".")
    task: Any = None
    loader: Any = None
    train_rows: list[dict[str, Any]] | None = None
    batch_size: int = 64
    fields: dict[str, str] = field(default_factory=dict)

    def field_of(self, modality: str) -> str:
        """The row field holding ``modality``."""
        return self.fields.get(modality, modality)


class Evaluator(Protocol):
    """Something that measures a model on an :class:`EvalContext` and returns JSON-ready results."""

    name: str

    def __call__(self, ctx: EvalContext) -> dict[str, Any]:
        """Run the evaluation."""
        ...

    def summary(self, result: Mapping[str, Any]) -> str:
        """One line for the log."""
        ...


def read_rows(source: str | Path, limit: int | None = None) -> tuple[list[dict[str, Any]], Path]:
    """Rows of a manifest or shard folder (at most ``limit``) and the folder media paths are relative to."""
    from one_peace.data.shards import iter_rows

    rows = []
    for i, (_, row) in enumerate(iter_rows(str(source))):
        if limit is not None and i >= limit:
            break
        rows.append(row)
    path = Path(source)
    return rows, (path.parent if path.is_file() else path)


def embed_rows(
    ctx: EvalContext, modality: str, values: Sequence[Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """Embeddings of ``modality`` for every row that decodes: ``(N_ok, D)``, the ``(N,)`` ok mask, bad rows.

    ``values`` replaces the rows' field (e.g. class prompts); a row that does not decode is skipped and listed.
    """
    from one_peace.models.encoding import embed_samples, preprocessor

    model = ctx.model
    if "+" in modality:
        return _embed_fused_rows(ctx, modality.split("+"))
    prep: Callable[[Any], dict[str, Any]] = preprocessor(model, modality)
    plugin = get_plugin(modality)
    fld = ctx.field_of(modality)
    items: list[Any] = list(values) if values is not None else list(ctx.rows)
    ok = torch.zeros(len(items), dtype=torch.bool)
    bad: list[dict[str, Any]] = []

    def samples() -> Iterator[tuple[int, list[dict[str, Any]]]]:
        for i, value in enumerate(items):
            row = value if values is None else {fld: value}
            try:
                if "__error__" in row:  # a row that could not be read (a damaged line, a broken shard)
                    raise UndecodableMedia(str(row["__error__"]))
                sample = prep(plugin.read_field(row, fld, ctx.base_dir))
            except DataError as exc:
                row_id = ctx.rows[i].get("id", i) if values is None and i < len(ctx.rows) else i
                unreadable = isinstance(exc, UndecodableMedia) and "__error__" in row
                bad.append(bad_record(row_id, exc, "row" if unreadable else modality))
                continue
            ok[i] = True
            yield i, [sample]

    embs = [emb for _, emb in embed_samples(model, modality, samples(), ctx.batch_size)]
    dim = model.config.embed_dim
    out = torch.stack(embs).float().cpu() if embs else torch.zeros(0, dim)
    return out, ok, bad


def _embed_fused_rows(ctx: EvalContext, parts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """:func:`embed_rows` of a fused item (``video+audio``): each row's field of every part, one joint pass."""
    from one_peace.models.encoding import embed_fused_samples, preprocessor

    model = ctx.model
    for m in parts:
        if m not in model.adapters:
            raise KeyError(f"modality {m!r} is not in this model (it has {list(model.adapters)})")
    ok = torch.zeros(len(ctx.rows), dtype=torch.bool)
    bad: list[dict[str, Any]] = []

    def samples() -> Iterator[tuple[int, dict[str, Any]]]:
        for i, row in enumerate(ctx.rows):
            sample: dict[str, Any] = {}
            try:
                if "__error__" in row:
                    raise UndecodableMedia(str(row["__error__"]))
                for m in parts:
                    value = get_plugin(m).read_field(row, ctx.field_of(m), ctx.base_dir)
                    sample[m] = preprocessor(model, m)(value)
            except DataError as exc:
                bad.append(bad_record(row.get("id", i), exc, "+".join(parts)))
                continue
            ok[i] = True
            yield i, sample

    embs = [emb for _, emb in embed_fused_samples(model, parts, samples(), ctx.batch_size)]
    out = torch.stack(embs).float().cpu() if embs else torch.zeros(0, model.config.embed_dim)
    return out, ok, bad
