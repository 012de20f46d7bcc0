"""Batched inference behind :meth:`OnePeaceModel.encode` and :meth:`OnePeaceModel.encode_multimodal`.

Raw items go through the plugin's preprocessor, are grouped by length inside a window of items (so a batch
holds items of similar length and pads little), are collated and encoded under ``torch.inference_mode()`` in
the model's dtype and device, and come back in input order. The same pieces stream a corpus for
``python -m one_peace.embed`` (:func:`embed_samples`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from one_peace.errors import DataError

if TYPE_CHECKING:
    from one_peace.models.encoder import OnePeaceModel

#: items preprocessed and sorted by length at a time, in batches (a bound on host memory for long inputs)
WINDOW_BATCHES = 8
LONG_TEXT_MODES = ("truncate", "chunks")
OUTPUTS = ("torch", "numpy")
FUSE_MODES = ("joint", "mean")


def as_item_list(items: Any) -> list[Any]:
    """``items`` as a list of items: one str/bytes/path/PIL image/array/``(waveform, rate)`` pair is one item.

    A list or tuple of items stays a list (a video given as frames is one item: ``[[frame, frame, ...]]``).
    """
    single = (str, bytes, bytearray, memoryview, Path, np.ndarray, torch.Tensor)
    if isinstance(items, single) or not isinstance(items, Sequence | Iterable):
        return [items]
    if isinstance(items, tuple) and len(items) == 2 and isinstance(items[1], int | np.integer):
        return [items]  # an audio (waveform, sample_rate) pair
    if _is_pil(items):
        return [items]
    return list(items)


def _is_pil(item: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a core dependency
        return False
    return isinstance(item, Image.Image)


def sample_length(sample: Mapping[str, Any]) -> int:
    """A cost proxy of one preprocessed sample for batching by length: the elements of its tensors."""
    return sum(v.numel() for v in sample.values() if isinstance(v, torch.Tensor))


def preprocessor(model: OnePeaceModel, modality: str) -> Callable[[Any], dict[str, Any]]:
    """The model's (cached) preprocessor of ``modality``."""
    if modality not in model._preprocessors:
        model._preprocessors[modality] = model.plugins[modality].build_preprocessor(model.config, model.tokenizer)
    return model._preprocessors[modality]  # type: ignore[no-any-return]


def chunker(model: OnePeaceModel, modality: str) -> Callable[[Any], list[dict[str, Any]]] | None:
    """The plugin's splitter of over-long inputs into several samples, or ``None`` when it has none."""
    key = f"{modality}:chunks"
    if key not in model._preprocessors:
        model._preprocessors[key] = model.plugins[modality].build_chunker(model.config, model.tokenizer)
    return model._preprocessors[key]  # type: ignore[no-any-return]


def to_device(model: OnePeaceModel, batch: Mapping[str, Any]) -> dict[str, Any]:
    """A collated batch on the model's device, floating tensors in its dtype."""
    p = next(model.parameters())
    return {
        k: (v.to(p.device, p.dtype) if v.is_floating_point() else v.to(p.device)) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def project(model: OnePeaceModel, modality: str, hidden: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """The modality head on the CLS state of ``hidden (B, T, D)``; L2-normalised when ``normalize``."""
    out = model.heads[model.groups[modality]](hidden[:, 0])
    return F.normalize(out, dim=-1, eps=1e-12) if normalize else out


#: the attribute of a model holding its compiled forward (a reference cycle with the model, freed with it: a cache
#: keyed by the model whose value, a compiled bound method, referenced the model kept every compiled model alive)
_COMPILED_ATTR = "_one_peace_compiled_forward"


def compiled_forward(model: OnePeaceModel) -> Callable[..., Any]:
    """``model.forward_features`` through ``torch.compile``, built once per model and reused.

    The first batch pays the compilation (about 30 s for the base model on 2 CPU cores; a second batch shape, e.g.
    another text length or a partial last batch, recompiles once with dynamic sizes, torch.compile's default);
    every batch after it runs the fused kernels (the base image tower: ~1.09x open_clip's eager ViT-B/16 per FLOP in
    fp32 and ~1.02x in pure bf16 here, against ~0.98x and ~0.83x eager; ``benchmarks/RESULTS.md``). Worth it for
    corpora, not for a handful of items. The compiled function lives on the model and goes with it.
    """
    fn = model.__dict__.get(_COMPILED_ATTR)
    if fn is None:
        fn = torch.compile(model.forward_features)
        object.__setattr__(model, _COMPILED_ATTR, fn)  # a plain attribute: not a submodule, not in state_dict
    return fn  # type: ignore[no-any-return]


def forward_batch(
    model: OnePeaceModel,
    modality: str,
    batch: Mapping[str, Any],
    normalize: bool,
    compiled: bool = False,
    precision: str | None = None,
) -> torch.Tensor:
    """Embeddings of one ready batch (no mode or grad changes); ``compiled``: through :func:`compiled_forward`;
    ``precision`` (resolved: not ``auto``): the model in that precision (:mod:`one_peace.models.precision`), in the
    model's dtype when ``None``."""
    from one_peace.models.precision import int8_runner, model_in

    if precision == "int8":
        if not normalize:
            raise ValueError("precision='int8' gives L2-normalised embeddings only (normalize=True)")
        return int8_runner(model, modality)(dict(batch)).to(next(model.parameters()).device)
    runner = model_in(model, precision) if precision is not None else model
    forward = compiled_forward(runner) if compiled else runner.forward_features
    out = forward({modality: to_device(runner, batch)})
    return project(runner, modality, out.hidden[modality], normalize)


class _EvalMode:
    """Inference mode and eval mode for the duration of a call; the caller's training flag is restored."""

    def __init__(self, model: OnePeaceModel) -> None:
        self.model = model
        self.was_training = model.training
        self.inference = torch.inference_mode()

    def __enter__(self) -> None:
        self.model.eval()
        self.inference.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.inference.__exit__(*exc)
        self.model.train(self.was_training)


def embed_samples(
    model: OnePeaceModel,
    modality: str,
    samples: Iterable[tuple[Any, list[dict[str, Any]]]],
    batch_size: int = 64,
    normalize: bool = True,
    compile: bool = False,
    precision: str | None = None,
    window_batches: int = WINDOW_BATCHES,
) -> Iterator[tuple[Any, torch.Tensor]]:
    """Stream ``(key, embedding)`` for ``(key, [sample, ...])`` pairs, batching by length inside windows of
    ``window_batches`` batches (1: samples of one length, e.g. timed segments, held one batch at a time).

    Each key carries one or more preprocessed samples (several: the chunks of a long text); its embedding is the
    L2-normalised mean of its samples' normalised embeddings (one sample: its embedding). Keys come out in the
    order they went in. Runs under inference mode and eval mode; ``compile`` runs the compiled forward
    (:func:`compiled_forward`); ``precision``: see :func:`forward_batch` (``auto`` is resolved here).
    """
    if precision is not None:
        from one_peace.models.precision import resolve_precision

        precision = resolve_precision(precision, next(model.parameters()).device)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plugin = model.plugins[modality]
    window = batch_size * max(1, window_batches)

    def flush(pending: list[tuple[Any, list[dict[str, Any]]]]) -> Iterator[tuple[Any, torch.Tensor]]:
        flat = [(i, s) for i, (_, group) in enumerate(pending) for s in group]
        order = sorted(range(len(flat)), key=lambda j: sample_length(flat[j][1]))
        parts: list[list[torch.Tensor]] = [[] for _ in pending]
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            batch = plugin.collate([flat[j][1] for j in chosen])
            emb = forward_batch(model, modality, batch, normalize, compile, precision)
            if precision is not None:  # another precision's vectors, in the model's dtype as without one
                emb = emb.to(dtype)
            for row, j in enumerate(chosen):
                parts[flat[j][0]].append(emb[row])
        for (key, _), got in zip(pending, parts):
            if len(got) == 1:
                yield key, got[0]
            else:
                mean = torch.stack([F.normalize(g, dim=-1, eps=1e-12) for g in got]).mean(0)
                yield key, F.normalize(mean, dim=-1, eps=1e-12) if normalize else mean

    with _EvalMode(model):
        pending: list[tuple[Any, list[dict[str, Any]]]] = []
        for key, group in samples:
            pending.append((key, group))
            if sum(len(g) for _, g in pending) >= window:
                yield from flush(pending)
                pending = []
        if pending:
            yield from flush(pending)


def encode(
    model: OnePeaceModel,
    modality: str,
    items: Any,
    batch_size: int = 64,
    normalize: bool = True,
    output: str = "torch",
    progress: bool = False,
    long_text: str = "truncate",
    compile: bool = False,
    precision: str | None = None,
    segments: Any = None,
) -> Any:
    """``(N, D)`` embeddings of one modality, in input order, L2-normalised unless ``normalize=False``.

    Args:
        modality: A modality of this model.
        items: A list of raw inputs (or one): strings, paths, bytes, PIL images, numpy/torch arrays,
            ``(waveform, sample_rate)`` pairs (a bare 1-D array is taken as 16 kHz), a video path or a
            video as a list of frames (``[[frame, ...]]``), a video file as ``audio`` (its sound track); or a
            ready batch dict (one forward, as the plugin's collator makes it).
        batch_size: Items per forward; items are grouped by length within windows of 8 batches.
        normalize: L2-normalise (the default); ``False`` gives the raw head output.
        output: ``"torch"`` (on the model's device) or ``"numpy"`` (float32).
        progress: Show a progress bar.
        long_text: ``"truncate"`` (to the tokenizer's limit, 70 tokens for the official model; one warning per
            call) or ``"chunks"``: the normalised mean of the embeddings of consecutive limit-sized chunks.
        compile: Run the forward through ``torch.compile`` (compiled once per model, see
            :func:`compiled_forward`): faster per item after a one-time compilation.
        precision: ``None`` (the model's own dtype), ``"fp32"``, ``"bf16"``, ``"fp16"``, ``"int8"`` (ONNX Runtime's
            int8 graph of this modality: the ``export`` extra) or ``"auto"`` (bf16 where measured faster, else
            fp32); see :mod:`one_peace.models.precision`. Vectors come back in the model's dtype.
        segments: Long media (a modality with a time axis: audio, video) cut into timed windows, each embedded on its
            own: seconds (the window), a ``{window, hop, min_length}`` mapping or a
            :class:`~one_peace.segments.SegmentSpec`; missing values are the plugin's defaults. Returns a
            :class:`~one_peace.segments.SegmentEmbeddings` (``vectors (M, D)``, and per row its ``item``, ``start``
            and ``end``); media are decoded one window at a time.

    Raw items run under ``torch.inference_mode()`` in eval mode (the training flag is restored afterwards); a
    ready batch dict is one plain forward in the caller's mode, with gradients when enabled (as before).
    """
    if "+" in modality:  # a fused item: every item feeds each modality, one joint pass (encode_multimodal)
        if segments is not None or precision is not None or isinstance(items, Mapping):
            raise ValueError(f"{modality}: a fused item takes raw items only (no segments, precision or ready batch)")
        return encode_multimodal(model, dict.fromkeys(modality.split("+"), items), "joint", None, batch_size, output)
    if modality not in model.adapters:
        raise KeyError(f"modality {modality!r} is not in this model (it has {list(model.adapters)})")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if long_text not in LONG_TEXT_MODES:
        raise ValueError(f"long_text must be one of {LONG_TEXT_MODES}, got {long_text!r}")
    if isinstance(items, Mapping):  # a ready batch: one forward as before (caller's mode and grad: trainable)
        if precision is not None:
            raise ValueError("precision= applies to raw items; a ready batch runs in the model's own precision")
        emb = forward_batch(model, modality, items, normalize, compile)
        return emb.float().cpu().numpy() if output == "numpy" else emb
    items = as_item_list(items)
    if not items:
        raise ValueError(f"no {modality} inputs given")
    if segments is not None:
        from one_peace.segments import encode_segments

        return encode_segments(model, modality, items, segments, batch_size, normalize, output, progress, precision)
    prep = preprocessor(model, modality)
    split = chunker(model, modality) if long_text == "chunks" else None
    truncated = 0

    def samples() -> Iterator[tuple[int, list[dict[str, Any]]]]:
        nonlocal truncated
        for i, item in enumerate(items):
            try:
                group = split(item) if split is not None else [prep(item)]
            except DataError as exc:
                raise type(exc)(f"{modality} input {i}: {exc}") from exc
            truncated += any(s.get("truncated") for s in group)
            yield i, group

    stream: Iterable[tuple[int, list[dict[str, Any]]]] = samples()
    if progress:
        from tqdm import tqdm

        stream = tqdm(stream, total=len(items), desc=f"encode {modality}", unit="item")
    rows = [emb for _, emb in embed_samples(model, modality, stream, batch_size, normalize, compile, precision)]
    if truncated:
        limit = getattr(model.tokenizer, "max_tokens", None)
        warnings.warn(
            f"{truncated} of {len(items)} {modality} inputs were longer than the model's limit"
            + (f" ({limit} tokens)" if limit else "")
            + " and were truncated; long_text='chunks' embeds them whole (mean of chunk embeddings)",
            stacklevel=3,
        )
    out = torch.stack(rows)
    return out.float().cpu().numpy() if output == "numpy" else out


def embed_fused_samples(
    model: OnePeaceModel, parts: Sequence[str], samples: Iterable[tuple[Any, dict[str, Any]]], batch_size: int = 64
) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(key, embedding)`` of fused items: ``(key, {modality: preprocessed sample})`` pairs, one joint pass per
    batch, the embedding as ``encode_multimodal(fuse="joint")`` defines it (equal weights), in input order."""
    pending: list[tuple[Any, dict[str, Any]]] = []

    def flush() -> Iterator[tuple[Any, torch.Tensor]]:
        batch = {m: to_device(model, model.plugins[m].collate([s[m] for _, s in pending])) for m in parts}
        out = model.forward_features(batch)
        joint = torch.stack([project(model, m, out.hidden[m]) for m in parts]).mean(0)
        yield from zip([k for k, _ in pending], F.normalize(joint, dim=-1, eps=1e-12))

    with _EvalMode(model):
        for key, sample in samples:
            pending.append((key, sample))
            if len(pending) == batch_size:
                yield from flush()
                pending = []
        if pending:
            yield from flush()


def encode_multimodal(
    model: OnePeaceModel,
    inputs: Mapping[str, Any],
    fuse: str = "joint",
    weights: Mapping[str, float] | None = None,
    batch_size: int = 64,
    output: str = "torch",
) -> Any:
    """One ``(N, D)`` embedding per composed query, e.g. ``{"image": [img], "text": ["in the snow"]}``.

    ``fuse="mean"``: the normalised weighted mean of the single-modality embeddings. ``fuse="joint"``: one
    fused forward over the modalities together (each attends to the others); each modality's head is applied
    to its own CLS state of that pass, each result L2-normalised, and the normalised weighted mean of those is
    returned. The official model was never trained with a fused head, so ``joint`` is a definition, not a
    reproduction. ``weights``: modality -> weight (default 1 each).
    """
    if fuse not in FUSE_MODES:
        raise ValueError(f"fuse must be one of {FUSE_MODES}, got {fuse!r}")
    if not isinstance(inputs, Mapping) or not inputs:
        raise ValueError("encode_multimodal expects a non-empty dict {modality: items}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(inputs))
    if unknown:
        raise KeyError(f"weights name modalities that are not in the query: {unknown} (query has {list(inputs)})")
    lists = {m: as_item_list(v) for m, v in inputs.items()}
    counts = {m: len(v) for m, v in lists.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"every modality of a composed query needs the same number of items, got {counts}")
    w = torch.tensor([float(weights.get(m, 1.0)) for m in lists])
    if fuse == "mean":
        embs = [encode(model, m, v, batch_size=batch_size) for m, v in lists.items()]
    else:
        for m in lists:
            if m not in model.adapters:
                raise KeyError(f"modality {m!r} is not in this model (it has {list(model.adapters)})")
        n = next(iter(counts.values()))
        embs_parts: list[list[torch.Tensor]] = [[] for _ in lists]
        with _EvalMode(model):
            for start in range(0, n, batch_size):
                batch = {
                    m: to_device(
                        model,
                        model.plugins[m].collate([preprocessor(model, m)(x) for x in v[start : start + batch_size]]),
                    )
                    for m, v in lists.items()
                }
                out = model.forward_features(batch)
                for k, m in enumerate(lists):
                    embs_parts[k].append(project(model, m, out.hidden[m]))
        embs = [torch.cat(p) for p in embs_parts]
    stacked = torch.stack(embs)  # (M, B, D), each row normalised
    fused = F.normalize((stacked * w.to(stacked)[:, None, None]).sum(0) / w.sum(), dim=-1, eps=1e-12)
    return fused.float().cpu().numpy() if output == "numpy" else fused
