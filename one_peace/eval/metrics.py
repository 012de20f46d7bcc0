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


def recall_at_k(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    query_groups: Sequence[Hashable],
    gallery_groups: Sequence[Hashable],
    ks: Sequence[int] = (1, 5, 10),
    chunk: int | None = None,
) -> dict[str, float]:
    """Recall@k of retrieving the gallery items of a query's group, several positives per query.

    A query is correct at ``k`` when one of its positives ranks in the top ``k``; its rank is the number of
    non-positive gallery items scoring higher than its best positive. Queries without a positive are left out
    (``queries`` counts those kept). Similarities are computed ``chunk`` queries at a time.

    Returns:
        ``R@k`` and ``chance@k`` for each k, ``queries`` and ``gallery``.
    """
    if len(queries) != len(query_groups) or len(gallery) != len(gallery_groups):
        raise ValueError("recall_at_k: one group key per query and per gallery item")
    ids = group_ids([*query_groups, *gallery_groups])
    qg, gg = ids[: len(query_groups)], ids[len(query_groups) :]
    n = len(gallery)
    chunk = chunk or max(1, MAX_CHUNK_ELEMENTS // max(1, n))
    ranks, positives = [], []
    g = gallery.float()
    for start in range(0, len(queries), chunk):
        sim = queries[start : start + chunk].float() @ g.T
        same = qg[start : start + chunk, None] == gg[None, :]
        best = sim.masked_fill(~same, float("-inf")).max(1).values
        ranks.append((sim.masked_fill(same, float("-inf")) > best[:, None]).sum(1))
        positives.append(same.sum(1))
    rank = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)
    pos = torch.cat(positives) if positives else torch.zeros(0, dtype=torch.long)
    keep = pos > 0
    rank, pos = rank[keep], pos[keep]
    out: dict[str, float] = {}
    for k in ks:
        out[f"R@{k}"] = float((rank < k).float().mean()) if len(rank) else 0.0
        out[f"chance@{k}"] = chance_recall(pos, n, k)
    out["queries"] = float(len(rank))
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
