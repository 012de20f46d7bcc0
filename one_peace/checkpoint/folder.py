"""Reading a checkpoint folder as untrusted input: the one place that opens ``config.json`` and
``model.safetensors.index.json`` and decides which files a load may touch.

* every file name read from a file of the folder (``weight_map`` entries) is relative, without ``..``, and names a
  regular file (a FIFO, device or folder is never opened: opening a FIFO blocks for ever); a symbolic link may only
  lead inside the folder, or, for a Hugging Face hub snapshot (``.../snapshots/<revision>/``), into the cache's
  ``blobs/`` beside it (that is how the hub stores files);
* JSON files are read whole only under :data:`MAX_JSON_BYTES` and must hold the structure the format defines;
* ``config.json``'s model section is validated against the typed :class:`~one_peace.config.ModelConfig` (types,
  ranges, registered modalities, each plugin's options), and the model it describes is compared with the weights'
  headers before anything is built: a config cannot ask for more parameters than the weights hold.

Every refusal is a :class:`~one_peace.checkpoint.safe_pickle.CheckpointError` naming the file and the key.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from one_peace.checkpoint.safe_pickle import CheckpointError
from one_peace.config import CONFIG_FORMAT_VERSION, ModelConfig

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
#: JSON files of a checkpoint folder larger than this are refused unread (a 4B model's index is about 200 kB)
MAX_JSON_BYTES = 64 * 1024 * 1024


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def relative_name(folder: Path, name: Any, where: str) -> Path:
    """``folder / name`` for a file name read from ``where``: a relative path without ``..`` (nothing is opened)."""
    if not isinstance(name, str) or not name.strip():
        raise CheckpointError(f"{where}: expected a file name, got {name!r}")
    rel = PurePosixPath(name)
    if rel.is_absolute() or PureWindowsPath(name).is_absolute() or ".." in rel.parts or "\\" in name:
        raise CheckpointError(
            f"{where}: {name!r} is not a file of the folder {folder} (names are relative, without '..')"
        )
    return folder / rel


def regular_file(folder: Path, name: Any, where: str) -> Path:
    """``name`` (a file name read from ``where``, a file of ``folder``) as a regular file inside ``folder``.

    Raises:
        CheckpointError: a name that is not a relative path without ``..``, a file that does not exist or is not a
            regular file, or a link that leads out of the folder.
    """
    path = relative_name(folder, name, where)
    try:
        mode = os.stat(path).st_mode  # follows links: checked below that they stay in bounds
    except FileNotFoundError:
        raise CheckpointError(f"{where}: names {name!r}, but {path} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"{where}: names {name!r}, which cannot be read: {exc}") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{where}: {path} is not a regular file (a FIFO, device or folder is never opened)")
    root = folder.resolve()
    target = path.resolve()
    if not _within(target, root):
        hub_blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
        if hub_blobs is None or not _within(target, hub_blobs.resolve()):
            raise CheckpointError(f"{where}: {path} is a link to {target}, outside the folder {folder}")
    return path


def read_json(path: Path, what: str) -> Any:
    """The JSON document at ``path`` (a regular file under :data:`MAX_JSON_BYTES`), with errors naming it."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found ({what})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path}: not a regular file ({what})")
    if info.st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {info.st_size:,} bytes, over the {MAX_JSON_BYTES:,} a {what} may have")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text ({what}): {exc}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({what}): {exc}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: nested too deeply to be a {what}") from None


@dataclass
class CheckpointFolder:
    """A validated checkpoint folder: its ``config.json`` document, the typed model config and its weight files."""

    path: Path
    doc: dict[str, Any]
    config: ModelConfig
    weight_files: list[Path]

    @property
    def config_path(self) -> Path:
        """The folder's ``config.json``."""
        return self.path / CONFIG


def read_config_doc(folder: Path) -> dict[str, Any]:
    """``config.json`` of ``folder`` as a checked document: an object with a supported ``format_version`` and a
    ``model`` object (and, when present, a ``tokenizer`` object and a ``plugins`` object)."""
    path = folder / CONFIG
    if not path.exists():
        raise CheckpointError(f"{folder}: not a one-peace checkpoint folder (no {CONFIG})")
    doc = read_json(path, "checkpoint config")
    if not isinstance(doc, dict) or "model" not in doc:
        raise CheckpointError(f"{path}: missing the 'model' section")
    version = doc.get("format_version")
    if version != CONFIG_FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported (expected {CONFIG_FORMAT_VERSION})")
    if not isinstance(doc["model"], dict):
        raise CheckpointError(f"{path}: 'model' must be an object of config fields, got {type(doc['model']).__name__}")
    for key in ("tokenizer", "plugins"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            raise CheckpointError(f"{path}: {key!r} must be an object, got {type(doc[key]).__name__}")
    tokenizer = doc.get("tokenizer") or {}
    files = tokenizer.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise CheckpointError(f"{path}: 'tokenizer.files' must be a list of file names, got {files!r}")
    return doc


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of ``folder``: ``model.safetensors``, or the shards ``model.safetensors.index.json``
    maps every key to (checked: an object whose ``weight_map`` maps names to files of the folder)."""
    if (folder / WEIGHTS).exists():
        return [regular_file(folder, WEIGHTS, str(folder))]
    index_path = folder / INDEX
    if not index_path.exists():
        raise CheckpointError(f"{folder}: no {WEIGHTS} or {INDEX}")
    index = read_json(index_path, "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index_path}: 'weight_map' must be a non-empty object mapping weight names to shard files, got "
            f"{type(weight_map).__name__ if weight_map is not None else 'nothing'}"
        )
    names = sorted({v for v in weight_map.values() if isinstance(v, str)})
    if len(names) != len(set(map(str, weight_map.values()))) or not names:
        bad = next(v for v in weight_map.values() if not isinstance(v, str))
        raise CheckpointError(f"{index_path}: weight_map values must be file names, got {bad!r}")
    return [regular_file(folder, name, f"{index_path} (weight_map)") for name in names]


def tokenizer_files(folder: Path, doc: dict[str, Any]) -> list[Path]:
    """The tokenizer files ``config.json`` names, each a regular file of ``folder`` (none without a tokenizer)."""
    names = (doc.get("tokenizer") or {}).get("files", [])
    where = f"{folder / CONFIG} (tokenizer)"
    missing = [f for f in names if not relative_name(folder, f, where).exists()]
    if missing:
        raise CheckpointError(
            f"{folder}: config.json names tokenizer files that are missing: {missing} "
            "(copy them back, or pass bpe_dir=... for the official BPE files)"
        )
    return [regular_file(folder, name, where) for name in names]


def header_parameters(files: list[Path]) -> int:
    """Elements of every tensor in ``files``, read from the safetensors headers alone (nothing is loaded)."""
    from safetensors import SafetensorError, safe_open

    total = 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                    n = 1
                    for side in fh.get_slice(key).get_shape():
                        n *= int(side)
                    total += n
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{f}: unreadable safetensors file (truncated or corrupted?): {exc}") from None
    return total


def stack_parameters(config: ModelConfig) -> int:
    """A lower bound of the parameters ``config`` describes: the shared stack's attention projections and one
    GeGLU FFN per layer (every modality adds its own FFN, adapters add more)."""
    d, ffn = config.embed_dim, config.ffn_dim
    return config.layers * (4 * d * d + 3 * d * ffn)


def read_folder(folder: str | Path) -> CheckpointFolder:
    """Read and validate a checkpoint folder before anything is built (see the module's docstring).

    Raises:
        CheckpointError: naming the file and key of the first problem found.
    """
    from one_peace.checkpoint import apply_plugin_records

    path = Path(folder)
    doc = read_config_doc(path)
    where = str(path / CONFIG)
    try:
        config = ModelConfig.from_dict(doc["model"], source=where)
    except (TypeError, ValueError, KeyError) as exc:
        reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise CheckpointError(f"{where}: invalid model section: {reason}") from None
    apply_plugin_records(config, doc.get("plugins"), where)
    tokenizer_files(path, doc)
    files = weight_files(path)
    held, wanted = header_parameters(files), stack_parameters(config)
    if wanted > held:
        raise CheckpointError(
            f"{where}: the model section describes at least {wanted:,} parameters ({config.layers} layers of width "
            f"{config.embed_dim}, FFN {config.ffn_dim}), but the weights hold {held:,}: config.json does not describe "
            "these weights"
        )
    return CheckpointFolder(path, doc, config, files)
