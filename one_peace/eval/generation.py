"""Evaluators of a seq2seq task's generations: token F1 / exact match of text, IoU of grounding boxes.

Baselines come from the training rows (most frequent training caption, mean training box), never from the
evaluation split.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from one_peace.eval.base import EvalContext
from one_peace.eval.metrics import box_iou, mean, token_f1


@dataclass
class TokenF1Evaluator:
    """Generated text against the references of ``target_field``: token F1 and exact match.

    Attributes:
        target_field: Row field holding the reference text.
        closed_set: Row field whose training values are the only allowed outputs (classification as generation).
        beam: Beam size.
    """

    target_field: str = "caption"
    closed_set: str | None = None
    beam: int = 1
    name: str = "token_f1"

    @torch.no_grad()
    def __call__(self, ctx: EvalContext) -> dict[str, Any]:
        """Token F1, exact match, the most-frequent-training-caption baseline and a few examples."""
        task, train = ctx.task, ctx.train_rows or []
        task.eval()
        closed = sorted({str(r[self.closed_set]) for r in train if self.closed_set in r}) if self.closed_set else None
        preds, refs = [], []
        for batch in ctx.loader:
            gen = task.generate(batch, beam=self.beam, closed_set=closed)
            for p, r, ok in zip(gen, batch["raw"][self.target_field], batch["valid"].tolist()):
                if ok:
                    preds.append(p)
                    refs.append(str(r).lower())
        train_refs = [str(r[self.target_field]).lower() for r in train if self.target_field in r]
        baseline = Counter(train_refs or refs).most_common(1)[0][0] if (train_refs or refs) else ""
        return {
            "token_f1": mean([token_f1(p, r) for p, r in zip(preds, refs)]),
            "exact_match": mean([float(p == r) for p, r in zip(preds, refs)]),
            "baseline_token_f1": mean([token_f1(baseline, r) for r in refs]),
            "baseline_caption": baseline,
            "samples": len(preds),
            "examples": [{"generated": p, "reference": r} for p, r in list(zip(preds, refs))[:8]],
        }

    def summary(self, result: Mapping[str, Any]) -> str:
        """``token F1 x (baseline y), exact match z``."""
        return (
            f"validation: token F1 {result['token_f1']:.3f} (most-frequent-caption baseline "
            f"{result['baseline_token_f1']:.3f}), exact match {result['exact_match']:.3f}"
        )


@dataclass
class BoxIoUEvaluator:
    """Grounding: IoU of generated boxes with the references, against predicting the mean training box.

    Attributes:
        box_field: Row field holding ``[x0, y0, x1, y1]`` in the training rows (for the baseline).
        beam: Beam size.
    """

    box_field: str | None = "box"
    beam: int = 1
    name: str = "iou"

    @torch.no_grad()
    def __call__(self, ctx: EvalContext) -> dict[str, Any]:
        """Mean IoU, Acc@0.5 and the mean-training-box baseline."""
        task = ctx.task
        task.eval()
        pairs = []
        for batch in ctx.loader:
            for (pred, ref), ok in zip(task.generate_boxes(batch, beam=self.beam), batch["valid"].tolist()):
                if ok:
                    pairs.append((pred, ref))
        ious = [box_iou(p, r) if p is not None else 0.0 for p, r in pairs]
        train_boxes = [
            [v * 1.0 for v in r[self.box_field]]
            for r in (ctx.train_rows or [])
            if self.box_field and isinstance(r.get(self.box_field), list | tuple)
        ]
        source = train_boxes or [r for _, r in pairs]
        mean_box = [float(np.mean([r[i] for r in source])) for i in range(4)] if source else [0.0] * 4
        base = [box_iou(mean_box, r) for _, r in pairs]
        return {
            "mean_iou": mean(ious),
            "acc@0.5": mean([float(i >= 0.5) for i in ious]),
            "baseline_mean_iou": mean(base),
            "baseline_acc@0.5": mean([float(i >= 0.5) for i in base]),
            "samples": len(pairs),
        }

    def summary(self, result: Mapping[str, Any]) -> str:
        """``grounding: mean IoU x, Acc@0.5 y (baseline ...)``."""
        return (
            f"validation grounding: mean IoU {result['mean_iou']:.3f}, Acc@0.5 {result['acc@0.5']:.3f} "
            f"(predicting the mean training box: {result['baseline_mean_iou']:.3f} / "
            f"{result['baseline_acc@0.5']:.3f})"
        )
