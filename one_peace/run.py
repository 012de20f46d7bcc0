"""``python -m one_peace.run recipe=NAME [key=value ...]``: train a recipe (Hydra config from ``recipes/``).

Without data overrides the recipe runs on the embedded demo data (generated on the fly), trains with a progress
bar, evaluates (retrieval recall for contrastive recipes; generated captions and token metrics for seq2seq)
and prints the path of its final checkpoint.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import one_peace
from one_peace.data import LoaderConfig, MultimodalLoader
from one_peace.data.manifest import iter_manifest


def _demo(cfg: DictConfig, out: Path) -> tuple[str, str]:
    from one_peace.data.demo import make_demo_dataset

    root = out / "demo_data"
    if not (root / "valid.jsonl").is_file():
        make_demo_dataset(
            root, cfg.data.demo_train, cfg.data.demo_valid, seed=cfg.seed, image_size=cfg.data.image_size, video=False
        )
    return str(root / "train.jsonl"), str(root / "valid.jsonl")


def _fields(cfg: DictConfig) -> dict[str, str]:
    fields = dict(cfg.data.fields or {})
    if not fields and "modality_field" in cfg.data:
        fields = {cfg.modality: cfg.data.modality_field, "text": cfg.data.text_field}
    return fields


def _tokenizer(cfg: DictConfig, train: str, text_fields: list[str], out: Path, extra: list[str]) -> Any:
    from one_peace.adapters.text import TextTokenizer

    path = out / "tokenizer.json"
    if path.is_file():
        return TextTokenizer.from_file(path)
    texts = [str(row[f]) for _, row in iter_manifest(train) for f in text_fields if f in row] + extra
    tok = TextTokenizer.train(texts, vocab_size=cfg.data.vocab_size)
    tok.tokenizer.save(str(path))
    return tok


def _build_model(cfg: DictConfig, modalities: list[str], tokenizer: Any) -> one_peace.OnePeaceModel:
    options = {"image": {"image_size": cfg.data.image_size}, "text": {"vocab_size": tokenizer.vocab_size}}
    options = {m: o for m, o in options.items() if m in modalities}
    torch.manual_seed(cfg.seed)
    extra = {k: cfg.model[k] for k in ("layer_scale_init", "drop_path_rate") if k in cfg.model}
    model = one_peace.build_model(cfg.model.size, modalities=tuple(modalities), modality_options=options, **extra)
    model.tokenizer = tokenizer
    return model


def _needs(cfg: DictConfig, spec: Any) -> dict[str, Any]:
    """What one task needs: its kind, modalities, loader fields and passthrough, text fields, instruction."""
    kind = spec.type
    if kind == "seq2seq":
        from one_peace.train.instructions import Instruction

        instruction = Instruction(spec.instruction)
        media = {
            s.kind: s.field for t in instruction.templates for s in t.source_slots if s.kind not in ("text", "box")
        }
        passthrough = sorted(instruction.fields() - set(media.values()))
        return {
            "kind": kind,
            "instruction": instruction,
            "fields": media,
            "passthrough": passthrough,
            "modalities": [*media, "text"],
            "text_fields": passthrough,
            "plain": [p for t in instruction.templates for p in t.source if isinstance(p, str)],
            "target_field": next((s.field for s in instruction.templates[0].target_slots if s.kind == "text"), None),
            "closed_set": next(
                (s.field for t in instruction.templates for s in t.target_slots if "closed_set" in s.attrs), None
            ),
        }
    if kind != "objectives":
        raise ValueError(f"task.type must be 'seq2seq', 'objectives' or 'multitask', got {kind!r}")
    data = spec.get("data", {})
    fields = dict(data.get("fields") or {}) or _fields(cfg)
    return {
        "kind": kind,
        "fields": fields,
        "passthrough": [],
        "modalities": list(fields),
        "text_fields": [f for m, f in fields.items() if m == "text"],
        "plain": [],
    }


def _pretrained(cfg: DictConfig, modalities: list[str]) -> one_peace.OnePeaceModel | None:
    """``model.pretrained``: an official ONE-PEACE file or one of our folders (``model.bpe_dir`` for official BPE)."""
    path = cfg.model.get("pretrained")
    if not path:
        return None
    kwargs: dict[str, Any] = {"image_size": cfg.data.image_size} if Path(path).is_file() else {}
    model = one_peace.load(path, bpe_dir=cfg.model.get("bpe_dir"), **kwargs)
    missing = [m for m in modalities if m not in model.adapters]
    if missing:
        raise ValueError(
            f"model.pretrained={path}: the checkpoint has no {missing} modality (it has {list(model.adapters)})"
        )
    if "text" in modalities and model.tokenizer is None:
        raise ValueError(
            f"model.pretrained={path}: no tokenizer in the checkpoint; pass model.bpe_dir=<folder with the BPE files>"
        )
    return model.train()


def _pretrained_decoder_state(cfg: DictConfig) -> dict[str, torch.Tensor] | None:
    """Official pretraining-decoder keys from ``model.pretrained`` (official file, or a converted folder)."""
    from one_peace.checkpoint import PRETRAIN, read_official
    from one_peace.checkpoint.official import is_pretrain_key

    path = cfg.model.get("pretrained")
    if not path:
        return None
    if Path(path).is_dir():
        if not (Path(path) / PRETRAIN).is_file():
            return None
        from safetensors.torch import load_file

        return load_file(str(Path(path) / PRETRAIN))
    state, _ = read_official(path)
    found = {k: v for k, v in state.items() if is_pretrain_key(k)}
    return found or None


def _objectives_task(cfg: DictConfig, spec: Any, model: one_peace.OnePeaceModel) -> Any:
    from one_peace.models.decoder import DecoderConfig, DenoiseDecoder
    from one_peace.train.objectives import OBJECTIVES
    from one_peace.train.task import Task

    objectives = {}
    for key, entry in spec.objectives.items():
        entry = dict(entry)
        name, weight = entry.pop("name"), entry.pop("weight", 1.0)
        if name not in OBJECTIVES:
            raise ValueError(
                f"task.objectives.{key}.name: unknown objective {name!r}; registered: {sorted(OBJECTIVES)}"
            )
        if "modalities" in entry:
            entry["modalities"] = tuple(entry["modalities"])
        objectives[key] = (OBJECTIVES[name](**entry), weight)
    decoder = None
    if "decoder" in spec:
        from one_peace.models.decoder import decoder_from_official_state

        mods = tuple(m for m in model.config.modalities if m != "video")
        state = _pretrained_decoder_state(cfg)
        if state is not None:  # the official pretraining decoder of the checkpoint
            decoder = decoder_from_official_state(
                state, model.config.embed_dim, heads=spec.decoder.heads, source=str(cfg.model.pretrained)
            )
        else:
            decoder = DenoiseDecoder(
                DecoderConfig(encoder_dim=model.config.embed_dim, modalities=mods, **dict(spec.decoder))
            )
    return Task(model, objectives, decoder=decoder, seed=cfg.seed)


@torch.no_grad()
def _evaluate_contrastive(task: Any, loader: MultimodalLoader, pair: tuple[str, str]) -> dict[str, float]:
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
def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@torch.no_grad()
def _evaluate_boxes(task: Any, loader: MultimodalLoader, spec: Any) -> dict[str, Any]:
    """Grounding: IoU of generated boxes with the references, against predicting the mean reference box."""
    task.eval()
    pairs = []
    for batch in loader:
        for (pred, ref), ok in zip(task.generate_boxes(batch, beam=spec.get("beam", 1)), batch["valid"].tolist()):
            if ok:
                pairs.append((pred, ref))
    ious = [_iou(p, r) if p is not None else 0.0 for p, r in pairs]
    mean_box = [float(np.mean([r[i] for _, r in pairs])) for i in range(4)]
    base = [_iou(mean_box, r) for _, r in pairs]
    return {
        "mean_iou": float(np.mean(ious)),
        "acc@0.5": float(np.mean([i >= 0.5 for i in ious])),
        "baseline_mean_iou": float(np.mean(base)),
        "baseline_acc@0.5": float(np.mean([i >= 0.5 for i in base])),
        "samples": len(pairs),
    }


def _evaluate_seq2seq(
    task: Any, loader: MultimodalLoader, spec: Any, target_field: str, closed_set: list[str] | None = None
) -> dict[str, Any]:
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

    train_refs = (
        [str(row[target_field]).lower() for _, row in iter_manifest(loader.manifest)] if loader.manifest else refs
    )
    baseline = Counter(train_refs).most_common(1)[0][0]
    return {
        "token_f1": float(np.mean([token_f1(p, r) for p, r in zip(preds, refs)])),
        "exact_match": float(np.mean([p == r for p, r in zip(preds, refs)])),
        "baseline_token_f1": float(np.mean([token_f1(baseline, r) for r in refs])),
        "baseline_caption": baseline,
        "examples": [{"generated": p, "reference": r} for p, r in list(zip(preds, refs))[:8]],
    }


def trainer_config(cfg: DictConfig) -> Any:
    """The typed trainer config from ``cfg.trainer``; an unknown key fails naming ``trainer.<key>``."""
    import dataclasses

    from one_peace.train.trainer import TrainerConfig

    raw: dict[str, Any] = {str(k): v for k, v in dict(OmegaConf.to_container(cfg.trainer, resolve=True) or {}).items()}  # type: ignore[arg-type]
    known = {f.name for f in dataclasses.fields(TrainerConfig)}
    for key in raw:
        if key not in known:
            raise ValueError(f"unknown config key trainer.{key}; expected one of {sorted(known)}")
    for key in ("trainable", "frozen"):
        raw[key] = tuple(raw.get(key) or ())
    raw["seed"] = int(cfg.seed)
    return TrainerConfig(**raw)


def _init_distributed() -> tuple[int, int]:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, nccl on GPU)."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _rank0_first(rank: int, world: int, fn: Any, *args: Any) -> Any:
    """Run ``fn`` on rank 0 first (it writes files), then on the other ranks (they read what it wrote)."""
    import torch.distributed as dist

    if rank == 0:
        result = fn(*args)
    if world > 1:
        dist.barrier()
    if rank != 0:
        result = fn(*args)
    return result


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run a composed recipe config; returns the evaluation results (also written to ``eval.json``)."""
    from one_peace.extras import require
    from one_peace.train.trainer import Trainer

    require("train", "fairseq2", feature="training with python -m one_peace.run")
    rank, world = _init_distributed()

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    train, valid = cfg.data.train, cfg.data.valid
    if train is None:
        train, valid = _rank0_first(rank, world, _demo, cfg, out)
    loader_cfg = dict(
        shuffle_window=cfg.data.shuffle_window, num_parallel_calls=cfg.data.num_parallel_calls, seed=cfg.seed
    )
    multi = cfg.task.type == "multitask"
    specs = dict(cfg.task.tasks) if multi else {str(cfg.recipe_name): cfg.task}
    needs = {name: _needs(cfg, spec) for name, spec in specs.items()}
    modalities = list(dict.fromkeys(m for n in needs.values() for m in n["modalities"]))
    text_fields = list(dict.fromkeys(f for n in needs.values() for f in n["text_fields"]))
    plain = [p for n in needs.values() for p in n["plain"]]
    pretrained = _pretrained(cfg, modalities)
    if pretrained is not None:
        model, tokenizer = pretrained, pretrained.tokenizer
    else:
        tokenizer = _rank0_first(rank, world, _tokenizer, cfg, train, text_fields, out, plain)
        model = _build_model(cfg, modalities, tokenizer)
    tcfg = trainer_config(cfg)
    tasks: dict[str, Any] = {}
    loaders: dict[str, MultimodalLoader] = {}
    eval_loaders: dict[str, MultimodalLoader] = {}
    for name, spec in specs.items():
        n = needs[name]
        if n["kind"] == "seq2seq":
            from one_peace.train.seq2seq_task import Seq2SeqTask

            tasks[name] = Seq2SeqTask(
                model, tokenizer, n["instruction"], dict(spec.decoder), spec.get("label_smoothing", 0.1), cfg.seed
            )
        else:
            tasks[name] = _objectives_task(cfg, spec, model)
        data = spec.get("data", {}) if multi else {}
        common = dict(fields=n["fields"], model_config=model.config, tokenizer=tokenizer, passthrough=n["passthrough"])
        loaders[name] = MultimodalLoader(
            data.get("train") or train,
            rank=rank,
            world_size=world,
            config=LoaderConfig(batch_size=tcfg.batch_size, **loader_cfg),
            **common,
        )
        eval_loaders[name] = MultimodalLoader(
            data.get("valid") or valid,
            config=LoaderConfig(batch_size=tcfg.batch_size, shuffle_window=0, remainder="pad"),
            **common,
        )
    if multi:
        from one_peace.train.multitask import MultiLoader, MultiTask

        weights = {name: float(spec.get("weight", 1.0)) for name, spec in specs.items()}
        task: Any = MultiTask(model, tasks, weights)
        loader: Any = MultiLoader(loaders)
        extra_state: Any = (task.generator_state, task.set_generator_state)
    else:
        task, loader = next(iter(tasks.values())), next(iter(loaders.values()))
        extra_state = (
            (lambda: task.generator.get_state(), lambda st: task.generator.set_state(st))
            if hasattr(task, "generator")
            else None
        )
    trainer = Trainer(task, loader, tcfg, out, extra_state=extra_state)
    ckpt = trainer.fit()

    if trainer.sharded:  # evaluation calls submodules directly: gather the root's sharded parameters first
        task.unshard()

    def say(text: str) -> None:
        if rank == 0:
            print(text)

    all_results: dict[str, Any] = {}
    for name, spec in specs.items():
        n, sub_task, ev = needs[name], tasks[name], eval_loaders[name]
        prefix = f"[{name}] " if multi else ""
        if n["kind"] == "seq2seq":
            if n["target_field"] is None:  # BOX targets: grounding
                res = _evaluate_boxes(sub_task, ev, spec)
                say(
                    f"{prefix}validation grounding: mean IoU {res['mean_iou']:.3f}, Acc@0.5 {res['acc@0.5']:.3f} "
                    f"(predicting the mean training box: {res['baseline_mean_iou']:.3f} / "
                    f"{res['baseline_acc@0.5']:.3f})"
                )
                all_results[name] = res
                continue
            closed = None
            if n.get("closed_set"):
                closed = sorted(
                    {str(row[n["closed_set"]]) for _, row in iter_manifest(train) if n["closed_set"] in row}
                )
            res = _evaluate_seq2seq(sub_task, ev, spec, n["target_field"], closed)
            say(
                f"{prefix}validation: token F1 {res['token_f1']:.3f} (most-frequent-caption baseline "
                f"{res['baseline_token_f1']:.3f}), exact match {res['exact_match']:.3f}"
            )
            for ex in res["examples"][:4]:
                say(f"  generated: {ex['generated']!r}  reference: {ex['reference']!r}")
        else:
            pair = next(iter(spec.objectives.values())).get("modalities", list(n["fields"]))
            res = _evaluate_contrastive(sub_task, ev, tuple(pair))
            say(f"{prefix}validation retrieval: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
        all_results[name] = res
    results = all_results if multi else next(iter(all_results.values()))
    loader.close()
    for ev in eval_loaders.values():
        ev.close()
    results["checkpoint"] = str(Path(ckpt).resolve())
    if rank == 0:
        (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"checkpoint: {results['checkpoint']}")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return results


@hydra.main(version_base=None, config_path="pkg://one_peace.recipes", config_name="config")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    run(cfg)


if __name__ == "__main__":
    main()
