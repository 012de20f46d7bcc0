"""Base class and output type shared by every modality adapter (raw tensors -> tokens)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: Environment variable: ``1`` also runs the value checks of the forward pass (token ids, ``keep_ids`` ranges) on
#: accelerator tensors, at the cost of a host synchronisation each (they always run on CPU tensors, in eager mode).
CHECKS_ENV = "ONE_PEACE_CHECKS"


def host_checks(t: torch.Tensor) -> bool:
    """Whether checks that read ``t``'s values on the host run now: never while ``torch.compile`` traces; on CPU
    tensors (reading them costs no device synchronisation); on accelerator tensors only with ``ONE_PEACE_CHECKS=1``.

    This keeps the training and inference hot path free of ``.item()``/``bool(tensor)`` synchronisations on GPUs
    (and of graph breaks under ``fullgraph=True`` compilation).
    """
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or os.environ.get(CHECKS_ENV) == "1"


def padding_or_none(pad: torch.Tensor | None) -> torch.Tensor | None:
    """``pad``, or ``None`` when nothing is padded and that can be read without a synchronisation (see
    :func:`host_checks`); an all-False mask that is kept only costs an attention bias, never a different result."""
    if pad is None or (host_checks(pad) and not bool(pad.any())):
        return None
    return pad


@dataclass
class AdapterOutput:
    """What an adapter hands to the shared stack.

    Attributes:
        tokens: ``(B, T, D)`` embeddings with absolute positions already added (CLS at 0).
        padding_mask: ``(B, T)`` bool, True on padding; ``None`` when nothing is padded (an all-False mask is
            allowed: see :func:`padding_or_none`).
        rel_index: ``(T, T)`` or per-sample ``(B, T, T)`` row indices into ``rel_table``.
        rel_table: ``(rows, heads)`` relative-position bias table of this block.
    """

    tokens: torch.Tensor
    padding_mask: torch.Tensor | None
    rel_index: torch.Tensor
    rel_table: torch.Tensor


def check_keep_ids(keep_ids: torch.Tensor, batch: int, length: int, name: str) -> torch.Tensor:
    """Validate ``keep_ids (B, K)`` (ascending positions, CLS=0, right-padded with -1) and return it as int64."""
    if keep_ids.dim() != 2 or keep_ids.shape[0] != batch:
        raise ValueError(f"{name}: keep_ids must have shape (B={batch}, K), got {tuple(keep_ids.shape)}")
    keep_ids = keep_ids.long()
    if host_checks(keep_ids) and (int(keep_ids.max()) >= length or int(keep_ids.min()) < -1):
        raise ValueError(f"{name}: keep_ids must index positions 0..{length - 1} (or -1 for padding)")
    return keep_ids


def gather_kept(out: AdapterOutput, keep_ids: torch.Tensor, name: str) -> AdapterOutput:
    """Keep only the tokens named by ``keep_ids`` (MAE-style token dropping), with their positions.

    Tokens already carry their absolute positions, and the relative-bias index is gathered on both
    axes, so kept tokens see exactly the positions they had in the full sequence. ``-1`` entries
    become padding (filled with the last column's index, as the official code does); a kept position that was
    padding in the full sequence stays padding.
    """
    b, t, d = out.tokens.shape
    keep_ids = check_keep_ids(keep_ids, b, t, name)
    k = keep_ids.shape[1]
    pad = keep_ids.eq(-1)
    g = keep_ids.masked_fill(pad, k - 1)
    tokens = out.tokens.gather(1, g[:, :, None].expand(b, k, d))
    idx = out.rel_index if out.rel_index.dim() == 3 else out.rel_index.expand(b, t, t)
    rows = idx.gather(1, g[:, :, None].expand(b, k, t))
    rel_index = rows.gather(2, g[:, None, :].expand(b, k, k))
    if out.padding_mask is not None:  # a kept position that was padding stays padding (never attended)
        pad = pad | out.padding_mask.gather(1, g)
    return AdapterOutput(tokens, padding_or_none(pad), rel_index, out.rel_table)


class Adapter(nn.Module):
    """Base adapter: subclasses implement :meth:`embed`; token dropping is generic.

    Attributes:
        modality: Name of the modality (used in error messages).
    """

    modality: str = "?"

    def embed(self, batch: dict[str, Any]) -> AdapterOutput:
        """Embed a full batch (every position)."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Any], keep_ids: torch.Tensor | None = None) -> AdapterOutput:
        """Embed ``batch``; with ``keep_ids`` only those positions are returned."""
        out = self.embed(batch)
        if keep_ids is None:
            return out
        return gather_kept(out, keep_ids, f"{self.modality} adapter")


def require(batch: dict[str, Any], key: str, modality: str) -> torch.Tensor:
    """Fetch ``batch[key]`` as a tensor or raise a clear error naming the modality and key."""
    if not isinstance(batch, dict) or key not in batch:
        have = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise KeyError(f"{modality} batch must contain {key!r}; got {have}")
    value = batch[key]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{modality} batch field {key!r} must be a torch.Tensor, got {type(value).__name__}")
    return value


def init_rel_table(rows: int, heads: int) -> nn.Parameter:
    """A zero-initialised relative-position bias table ``(rows, heads)``."""
    return nn.Parameter(torch.zeros(rows, heads))
