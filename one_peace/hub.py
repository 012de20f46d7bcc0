"""Publishing models the way the Hugging Face Hub expects them: :func:`save_pretrained` and :func:`push_to_hub`.

``save_pretrained(source, folder)`` writes a folder that ``one_peace.load``, ``one_peace.load("hf-hub:...")`` (once
pushed) and ``SentenceTransformer(folder, trust_remote_code=True)`` all read:

* ``config.json`` (our format: the model config, the tokenizer entry, each modality's plugin record: distribution,
  version, options), the tokenizer files, ``pretrain_decoder.safetensors`` when the source has one and
  ``task.safetensors`` (only the seq2seq decoders, :mod:`one_peace.generation`) when it was trained to generate;
* the weights as ``model.safetensors`` or, above ``shard_size``, ``model-0000i-of-0000N.safetensors`` with
  ``model.safetensors.index.json`` (streamed one tensor at a time from a folder: a 4B model needs one shard of
  memory, not the model);
* ``modules.json`` and ``config_sentence_transformers.json`` (:mod:`one_peace.st`);
* ``README.md``: a model card with the Hub's metadata (``library_name``, ``pipeline_tag``, the modalities as tags,
  the evaluation results as ``model-index``) and, when the source is a training run (its output folder, or a
  checkpoint in its ``checkpoints/``), the recipe, the command-line overrides, the composed config, the numbers
  ``eval.json`` recorded and the code version the run recorded.

``push_to_hub(source, "org/name")`` writes that folder into a temporary one and uploads it with ``huggingface_hub``
(``HF_ENDPOINT`` and ``HF_TOKEN`` are honoured as everywhere in the Hub's tools).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from one_peace.checkpoint import (
    CheckpointError,
    _replace_dir,
    iter_weights,
    plugin_records,
    write_config,
    write_st_files,
)
from one_peace.checkpoint.folder import CONFIG, read_folder, regular_file, tokenizer_files
from one_peace.checkpoint.generators import copy_generator_weights, save_generators
from one_peace.checkpoint.writer import WeightWriter, parse_size
from one_peace.models.encoder import OnePeaceModel

PRETRAIN = "pretrain_decoder.safetensors"
CARD = "README.md"


@dataclass
class RunRecord:
    """What a training run recorded about itself (all optional: a bare checkpoint folder has none of it)."""

    folder: Path | None = None
    recipe: str | None = None
    config_yaml: str | None = None
    overrides: list[str] = field(default_factory=list)
    eval: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None


def locate(source: str | Path) -> tuple[Path, Path | None]:
    """``(checkpoint folder, run folder or None)`` of a run's output folder (its newest complete checkpoint), a
    checkpoint inside a run's ``checkpoints/``, or any checkpoint folder.

    Raises:
        CheckpointError: a path that is none of these.
    """
    from one_peace.train.checkpointing import latest_checkpoint

    path = Path(source)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (expected a checkpoint folder or a training run's output folder)")
    if (path / CONFIG).is_file():
        run = path.parent.parent if path.parent.name == "checkpoints" else None
        return path, run if run is not None and (run / ".hydra").is_dir() else None
    if (path / "checkpoints").is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: a training run without a complete checkpoint in {path / 'checkpoints'}")
        return found, path
    raise CheckpointError(f"{path}: neither a checkpoint folder (no {CONFIG}) nor a training run (no checkpoints/)")


def read_run(run: Path | None, checkpoint: Path | None = None) -> RunRecord:
    """The recipe, config, overrides, evaluation results and versions ``run`` recorded (``.hydra/`` and
    ``eval.json``); unreadable or missing files leave their part empty. Evaluation results are kept only when they
    belong to ``checkpoint`` (``eval.json`` names the checkpoint it evaluated)."""
    import yaml

    record = RunRecord(folder=run)
    if run is None:
        return record
    hydra = run / ".hydra"
    try:
        record.config_yaml = (hydra / "config.yaml").read_text()
        cfg = yaml.safe_load(record.config_yaml)
        record.recipe = cfg.get("recipe_name") if isinstance(cfg, dict) else None
    except (OSError, yaml.YAMLError):
        record.config_yaml = None
    try:
        overrides = yaml.safe_load((hydra / "overrides.yaml").read_text())
        record.overrides = [str(o) for o in overrides] if isinstance(overrides, list) else []
    except (OSError, yaml.YAMLError):
        pass
    try:
        versions = yaml.safe_load((hydra / "versions.yaml").read_text())
        record.versions = versions if isinstance(versions, dict) else {}
    except (OSError, yaml.YAMLError):
        pass
    try:
        results = json.loads((run / "eval.json").read_text())
    except (OSError, ValueError):
        results = None
    if isinstance(results, dict):
        evaluated = results.get("checkpoint")
        record.checkpoint = str(evaluated) if evaluated else None
        same = checkpoint is None or not evaluated or Path(str(evaluated)).name == checkpoint.name
        if same:
            record.eval = {k: v for k, v in results.items() if k != "checkpoint"}
    return record


def save_pretrained(
    source: OnePeaceModel | str | Path,
    folder: str | Path,
    *,
    shard_size: int | str = "2GB",
    run: str | Path | None = None,
    license: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write ``source`` (a model, a checkpoint folder or a training run's output folder) as a shareable folder
    (see the module docstring), atomically: a temporary folder renamed into place.

    Args:
        source: The model, or a folder: a run's output folder takes its newest complete checkpoint, and a run's
            recorded recipe, config and evaluation go into the model card.
        folder: Destination (replaced when it exists).
        shard_size: The largest weight file (bytes, or ``"500MB"``, ``"2GB"``).
        run: The training run the source came from, when it is not found from the source's path.
        license: A license identifier for the card's metadata (e.g. ``"apache-2.0"``).
        repo_id: The Hub repository the card's usage snippets name (default: the folder's name).

    Raises:
        CheckpointError: a source that is not a valid checkpoint folder (naming the file and key).
    """
    size = parse_size(shard_size)
    dest = Path(folder)
    run_folder = Path(run) if run is not None else None
    checkpoint: Path | None = None
    if not isinstance(source, OnePeaceModel):
        checkpoint, found = locate(source)
        run_folder = run_folder or found
    record = read_run(run_folder, checkpoint)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        if isinstance(source, OnePeaceModel):
            config = source.config
            write_weights(tmp, source.state_dict().items(), size)
            trained: dict[str, Any] = dict(source.trained_with) if source.trained_with else {}
            trained.pop("generators", None)
            written = save_generators(source, tmp)  # a loaded seq2seq checkpoint's decoders
            if written:
                trained["generators"] = written
            extra: dict[str, Any] = {"trained": trained} if trained else {}
            write_config(tmp, config, source.tokenizer, **extra)
        else:
            assert checkpoint is not None
            checked = read_folder(checkpoint)  # validated before anything is copied
            config = checked.config
            write_weights(tmp, iter_weights(checkpoint), size)
            for f in tokenizer_files(checkpoint, checked.doc):
                target = tmp / f.relative_to(checkpoint)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
            copy_generator_weights(checkpoint, checked.doc, tmp)  # the seq2seq decoders the config names
            if (checkpoint / PRETRAIN).exists():
                shutil.copyfile(regular_file(checkpoint, PRETRAIN, str(checkpoint)), tmp / PRETRAIN)
            shutil.copyfile(checked.config_path, tmp / CONFIG)
            write_st_files(tmp)
        generators = (json.loads((tmp / CONFIG).read_text()).get("trained") or {}).get("generators")
        (tmp / CARD).write_text(model_card(config, record, repo_id or dest.name, license, generators))
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def write_weights(folder: Path, items: Any, shard_size: int) -> list[str]:
    """Write ``(name, tensor)`` items into ``folder`` as safetensors shards of about ``shard_size`` bytes."""
    writer = WeightWriter(folder, shard_size)
    for name, tensor in items:
        writer.add(name, tensor.cpu())
    return writer.finish()


def _metric_rows(results: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _metric_rows(value, f"{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((name, float(value)))
    return rows


def model_card(
    config: Any, record: RunRecord, name: str, license: str | None = None, generators: dict[str, Any] | None = None
) -> str:
    """The ``README.md`` of a shared folder: YAML metadata for the Hub, then what the model is, how to load it (and
    generate with it, for ``generators``: a seq2seq run's decoder records), how it was trained and what it scored
    (from ``record``)."""
    import yaml

    import one_peace
    from one_peace.models.encoder import count_parameters
    from one_peace.registry import get_plugin

    modalities = list(config.modalities)
    records = plugin_records(config)
    metrics = _metric_rows(record.eval)
    meta: dict[str, Any] = {
        "library_name": "one-peace",
        "pipeline_tag": "feature-extraction",
        "tags": ["one-peace", "sentence-transformers", "multimodal", *modalities],
    }
    if license:
        meta["license"] = license
    if metrics:
        meta["model-index"] = [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": "feature-extraction", "name": record.recipe or "evaluation"},
                        "dataset": {"name": "validation", "type": record.recipe or "custom"},
                        "metrics": [{"name": k, "type": k, "value": v} for k, v in metrics],
                    }
                ],
            }
        ]
    try:
        from one_peace.checkpoint.assign import _build_meta

        params = count_parameters(_build_meta(config))
    except Exception:
        params = None
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {name}", ""]
    size = f"{params / 1e6:,.1f} M parameters, " if params else ""
    lines += [
        f"A one-peace any-modality embedding model ({size}{config.layers} layers of width "
        f"{config.embed_dim}): one shared self-attention stack with a GeGLU FFN per modality. Every modality's "
        f"embedding lives in one {config.embed_dim}-dimensional space, so any modality can search any other.",
        "",
        "## Modalities",
        "",
        "| modality | plugin | version |",
        "|---|---|---|",
    ]
    for m in modalities:
        r = records.get(m, {})
        lines.append(f"| {m} | {r.get('distribution') or r.get('source') or '-'} | {r.get('version') or '-'} |")
    first = next((m for m in modalities if get_plugin(m).needs_tokenizer), modalities[0])
    lines += [
        "",
        "## Use it",
        "",
        "```python",
        "import one_peace",
        "",
        f'model = one_peace.load("hf-hub:{name}")  # or the local folder',
        f'vectors = model.encode("{first}", [...])  # (N, {config.embed_dim}), L2-normalised',
        "```",
        "",
        "With sentence-transformers (`pip install one-peace[st]`):",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f'model = SentenceTransformer("{name}", trust_remote_code=True)  # runs one_peace.st.OnePeaceEncoder',
        'vectors = model.encode(["a photo of a dog", PIL.Image.open("dog.jpg")])',
        "```",
        "",
    ]
    for gen_name, gen in (generators or {}).items():
        lines += [
            f"## Generate ({gen_name})",
            "",
            f"Trained with the instruction `{gen['instruction']}` (beam {gen['beam']}, at most {gen['max_tokens']} "
            "tokens); `generate` uses them unless told otherwise:",
            "",
            "```python",
            f'out = one_peace.load("hf-hub:{name}").generate([...])  # rows or items: .text, .score, .box',
            "```",
            "",
        ]
    if record.recipe or record.config_yaml:
        lines += ["## Training", ""]
        if record.recipe:
            lines.append(f"Recipe: `{record.recipe}` (`python -m one_peace.run recipe={record.recipe}`).")
        if record.overrides:
            lines.append("Command-line overrides: " + " ".join(f"`{o}`" for o in record.overrides) + ".")
        if record.config_yaml:
            lines += [
                "",
                "<details><summary>The composed config the run recorded</summary>",
                "",
                "```yaml",
                record.config_yaml.rstrip(),
                "```",
                "",
                "</details>",
            ]
        lines.append("")
    if metrics:
        lines += ["## Evaluation", "", "Recorded by the run (`eval.json`):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in metrics]
        lines.append("")
    lines += ["## Versions", ""]
    for key, value in record.versions.items():
        lines.append(f"- trained with {key}: {value}")
    lines.append(f"- card written by one-peace {one_peace.__version__}")
    return "\n".join(lines) + "\n"


def push_to_hub(
    source: OnePeaceModel | str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    shard_size: int | str = "2GB",
    run: str | Path | None = None,
    license: str | None = None,
) -> str:
    """Upload ``source`` (as :func:`save_pretrained` writes it) to the Hub repository ``repo_id`` (created when
    missing); returns the commit's URL. ``HF_ENDPOINT`` chooses the Hub, ``token`` (or ``HF_TOKEN``) the account.
    """
    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="one-peace-push-") as tmp:
        folder = save_pretrained(
            source, Path(tmp) / "model", shard_size=shard_size, run=run, license=license, repo_id=repo_id
        )
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or "Upload a one-peace model",
        )
    return str(getattr(info, "commit_url", info))


def main(argv: list[str] | None = None) -> int:
    """``python -m one_peace.hub save SOURCE FOLDER`` / ``push SOURCE ORG/NAME``: SOURCE is a checkpoint folder or a
    training run's output folder (its newest checkpoint, its recipe and evaluation in the card)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m one_peace.hub", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, target in (("save", "folder"), ("push", "repo_id")):
        p = sub.add_parser(name, help=f"{'write a shareable folder' if name == 'save' else 'upload to the Hub'}")
        p.add_argument("source", help="a checkpoint folder or a training run's output folder")
        p.add_argument(target, help="destination folder" if name == "save" else "the Hub repository (org/name)")
        p.add_argument("--shard-size", default="2GB", help="largest weight file (e.g. 500MB, 2GB)")
        p.add_argument("--license", help="license identifier for the card (e.g. apache-2.0)")
        if name == "push":
            p.add_argument("--private", action="store_true", help="create the repository private")
            p.add_argument("--revision", help="branch to commit to")
    args = parser.parse_args(argv)
    try:
        if args.command == "save":
            print(
                f"wrote {save_pretrained(args.source, args.folder, shard_size=args.shard_size, license=args.license)}"
            )
        else:
            url = push_to_hub(
                args.source,
                args.repo_id,
                private=args.private,
                revision=args.revision,
                shard_size=args.shard_size,
                license=args.license,
            )
            print(f"pushed: {url}")
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
