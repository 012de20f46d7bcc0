"""A task = model + weighted objectives (+ the denoising decoder): computes each declared view once per step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from one_peace.models.decoder import DenoiseDecoder
from one_peace.models.encoder import OnePeaceModel
from one_peace.registry import MaskingPolicy, get_plugin
from one_peace.train.masking import (
    complementary_mask,
    keep_ids_from_mask,
    random_mask,
    span_mask,
    whole_word_mask,
)
from one_peace.train.objectives import Objective, View

#: ONE-PEACE's paired-view ratios: 40 % of text from the text-only view's visible tokens; 68.75 % of image.
PAIRED_RATIOS = {"text": 0.4, "image": 0.6875}


@dataclass
class ViewOutput:
    """Outputs of one view: encoder states, and for masked views the decoder predictions and masks."""

    hidden: dict[str, torch.Tensor]
    padding_mask: dict[str, torch.Tensor | None]
    keep_ids: dict[str, torch.Tensor] = field(default_factory=dict)
    masked: dict[str, torch.Tensor] = field(default_factory=dict)
    decoded: dict[str, torch.Tensor] = field(default_factory=dict)


class Task(nn.Module):
    """Weighted objectives over one model; every view any objective declares is computed once per step.

    Args:
        model: The encoder.
        objectives: Name -> ``(objective, weight)``.
        decoder: The denoising decoder (needed by ``denoise`` objectives).
        word_start: ``(vocab,)`` bool table of token ids that begin a word (whole-word text masking);
            without it every token is its own word.
        seed: Seed of the masking generator.
    """

    def __init__(
        self,
        model: OnePeaceModel,
        objectives: Mapping[str, tuple[Objective, float]],
        decoder: DenoiseDecoder | None = None,
        word_start: torch.Tensor | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.objectives = nn.ModuleDict({k: o for k, (o, _) in objectives.items()})
        self.weights = {k: float(w) for k, (_, w) in objectives.items()}
        self.decoder = decoder
        if word_start is None and hasattr(getattr(model, "tokenizer", None), "word_start_table"):
            word_start = model.tokenizer.word_start_table()  # whole-word masking from the model's own tokenizer
        self.word_start = word_start
        self.generator = torch.Generator().manual_seed(seed)

    def views(self) -> dict[str, View]:
        """Every view, once, full views first (masked views need their lengths and targets)."""
        views: dict[str, View] = {}
        for obj in self.objectives.values():
            for v in obj.views():  # type: ignore[operator]
                views.setdefault(v.name, v)
        # full views first, then single-modality masked views, then paired ones (complementary to those)
        return dict(sorted(views.items(), key=lambda kv: (bool(kv[1].masked), len(kv[1].modalities))))

    def _single_mask(self, modality: str, valid: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        policy: MaskingPolicy = get_plugin(modality).masking
        if policy.kind == "span":
            return span_mask(valid, policy.ratio, policy.span, self.generator)
        if policy.kind == "whole_word" and modality == "text":
            tokens = batch[modality]["tokens"]
            eos = torch.cat([torch.zeros_like(tokens[:, :1], dtype=torch.bool), tokens.eq(2)], dim=1)
            if self.word_start is not None:
                starts = torch.cat([torch.ones_like(eos[:, :1]), self.word_start[tokens]], dim=1)
            else:
                starts = torch.ones_like(eos)
            return whole_word_mask(valid, starts, policy.ratio, self.generator, protect=eos)
        return random_mask(valid, policy.ratio, self.generator)

    def forward(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Total weighted loss and logs (``<objective>/loss`` and each objective's own metrics)."""
        outputs: dict[str, ViewOutput] = {}
        single_masks: dict[str, torch.Tensor] = {}
        for name, view in self.views().items():
            inputs = {m: batch[m] for m in view.modalities}
            if not view.masked:
                out = self.model.forward_features(inputs)
                outputs[name] = ViewOutput(out.hidden, out.padding_mask)
                continue
            keep, masked = {}, {}
            for m in view.masked:
                full = outputs.get(m)
                if full is None:
                    full = ViewOutput(*_full(self.model, m, batch[m]))
                    outputs[m] = full
                pad = full.padding_mask[m]
                valid = ~pad if pad is not None else torch.ones(full.hidden[m].shape[:2], dtype=torch.bool)
                if len(view.modalities) == 1:
                    mk = self._single_mask(m, valid, batch)
                    single_masks[m] = mk
                else:
                    base = single_masks.get(m)
                    if base is None:
                        base = self._single_mask(m, valid, batch)
                        single_masks[m] = base
                    mk = complementary_mask(
                        base, valid, PAIRED_RATIOS.get(m, 0.5), self.generator, from_visible=(m == "text")
                    )
                masked[m] = mk
                keep[m] = keep_ids_from_mask(mk, valid)
            student = self.model.forward_features(inputs, keep_ids=keep)
            vo = ViewOutput(student.hidden, student.padding_mask, keep, masked)
            if self.decoder is not None:
                vo.decoded = self.decoder(
                    student.hidden,
                    keep,
                    {m: outputs[m].padding_mask[m] for m in view.modalities},
                    {m: outputs[m].hidden[m].shape[1] for m in view.modalities},
                    order=list(view.modalities),
                )
            outputs[name] = vo
        total = torch.zeros(())
        logs: dict[str, float] = {}
        for key, obj in self.objectives.items():
            loss, extra = obj(outputs, self.model, batch)
            total = total + self.weights[key] * loss
            logs[f"{key}/loss"] = float(loss.detach())
            logs.update({f"{key}/{k}": v for k, v in extra.items()})
        logs["loss"] = float(total.detach())
        return total, logs


def _full(
    model: OnePeaceModel, modality: str, batch: Any
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    out = model.forward_features({modality: batch})
    return out.hidden, out.padding_mask
