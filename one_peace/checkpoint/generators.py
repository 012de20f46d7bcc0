"""The seq2seq decoders of a checkpoint folder: their records (``config.json`` ``trained.generators``) and weights.

A seq2seq run writes, per task, a record of what generation needs (instruction, decoder sizes, the weights' file and
key prefix, decoding settings, closed set, baselines; :func:`one_peace.runner.records.generator_records`) and the
decoder's tensors in ``task.safetensors``. Loading keeps the records on the model (:func:`attach_generators`);
:mod:`one_peace.generation` builds a decoder from them when it is first asked to generate.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from one_peace.checkpoint.safe_pickle import CheckpointError

if TYPE_CHECKING:
    from one_peace.models.encoder import OnePeaceModel

#: what a decoder writes: words (captions, answers, labels) or a region (four location tokens). Kinds of target, not
#: modalities, although the first is spelt like the text modality.
TEXT_TARGET, BOX_TARGET = "text", "box"
TARGETS = (TEXT_TARGET, BOX_TARGET)
#: the file holding a training task's own tensors (its decoders), beside the encoder's weights
TASK_WEIGHTS = "task.safetensors"
#: the model attribute holding the generators of its checkpoint: ``{"folder", "records", "built"}``
ATTR = "_one_peace_generators"
_RECORD_KEYS = {
    "instruction": str,
    "decoder": dict,
    "text_vocab": int,
    "weights": str,
    "prefix": str,
    "beam": int,
    "max_tokens": int,
    "target": str,
}


def attach_generators(model: OnePeaceModel, folder: str | Path, records: Any, where: str) -> None:
    """Keep a checkpoint's generator records on ``model`` (checked now; decoders are built when first used).

    Raises:
        CheckpointError: a malformed record or a weights file that is missing or leads out of ``folder``.
    """
    from one_peace.checkpoint.folder import regular_file

    if not isinstance(records, Mapping) or not records:
        raise CheckpointError(f"{where}: 'generators' must be a non-empty object (name -> record)")
    checked: dict[str, dict[str, Any]] = {}
    for name, record in records.items():
        here = f"{where} generators.{name}"
        if not isinstance(record, Mapping):
            raise CheckpointError(f"{here}: expected an object, got {type(record).__name__}")
        for key, kind in _RECORD_KEYS.items():
            value = record.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise CheckpointError(f"{here}.{key}: expected {kind.__name__}, got {value!r}")
        if record["target"] not in TARGETS:
            raise CheckpointError(f"{here}.target: expected 'text' or 'box', got {record['target']!r}")
        regular_file(Path(folder), record["weights"], f"{here}.weights")
        checked[str(name)] = dict(record)
    setattr(model, ATTR, {"folder": Path(folder), "records": checked, "built": {}})


def decoder_state(folder: Path, record: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from one_peace.checkpoint.folder import regular_file

    path = regular_file(folder, record["weights"], f"{where}.weights")
    prefix = record["prefix"]
    try:
        with safe_open(str(path), framework="pt") as fh:
            state = {k[len(prefix) :]: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefix)}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path}: cannot be read as safetensors ({exc})") from None
    if not state:
        raise CheckpointError(f"{path}: holds no tensor under {prefix!r} ({where}.prefix)")
    return state


def save_generators(model: OnePeaceModel, folder: Path) -> dict[str, Any] | None:
    """Write the decoders of ``model``'s checkpoint into ``folder/task.safetensors`` (the built ones as they are
    now, the others as read); returns their records (naming that file), or ``None`` when the model has none."""
    from safetensors.torch import save_file

    source = model.__dict__.get(ATTR)
    if not source:
        return None
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, Any] = {}
    for name, record in source["records"].items():
        built = source["built"].get(name)
        if built is not None:
            state = built.task.decoder.state_dict()
        else:
            state = decoder_state(source["folder"], record, f"{source['folder']} generators.{name}")
        tensors.update({record["prefix"] + k: v.detach().contiguous().cpu() for k, v in state.items()})
        records[name] = {**record, "weights": TASK_WEIGHTS}
    save_file(tensors, str(Path(folder) / TASK_WEIGHTS))
    return records


def copy_generator_weights(checkpoint: Path, doc: Mapping[str, Any], folder: Path) -> bool:
    """Copy the decoders a checkpoint's ``config.json`` (``doc``) names into ``folder/task.safetensors`` (only
    theirs: a training task's other tensors stay behind); returns whether there were any."""
    from safetensors.torch import save_file

    records = (doc.get("trained") or {}).get("generators") if isinstance(doc.get("trained"), Mapping) else None
    if not records:
        return False
    tensors: dict[str, torch.Tensor] = {}
    for name, record in records.items():
        state = decoder_state(checkpoint, record, f"{checkpoint} generators.{name}")
        tensors.update({record["prefix"] + k: v.contiguous() for k, v in state.items()})
    save_file(tensors, str(folder / TASK_WEIGHTS))
    return True
