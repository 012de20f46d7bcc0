"""The official pretraining decoder's weights: read them from an official file or a converted folder."""

from __future__ import annotations

from pathlib import Path

import torch

from one_peace.models.decoder import decoder_from_official_state

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
