"""The language route (``add_language``): a model's text branch taught a new tokenizer by a frozen teacher.

:func:`make_student` (``model.retokenize``) keeps a frozen copy of the pretrained model as the teacher and rebuilds the
text adapter for the new tokenizer; the ``distill_text`` objective (:class:`TextDistillObjective`) then embeds every
sentence where the teacher embeds its English counterpart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from one_peace.tokenizer import LANGUAGE
from one_peace.train.objectives import FeatureCache, Logs, Objective, View, register_objective

if TYPE_CHECKING:
    from one_peace.models.encoder import OnePeaceModel


@register_objective("distill_text")
class TextDistillObjective(Objective):
    """Teach a text branch new words: each row's sentence (any language) is embedded as a frozen teacher embeds its
    English counterpart (``teacher_field``): the loss is 1 - cosine of the two normalised embeddings.

    The ``add_language`` recipe gives the teacher (the pretrained model before its text adapter was made anew for a
    new tokenizer) and trains the text branch only, so every other modality keeps its weights bitwise and the new
    words land where the English ones were. Teacher embeddings are computed once per distinct English text (kept on
    the host, at most ``cache_size``).

    Args:
        teacher_field: The row field holding the English text.
        modality: The text modality.
        teacher: The frozen teacher model (not a submodule: never trained, never saved with the task).
        cache_size: Distinct English texts whose teacher embeddings are kept.
    """

    def __init__(
        self, teacher_field: str = "english", modality: str = LANGUAGE, teacher: Any = None, cache_size: int = 100_000
    ) -> None:
        super().__init__()
        if teacher is None:
            raise ValueError(
                "distill_text needs a teacher: start from model.pretrained=<the English model> with "
                "model.retokenize=true"
            )
        self.teacher_field, self.modality, self.cache_size = teacher_field, modality, cache_size
        object.__setattr__(self, "_teacher", teacher)
        self._cache: dict[str, torch.Tensor] = {}

    def uses(self) -> set[str] | None:
        """The text head (the teacher is outside the model)."""
        return {f"head.{self.modality}"}

    def views(self) -> list[View]:
        """One unmasked pass of the text."""
        return [View(self.modality, (self.modality,))]

    def targets(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """The teacher's normalised embeddings of ``texts`` ``(B, D)`` on ``device``."""
        teacher = self.__dict__["_teacher"]
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            if len(self._cache) + len(missing) > self.cache_size:
                self._cache.clear()
            with torch.no_grad():
                found = teacher.encode(self.modality, missing).float().cpu()
            self._cache.update(zip(missing, found))
        return torch.stack([self._cache[t] for t in texts]).to(device)

    def forward(
        self,
        outputs: Mapping[str, Any],
        model: nn.Module,
        batch: Mapping[str, Any],
        cache: FeatureCache | None = None,
    ) -> tuple[torch.Tensor, Logs]:
        """Mean of 1 - cosine over the valid rows; logs the mean cosine."""
        student = model.embed(self.modality, outputs[self.modality].hidden[self.modality])  # type: ignore[operator]
        raw = batch.get("raw") or {}
        if self.teacher_field not in raw:
            raise KeyError(f"distill_text: the batch has no {self.teacher_field!r} field (teacher_field)")
        target = self.targets([str(t) for t in raw[self.teacher_field]], student.device).to(student.dtype)
        cos = (student * target).sum(-1)
        valid = batch.get("valid")
        v = torch.ones_like(cos, dtype=torch.bool) if valid is None else valid.to(cos.device).bool()
        loss = ((1.0 - cos) * v).sum() / v.sum().clamp(min=1)
        return loss, {"cosine": (cos * v).sum().detach() / v.sum().clamp(min=1)}


def make_student(model: OnePeaceModel, tokenizer: Any, say: Any = print) -> OnePeaceModel:
    """``model.retokenize``: a frozen copy of ``model`` (the teacher, returned), then ``model`` reads text with
    ``tokenizer``: its text adapter is built anew for the new vocabulary, keeping every tensor whose name and shape
    agree (positions, CLS, relative table); the token table starts from random. Nothing else changes."""
    import copy

    from one_peace.checkpoint import tokenizer_modality

    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    modality = tokenizer_modality(model.config)
    old = model.adapters[modality]
    options = model.config.modality_options.setdefault(modality, {})
    before = options.get("vocab_size")
    options["vocab_size"] = int(tokenizer.vocab_size)
    siblings = {k: v for k, v in model.adapters.items() if k != modality}
    new = model.plugins[modality].build_adapter(model.config, siblings)
    theirs = old.state_dict()
    kept = {k: v for k, v in new.state_dict().items() if k in theirs and theirs[k].shape == v.shape}
    new.load_state_dict({**new.state_dict(), **{k: theirs[k] for k in kept}})
    ref = next(old.parameters())
    model.adapters[modality] = new.to(ref.device, ref.dtype)
    model.tokenizer = tokenizer
    model._preprocessors.clear()
    say(
        f"model.retokenize: {modality} now reads a {tokenizer.vocab_size}-token vocabulary (was {before}); its adapter "
        f"keeps {len(kept)} of {len(theirs)} tensors, the token table starts anew; the pretrained model is the teacher"
    )
    return teacher
