"""What a run says and records about itself: the start-up parameter summary and, in every checkpoint's
``config.json``, what it trained the model for (``trained``) and what its decoders need to generate
(``trained.generators``, read back by :mod:`one_peace.checkpoint.generators`)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from one_peace.models.encoder import OnePeaceModel
from one_peace.runner.config import to_container


def parameter_summary(model: OnePeaceModel, tasks: dict[str, Any]) -> str:
    """``model: N parameters (shared ..., <modality> ..., decoder ...)``: the shared stack, each modality's own
    parameters (adapter, FFNs, norms, head) and the tasks' own (a seq2seq or pretraining decoder)."""
    groups = set(model.groups.values()) | set(model.adapters)
    counts: dict[str, int] = {"shared": 0}
    seen = set()
    for name, p in model.named_parameters():
        seen.add(id(p))
        parts = name.split(".")
        owner = next(
            (parts[i + 1] for i, x in enumerate(parts[:-1]) if x in ("adapters", "final_norms", "heads")), None
        )
        owner = owner or next((x for x in parts if x in groups), "shared")
        counts[owner] = counts.get(owner, 0) + p.numel()
    decoder = sum(p.numel() for t in tasks.values() for p in t.parameters() if id(p) not in seen)
    if decoder:
        counts["decoder"] = decoder
    total = sum(counts.values())
    return f"model: {total:,} parameters ({', '.join(f'{k} {v:,}' for k, v in counts.items())})"


#: objective -> the use it trains the model for (distill_text keeps the teacher's cross-modal alignment in new words)
USES = {"contrastive": "retrieval", "distill_text": "retrieval", "denoise": "denoising"}


def trained_for(cfg: DictConfig, specs: dict[str, Any]) -> dict[str, Any]:
    """What the run trains the model for, recorded in its checkpoints' ``config.json`` (``trained``): the recipe and
    its uses: ``retrieval`` (a contrastive objective aligns modalities), ``generation`` (a seq2seq task),
    ``denoising`` (masked-token reconstruction only)."""
    uses = set()
    for spec in specs.values():
        if spec.get("type") == "seq2seq":
            uses.add("generation")
        for entry in (spec.get("objectives") or {}).values():
            name = dict(to_container(entry)).get("name")
            uses.add(USES.get(str(name), str(name)))
    return {"recipe": str(cfg.recipe_name), "uses": sorted(uses)}


def generator_records(
    specs: dict[str, Any], needs: dict[str, Any], tasks: dict[str, Any], train: dict[str, Any], multi: bool
) -> dict[str, Any]:
    """``name -> record`` of each seq2seq task, written into its run's checkpoints (``config.json`` ``trained``
    ``generators``) so that :func:`one_peace.generation.load_generator` rebuilds the decoder and generates as the
    run's validation does: the instruction, the decoder's sizes, where its weights are, the decoding settings, the
    closed set and the baselines (both from the training rows, as the validation computes them)."""
    import dataclasses
    from collections import Counter

    import numpy as np

    from one_peace.checkpoint.generators import BOX_TARGET, TEXT_TARGET
    from one_peace.data.shards import iter_rows

    records: dict[str, Any] = {}
    for name, spec in specs.items():
        n = needs[name]
        if n["kind"] != "seq2seq":
            continue
        wanted = [f for f in (n["target_field"], n["box_field"], n.get("closed_set")) if f]
        source = train[name]  # streamed, keeping only those fields (shard rows carry their media)
        stream = ((i, r) for i, r in enumerate(source)) if isinstance(source, list | tuple) else iter_rows(str(source))
        rows = [{f: r[f] for f in wanted if f in r} for _, r in stream if isinstance(r, dict)]
        box = n["target_field"] is None
        closed = n.get("closed_set")
        record: dict[str, Any] = {
            "instruction": str(spec.instruction),
            "decoder": dataclasses.asdict(tasks[name].decoder.config),
            "text_vocab": int(tasks[name].text_vocab),
            "weights": "task.safetensors",
            "prefix": f"tasks.{name}.decoder." if multi else "decoder.",
            "beam": int(spec.get("beam", 1)),
            "max_tokens": 6 if box else 30,
            "target": BOX_TARGET if box else TEXT_TARGET,
            "target_field": n["box_field"] if box else n["target_field"],
            "closed_set": sorted({str(r[closed]) for r in rows if closed in r}) if closed else None,
        }
        if box:
            boxes = [r[n["box_field"]] for r in rows if isinstance(r.get(n["box_field"]), list | tuple)]
            mean_box = [float(np.mean([b[i] for b in boxes])) for i in range(4)] if boxes else None
            record["baseline"] = {"box": mean_box}
        else:
            refs = [str(r[n["target_field"]]).lower() for r in rows if n["target_field"] in r]
            record["baseline"] = {TEXT_TARGET: Counter(refs).most_common(1)[0][0] if refs else None}
        records[name] = record
    return records
