"""Evaluation, shared by ``python -m one_peace.eval``, the recipes' ``eval:`` section and validation in training.

An evaluator (:class:`Evaluator`) is called with an :class:`EvalContext` (model, rows, optionally the task and a
loader) and returns JSON-ready results; :func:`build_evaluator` makes one from a spec such as
``{"task": "retrieval", "pair": ["image", "text"]}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from one_peace.eval.base import EvalContext, Evaluator, embed_rows, read_rows
from one_peace.eval.generation import BoxIoUEvaluator, TokenF1Evaluator
from one_peace.eval.metrics import box_iou, chance_recall, classification, recall_at_k, token_f1
from one_peace.eval.retrieval import RetrievalEvaluator
from one_peace.eval.zero_shot import ZeroShotEvaluator, class_embeddings

EVALUATORS: dict[str, type] = {
    "retrieval": RetrievalEvaluator,
    "zero_shot": ZeroShotEvaluator,
    "token_f1": TokenF1Evaluator,
    "iou": BoxIoUEvaluator,
}


def build_evaluator(spec: Mapping[str, Any]) -> Evaluator:
    """An evaluator from ``{"task": name, **options}``; unknown names or options raise naming them."""
    import dataclasses

    spec = dict(spec)
    name = spec.pop("task", None)
    if name not in EVALUATORS:
        raise ValueError(f"eval.task: expected one of {sorted(EVALUATORS)} or none, got {name!r}")
    cls = EVALUATORS[name]
    allowed = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_") and f.name != "name"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"eval: {name} has no option(s) {unknown} (it takes {sorted(allowed)})")
    if "pair" in spec:
        pair = list(spec["pair"])
        if len(pair) != 2:
            raise ValueError(f"eval.pair: expected two modalities, got {pair}")
        spec["pair"] = tuple(pair)
    return cls(**spec)  # type: ignore[no-any-return]


__all__ = [
    "EVALUATORS",
    "BoxIoUEvaluator",
    "EvalContext",
    "Evaluator",
    "RetrievalEvaluator",
    "TokenF1Evaluator",
    "ZeroShotEvaluator",
    "box_iou",
    "build_evaluator",
    "chance_recall",
    "class_embeddings",
    "classification",
    "embed_rows",
    "read_rows",
    "recall_at_k",
    "token_f1",
]
