"""Training objectives as registered modules: ``contrastive`` and ``denoise`` (``seq2seq`` comes with the decoder).

Each objective declares the forward *views* it needs (:class:`View`); a task computes every view once and
hands the outputs to each objective, so e.g. the full image view is shared by contrastive and denoising.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

OBJECTIVES: dict[str, type[Objective]] = {}

#: What objectives and tasks log: name -> detached 0-d tensor (or float). Tensors stay on the device during a step;
#: the trainer reduces them and reads them on the host only at log steps (no synchronisation in between).
Logs = dict[str, "torch.Tensor | float"]


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator registering an objective under ``name`` (used by recipes)."""

    def deco(cls: type[Objective]) -> type[Objective]:
        if name in OBJECTIVES:
            raise ValueError(
                f"objective {name!r} is registered twice ({OBJECTIVES[name].__module__} and {cls.__module__})"
            )
        OBJECTIVES[name] = cls
        cls.name = name
        return cls

    return deco


@dataclass(frozen=True)
class View:
    """One forward pass: modalities fused in this order, with optional masking per modality.

    Attributes:
        name: Key under which the task stores the outputs.
        modalities: Modalities in the pass (fused when several).
        masked: Modalities whose tokens are masked in this view (keep_ids from the task's masking plan).
    """

    name: str
    modalities: tuple[str, ...]
    masked: tuple[str, ...] = ()


@dataclass
class FeatureCache:
    """The features of every micro-batch of an accumulated step, computed without gradient (open_clip's scheme).

    With ``trainer.accumulation=k``, an objective whose loss couples the samples of a batch (contrastive: every other
    sample is a negative) would otherwise see k small problems. The trainer first computes each micro-batch's
    features without gradient; then, for each micro-batch in turn, the objective computes that micro-batch's
    features with gradient and its loss over all k micro-batches' features (the cached ones as constants). Each
    micro-step's backward is the full loss's gradient through that micro-batch, so the k backwards sum to the
    gradient of one k-times batch. Parameters the loss reads directly (the logit scale) take their gradient in the
    last micro-step only. Dropout makes the cached and the live features differ (as in open_clip).

    Attributes:
        features: Per micro-batch, the objective's :meth:`Objective.features`.
        index: The micro-batch being computed with gradient now.
    """

    features: list[dict[str, torch.Tensor]]
    index: int

    @property
    def last(self) -> bool:
        """Whether this is the step's last micro-batch."""
        return self.index == len(self.features) - 1

    def merged(self, live: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every micro-batch's features concatenated along dim 0, the live ones (with gradient) in their place."""
        parts = [dict(live) if i == self.index else f for i, f in enumerate(self.features)]
        return {key: torch.cat([p[key] for p in parts]) for key in live}


class Objective(nn.Module):
    """Base objective: :meth:`views` lists what it needs; :meth:`forward` returns ``(loss, logs)``.

    An objective whose loss couples the samples of a batch sets ``caches_features = True``, implements
    :meth:`features` and accepts ``cache`` (a :class:`FeatureCache`) in :meth:`forward`: under gradient
    accumulation it then sees the whole accumulated batch.
    """

    name = "?"
    caches_features = False

    def uses(self) -> set[str] | None:
        """The model parts it reads besides its views' encoder passes: ``head.<modality>``, ``logit_scale``
        (``None``: not known, so DDP must look for unused parameters)."""
        return None

    def views(self) -> list[View]:
        """The forward views this objective needs."""
        raise NotImplementedError

    def features(
        self, outputs: Mapping[str, Any], model: nn.Module, batch: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Per-sample features (dim 0 = the batch) that :meth:`forward` computes its loss from (``FeatureCache``)."""
        raise NotImplementedError(f"objective {self.name!r} caches no features")

    def forward(
        self, outputs: Mapping[str, Any], model: nn.Module, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, Logs]:
        """Loss and logs (detached tensors, see :data:`Logs`) from the view outputs."""
        raise NotImplementedError


_GATHER_GROUP: tuple[weakref.ref[Any], weakref.ref[Any]] | None = None


def _gather_group() -> Any:
    """A process group of its own for the embedding all-gather.

    Its backward runs inside autograd while DDP's gradient all-reduces run on the default group; sharing one
    gloo group lets the two streams of collectives pair up differently on different ranks (wrong gradients).

    The cache holds both groups *weakly*: ``destroy_process_group()`` must be able to free them. A strong reference
    here kept the gather group alive past it, to be torn down during interpreter exit, where gloo aborted the process
    ("terminate called without an active exception": 3 of 30 two-process runs on torch 2.14.1, 0 of 30 once the
    group was released; see the torchrun tests).
    """
    global _GATHER_GROUP
    world = dist.group.WORLD
    cached = None if _GATHER_GROUP is None else (_GATHER_GROUP[0](), _GATHER_GROUP[1]())
    if cached is None or cached[0] is not world or cached[1] is None:  # a new process group (a second run())
        group = dist.new_group()  # needs its own gather group: the old one died with the old world
        _GATHER_GROUP = (weakref.ref(world), weakref.ref(group))
        return group
    return cached[1]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient of this rank's slice.

    Our own instead of ``torch.distributed.nn.functional.all_gather``, which is deprecated in newer torch; with torch
    2.14 on gloo, processes using it aborted at exit about one run in four ("terminate called without an active
    exception"); the cause turned out to be a process group outliving ``destroy_process_group()`` (see
    :func:`_gather_group`).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        ctx.rank, ctx.world = dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        n = grad.shape[0] // ctx.world
        return grad[ctx.rank * n : (ctx.rank + 1) * n], None


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x (B, D)`` from every rank, keeping the gradient path (local-loss style); identity when alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x, _gather_group())


def scaled_logit_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """``exp(clamp(logit_scale, 0, log 100))`` as the official model uses it."""
    return logit_scale.clamp(0, math.log(100)).exp()


@register_objective("contrastive")
class ContrastiveObjective(Objective):
    """CLIP-style InfoNCE between the projected CLS embeddings of two modalities.

    A side may fuse several modalities, written ``video+audio``: one forward pass over them together (each attends
    to the others through the shared attention), its embedding the normalised mean of each modality's normalised head
    output on its own CLS state (what ``encode("video+audio", ...)`` and ``encode_multimodal(fuse="joint")`` compute).

    The other side is all-gathered across ranks with gradient; each rank computes the loss of its local rows
    against all columns (local-loss), so the summed gradient over ranks equals the single-process gradient of
    the global batch. ``valid`` masks padded samples out of both rows and columns.

    Args:
        modalities: The two modalities, e.g. ``("image", "text")``.
        label_smoothing: Cross-entropy label smoothing.
    """

    def __init__(self, modalities: tuple[str, str] = ("image", "text"), label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.a, self.b = modalities
        self.label_smoothing = label_smoothing

    caches_features = True

    def uses(self) -> set[str] | None:
        """Both sides' heads (every fused modality's) and the logit scale."""
        return {f"head.{m}" for side in (self.a, self.b) for m in side.split("+")} | {"logit_scale"}

    def views(self) -> list[View]:
        """Unmasked passes of both sides (one fused pass for a ``a+b`` side)."""
        return [View(side, tuple(side.split("+"))) for side in (self.a, self.b)]

    def features(
        self, outputs: Mapping[str, Any], model: nn.Module, batch: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Both sides' normalised embeddings and the valid-sample mask."""
        ea, eb = (
            side_embedding(model, self.a, outputs[self.a].hidden),
            side_embedding(model, self.b, outputs[self.b].hidden),
        )
        valid = batch.get("valid")
        v = torch.ones(ea.shape[0], dtype=torch.bool, device=ea.device) if valid is None else valid.to(ea.device).bool()
        return {"a": ea, "b": eb, "valid": v}

    def forward(
        self,
        outputs: Mapping[str, Any],
        model: nn.Module,
        batch: Mapping[str, Any],
        cache: FeatureCache | None = None,
    ) -> tuple[torch.Tensor, Logs]:
        """Symmetric InfoNCE over the (global; with ``cache``, accumulated) batch."""
        feats = self.features(outputs, model, batch)
        scale: torch.Tensor = model.logit_scale  # type: ignore[assignment]
        if cache is not None:
            feats = cache.merged(feats)
            if not cache.last:
                scale = scale.detach()
        return contrastive_loss(feats["a"], feats["b"], scale, feats["valid"], self.label_smoothing)


def side_embedding(model: nn.Module, side: str, hidden: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The normalised embedding of one contrastive side from its pass's states: a modality's head on its CLS state,
    or for a fused side ``a+b`` the normalised mean of each modality's."""
    parts = side.split("+")
    if len(parts) == 1:
        return model.embed(side, hidden[side])  # type: ignore[operator,no-any-return]
    joint = torch.stack([model.embed(m, hidden[m]) for m in parts]).mean(0)  # type: ignore[operator]
    return torch.nn.functional.normalize(joint, dim=-1, eps=1e-12)


def _masked_smoothed_ce(
    logits: torch.Tensor, labels: torch.Tensor, columns: torch.Tensor, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row label-smoothed cross entropy over the valid ``columns`` only, with fixed shapes and finite values.

    Masked columns take no probability and no smoothing mass (the smoothing is spread over the valid columns, as
    if the masked ones did not exist); rows whose label column is masked give 0. Also returns whether each row's
    arg-max is its label.
    """
    logp = torch.log_softmax(logits.masked_fill(~columns[None, :], float("-inf")), dim=1)
    logp = logp.masked_fill(~columns[None, :], 0.0)  # finite everywhere; masked columns contribute nothing
    nll = -logp.gather(1, labels[:, None])[:, 0]
    smooth = -logp.sum(1) / columns.sum().clamp(min=1)
    per_row = (1.0 - smoothing) * nll + smoothing * smooth
    with torch.no_grad():
        correct = logits.masked_fill(~columns[None, :], float("-inf")).argmax(1) == labels
    return per_row, correct


def contrastive_loss(
    ea: torch.Tensor,
    eb: torch.Tensor,
    logit_scale: torch.Tensor,
    valid: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Logs]:
    """Symmetric InfoNCE of local rows against all-gathered columns (see :class:`ContrastiveObjective`)."""
    n = ea.shape[0]
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    all_a, all_b = gather_with_grad(ea), gather_with_grad(eb)
    v = torch.ones(n, dtype=torch.bool, device=ea.device) if valid is None else valid.to(ea.device).bool()
    all_v = gather_with_grad(v.float()[:, None])[:, 0].bool()
    scale = scaled_logit_scale(logit_scale)
    labels = torch.arange(n, device=ea.device) + rank * n
    rows = v.float()
    la, correct = _masked_smoothed_ce(scale * ea @ all_b.T, labels, all_v, label_smoothing)
    lb, _ = _masked_smoothed_ce(scale * eb @ all_a.T, labels, all_v, label_smoothing)
    total = all_v.sum().clamp(min=1)
    loss = ((la + lb) * rows).sum() / (2 * total)  # summed over ranks (DDP averages grads: scale by world)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    with torch.no_grad():
        acc = (correct.float() * rows).sum() / rows.sum().clamp(min=1)
    return loss * world, {"acc": acc, "scale": scale.detach().reshape(())}


@register_objective("denoise")
class DenoiseObjective(Objective):
    """ONE-PEACE's intra-modal denoising contrast for one modality in one view.

    Predictions of the decoder at masked positions are contrasted (cosine similarity / temperature, label
    smoothing) against the detached final-layer features of the full input at the same position, versus all
    other (non-padding) tokens in the batch.

    Args:
        modality: The modality whose masked tokens are predicted.
        paired_with: ``None`` for the single-modality view, else the other modality of the paired view.
        temperature: Softmax temperature (0.4).
        label_smoothing: Label smoothing (0.1).
    """

    def __init__(
        self, modality: str, paired_with: str | None = None, temperature: float = 0.4, label_smoothing: float = 0.1
    ) -> None:
        super().__init__()
        self.modality = modality
        self.paired_with = paired_with
        self.temperature = temperature
        self.label_smoothing = label_smoothing

    def uses(self) -> set[str] | None:
        """Nothing beyond its views and the decoder (no head, no logit scale)."""
        return set()

    @property
    def view_name(self) -> str:
        """Name of the masked view this objective reads."""
        if self.paired_with is None:
            return f"{self.modality}_masked"
        a, b = sorted((self.modality, self.paired_with))
        return f"{a}_{b}_masked"

    def views(self) -> list[View]:
        """The full single-modality view (targets) and the masked view (student)."""
        mods = (self.modality,) if self.paired_with is None else tuple(sorted((self.modality, self.paired_with)))
        return [View(self.modality, (self.modality,)), View(self.view_name, mods, masked=mods)]

    def forward(
        self, outputs: Mapping[str, Any], model: nn.Module, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, Logs]:
        """Contrastive loss over the masked positions of the batch."""
        pred = outputs[self.view_name].decoded[self.modality]  # (B, S, D)
        target = outputs[self.modality].hidden[self.modality].detach()  # (B, S, D)
        masked = outputs[self.view_name].masked[self.modality]  # (B, S) bool
        pad = outputs[self.modality].padding_mask[self.modality]
        valid = ~pad if pad is not None else torch.ones_like(masked)
        if batch.get("valid") is not None:  # bad-sample filler slots: neither predicted nor negatives
            valid = valid & batch["valid"].to(valid.device).bool()[:, None]
        return denoise_loss(pred, target, masked & valid, self.temperature, self.label_smoothing, valid)


def denoise_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    masked: torch.Tensor,
    temperature: float = 0.4,
    label_smoothing: float = 0.1,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Logs]:
    """Each masked prediction against the full-input features of every valid token in the batch.

    The positive is the target at the prediction's own position; every other (non-padding) token of every sample
    is a negative. Features are L2-normalised; logits are cosine similarities / ``temperature``.
    """
    valid = torch.ones_like(masked) if valid is None else valid
    b, length, d = pred.shape
    # fixed shapes (no boolean indexing, so no host synchronisation): every position is a row, the valid ones are the
    # columns, the masked rows are averaged; row i's positive is column i
    p = F.normalize(pred.reshape(b * length, d).float(), dim=-1)
    t = F.normalize(target.reshape(b * length, d).float(), dim=-1)
    rows = masked.reshape(-1).float()
    labels = torch.arange(b * length, device=pred.device)
    per_row, correct = _masked_smoothed_ce(p @ t.T / temperature, labels, valid.reshape(-1).bool(), label_smoothing)
    n = rows.sum()
    loss = (per_row * rows).sum() / n.clamp(min=1)
    with torch.no_grad():
        acc = (correct.float() * rows).sum() / n.clamp(min=1)
    return loss, {"acc": acc, "tokens": n}
