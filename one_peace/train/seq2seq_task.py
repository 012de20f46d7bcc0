"""Instruction-driven seq2seq task: encoder over the instruction's source side, text decoder for the target."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from one_peace.models.encoder import OnePeaceModel
from one_peace.models.seq2seq import EOS as EOS_ID
from one_peace.models.seq2seq import PAD as PAD_ID
from one_peace.models.seq2seq import (
    Seq2SeqConfig,
    TextDecoder,
    Trie,
    generate_scored,
    seq2seq_loss,
    shift_right,
)
from one_peace.tokenizer import LANGUAGE
from one_peace.train.instructions import NUM_BINS, Instruction
from one_peace.train.objectives import Logs


class Seq2SeqTask(nn.Module):
    """Fused encoder (instruction source: media + text prompt) and an autoregressive text decoder.

    Location tokens (BOX) are ids ``text_vocab + bin`` in the decoder vocabulary.

    Args:
        model: The encoder (with a text modality for the prompt).
        tokenizer: Text tokenizer (prompt and targets).
        instruction: The instruction (all its templates must use the same source modalities).
        decoder: Decoder sizes (vocabulary and encoder width are filled in).
        label_smoothing: Of the cross-entropy.
        seed: Seed of the template sampling.
    """

    def __init__(
        self,
        model: OnePeaceModel,
        tokenizer: Any,
        instruction: Instruction,
        decoder: Mapping[str, Any],
        label_smoothing: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        ids = {k: getattr(tokenizer, k, v) for k, v in (("pad_id", PAD_ID), ("eos_id", EOS_ID))}
        if ids != {"pad_id": PAD_ID, "eos_id": EOS_ID}:
            raise ValueError(f"the seq2seq decoder needs pad id {PAD_ID} and EOS id {EOS_ID}; the tokenizer has {ids}")
        self.instruction = instruction
        mods = {tuple(s.kind for s in t.source_slots if s.kind not in (LANGUAGE, "box")) for t in instruction.templates}
        if len(mods) != 1:
            raise ValueError(f"all templates of an instruction must feed the same modalities, got {sorted(mods)}")
        self.modalities = next(iter(mods))
        self.uses_box = any(s.kind == "box" for t in instruction.templates for s in (*t.source_slots, *t.target_slots))
        self.text_vocab = tokenizer.vocab_size
        vocab = self.text_vocab + (NUM_BINS if self.uses_box else 0)
        self.decoder = TextDecoder(Seq2SeqConfig(vocab_size=vocab, encoder_dim=model.config.embed_dim, **decoder))
        self.label_smoothing = label_smoothing
        self.rng = random.Random(seed)
        self.mask_generator = torch.Generator().manual_seed(seed)

    def _ids(self, pieces: list[Any], eos: bool = True) -> list[int]:
        text = " ".join(p.strip() for p in pieces if isinstance(p, str) and p.strip())
        ids = self.tokenizer.encode(text)[:-1] if text else []
        for p in pieces:
            if isinstance(p, list):
                ids += [self.text_vocab + b for b in p]
        return [*ids, EOS_ID] if eos else ids

    def _encode_batch(
        self, batch: Mapping[str, Any], rendered: list[dict[str, Any]]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = next(self.model.parameters()).device
        prompts = [torch.tensor(self._ids(r["prompt"]), device=device) for r in rendered]
        inputs = {m: batch[m] for m in self.modalities}
        inputs[LANGUAGE] = {"tokens": nn.utils.rnn.pad_sequence(prompts, batch_first=True, padding_value=PAD_ID)}
        keep = self._mask_ratio_keep_ids(inputs, rendered) if self.training else {}
        out = self.model.forward_features(inputs, keep_ids=keep)
        memory = torch.cat([out.hidden[m] for m in inputs], dim=1)
        pads: list[torch.Tensor] = []
        for m in inputs:
            mask = out.padding_mask[m]
            shape = out.hidden[m].shape[:2]
            pads.append(mask if mask is not None else torch.zeros(shape, dtype=torch.bool, device=memory.device))
        return memory, torch.cat(pads, dim=1)

    def _mask_ratio_keep_ids(
        self, inputs: Mapping[str, Any], rendered: list[dict[str, Any]]
    ) -> dict[str, torch.Tensor]:
        """``mask_ratio`` slot attributes: drop that fraction of a source modality's tokens (training only)."""
        from one_peace.train.masking import keep_ids_from_mask, random_mask

        keep: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            ratios = [r["mask_ratio"].get(m, 0.0) for r in rendered]
            if not any(ratios):
                continue
            full = self.model.adapters[m](inputs[m])
            valid = (
                ~full.padding_mask
                if full.padding_mask is not None
                else torch.ones(full.tokens.shape[:2], dtype=torch.bool, device=full.tokens.device)
            )
            masked = torch.cat(
                [random_mask(valid[i : i + 1], ratio, self.mask_generator) for i, ratio in enumerate(ratios)]
            )
            keep[m] = keep_ids_from_mask(masked, valid)
        return keep

    def _render(self, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        raw = batch["raw"]
        n = len(next(iter(raw.values())))
        return [self.instruction.render({k: v[i] for k, v in raw.items()}, self.rng) for i in range(n)]

    def forward(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, Logs]:
        """Label-smoothed cross-entropy of the targets (``no_loss`` pieces and masked samples excluded)."""
        rendered = self._render(batch)
        memory, pad = self._encode_batch(batch, rendered)
        targets, weights = [], []
        for r, ok in zip(rendered, batch["valid"].tolist()):
            ids: list[int] = []
            w: list[int] = []
            for value, scored in r["target"]:
                piece = self._ids([value], eos=False)
                ids += piece
                w += [int(scored and ok)] * len(piece)
            targets.append(torch.tensor([*ids, EOS_ID], device=memory.device))
            weights.append(torch.tensor([*w, int(ok)], device=memory.device))
        target = nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=PAD_ID)
        weight = nn.utils.rnn.pad_sequence(weights, batch_first=True, padding_value=0)
        logits = self.decoder(shift_right(target), memory, pad)
        loss = seq2seq_loss(logits, target, self.label_smoothing, weight)
        with torch.no_grad():
            m = target.ne(PAD_ID) & weight.bool()
            acc = (logits.argmax(-1)[m] == target[m]).float().mean()
        value = loss.detach()
        return loss, {"loss": value, "seq2seq/loss": value, "seq2seq/token_acc": acc}

    @torch.no_grad()
    def generate_boxes(self, batch: Mapping[str, Any], beam: int = 1) -> list[tuple[list[float] | None, list[float]]]:
        """For BOX targets: ``(predicted box or None, reference box)`` in pixels per sample."""
        from one_peace.train.instructions import dequantize_box

        rendered = self._render(batch)
        out = self.generate_rendered(batch, rendered, beam=beam, max_len=6)
        raw = batch["raw"]
        results = []
        for i, (ids, _) in enumerate(out):
            size = (int(raw["width"][i]), int(raw["height"][i]))
            ref = next(v for v, _ in rendered[i]["target"] if isinstance(v, list))
            results.append((self.decode_box(ids, size), dequantize_box(ref, size)))
        return results

    @torch.no_grad()
    def generate(
        self, batch: Mapping[str, Any], beam: int = 1, max_len: int = 30, closed_set: list[str] | None = None
    ) -> list[str]:
        """Generated target text per sample (closed-set constrained when ``closed_set`` is given)."""
        trie = self.trie(closed_set) if closed_set else None
        out = self.generate_rendered(batch, self._render(batch), beam=beam, max_len=max_len, trie=trie)
        return [self.decode_text(ids) for ids, _ in out]

    @torch.no_grad()
    def generate_rendered(
        self,
        batch: Mapping[str, Any],
        rendered: list[dict[str, Any]],
        beam: int = 1,
        max_len: int = 30,
        trie: Trie | None = None,
    ) -> list[tuple[list[int], float]]:
        """``(token ids, score)`` per sample for prompts already rendered (``prompt`` and ``mask_ratio`` of
        :meth:`~one_peace.train.instructions.Instruction.render_source`): what :mod:`one_peace.generation` runs."""
        memory, pad = self._encode_batch(batch, rendered)
        return generate_scored(self.decoder, memory, pad, beam=beam, max_len=max_len, trie=trie)

    def trie(self, values: list[str]) -> Trie:
        """The closed set ``values`` as a token trie (each value as the decoder would write it, ending with EOS)."""
        return Trie([self._ids([v]) for v in values])

    def decode_text(self, ids: list[int]) -> str:
        """The text of generated ``ids`` (location tokens and EOS left out)."""
        return str(self.tokenizer.decode([i for i in ids if i < self.text_vocab]))

    def decode_box(self, ids: list[int], size: tuple[int, int]) -> list[float] | None:
        """The first four location tokens of ``ids`` as ``[x0, y0, x1, y1]`` in pixels of an image of ``size``
        (``None`` when fewer than four were generated)."""
        from one_peace.train.instructions import dequantize_box

        bins = [t - self.text_vocab for t in ids if t >= self.text_vocab][:4]
        return dequantize_box(bins, size) if len(bins) == 4 else None
