"""Data: manifests, WebDataset shards, streaming loaders on fairseq2's pipeline, and embedded demo data.

Importing :mod:`one_peace` does not import this package. Manifests, shards and the demo data need only the core
install; the streaming loader (``MultimodalLoader`` and its config, stats and errors) runs on fairseq2, the
``train`` extra, and is imported on first use, so ``from one_peace.data.manifest import ...`` works without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from one_peace.data.manifest import ManifestError, iter_manifest, validate_manifest

if TYPE_CHECKING:
    from one_peace.data.loader import EpochStats, LoaderConfig, MultimodalLoader, TooManyBadSamples

_LOADER_NAMES = ("EpochStats", "LoaderConfig", "MultimodalLoader", "TooManyBadSamples")


def __getattr__(name: str) -> Any:
    """The loader's names, imported on first use (fairseq2 is the ``train`` extra)."""
    if name in _LOADER_NAMES:
        from one_peace.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'one_peace.data' has no attribute {name!r}")


def train_tokenizer(manifest: str, field: str = "text", vocab_size: int = 8000) -> Any:
    """Train a byte-level BPE (``tokenizers``) on the text field of a manifest, streaming (runs from scratch)."""
    from one_peace.adapters.text import TextTokenizer

    texts = (row[field] for _, row in iter_manifest(manifest) if isinstance(row.get(field), str))
    return TextTokenizer.train(list(texts), vocab_size=vocab_size)


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
