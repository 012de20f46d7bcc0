"""ONE-PEACE's pretraining (denoising) decoder: fills mask tokens back in around the student's visible tokens.

Semantics (parity README §5): each modality's student output (visible tokens, after the encoder's final LN)
is projected to the decoder width (``embed``) and written into a full-length sequence that is otherwise the
modality's ``mask_token``, at the kept positions; learned absolute positions are added; a small stack of the
same shared layers (no layer scale, no relative bias) runs over the fused sequence; per-modality final LN and
a ``head`` back to the encoder width give one prediction per position. Officially padded keys are not masked
in the decoder (``official_padding=True`` reproduces that; by default they are masked).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from one_peace.config import OFFICIAL_MODALITIES
from one_peace.models.adapter import padding_or_none
from one_peace.models.attention import compute_dtype
from one_peace.models.layers import GeGLUFFN, SharedLayer
from one_peace.registry import get_plugin


@dataclass(kw_only=True)
class DecoderConfig:
    """Decoder hyper-parameters (official 4B setting: 768 wide, 2 layers, 12 heads, GeGLU 2048).

    Attributes:
        encoder_dim: Width of the encoder whose tokens are decoded.
        embed_dim: Decoder width.
        layers: Decoder layers.
        heads: Attention heads.
        ffn_dim: GeGLU inner width.
        modalities: Modalities with a decoder branch (default: the official model's).
        positions: Absolute position rows per modality; a modality not given gets its plugin's
            ``decoder_positions()`` (official: text 514, image 257 = 16x16+1, audio 1026).
    """

    encoder_dim: int
    embed_dim: int = 768
    layers: int = 2
    heads: int = 12
    ffn_dim: int = 2048
    modalities: tuple[str, ...] = OFFICIAL_MODALITIES
    positions: dict[str, int] = field(default_factory=dict)


class DenoiseDecoder(nn.Module):
    """The pretraining decoder (see module docstring)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        for m in config.modalities:
            config.positions.setdefault(m, get_plugin(m).decoder_positions())
        d = config.embed_dim
        self.embed = nn.ModuleDict({m: nn.Linear(config.encoder_dim, d) for m in config.modalities})
        self.mask_tokens = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, d)) for m in config.modalities})
        self.positions = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(config.positions[m], d) * 0.02) for m in config.modalities}
        )
        self.layers = nn.ModuleList(
            SharedLayer(
                d, config.heads, {m: GeGLUFFN(d, config.ffn_dim) for m in config.modalities}, layer_scale_init=0.0
            )
            for _ in range(config.layers)
        )
        self.final_norms = nn.ModuleDict({m: nn.LayerNorm(d, eps=1e-5) for m in config.modalities})
        self.heads = nn.ModuleDict({m: nn.Linear(d, config.encoder_dim) for m in config.modalities})
        self.official_padding = False

    def _positions(self, modality: str, length: int) -> torch.Tensor:
        return get_plugin(modality).decoder_position_embed(self.positions[modality], length)

    def forward(
        self,
        student: Mapping[str, torch.Tensor],
        keep_ids: Mapping[str, torch.Tensor],
        full_padding: Mapping[str, torch.Tensor | None],
        full_lengths: Mapping[str, int],
        order: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Predict every position of every modality.

        Args:
            student: Modality -> ``(B, K, encoder_dim)`` student outputs (visible tokens, after the final LN).
            keep_ids: Modality -> ``(B, K)`` kept positions (CLS = 0; -1 pads a row).
            full_padding: Modality -> ``(B, S)`` padding mask of the full sequence (or ``None``).
            full_lengths: Modality -> full sequence length ``S``.
            order: Fusion order (default: the order of ``student``).

        Returns:
            Modality -> ``(B, S, encoder_dim)`` predictions.
        """
        order = list(order or student)
        seqs, pads = [], []
        for m in order:
            e = self.embed[m](student[m])
            b, _, d = e.shape
            s = full_lengths[m]
            ids = keep_ids[m].long()
            slot = torch.where(ids >= 0, ids, torch.full_like(ids, s))  # -1 entries go to a dropped extra slot
            seq = self.mask_tokens[m].to(e.dtype).expand(b, s + 1, d).clone()
            seq.scatter_(1, slot[:, :, None].expand(b, ids.shape[1], d), e)
            seqs.append(seq[:, :s] + self._positions(m, s).to(e.dtype))
            pad = full_padding.get(m)
            pads.append(pad if pad is not None else torch.zeros(b, s, dtype=torch.bool, device=e.device))
        x = torch.cat(seqs, dim=1)
        pad = torch.cat(pads, dim=1)
        bias = None
        if padding_or_none(pad) is not None:
            x = x * (~pad).unsqueeze(-1).to(x.dtype)
            if not self.official_padding:
                bias = torch.zeros(pad.shape[0], 1, 1, pad.shape[1], dtype=compute_dtype(x), device=x.device)
                bias = bias.masked_fill(pad[:, None, None, :], float("-inf"))
        segments = [(m, full_lengths[m]) for m in order]
        for layer in self.layers:
            x = layer(x, bias, segments=segments)
        out, start = {}, 0
        for m in order:
            s = full_lengths[m]
            out[m] = self.heads[m](self.final_norms[m](x[:, start : start + s]))
            start += s
        return out
