"""Data: manifests, WebDataset shards, streaming loaders on fairseq2's pipeline, and embedded demo data.

Importing :mod:`one_peace` does not import this package (nor fairseq2).
"""

from __future__ import annotations

from typing import Any

from one_peace.data.loader import EpochStats, LoaderConfig, MultimodalLoader, TooManyBadSamples
from one_peace.data.manifest import ManifestError, iter_manifest, validate_manifest


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
