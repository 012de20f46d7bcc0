"""Metrics with no model in them: grouped recall@k (chunked), its chance level, classification, token F1, IoU."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch

#: similarity rows computed at once: never a full N x N matrix for large N
MAX_CHUNK_ELEMENTS = 1 << 24


def group_ids(keys: Sequence[Hashable]) -> torch.Tensor:
    """``(N,)`` integer ids, equal where the keys are equal."""
    table: dict[Hashable, int] = {}
    return torch.tensor([table.setdefault(k, len(table)) for k in keys], dtype=torch.long)


def chance_recall(positives: torch.Tensor, gallery: int, k: int) -> float:
    """Expected recall@k of a random ranking: mean over queries of ``1 - C(N - p, k) / C(N, k)``."""
    p = positives.double()
    miss = torch.ones_like(p)
    for i in range(min(k, gallery)):
        miss = miss * ((gallery - p - i).clamp(min=0) / (gallery - i))
    return float((1 - miss).mean()) if len(p) else 0.0


#: scores this close to a query's best positive count as tied with it (float32 sums of equal vectors may differ in
#: the last bits with their position in a matrix product)
TIE_TOLERANCE = 1e-6


def _expected_hits(above: torch.Tensor, tied_neg: torch.Tensor, tied_pos: torch.Tensor, k: int) -> torch.Tensor:
    """Per query, the probability that a positive is in the top ``k`` when tied scores are ordered at random:
    ``above`` negatives score higher than the best positive, ``tied_neg`` negatives and ``tied_pos`` positives tie
    with it. A positive is missed when the ``m = k - above`` slots left are all taken by tied negatives:
    ``C(tied_neg, m) / C(tied_neg + tied_pos, m)``."""
    m = k - above
    miss = torch.ones_like(above, dtype=torch.float64)
    tn, tp = tied_neg.double(), tied_pos.double()
    for i in range(k):
        factor = ((tn - i).clamp(min=0) / (tn + tp - i).clamp(min=1)).clamp(max=1.0)
        miss = torch.where(m > i, miss * factor, miss)
    return torch.where(m > 0, 1.0 - miss, torch.zeros_like(miss))


def recall_at_k(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    query_groups: Sequence[Hashable] | None = None,
    gallery_groups: Sequence[Hashable] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int | None = None,
    positives: Sequence[Sequence[int]] | None = None,
) -> dict[str, float]:
    """Recall@k of retrieving a query's positives from the gallery, several positives per query, ties honest.

    Positives are given either as groups (a gallery item is a positive of the queries of its group) or as
    ``positives[i]``: the gallery positions of query ``i``'s positives. A query scores at ``k`` when one of its
    positives ranks in the top ``k``; tied scores are ordered as a random order would in expectation, so a model
    giving every item the same vector scores exactly the chance level. Queries without a positive are left out
    (``queries`` counts those kept). Similarities are computed ``chunk`` queries at a time.

    Returns:
        ``R@k`` and ``chance@k`` for each k, ``queries`` and ``gallery``.

    Raises:
        ValueError: neither or both of groups and ``positives``, lengths that do not match, or a k below 1.
    """
    if any(int(k) < 1 for k in ks) or not ks:
        raise ValueError(f"ks: expected positive integers, got {list(ks)}")
    n = len(gallery)
    if positives is None:
        if query_groups is None or gallery_groups is None:
            raise ValueError("recall_at_k: give query_groups and gallery_groups, or positives")
        if len(queries) != len(query_groups) or n != len(gallery_groups):
            raise ValueError("recall_at_k: one group key per query and per gallery item")
        ids = group_ids([*query_groups, *gallery_groups])
        qg, gg = ids[: len(query_groups)], ids[len(query_groups) :]
    elif len(positives) != len(queries):
        raise ValueError(f"recall_at_k: {len(positives)} positive lists for {len(queries)} queries")
    chunk = chunk or max(1, MAX_CHUNK_ELEMENTS // max(1, n))
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    g = gallery.float()
    for start in range(0, len(queries), chunk):
        sim = queries[start : start + chunk].float() @ g.T
        if positives is None:
            same = qg[start : start + chunk, None] == gg[None, :]
        else:
            same = torch.zeros(sim.shape, dtype=torch.bool)
            rows = [(r, c) for r, cols in enumerate(positives[start : start + chunk]) for c in cols]
            if rows:
                index = torch.tensor(rows, dtype=torch.long)
                same[index[:, 0], index[:, 1]] = True
        best = sim.masked_fill(~same, float("-inf")).max(1).values[:, None]
        tol = TIE_TOLERANCE * best.abs().clamp(min=1.0)
        above = ((sim > best + tol) & ~same).sum(1)
        tied = (sim - best).abs() <= tol
        parts.append((above, (tied & ~same).sum(1), (tied & same).sum(1), same.sum(1)))
    empty = torch.zeros(0, dtype=torch.long)
    above, tied_neg, tied_pos, pos = (torch.cat(list(p)) for p in zip(*parts)) if parts else (empty,) * 4
    keep = pos > 0
    above, tied_neg, tied_pos, pos = above[keep], tied_neg[keep], tied_pos[keep], pos[keep]
    out: dict[str, float] = {}
    for k in ks:
        hits = _expected_hits(above, tied_neg, tied_pos, int(k))
        out[f"R@{k}"] = float(hits.mean()) if len(hits) else 0.0
        out[f"chance@{k}"] = chance_recall(pos, n, int(k))
    out["queries"] = float(int(keep.sum()))
    out["gallery"] = float(n)
    return out


def classification(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """Top-1 / top-5 accuracy, per-class accuracy and the confusion matrix (rows: true class, columns: predicted)."""
    c = len(classes)
    top = logits.topk(min(5, c), dim=1).indices
    pred = top[:, 0]
    confusion = torch.zeros(c, c, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class = {
        name: (float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None)
        for i, name in enumerate(classes)
    }
    return {
        "top1": float((pred == labels).float().mean()) if len(labels) else 0.0,
        "top5": float((top == labels[:, None]).any(1).float().mean()) if len(labels) else 0.0,
        "chance_top1": 1.0 / c if c else 0.0,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "samples": len(labels),
    }


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 of two whitespace-tokenised strings."""
    pt, rt = prediction.split(), reference.split()
    common = sum((Counter(pt) & Counter(rt)).values())
    if not pt or not rt or not common:
        return 0.0
    prec, rec = common / len(pt), common / len(rt)
    return 2 * prec * rec / (prec + rec)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mean(values: Sequence[float]) -> float:
    """Mean (0.0 for nothing)."""
    return float(np.mean(values)) if len(values) else 0.0
