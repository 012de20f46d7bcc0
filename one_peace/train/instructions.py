"""OFASys-style instructions: ``[IMAGE:img] what does the image describe? -> [TEXT:caption]``.

Left of ``->`` is the encoder input, right the decoder target. A slot ``[TYPE:field,attr=value,...]`` names a
dataset field; ``TYPE`` is any registered modality (upper-case) or ``BOX`` (a region as 4 location tokens,
OFA's 1000 bins). Plain text and ``TEXT`` slots on the source side form the text prompt; non-text modality
slots become encoder inputs. Attributes: ``no_loss`` (target slot not scored), ``closed_set`` (generation is
constrained to the target values seen in the data), ``mask_ratio=R`` (mask that fraction of a source modality's
tokens). Several templates joined by ``|||`` are sampled per example. Errors give the character position.
BOX values are ``[x0, y0, x1, y1]`` in pixels of the original image, whose size comes from the row's ``width``
and ``height`` fields.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from one_peace.tokenizer import LANGUAGE

ATTRS = {"no_loss", "closed_set", "mask_ratio"}
NUM_BINS = 1000
_SLOT = re.compile(r"\[([A-Za-z_]\w*):([^\],=\s]*)((?:,[^\]]*)?)\]")


class InstructionError(ValueError):
    """A malformed instruction template; the message gives the position of the error."""


@dataclass(frozen=True)
class Slot:
    """A ``[TYPE:field,attrs]`` slot."""

    kind: str
    field: str
    attrs: dict[str, str] = dc_field(default_factory=dict, hash=False)
    pos: int = 0


@dataclass(frozen=True)
class Template:
    """One parsed template: source and target pieces (plain strings and slots)."""

    text: str
    source: tuple[str | Slot, ...]
    target: tuple[str | Slot, ...]

    @property
    def source_slots(self) -> list[Slot]:
        """Slots on the encoder side."""
        return [p for p in self.source if isinstance(p, Slot)]

    @property
    def target_slots(self) -> list[Slot]:
        """Slots on the decoder side."""
        return [p for p in self.target if isinstance(p, Slot)]


def _err(template: str, pos: int, msg: str) -> InstructionError:
    return InstructionError(f"instruction error at position {pos}: {msg}\n  {template}\n  {' ' * pos}^")


def _parse_side(template: str, start: int, end: int, kinds: set[str]) -> tuple[str | Slot, ...]:
    pieces: list[str | Slot] = []
    i = start
    while i < end:
        j = template.find("[", i, end)
        close = template.find("]", i, end)
        if close != -1 and (j == -1 or close < j):
            raise _err(template, close, "']' without a matching '['")
        if j == -1:
            pieces.append(template[i:end])
            break
        if j > i:
            pieces.append(template[i:j])
        m = _SLOT.match(template, j, end)
        if m is None:
            k = template.find("]", j, end)
            if k == -1:
                raise _err(template, j, "unclosed '[' (slots look like [TYPE:field,attr=value])")
            if ":" not in template[j:k]:
                raise _err(template, j, "slot needs 'TYPE:field'")
            raise _err(template, j, f"malformed slot {template[j : k + 1]!r}")
        kind, fld, rest = m.group(1), m.group(2), m.group(3)
        if kind.lower() not in kinds:
            raise _err(
                template, j + 1, f"unknown slot type {kind!r}; expected one of {sorted(k.upper() for k in kinds)}"
            )
        if not fld:
            raise _err(template, j + len(kind) + 2, "empty field name")
        attrs: dict[str, str] = {}
        offset = j + 1 + len(kind) + 1 + len(fld)
        for part in filter(None, rest.split(",")):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in ATTRS:
                raise _err(template, offset + 1, f"unknown attribute {name!r}; expected one of {sorted(ATTRS)}")
            if name == "mask_ratio":
                try:
                    if not 0.0 <= float(value) < 1.0:
                        raise ValueError
                except ValueError:
                    raise _err(template, offset + 1, f"mask_ratio must be a number in [0, 1), got {value!r}") from None
            attrs[name] = value.strip() or "true"
            offset += len(part) + 1
        pieces.append(Slot(kind.lower(), fld, attrs, j))
        i = m.end()
    return tuple(pieces)


def parse_template(template: str, modalities: Sequence[str]) -> Template:
    """Parse one template (no ``|||``).

    Raises:
        InstructionError: with the position of the problem.
    """
    kinds = {m.lower() for m in modalities} | {"box"}
    arrow = template.find("->")
    if arrow == -1:
        raise _err(template, len(template), "missing '->' between the source and the target")
    if template.find("->", arrow + 2) != -1:
        raise _err(template, template.find("->", arrow + 2), "more than one '->'")
    source = _parse_side(template, 0, arrow, kinds)
    target = _parse_side(template, arrow + 2, len(template), kinds)
    if not any(isinstance(p, Slot) for p in target):
        raise _err(template, arrow + 2, "the target needs at least one slot")
    for p in target:
        if isinstance(p, Slot) and p.kind not in (LANGUAGE, "box"):
            raise _err(template, p.pos, f"target slots must be TEXT or BOX, got {p.kind.upper()}")
    return Template(template, source, target)


class Instruction:
    """One or several templates (``|||``) over the registered modalities.

    Args:
        spec: The instruction text.
        modalities: Slot types allowed besides ``BOX`` (default: every registered modality).
    """

    def __init__(self, spec: str, modalities: Sequence[str] | None = None) -> None:
        if modalities is None:
            from one_peace.registry import list_modalities

            modalities = list(list_modalities())
        self.templates: list[Template] = []
        offset = 0
        for part in spec.split("|||"):
            try:
                self.templates.append(parse_template(part.strip(), modalities))
            except InstructionError as exc:
                where = f"template {len(self.templates) + 1} (starting at character {offset} of the instruction)"
                raise InstructionError(f"{where}: {exc}") from None
            offset += len(part) + 3

    def fields(self) -> set[str]:
        """Every dataset field any template reads (``width``/``height`` too when a BOX slot needs them)."""
        found = {s.field for t in self.templates for s in (*t.source_slots, *t.target_slots)}
        return found | {"width", "height"} if self.uses_box else found

    @property
    def uses_box(self) -> bool:
        """Whether any template has a BOX slot."""
        return any(s.kind == "box" for t in self.templates for s in (*t.source_slots, *t.target_slots))

    def render(
        self, row: Mapping[str, Any], rng: random.Random, image_size: tuple[int, int] | None = None
    ) -> dict[str, Any]:
        """Pick a template and fill it from ``row``.

        Returns:
            ``inputs`` (modality -> raw field value), ``prompt`` (list of str pieces and location-token lists),
            ``target`` (list of str pieces and location-token lists, each with a scored flag), ``mask_ratio``
            (modality -> ratio), ``closed_set`` (whether the target is constrained), ``template`` (its index).
        """
        idx = rng.randrange(len(self.templates))
        t = self.templates[idx]
        if image_size is None and "width" in row and "height" in row:  # original image size for BOX slots
            image_size = (int(row["width"]), int(row["height"]))
        source = self.render_source(row, idx, image_size)
        target: list[tuple[Any, bool]] = []
        closed = False
        for p in t.target:
            if isinstance(p, str):
                if p.strip():
                    target.append((p, True))
                continue
            scored = "no_loss" not in p.attrs
            closed = closed or "closed_set" in p.attrs
            value = quantize_box(row[p.field], image_size) if p.kind == "box" else str(row[p.field])
            target.append((value, scored))
        return {**source, "target": target, "closed_set": closed, "template": idx}

    def render_source(
        self, row: Mapping[str, Any], template: int = 0, image_size: tuple[int, int] | None = None
    ) -> dict[str, Any]:
        """The encoder side of template ``template`` filled from ``row`` (generation needs no target field).

        Returns:
            ``inputs`` (modality -> raw field value), ``prompt`` (str pieces and location-token lists) and
            ``mask_ratio`` (modality -> ratio), as :meth:`render` does.
        """
        t = self.templates[template]
        if image_size is None and "width" in row and "height" in row:
            image_size = (int(row["width"]), int(row["height"]))
        inputs: dict[str, Any] = {}
        prompt: list[Any] = []
        mask_ratio: dict[str, float] = {}
        for p in t.source:
            if isinstance(p, str):
                prompt.append(p)
            elif p.kind == LANGUAGE:
                prompt.append(str(row[p.field]))
            elif p.kind == "box":
                prompt.append(quantize_box(row[p.field], image_size))
            else:
                inputs[p.kind] = row.get(p.field)  # media are loaded by the data loader
                if "mask_ratio" in p.attrs:
                    mask_ratio[p.kind] = float(p.attrs["mask_ratio"])
        return {"inputs": inputs, "prompt": prompt, "mask_ratio": mask_ratio}


def quantize_box(box: Sequence[float], image_size: tuple[int, int] | None, bins: int = NUM_BINS) -> list[int]:
    """``[x0, y0, x1, y1]`` in pixels of the original image -> 4 bin indices in ``[0, bins)`` (OFA style)."""
    if image_size is None:
        raise ValueError("BOX slots need the original image size")
    if len(box) != 4:
        raise ValueError(f"a BOX field must be [x0, y0, x1, y1], got {box!r}")
    w, h = image_size
    scale = (w, h, w, h)
    return [min(bins - 1, max(0, round(float(v) / s * (bins - 1)))) for v, s in zip(box, scale)]


def dequantize_box(bins_: Sequence[int], image_size: tuple[int, int], bins: int = NUM_BINS) -> list[float]:
    """Inverse of :func:`quantize_box` (bin centres in pixels)."""
    w, h = image_size
    return [b / (bins - 1) * s for b, s in zip(bins_, (w, h, w, h))]
