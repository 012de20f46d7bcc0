"""Attention kernels: PyTorch SDPA everywhere, FlexAttention, xformers as an optional CUDA backend.

``sdpa`` and ``xformers`` take the attention bias as a dense additive tensor broadcastable to ``(B, H, S, S)``
(relative positions, ``-inf`` on padded keys, built once per forward). ``flex`` takes a :class:`FlexBias` instead:
the stacked relative-bias tables ``(R, H)``, a ``(1|B, S, S)`` integer index into them, and the padding or
packing structure as a ``BlockMask``, so no ``(B, H, S, S)`` float tensor exists; the bias is added inside the
kernel by a ``score_mod``. FlexAttention is fast when compiled (``torch.compile`` of the model, on a GPU); eager it
runs PyTorch's reference implementation, and compiled on a CPU it is slow to start, so SDPA stays the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flex", "xformers", "math")
#: Device types autocast knows (``torch.is_autocast_enabled`` raises for others, e.g. ``meta``).
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "hpu", "mps", "xla", "mtia")


@dataclass
class FlexBias:
    """The attention bias of one forward in FlexAttention's terms (see the module docstring).

    Attributes:
        table: ``(R, H)`` relative-bias rows of every block, stacked (a row of zeros for pairs across blocks).
        index: ``(1|B, S, S)`` integer row of ``table`` for each (query, key) pair.
        key_padding: ``(B, S)`` True on padded keys (never attended), or ``None``.
        segments: ``(B, S)`` packing: a token attends only to tokens of its own segment, or ``None``.
    """

    table: torch.Tensor
    index: torch.Tensor
    key_padding: torch.Tensor | None = None
    segments: torch.Tensor | None = None
    _block_mask: Any = field(default=None, repr=False)

    def block_mask(self, batch: int, length: int, device: torch.device) -> Any:
        """The ``BlockMask`` of padding and packing (``None`` without either), built once per forward."""
        if self.key_padding is None and self.segments is None:
            return None
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            pad, seg = self.key_padding, self.segments

            def mask_mod(b: Any, h: Any, q: Any, k: Any) -> Any:
                keep = torch.ones_like(q, dtype=torch.bool) if pad is None else ~pad[b, k]
                return keep if seg is None else keep & (seg[b, q] == seg[b, k])

            self._block_mask = create_block_mask(mask_mod, batch, None, length, length, device=device)
        return self._block_mask


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in for activations ``x``: autocast's when autocast is on for its device, else ``x``'s.

    Biases are built once per forward in this dtype, so autocast does not recast them in every layer.
    """
    device = x.device.type
    if device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device):  # a constant test: compiles, meta-safe
        return torch.get_autocast_dtype(device)
    return x.dtype


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | FlexBias | None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v`` for ``(B, H, S, d)`` inputs.

    ``bias`` is additive (relative positions, ``-inf`` on masked keys) and broadcastable to
    ``(B, H, S, S)``, or a :class:`FlexBias` (then FlexAttention runs, whatever ``backend`` says).
    ``backend="xformers"`` uses ``xformers.ops.memory_efficient_attention`` for CUDA tensors (imported lazily; it
    has no CPU kernels) and falls back to SDPA elsewhere. ``backend="math"`` spells the formula out in matmuls and a
    softmax: the form :mod:`one_peace.export` traces (SDPA's decomposition for ONNX breaks a later ``view``).
    """
    if isinstance(bias, FlexBias):
        return _flex_attention(q, k, v, bias)
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    if backend == "xformers" and q.is_cuda:
        return _xformers_attention(q, k, v, bias)
    if backend == "math":  # plain matmuls and softmax: what exported graphs hold (ONNX Runtime fuses them again)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        return torch.matmul(torch.softmax(scores + bias if bias is not None else scores, dim=-1), v)
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


def _flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: FlexBias) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    table = bias.table.to(q.dtype)
    index = bias.index
    if index.shape[0] == 1:
        shared = index[0]

        def score_mod(score: Any, b: Any, h: Any, qi: Any, ki: Any) -> Any:
            return score + table[shared[qi, ki], h]
    else:

        def score_mod(score: Any, b: Any, h: Any, qi: Any, ki: Any) -> Any:
            return score + table[index[b, qi, ki], h]

    block_mask = bias.block_mask(q.shape[0], q.shape[2], q.device)
    out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    return out  # type: ignore[return-value]
