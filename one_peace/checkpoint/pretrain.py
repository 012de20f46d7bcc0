"""The official pretraining decoder's weights: read them from an official file or a converted folder."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from one_peace.models.decoder import DecoderConfig, DenoiseDecoder

__all__ = ["decoder_from_official_state", "pretrained_decoder_state"]


def pretrained_decoder_state(path: str | Path | None) -> dict[str, torch.Tensor] | None:
    """Official pretraining-decoder keys of ``path`` (official file, or a converted folder); ``None`` without."""
    from one_peace.checkpoint import PRETRAIN, read_official
    from one_peace.checkpoint.official import is_pretrain_key

    if not path:
        return None
    if Path(path).is_dir():
        if not (Path(path) / PRETRAIN).is_file():
            return None
        from safetensors.torch import load_file

        return load_file(str(Path(path) / PRETRAIN))
    state, _ = read_official(path)
    found = {k: v for k, v in state.items() if is_pretrain_key(k)}
    return found or None


def decoder_from_official_state(
    state: Mapping[str, torch.Tensor], encoder_dim: int, heads: int | None = None, source: str = "checkpoint"
) -> DenoiseDecoder:
    """Build a :class:`DenoiseDecoder` from official pretraining keys (as carried by the converter).

    Sizes are inferred from the tensors; the head count cannot be (the decoder has no relative tables): pass
    ``heads`` (official: 12 for the 768-wide decoder), otherwise 64-wide heads are assumed.

    Raises:
        ValueError: naming ``source`` and the key, for unknown keys, wrong shapes or missing weights.
    """
    from one_peace.checkpoint.official import DECODER_IGNORED, is_pretrain_key, map_decoder_key

    keys = [k for k in state if is_pretrain_key(k)]
    mods = tuple(m for m in ("text", "image", "audio") if f"{m}_mask_token" in state)
    if not mods:
        raise ValueError(f"{source}: no pretraining decoder keys (*_mask_token) found")
    d = state[f"{mods[0]}_mask_token"].shape[-1]
    layer_ids = {int(k.split(".")[3]) for k in keys if k.startswith("decoder_wrapper.fusion_model.layers.")}
    ffn = state[f"decoder_wrapper.fusion_model.layers.0.{mods[0]}_ffn.0.wi_0.weight"].shape[0]
    positions = {}
    for m in mods:
        key = (
            "decoder_wrapper.image_adapter.pos_embed"
            if m == "image"
            else f"decoder_wrapper.{m}_adapter.embed_positions.weight"
        )
        positions[m] = state[key].shape[0]
    if heads is None:
        if d % 64:
            raise ValueError(f"{source}: cannot infer the decoder's head count for width {d}; pass heads=")
        heads = d // 64
    config = DecoderConfig(
        encoder_dim=encoder_dim,
        embed_dim=d,
        layers=max(layer_ids) + 1,
        heads=heads,
        ffn_dim=ffn,
        modalities=mods,
        positions=positions,
    )
    decoder = DenoiseDecoder(config)
    params = dict(decoder.named_parameters())
    seen = set()
    with torch.no_grad():
        for k in keys:
            if DECODER_IGNORED.match(k):
                continue
            name = map_decoder_key(k)
            if name is None or name not in params:
                raise ValueError(f"{source}: unknown pretraining key {k!r}")
            value = state[k]
            if tuple(value.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"{source}: key {k!r} has shape {tuple(value.shape)}, expected {tuple(params[name].shape)}"
                )
            params[name].copy_(value.float())
            seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(f"{source}: no weights for decoder parameter(s) {missing[:6]}")
    return decoder
