"""OFA-style text decoder with cross-attention over the (fused) encoder output, and generation.

Generation (greedy, length-normalised beam search, closed-set constraints through a token trie) decodes the whole
batch at once: one decoder step per output position for all samples and beams together, a self-attention key/value
cache per layer (reordered as beams move), and the cross-attention keys/values of the encoder memory computed once
per sample (the beams of a sample are its query rows against them: no per-beam copy). Finished samples leave the
batch. ``generate_reference`` keeps the simple per-sample loop that recomputes the whole prefix at every step; it
is the oracle the cached path is tested against (same tokens) and the "before" of ``benchmarks/generate.py``.
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

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values ``(B, H, S, d/H)`` of ``memory``, computed once per generation."""
        k, v = self.cross_kv(memory).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def step(
        self,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        cross: tuple[torch.Tensor, torch.Tensor],
        memory_bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One new position ``x (B*beams, 1, d)`` against the cached keys/values; returns it and the grown cache.

        Rows are ordered sample-major (``beams`` rows per sample); ``cross`` holds one row per sample.
        """
        n, _, d = x.shape
        q, k, v = self.self_qkv(self.self_norm(x)).chunk(3, dim=-1)
        k, v = self._split(k), self._split(v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        a = F.scaled_dot_product_attention(self._split(q), k, v)
        x = x + self.self_out(a.transpose(1, 2).reshape(n, 1, d))
        mem_k, mem_v = cross
        b = mem_k.shape[0]
        q = self.cross_q(self.cross_norm(x)).view(b, n // b, self.heads, d // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, mem_k, mem_v, attn_mask=memory_bias)  # (B, H, beams, d/H)
        x = x + self.cross_out(a.transpose(1, 2).reshape(n, 1, d))
        return x + self.ffn(self.ffn_norm(x)), (k, v)


def _memory_bias(memory_pad: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive ``(B, 1, 1, S)`` bias hiding padded memory positions (``None`` without padding)."""
    if memory_pad is None:
        return None
    bias = torch.zeros(memory_pad.shape, dtype=dtype, device=memory_pad.device)
    return bias.masked_fill(memory_pad, float("-inf"))[:, None, None, :]


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
        bias = _memory_bias(memory_pad, x.dtype)
        for layer in self.layers:
            x = layer(x, memory, bias)
        return self.norm(x) @ self.embed.weight.T

    def start(self, memory: torch.Tensor, memory_pad: torch.Tensor | None = None) -> DecoderCache:
        """A generation cache over ``memory (B, S, encoder_dim)``: cross-attention K/V once per sample, no past."""
        return DecoderCache(
            past=[None] * len(self.layers),
            cross=[layer.memory_kv(memory) for layer in self.layers],  # type: ignore[operator]
            memory_bias=_memory_bias(memory_pad, memory.dtype),
        )

    def step(self, tokens: torch.Tensor, position: int, cache: DecoderCache) -> torch.Tensor:
        """Logits ``(B*beams, V)`` for the tokens ``(B*beams,)`` at ``position``; grows ``cache`` in place."""
        if position >= self.config.max_positions:
            raise ValueError(f"target of {position + 1} tokens exceeds max_positions {self.config.max_positions}")
        x = (self.embed(tokens) + self.positions[position])[:, None]
        for i, layer in enumerate(self.layers):
            x, cache.past[i] = layer.step(x, cache.past[i], cache.cross[i], cache.memory_bias)  # type: ignore[operator]
        return (self.norm(x) @ self.embed.weight.T)[:, 0]


@dataclass
class DecoderCache:
    """Per-layer state of a batched generation.

    Attributes:
        past: Self-attention keys and values ``(B*beams, H, t, d/H)`` of the positions decoded so far.
        cross: Cross-attention keys and values ``(B, H, S, d/H)`` of the memory, one row per sample.
        memory_bias: ``(B, 1, 1, S)`` padding bias of the memory (or ``None``).
    """

    past: list[tuple[torch.Tensor, torch.Tensor] | None]
    cross: list[tuple[torch.Tensor, torch.Tensor]]
    memory_bias: torch.Tensor | None

    def select(self, rows: torch.Tensor, samples: torch.Tensor | None) -> None:
        """Keep the beam ``rows`` (into the self-attention cache) and, when given, the ``samples`` still decoding."""
        self.past = [None if p is None else (p[0][rows], p[1][rows]) for p in self.past]
        if samples is not None:
            self.cross = [(k[samples], v[samples]) for k, v in self.cross]
            if self.memory_bias is not None:
                self.memory_bias = self.memory_bias[samples]


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
    """Decode every row of ``memory``; ``beam=1`` is greedy. Returns token ids without BOS, ending at EOS
    (:func:`generate_scored` without the scores)."""
    return [tokens for tokens, _ in generate_scored(decoder, memory, memory_pad, beam, max_len, trie, length_penalty)]


@torch.no_grad()
def generate_scored(
    decoder: TextDecoder,
    memory: torch.Tensor,
    memory_pad: torch.Tensor | None = None,
    beam: int = 1,
    max_len: int = 30,
    trie: Trie | None = None,
    length_penalty: float = 1.0,
) -> list[tuple[list[int], float]]:
    """Decode every row of ``memory``: ``(token ids without BOS ending at EOS, score)`` per row, the score being the
    sequence's log-probability divided by ``len ** length_penalty``.

    Batched with a KV cache (module docstring); the tokens equal ``generate_reference``'s. Each step keeps, per
    sample, the best ``beam`` non-EOS continuations among its top ``2 * beam``; a continuation ending in EOS is
    finished with its score divided by ``len ** length_penalty``; a sample stops once it holds ``beam`` finished
    sequences or has no live continuation, and returns its best finished one.
    """
    samples, device = memory.shape[0], memory.device
    cache = decoder.start(memory, memory_pad)
    vocab = decoder.config.vocab_size
    # live beams per sample: (tokens, score, trie node); a sample's rows are padded to ``beam`` with -inf rows
    live: list[list[tuple[list[int], float, dict | None]]] = [
        [([], 0.0, trie.root if trie is not None else None)] for _ in range(samples)
    ]
    finished: list[list[tuple[list[int], float]]] = [[] for _ in range(samples)]
    active = list(range(samples))  # samples still decoding, in cache order
    tokens = torch.full((samples * beam,), BOS, dtype=torch.long, device=device)
    for position in range(max_len):
        logp = F.log_softmax(decoder.step(tokens, position, cache).float(), dim=-1).view(len(active), beam, vocab)
        beam_scores = [[score for _, score, _ in live[s]] + [float("-inf")] * (beam - len(live[s])) for s in active]
        scores = torch.tensor(beam_scores, device=device)[:, :, None] + logp  # padding rows: -inf
        if trie is not None:
            scores = scores + _trie_mask(live, active, beam, vocab, device)
        top = scores.view(len(active), -1).topk(min(2 * beam, beam * vocab))
        values, indices = top.values.tolist(), top.indices.tolist()
        rows: list[int] = []
        next_tokens: list[int] = []
        still: list[int] = []
        for a, s in enumerate(active):
            candidates = []
            for score, idx in zip(values[a], indices[a]):
                if score == float("-inf"):
                    continue
                b, tok = divmod(idx, vocab)
                seq, _, node = live[s][b]
                if tok == EOS:
                    finished[s].append(([*seq, tok], score / ((len(seq) + 1) ** length_penalty)))
                else:
                    child = None if node is None else node.get(tok, {})
                    candidates.append(([*seq, tok], score, child, a * beam + b))
                if len(candidates) == beam:
                    break
            if len(finished[s]) >= beam or not candidates:
                continue
            live[s] = [(seq, score, node) for seq, score, node, _ in candidates]
            still.append(a)
            pad = beam - len(candidates)
            rows += [row for *_, row in candidates] + [candidates[0][3]] * pad
            next_tokens += [seq[-1] for seq, *_ in candidates] + [candidates[0][0][-1]] * pad
        if not still:
            break
        cache.select(
            torch.tensor(rows, device=device),
            None if len(still) == len(active) else torch.tensor(still, device=device),
        )
        tokens = torch.tensor(next_tokens, device=device)
        active = [active[a] for a in still]
    results = []
    for s in range(samples):
        if not finished[s]:
            finished[s] = [([*seq, EOS], score / ((len(seq) + 1) ** length_penalty)) for seq, score, _ in live[s]]
        results.append(max(finished[s], key=lambda t: t[1]))
    return results


def _trie_mask(
    live: list[list[tuple[list[int], float, dict | None]]],
    active: list[int],
    beam: int,
    vocab: int,
    device: torch.device,
) -> torch.Tensor:
    """``(A, beam, V)`` additive mask: 0 where the trie lets a live beam continue (EOS where it allows nothing)."""
    mask = torch.full((len(active), beam, vocab), float("-inf"))
    a_idx: list[int] = []
    b_idx: list[int] = []
    t_idx: list[int] = []
    for a, s in enumerate(active):
        for b, (_, _, node) in enumerate(live[s]):
            allowed = list(node) if node else [EOS]
            a_idx += [a] * len(allowed)
            b_idx += [b] * len(allowed)
            t_idx += allowed
    mask[a_idx, b_idx, t_idx] = 0.0
    return mask.to(device)


def _constrain(logp: torch.Tensor, prefixes: list[list[int]], trie: Trie | None) -> torch.Tensor:
    if trie is None:
        return logp
    mask = torch.full_like(logp, float("-inf"))
    for i, p in enumerate(prefixes):
        ok = trie.allowed(p)
        mask[i, ok if ok else [EOS]] = 0.0
    return logp + mask


@torch.no_grad()
def generate_reference(
    decoder: TextDecoder,
    memory: torch.Tensor,
    memory_pad: torch.Tensor | None = None,
    beam: int = 1,
    max_len: int = 30,
    trie: Trie | None = None,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """``generate`` one sample at a time, recomputing the whole prefix every step (the oracle; slow)."""
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
