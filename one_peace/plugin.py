"""Everything a modality plugin needs from one-peace, in one public module (``from one_peace.plugin import ...``).

The contract is :class:`ModalityPlugin` (docs/PLUGINS.md walks through it); adapters subclass :class:`Adapter` and
return an :class:`AdapterOutput`; preprocessors raise the typed errors below for unusable input (the loader skips
and counts such samples). The conformance suite is :func:`one_peace.testing.check_modality`.
"""

from __future__ import annotations

from one_peace.config import ModelConfig
from one_peace.errors import (
    DataError,
    EmptyMedia,
    InvalidValue,
    MissingField,
    MissingMedia,
    NonFiniteData,
    UndecodableMedia,
)
from one_peace.media import MediaTypes, Preview
from one_peace.models.adapter import (
    Adapter,
    AdapterOutput,
    check_keep_ids,
    gather_kept,
    init_rel_table,
    padding_or_none,
    require,
)
from one_peace.models.relpos import bucket_1d, bucket_1d_rows, bucket_2d, bucket_2d_rows
from one_peace.registry import (
    MaskingPolicy,
    ModalityPlugin,
    OfficialKeyRule,
    PluginError,
    PluginOptionError,
    PluginOptions,
    register_modality,
)
from one_peace.train.masking import MaskRequest, register_masking

__all__ = [
    "Adapter",
    "AdapterOutput",
    "DataError",
    "EmptyMedia",
    "InvalidValue",
    "MaskRequest",
    "MaskingPolicy",
    "MediaTypes",
    "MissingField",
    "MissingMedia",
    "ModalityPlugin",
    "ModelConfig",
    "NonFiniteData",
    "OfficialKeyRule",
    "PluginError",
    "PluginOptionError",
    "PluginOptions",
    "Preview",
    "UndecodableMedia",
    "bucket_1d",
    "bucket_1d_rows",
    "bucket_2d",
    "bucket_2d_rows",
    "check_keep_ids",
    "gather_kept",
    "init_rel_table",
    "padding_or_none",
    "register_masking",
    "register_modality",
    "require",
]
