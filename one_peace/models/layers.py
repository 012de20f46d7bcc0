"""The shared ONE-PEACE layer: shared attention with sub-LN, per-modality GeGLU FFNs, layer scale."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from one_peace.models.attention import FlexBias, attention, compute_dtype

Segments = Sequence[tuple[str, int]]


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability ``p`` in training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale kept samples by ``1/(1-p)`` and zero dropped ones (identity in eval)."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class GeGLUFFN(nn.Module):
    """GeGLU feed-forward with sub-LN: ``wo(LN(gelu(wi_0 x) * wi_1 x))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(dim, hidden, bias=False)
        self.wi_1 = nn.Linear(dim, hidden, bias=False)
        self.norm = nn.LayerNorm(hidden, eps=1e-5)
        self.wo = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the FFN to ``(..., dim)`` tokens; ``out_scale`` (a layer scale) is folded into ``wo``."""
        return _linear(self.wo, self.norm(F.gelu(self.wi_0(x)) * self.wi_1(x)), out_scale)


class SharedAttention(nn.Module):
    """Multi-head self-attention shared by all modalities (key without bias, sub-LN before ``out_proj``)."""

    def __init__(self, dim: int, heads: int, backend: str = "sdpa") -> None:
        super().__init__()
        self.heads = heads
        self.backend = backend
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.inner_norm = nn.LayerNorm(dim, eps=1e-5)
        self.out_proj = nn.Linear(dim, dim)

    @property
    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """The query, key and value projections."""
        return self.q_proj, self.k_proj, self.v_proj

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | FlexBias | None, out_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend over ``x (B, S, D)`` with an additive ``bias`` broadcastable to ``(B, H, S, S)`` (or a
        :class:`~one_peace.models.attention.FlexBias`); ``out_scale`` (a layer scale) is folded into ``out_proj``."""
        q, k, v = (rearrange(proj(x), "b s (h d) -> b h s d", h=self.heads) for proj in self.projections)
        out = attention(q, k, v, bias, backend=self.backend)
        return _linear(self.out_proj, self.inner_norm(rearrange(out, "b h s d -> b s (h d)")), out_scale)


def _linear(layer: nn.Linear, x: torch.Tensor, out_scale: torch.Tensor | None) -> torch.Tensor:
    """``layer(x) * out_scale`` as one matmul: the scale folded into the weight rows and the bias (``D x D`` work
    instead of a pass over every token's output), except when the matmul runs in float16: a layer scale of 1e-6
    times weights of ~1e-2 falls below float16's smallest subnormal (6e-8), so folding lost most of the branch
    (relative error 0.81 at the default scale); then the scale multiplies the output instead."""
    if out_scale is None:
        return layer(x)  # type: ignore[no-any-return]
    if compute_dtype(x) == torch.float16:
        return layer(x) * out_scale  # type: ignore[no-any-return]
    bias = None if layer.bias is None else layer.bias * out_scale
    return F.linear(x, layer.weight * out_scale[:, None], bias)


def route_ffn(
    ffns: nn.ModuleDict,
    x: torch.Tensor,
    segments: Segments | None = None,
    modality_ids: torch.Tensor | None = None,
    id_to_group: Sequence[str] | None = None,
    out_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Send each token through exactly its modality's FFN (its output times ``out_scale``, a layer scale, if given).

    Args:
        ffns: FFN per group name.
        x: ``(B, S, D)`` normalised tokens.
        segments: Contiguous blocks ``[(group, length), ...]`` covering ``S`` (fused sequences).
        modality_ids: ``(B, S)`` per-token index into ``id_to_group`` (packed/mixed sequences); used when
            ``segments`` is ``None``.
        id_to_group: Group name of each modality id.
    """
    if segments is not None:
        outs = []
        start = 0
        for group, length in segments:
            outs.append(_ffn(ffns[group], x[:, start : start + length], out_scale))
            start += length
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    if modality_ids is None or id_to_group is None:
        raise ValueError("route_ffn needs either segments or modality_ids with id_to_group")
    flat = x.reshape(-1, x.shape[-1])
    ids = modality_ids.reshape(-1)
    out = torch.zeros_like(flat)
    for idx, group in enumerate(id_to_group):
        sel = (ids == idx).nonzero(as_tuple=True)[0]
        if sel.numel():
            out.index_copy_(0, sel, _ffn(ffns[group], flat.index_select(0, sel), out_scale))
    return out.view_as(x)


def _ffn(ffn: nn.Module, x: torch.Tensor, out_scale: torch.Tensor | None) -> torch.Tensor:
    """``ffn(x) * out_scale``; folded into the output projection for GeGLU FFNs (plugins' own FFNs: multiplied)."""
    if isinstance(ffn, GeGLUFFN):
        return ffn(x, out_scale)
    out = ffn(x)
    return out if out_scale is None else out * out_scale


class SharedLayer(nn.Module):
    """One ONE-PEACE layer: pre-LN shared attention and pre-LN routed FFN, each with layer scale and drop path."""

    def __init__(
        self,
        dim: int,
        heads: int,
        ffns: dict[str, nn.Module],
        layer_scale_init: float = 1e-6,
        drop_path: float = 0.0,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=1e-5)
        self.attn = SharedAttention(dim, heads, backend)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-5)
        self.ffns = nn.ModuleDict(ffns)
        if layer_scale_init > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        else:
            self.register_parameter("gamma_1", None)
            self.register_parameter("gamma_2", None)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | FlexBias | None, **route: Any) -> torch.Tensor:
        """Apply the layer; ``route`` is passed to :func:`route_ffn` (segments or modality ids)."""
        a = self.attn(self.attn_norm(x), bias, out_scale=_arg(self.gamma_1))  # layer scales folded into projections
        x = x + self.drop_path(a)
        f = route_ffn(self.ffns, self.ffn_norm(x), **route, out_scale=_arg(self.gamma_2))
        return x + self.drop_path(f)


def _arg(p: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter handed to a submodule's call: detached when no gradient is recorded (module hooks such as the
    flop counter's treat a parameter argument as needing a gradient, which inference mode cannot give)."""
    return p if p is None or torch.is_grad_enabled() else p.detach()
