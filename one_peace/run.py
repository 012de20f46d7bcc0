"""``python -m one_peace.run recipe=NAME [key=value ...]``: train a recipe (Hydra config from ``recipes/``).

Without data overrides the recipe runs on the embedded demo data (generated on the fly), trains with a progress
bar, evaluates (retrieval recall for contrastive recipes; generated captions and token metrics for seq2seq)
and prints the path of its final checkpoint. Every key is typed (:mod:`one_peace.runner.config`); the pieces are
built by :mod:`one_peace.runner.build`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from one_peace.runner import build, records
from one_peace.runner.config import register
from one_peace.runner.distributed import barrier, init_distributed, rank0_first, shutdown
from one_peace.runner.outputs import OutputDirInUse, lock_output_dir, prepare_output_dir, record_config

register()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run a composed recipe config; returns the evaluation results (also written to ``eval.json``).

    However the run ends, its loaders' worker processes are stopped, the output folder's lock is released and the
    process group (under ``torchrun``) is destroyed.
    """
    held: list[Any] = []
    try:
        return _run(cfg, held)
    finally:
        for resource in reversed(held):
            resource.close()
        shutdown()


def _run(cfg: DictConfig, held: list[Any]) -> dict[str, Any]:
    from one_peace.data.loader import MultimodalLoader
    from one_peace.runner.evaluate import check_eval_section, evaluate_all
    from one_peace.train.device import resolve_device
    from one_peace.train.trainer import Trainer

    specs = build.task_specs(cfg)
    needs = {name: build.task_needs(cfg, spec) for name, spec in specs.items()}
    modalities = list(dict.fromkeys(m for n in needs.values() for m in n["modalities"]))
    build.check_config(cfg, modalities)  # every value checked before any work
    check_eval_section(cfg, specs, needs)
    tcfg = build.trainer_config(cfg)

    rank, world = init_distributed(tcfg.device)

    def say(text: str) -> None:
        if rank == 0:
            print(text)

    out = Path(cfg.output_dir)
    if rank == 0:  # one run per output folder; rank 0 holds the lock for the whole job
        held.append(lock_output_dir(out))
        prepare_output_dir(out, tcfg.resume, bool(cfg.overwrite), say)
        record_config(out, cfg, build.cli_overrides())
    barrier()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    train, valid = cfg.data.train, cfg.data.valid
    if train is None:
        train, valid = rank0_first(rank, world, build.demo_data, cfg, out)
    text_fields = list(dict.fromkeys(f for n in needs.values() for f in n["text_fields"]))
    plain = [p for n in needs.values() for p in n["plain"]]
    model = build.load_pretrained(cfg, modalities, say)
    teacher = None
    if cfg.model.get("retokenize") and model is None:
        raise ValueError("model.retokenize: needs model.pretrained (the model whose text is taught a new tokenizer)")
    if cfg.model.get("tokenizer_file") and not cfg.model.get("retokenize"):
        raise ValueError("model.tokenizer_file: only with model.retokenize=true (the add_language recipe)")
    if model is not None and cfg.model.get("retokenize"):
        if cfg.model.get("tokenizer_file"):
            tokenizer = build.tokenizer_from_file(cfg, model)
        else:
            tokenizer = rank0_first(rank, world, build.build_tokenizer, cfg, train, text_fields, out, plain)
        from one_peace.train.distill import make_student

        teacher = make_student(model, tokenizer, say)
    elif model is not None:
        tokenizer = model.tokenizer
    else:
        tokenizer = rank0_first(rank, world, build.build_tokenizer, cfg, train, text_fields, out, plain)
        model = build.build_model(cfg, modalities, tokenizer)
    multi = cfg.task.type == "multitask"
    pin = resolve_device(tcfg.device).type == "cuda"  # collate into pinned memory for the copy to the GPU
    tasks, loaders, eval_loaders = {}, {}, {}
    for name, spec in specs.items():
        n = needs[name]
        tasks[name] = build.build_task(cfg, spec, n, model, tokenizer, teacher)
        data = (spec.get("data") or {}) if multi else {}
        common = dict(fields=n["fields"], model_config=model.config, tokenizer=tokenizer, passthrough=n["passthrough"])
        loaders[name] = MultimodalLoader(
            data.get("train") or train,
            rank=rank,
            world_size=world,
            config=build.loader_config(cfg, tcfg.batch_size, train=True, pin_memory=pin),
            **common,
        )
        held.append(loaders[name])
        eval_loaders[name] = MultimodalLoader(
            data.get("valid") or valid, config=build.loader_config(cfg, tcfg.batch_size, train=False), **common
        )
        held.append(eval_loaders[name])
    say(f"{records.parameter_summary(model, tasks)}; writing to {out.resolve()}")
    if multi:
        from one_peace.train.multitask import MultiLoader, MultiTask

        weights = {name: float(spec.get("weight", 1.0)) for name, spec in specs.items()}
        task: Any = MultiTask(model, tasks, weights)
        loader: Any = MultiLoader(loaders)
    else:
        task, loader = next(iter(tasks.values())), next(iter(loaders.values()))
    train_of = {
        name: ((spec.get("data") or {}).get("train") if multi else None) or train for name, spec in specs.items()
    }
    valid_of = {
        name: ((spec.get("data") or {}).get("valid") if multi else None) or valid for name, spec in specs.items()
    }
    model.trained_with = records.trained_for(cfg, specs)  # written into every checkpoint's config.json, with
    generators = records.generator_records(specs, needs, tasks, train_of, multi)  # what generation needs
    if generators:
        model.trained_with["generators"] = generators

    def evaluate(step: int, limit: int | None = None) -> dict[str, Any]:
        found = evaluate_all(cfg, specs, needs, tasks, eval_loaders, valid_of, train_of, say, multi, limit)
        return found if multi else next(iter(found.values()), {})

    trainer = Trainer(  # every RNG the task owns is saved with its checkpoints
        task, loader, tcfg, out, evaluate=lambda step: evaluate(step, cfg.eval.max_samples)
    )
    ckpt = trainer.fit()
    if trainer.sharded:  # evaluation calls submodules directly: gather the root's sharded parameters first
        task.unshard()
    loader.close()  # the training workers are not needed for the evaluation
    results = evaluate(trainer.step)
    results["checkpoint"] = str(Path(ckpt).resolve())
    if rank == 0:
        (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"checkpoint: {results['checkpoint']}")
    return results


def main() -> None:
    """``python -m one_peace.run``: the command line is checked first (unknown keys with their closest known ones,
    values of the wrong type, an ``output_dir`` that is a file), then Hydra composes the config and the run starts."""
    import sys

    from one_peace.runner.config import check_overrides

    check_overrides(sys.argv[1:])
    check_output_dir_argument(sys.argv[1:])
    _hydra_main()


@hydra.main(version_base=None, config_path="pkg://one_peace.recipes", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point: a configuration or input error ends the run with one line naming the key or file."""
    from one_peace.data.loader import TooManyBadSamples
    from one_peace.data.manifest import ManifestError
    from one_peace.extras import MissingExtraError

    try:
        run(cfg)
    except (ValueError, MissingExtraError, ManifestError, FileNotFoundError, OutputDirInUse, TooManyBadSamples) as exc:
        raise SystemExit(f"error: {exc}") from None


def check_output_dir_argument(argv: list[str]) -> None:
    """Refuse an ``output_dir=`` override that names a file, before Hydra makes its run folder there (Hydra's own
    ``mkdir`` failed with a raw ``FileExistsError`` traceback)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and key == "output_dir" and value:
            path = Path(value)
            blocked = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
            if blocked is not None:
                raise SystemExit(f"error: output_dir={value}: {blocked} is a file, not a folder")


if __name__ == "__main__":
    main()
