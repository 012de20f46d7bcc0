"""Official ONE-PEACE parameter names <-> ours, architecture inference, and load-time table interpolation.

Every official key is either mapped to one of our parameters (:func:`map_official_key`), listed in
:data:`IGNORED` (index buffers we recompute and unused tensors), or recognised as pretraining-only
(:func:`is_pretrain_key`: the denoising decoder, carried over unchanged by the converter).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from one_peace.config import ModelConfig

ENC = "encoder_wrapper."
FUSION = ENC + "fusion_model."

#: Official keys we drop on purpose, each with the reason (the single place that lists them).
IGNORED: dict[str, str] = {
    r"encoder_wrapper\.\w+_adapter\.rp_bucket": "relative-position index buffer, recomputed from the rule",
    r"encoder_wrapper\.image_adapter\.position_idx": "index buffer 0..N, unused by the forward",
    r"encoder_wrapper\.fusion_model\.version": "fairseq bookkeeping buffer",
    r"encoder_wrapper\.audio_adapter\.mask_embedding": "unused by any official forward",
}
_IGNORED_RE = [re.compile(p + r"$") for p in IGNORED]

_PRETRAIN_RE = re.compile(
    r"^(decoder_wrapper\.|(text|image|audio)_mask_token$|decoder_(text|image|audio)_embed\.|(text|image|audio)_mask_head\.)"
)

_FFN = {"0.wi_0": "wi_0", "0.wi_1": "wi_1", "2": "norm", "3": "wo"}
_ATTN = {
    "q_proj": "attn.q_proj",
    "k_proj": "attn.k_proj",
    "v_proj": "attn.v_proj",
    "out_proj": "attn.out_proj",
    "ln": "attn.inner_norm",
}

_RULES: list[tuple[re.Pattern[str], Any]] = [
    (
        re.compile(r"^encoder_wrapper\.(\w+)_adapter\.(cls_embedding|cls_pos_embed|pos_embed)$"),
        lambda m: f"adapters.{m[1]}.{m[2]}",
    ),
    (
        re.compile(r"^encoder_wrapper\.(\w+)_adapter\.rel_pos_table_list\.0\.weight$"),
        lambda m: f"adapters.{m[1]}.rel_pos_table",
    ),
    (
        re.compile(r"^encoder_wrapper\.fusion_model\.layers\.(\d+)\.gamma_([12])$"),
        lambda m: f"layers.{m[1]}.gamma_{m[2]}",
    ),
    (
        re.compile(
            r"^encoder_wrapper\.fusion_model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj|ln)\.(weight|bias)$"
        ),
        lambda m: f"layers.{m[1]}.{_ATTN[m[2]]}.{m[3]}",
    ),
    (
        re.compile(r"^encoder_wrapper\.fusion_model\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$"),
        lambda m: f"layers.{m[1]}.attn_norm.{m[2]}",
    ),
    (
        re.compile(r"^encoder_wrapper\.fusion_model\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$"),
        lambda m: f"layers.{m[1]}.ffn_norm.{m[2]}",
    ),
    (
        re.compile(r"^encoder_wrapper\.fusion_model\.layers\.(\d+)\.(\w+)_ffn\.(0\.wi_0|0\.wi_1|2|3)\.(weight|bias)$"),
        lambda m: f"layers.{m[1]}.ffns.{m[2]}.{_FFN[m[3]]}.{m[4]}",
    ),
    (
        re.compile(r"^encoder_wrapper\.fusion_model\.(\w+)_layer_norm\.(weight|bias)$"),
        lambda m: f"final_norms.{m[1]}.{m[2]}",
    ),
    (re.compile(r"^(\w+)_proj\.(weight|bias)$"), lambda m: f"heads.{m[1]}.{m[2]}"),
    (re.compile(r"^logit_scale$"), lambda m: "logit_scale"),
]


def is_ignored(key: str) -> bool:
    """Whether ``key`` is an official buffer or tensor we drop on purpose (see :data:`IGNORED`)."""
    return any(p.match(key) for p in _IGNORED_RE)


def is_pretrain_key(key: str) -> bool:
    """Whether ``key`` belongs to the pretraining-only decoder (mask tokens, decoder, mask heads)."""
    return bool(_PRETRAIN_RE.match(key))


def _plugin_rules() -> tuple[list[tuple[re.Pattern[str], Any]], list[tuple[re.Pattern[str], Any]]]:
    """The registered plugins' own official key rules (their adapters' layouts): ``(to ours, to official)``."""
    from one_peace.registry import get_plugin, list_modalities

    names = tuple(list_modalities())
    cached = _PLUGIN_RULES.get(names)
    if cached is None:
        rules = [r for m in names for r in get_plugin(m).official_key_rules()]
        cached = (
            [(re.compile(r.official), r.to_ours) for r in rules],
            [(re.compile(r.ours), r.to_official) for r in rules],
        )
        _PLUGIN_RULES.clear()
        _PLUGIN_RULES[names] = cached
    return cached


_PLUGIN_RULES: dict[tuple[str, ...], Any] = {}


def map_official_key(key: str) -> str | None:
    """Our parameter name for an official encoder/head key, or ``None`` when no rule applies.

    The shared layers, heads and the adapters' common pieces are mapped here; each adapter's own layout by its
    plugin's :meth:`~one_peace.registry.ModalityPlugin.official_key_rules`.
    """
    for pattern, fn in (*_RULES, *_plugin_rules()[0]):
        m = pattern.match(key)
        if m:
            return str(fn(m))
    return None


def looks_official(keys: Any) -> bool:
    """Whether a state dict uses official ONE-PEACE names."""
    return any(str(k).startswith(ENC) for k in keys)


def _rows_to_grid(rows: int) -> int:
    span = math.isqrt(rows - 3)
    if span * span != rows - 3 or span % 2 == 0:
        raise ValueError(f"image relative table has {rows} rows, which is not (2R-1)^2 + 3")
    return (span + 1) // 2


def infer_config(
    state: Mapping[str, torch.Tensor], cfg: Mapping[str, Any] | None, source: str
) -> tuple[ModelConfig, dict[str, Any]]:
    """Architecture of an official state dict, from its ``cfg`` when present and tensor shapes otherwise.

    Returns the model config and extra facts (``checkpoint_image_grid``: the relative grid stored in the file).
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ValueError(f"{source}: expected key {key!r} is missing; not an official ONE-PEACE encoder?")
        return tuple(state[key].shape)

    layer_ids = {int(m[1]) for k in state if (m := re.match(r"^encoder_wrapper\.fusion_model\.layers\.(\d+)\.", k))}
    if not layer_ids:
        raise ValueError(
            f"{source}: no encoder_wrapper.fusion_model.layers.* keys: not an official ONE-PEACE checkpoint"
        )
    per_layer_tables = [
        k for k in state if re.match(r"^encoder_wrapper\.\w+_adapter\.rel_pos_table_list\.[1-9]\d*\.weight$", k)
    ]
    if per_layer_tables:
        raise ValueError(
            f"{source}: per-layer relative tables ({per_layer_tables[0]} ...) come from fine-tuned/classify "
            "layouts, which are not supported yet"
        )
    modalities = [m for m in ("text", "image", "audio") if f"{FUSION}layers.0.{m}_ffn.0.wi_0.weight" in state]
    ffn_dim, dim = shape(f"{FUSION}layers.0.{modalities[0]}_ffn.0.wi_0.weight")
    enc = (cfg or {}).get("model", {}).get("encoder", {}) if isinstance(cfg, Mapping) else {}
    task = (cfg or {}).get("task", {}) if isinstance(cfg, Mapping) else {}
    heads = None
    for mod in modalities:
        table_key = f"{ENC}{mod}_adapter.rel_pos_table_list.0.weight"
        if table_key in state:
            heads = shape(table_key)[1]
            break
    heads = int(enc.get("attention_heads") or heads or 0)
    if not heads:
        raise ValueError(f"{source}: cannot infer the number of attention heads (no cfg and no relative tables)")
    options: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {}
    if "text" in modalities:
        vocab, _ = shape(f"{ENC}text_adapter.embed_tokens.weight")
        max_pos, _ = shape(f"{ENC}text_adapter.embed_positions.weight")
        rows, _ = shape(f"{ENC}text_adapter.rel_pos_table_list.0.weight")
        options["text"] = {
            "vocab_size": vocab,
            "max_positions": max_pos,
            "bucket_size": (rows - 2) // 2,
            "max_tokens": int(task.get("max_src_length", 70) or 70),
        }
    if "image" in modalities:
        pos_rows, _ = shape(f"{ENC}image_adapter.pos_embed")
        grid = math.isqrt(pos_rows - 1)
        table_grid = _rows_to_grid(shape(f"{ENC}image_adapter.rel_pos_table_list.0.weight")[0])
        image_size = int(task.get("patch_image_size") or table_grid * 16)
        options["image"] = {"image_size": image_size, "bucket_size": grid, "rel_bucket_size": image_size // 16}
        extra["checkpoint_image_grid"] = table_grid
    if "audio" in modalities:
        feat = shape(f"{ENC}audio_adapter.embed_audios.0.conv_layers.0.0.weight")[0]
        depth = len(
            {k for k in state if re.match(r"^encoder_wrapper\.audio_adapter\.embed_positions\.\d+\.0\.weight$", k)}
        )
        pos_w = shape(f"{ENC}audio_adapter.embed_positions.1.0.weight")
        rows, _ = shape(f"{ENC}audio_adapter.rel_pos_table_list.0.weight")
        options["audio"] = {
            "feature_dim": feat,
            "bucket_size": (rows - 2) // 2,
            "pos_depth": depth,
            "pos_width": pos_w[2] * depth,
            "pos_groups": dim // pos_w[1],
            "max_seconds": float(task.get("max_duration", 15) or 15),
        }
    gamma = f"{FUSION}layers.0.gamma_1"
    config = ModelConfig(
        embed_dim=dim,
        layers=max(layer_ids) + 1,
        heads=heads,
        ffn_dim=ffn_dim,
        modalities=tuple(modalities),
        modality_options=options,
        layer_scale_init=1e-6 if gamma in state else 0.0,
        name="official",
    )
    config.validate()
    return config, extra


def interpolate_image_table(table: torch.Tensor, src_grid: int, dst_grid: int) -> torch.Tensor:
    """Official load-time resize of an image relative table from grid ``src_grid`` to ``dst_grid``.

    The (2R-1)^2 offset grid is placed on geometrically stretched coordinates (ratio found by bisection),
    fitted per head with an interpolating bicubic spline (``RectBivariateSpline``, ``s=0``) and evaluated on the
    integer offsets of the new grid; the three CLS rows are kept (parity README §9).
    """
    from scipy.interpolate import RectBivariateSpline

    src, dst = 2 * src_grid - 1, 2 * dst_grid - 1
    if table.shape[0] != src * src + 3:
        raise ValueError(
            f"image relative table has {table.shape[0]} rows, expected {src * src + 3} for grid {src_grid}"
        )
    if src == dst:
        return table
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2.0
        total = (1 - q ** (src // 2)) / (1 - q)
        if total > dst // 2:
            hi = q
        else:
            lo = q
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    x = np.array([-d for d in reversed(dis)] + [0.0] + dis)
    t = np.arange(-(dst // 2), dst // 2 + 1, dtype=np.float64)
    grid = table[: src * src].float().numpy().astype(np.float64)
    cols = []
    for h in range(table.shape[1]):
        spline = RectBivariateSpline(x, x, grid[:, h].reshape(src, src), kx=3, ky=3, s=0)
        cols.append(torch.from_numpy(spline(t, t).astype(np.float32)).reshape(-1, 1))
    return torch.cat([torch.cat(cols, dim=1), table[src * src :].float()], dim=0).to(table.dtype)


_INVERSE: list[tuple[re.Pattern[str], Any]] = [
    (
        re.compile(r"^adapters\.(\w+)\.(cls_embedding|cls_pos_embed|pos_embed)$"),
        lambda m: f"{ENC}{m[1]}_adapter.{m[2]}",
    ),
    (re.compile(r"^adapters\.(\w+)\.rel_pos_table$"), lambda m: f"{ENC}{m[1]}_adapter.rel_pos_table_list.0.weight"),
    (re.compile(r"^layers\.(\d+)\.gamma_([12])$"), lambda m: f"{FUSION}layers.{m[1]}.gamma_{m[2]}"),
    (
        re.compile(r"^layers\.(\d+)\.(attn\.\w+)\.(weight|bias)$"),
        lambda m: f"{FUSION}layers.{m[1]}.self_attn.{ {v: k for k, v in _ATTN.items()}[m[2]] }.{m[3]}",
    ),
    (
        re.compile(r"^layers\.(\d+)\.attn_norm\.(weight|bias)$"),
        lambda m: f"{FUSION}layers.{m[1]}.self_attn_layer_norm.{m[2]}",
    ),
    (
        re.compile(r"^layers\.(\d+)\.ffn_norm\.(weight|bias)$"),
        lambda m: f"{FUSION}layers.{m[1]}.final_layer_norm.{m[2]}",
    ),
    (
        re.compile(r"^layers\.(\d+)\.ffns\.(\w+)\.(wi_0|wi_1|norm|wo)\.(weight|bias)$"),
        lambda m: f"{FUSION}layers.{m[1]}.{m[2]}_ffn.{ {v: k for k, v in _FFN.items()}[m[3]] }.{m[4]}",
    ),
    (re.compile(r"^final_norms\.(\w+)\.(weight|bias)$"), lambda m: f"{FUSION}{m[1]}_layer_norm.{m[2]}"),
    (re.compile(r"^heads\.(\w+)\.(weight|bias)$"), lambda m: f"{m[1]}_proj.{m[2]}"),
    (re.compile(r"^logit_scale$"), lambda m: "logit_scale"),
]


_DEC = "decoder_wrapper."
_DECODER_RULES: list[tuple[re.Pattern[str], Any]] = [
    (re.compile(r"^decoder_(\w+)_embed\.(weight|bias)$"), lambda m: f"embed.{m[1]}.{m[2]}"),
    (re.compile(r"^(\w+)_mask_token$"), lambda m: f"mask_tokens.{m[1]}"),
    (re.compile(r"^(\w+)_mask_head\.(weight|bias)$"), lambda m: f"heads.{m[1]}.{m[2]}"),
    (re.compile(r"^decoder_wrapper\.(text|audio)_adapter\.embed_positions\.weight$"), lambda m: f"positions.{m[1]}"),
    (re.compile(r"^decoder_wrapper\.image_adapter\.pos_embed$"), lambda m: "positions.image"),
    (
        re.compile(r"^decoder_wrapper\.fusion_model\.(\w+)_layer_norm\.(weight|bias)$"),
        lambda m: f"final_norms.{m[1]}.{m[2]}",
    ),
]
#: Official decoder keys that no decoder forward uses.
DECODER_IGNORED = re.compile(
    r"^decoder_wrapper\.(\w+_adapter\.(cls_embedding|mask_embedding|position_idx)|fusion_model\.version)$"
)


def map_decoder_key(key: str) -> str | None:
    """Our :class:`~one_peace.models.decoder.DenoiseDecoder` name of an official pretraining key (or ``None``)."""
    for pattern, fn in _DECODER_RULES:
        m = pattern.match(key)
        if m:
            return str(fn(m))
    if key.startswith(_DEC + "fusion_model.layers."):
        inner = map_official_key(ENC + key[len(_DEC) :])
        return inner
    return None


def official_name(name: str) -> str:
    """The official key of one of our parameter names (inverse of :func:`map_official_key`).

    Raises:
        KeyError: the parameter has no official counterpart (e.g. the video temporal embedding).
    """
    for pattern, fn in (*_INVERSE, *_plugin_rules()[1]):
        m = pattern.match(name)
        if m:
            return str(fn(m))
    raise KeyError(f"parameter {name!r} has no official ONE-PEACE counterpart")
