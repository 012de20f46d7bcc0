"""Attention kernels: PyTorch SDPA everywhere, xformers as an optional CUDA backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, backend: str = "sdpa"
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v`` for ``(B, H, S, d)`` inputs.

    ``bias`` is additive (relative positions, ``-inf`` on masked keys) and broadcastable to
    ``(B, H, S, S)``. ``backend="xformers"`` uses ``xformers.ops.memory_efficient_attention`` for CUDA
    tensors (imported lazily; it has no CPU kernels) and falls back to SDPA elsewhere.
    """
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    if backend == "xformers" and q.is_cuda:
        return _xformers_attention(q, k, v, bias)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    try:
        import xformers.ops as xops
    except ImportError as exc:  # pragma: no cover - GPU only
        raise ImportError(
            "attn_backend='xformers' needs the optional dependency: pip install 'one-peace[gpu]'"
        ) from exc
    b, h, s, _ = q.shape
    attn_bias = None
    if bias is not None:
        # xformers wants a bias whose last dim is 8-aligned in memory: allocate padded, then slice.
        pad = (s + 7) // 8 * 8
        full = torch.zeros(b, h, s, pad, dtype=q.dtype, device=q.device)
        full[..., :s] = bias.expand(b, h, s, s)
        attn_bias = full[..., :s]
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=attn_bias
    )  # pragma: no cover - GPU only
    return out.transpose(1, 2)
