"""Masking policies for denoising: which positions stay visible (``keep_ids``) in each view.

All functions work on positions of the adapter sequence (CLS = 0, always kept) and return ``keep_ids``
``(B, K)``: ascending kept positions, right-padded with -1. ``valid`` is the ``(B, T)`` mask of real
(non-padding) positions.

Masking kinds are registered in :data:`MASKING` (``random``, ``span``, ``whole_word``; add one with
:func:`register_masking`). A plugin's :class:`~one_peace.registry.MaskingPolicy` names its kind, checked when the
plugin registers; :func:`mask_for` draws a modality's mask from its policy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from one_peace.registry import MASKING_KINDS

if TYPE_CHECKING:
    from one_peace.registry import MaskingPolicy, ModalityPlugin


@dataclass
class MaskRequest:
    """What a masking kind gets: the valid positions, the policy, the generator and (whole-word) word starts.

    Attributes:
        valid: ``(B, T)`` real (non-padding) positions of the adapter sequence (CLS at 0).
        policy: The modality's masking policy.
        generator: The task's masking generator.
        word_starts: ``(starts, protect)`` from the plugin's ``word_starts`` (``None`` when it has none).
    """

    valid: torch.Tensor
    policy: MaskingPolicy
    generator: torch.Generator | None
    word_starts: tuple[torch.Tensor, torch.Tensor] | None = None


MaskFn = Callable[[MaskRequest], torch.Tensor]
#: Masking kind -> function returning the ``(B, T)`` bool mask of masked positions (the registry's table: kinds
#: register into the ground floor, which never imports this module)
MASKING: dict[str, MaskFn] = MASKING_KINDS


def register_masking(kind: str) -> Callable[[MaskFn], MaskFn]:
    """Register a masking kind (a function of a :class:`MaskRequest` returning the masked positions)."""

    def add(fn: MaskFn) -> MaskFn:
        if kind in MASKING and MASKING[kind] is not fn:
            raise ValueError(f"masking kind {kind!r} is registered twice")
        MASKING[kind] = fn
        return fn

    return add


def mask_for(
    plugin: ModalityPlugin,
    valid: torch.Tensor,
    batch: Mapping[str, Any],
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The single-modality view's mask of ``plugin``'s modality, drawn by its policy's kind.

    Raises:
        ValueError: the kind is not registered, or whole-word masking for a batch the plugin gives no words for.
    """
    policy = plugin.masking
    fn = MASKING.get(policy.kind)
    if fn is None:
        raise ValueError(f"{plugin.name}: unknown masking kind {policy.kind!r}; registered: {sorted(MASKING)}")
    starts = plugin.word_starts(batch, tokenizer) if policy.kind == "whole_word" else None
    return fn(MaskRequest(valid, policy, generator, starts))


def keep_ids_from_mask(masked: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``keep_ids`` of the positions that are valid and not masked (CLS forced visible)."""
    keep = valid & ~masked
    keep[:, 0] = True
    k = int(keep.sum(1).max())
    pos = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    order = torch.where(keep, pos, pos + keep.shape[1]).sort(dim=1).values[:, :k]
    return torch.where(order < keep.shape[1], order, torch.full_like(order, -1))


def _counts(valid: torch.Tensor, ratio: float, exclude: torch.Tensor) -> torch.Tensor:
    candidates = (valid & ~exclude).sum(1)
    return (candidates.float() * ratio).round().long()


def random_mask(
    valid: torch.Tensor, ratio: float, generator: torch.Generator | None = None, protect: torch.Tensor | None = None
) -> torch.Tensor:
    """Mask ``round(ratio * n)`` uniformly chosen positions per row among the valid, unprotected ones."""
    protect = _protect(valid, protect)
    n_mask = _counts(valid, ratio, protect)
    scores = torch.rand(valid.shape, generator=generator, device="cpu").to(valid.device)
    scores = scores.masked_fill(~valid | protect, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    return rank < n_mask[:, None]


def span_mask(
    valid: torch.Tensor,
    ratio: float,
    span: int,
    generator: torch.Generator | None = None,
    protect: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask contiguous spans of ``span`` positions until ``round(ratio * n)`` positions are masked (audio).

    Span starts are visited in a random order over the range between a row's first and last eligible (valid,
    unprotected) position; each start masks its not yet masked eligible positions in order, and masking stops
    at the count (so the last span may be cut). Vectorised: a position's key is the rank of the first start in
    that order that covers it, then its place; the ``count`` smallest keys are masked.
    """
    protect = _protect(valid, protect)
    b, t = valid.shape
    eligible = valid & ~protect
    target = _counts(valid, ratio, protect)
    pos = torch.arange(t, device=valid.device).expand(b, t)
    lo = torch.where(eligible, pos, t).amin(1, keepdim=True)
    hi = torch.where(eligible, pos, -1).amax(1, keepdim=True)
    starts = (pos >= lo) & (pos <= hi)
    scores = torch.rand(valid.shape, generator=generator, device="cpu").to(valid.device).masked_fill(~starts, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1).masked_fill(~starts, t)
    first = F.pad(rank, (span - 1, 0), value=t).unfold(1, span, 1).amin(-1)  # first start covering each position
    key = torch.where(eligible, first * t + pos, t * t + t)
    order = key.argsort(dim=1).argsort(dim=1)
    return eligible & (order < target[:, None])


def whole_word_mask(
    valid: torch.Tensor,
    word_start: torch.Tensor,
    ratio: float,
    generator: torch.Generator | None = None,
    protect: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask whole words (a word = a word-start token and its continuation tokens) up to ``ratio`` of the tokens.

    A word is a word-start token and the eligible (valid, unprotected) tokens after it up to the next start or
    gap. Words are visited in a random order and masked whole while fewer than ``round(ratio * n)`` tokens are
    masked (the last word may overshoot). Vectorised over the batch: each word's length sits at its first token;
    the words in random order take it cumulatively.
    """
    protect = _protect(valid, protect)
    b, t = valid.shape
    eligible = valid & ~protect
    target = _counts(valid, ratio, protect)
    pos = torch.arange(t, device=valid.device).expand(b, t)
    after_gap = ~F.pad(eligible[:, :-1], (1, 0), value=False)
    first = eligible & (word_start.to(eligible.device).bool() | after_gap)
    word = torch.where(first, pos, -1).cummax(dim=1).values.clamp(min=0)  # each token's word (its first position)
    length = torch.zeros(b, t, dtype=torch.long, device=valid.device).scatter_add(1, word, eligible.long())
    scores = torch.rand(valid.shape, generator=generator, device="cpu").to(valid.device).masked_fill(~first, 2.0)
    order = scores.argsort(dim=1)  # word starts first, in random order
    ordered = length.gather(1, order)
    before = ordered.cumsum(1) - ordered  # tokens masked before each word's turn
    chosen = torch.zeros_like(eligible).scatter(1, order, (before < target[:, None]) & first.gather(1, order))
    return eligible & chosen.gather(1, word)


def complementary_mask(
    single_masked: torch.Tensor,
    valid: torch.Tensor,
    ratio: float,
    generator: torch.Generator | None = None,
    from_visible: bool = True,
) -> torch.Tensor:
    """The paired view's mask, complementary to the single-modality view.

    ``from_visible=True`` (text): mask ``ratio`` of the tokens, drawn only from those the single view left
    visible. ``from_visible=False`` (image): the visible set is a subset of the positions the single view
    masked, so ``ratio`` of the positions are masked in the pair view (ONE-PEACE: 68.75 %).
    """
    protect = torch.zeros_like(valid)
    protect[:, 0] = True
    if from_visible:
        n_mask = _counts(valid, ratio, protect)
        pool = valid & ~single_masked & ~protect
    else:
        n_visible = valid.sum(1) - 1 - _counts(valid, ratio, protect)
        pool = single_masked & valid & ~protect
    scores = torch.rand(valid.shape, generator=generator, device="cpu").to(valid.device).masked_fill(~pool, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    if from_visible:  # never beyond the pool: when it holds fewer than n_mask tokens, all of it (not CLS or padding)
        return (rank < n_mask[:, None]) & pool
    visible = (rank < n_visible[:, None]) & pool
    return valid & ~protect & ~visible


def _protect(valid: torch.Tensor, protect: torch.Tensor | None) -> torch.Tensor:
    out = torch.zeros_like(valid) if protect is None else protect.clone()
    out[:, 0] = True
    return out


@register_masking("random")
def _random(req: MaskRequest) -> torch.Tensor:
    return random_mask(req.valid, req.policy.ratio, req.generator)


@register_masking("span")
def _span(req: MaskRequest) -> torch.Tensor:
    return span_mask(req.valid, req.policy.ratio, req.policy.span, req.generator)


@register_masking("whole_word")
def _whole_word(req: MaskRequest) -> torch.Tensor:
    if req.word_starts is None:
        raise ValueError("whole-word masking needs word starts: the plugin's word_starts() returned None")
    starts, protect = req.word_starts
    return whole_word_mask(req.valid, starts, req.policy.ratio, req.generator, protect=protect)
