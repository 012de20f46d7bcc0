"""Checkpoints: our folder format (safetensors + ``config.json``) and official ONE-PEACE ``.pt`` files.

Folder contract (shared by the trainer, the converter and :func:`load`):
``config.json`` (format version, model config, tokenizer entry), ``model.safetensors`` or shards
``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, the tokenizer files, and optionally
``pretrain_decoder.safetensors`` (official decoder keys, unchanged) and ``training_state/``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from one_peace.checkpoint.assign import _assign, _build_meta, persistent_buffers
from one_peace.checkpoint.folder import INDEX, WEIGHTS, read_folder, weight_files
from one_peace.checkpoint.official import (
    IGNORED,
    infer_config,
    interpolate_image_table,
    is_ignored,
    is_pretrain_key,
    looks_official,
    map_official_key,
)
from one_peace.checkpoint.safe_pickle import CheckpointError, safe_torch_load
from one_peace.config import CONFIG_FORMAT_VERSION, ModelConfig
from one_peace.models.encoder import OnePeaceModel
from one_peace.registry import get_plugin

__all__ = [
    "IGNORED",
    "INDEX",
    "WEIGHTS",
    "CheckpointError",
    "iter_weights",
    "load",
    "load_official",
    "official_state_items",
    "persistent_buffers",
    "save",
    "write_st_files",
]

PRETRAIN = "pretrain_decoder.safetensors"


# ------------------------------------------------------------------------------------------------ our folders
def save(
    model: OnePeaceModel,
    folder: str | Path,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    task_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` into ``folder`` atomically (a temp folder renamed into place).

    Args:
        model: The model; its tokenizer (if any) is saved beside the weights.
        folder: Destination; replaced if it exists.
        extra_tensors: Optional pretraining-only tensors written to ``pretrain_decoder.safetensors``.
        state_dict: Weights to write instead of ``model.state_dict()`` (e.g. the gathered full state of an
            FSDP-sharded model).
        task_state: A training task's own tensors (its decoders), written to ``task.safetensors``; without it, the
            decoders of a loaded seq2seq checkpoint (:mod:`one_peace.generation`) are written there, and the
            ``trained`` record keeps its ``generators`` only when their weights are written.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        source = state_dict if state_dict is not None else model.state_dict()
        state = {k: v.detach().contiguous().cpu() for k, v in source.items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if extra_tensors:
            save_file({k: v.contiguous() for k, v in extra_tensors.items()}, str(tmp / PRETRAIN))
        from one_peace.checkpoint.generators import TASK_WEIGHTS, save_generators

        recorded = getattr(model, "trained_with", None)
        trained: dict[str, Any] | None = dict(recorded) if recorded else None
        if task_state:  # a training run's (its record of the generators is in trained_with)
            save_file(task_state, str(tmp / TASK_WEIGHTS))
        else:  # a loaded seq2seq checkpoint's decoders; a record without weights is never written
            written = save_generators(model, tmp)
            if trained is not None:
                trained.pop("generators", None)
                if written:
                    trained["generators"] = written
        extra: dict[str, Any] = {"trained": trained} if trained else {}
        write_config(tmp, model.config, model.tokenizer, **extra)
        _replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def tokenizer_modality(config: ModelConfig) -> str:
    """The model's modality whose preprocessor needs the tokenizer (the language modality by default)."""
    from one_peace.tokenizer import LANGUAGE

    return next((m for m in config.modalities if get_plugin(m).needs_tokenizer), LANGUAGE)


def write_config(folder: Path, config: ModelConfig, tokenizer: Any, st_files: bool = True, **extra: Any) -> None:
    """Write ``config.json`` (and the tokenizer files) into ``folder``, with the sentence-transformers files
    (:func:`write_st_files`) unless ``st_files=False``."""
    entry = dict(tokenizer.save(folder)) if tokenizer is not None else None
    if entry is not None:  # which plugin reads it back
        entry.setdefault("modality", tokenizer_modality(config))
    doc = {
        "format_version": CONFIG_FORMAT_VERSION,
        "library": "one-peace",
        "model": {k: v for k, v in config.to_dict().items() if k != "attn_backend"},  # a runtime choice
        "tokenizer": entry,
        "plugins": plugin_records(config),
        **extra,
    }
    (folder / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
    if st_files:
        write_st_files(folder)


#: the sentence-transformers pipeline of every folder: our module (:class:`one_peace.st.OnePeaceEncoder`, the whole
#: model: no per-modality Router, which would hold a copy of the shared attention per route), then L2 normalisation
ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "one_peace.st.OnePeaceEncoder"},
    {"idx": 1, "name": "1", "path": "1_Normalize", "type": "sentence_transformers.base.modules.Normalize"},
]


def write_st_files(folder: Path) -> None:
    """``modules.json`` and ``config_sentence_transformers.json``: ``SentenceTransformer(folder,
    trust_remote_code=True)`` loads the folder through :mod:`one_peace.st` (the flag: the module is not part of
    sentence-transformers). The config declares the one-peace version it needs."""
    from one_peace import __version__

    (folder / "modules.json").write_text(json.dumps(ST_MODULES, indent=2) + "\n")
    config = {
        "model_type": "SentenceTransformer",
        "__version__": {"one_peace": __version__},
        "requirements": {"one-peace": {"specifier": f">={__version__}", "reason": "the model's code (one_peace.st)"}},
        "prompts": {},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    (folder / "config_sentence_transformers.json").write_text(json.dumps(config, indent=2) + "\n")


def plugin_records(config: ModelConfig) -> dict[str, dict[str, Any]]:
    """Each modality's plugin record (distribution, version, source, full resolved options) for ``config``."""
    return {m: get_plugin(m).record(config) for m in config.modalities}


def apply_plugin_records(config: ModelConfig, records: Any, where: str) -> None:
    """Build ``config``'s modalities with the options recorded at ``where`` (warning when a plugin's installed
    version differs, refusing a recorded option the installed plugin does not know: ``check_record``). A recorded
    value that the installed plugin's default would change is pinned in ``config.modality_options``."""
    from one_peace.registry import PluginError, check_record

    if records is None:
        return
    if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
        raise CheckpointError(f"{where}: 'plugins' must map modality names to records, got {type(records).__name__}")
    for name in config.modalities:
        if name in records:
            try:
                recorded = check_record(name, records[name], where)
            except PluginError as exc:
                raise CheckpointError(str(exc)) from None
            # pin only what the installed defaults would change: the config reads as it was saved
            defaults = get_plugin(name).defaults
            given = dict(config.modality_options.get(name, {}))
            given.update({k: v for k, v in recorded.items() if k not in given and defaults.get(k) != v})
            if given:
                config.modality_options[name] = given


def _replace_dir(tmp: Path, folder: Path) -> None:
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(folder)


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, str]]:
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield key, fh.get_tensor(key), key
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{f}: unreadable safetensors file (truncated or corrupted?): {exc}") from None


def iter_weights(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every weight in a checkpoint folder (single file or shards), read lazily."""
    for name, tensor, _ in _iter_safetensors(weight_files(Path(folder))):
        yield name, tensor


def _load_folder(
    folder: Path,
    dtype: torch.dtype | None,
    device: str | torch.device,
    official_padding: bool | None,
    bpe_dir: str | Path | None,
) -> OnePeaceModel:
    from one_peace.tokenizer import load_tokenizer

    checked = read_folder(folder)  # config.json, the index and the files it names, the config against the weights
    doc, config = checked.doc, checked.config
    model = _build_meta(config)
    _assign(model, _iter_safetensors(checked.weight_files), str(folder), dtype, device)
    if doc.get("tokenizer") and bpe_dir is None:
        entry = doc["tokenizer"]
        where = f"{checked.config_path} (tokenizer)"
        modality = entry.get("modality", tokenizer_modality(config))
        if modality not in config.modalities:
            raise CheckpointError(
                f"{where}: 'modality' must be one of the model's {list(config.modalities)}, got {modality!r}"
            )
        try:
            model.tokenizer = load_tokenizer(folder, entry, modality=modality)
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{where}: {exc}") from None
    if bpe_dir is not None:
        model.tokenizer = load_tokenizer(bpe_dir, modality=tokenizer_modality(config))
    if official_padding is not None:
        model.official_padding = official_padding
    trained = doc.get("trained")
    if isinstance(trained, dict) and isinstance(trained.get("uses"), list):
        model.trained_with = {"recipe": str(trained.get("recipe")), "uses": [str(u) for u in trained["uses"]]}
        if trained.get("generators") is not None:  # a seq2seq run's decoders: built when generation asks for them
            from one_peace.checkpoint.generators import attach_generators

            attach_generators(model, folder, trained["generators"], where=f"{checked.config_path} (trained)")
    return model.eval()


def warn_unless_trained_for(model: OnePeaceModel, use: str, where: str) -> bool:
    """Warn (naming the recipe) when ``model``'s checkpoint records a training run that did not train it for
    ``use`` (``retrieval``: a seq2seq captioner's embeddings were never aligned across modalities); returns whether
    it warned. Official checkpoints and models built here record nothing: no warning."""
    import warnings

    trained = getattr(model, "trained_with", None)
    if not trained or use in trained.get("uses", []):
        return False
    what = ", ".join(trained.get("uses", [])) or "nothing it records"
    consequence = (
        "its embeddings were not aligned across modalities; expect near-chance results"
        if use == "retrieval"
        else "expect poor results"
    )
    recipe = trained.get("recipe")
    message = f"{where}: this checkpoint was trained by recipe {recipe!r} for {what}, not for {use}: {consequence}"
    warnings.warn(message, stacklevel=2)
    return True


# ------------------------------------------------------------------------------------------- official files
def read_official(path: str | Path, mmap: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read an official checkpoint safely; returns ``(state_dict, cfg)`` (cfg may be ``None``)."""
    data = safe_torch_load(path, mmap=mmap)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        state, cfg = data["model"], data.get("cfg")
        if cfg is None and isinstance(data.get("args"), dict):
            cfg = {"model": {"encoder": {}}, "task": data["args"]}
    elif isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
        state, cfg = data, None
    else:
        raise CheckpointError(
            f"{path}: expected a dict with a 'model' state dict (fairseq layout) or a plain state dict"
        )
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entry {bad[0]!r} of the state dict is not a tensor")
    if not looks_official(state):
        raise CheckpointError(
            f"{path}: no 'encoder_wrapper.*' keys: not an official ONE-PEACE checkpoint "
            f"(keys start with {sorted(state)[:3]})"
        )
    return state, cfg if isinstance(cfg, dict) else None


def read_official_config(
    path: str | Path, image_size: int | None = None, mmap: bool = True
) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, Any]]:
    """Read an official file and infer its model config (optionally for another image size).

    Returns the state dict, the config and extra facts for :func:`official_state_items`.
    """
    state, cfg = read_official(path, mmap=mmap)
    try:
        config, extra = infer_config(state, cfg, str(path))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if image_size is not None and "image" in config.modalities:
        config.modality_options["image"].update(image_size=image_size, rel_bucket_size=image_size // 16)
    return state, config, extra


def official_state_items(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    extra: dict[str, Any],
    source: str,
    unknown: list[str],
    pretrain: dict[str, torch.Tensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yield ``(our_name, tensor, official_key)`` of an official state dict.

    The image relative table is interpolated when the run-time image grid differs from the file's.

    Unknown keys are appended to ``unknown``; pretraining-only keys go to ``pretrain`` when given.
    """
    want_grid = config.modality_options.get("image", {}).get("rel_bucket_size")
    for key in list(state):
        tensor = state.pop(key)  # drop our reference as we go, so memory can be released
        if is_ignored(key):
            continue
        if is_pretrain_key(key):
            if pretrain is not None:
                pretrain[key] = tensor
            continue
        name = map_official_key(key)
        if name is None:
            unknown.append(key)
            continue
        if name == "logit_scale" and tensor.dim() == 0:  # official scalar -> our (1,) (FSDP2-shardable)
            tensor = tensor.reshape(1)
        if name == "adapters.image.rel_pos_table" and want_grid and want_grid != extra.get("checkpoint_image_grid"):
            tensor = interpolate_image_table(tensor.float(), extra["checkpoint_image_grid"], want_grid)
        yield name, tensor, key


def load_official(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    bpe_dir: str | Path | None = None,
    image_size: int | None = None,
    official_padding: bool | None = None,
    strict: bool = True,
) -> OnePeaceModel:
    """Load an official ONE-PEACE ``.pt`` checkpoint (safe unpickling) into our model.

    Args:
        path: The official file (``{"cfg": ..., "model": state_dict}`` or a bare state dict).
        dtype: Floating dtype of the loaded weights (default float32, whatever the file stores).
        device: Where the weights go.
        bpe_dir: Folder with ``encoder.json``, ``vocab.bpe``, ``dict.txt`` for text preprocessing.
        image_size: Run images at this size (e.g. 384): positions are resized at run time and the relative
            table interpolated at load time, as the official code does.
        official_padding: Reproduce the official padding leaks (default False).
        strict: Fail on unknown keys (otherwise they are reported as a warning).
    """
    import warnings

    from one_peace.tokenizer import load_tokenizer

    state, config, extra = read_official_config(path, image_size)
    model = _build_meta(config)
    unknown: list[str] = []
    _assign(model, official_state_items(state, config, extra, str(path), unknown), str(path), dtype, device)
    if unknown:
        msg = f"{path}: unknown key(s) not used by the model: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}"
        if strict:
            raise CheckpointError(msg)
        warnings.warn(msg, stacklevel=2)
    if bpe_dir is not None:
        language = tokenizer_modality(config)
        model.tokenizer = load_tokenizer(bpe_dir, modality=language)
        model.tokenizer.max_tokens = int(get_plugin(language).options(config).get("max_tokens", 70))
    if official_padding is not None:
        model.official_padding = official_padding
    return model.eval()


def load(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    bpe_dir: str | Path | None = None,
    **kwargs: Any,
) -> OnePeaceModel:
    """Load a checkpoint folder of ours, an official ONE-PEACE file (see :func:`load_official` for kwargs), or an
    official checkpoint by name (``"one-peace-4b"``: :mod:`one_peace.pretrained` downloads and converts it once;
    ``sha256=`` pins its hash), or a folder of ours on the Hugging Face Hub (``"hf-hub:org/name[@revision]"``)."""
    if isinstance(path, str) and path.startswith("hf-hub:"):
        from one_peace.pretrained import resolve_hub

        path = resolve_hub(path)
    if isinstance(path, str) and not Path(path).exists():
        from one_peace.pretrained import PRETRAINED, resolve

        if path in PRETRAINED or ("/" not in path and os.sep not in path and not Path(path).suffix):  # a name
            path = resolve(path, sha256=kwargs.pop("sha256", None), progress=kwargs.pop("progress", True))
    path = Path(path)
    if path.is_dir():
        allowed = {"official_padding"}
        bad = set(kwargs) - allowed
        if bad:
            raise TypeError(f"load(folder) got unexpected keyword(s) {sorted(bad)}")
        return _load_folder(path, dtype, device, kwargs.get("official_padding"), bpe_dir)
    return load_official(path, dtype=dtype, device=device, bpe_dir=bpe_dir, **kwargs)
