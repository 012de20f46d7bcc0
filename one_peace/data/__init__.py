"""Data: manifests, WebDataset shards, the training loader (torch-native; fairseq2 optional), embedded demo data.

Importing :mod:`one_peace` does not import this package. Everything here needs only the core install; the loader's
names (``MultimodalLoader`` and its config, stats and errors) are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from one_peace.data.manifest import ManifestError, iter_manifest, validate_manifest
from one_peace.tokenizer import LANGUAGE

if TYPE_CHECKING:
    from one_peace.data.loader import EpochStats, LoaderConfig, MultimodalLoader, TooManyBadSamples

_LOADER_NAMES = ("EpochStats", "LoaderConfig", "MultimodalLoader", "TooManyBadSamples")


def __getattr__(name: str) -> Any:
    """The loader's names, imported on first use."""
    if name in _LOADER_NAMES:
        from one_peace.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'one_peace.data' has no attribute {name!r}")


def train_tokenizer(manifest: str, field: str = LANGUAGE, vocab_size: int = 8000, modality: str = LANGUAGE) -> Any:
    """Train ``modality``'s tokenizer (text: a byte-level BPE) on the string field ``field`` of a manifest."""
    from one_peace.tokenizer import train_tokenizer as _train

    texts = (row[field] for _, row in iter_manifest(manifest) if isinstance(row.get(field), str))
    return _train(list(texts), vocab_size, modality=modality)


__all__ = [
    "EpochStats",
    "LoaderConfig",
    "ManifestError",
    "MultimodalLoader",
    "TooManyBadSamples",
    "iter_manifest",
    "train_tokenizer",
    "validate_manifest",
]
