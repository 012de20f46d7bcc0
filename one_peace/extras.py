"""Optional extras: which packages each one brings, and one clear message when a command needs a missing one.

The core install (``pip install one-peace``) covers the model, checkpoints, ``encode``, conversion and the
``key=value`` CLIs. Everything else is an extra of ``pyproject.toml``; a command that needs one calls
:func:`require` at its start, so it fails before doing any work, naming the extra to install.
"""

from __future__ import annotations

import importlib.util
import warnings

#: extra -> (import name, what it is for) of the packages code checks for. Mirrors pyproject.toml's extras.
EXTRAS: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (
        ("fairseq2", "the training data pipeline (one_peace.data.MultimodalLoader)"),
        ("tensorboard", "TensorBoard logs"),
        ("matplotlib", "loss plots"),
    ),
    "retrieval": (("faiss", "vector indexes"), ("pyarrow", "embedding metadata"), ("matplotlib", "evaluation plots")),
    "video": (("av", "video decoding (PyAV)"),),
    "serve": (("fastapi", "the search page"), ("uvicorn", "its server"), ("multipart", "uploads (python-multipart)")),
    "gpu": (("xformers", "the xformers attention backend"),),
}


class MissingExtraError(ImportError):
    """A feature needs a package of an optional extra that is not installed."""


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install_hint(extra: str) -> str:
    """The pip command that installs ``extra``."""
    return f"pip install 'one-peace[{extra}]'"


def require(extra: str, *modules: str, feature: str | None = None) -> None:
    """Raise :class:`MissingExtraError` naming ``extra`` unless every module of it (or those given) imports.

    Args:
        extra: The extra's name in ``pyproject.toml`` (``train``, ``retrieval``, ``video``, ``gpu``).
        modules: Import names to check; default: the extra's packages listed in :data:`EXTRAS` that are essential
            (the first one).
        feature: What the caller is about to do, for the message.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; extras: {sorted(EXTRAS)}")
    wanted = modules or (EXTRAS[extra][0][0],)
    missing = [m for m in wanted if not available(m)]
    if missing:
        what = f"{feature} needs" if feature else "this needs"
        raise MissingExtraError(
            f"{what} the '{extra}' extra (missing: {', '.join(missing)}); install it with: {install_hint(extra)}"
        )


def optional(module: str, extra: str, feature: str) -> bool:
    """Whether ``module`` imports; if not, warn once that ``feature`` is skipped and which extra brings it."""
    if available(module):
        return True
    key = (module, feature)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"{feature} skipped: {module} is not installed (it comes with {install_hint(extra)})",
            RuntimeWarning,
            stacklevel=2,
        )
    return False


_WARNED: set[tuple[str, str]] = set()
