"""Cross-modal retrieval by the standard protocol (CLIP_benchmark, the COCO / Flickr30k papers).

Rows pair an item of one modality with an item of the other (COCO / Flickr: one row per caption, each image on
several rows). Each side is reduced to its **unique** items (media by their value: path, data URI or bytes; texts by
their whitespace- and case-normalised string); an item's positives are every item of the other side it shares a row
with, so an image's positives are all its captions and text->image ranks each caption against unique images.
``group_field`` adds "these rows are the same class": every item of a group is a positive of every item of the
other side in that group. Ties are ordered as a random order would in expectation (a model giving every item the
same vector scores exactly the chance level).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from one_peace.eval.base import EvalContext, embed_rows
from one_peace.eval.metrics import recall_at_k
from one_peace.registry import get_plugin


def _text_key(value: Any) -> Any:
    return " ".join(str(value).lower().split())


def item_key(value: Any, media: bool) -> Any:
    """What makes two rows' values the same item: a media value itself (bytes by digest), a normalised text."""
    if not media:
        return ("string", _text_key(value))
    if isinstance(value, bytes | bytearray | memoryview):
        return ("bytes", hashlib.sha256(bytes(value)).hexdigest())
    if isinstance(value, list | dict):
        return ("json", json.dumps(value, sort_keys=True, default=str))
    return ("value", str(value))


@dataclass
class RetrievalEvaluator:
    """Recall@k of retrieving ``pair[1]`` items from ``pair[0]`` queries and back (module docstring).

    Attributes:
        pair: The two modalities, e.g. ``("image", "text")``.
        group_field: Row field whose equal values make rows' items positives of each other (class labels).
        ks: The k of recall@k (positive integers).
    """

    pair: tuple[str, str] = ("image", "text")
    group_field: str | None = None
    ks: Sequence[int] = (1, 5, 10)
    name: str = "retrieval"

    def __post_init__(self) -> None:
        self.pair = tuple(self.pair)  # type: ignore[assignment]
        if len(self.pair) != 2 or self.pair[0] == self.pair[1]:
            raise ValueError(f"pair: expected two different modalities, got {list(self.pair)}")
        ks = list(self.ks)
        if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
            raise ValueError(f"ks: expected a list of positive integers, got {ks}")
        self.ks = sorted(set(ks))

    def _check(self, ctx: EvalContext) -> None:
        have = list(getattr(ctx.model, "adapters", {}) or [])
        for side in self.pair:  # a fused side (video+audio) needs each of its modalities
            absent = [m for m in side.split("+") if have and m not in have]
            if absent:
                raise ValueError(f"pair: the model has no {absent[0]!r} modality (it has {have})")
        if not ctx.rows:
            raise ValueError("data: no rows to evaluate (an empty manifest, or limit=0)")
        for m in (m for side in self.pair for m in side.split("+")):
            fld = ctx.field_of(m)
            if not any(isinstance(r, Mapping) and r.get(fld) is not None for r in ctx.rows):
                raise ValueError(
                    f"fields.{m}: no row has a field {fld!r} (rows have {sorted(ctx.rows[0])}); "
                    f"map it with fields.{m}=<field>"
                )
        if self.group_field is not None:
            missing = [i for i, r in enumerate(ctx.rows) if self.group_field not in r]
            if missing:
                raise ValueError(f"group_field: rows {missing[:5]} have no field {self.group_field!r}")

    def _items(self, ctx: EvalContext, modality: str) -> tuple[list[int], list[int]]:
        """Per row, its item number on this side (-1: no value); and per item, the first row holding it."""
        parts = modality.split("+")  # a fused side's item: the values of each of its modalities' fields
        media = [get_plugin(m).media for m in parts]
        fields = [ctx.field_of(m) for m in parts]
        table: dict[Any, int] = {}
        of_row: list[int] = []
        first: list[int] = []
        for i, row in enumerate(ctx.rows):
            values = [row.get(f) if isinstance(row, Mapping) else None for f in fields]
            if any(v is None for v in values):
                of_row.append(-1)
                continue
            keys = [item_key(v, m) for v, m in zip(values, media)]
            key = keys[0] if len(keys) == 1 else tuple(keys)
            if key not in table:
                table[key] = len(first)
                first.append(i)
            of_row.append(table[key])
        return of_row, first

    def __call__(self, ctx: EvalContext) -> dict[str, Any]:
        """Recall@k both ways, chance levels, item counts and skipped rows."""
        self._check(ctx)
        a, b = self.pair
        sides = {}
        skipped: list[dict[str, Any]] = []
        for m in self.pair:
            of_row, first = self._items(ctx, m)
            unique = dataclasses.replace(ctx, rows=[ctx.rows[i] for i in first])
            emb, ok, bad = embed_rows(unique, m)
            skipped += bad
            # item number -> its row in ``emb`` (only items that embedded)
            position = {item: n for n, item in enumerate(int(i) for i in ok.nonzero().flatten())}
            sides[m] = (of_row, emb, position)
        (rows_a, emb_a, pos_a), (rows_b, emb_b, pos_b) = sides[a], sides[b]
        pairs: set[tuple[int, int]] = set()
        used = 0
        groups: dict[Any, tuple[set[int], set[int]]] = {}
        for i, (ia, ib) in enumerate(zip(rows_a, rows_b, strict=True)):
            if ia < 0 or ib < 0 or ia not in pos_a or ib not in pos_b:
                continue
            used += 1
            pairs.add((pos_a[ia], pos_b[ib]))
            if self.group_field is not None:
                left, right = groups.setdefault(ctx.rows[i][self.group_field], (set(), set()))
                left.add(pos_a[ia])
                right.add(pos_b[ib])
        for left, right in groups.values():
            pairs.update((x, y) for x in left for y in right)
        if not used:
            raise ValueError(
                f"no row has both a usable {a!r} and a usable {b!r} ({len(ctx.rows)} rows, {len(skipped)} items "
                "skipped: see 'skipped')"
            )
        forward: list[list[int]] = [[] for _ in range(len(emb_a))]
        backward: list[list[int]] = [[] for _ in range(len(emb_b))]
        for x, y in sorted(pairs):
            forward[x].append(y)
            backward[y].append(x)
        out: dict[str, Any] = {}
        for q, g, positives, qn, gn in ((emb_a, emb_b, forward, a, b), (emb_b, emb_a, backward, b, a)):
            res = recall_at_k(q, g, ks=self.ks, positives=positives)
            for k in self.ks:
                out[f"{qn}->{gn}/R@{k}"] = res[f"R@{k}"]
                out[f"{qn}->{gn}/chance@{k}"] = res[f"chance@{k}"]
            out[f"{qn}->{gn}/queries"] = res["queries"]
        out["samples"] = float(used)
        out[f"{a}_items"] = float(len(emb_a))
        out[f"{b}_items"] = float(len(emb_b))
        out["protocol"] = "unique items per side; positives: shared rows" + (
            f" and equal {self.group_field!r}" if self.group_field else ""
        )
        out["skipped"] = skipped
        return out

    def summary(self, result: Mapping[str, Any]) -> str:
        """``a->b R@1 x (chance y), ...``."""
        a, b = self.pair
        first = self.ks[0]
        parts = []
        for q, g in ((a, b), (b, a)):
            parts.append(
                f"{q}->{g} "
                + " ".join(f"R@{k} {result[f'{q}->{g}/R@{k}']:.3f}" for k in self.ks)
                + f" (chance R@{first} {result[f'{q}->{g}/chance@{first}']:.3f})"
            )
        counts = f"{int(result['samples'])} rows, {int(result[f'{a}_items'])} {a} / {int(result[f'{b}_items'])} {b}"
        return "retrieval: " + "; ".join(parts) + f"; {counts}"
