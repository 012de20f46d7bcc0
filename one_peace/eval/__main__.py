"""``python -m one_peace.eval task=retrieval|zero_shot|generation checkpoint=CK data=MANIFEST_OR_SHARDS [key=value]``.

Retrieval: recall@1/5/10 both ways for ``pair=[image,text]`` with several positives per query (rows sharing
``group_field``, or identical texts) and chance levels. Zero-shot: ``modality=image label_field=label
classes=FILE_OR_LIST templates=["a photo of a {}."]`` or ``prompts=FILE.json``: top-1/top-5, per-class accuracy
and a confusion-matrix PNG. Generation (a seq2seq checkpoint, :mod:`one_peace.generation`): token F1 and exact
match of captions and answers, accuracy of closed-set labels, mean IoU and Acc@0.5 of boxes, each beside its
baseline (most frequent training text, majority label, mean training box: from ``train=`` or the checkpoint's
record of its run's training rows). Results are printed as JSON and written to ``out``.
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
        task: ``retrieval``, ``zero_shot`` or ``generation``.
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
        instruction: generation: the instruction (default: the trained one; a source side keeps the trained target).
        beams: generation: beam size (default: the run's validation beam).
        max_tokens: generation: most generated tokens (default: the run's).
        constraints: generation: allowed outputs, a list or a file (default: the training labels of a closed set).
        generator: generation: which decoder of a multi-task checkpoint.
        target_field: generation: the row field holding the reference (default: the instruction's target slot).
        train: generation: training rows (manifest or shards) for the baselines (default: the checkpoint's record).
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
    instruction: str | None = None
    beams: int | None = None
    max_tokens: int | None = None
    constraints: Any = None
    generator: str | None = None
    target_field: str | None = None
    train: str | None = None
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
    if cfg.task == "generation":
        return _generation(cfg, out, model)
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
        raise ValueError(f"task: expected retrieval, zero_shot or generation, got {cfg.task!r}")
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


def _generation(cfg: EvalConfig, out: Path, model: Any) -> dict[str, Any]:
    """``task=generation``: :func:`one_peace.eval.generation.evaluate_generator` on ``cfg.data``."""
    import one_peace
    from one_peace.eval import read_rows
    from one_peace.eval.generation import evaluate_generator, generation_summary
    from one_peace.generate import read_constraints
    from one_peace.generation import get_generator

    if model is None:
        from one_peace.hub import locate

        model = one_peace.load(locate(cfg.checkpoint)[0], bpe_dir=cfg.bpe_dir, device=cfg.device)
    generator = get_generator(model, cfg.generator)
    settings = generator.settings(cfg.instruction, cfg.beams, cfg.max_tokens, read_constraints(cfg.constraints))
    rows, base = read_rows(cfg.data, cfg.limit)
    train = read_rows(cfg.train)[0] if cfg.train else None
    result = evaluate_generator(generator, rows, base, settings, train, cfg.batch_size, cfg.target_field)
    result = {
        "task": "generation",
        "checkpoint": str(cfg.checkpoint),
        "data": str(cfg.data),
        **settings.describe(),
        **result,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(generation_summary(result), file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: JSON results on stdout (and in ``out``)."""
    from one_peace.checkpoint.safe_pickle import CheckpointError
    from one_peace.extras import MissingExtraError

    cfg = parse(EvalConfig, argv, "python -m one_peace.eval")
    try:
        result = evaluate(cfg)
    except (ValueError, KeyError, FileNotFoundError, MissingExtraError, CheckpointError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
