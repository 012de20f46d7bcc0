"""The modality registry: every modality (built-in or third-party) is a plugin registered here.

A plugin is a subclass of :class:`ModalityPlugin`. In-tree plugins use the :func:`register_modality`
decorator; other packages expose their plugin class through the entry-point group
``one_peace.modalities`` and need no change to this code. Built-ins are declared through the same
entry-point group (and imported directly as a fallback when the package metadata is absent).

Run ``python -m one_peace.modalities`` to list what is registered and where it came from.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import importlib.metadata
import logging
import os
import threading
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from one_peace.errors import DataError, InvalidValue, MissingField
from one_peace.media import MediaTypes, Preview, resolve_media
from one_peace.plugin_options import PluginOptionError as PluginOptionError  # re-exported: part of the contract
from one_peace.plugin_options import PluginOptions as PluginOptions
from one_peace.plugin_options import option_hints, type_name, type_ok
from one_peace.plugin_records import PluginMismatchWarning as PluginMismatchWarning
from one_peace.plugin_records import distribution_of

if TYPE_CHECKING:
    import torch
    from torch import nn

    from one_peace.config import ModelConfig
    from one_peace.segments import Segment, SegmentSpec
    from one_peace.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "one_peace.modalities"
BUILTIN_MODULES = (
    "one_peace.adapters.text",
    "one_peace.adapters.image",
    "one_peace.adapters.audio",
    "one_peace.adapters.video",
)


#: the built-in modalities' names: no other plugin can take them, whatever is imported first
BUILTIN_NAMES = frozenset({"text", "image", "audio", "video"})
#: environment variable choosing between outside distributions that declare the same modality name:
#: ``name=distribution[,name=distribution...]`` (distribution names as pip shows them)
CHOICE_ENV = "ONE_PEACE_MODALITY_CHOICE"


class PluginError(RuntimeError):
    """A modality plugin is invalid, duplicated, or failed to load."""


#: the masking kinds the training layer implements (``one_peace.train.masking``); others register at run time
BUILTIN_MASKING_KINDS = ("random", "span", "whole_word")
#: masking kind -> its function, filled by :func:`one_peace.train.masking.register_masking` (the training layer
#: registers its kinds here: the registry itself imports nothing from ``train/``)
MASKING_KINDS: dict[str, Callable[..., Any]] = {}


def masking_kinds() -> set[str]:
    """Every masking kind a plugin's policy may name: the built-in ones and those registered so far."""
    return {*BUILTIN_MASKING_KINDS, *MASKING_KINDS}


@dataclass(frozen=True)
class MaskingPolicy:
    """Default token-masking policy of a modality for denoising objectives.

    Attributes:
        kind: A masking kind (:func:`masking_kinds`; built in: ``"random"``,
            ``"span"``, ``"whole_word"``); checked when the plugin registers. ``"whole_word"`` needs the plugin's
            :meth:`ModalityPlugin.word_starts`.
        ratio: Fraction of (non-CLS, non-padding) tokens that are masked.
        span: Span length for ``kind="span"``.
        paired_ratio: Fraction masked in a view paired with another modality (ONE-PEACE: text 0.4, image 0.6875).
        paired_from_visible: The paired view masks tokens the single view left visible (text) instead of keeping
            a subset of those it masked (image, audio).
    """

    kind: str = "random"
    ratio: float = 0.75
    span: int = 1
    paired_ratio: float = 0.5
    paired_from_visible: bool = False


@dataclass(frozen=True)
class OfficialKeyRule:
    """One rule between the official ONE-PEACE checkpoint's parameter names and ours (built-in plugins).

    Attributes:
        official: Regex of official keys (``encoder_wrapper.<modality>_adapter....``).
        to_ours: Our name from the official key's match.
        ours: Regex of our parameter names (``adapters.<modality>....``).
        to_official: The official key from our name's match.
    """

    official: str
    to_ours: Callable[[Any], str]
    ours: str
    to_official: Callable[[Any], str]


class ModalityPlugin:
    """Base class of a modality plugin: everything modality-specific the library asks of a modality.

    Subclasses set :attr:`name` and implement the required pieces: :meth:`build_adapter`,
    :meth:`build_preprocessor`, :meth:`collate` and :meth:`example_batch`. Everything else has a default that
    built-in and outside plugins share (docs/PLUGINS.md lists them all).

    Attributes:
        name: Registry name, also the key of the modality's batch in ``forward_features``.
        Options: The typed options (a :class:`PluginOptions` dataclass); overridable per model config
            (``ModelConfig.modality_options[name]``). An unknown key or a wrong type is an error naming the plugin.
        defaults: The options' defaults as a dict (derived from :attr:`Options`; a plugin may instead give only
            ``defaults`` and the dataclass is derived from it).
        shares: Name of another modality whose FFNs, final LayerNorm and projection head this one uses
            (video uses image's); ``None`` for its own.
        requires: Modalities that must be built alongside (video needs image's stem).
        masking: Default masking policy for denoising (and its paired-view ratio).
        media: Manifest values are media: paths relative to the manifest's folder, ``data:`` URIs, or bytes (in
            shards: members, by the field map). ``False`` (text) passes values to the preprocessor as they are.
        needs_tokenizer: The preprocessor needs the model's tokenizer (text).
        decoder: The modality has a branch in the pretraining (denoising) decoder; ``False`` for modalities that
            share another's (video).
        uses_all_parameters: Every parameter of the adapter takes part in every forward (declared by the plugin;
            ``False``, the default, is the safe answer). When every modality of a model declares it and the task
            reaches every modality, head and the logit scale, DDP runs without ``find_unused_parameters``.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[PluginOptions]] = PluginOptions
    defaults: ClassVar[dict[str, Any]] = {}
    shares: ClassVar[str | None] = None
    requires: ClassVar[tuple[str, ...]] = ()
    masking: ClassVar[MaskingPolicy] = MaskingPolicy()
    media: ClassVar[bool] = True
    needs_tokenizer: ClassVar[bool] = False
    decoder: ClassVar[bool] = True
    uses_all_parameters: ClassVar[bool] = False
    REQUIRED: ClassVar[tuple[str, ...]] = ("build_adapter", "build_preprocessor", "collate", "example_batch")

    source: str = "unknown"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "Options" in own:
            if not (dataclasses.is_dataclass(cls.Options) and issubclass(cls.Options, PluginOptions)):
                raise PluginError(f"modality plugin {cls.__name__}: `Options` must be a PluginOptions dataclass")
            try:
                cls.defaults = cls.Options().as_dict()
            except TypeError as exc:
                raise PluginError(f"modality plugin {cls.__name__}: every option needs a default ({exc})") from None
            try:
                hints = typing.get_type_hints(cls.Options)
            except Exception:  # an annotation that does not resolve: types are not checked
                hints = {}
            for key, value in cls.defaults.items():
                if not type_ok(value, hints.get(key, Any), value):
                    raise PluginError(
                        f"modality plugin {cls.__name__} (module {cls.__module__}): option {key!r} has default "
                        f"{value!r}, not of its declared type {type_name(hints.get(key))}"
                    )
        elif "defaults" in own:  # options given as a plain dict: derive the dataclass (types from the defaults)
            spec: list[tuple[str, Any, Any]] = [
                (
                    k,
                    type(v) if v is not None else Any,
                    dataclasses.field(default_factory=functools.partial(copy.deepcopy, v)),
                )
                for k, v in cls.defaults.items()
            ]
            cls.Options = dataclasses.make_dataclass(f"{cls.__name__}Options", spec, bases=(PluginOptions,))

    # ----------------------------------------------------------------------------------------------- options
    def parse_options(self, values: Mapping[str, Any] | None, where: str | None = None) -> PluginOptions:
        """The typed options: the defaults updated with ``values``.

        Raises:
            PluginOptionError: ``values`` has a key that is not an option, or a value of another type than the
                option's annotation; the message names ``where`` (default ``modality_options.<name>``), the key,
                the plugin and where the plugin came from.
        """
        where = where or f"modality_options.{self.name}"
        fields = {f.name: f for f in dataclasses.fields(self.Options)}
        hints = option_hints(self.Options)
        given = dict(values or {})
        for key, value in given.items():
            if key not in fields:
                raise PluginOptionError(
                    f"{where}.{key}: the {self.name!r} plugin has no option {key!r} (plugin: {self.source}); "
                    f"its options: {sorted(fields)}"
                )
            default = self.defaults.get(key)
            if not type_ok(value, hints.get(key, Any), default):
                raise PluginOptionError(
                    f"{where}.{key}: expected {type_name(hints.get(key))} (default {default!r}), got {value!r} "
                    f"(plugin {self.name!r}: {self.source})"
                )
        options = self.Options(**given)
        try:
            self.validate_options(options)
        except (PluginOptionError, ValueError) as exc:
            raise PluginOptionError(f"{where}: {exc} (plugin {self.name!r}: {self.source})") from None
        return options

    def validate_options(self, options: PluginOptions) -> None:
        """Check option *values* (types are already checked): ranges, combinations. The default accepts all.

        Raises:
            ValueError: naming the option and what was expected (``parse_options`` adds where it was set and the
                plugin).
        """

    def options(self, config: ModelConfig) -> PluginOptions:
        """The plugin's typed options for ``config`` (its defaults updated with ``config.modality_options``)."""
        return self.parse_options(config.modality_options.get(self.name, {}))

    # -------------------------------------------------------------------------------------- required pieces
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

    def segment_defaults(self, config: ModelConfig) -> SegmentSpec | None:
        """The default window of timed segments (:mod:`one_peace.segments`) for a modality with a time axis;
        ``None`` (the default): its inputs have no time axis and are never cut into segments."""
        return None

    def check_segments(self, spec: SegmentSpec, config: ModelConfig) -> None:
        """Refuse (``ValueError``) a resolved spec this modality cannot take, before any work (audio: a window longer
        than ``max_seconds``). The default takes any."""

    def iter_segments(self, value: Any, config: ModelConfig, spec: SegmentSpec) -> Iterator[Segment]:
        """Yield the windows of one resolved input (``spec`` resolved), each decoded on its own: memory stays bounded
        by the window for any length. Only for modalities whose :meth:`segment_defaults` is not ``None``.

        Raises:
            one_peace.errors.DataError: the input does not decode.
        """
        raise NotImplementedError(f"the {self.name!r} plugin has no timed segments")

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Batch preprocessed samples into the adapter's input dict."""
        raise NotImplementedError

    def example_batch(self, config: ModelConfig, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        """A small random ready batch for docs, tests and benchmarks."""
        raise NotImplementedError

    def example_samples(self, config: ModelConfig, n: int, generator: torch.Generator) -> list[dict[str, Any]] | None:
        """Optional: ``n`` preprocessed samples of *different lengths* (what the preprocessor returns), so that the
        conformance suite can check collation and padding invariance. ``None`` (the default) skips those checks."""
        return None

    def example_inputs(self, config: ModelConfig, folder: Path, n: int, generator: torch.Generator) -> list[Any] | None:
        """Optional: ``n`` raw manifest values for ``config`` (writing any media files into ``folder``; values relative
        to it),
        of different lengths where the modality has variable length. The conformance suite runs them through the
        real paths: ``check_value`` -> ``resolve`` -> ``estimate_length`` -> the preprocessor -> the loader (with
        workers) -> ``preview`` -> ``encode``. ``None`` (the default) skips those checks."""
        return None

    # ----------------------------------------------------------------------------- data: manifests, lengths
    def check_value(self, value: Any) -> None:
        """Check one manifest value's kind up front (before any decoding).

        Raises:
            ValueError: saying what was expected (the manifest check adds the file, line and field).
        """
        if self.media and not isinstance(value, str | list | bytes):
            raise ValueError(f"must be a path or data URI, got {type(value).__name__}")

    def resolve(self, value: Any, base_dir: Path) -> Any:
        """A manifest value -> what the preprocessor reads.

        Media (the default): paths relative to ``base_dir`` (the manifest's folder) or absolute, ``data:`` URIs
        and bytes become a ``Path`` or bytes (lists element-wise). Non-media values pass through unchanged.

        Raises:
            one_peace.errors.MissingMedia: a path that does not exist.
            one_peace.errors.InvalidValue: a malformed data URI or an unsupported value.
        """
        if not self.media:
            return bytes(value) if isinstance(value, bytearray | memoryview) else value
        return resolve_media(value, base_dir)

    def read_field(self, row: Mapping[str, Any], field: str, base_dir: Path) -> Any:
        """``row[field]`` checked (:meth:`check_value`) and resolved (:meth:`resolve`): what the preprocessor reads.
        Training, ``embed`` and ``eval`` all read rows through it, so one bad row fails the same way everywhere.

        Raises:
            one_peace.errors.MissingField: the row has no such field (or it is null).
            one_peace.errors.InvalidValue: the value is not what the modality takes.
            one_peace.errors.MissingMedia: a path that does not exist.
        """
        value = row.get(field) if isinstance(row, Mapping) else None
        if value is None:
            raise MissingField(f"missing field {field!r}")
        try:
            self.check_value(value)
        except DataError:
            raise
        except ValueError as exc:
            raise InvalidValue(f"field {field!r}: {exc}") from None
        return self.resolve(value, base_dir)

    def estimate_length(self, value: Any, config: ModelConfig, preprocess: Callable[[Any], dict[str, Any]]) -> int:
        """A cheap token-count estimate of one resolved value, for length bucketing (no media decoding).

        The default says nothing (1): rows of such a modality all fall in the first bucket; a variable-length
        media modality should read its header (audio: frames from the file's header).
        """
        return 1

    def padding(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """The ``(B, T)`` bool mask of padded positions of a collated batch (``None``: no padding).

        Used for the loader's padding accounting and (via :meth:`token_lengths`) packing. Default: the batch's
        ``padding_mask``.
        """
        import torch

        pad = batch.get("padding_mask")
        return pad if isinstance(pad, torch.Tensor) else None

    def token_lengths(self, batch: Mapping[str, Any]) -> list[int]:
        """The real (unpadded) token count of every sample of a collated batch, CLS included (for packing).

        Raises:
            ValueError: the modality has no variable length (no :meth:`padding`).
        """
        pad = self.padding(batch)
        if pad is None:
            raise ValueError(f"cannot pack {self.name!r}: its batches have no padding (a fixed length)")
        return [int(n) for n in (~pad).sum(1)]

    def position_padding(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """The ``(B, T)`` padding of the adapter's positions (CLS at 0) for a collated batch, exactly as the adapter
        computes it, from the batch alone; ``None``: nothing is padded.

        With it, masking for denoising runs on the host copy of the batch before anything is read from the device
        (the task checks it against the adapter's own mask when both are on the CPU). The default raises
        ``NotImplementedError``: the task then masks from the adapter's output (one device read per masked view).
        """
        raise NotImplementedError

    def word_starts(self, batch: Mapping[str, Any], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For whole-word masking: ``(starts, protect)``, two ``(B, T)`` bool masks over the adapter's positions
        (CLS at 0): where a word begins, and positions never masked (EOS). ``None``: no notion of words."""
        return None

    # --------------------------------------------------------------------------------- pretraining decoder
    def decoder_positions(self) -> int:
        """Rows of this modality's absolute position table in the pretraining decoder (CLS included)."""
        return 1025

    def decoder_position_embed(self, table: torch.Tensor, length: int) -> torch.Tensor:
        """The decoder's ``(length, D)`` positions from its ``(rows, D)`` table (default: the first ``length``).

        Raises:
            ValueError: the sequence is longer than the table.
        """
        if length > table.shape[0]:
            raise ValueError(f"decoder: {self.name} sequence of {length} exceeds its {table.shape[0]} positions")
        return table[:length]

    # ------------------------------------------------------------------------------------ official checkpoints
    def official_key_rules(self) -> Sequence[OfficialKeyRule]:
        """How the official checkpoint names this modality's adapter-specific weights (built-ins; default none).

        The shared layers, heads, CLS/position embeddings and relative tables follow one rule for every modality
        (``one_peace.checkpoint.official``); a plugin lists only what its adapter names its own way.
        """
        return ()

    # --------------------------------------------------------------------------------------------- tokenizer
    def train_tokenizer(self, texts: Sequence[str], vocab_size: int) -> Tokenizer:
        """A tokenizer trained on ``texts`` (plugins with :attr:`needs_tokenizer`)."""
        raise NotImplementedError(f"the {self.name!r} plugin has no tokenizer")

    def load_tokenizer(self, path: str | Path, entry: Mapping[str, Any] | None = None) -> Tokenizer:
        """The tokenizer at ``path``: a folder plus the ``entry`` its ``save`` returned, a tokenizer file, or a
        folder of official files (``entry`` ``None``). Raises ``FileNotFoundError`` naming a missing file."""
        raise NotImplementedError(f"the {self.name!r} plugin has no tokenizer")

    # ------------------------------------------------------------------ presentation: media, previews, records
    def media_types(self) -> MediaTypes:
        """The files this modality accepts (MIME types and extensions), for upload fields and export descriptions.

        The default accepts nothing: a plugin whose inputs are files lists their types.
        """
        return MediaTypes()

    def preview(self, value: Any, config: ModelConfig, max_size: int = 256) -> Preview | None:
        """A small rendering of one resolved input for people (:class:`~one_peace.media.Preview`: a thumbnail PNG
        at most ``max_size`` pixels on its longest side, a short audio clip, or text); ``None``: no preview.

        Raises:
            one_peace.errors.DataError: the input does not decode (as the preprocessor would).
        """
        return None

    def describe_preprocessing(self, config: ModelConfig) -> dict[str, Any]:
        """A plain, JSON-friendly description of what the preprocessor does for ``config`` (sizes, mean/std, sample
        rate, tokenizer file...): shown on the search page and written next to exported encoders.

        The default gives the resolved options; a plugin adds what a person needs to reproduce its inputs.
        """
        return {"modality": self.name, "options": self.options(config).as_dict()}

    def distribution(self) -> tuple[str | None, str | None]:
        """The installed distribution providing this plugin and its version (``(None, None)`` when unknown: a
        module that is not installed, e.g. a notebook's class)."""
        return distribution_of(type(self).__module__)

    def record(self, config: ModelConfig) -> dict[str, Any]:
        """What checkpoints and embedding folders store about this plugin: its distribution and version, where it
        came from and the full resolved options (defaults included). :func:`check_record` compares it later."""
        dist, version = self.distribution()
        return {
            "distribution": dist,
            "version": version,
            "source": self.source,
            "options": self.options(config).as_dict(),
        }

    def __repr__(self) -> str:
        return f"<modality {self.name!r} from {self.source}>"


def check_record(name: str, recorded: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Compare a plugin record (:meth:`ModalityPlugin.record`) stored at ``where`` with the installed plugin.

    Warns (:class:`PluginMismatchWarning`) when the installed distribution or version differs; returns the recorded
    options, which the model is then built with (so a changed default does not change an old model).

    Raises:
        PluginError: the modality is not registered, or a recorded option is unknown to the installed plugin.
    """
    try:
        plugin = get_plugin(name)
    except KeyError as exc:
        raise PluginError(f"{where}: {exc.args[0]}") from None
    dist, version = plugin.distribution()
    rec_dist, rec_version = recorded.get("distribution"), recorded.get("version")
    if (rec_dist, rec_version) != (dist, version) and (rec_dist or rec_version):
        warnings.warn(
            f"{where}: modality {name!r} was saved with {rec_dist or '?'} {rec_version or '?'}; installed: "
            f"{dist or plugin.source} {version or '(no version)'}. Its recorded options are used; embeddings may "
            "still differ if the plugin's code changed",
            PluginMismatchWarning,
            stacklevel=3,
        )
    options = dict(recorded.get("options") or {})
    unknown = sorted(set(options) - set(plugin.defaults))
    if unknown:
        raise PluginError(
            f"{where}: modality {name!r} was saved with option(s) {unknown} that the installed plugin "
            f"({dist or plugin.source} {version or ''}) does not have; install the version it was saved with "
            f"({rec_dist or '?'} {rec_version or '?'})"
        )
    return options


@dataclass
class _Registry:
    plugins: dict[str, ModalityPlugin] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    clashes: dict[str, list[str]] = field(default_factory=dict)
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
    policy = plugin_cls.masking
    if not isinstance(policy, MaskingPolicy):
        raise PluginError(f"modality plugin {plugin_cls.name!r} ({where}): `masking` must be a MaskingPolicy")
    if policy.kind not in masking_kinds():
        raise PluginError(
            f"modality plugin {plugin_cls.name!r} ({where}): unknown masking kind {policy.kind!r}; "
            f"registered kinds: {sorted(masking_kinds())}"
        )
    if policy.kind == "whole_word" and plugin_cls.word_starts is ModalityPlugin.word_starts:
        raise PluginError(
            f"modality plugin {plugin_cls.name!r} ({where}): masking kind 'whole_word' needs the plugin's "
            "word_starts() (where words begin)"
        )
    if not 0.0 <= policy.ratio < 1.0 or not 0.0 <= policy.paired_ratio < 1.0 or policy.span < 1:
        raise PluginError(
            f"modality plugin {plugin_cls.name!r} ({where}): masking ratios must be in [0, 1) and span >= 1, "
            f"got {policy}"
        )


def _add(plugin_cls: type[ModalityPlugin], source: str) -> ModalityPlugin:
    with _REGISTRY.lock:
        _validate(plugin_cls, source)
        if plugin_cls.name in BUILTIN_NAMES and plugin_cls.__module__ not in BUILTIN_MODULES:
            raise PluginError(
                f"modality {plugin_cls.name!r} is a built-in's name; {source} cannot take it (give the plugin "
                "another name)"
            )
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
    except (Exception, SystemExit) as exc:  # one broken plugin (even one calling sys.exit()) never stops the others
        message = str(exc) if isinstance(exc, PluginError) else f"modality plugin {ep.name!r} ({where}) failed: {exc!r}"
        _REGISTRY.errors[ep.name] = message
        logger.warning("%s", message)


def _distribution(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else f"module {ep.value.split(':')[0]}"


def _choices() -> dict[str, str]:
    """``ONE_PEACE_MODALITY_CHOICE``: modality name -> the distribution chosen to provide it."""
    raw = os.environ.get(CHOICE_ENV, "")
    pairs = [part.split("=", 1) for part in raw.split(",") if part.strip()]
    return {k.strip(): v.strip() for k, v in pairs if len([k, v]) == 2}


def _entry_points_to_load() -> list[importlib.metadata.EntryPoint]:
    """The group's entry points, one per name: where several distributions declare one name, none of them unless
    ``ONE_PEACE_MODALITY_CHOICE`` names one (the clash is recorded as that name's error, naming every side)."""
    by_name: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        by_name.setdefault(ep.name, []).append(ep)
    choices = _choices()
    chosen: list[importlib.metadata.EntryPoint] = []
    for name, eps in by_name.items():
        dists = sorted({_distribution(ep) for ep in eps})
        if len(dists) > 1 and name not in BUILTIN_NAMES:  # a built-in's name: the outside ones fail in _add
            picked = [ep for ep in eps if _distribution(ep) == choices.get(name)]
            if not picked:
                _REGISTRY.clashes[name] = dists
                _REGISTRY.errors[name] = (
                    f"modality {name!r} is declared by {len(dists)} distributions ({', '.join(dists)}); none is "
                    f"active until one is chosen: {CHOICE_ENV}={name}=<distribution>"
                )
                logger.warning("%s", _REGISTRY.errors[name])
                continue
            eps = picked[:1]
        chosen.extend(eps)
    return chosen


def discover(force: bool = False) -> None:
    """Import built-in plugins and load every ``one_peace.modalities`` entry point (once)."""
    with _REGISTRY.lock:
        if _REGISTRY.discovered and not force:
            return
        _REGISTRY.discovered = True
        _REGISTRY.clashes.clear()
        for module in BUILTIN_MODULES:
            try:
                importlib.import_module(module)
            except (Exception, SystemExit) as exc:
                _REGISTRY.errors[module] = f"built-in modality module {module} failed to import: {exc!r}"
                logger.warning("%s", _REGISTRY.errors[module])
        for ep in _entry_points_to_load():
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


def plugin_clashes() -> dict[str, list[str]]:
    """Modality names declared by several distributions and left inactive, mapped to those distributions."""
    discover()
    return {k: list(v) for k, v in _REGISTRY.clashes.items()}


def unregister(name: str) -> None:
    """Remove a registered modality (for tests and interactive use)."""
    with _REGISTRY.lock:
        _REGISTRY.plugins.pop(name, None)
        _REGISTRY.errors.pop(name, None)
        _REGISTRY.clashes.pop(name, None)
