"""``python -m one_peace.eval task=retrieval|zero_shot checkpoint=CK data=MANIFEST_OR_SHARDS [key=value ...]``.

Retrieval: recall@1/5/10 both ways for ``pair=[image,text]`` with several positives per query (rows sharing
``group_field``, or identical texts) and chance levels. Zero-shot: ``modality=image label_field=label
classes=FILE_OR_LIST templates=["a photo of a {}."]`` or ``prompts=FILE.json``: top-1/top-5, per-class accuracy
and a confusion-matrix PNG. Results are printed as JSON and written to ``out``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from one_peace.cli import parse


@dataclass
class EvalConfig:
    """Evaluate a checkpoint on a manifest or shard folder.

    Attributes:
        task: ``retrieval`` or ``zero_shot``.
        checkpoint: Our checkpoint folder, a converted folder, or an official ``.pt`` (with ``bpe_dir``).
        data: A manifest (``.jsonl``/``.tsv``) or a folder of ``.tar`` shards.
        bpe_dir: Official GPT-2 BPE files (official ``.pt`` checkpoints).
        pair: retrieval: the two modalities.
        fields: Modality -> row field (default: the modality's name).
        group_field: retrieval: rows sharing this field are positives of each other (default: identical texts).
        ks: retrieval: the k of recall@k.
        modality: zero_shot: what is classified.
        label_field: zero_shot: the row field holding the class name.
        classes: zero_shot: class names, or a file (one per line, or a JSON list).
        templates: zero_shot: prompt templates with ``{}`` for the class name.
        prompts: zero_shot: a JSON file ``label -> [prompt, ...]`` (instead of templates).
        batch_size: Items per forward.
        device: Where the model runs.
        limit: Evaluate the first ``limit`` rows only.
        out: Where the JSON results go (default ``eval-<task>.json`` in the working directory).
    """

    task: str = "???"
    checkpoint: str = "???"
    data: str = "???"
    bpe_dir: str | None = None
    pair: list[str] = field(default_factory=lambda: ["image", "text"])
    fields: dict[str, str] = field(default_factory=dict)
    group_field: str | None = None
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    modality: str = "image"
    label_field: str = "label"
    classes: Any = None
    templates: list[str] = field(default_factory=lambda: ["{}"])
    prompts: str | None = None
    batch_size: int = 64
    device: str = "cpu"
    limit: int | None = None
    out: str | None = None


def evaluate(cfg: EvalConfig, model: Any = None) -> dict[str, Any]:
    """Run the evaluation of ``cfg``; returns the results (also written to ``cfg.out``)."""
    import one_peace
    from one_peace.eval import EvalContext, build_evaluator, read_rows

    if not Path(cfg.data).exists():
        raise FileNotFoundError(f"data: {cfg.data} not found (a manifest or a folder of .tar shards)")
    out = Path(cfg.out or f"eval-{cfg.task}.json")
    if cfg.task == "retrieval":
        spec: dict[str, Any] = {"task": "retrieval", "pair": cfg.pair, "group_field": cfg.group_field, "ks": cfg.ks}
    elif cfg.task == "zero_shot":
        spec = {
            "task": "zero_shot",
            "modality": cfg.modality,
            "label_field": cfg.label_field,
            "classes": cfg.classes,
            "templates": cfg.templates,
            "prompts": cfg.prompts,
            "confusion_png": str(out.with_suffix(".confusion.png")),
        }
    else:
        raise ValueError(f"task: expected retrieval or zero_shot, got {cfg.task!r}")
    evaluator = build_evaluator(spec)
    if model is None:
        model = one_peace.load(cfg.checkpoint, bpe_dir=cfg.bpe_dir, device=cfg.device)
    from one_peace.checkpoint import warn_unless_trained_for

    warn_unless_trained_for(model, "retrieval", f"task={cfg.task} checkpoint={cfg.checkpoint}")
    rows, base = read_rows(cfg.data, cfg.limit)
    ctx = EvalContext(model, rows, base, batch_size=cfg.batch_size, fields=dict(cfg.fields))
    result = evaluator(ctx)
    result = {"task": cfg.task, "checkpoint": str(cfg.checkpoint), "data": str(cfg.data), **result}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(evaluator.summary(result), file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: JSON results on stdout (and in ``out``)."""
    from one_peace.extras import MissingExtraError

    cfg = parse(EvalConfig, argv, "python -m one_peace.eval")
    try:
        result = evaluate(cfg)
    except (ValueError, KeyError, FileNotFoundError, MissingExtraError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
