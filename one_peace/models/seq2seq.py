"""OFA-style text decoder with cross-attention over the (fused) encoder output, and generation.

Generation recomputes the prefix at every step (no KV cache): simple and exact; fine for captions and short
answers. Greedy, beam search (length-normalised) and closed-set constraints through a token trie are offered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from one_peace.models.layers import GeGLUFFN

BOS, PAD, EOS = 0, 1, 2


@dataclass(kw_only=True)
class Seq2SeqConfig:
    """Text decoder sizes.

    Attributes:
        vocab_size: Output vocabulary (text ids, plus location bins for BOX targets).
        encoder_dim: Width of the encoder states attended to.
        embed_dim: Decoder width.
        layers: Decoder layers.
        heads: Attention heads.
        ffn_dim: GeGLU inner width.
        max_positions: Longest target (with BOS).
    """

    vocab_size: int
    encoder_dim: int
    embed_dim: int = 256
    layers: int = 2
    heads: int = 4
    ffn_dim: int = 512
    max_positions: int = 128


class DecoderLayer(nn.Module):
    """Pre-LN causal self-attention, cross-attention over encoder states, GeGLU FFN."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, encoder_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.self_norm = nn.LayerNorm(dim)
        self.self_qkv = nn.Linear(dim, 3 * dim)
        self.self_out = nn.Linear(dim, dim)
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_q = nn.Linear(dim, dim)
        self.cross_kv = nn.Linear(encoder_dim, 2 * dim)
        self.cross_out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = GeGLUFFN(dim, ffn_dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        return x.view(b, s, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_bias: torch.Tensor | None) -> torch.Tensor:
        """``x (B, L, d)`` attends causally to itself and to ``memory (B, S, encoder_dim)``."""
        b, length, d = x.shape
        q, k, v = self.self_qkv(self.self_norm(x)).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v), is_causal=True)
        x = x + self.self_out(a.transpose(1, 2).reshape(b, length, d))
        q = self._split(self.cross_q(self.cross_norm(x)))
        k, v = (self._split(t) for t in self.cross_kv(memory).chunk(2, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=memory_bias)
        x = x + self.cross_out(a.transpose(1, 2).reshape(b, length, d))
        return x + self.ffn(self.ffn_norm(x))


class TextDecoder(nn.Module):
    """Autoregressive text decoder over encoder states; output projection tied to the token embedding."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=PAD)
        nn.init.normal_(self.embed.weight, std=config.embed_dim**-0.5)
        self.positions = nn.Parameter(torch.randn(config.max_positions, config.embed_dim) * 0.02)
        self.layers = nn.ModuleList(
            DecoderLayer(config.embed_dim, config.heads, config.ffn_dim, config.encoder_dim)
            for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(config.embed_dim)

    def forward(self, prev: torch.Tensor, memory: torch.Tensor, memory_pad: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, L, V)`` for decoder inputs ``prev (B, L)`` (BOS-shifted targets)."""
        if prev.shape[1] > self.config.max_positions:
            raise ValueError(f"target of {prev.shape[1]} tokens exceeds max_positions {self.config.max_positions}")
        x = self.embed(prev) + self.positions[: prev.shape[1]]
        bias = None
        if memory_pad is not None and bool(memory_pad.any()):
            bias = torch.zeros(memory_pad.shape, dtype=x.dtype, device=x.device).masked_fill(memory_pad, float("-inf"))
            bias = bias[:, None, None, :]
        for layer in self.layers:
            x = layer(x, memory, bias)
        return self.norm(x) @ self.embed.weight.T


def shift_right(target: torch.Tensor) -> torch.Tensor:
    """Decoder inputs: BOS followed by the target without its last token (targets end with EOS)."""
    return torch.cat([torch.full_like(target[:, :1], BOS), target[:, :-1]], dim=1)


def seq2seq_loss(
    logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.1, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Label-smoothed cross-entropy over non-pad target tokens (``weight`` 0 excludes positions, e.g. ``no_loss``)."""
    mask = target.ne(PAD) if weight is None else target.ne(PAD) & weight.bool()
    return F.cross_entropy(logits[mask], target[mask], label_smoothing=label_smoothing)


class Trie:
    """Closed set of allowed token sequences (each ending with EOS) for constrained decoding."""

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        self.root: dict[int, dict] = {}
        for seq in sequences:
            node = self.root
            for tok in list(seq):
                node = node.setdefault(int(tok), {})

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that may follow ``prefix`` (empty when the prefix left the set)."""
        node = self.root
        for tok in prefix:
            if tok not in node:
                return []
            node = node[tok]
        return list(node)


def _constrain(logp: torch.Tensor, prefixes: list[list[int]], trie: Trie | None) -> torch.Tensor:
    if trie is None:
        return logp
    mask = torch.full_like(logp, float("-inf"))
    for i, p in enumerate(prefixes):
        ok = trie.allowed(p)
        mask[i, ok if ok else [EOS]] = 0.0
    return logp + mask


@torch.no_grad()
def generate(
    decoder: TextDecoder,
    memory: torch.Tensor,
    memory_pad: torch.Tensor | None = None,
    beam: int = 1,
    max_len: int = 30,
    trie: Trie | None = None,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Decode every row of ``memory``; ``beam=1`` is greedy. Returns token ids without BOS, ending at EOS."""
    results = []
    for i in range(memory.shape[0]):
        mem = memory[i : i + 1]
        pad = memory_pad[i : i + 1] if memory_pad is not None else None
        results.append(_beam_one(decoder, mem, pad, beam, max_len, trie, length_penalty))
    return results


def _beam_one(
    decoder: TextDecoder,
    mem: torch.Tensor,
    pad: torch.Tensor | None,
    beam: int,
    max_len: int,
    trie: Trie | None,
    length_penalty: float,
) -> list[int]:
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[list[int], float]] = []
    for _ in range(max_len):
        prev = torch.tensor([[BOS, *b] for b, _ in beams], device=mem.device)
        logits = decoder(prev, mem.expand(len(beams), -1, -1), None if pad is None else pad.expand(len(beams), -1))
        logp = _constrain(F.log_softmax(logits[:, -1].float(), dim=-1), [b for b, _ in beams], trie)
        scores = torch.tensor([s for _, s in beams], device=mem.device)[:, None] + logp
        top = scores.flatten().topk(min(beam * 2, scores.numel()))
        candidates = []
        for score, idx in zip(top.values.tolist(), top.indices.tolist()):
            if score == float("-inf"):
                continue
            b, tok = divmod(idx, logp.shape[1])
            seq = [*beams[b][0], tok]
            if tok == EOS:
                finished.append((seq, score / (len(seq) ** length_penalty)))
            else:
                candidates.append((seq, score))
            if len(candidates) == beam:
                break
        if len(finished) >= beam or not candidates:
            break
        beams = candidates
    if not finished:
        finished = [([*b, EOS], s / ((len(b) + 1) ** length_penalty)) for b, s in beams]
    return max(finished, key=lambda t: t[1])[0]
