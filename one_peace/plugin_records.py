"""Where a plugin came from, for the records checkpoints and embedding folders keep (``ModalityPlugin.record``)."""

from __future__ import annotations

import functools
import importlib.metadata


@functools.lru_cache(maxsize=64)
def distribution_of(module: str) -> tuple[str | None, str | None]:
    """The installed distribution providing ``module`` and its version (``(None, None)``: not installed)."""
    top = module.split(".")[0]
    try:
        dists = importlib.metadata.packages_distributions().get(top, [])
    except Exception:
        dists = []
    for dist in dists:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None


class PluginMismatchWarning(UserWarning):
    """A checkpoint (or embedding folder) was made with another version of a modality plugin."""
