"""The recipes' evaluation (the ``eval:`` section), after training and every ``trainer.eval_every`` steps.

The evaluators live in :mod:`one_peace.eval`; this module picks one per task from the recipe (``eval.task=auto``:
retrieval over the contrastive pair for objective recipes, token F1 or box IoU for seq2seq ones) and runs it
on the task's validation data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from one_peace.eval import EvalContext, build_evaluator
from one_peace.eval.base import Evaluator
from one_peace.runner.config import to_container


def _rows(source: Any, limit: int | None = None) -> tuple[list[dict[str, Any]], Path]:
    """Rows of a manifest / shard folder / in-memory list, and the folder their media paths are relative to."""
    if isinstance(source, list | tuple):
        rows = [dict(r) for r in source if isinstance(r, dict)]
        return (rows[:limit] if limit is not None else rows), Path(".")
    from one_peace.eval import read_rows

    return read_rows(str(source), limit)


def evaluator_for(cfg: Any, spec: Any, needs: dict[str, Any]) -> Evaluator | None:
    """The evaluator of one task: the recipe's ``eval`` section, or (``task: auto``) the task's natural one."""
    section = dict(to_container(cfg.eval) or {})
    kind = section.pop("task", "auto")
    section.pop("max_samples", None)
    if kind == "none":
        return None
    if kind != "auto":
        return build_evaluator({"task": kind, **{k: v for k, v in section.items() if v is not None}})
    if needs["kind"] == "seq2seq":
        if needs["target_field"] is None:  # BOX targets: grounding
            return build_evaluator({"task": "iou", "box_field": needs.get("box_field"), "beam": spec.get("beam", 1)})
        return build_evaluator(
            {
                "task": "token_f1",
                "target_field": needs["target_field"],
                "closed_set": needs.get("closed_set"),
                "beam": spec.get("beam", 1),
            }
        )
    pair = section.get("pair") or next(iter(spec.objectives.values())).get("modalities", list(needs["fields"]))
    opts = {k: section[k] for k in ("group_field", "ks") if section.get(k) is not None}
    return build_evaluator({"task": "retrieval", "pair": list(pair), **opts})


def check_eval_section(cfg: Any, specs: dict[str, Any], needs: dict[str, Any]) -> None:
    """Build every task's evaluator once, so that a bad ``eval`` section fails before training."""
    for name, spec in specs.items():
        try:
            evaluator_for(cfg, spec, needs[name])
        except (ValueError, FileNotFoundError) as exc:  # "prompts: FILE ..." -> "eval.prompts: FILE ..."
            text = str(exc)
            option = text.split(":", 1)[0]
            if option.isidentifier() and option in (cfg.eval or {}):
                raise type(exc)(f"eval.{text}") from None
            raise


def evaluate_all(
    cfg: Any,
    specs: dict[str, Any],
    needs: dict[str, Any],
    tasks: dict[str, Any],
    loaders: dict[str, Any],
    valid: dict[str, Any],
    train: dict[str, Any],
    say: Callable[[str], None],
    multi: bool,
    limit: int | None = None,
) -> dict[str, Any]:
    """Run each task's evaluator on its validation data; prints one summary line per task; results by task.

    ``valid``/``train`` map each task to its validation/training data (baselines and closed sets come from the
    training data, never from the validation split).
    """
    results: dict[str, Any] = {}
    for name, spec in specs.items():
        evaluator = evaluator_for(cfg, spec, needs[name])
        if evaluator is None:
            continue
        rows, base = _rows(valid[name], limit)
        train_rows = _rows(train[name])[0] if evaluator.name in ("token_f1", "iou") else None
        task = tasks[name]
        ctx = EvalContext(
            task.model, rows, base, task=task, loader=loaders[name], train_rows=train_rows, fields=needs[name]["fields"]
        )
        was_training = task.training
        res = evaluator(ctx)
        task.train(was_training)
        say(("[" + name + "] " if multi else "") + evaluator.summary(res))
        if evaluator.name == "token_f1":
            for ex in res["examples"][:4]:
                say(f"  generated: {ex['generated']!r}  reference: {ex['reference']!r}")
        results[name] = res
    return results
