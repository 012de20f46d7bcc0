"""one-peace: any-modality representation learning in the style of ONE-PEACE.

Importing this package gives the inference surface only (model, registry, checkpoints); the trainer,
Hydra and the data pipeline are imported by their own modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from one_peace.config import OFFICIAL_MODALITIES, SIZES, ModelConfig, model_config
from one_peace.models.encoder import EncoderOutput, OnePeaceModel, build_model, count_parameters
from one_peace.registry import (
    MaskingPolicy,
    ModalityPlugin,
    PluginError,
    get_plugin,
    list_modalities,
    register_modality,
)

if TYPE_CHECKING:
    from pathlib import Path

__version__ = "0.1.0"


def example_inputs(
    modalities: Sequence[str] = OFFICIAL_MODALITIES,
    batch_size: int = 2,
    config: ModelConfig | None = None,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """A ready batch dict ``{modality: batch}`` of small random inputs for docs, tests and benchmarks.

    Args:
        modalities: Modalities to include (any registered plugin).
        batch_size: Samples per modality.
        config: Model config whose options (vocabulary, image size) the inputs must fit; tiny defaults if None.
        seed: Seed of the generator, so calls are reproducible.
    """
    if config is None:
        config = model_config("tiny", tuple(modalities))
    gen = torch.Generator().manual_seed(seed)
    return {m: get_plugin(m).example_batch(config, batch_size, gen) for m in modalities}


def load(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    bpe_dir: str | Path | None = None,
    **kwargs: Any,
) -> OnePeaceModel:
    """Load an official ONE-PEACE checkpoint file or one of our checkpoint folders (see :mod:`one_peace.checkpoint`)."""
    from one_peace.checkpoint import load as _load

    return _load(path, dtype=dtype, device=device, bpe_dir=bpe_dir, **kwargs)


def load_generator(
    path: str | Path, generator: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Any:
    """A seq2seq checkpoint's decoder with its encoder (:class:`one_peace.generation.Generator`):
    ``load_generator(ck).generate(["cat.png"])``; ``one_peace.load(ck).generate(...)`` does the same lazily."""
    from one_peace.generation import load_generator as _load_generator

    return _load_generator(path, generator, device=device, dtype=dtype)


def save(model: OnePeaceModel, folder: str | Path, **kwargs: Any) -> Path:
    """Write ``model`` as a checkpoint folder (safetensors + ``config.json`` + tokenizer files).

    Keyword arguments go to :func:`one_peace.checkpoint.save` (``extra_tensors``, ``state_dict``).
    """
    from one_peace.checkpoint import save as _save

    return _save(model, folder, **kwargs)


__all__ = [
    "SIZES",
    "EncoderOutput",
    "MaskingPolicy",
    "ModalityPlugin",
    "ModelConfig",
    "OnePeaceModel",
    "PluginError",
    "build_model",
    "count_parameters",
    "example_inputs",
    "get_plugin",
    "list_modalities",
    "load",
    "load_generator",
    "model_config",
    "register_modality",
    "save",
]
