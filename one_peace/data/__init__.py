"""Data: manifests, WebDataset shards, streaming loaders on fairseq2's pipeline, and embedded demo data.

Importing :mod:`one_peace` does not import this package (nor fairseq2).
"""

from __future__ import annotations

from one_peace.data.loader import EpochStats, LoaderConfig, MultimodalLoader, TooManyBadSamples
from one_peace.data.manifest import ManifestError, iter_manifest, validate_manifest

__all__ = [
    "EpochStats",
    "LoaderConfig",
    "ManifestError",
    "MultimodalLoader",
    "TooManyBadSamples",
    "iter_manifest",
    "validate_manifest",
]
