"""Evaluators run after training: retrieval recall, generated text (token F1), grounding boxes (IoU)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch


@torch.no_grad()
def evaluate_contrastive(task: Any, loader: Any, pair: tuple[str, str]) -> dict[str, float]:
    """Recall@k of retrieving side b from side a; items with identical text count as correct (demo captions repeat)."""
    task.eval()
    a, b = pair
    ea, eb, keys = [], [], []
    for batch in loader:
        v = batch["valid"]
        ea.append(task.model.encode(a, batch[a])[v])
        eb.append(task.model.encode(b, batch[b])[v])
        side = batch["text"]["tokens"][v] if "text" in (a, b) else torch.arange(int(v.sum()))[:, None]
        keys += [tuple(t for t in row.tolist() if t != 1) for row in side]
    sim = torch.cat(ea) @ torch.cat(eb).T
    ids: dict[tuple[int, ...], int] = {}
    key_ids = torch.tensor([ids.setdefault(k, len(ids)) for k in keys])
    same = key_ids[:, None] == key_ids[None, :]
    best_correct = sim.masked_fill(~same, float("-inf")).max(1).values
    ranks = (sim.masked_fill(same, float("-inf")) > best_correct[:, None]).sum(1)
    out = {f"{a}->{b}/R@{k}": float((ranks < k).float().mean()) for k in (1, 5)}
    out["samples"] = float(len(keys))
    out["chance/R@1"] = float(same.float().mean())
    return out


@torch.no_grad()
def box_iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@torch.no_grad()
def evaluate_boxes(task: Any, loader: Any, spec: Any, train_boxes: list[list[float]] | None = None) -> dict[str, Any]:
    """Grounding: IoU of generated boxes with the references, against predicting the mean *training* box
    (``train_boxes``; the validation references' own mean only when no training boxes are given)."""
    task.eval()
    pairs = []
    for batch in loader:
        for (pred, ref), ok in zip(task.generate_boxes(batch, beam=spec.get("beam", 1)), batch["valid"].tolist()):
            if ok:
                pairs.append((pred, ref))
    ious = [box_iou(p, r) if p is not None else 0.0 for p, r in pairs]
    source = train_boxes if train_boxes else [r for _, r in pairs]
    mean_box = [float(np.mean([r[i] for r in source])) for i in range(4)]
    base = [box_iou(mean_box, r) for _, r in pairs]
    return {
        "mean_iou": float(np.mean(ious)),
        "acc@0.5": float(np.mean([i >= 0.5 for i in ious])),
        "baseline_mean_iou": float(np.mean(base)),
        "baseline_acc@0.5": float(np.mean([i >= 0.5 for i in base])),
        "samples": len(pairs),
    }


def evaluate_seq2seq(
    task: Any,
    loader: Any,
    spec: Any,
    target_field: str,
    closed_set: list[str] | None = None,
    train_refs: list[str] | None = None,
) -> dict[str, Any]:
    """Generated text vs the references: token F1 and exact match, against the most frequent training caption."""
    task.eval()
    preds, refs = [], []
    for batch in loader:
        gen = task.generate(batch, beam=spec.get("beam", 1), closed_set=closed_set)
        for p, r, ok in zip(gen, batch["raw"][target_field], batch["valid"].tolist()):
            if ok:
                preds.append(p)
                refs.append(str(r).lower())

    def token_f1(p: str, r: str) -> float:
        pt, rt = p.split(), r.split()
        common = sum((Counter(pt) & Counter(rt)).values())
        if not pt or not rt or not common:
            return 0.0
        prec, rec = common / len(pt), common / len(rt)
        return 2 * prec * rec / (prec + rec)

    baseline = Counter([r.lower() for r in train_refs] if train_refs else refs).most_common(1)[0][0]
    return {
        "token_f1": float(np.mean([token_f1(p, r) for p, r in zip(preds, refs)])),
        "exact_match": float(np.mean([p == r for p, r in zip(preds, refs)])),
        "baseline_token_f1": float(np.mean([token_f1(baseline, r) for r in refs])),
        "baseline_caption": baseline,
        "examples": [{"generated": p, "reference": r} for p, r in list(zip(preds, refs))[:8]],
    }


def _training_rows(source: Any) -> list[dict[str, Any]]:
    """The training rows of a manifest (shards and in-memory sources: their rows as the loader reads them)."""
    if isinstance(source, list | tuple):
        return [dict(r) for r in source if isinstance(r, dict)]
    from one_peace.data.shards import iter_rows

    return [row for _, row in iter_rows(str(source))]


def evaluate_all(
    specs: dict[str, Any],
    needs: dict[str, Any],
    tasks: dict[str, Any],
    loaders: dict[str, Any],
    train: dict[str, Any],
    say: Any,
    multi: bool,
) -> dict[str, Any]:
    """Run each task's evaluator on its validation loader, print a summary line per task; results by task name.

    ``train`` maps each task to its training data: baselines (most frequent caption, mean box) and closed sets
    come from there, never from the validation split.
    """
    results: dict[str, Any] = {}
    for name, spec in specs.items():
        n, sub_task, ev = needs[name], tasks[name], loaders[name]
        prefix = f"[{name}] " if multi else ""
        if n["kind"] == "seq2seq":
            rows = _training_rows(train[name])
            if n["target_field"] is None:  # BOX targets: grounding
                box = n.get("box_field")
                boxes = [[v * 1.0 for v in row[box]] for row in rows if box and isinstance(row.get(box), list | tuple)]
                res = evaluate_boxes(sub_task, ev, spec, boxes)
                say(
                    f"{prefix}validation grounding: mean IoU {res['mean_iou']:.3f}, Acc@0.5 {res['acc@0.5']:.3f} "
                    f"(predicting the mean training box: {res['baseline_mean_iou']:.3f} / "
                    f"{res['baseline_acc@0.5']:.3f})"
                )
                results[name] = res
                continue
            closed = None
            if n.get("closed_set"):
                closed = sorted({str(row[n["closed_set"]]) for row in rows if n["closed_set"] in row})
            refs = [str(row[n["target_field"]]) for row in rows if n["target_field"] in row]
            res = evaluate_seq2seq(sub_task, ev, spec, n["target_field"], closed, refs)
            say(
                f"{prefix}validation: token F1 {res['token_f1']:.3f} (most-frequent-caption baseline "
                f"{res['baseline_token_f1']:.3f}), exact match {res['exact_match']:.3f}"
            )
            for ex in res["examples"][:4]:
                say(f"  generated: {ex['generated']!r}  reference: {ex['reference']!r}")
        else:
            pair = next(iter(spec.objectives.values())).get("modalities", list(n["fields"]))
            res = evaluate_contrastive(sub_task, ev, tuple(pair))
            say(f"{prefix}validation retrieval: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
        results[name] = res
    return results
