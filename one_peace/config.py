"""Typed model configuration and the named sizes (tiny, base, large, one_peace_4b)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

CONFIG_FORMAT_VERSION = 1
#: The modalities of the official ONE-PEACE 4B model: the default of ``build_model`` and of the decoder.
OFFICIAL_MODALITIES: tuple[str, ...] = ("text", "image", "audio")


@dataclass(kw_only=True)
class ModelConfig:
    """Hyper-parameters of a ONE-PEACE style encoder.

    Attributes:
        embed_dim: Width of the shared stack.
        layers: Number of shared layers.
        heads: Attention heads (``embed_dim`` must divide evenly).
        ffn_dim: Inner width of each GeGLU FFN.
        modalities: Modalities the model is built with (order fixes nothing at run time).
        modality_options: Per-modality adapter/preprocessing options overriding the plugin defaults.
        layer_scale_init: Initial value of the layer-scale vectors (``0`` disables layer scale).
        drop_path_rate: Stochastic depth at the last layer (linearly increasing from 0).
        official_padding: Reproduce the official code's padding leaks (audio positional convs see padded
            frames) for parity with official outputs; ``False`` makes every item independent of its batch.
        attn_backend: ``"sdpa"`` (default, any device), ``"flex"`` (FlexAttention: no dense bias; fast compiled on a
            GPU), ``"xformers"`` (CUDA only) or ``"math"`` (plain matmuls: what exports trace). A runtime choice: not
            written into checkpoints.
        name: Size name this config came from, for display.
    """

    embed_dim: int
    layers: int
    heads: int
    ffn_dim: int
    modalities: tuple[str, ...] = OFFICIAL_MODALITIES
    modality_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    layer_scale_init: float = 1e-6
    drop_path_rate: float = 0.0
    official_padding: bool = False
    attn_backend: str = "sdpa"
    name: str = "custom"

    def __post_init__(self) -> None:
        # ``None`` means no overrides, for the whole mapping and for one modality (as YAML or a caller may write it)
        if self.modality_options is None:
            self.modality_options = {}
        if isinstance(self.modality_options, dict):
            self.modality_options = {m: ({} if o is None else o) for m, o in self.modality_options.items()}

    def validate(self) -> None:
        """Check the values, raising ``ValueError`` naming the offending field (types first: a ``config.json`` with
        ``"layer_scale_init": "abc"`` is refused here, not by an arithmetic error while building)."""
        from one_peace.plugin_options import option_hints, type_ok

        hints = option_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "modality_options":  # checked below, with the plugins' own option types
                continue
            if f.name == "modalities":
                if not isinstance(value, list | tuple) or not all(isinstance(m, str) for m in value):
                    raise ValueError(f"model config field 'modalities' must be a list of names, got {value!r}")
            elif not type_ok(value, hints[f.name], f.default):
                raise ValueError(
                    f"model config field {f.name!r}: expected {getattr(hints[f.name], '__name__', hints[f.name])}, "
                    f"got {value!r}"
                )
        for key in ("layer_scale_init", "drop_path_rate"):
            if not math.isfinite(getattr(self, key)) or getattr(self, key) < 0:
                raise ValueError(f"model config field {key!r} must be a finite number >= 0, got {getattr(self, key)}")
        for key in ("embed_dim", "layers", "heads", "ffn_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model config field {key!r} must be a positive integer, got {value!r}")
        if self.embed_dim % self.heads:
            raise ValueError(f"model config: embed_dim ({self.embed_dim}) must be divisible by heads ({self.heads})")
        if not self.modalities:
            raise ValueError("model config field 'modalities' must name at least one modality")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"model config field 'drop_path_rate' must be in [0, 1), got {self.drop_path_rate}")
        if self.attn_backend not in ("sdpa", "flex", "xformers", "math"):
            raise ValueError(
                "model config field 'attn_backend' must be 'sdpa', 'flex', 'xformers' or 'math', got "
                f"{self.attn_backend!r}"
            )
        if not isinstance(self.modality_options, dict) or not all(
            isinstance(o, dict) for o in self.modality_options.values()
        ):
            raise ValueError(
                "model config field 'modality_options' must map modality names to option dicts, got "
                f"{self.modality_options!r}"
            )
        unknown = set(self.modality_options) - set(self.modalities)
        if unknown:
            raise ValueError(
                f"model config field 'modality_options' names modalities not in the model: {sorted(unknown)}"
            )
        from one_peace.registry import get_plugin

        for modality in self.modalities:  # KeyError naming the registered modalities (and plugins that failed)
            get_plugin(modality)
        for modality, opts in self.modality_options.items():  # unknown keys and wrong types name the plugin
            get_plugin(modality).parse_options(opts)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.embed_dim // self.heads

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["modalities"] = list(self.modalities)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from a dict, rejecting unknown keys with a message naming them and ``source``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(
                f"{source}: unknown model config key(s) {sorted(unknown)}; expected some of {sorted(names)}"
            )
        data = dict(data)
        if "modalities" in data:
            data["modalities"] = tuple(data["modalities"])
        cfg = cls(**data)
        cfg.validate()
        return cfg


def _load_sizes() -> dict[str, dict[str, int]]:
    """Read the named sizes from the packaged ``recipes/model/*.yaml`` (the single source of truth)."""
    from importlib.resources import files

    import yaml

    sizes: dict[str, dict[str, int]] = {}
    for entry in sorted(files("one_peace.recipes").joinpath("model").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            doc = yaml.safe_load(entry.read_text())
            sizes[doc["size"]] = {k: int(doc[k]) for k in ("embed_dim", "layers", "heads", "ffn_dim")}
    return sizes


#: Named sizes: ``tiny`` (2 x 64), ``base`` (12 x 768), ``large`` (24 x 1024), ``one_peace_4b`` (40 x 1536).
SIZES: dict[str, dict[str, int]] = _load_sizes()


def model_config(
    size: str, modalities: tuple[str, ...] | list[str] = OFFICIAL_MODALITIES, **overrides: Any
) -> ModelConfig:
    """Return the config of a named size (``tiny``, ``base``, ``large``, ``one_peace_4b``) with overrides."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    dims = SIZES[size]
    cfg = ModelConfig(
        embed_dim=dims["embed_dim"],
        layers=dims["layers"],
        heads=dims["heads"],
        ffn_dim=dims["ffn_dim"],
        modalities=tuple(modalities),
        name=size,
        **overrides,
    )
    cfg.validate()
    return cfg
