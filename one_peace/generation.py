"""Generation from a seq2seq checkpoint: captions, answers, closed-set labels and boxes.

A seq2seq run (``vl_seq2seq``, ``vl_classify``, ``vl_grounding``, or a seq2seq task of a multi-task recipe) records
in each checkpoint's ``config.json`` (``trained.generators``) what its decoder needs: the instruction, the decoder's
sizes, where its weights are (``task.safetensors`` and their key prefix), the decoding settings its validation used
(beam, most tokens), the closed set and the baselines (both from the training rows). ``one_peace.load(folder)``
keeps that record and builds the decoder the first time :meth:`one_peace.OnePeaceModel.generate` asks for it;
:func:`load_generator` builds it at once. Inputs go through the same preprocessors and prompt rendering as the
run's validation, so a checkpoint with the same settings gives the captions its run printed.

Example::

    model = one_peace.load("outputs/vl_seq2seq/checkpoints/step_0000300")
    model.generate(["cat.png"])[0].text                    # the trained instruction, its beam
    model.generate([{"image": "cat.png", "question": "what colour is it?"}], instruction="...")
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from one_peace.checkpoint.generators import ATTR, BOX_TARGET, TEXT_TARGET, decoder_state
from one_peace.checkpoint.safe_pickle import CheckpointError
from one_peace.errors import DataError, InvalidValue, MissingField, UndecodableMedia
from one_peace.tokenizer import LANGUAGE

if TYPE_CHECKING:
    from one_peace.models.encoder import OnePeaceModel
    from one_peace.models.seq2seq import Trie
    from one_peace.train.instructions import Instruction


class GenerationError(ValueError):
    """Generation was asked of a model that cannot do it as asked (no decoder, another instruction's inputs...)."""


@dataclass
class Generated:
    """One generated output.

    Attributes:
        text: The generated text (location tokens and EOS left out): a caption, an answer, a closed-set label.
        score: The sequence's log-probability divided by its length (beam search's length-normalised score).
        kind: ``text`` or ``box`` (the instruction's target is a ``[BOX:...]`` slot).
        box: ``box`` targets: ``[x0, y0, x1, y1]`` in pixels of the input image (``None`` when the decoder did not
            write four location tokens).
        tokens: The decoder's token ids (without BOS, ending with EOS).
        image_size: ``(width, height)`` the boxes are in (instructions with BOX slots), else ``None``.
    """

    text: str
    score: float
    kind: str = TEXT_TARGET
    box: list[float] | None = None
    tokens: list[int] = field(default_factory=list)
    image_size: tuple[int, int] | None = None

    @property
    def output(self) -> Any:
        """What the instruction asked for: the box for ``box`` targets, else the text."""
        return self.box if self.kind == "box" else self.text

    def __str__(self) -> str:
        if self.kind == "box":
            return "no box" if self.box is None else " ".join(f"{v:.1f}" for v in self.box)
        return self.text


@dataclass
class Settings:
    """Resolved decoding settings of one call (see :meth:`Generator.settings`)."""

    instruction: Instruction
    template: int
    beam: int
    max_tokens: int
    trie: Trie | None
    kind: str
    uses_box: bool
    constraints: list[str] | None

    def describe(self) -> dict[str, Any]:
        """The settings as JSON (what a resumed CLI run must match)."""
        return {
            "instruction": self.instruction.templates[self.template].text,
            "beams": self.beam,
            "max_tokens": self.max_tokens,
            "constraints": self.constraints,
        }


# ------------------------------------------------------------------------------------------- checkpoint side
def generator_names(model: OnePeaceModel) -> list[str]:
    """The generators of ``model``'s checkpoint (empty for a model that cannot generate)."""
    source = model.__dict__.get(ATTR)
    return list(source["records"]) if source else []


def _no_generator_message(model: OnePeaceModel) -> str:
    trained = getattr(model, "trained_with", None)
    if trained and "generation" in trained.get("uses", []):
        return (
            f"this checkpoint's run (recipe {trained.get('recipe')!r}) trained a decoder, but the checkpoint does "
            "not record it (written before one-peace recorded decoders in checkpoints); train again, or resume the run"
        )
    if trained:
        uses = ", ".join(trained.get("uses", [])) or "nothing it records"
        return (
            f"this checkpoint was trained by recipe {trained.get('recipe')!r} for {uses}, not for generation: it has "
            "no text decoder; generate with a checkpoint of a seq2seq recipe (vl_seq2seq, vl_classify, vl_grounding)"
        )
    return (
        "this model has no text decoder (a model built in code, or an official checkpoint: its pretraining decoder "
        "reconstructs features, it does not write text); generate with a checkpoint of a seq2seq recipe"
    )


def get_generator(model: OnePeaceModel, name: str | None = None) -> Generator:
    """The generator ``name`` of ``model``'s checkpoint (the only one when ``None``), built on first use.

    Raises:
        GenerationError: the model has no decoder (naming the recipe that trained it), or several and no ``name``.
    """
    source = model.__dict__.get(ATTR)
    if not source:
        raise GenerationError(_no_generator_message(model))
    names = list(source["records"])
    if name is None:
        if len(names) > 1:
            raise GenerationError(f"this checkpoint has several generators {names}: pass generator=<one of them>")
        name = names[0]
    if name not in source["records"]:
        raise GenerationError(f"generator={name!r}: this checkpoint has {names}")
    if name not in source["built"]:
        record = source["records"][name]
        state = decoder_state(source["folder"], record, f"{source['folder']} generators.{name}")
        source["built"][name] = Generator(model, name, record, state, where=f"{source['folder']} generators.{name}")
    return source["built"][name]  # type: ignore[no-any-return]


def load_generator(
    path: str | Path,
    generator: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Generator:
    """Load a seq2seq checkpoint folder with its decoder: ``load_generator(ck).generate(["cat.png"])``.

    Equivalent to ``one_peace.load(path).generate(...)`` with the decoder read at once (a missing or damaged
    decoder file fails here, not at the first call).
    """
    import one_peace

    return get_generator(one_peace.load(path, dtype=dtype, device=device), generator)


# ------------------------------------------------------------------------------------------------ generation
class Generator:
    """A checkpoint's text decoder beside its encoder, with the instruction and settings its run validated with.

    Args:
        model: The encoder (with its tokenizer).
        name: The generator's name (the run's task name).
        record: Its ``trained.generators`` record.
        state: The decoder's weights.
        where: Where the record came from (for errors).
    """

    def __init__(
        self, model: OnePeaceModel, name: str, record: Mapping[str, Any], state: Mapping[str, Any], where: str
    ) -> None:
        from one_peace.train.instructions import Instruction, InstructionError
        from one_peace.train.seq2seq_task import Seq2SeqTask

        if model.tokenizer is None:
            raise CheckpointError(f"{where}: generation needs the checkpoint's tokenizer, and it has none")
        self.model, self.name, self.record = model, name, dict(record)
        try:
            self.instruction = Instruction(record["instruction"], modalities=list(model.config.modalities))
        except InstructionError as exc:
            raise CheckpointError(f"{where}.instruction: {exc}") from None
        sizes = {k: v for k, v in record["decoder"].items() if k not in ("vocab_size", "encoder_dim")}
        try:
            self.task = Seq2SeqTask(model, model.tokenizer, self.instruction, sizes)
            self.task.decoder.load_state_dict(dict(state))
        except (TypeError, ValueError, RuntimeError) as exc:  # sizes the decoder does not take, other shapes
            raise CheckpointError(f"{where}: the decoder does not match its record: {exc}") from None
        self.task.eval()

    @property
    def modalities(self) -> tuple[str, ...]:
        """The media modalities the encoder side reads (besides the text prompt)."""
        return tuple(self.task.modalities)

    def settings(
        self,
        instruction: str | None = None,
        beams: int | None = None,
        max_tokens: int | None = None,
        constraints: Sequence[str] | None = None,
        template: int = 0,
    ) -> Settings:
        """Resolve one call's settings against the record.

        Args:
            instruction: ``None``: the trained instruction. A full instruction (``source -> target``), or a source
                side only, to which the trained target is appended; it must feed the trained media modalities.
            beams: Beam size (default: the run's validation beam; 1 is greedy).
            max_tokens: Most generated tokens (default: the run's, 30 for text and 6 for boxes).
            constraints: Allowed outputs (closed-set decoding through a token trie); default: the training labels
                when the instruction's target has ``closed_set``, else free decoding.
            template: Which template of a ``|||`` instruction (generation is deterministic; training sampled them).
        """
        from one_peace.train.instructions import Instruction

        if instruction is None:
            parsed = self.instruction
        else:
            text = str(instruction)
            if "->" not in text:
                text = f"{text} -> {self.instruction.templates[0].text.split('->', 1)[1].strip()}"
            parsed = Instruction(text, modalities=list(self.model.config.modalities))
        if not 0 <= template < len(parsed.templates):
            raise GenerationError(f"template={template}: the instruction has {len(parsed.templates)} template(s)")
        t = parsed.templates[template]
        feeds = tuple(s.kind for s in t.source_slots if s.kind not in (LANGUAGE, "box"))
        if feeds != self.modalities:
            raise GenerationError(
                f"instruction {t.text!r} feeds {list(feeds)}, but this decoder was trained on {list(self.modalities)}"
            )
        box = any(s.kind == "box" for s in t.target_slots)
        uses_box = box or any(s.kind == "box" for s in t.source_slots)
        if uses_box and not self.task.uses_box:
            raise GenerationError(f"instruction {t.text!r} has a BOX slot, but this decoder has no location tokens")
        beam = int(self.record["beam"] if beams is None else beams)
        limit = int(self.record["max_tokens"] if max_tokens is None else max_tokens)
        longest = self.task.decoder.config.max_positions
        if beam < 1 or not 1 <= limit <= longest:
            raise GenerationError(f"beams must be >= 1 and max_tokens in [1, {longest}], got {beam} and {limit}")
        values: list[str] | None = None
        if constraints is not None:
            values = [str(c) for c in constraints]
            if not values or box:
                raise GenerationError("constraints: a non-empty list of allowed texts (not for BOX targets)")
        elif any("closed_set" in s.attrs for s in t.target_slots):
            values = self.record.get("closed_set") or None
            if values is None:
                raise GenerationError("the target is closed_set, but the checkpoint records no set: pass constraints=")
        trie = self.task.trie(values) if values else None
        return Settings(parsed, template, beam, limit, trie, BOX_TARGET if box else TEXT_TARGET, uses_box, values)

    def rows_of(self, inputs: Any, settings: Settings) -> list[Mapping[str, Any]]:
        """``inputs`` as rows: dicts stay; a bare item (a path, a PIL image...) fills the template's one media field."""
        if isinstance(inputs, Mapping):
            return [inputs]
        from one_peace.models.encoding import as_item_list

        items = as_item_list(inputs)
        t = settings.instruction.templates[settings.template]
        reads = sorted({s.field for s in t.source_slots})
        rows: list[Mapping[str, Any]] = []
        for item in items:
            if isinstance(item, Mapping):
                rows.append(item)
            elif len(reads) == 1:
                rows.append({reads[0]: item})
            else:
                raise GenerationError(f"instruction {t.text!r} reads the fields {reads}: give rows (dicts) with them")
        return rows

    def prepare(self, row: Mapping[str, Any], settings: Settings, base_dir: Path) -> tuple[Any, ...]:
        """One row preprocessed: ``(samples by modality, prompt pieces, image size or None)``.

        Raises:
            one_peace.errors.DataError: a missing field, a missing or undecodable file, a malformed value.
        """
        from one_peace.models.encoding import preprocessor

        if isinstance(row, Mapping) and "__error__" in row:  # a row that could not be read (a damaged line)
            raise UndecodableMedia(str(row["__error__"]))
        t = settings.instruction.templates[settings.template]
        samples: dict[str, Any] = {}
        resolved: list[Any] = []
        for slot in t.source_slots:
            value = row.get(slot.field) if isinstance(row, Mapping) else None
            if value is None:
                raise MissingField(f"missing field {slot.field!r}")
            if slot.kind in (LANGUAGE, "box"):
                continue
            plugin = self.model.plugins[slot.kind]
            if isinstance(value, Path):
                row, value = {**row, slot.field: str(value)}, str(value)
            if isinstance(value, str | bytes | bytearray | memoryview | list):
                value = plugin.read_field(row, slot.field, base_dir)
            resolved.append(value)
            samples[slot.kind] = preprocessor(self.model, slot.kind)(value)
        size = None
        if settings.uses_box:
            if "width" in row and "height" in row:
                try:
                    size = (int(row["width"]), int(row["height"]))
                except (TypeError, ValueError):
                    raise InvalidValue(
                        f"width/height must be integers, got {row['width']!r}, {row['height']!r}"
                    ) from None
            else:
                size = _image_size(resolved)
        try:
            prompt = settings.instruction.render_source(row, settings.template, size)["prompt"]
        except (ValueError, TypeError) as exc:  # a malformed BOX field in the prompt
            raise InvalidValue(str(exc)) from None
        return samples, prompt, size

    @torch.inference_mode()
    def run_batch(self, prepared: Sequence[tuple[Any, ...]], settings: Settings) -> list[Generated]:
        """Generate for prepared rows (:meth:`prepare`), one batch."""
        from one_peace.models.encoding import to_device

        p = next(self.model.parameters())
        self.task.decoder.to(p.device, p.dtype)  # follows the encoder (``model.to`` does not reach it)
        was = self.model.training
        self.task.eval()
        try:
            batch = {
                m: to_device(self.model, self.model.plugins[m].collate([s[0][m] for s in prepared]))
                for m in self.modalities
            }
            rendered = [{"prompt": s[1], "mask_ratio": {}} for s in prepared]
            out = self.task.generate_rendered(batch, rendered, settings.beam, settings.max_tokens, settings.trie)
        finally:
            self.model.train(was)
        results = []
        for (ids, score), (_, _, size) in zip(out, prepared):
            box = self.task.decode_box(ids, size) if settings.kind == "box" else None
            text = self.task.decode_text(ids)
            results.append(Generated(text, float(score), settings.kind, box, list(ids), size))
        return results

    def stream(
        self,
        rows: Iterable[tuple[Any, Mapping[str, Any]]],
        settings: Settings,
        base_dir: str | Path = ".",
        batch_size: int = 16,
        workers: int = 0,
    ) -> Iterator[tuple[Any, Generated | DataError]]:
        """``(key, Generated or the DataError of a bad row)`` for ``(key, row)`` pairs, in order, batched; rows are
        decoded on ``workers`` threads (0: in this thread)."""
        base = Path(base_dir)
        pool = ThreadPoolExecutor(workers) if workers > 0 else None

        def prep(item: tuple[Any, Mapping[str, Any]]) -> tuple[Any, Any]:
            key, row = item
            try:
                return key, self.prepare(row, settings, base)
            except DataError as exc:
                return key, exc

        def flush(chunk: list[tuple[Any, Mapping[str, Any]]]) -> Iterator[tuple[Any, Generated | DataError]]:
            done = list(pool.map(prep, chunk) if pool is not None else map(prep, chunk))
            good = [p for _, p in done if not isinstance(p, DataError)]
            made = iter(self.run_batch(good, settings) if good else [])
            for key, got in done:
                yield key, got if isinstance(got, DataError) else next(made)

        try:
            chunk: list[tuple[Any, Mapping[str, Any]]] = []
            for item in rows:
                chunk.append(item)
                if len(chunk) == batch_size:
                    yield from flush(chunk)
                    chunk = []
            if chunk:
                yield from flush(chunk)
        finally:
            if pool is not None:
                pool.shutdown()

    def generate(
        self,
        inputs: Any,
        instruction: str | None = None,
        beams: int | None = None,
        max_tokens: int | None = None,
        constraints: Sequence[str] | None = None,
        template: int = 0,
        batch_size: int = 16,
        base_dir: str | Path = ".",
        progress: bool = False,
    ) -> list[Generated]:
        """One :class:`Generated` per input, in order (settings as :meth:`settings` describes them).

        ``inputs``: rows (dicts with the fields the instruction reads, e.g. ``{"image": "cat.png"}``; boxes come
        back in pixels of the image, whose size is read from it or from ``width``/``height`` fields) or bare items
        (paths, PIL images, bytes...) when the instruction reads one field.

        Raises:
            one_peace.errors.DataError: an input that cannot be read, naming its position.
        """
        settings = self.settings(instruction, beams, max_tokens, constraints, template)
        rows = self.rows_of(inputs, settings)
        pairs: Iterable[tuple[Any, Mapping[str, Any]]] = enumerate(rows)
        if progress:
            from tqdm import tqdm

            pairs = tqdm(pairs, total=len(rows), desc=f"generate ({self.name})", unit="item")
        results: list[Generated] = []
        for i, got in self.stream(pairs, settings, base_dir, batch_size):
            if isinstance(got, DataError):
                raise type(got)(f"input {i}: {got}") from got
            results.append(got)
        return results


def _image_size(values: Sequence[Any]) -> tuple[int, int]:
    """The pixel size of the first of ``values`` that is an image (PIL image, bytes or a path)."""
    import io

    from PIL import Image, UnidentifiedImageError

    for value in values:
        if isinstance(value, Image.Image):
            return value.size  # type: ignore[no-any-return]
        try:
            if isinstance(value, bytes):
                with Image.open(io.BytesIO(value)) as im:
                    return im.size  # type: ignore[no-any-return]
            if isinstance(value, Path):
                with Image.open(value) as im:
                    return im.size  # type: ignore[no-any-return]
        except (UnidentifiedImageError, OSError):
            continue
    raise InvalidValue("BOX slots need the image's size: give 'width' and 'height' fields with the row")
