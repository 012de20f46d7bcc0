"""Zero-shot classification: class embeddings from text prompts, accuracy, per-class accuracy, confusion matrix."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from one_peace.eval.base import EvalContext, embed_rows
from one_peace.eval.metrics import classification
from one_peace.tokenizer import LANGUAGE


def load_classes(classes: str | Sequence[str]) -> list[str]:
    """Class names from a list, a text file (one per line) or a JSON file holding a list."""
    if isinstance(classes, str):
        path = Path(classes)
        if not path.is_file():
            raise FileNotFoundError(f"classes: {classes} is neither a file nor a list")
        if path.suffix == ".json":
            names = _json_file(path, "classes")
            if not isinstance(names, list):
                raise ValueError(f"classes: {path} must hold a JSON list of class names")
            return [str(n) for n in names]
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"classes: {path} is not UTF-8 text ({exc})") from None
        return [line.strip() for line in text.splitlines() if line.strip()]
    return [str(c) for c in classes]


def _json_file(path: Path, key: str) -> Any:
    """The JSON document of ``path`` (the value of option ``key``), with errors naming both."""
    if not path.is_file():
        raise FileNotFoundError(f"{key}: {path} is not a file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{key}: {path} is not UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{key}: {path} is not valid JSON: {exc}") from None


def load_prompts(prompts: str | Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """``label -> [prompt, ...]`` from a dict or a JSON file."""
    where = f"prompts: {prompts}" if isinstance(prompts, str) else "prompts"
    data = _json_file(Path(prompts), "prompts") if isinstance(prompts, str) else prompts
    if not isinstance(data, Mapping) or not all(isinstance(v, list) and v for v in data.values()):
        raise ValueError(f"{where}: expected a mapping label -> non-empty list of prompts")
    return {str(k): [str(p) for p in v] for k, v in data.items()}


def class_embeddings(model: Any, prompts: Mapping[str, Sequence[str]], batch_size: int = 64) -> torch.Tensor:
    """``(C, D)``: each class's normalised mean of its normalised prompt embeddings (open_clip's way)."""
    flat = [p for ps in prompts.values() for p in ps]
    emb = model.encode(LANGUAGE, flat, batch_size=batch_size).float().cpu()
    out, start = [], 0
    for ps in prompts.values():
        out.append(F.normalize(emb[start : start + len(ps)].mean(0), dim=-1))
        start += len(ps)
    return torch.stack(out)


@dataclass
class ZeroShotEvaluator:
    """Classify ``modality`` items by their nearest class embedding.

    Attributes:
        modality: What is classified (``image``, ``audio``, ``video``, ...).
        label_field: Row field holding the true class name.
        classes: Class names (a list or a file); default: the prompts' labels, or the labels found in the rows.
        templates: Prompt templates with ``{}`` for the class name (default ``["{}"]``).
        prompts: ``label -> [prompt, ...]`` (dict or JSON file), instead of templates.
        confusion_png: Where to draw the confusion matrix (needs matplotlib), or ``None``.
    """

    modality: str = "image"
    label_field: str = "label"
    classes: Any = None
    templates: Sequence[str] = ("{}",)
    prompts: Any = None
    confusion_png: str | None = None
    name: str = "zero_shot"
    _class_names: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        """Read ``prompts`` and ``classes`` files now: a bad file is refused before a run trains, not after."""
        if self.prompts is not None:
            load_prompts(self.prompts)
        if self.classes is not None:
            load_classes(self.classes)

    def class_prompts(self, ctx: EvalContext) -> dict[str, list[str]]:
        """The prompts of every class, in class order."""
        given = load_prompts(self.prompts) if self.prompts is not None else None
        if self.classes is not None:
            names = load_classes(self.classes)
        elif given is not None:
            names = list(given)
        else:
            names = sorted({str(r[self.label_field]) for r in ctx.rows if self.label_field in r})
        if not names:
            raise ValueError("zero_shot: no classes (give classes=, prompts=, or rows with the label field)")
        if given is not None:
            missing = [n for n in names if n not in given]
            if missing:
                raise ValueError(f"prompts: no prompts for classes {missing[:5]}")
            return {n: given[n] for n in names}
        for t in self.templates:
            if "{}" not in t:
                raise ValueError(f"templates: {t!r} has no '{{}}' for the class name")
        return {n: [t.format(n) for t in self.templates] for n in names}

    def __call__(self, ctx: EvalContext) -> dict[str, Any]:
        """Top-1/top-5, per-class accuracy, confusion matrix (and its PNG)."""
        prompts = self.class_prompts(ctx)
        names = list(prompts)
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted({str(r.get(self.label_field)) for r in ctx.rows} - set(names))
        if unknown:
            raise ValueError(f"zero_shot: labels {unknown[:5]} in field {self.label_field!r} are not among the classes")
        items, ok, bad = embed_rows(ctx, self.modality)
        labels = torch.tensor([index[str(r[self.label_field])] for r, keep in zip(ctx.rows, ok.tolist()) if keep])
        logits = items @ class_embeddings(ctx.model, prompts, ctx.batch_size).T
        out = classification(logits, labels, names)
        out["classes"] = names
        out["skipped"] = bad
        if self.confusion_png:
            out["confusion_png"] = draw_confusion(out["confusion"], names, self.confusion_png)
        return out

    def summary(self, result: Mapping[str, Any]) -> str:
        """``zero-shot: top-1 x, top-5 y (chance z)``."""
        return (
            f"zero-shot {self.modality}: top-1 {result['top1']:.3f}, top-5 {result['top5']:.3f} "
            f"(chance top-1 {result['chance_top1']:.3f}); {result['samples']} items"
        )


def draw_confusion(confusion: Sequence[Sequence[int]], names: Sequence[str], path: str) -> str | None:
    """Save the confusion matrix as a PNG (``None``, with a warning, without matplotlib)."""
    from one_peace.extras import optional

    if not optional("matplotlib", "retrieval", "the confusion-matrix PNG"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * n + 2), max(4, 0.4 * n + 2)))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
