"""The modality registry: every modality (built-in or third-party) is a plugin registered here.

A plugin is a subclass of :class:`ModalityPlugin`. In-tree plugins use the :func:`register_modality`
decorator; other packages expose their plugin class through the entry-point group
``one_peace.modalities`` and need no change to this code. Built-ins are declared through the same
entry-point group (and imported directly as a fallback when the package metadata is absent).

Run ``python -m one_peace.modalities`` to list what is registered and where it came from.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
    from torch import nn

    from one_peace.config import ModelConfig

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "one_peace.modalities"
BUILTIN_MODULES = (
    "one_peace.adapters.text",
    "one_peace.adapters.image",
    "one_peace.adapters.audio",
    "one_peace.adapters.video",
)


class PluginError(RuntimeError):
    """A modality plugin is invalid, duplicated, or failed to load."""


@dataclass(frozen=True)
class MaskingPolicy:
    """Default token-masking policy of a modality for denoising objectives.

    Attributes:
        kind: ``"random"`` (independent tokens), ``"span"`` (contiguous spans) or ``"whole_word"``.
        ratio: Fraction of (non-CLS, non-padding) tokens that are masked.
        span: Span length for ``kind="span"``.
    """

    kind: str = "random"
    ratio: float = 0.75
    span: int = 1


class ModalityPlugin:
    """Base class of a modality plugin.

    Subclasses set :attr:`name` and implement the required pieces: :meth:`build_adapter`,
    :meth:`build_preprocessor`, :meth:`collate` and :meth:`example_batch`. :meth:`build_ffn` and
    :attr:`masking` have defaults (GeGLU with sub-LN; random 75 % masking).

    Attributes:
        name: Registry name, also the key of the modality's batch in ``forward_features``.
        shares: Name of another modality whose FFNs, final LayerNorm and projection head this one uses
            (video uses image's); ``None`` for its own.
        requires: Modalities that must be built alongside (video needs image's stem).
        defaults: Default adapter/preprocessing options, overridable per model config.
        masking: Default masking policy for denoising.
    """

    name: ClassVar[str] = ""
    shares: ClassVar[str | None] = None
    requires: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}
    masking: ClassVar[MaskingPolicy] = MaskingPolicy()
    REQUIRED: ClassVar[tuple[str, ...]] = ("build_adapter", "build_preprocessor", "collate", "example_batch")

    source: str = "unknown"

    def options(self, config: ModelConfig) -> dict[str, Any]:
        """The plugin's defaults updated with the model config's options for this modality."""
        merged = dict(self.defaults)
        merged.update(config.modality_options.get(self.name, {}))
        return merged

    def build_adapter(self, config: ModelConfig, siblings: dict[str, nn.Module]) -> nn.Module:
        """Build the adapter module (raw tensors -> tokens). ``siblings`` holds adapters already built."""
        raise NotImplementedError

    def build_ffn(self, config: ModelConfig) -> nn.Module:
        """Build the modality FFN used in every shared layer (GeGLU with sub-LN by default)."""
        from one_peace.models.layers import GeGLUFFN

        return GeGLUFFN(config.embed_dim, config.ffn_dim)

    def build_preprocessor(self, config: ModelConfig, tokenizer: Any = None) -> Callable[[Any], dict[str, Any]]:
        """Return a callable turning one raw input (path, bytes, array, string...) into a sample dict."""
        raise NotImplementedError

    def build_chunker(self, config: ModelConfig, tokenizer: Any = None) -> Callable[[Any], list[dict[str, Any]]] | None:
        """Optional: a callable splitting one over-long raw input into several samples (text: token chunks).

        ``encode(..., long_text="chunks")`` embeds such an input as the normalised mean of its chunks. ``None``
        (the default) means inputs are never split; a preprocessor that shortens an input sets ``"truncated"``
        in its sample so that ``encode`` can warn.
        """
        return None

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Batch preprocessed samples into the adapter's input dict."""
        raise NotImplementedError

    def example_batch(self, config: ModelConfig, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        """A small random ready batch for docs, tests and benchmarks."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<modality {self.name!r} from {self.source}>"


@dataclass
class _Registry:
    plugins: dict[str, ModalityPlugin] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    discovered: bool = False
    lock: threading.RLock = field(default_factory=threading.RLock)


_REGISTRY = _Registry()


def _validate(plugin_cls: type[ModalityPlugin], where: str) -> None:
    label = getattr(plugin_cls, "name", "") or plugin_cls.__name__
    if not isinstance(plugin_cls, type) or not issubclass(plugin_cls, ModalityPlugin):
        raise PluginError(f"modality plugin {label!r} ({where}) must be a subclass of one_peace.ModalityPlugin")
    if not plugin_cls.name or not plugin_cls.name.isidentifier():
        raise PluginError(f"modality plugin {plugin_cls.__name__} ({where}) needs a `name` that is an identifier")
    missing = [piece for piece in plugin_cls.REQUIRED if getattr(plugin_cls, piece) is getattr(ModalityPlugin, piece)]
    if missing:
        raise PluginError(
            f"modality plugin {plugin_cls.name!r} ({where}) is missing required piece(s): {', '.join(missing)}"
        )
    if not isinstance(plugin_cls.masking, MaskingPolicy):
        raise PluginError(f"modality plugin {plugin_cls.name!r} ({where}): `masking` must be a MaskingPolicy")


def _add(plugin_cls: type[ModalityPlugin], source: str) -> ModalityPlugin:
    with _REGISTRY.lock:
        _validate(plugin_cls, source)
        existing = _REGISTRY.plugins.get(plugin_cls.name)
        if existing is not None:
            if type(existing) is plugin_cls:
                return existing
            raise PluginError(f"modality {plugin_cls.name!r} is registered twice: by {existing.source} and by {source}")
        plugin = plugin_cls()
        plugin.source = source
        _REGISTRY.plugins[plugin_cls.name] = plugin
        return plugin


def register_modality(plugin_cls: type[ModalityPlugin]) -> type[ModalityPlugin]:
    """Class decorator registering a modality plugin in-tree.

    Raises:
        PluginError: the name is taken by another plugin, or a required piece is missing.
    """
    _add(
        plugin_cls,
        f"module {plugin_cls.__module__}"
        if not plugin_cls.__module__.startswith("one_peace.")
        else f"built-in ({plugin_cls.__module__})",
    )
    return plugin_cls


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> None:
    dist = getattr(ep, "dist", None)
    where = f"entry point {ep.name} = {ep.value}" + (f" (distribution {dist.name})" if dist is not None else "")
    try:
        obj = ep.load()
        if isinstance(obj, ModalityPlugin):
            obj = type(obj)
        if not (isinstance(obj, type) and issubclass(obj, ModalityPlugin)):
            raise PluginError(f"modality plugin {ep.name!r} ({where}) does not point to a ModalityPlugin subclass")
        if obj.name in _REGISTRY.plugins and type(_REGISTRY.plugins[obj.name]) is obj:
            return  # the module registered itself with the decorator while being imported
        _add(obj, where)
    except Exception as exc:  # one broken plugin must not stop the others
        message = str(exc) if isinstance(exc, PluginError) else f"modality plugin {ep.name!r} ({where}) failed: {exc!r}"
        _REGISTRY.errors[ep.name] = message
        logger.warning("%s", message)


def discover(force: bool = False) -> None:
    """Import built-in plugins and load every ``one_peace.modalities`` entry point (once)."""
    with _REGISTRY.lock:
        if _REGISTRY.discovered and not force:
            return
        _REGISTRY.discovered = True
        for module in BUILTIN_MODULES:
            try:
                importlib.import_module(module)
            except Exception as exc:
                _REGISTRY.errors[module] = f"built-in modality module {module} failed to import: {exc!r}"
                logger.warning("%s", _REGISTRY.errors[module])
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            _load_entry_point(ep)


def get_plugin(name: str) -> ModalityPlugin:
    """Return the plugin registered as ``name``.

    Raises:
        KeyError: no such modality (the message lists the registered ones and load errors).
    """
    discover()
    try:
        return _REGISTRY.plugins[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY.plugins)) or "none"
        extra = f"; plugins that failed to load: {sorted(_REGISTRY.errors)}" if _REGISTRY.errors else ""
        raise KeyError(f"unknown modality {name!r}; registered modalities: {known}{extra}") from None


def list_modalities() -> dict[str, str]:
    """Registered modality names mapped to where each came from (module or entry point)."""
    discover()
    return {name: plugin.source for name, plugin in sorted(_REGISTRY.plugins.items())}


def plugin_errors() -> dict[str, str]:
    """Plugins that failed to load, mapped to the reason."""
    discover()
    return dict(_REGISTRY.errors)


def unregister(name: str) -> None:
    """Remove a registered modality (for tests and interactive use)."""
    with _REGISTRY.lock:
        _REGISTRY.plugins.pop(name, None)
        _REGISTRY.errors.pop(name, None)
