"""A task = model + weighted objectives (+ the denoising decoder): computes each declared view once per step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from one_peace.models.adapter import host_checks
from one_peace.models.decoder import DenoiseDecoder
from one_peace.models.encoder import OnePeaceModel
from one_peace.registry import get_plugin
from one_peace.train.device import HOST_KEY, HostBatch, to_device
from one_peace.train.masking import complementary_mask, keep_ids_from_mask, mask_for
from one_peace.train.objectives import FeatureCache, Logs, Objective, View


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
        tokenizer: The tokenizer whole-word masking asks the plugins for word starts with (default: the
            model's own).
        seed: Seed of the masking generator.

    Each modality is masked by its plugin's :class:`~one_peace.registry.MaskingPolicy` (kind, ratio, paired
    ratio), through the masking registry of :mod:`one_peace.train.masking`.
    """

    def __init__(
        self,
        model: OnePeaceModel,
        objectives: Mapping[str, tuple[Objective, float]],
        decoder: DenoiseDecoder | None = None,
        tokenizer: Any = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.objectives = nn.ModuleDict({k: o for k, (o, _) in objectives.items()})
        self.weights = {k: float(w) for k, (_, w) in objectives.items()}
        self.decoder = decoder
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.generator = torch.Generator().manual_seed(seed)

    #: The trainer hands this task the host copy of each batch (:class:`~one_peace.train.device.HostBatch`).
    uses_host_batch = True

    @property
    def caches_features(self) -> bool:
        """Whether an objective keeps the whole accumulated batch (see ``FeatureCache`` in ``train.objectives``)."""
        return any(obj.caches_features for obj in self.objectives.values())  # type: ignore[union-attr]

    @property
    def leaves_parameters_unused(self) -> bool:
        """Whether a step can leave parameters without gradient (DDP then needs ``find_unused_parameters``).

        False only when it is known that every parameter takes part: every modality of the model is in a view, every
        modality's plugin declares that its adapter uses every parameter (``uses_all_parameters``; the built-ins
        do, by declaration, not by being recognised), the objectives together read
        every modality's head and the logit scale (:meth:`Objective.uses`), and the decoder (if any) decodes every
        one of its modalities in some masked view; a test checks that such a step gives every parameter a
        gradient. Anything else is conservative.
        """
        views = self.views().values()
        seen = {m for v in views for m in v.modalities}
        decoded = {m for v in views for m in v.masked}
        model_mods = set(self.model.config.modalities)
        declared = all(get_plugin(m).uses_all_parameters for m in model_mods)
        if not model_mods <= seen or not declared:
            return True
        used: set[str] = set()
        for obj in self.objectives.values():
            parts = obj.uses()  # type: ignore[operator]
            if parts is None:
                return True
            used |= {p if not p.startswith("head.") else f"head.{self.model.groups[p[5:]]}" for p in parts}
        if not {f"head.{g}" for g in self.model.heads} | {"logit_scale"} <= used:
            return True
        return bool(self.decoder is not None and not set(self.decoder.config.modalities) <= decoded)

    def views(self, objectives: list[str] | None = None) -> dict[str, View]:
        """Every view (of the named objectives; default all), once, full views first (masked views need their
        lengths and targets)."""
        views: dict[str, View] = {}
        for key, obj in self.objectives.items():
            if objectives is not None and key not in objectives:
                continue
            for v in obj.views():  # type: ignore[operator]
                views.setdefault(v.name, v)
        # full views first, then single-modality masked views, then paired ones (complementary to those)
        return dict(sorted(views.items(), key=lambda kv: (bool(kv[1].masked), len(kv[1].modalities))))

    def _single_mask(self, modality: str, valid: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        return mask_for(get_plugin(modality), valid, batch[modality], self.tokenizer, self.generator)

    def _valid(
        self, modality: str, full: ViewOutput, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, Mapping[str, Any]]:
        """The valid positions masking starts from, and the batch it reads (word starts) from.

        From the host copy of the batch when the trainer gave one and the plugin can tell its adapter's padding
        (``position_padding``): then masking runs on the CPU and nothing is read from the device. Otherwise from
        the adapter's padding mask. On CPU tensors both exist for free and must agree (a plugin bug otherwise).
        """
        hidden = full.hidden[modality]
        pad = full.padding_mask[modality]
        host = batch.get(HOST_KEY)
        if isinstance(host, HostBatch):
            try:
                host_pad = get_plugin(modality).position_padding(host.batch[modality])
            except NotImplementedError:
                host_pad = None
            else:
                shape = tuple(hidden.shape[:2])
                valid = torch.ones(shape, dtype=torch.bool) if host_pad is None else ~host_pad.bool().cpu()
                if tuple(valid.shape) != shape:
                    raise ValueError(
                        f"{modality}: the plugin's position_padding has shape {tuple(valid.shape)}, its adapter "
                        f"produced {shape} positions"
                    )
                if host_checks(hidden):
                    own = ~pad.cpu() if pad is not None else torch.ones(shape, dtype=torch.bool)
                    if not torch.equal(own, valid):
                        raise ValueError(f"{modality}: the plugin's position_padding disagrees with its adapter's mask")
                return valid, host.batch
        if pad is not None:
            return ~pad, batch
        return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device), batch

    def forward(
        self,
        batch: Mapping[str, Any],
        cache: Mapping[str, FeatureCache] | None = None,
        features_only: bool = False,
    ) -> Any:
        """Total weighted loss and logs (``<objective>/loss`` and each objective's own metrics).

        Under gradient accumulation the trainer first calls it with ``features_only=True`` (no gradient) for each
        micro-batch, getting objective -> features of the objectives that cache them, then once per micro-batch
        with ``cache`` (objective -> :class:`FeatureCache`). Those objectives' losses are then losses of the whole
        accumulated batch, each micro-step backpropagating only its own part: their terms are multiplied by k in
        the returned loss, which the trainer divides by k like every other term (logs hold the plain values).
        """
        if features_only:
            keys = [k for k, o in self.objectives.items() if o.caches_features]
            outputs = self._outputs(batch, self.views(keys))
            return {k: self.objectives[k].features(outputs, self.model, batch) for k in keys}  # type: ignore[operator]
        outputs = self._outputs(batch, self.views())
        total = torch.zeros((), device=next(self.model.parameters()).device)
        logs: Logs = {}
        for key, obj in self.objectives.items():
            if cache is not None and key in cache:
                loss, extra = obj(outputs, self.model, batch, cache=cache[key])
                total = total + self.weights[key] * len(cache[key].features) * loss
            else:
                loss, extra = obj(outputs, self.model, batch)
                total = total + self.weights[key] * loss
            logs[f"{key}/loss"] = loss.detach()
            logs.update({f"{key}/{k}": v for k, v in extra.items()})
        logs["loss"] = sum(self.weights[k] * logs[f"{k}/loss"] for k in self.objectives)  # type: ignore[assignment]
        return total, logs

    def _outputs(self, batch: Mapping[str, Any], views: Mapping[str, View]) -> dict[str, ViewOutput]:
        """Run each view once (masked views after the full ones they take lengths and targets from)."""
        outputs: dict[str, ViewOutput] = {}
        single_masks: dict[str, torch.Tensor] = {}
        for name, view in views.items():
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
                valid, source = self._valid(m, full, batch)
                if len(view.modalities) == 1:
                    mk = self._single_mask(m, valid, source)
                    single_masks[m] = mk
                else:
                    base = single_masks.get(m)
                    if base is None:
                        base = self._single_mask(m, valid, source)
                        single_masks[m] = base
                    policy = get_plugin(m).masking
                    mk = complementary_mask(
                        base, valid, policy.paired_ratio, self.generator, from_visible=policy.paired_from_visible
                    )
                device = full.hidden[m].device
                masked[m] = to_device(mk, device)
                keep[m] = to_device(keep_ids_from_mask(mk, valid), device)
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
        return outputs


def _full(
    model: OnePeaceModel, modality: str, batch: Any
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    out = model.forward_features({modality: batch})
    return out.hidden, out.padding_mask
