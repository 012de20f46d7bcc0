"""Evaluators of a seq2seq task's generations: token F1 / exact match of text, IoU of grounding boxes.

Baselines come from the training rows (most frequent training caption, mean training box), never from the
evaluation split.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
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
        return text_metrics(preds, refs, baseline)

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
        train_boxes = [
            [v * 1.0 for v in r[self.box_field]]
            for r in (ctx.train_rows or [])
            if self.box_field and isinstance(r.get(self.box_field), list | tuple)
        ]
        source = train_boxes or [r for _, r in pairs]
        mean_box = [float(np.mean([r[i] for r in source])) for i in range(4)] if source else [0.0] * 4
        return box_metrics(pairs, mean_box)

    def summary(self, result: Mapping[str, Any]) -> str:
        """``grounding: mean IoU x, Acc@0.5 y (baseline ...)``."""
        return (
            f"validation grounding: mean IoU {result['mean_iou']:.3f}, Acc@0.5 {result['acc@0.5']:.3f} "
            f"(predicting the mean training box: {result['baseline_mean_iou']:.3f} / "
            f"{result['baseline_acc@0.5']:.3f})"
        )


def text_metrics(preds: list[str], refs: list[str], baseline: str) -> dict[str, Any]:
    """Token F1 and exact match of ``preds`` against ``refs``, and of always answering ``baseline``."""
    return {
        "token_f1": mean([token_f1(p, r) for p, r in zip(preds, refs)]),
        "exact_match": mean([float(p == r) for p, r in zip(preds, refs)]),
        "baseline_token_f1": mean([token_f1(baseline, r) for r in refs]),
        "baseline_exact_match": mean([float(baseline == r) for r in refs]),
        "baseline_caption": baseline,
        "samples": len(preds),
        "examples": [{"generated": p, "reference": r} for p, r in list(zip(preds, refs))[:8]],
    }


def box_metrics(pairs: list[tuple[list[float] | None, list[float]]], mean_box: list[float]) -> dict[str, Any]:
    """Mean IoU and Acc@0.5 of ``(predicted or None, reference)`` boxes, and of always predicting ``mean_box``."""
    ious = [box_iou(p, r) if p is not None else 0.0 for p, r in pairs]
    base = [box_iou(mean_box, r) for _, r in pairs]
    return {
        "mean_iou": mean(ious),
        "acc@0.5": mean([float(i >= 0.5) for i in ious]),
        "baseline_mean_iou": mean(base),
        "baseline_acc@0.5": mean([float(i >= 0.5) for i in base]),
        "baseline_box": mean_box,
        "samples": len(pairs),
    }


def evaluate_generator(
    generator: Any,
    rows: list[dict[str, Any]],
    base_dir: Path,
    settings: Any,
    train_rows: list[dict[str, Any]] | None = None,
    batch_size: int = 16,
    target_field: str | None = None,
) -> dict[str, Any]:
    """``python -m one_peace.eval task=generation``: generate for ``rows`` with a checkpoint's decoder
    (:class:`one_peace.generation.Generator`) and score the outputs against the rows' ``target_field`` (default:
    the instruction's target slot) as the run's validation does.

    Text: token F1 and exact match (and accuracy for a closed set). Boxes: mean IoU and Acc@0.5. Each beside its
    baseline: the most frequent training text (the majority label) or the mean training box, from ``train_rows``
    when given, else from the checkpoint's record (computed from its run's training rows). Rows that cannot be read
    are skipped and listed (``bad``).
    """
    from one_peace.checkpoint.generators import BOX_TARGET, TEXT_TARGET
    from one_peace.errors import DataError, bad_record
    from one_peace.tokenizer import LANGUAGE
    from one_peace.train.instructions import dequantize_box, quantize_box

    t = settings.instruction.templates[settings.template]
    slot = next((s for s in t.target_slots if s.kind == ("box" if settings.kind == BOX_TARGET else LANGUAGE)), None)
    target = target_field or (slot.field if slot is not None else None)
    if target is None:
        raise ValueError("target_field: the instruction has no target slot to score against; name the field")
    usable, bad = [], []
    for number, row in enumerate(rows):
        if target not in row:
            bad.append({"id": row.get("id", f"#{number}"), "row": number, "reason": f"no {target!r} field"})
        else:
            usable.append((number, row))
    outputs: dict[int, Any] = {}
    for number, got in generator.stream(usable, settings, base_dir, batch_size):
        if isinstance(got, DataError):
            bad.append(bad_record(rows[number].get("id", f"#{number}"), got, "row", row=number))
        else:
            outputs[number] = got
    record = generator.record.get("baseline") or {}
    result: dict[str, Any]
    if settings.kind == "box":
        pairs = []
        for number, got in outputs.items():
            row = rows[number]
            size = got.image_size  # the row's width/height, else the image's own
            pairs.append((got.box, dequantize_box(quantize_box(row[target], size), size)))  # as the validation does
        train_boxes = [r[target] for r in train_rows or [] if isinstance(r.get(target), list | tuple)]
        if train_boxes:
            mean_box, source = [float(np.mean([b[i] for b in train_boxes])) for i in range(4)], "train"
        elif record.get("box") is not None:
            mean_box, source = [float(v) for v in record["box"]], "checkpoint"
        else:
            mean_box, source = [float(np.mean([r[i] for _, r in pairs])) for i in range(4)], "evaluation rows"
        result = box_metrics(pairs, mean_box)
    else:
        preds = [outputs[n].text for n in outputs]
        texts = [str(rows[n][target]).lower() for n in outputs]
        train_refs = [str(r[target]).lower() for r in train_rows or [] if target in r]
        if train_refs:
            baseline, source = Counter(train_refs).most_common(1)[0][0], "train"
        elif record.get(TEXT_TARGET) is not None:
            baseline, source = str(record[TEXT_TARGET]), "checkpoint"
        else:
            baseline, source = (Counter(texts).most_common(1)[0][0] if texts else ""), "evaluation rows"
        result = text_metrics(preds, texts, baseline)
        if settings.constraints:
            result["accuracy"] = result["exact_match"]
            result["baseline_accuracy"] = result["baseline_exact_match"]
            result["classes"] = len(settings.constraints)
    return {
        **result,
        "target": settings.kind,
        "target_field": target,
        "baseline_source": source,
        "bad": len(bad),
        "bad_rows": bad[:20],
    }


def generation_summary(result: Mapping[str, Any]) -> str:
    """One line: the metrics beside their baselines."""
    if result["target"] == "box":
        return (
            f"generation (boxes): mean IoU {result['mean_iou']:.3f}, Acc@0.5 {result['acc@0.5']:.3f} (mean-box "
            f"baseline {result['baseline_mean_iou']:.3f} / {result['baseline_acc@0.5']:.3f}), {result['samples']} "
            f"samples, {result['bad']} bad"
        )
    line = (
        f"generation: token F1 {result['token_f1']:.3f} (most-frequent baseline {result['baseline_token_f1']:.3f}), "
        f"exact match {result['exact_match']:.3f}"
    )
    if "accuracy" in result:
        line += f", accuracy {result['accuracy']:.3f} (majority {result['baseline_accuracy']:.3f})"
    return line + f", {result['samples']} samples, {result['bad']} bad"
