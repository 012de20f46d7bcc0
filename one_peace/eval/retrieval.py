"""Cross-modal retrieval: recall@k in both directions with several positives per query."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from one_peace.eval.base import EvalContext, embed_rows
from one_peace.eval.metrics import recall_at_k
from one_peace.registry import get_plugin


def _text_key(value: Any) -> Any:
    return " ".join(str(value).lower().split())


@dataclass
class RetrievalEvaluator:
    """Recall@k of retrieving ``pair[1]`` items from ``pair[0]`` queries and back.

    Positives of a query are the items of its group: rows sharing ``group_field``; without it, rows with the
    same text when one side is text (demo and caption data repeat captions); otherwise the row itself.

    Attributes:
        pair: The two modalities, e.g. ``("image", "text")``.
        group_field: Row field whose equal values make rows positives of each other.
        ks: The k of recall@k.
    """

    pair: tuple[str, str] = ("image", "text")
    group_field: str | None = None
    ks: Sequence[int] = (1, 5, 10)
    name: str = "retrieval"

    def groups(self, ctx: EvalContext) -> list[Any]:
        """The group key of every row."""
        if self.group_field is not None:
            missing = [i for i, r in enumerate(ctx.rows) if self.group_field not in r]
            if missing:
                raise ValueError(f"eval.group_field: rows {missing[:5]} have no field {self.group_field!r}")
            return [r[self.group_field] for r in ctx.rows]
        for m in self.pair:  # rows with the same text (a non-media value) are one group
            if not get_plugin(m).media:
                return [_text_key(r.get(ctx.field_of(m))) for r in ctx.rows]
        return [("row", i) for i in range(len(ctx.rows))]

    def __call__(self, ctx: EvalContext) -> dict[str, Any]:
        """Recall@k both ways, chance levels, counts and skipped rows."""
        a, b = self.pair
        ea, ok_a, bad_a = embed_rows(ctx, a)
        eb, ok_b, bad_b = embed_rows(ctx, b)
        both = ok_a & ok_b
        ea, eb = ea[both[ok_a]], eb[both[ok_b]]
        groups = [g for g, keep in zip(self.groups(ctx), both.tolist()) if keep]
        out: dict[str, Any] = {}
        for q, g, qn, gn in ((ea, eb, a, b), (eb, ea, b, a)):
            res = recall_at_k(q, g, groups, groups, self.ks)
            for k in self.ks:
                out[f"{qn}->{gn}/R@{k}"] = res[f"R@{k}"]
                out[f"{qn}->{gn}/chance@{k}"] = res[f"chance@{k}"]
        out["samples"] = float(int(both.sum()))
        out["skipped"] = bad_a + bad_b
        return out

    def summary(self, result: Mapping[str, Any]) -> str:
        """``a->b R@1 x (chance y), ...``."""
        a, b = self.pair
        parts = []
        for q, g in ((a, b), (b, a)):
            parts.append(
                f"{q}->{g} "
                + " ".join(f"R@{k} {result[f'{q}->{g}/R@{k}']:.3f}" for k in self.ks)
                + f" (chance R@1 {result[f'{q}->{g}/chance@1']:.3f})"
            )
        return "retrieval: " + "; ".join(parts) + f"; {int(result['samples'])} pairs"
