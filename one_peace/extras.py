"""Optional extras: which packages each one brings, and one clear message when a command needs a missing one.

The core install (``pip install one-peace``) covers the model, checkpoints, ``encode``, conversion and the
``key=value`` CLIs. Everything else is an extra of ``pyproject.toml``; a command that needs one calls
:func:`require` at its start, so it fails before doing any work, naming the extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from types import ModuleType

#: extra -> (import name, what it is for) of the packages code checks for. Mirrors pyproject.toml's extras.
EXTRAS: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("tensorboard", "TensorBoard logs"), ("matplotlib", "loss plots")),
    "fairseq2": (("fairseq2", "the fairseq2 loader backend (data.backend=fairseq2)"),),
    "retrieval": (("faiss", "vector indexes"), ("pyarrow", "embedding metadata"), ("matplotlib", "evaluation plots")),
    "video": (("av", "video decoding (PyAV)"),),
    "serve": (("fastapi", "the search page"), ("uvicorn", "its server"), ("multipart", "uploads (python-multipart)")),
    "gpu": (("xformers", "the xformers attention backend"),),
    "databases": (
        ("lancedb", "LanceDB tables"),
        ("pymilvus", "Milvus collections"),
        ("qdrant_client", "Qdrant collections"),
    ),
    "ray": (("ray", "embedding on Ray Data"),),
    "languages": (("num2words", "the number words of the languages demo"),),
    "launch": (("submitit", "multi-node launches (python -m one_peace.launch)"),),
    "st": (("sentence_transformers", "SentenceTransformer(folder, trust_remote_code=True)"),),
    "export": (
        ("onnxruntime", "running exported graphs and int8"),
        ("onnx", "ONNX graphs"),
        ("onnxscript", "ONNX export"),
    ),
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
        extra: The extra's name in ``pyproject.toml`` (``train``, ``fairseq2``, ``retrieval``, ``video``, ``serve``,
            ``gpu``).
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
    """Whether ``module`` imports; if not, warn once that ``feature`` is skipped (see :func:`optional_import`)."""
    return optional_import(module, extra, feature) is not None


def optional_import(module: str, extra: str, feature: str) -> ModuleType | None:
    """``module`` imported, or ``None`` with one warning that ``feature`` is skipped.

    The import itself is tried, not only looked up: an installed package that fails to import (TensorBoard or
    matplotlib beside an incompatible protobuf or numpy, say) is skipped the same way as a missing one, with the
    error in the warning, and the work goes on.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if available(module.split(".")[0]):
            why = f"{module} is installed but fails to import ({type(exc).__name__}: {exc})"
        else:
            why = f"{module} is not installed (it comes with {install_hint(extra)})"
    except Exception as exc:  # a broken install raises anything at import time (TypeError from protobuf, ...)
        why = f"{module} is installed but fails to import ({type(exc).__name__}: {exc})"
    warn_once(f"{feature} skipped: {why}", key=(module, feature))
    return None


def warn_once(message: str, key: object = None) -> None:
    """A ``RuntimeWarning`` shown once per ``key`` (default: the message) in this process."""
    key = message if key is None else key
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


_WARNED: set[object] = set()
