"""Build what a recipe describes: data, tokenizer, model, tasks, loaders and the trainer config.

Everything is read from the typed config (:mod:`one_peace.runner.config`); values are checked here before any work
starts (:func:`check_config`), with errors naming the key.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from one_peace.config import ModelConfig
from one_peace.models.encoder import OnePeaceModel
from one_peace.registry import get_plugin, list_modalities
from one_peace.runner.config import to_container
from one_peace.tokenizer import LANGUAGE

DEFAULT_IMAGE_SIZE = 64  # models built from scratch (the demo data is rendered at this size)
MODEL_DIMS = ("embed_dim", "layers", "heads", "ffn_dim")


# ----------------------------------------------------------------------------------------------------- data
def demo_data(cfg: DictConfig, out: Path) -> tuple[str, str]:
    """Generate the embedded demo data under ``out/demo_data`` (once); its train and valid manifests."""
    from one_peace.data.demo import make_demo_dataset

    root = out / "demo_data"
    if not (root / "valid.jsonl").is_file():
        if cfg.data.get("demo_av"):
            from one_peace.data.demo import make_av_dataset

            make_av_dataset(root, cfg.data.demo_train, cfg.data.demo_valid, seed=cfg.seed)
            return str(root / "train.jsonl"), str(root / "valid.jsonl")
        size = cfg.data.image_size or DEFAULT_IMAGE_SIZE
        make_demo_dataset(root, cfg.data.demo_train, cfg.data.demo_valid, seed=cfg.seed, image_size=size, video=False)
    return str(root / "train.jsonl"), str(root / "valid.jsonl")


def tokenizer_from_file(cfg: DictConfig, model: OnePeaceModel) -> Any:
    """``model.tokenizer_file``: the text plugin's tokenizer read from that file (errors name the key)."""
    from one_peace.checkpoint import tokenizer_modality

    path = Path(str(cfg.model.tokenizer_file))
    if not path.is_file():
        raise FileNotFoundError(f"model.tokenizer_file: {path} is not a file (a tokenizer.json)")
    try:
        return model.plugins[tokenizer_modality(model.config)].load_tokenizer(path)
    except Exception as exc:  # the tokenizers library raises its own exception type
        raise ValueError(f"model.tokenizer_file: {path} cannot be read as a tokenizer ({exc})") from None


def data_fields(cfg: DictConfig) -> dict[str, str]:
    """``modality -> field``: ``data.fields``, else ``{<modality>: data.modality_field, text: data.text_field}``."""
    fields = {str(k): str(v) for k, v in (cfg.data.fields or {}).items()}
    if not fields and cfg.data.get("modality_field") and cfg.get("modality"):
        fields = {str(cfg.modality): str(cfg.data.modality_field), LANGUAGE: str(cfg.data.text_field or LANGUAGE)}
    return fields


def loader_config(cfg: DictConfig, batch_size: int, train: bool, pin_memory: bool = False) -> Any:
    """The loader's options from ``data.*`` (training: shuffled and bucketed; validation: in order, padded)."""
    from one_peace.data.loader import LoaderConfig

    d = cfg.data
    common = dict(
        batch_size=batch_size,
        backend=d.backend,
        num_workers=d.num_workers,
        prefetch_factor=d.prefetch_factor,
        persistent_workers=d.persistent_workers,
        worker_start=d.worker_start,
        pin_memory=pin_memory,
        num_parallel_calls=d.num_parallel_calls,
        seed=cfg.seed,
        max_bad_fraction=d.max_bad_fraction,
        min_samples_for_bad_check=d.min_samples_for_bad_check,
        allow_changed=d.allow_changed,
        extensions={str(k): str(v) for k, v in (d.get("extensions") or {}).items()},
    )
    if not train:  # one pass after training: no worker kept alive for it
        return LoaderConfig(shuffle_window=0, remainder="pad", **{**common, "persistent_workers": False})
    buckets = list(d.length_buckets) if d.length_buckets is not None else None
    return LoaderConfig(
        shuffle_window=d.shuffle_window, length_buckets=buckets, bucket_by=d.bucket_by, remainder=d.remainder, **common
    )


def build_tokenizer(cfg: DictConfig, train: str, text_fields: list[str], out: Path, extra: list[str]) -> Any:
    """The BPE of this run: ``out/tokenizer.json`` if present, else trained on the training text (and saved)."""
    from one_peace.tokenizer import load_tokenizer, train_tokenizer

    path = out / "tokenizer.json"
    if path.is_file():
        return load_tokenizer(path)
    from one_peace.data.manifest import check_text
    from one_peace.data.shards import iter_rows

    texts = list(extra)
    extensions = {str(k): str(v) for k, v in (cfg.data.get("extensions") or {}).items()}
    for line_no, row in iter_rows(train, extensions):  # a manifest or a shard folder
        for f in text_fields:
            if f in row:
                check_text(str(row[f]), f"{train}:{line_no}: field {f!r}")
                texts.append(str(row[f]))
    tok = train_tokenizer(texts, vocab_size=cfg.data.vocab_size)
    tok.save(out)  # out/tokenizer.json
    return tok


# ---------------------------------------------------------------------------------------------------- tasks
def task_needs(cfg: DictConfig, spec: Any) -> dict[str, Any]:
    """What one task needs: its kind, modalities, loader fields and passthrough, text fields, instruction."""
    kind = spec.type
    if kind == "seq2seq":
        from one_peace.train.instructions import Instruction

        if not spec.get("instruction"):
            raise ValueError("task.instruction: a seq2seq task needs an instruction")
        instruction = Instruction(spec.instruction)
        media = {
            s.kind: s.field for t in instruction.templates for s in t.source_slots if s.kind not in (LANGUAGE, "box")
        }
        passthrough = sorted(instruction.fields() - set(media.values()))
        return {
            "kind": kind,
            "instruction": instruction,
            "fields": media,
            "passthrough": passthrough,
            "modalities": [*media, LANGUAGE],
            "text_fields": passthrough,
            "plain": [p for t in instruction.templates for p in t.source if isinstance(p, str)],
            "target_field": next((s.field for s in instruction.templates[0].target_slots if s.kind == LANGUAGE), None),
            "box_field": next((s.field for s in instruction.templates[0].target_slots if s.kind == "box"), None),
            "closed_set": next(
                (s.field for t in instruction.templates for s in t.target_slots if "closed_set" in s.attrs), None
            ),
        }
    if kind != "objectives":
        raise ValueError(f"task.type must be 'seq2seq', 'objectives' or 'multitask', got {kind!r}")
    data = spec.get("data") or {}
    fields = {str(k): str(v) for k, v in (data.get("fields") or {}).items()} or data_fields(cfg)
    entries = [dict(to_container(e)) for e in (spec.get("objectives") or {}).values()]
    return {
        "kind": kind,
        "fields": fields,
        "passthrough": sorted({str(e["teacher_field"]) for e in entries if e.get("teacher_field")}),
        "modalities": list(fields),
        "text_fields": [f for m, f in fields.items() if get_plugin(m).needs_tokenizer],
        "plain": [],
    }


def task_specs(cfg: DictConfig) -> dict[str, Any]:
    """``name -> task section``: the tasks of a multi-task recipe, or the recipe's one task."""
    if cfg.task.type == "multitask":
        if not cfg.task.tasks:
            raise ValueError("task.tasks: a multitask recipe needs at least one task")
        return {str(k): v for k, v in cfg.task.tasks.items()}
    return {str(cfg.recipe_name): cfg.task}


def objectives_task(cfg: DictConfig, spec: Any, model: OnePeaceModel, teacher: Any = None) -> Any:
    """A :class:`~one_peace.train.task.Task` with the section's objectives (and the denoising decoder); ``teacher``
    (``model.retokenize``) goes to the objectives that take one (``distill_text``)."""
    from one_peace.models.decoder import DecoderConfig, DenoiseDecoder
    from one_peace.train.objectives import OBJECTIVES
    from one_peace.train.task import Task

    objectives = {}
    for key, entry in (spec.get("objectives") or {}).items():
        entry = dict(to_container(entry))
        if "name" not in entry:
            raise ValueError(f"task.objectives.{key}: needs a 'name' (one of {sorted(OBJECTIVES)})")
        name, weight = entry.pop("name"), entry.pop("weight", 1.0)
        if name not in OBJECTIVES:
            raise ValueError(
                f"task.objectives.{key}.name: unknown objective {name!r}; registered: {sorted(OBJECTIVES)}"
            )
        if "modalities" in entry:
            entry["modalities"] = tuple(entry["modalities"])
        if "teacher" in inspect.signature(OBJECTIVES[name]).parameters:
            entry["teacher"] = teacher
        try:
            objectives[key] = (OBJECTIVES[name](**entry), weight)
        except TypeError as exc:
            raise ValueError(f"task.objectives.{key}: {exc}") from None
    if not objectives:
        raise ValueError("task.objectives: an objectives task needs at least one objective")
    decoder = None
    if spec.get("decoder") is not None:
        from one_peace.checkpoint.pretrain import decoder_from_official_state, pretrained_decoder_state

        mods = tuple(m for m in model.config.modalities if get_plugin(m).decoder)
        state = pretrained_decoder_state(cfg.model.get("pretrained"))
        dec = dict(to_container(spec.decoder))
        if state is not None:  # the official pretraining decoder of the checkpoint
            decoder = decoder_from_official_state(
                state, model.config.embed_dim, heads=dec.get("heads", 12), source=str(cfg.model.pretrained)
            )
        else:
            decoder = DenoiseDecoder(DecoderConfig(encoder_dim=model.config.embed_dim, modalities=mods, **dec))
    return Task(model, objectives, decoder=decoder, seed=cfg.seed)


def build_task(
    cfg: DictConfig, spec: Any, needs: dict[str, Any], model: OnePeaceModel, tokenizer: Any, teacher: Any = None
) -> Any:
    """The task module of one task section (``teacher``: see :func:`objectives_task`)."""
    if needs["kind"] == "seq2seq":
        from one_peace.train.seq2seq_task import Seq2SeqTask

        decoder = dict(to_container(spec.decoder)) if spec.get("decoder") is not None else {}
        return Seq2SeqTask(model, tokenizer, needs["instruction"], decoder, spec.label_smoothing, cfg.seed)
    return objectives_task(cfg, spec, model, teacher)


# ---------------------------------------------------------------------------------------------------- model
def modality_options(cfg: DictConfig, modalities: list[str], vocab_size: int | None) -> dict[str, dict[str, Any]]:
    """Plugin options of a model built from scratch: the recipe's defaults, then ``model.modality_options``.

    Every option is checked against the plugin's own (an unknown modality, an unknown option or a value of another
    type than the plugin's default is an error naming ``model.modality_options.<modality>.<option>``).
    """
    options: dict[str, dict[str, Any]] = {}
    modalities = with_required(modalities)  # video's image stem takes data.image_size too
    for modality in modalities:  # the recipe's defaults: data.image_size, and the run's tokenizer's vocabulary
        plugin = get_plugin(modality)
        names = plugin.Options().keys()
        if "image_size" in names:
            options.setdefault(modality, {})["image_size"] = int(cfg.data.image_size or DEFAULT_IMAGE_SIZE)
        if plugin.needs_tokenizer and vocab_size is not None and "vocab_size" in names:
            options.setdefault(modality, {})["vocab_size"] = int(vocab_size)
    user = to_container(cfg.model.modality_options) or {}
    for modality, opts in user.items():
        where = f"model.modality_options.{modality}"
        if modality not in modalities:
            known = ", ".join(sorted(list_modalities()))
            raise ValueError(
                f"{where}: {modality!r} is not a modality of this recipe ({modalities}; registered: {known})"
            )
        options.setdefault(modality, {}).update(opts or {})
        get_plugin(modality).parse_options(options[modality], where=where)  # unknown keys, wrong types
    return options


def with_required(modalities: list[str]) -> list[str]:
    """``modalities`` and those their plugins require (video: image), which the model builds anyway."""
    return list(dict.fromkeys([*modalities, *(r for m in modalities for r in get_plugin(m).requires)]))


def model_config(cfg: DictConfig, modalities: list[str], vocab_size: int | None) -> ModelConfig:
    """The encoder config the ``model`` section describes (dimensions as given, validated)."""
    m = cfg.model
    config = ModelConfig(
        embed_dim=int(m.embed_dim),
        layers=int(m.layers),
        heads=int(m.heads),
        ffn_dim=int(m.ffn_dim),
        modalities=tuple(with_required(modalities)),
        modality_options=modality_options(cfg, modalities, vocab_size),
        layer_scale_init=float(m.layer_scale_init),
        drop_path_rate=float(m.drop_path_rate),
        attn_backend=str(m.attn_backend),
        name=str(m.size),
    )
    try:
        config.validate()
    except ValueError as exc:
        raise ValueError(
            str(exc).replace("model config field ", "model.").replace("model config: ", "model.")
        ) from None
    return config


def build_model(cfg: DictConfig, modalities: list[str], tokenizer: Any) -> OnePeaceModel:
    """A model from scratch with the ``model`` section's dimensions and the plugins' options."""
    config = model_config(cfg, modalities, tokenizer.vocab_size if tokenizer is not None else None)
    torch.manual_seed(cfg.seed)
    model = OnePeaceModel(config)
    model.tokenizer = tokenizer
    return model


def cli_overrides() -> list[str]:
    """The command line's overrides when running under Hydra (empty otherwise)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    except (ImportError, ValueError):
        return []


def load_pretrained(cfg: DictConfig, modalities: list[str], say: Any = print) -> OnePeaceModel | None:
    """``model.pretrained``: an official file or one of our folders, in its own size and image resolution.

    A size asked for on the command line (``model=...``, ``model.layers=...``) that differs from the checkpoint's
    is an error; ``data.image_size`` given explicitly re-grids an official checkpoint's image positions (printed).
    """
    from one_peace.checkpoint import load

    path = cfg.model.get("pretrained")
    if not path:
        return None
    if cfg.model.modality_options:
        raise ValueError(
            f"model.modality_options: cannot change the plugin options of a pretrained model (model.pretrained={path})"
        )
    official = Path(path).is_file()
    size = cfg.data.image_size
    if size is not None and not official:
        raise ValueError(
            f"data.image_size={size}: a checkpoint folder keeps the resolution it was converted with "
            f"(model.pretrained={path}); convert the official file again with that size, or leave data.image_size"
        )
    extra: dict[str, Any] = {"image_size": int(size)} if size is not None else {}
    model = load(path, bpe_dir=cfg.model.get("bpe_dir"), **extra)
    if size is not None:
        say(f"model.pretrained: images run at {size} px as data.image_size asks (positions and tables resized)")
    asked = [o.split("=")[0] for o in cli_overrides()]
    if any(k == "model" or k in {f"model.{d}" for d in (*MODEL_DIMS, "size")} for k in asked):
        theirs = {d: getattr(model.config, d) for d in MODEL_DIMS}
        ours = {d: int(cfg.model[d]) for d in MODEL_DIMS}
        if theirs != ours:
            raise ValueError(
                f"model.pretrained={path} is {theirs}, but the command line asks for model {cfg.model.size} {ours}: "
                "drop the size overrides (a pretrained start keeps the checkpoint's size)"
            )
    missing = [m for m in modalities if m not in model.adapters]
    if missing:
        raise ValueError(
            f"model.pretrained={path}: the checkpoint has no {missing} modality (it has {list(model.adapters)})"
        )
    if any(get_plugin(m).needs_tokenizer for m in modalities) and model.tokenizer is None:
        raise ValueError(
            f"model.pretrained={path}: no tokenizer in the checkpoint; pass model.bpe_dir=<folder with the BPE files>"
        )
    return model.train()


# -------------------------------------------------------------------------------------------------- trainer
def trainer_config(cfg: DictConfig) -> Any:
    """The library's :class:`~one_peace.train.trainer.TrainerConfig` from the ``trainer`` section."""
    from one_peace.train.optim import OPTIMIZERS, SCHEDULES
    from one_peace.train.trainer import TrainerConfig

    raw: dict[str, Any] = {str(k): v for k, v in dict(to_container(cfg.trainer) or {}).items()}
    known = {f.name for f in dataclasses.fields(TrainerConfig)}
    for key in raw:
        if key not in known:  # the schema and TrainerConfig disagree: a bug of ours, caught by a test
            raise ValueError(f"unknown config key trainer.{key}; expected one of {sorted(known)}")
    for key in ("trainable", "frozen"):
        raw[key] = tuple(raw.get(key) or ())
    raw["seed"] = int(cfg.seed)
    if raw.get("schedule", "warmup_cosine") not in SCHEDULES:
        raise ValueError(f"trainer.schedule: unknown schedule {raw['schedule']!r}; registered: {sorted(SCHEDULES)}")
    name = (raw.get("optimizer") or {}).get("name", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"trainer.optimizer.name: unknown optimizer {name!r}; registered: {sorted(OPTIMIZERS)}")
    config = TrainerConfig(**raw)
    config.validate()
    return config


def check_config(cfg: DictConfig, modalities: list[str]) -> None:
    """Check the values before any work: model dimensions and plugin options, trainer and loader settings."""
    for modality in modalities if cfg.data.image_size is not None else ():
        plugin = get_plugin(modality)  # the plugins with an image_size option check it, named by the run's key
        if "image_size" in {f.name for f in dataclasses.fields(plugin.Options)}:
            try:  # (with model.pretrained it is applied after loading: checked here, before any work)
                plugin.parse_options({"image_size": int(cfg.data.image_size)})
            except (ValueError, TypeError) as exc:
                raise ValueError(f"data.image_size={cfg.data.image_size}: {exc}") from None
    if not cfg.model.get("pretrained"):
        model_config(cfg, modalities, vocab_size=None)
    trainer_config(cfg)
    loader_config(cfg, int(cfg.trainer.batch_size), train=True).validate()
    if cfg.data.backend == "fairseq2":
        from one_peace.extras import require

        require("fairseq2", "fairseq2", feature="data.backend=fairseq2")
    if (cfg.data.train is None) != (cfg.data.valid is None):
        raise ValueError("data.train and data.valid go together (neither = the demo data)")
    for key in ("train", "valid"):
        value = cfg.data[key]
        if value is not None and not Path(str(value)).exists():
            raise FileNotFoundError(
                f"data.{key}={value}: not found (a manifest .jsonl/.tsv, a .tar shard or a folder of .tar shards)"
            )
