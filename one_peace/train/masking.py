"""Masking policies for denoising: which positions stay visible (``keep_ids``) in each view.

All functions work on positions of the adapter sequence (CLS = 0, always kept) and return ``keep_ids``
``(B, K)``: ascending kept positions, right-padded with -1. ``valid`` is the ``(B, T)`` mask of real
(non-padding) positions.
"""

from __future__ import annotations

import torch


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
    scores = torch.rand(valid.shape, generator=generator).to(valid.device)
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
    """Mask contiguous spans of ``span`` positions until ``round(ratio * n)`` positions are masked (audio)."""
    protect = _protect(valid, protect)
    out = torch.zeros_like(valid)
    target = _counts(valid, ratio, protect)
    for b in range(valid.shape[0]):
        cand = (valid[b] & ~protect[b]).nonzero().flatten().tolist()
        if not cand or int(target[b]) == 0:
            continue
        lo, hi = cand[0], cand[-1]
        masked = 0
        order = torch.randperm(hi - lo + 1, generator=generator).tolist()
        for start in order:
            for p in range(lo + start, min(hi + 1, lo + start + span)):
                if masked >= int(target[b]):
                    break
                if not out[b, p] and valid[b, p] and not protect[b, p]:
                    out[b, p] = True
                    masked += 1
            if masked >= int(target[b]):
                break
    return out


def whole_word_mask(
    valid: torch.Tensor,
    word_start: torch.Tensor,
    ratio: float,
    generator: torch.Generator | None = None,
    protect: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask whole words (a word = a word-start token and its continuation tokens) up to ``ratio`` of the tokens."""
    protect = _protect(valid, protect)
    out = torch.zeros_like(valid)
    target = _counts(valid, ratio, protect)
    for b in range(valid.shape[0]):
        words: list[list[int]] = []
        for p in (valid[b] & ~protect[b]).nonzero().flatten().tolist():
            if word_start[b, p] or not words or words[-1][-1] != p - 1:
                words.append([p])
            else:
                words[-1].append(p)
        masked = 0
        for w in torch.randperm(len(words), generator=generator).tolist():
            if masked >= int(target[b]):
                break
            for p in words[w]:
                out[b, p] = True
            masked += len(words[w])
    return out


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
    scores = torch.rand(valid.shape, generator=generator).to(valid.device).masked_fill(~pool, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    if from_visible:
        return rank < n_mask[:, None]
    visible = (rank < n_visible[:, None]) & pool
    return valid & ~protect & ~visible


def _protect(valid: torch.Tensor, protect: torch.Tensor | None) -> torch.Tensor:
    out = torch.zeros_like(valid) if protect is None else protect.clone()
    out[:, 0] = True
    return out
