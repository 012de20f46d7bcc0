"""Streaming multimodal loading on fairseq2's data pipeline: sharded, resumable, robust to bad samples.

Rows (manifest lines, in-memory dicts, or WebDataset shard samples) are split across ranks and shuffled
*before* media are decoded, so the resumable pipeline state holds rows, not images. Decoding runs on
``num_parallel_calls`` threads and never raises: a bad sample is skipped, counted by reason and logged with its
id; above ``max_bad_fraction`` (judged after ``min_samples_for_bad_check`` samples) the run stops with a report.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import logging
import math
import threading
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from one_peace.config import ModelConfig
from one_peace.data._fairseq2 import data_pipeline
from one_peace.data.manifest import ManifestReader, default_fields, validate_manifest
from one_peace.errors import DataError, InvalidValue, MissingField, NonFiniteData
from one_peace.registry import ModalityPlugin, get_plugin, list_modalities

logger = logging.getLogger(__name__)


_LIVE: weakref.WeakSet[MultimodalLoader] = weakref.WeakSet()
_ATEXIT_REGISTERED = False


def _close_live_loaders() -> None:
    """Release pipelines before fairseq2n's own exit hook runs (it crashes on pipelines still alive)."""
    for loader in list(_LIVE):
        loader.close()
    gc.collect()


class TooManyBadSamples(RuntimeError):
    """More than the allowed fraction of samples failed to decode; the message is the report."""


@dataclass(kw_only=True)
class LoaderConfig:
    """How batches are formed.

    Attributes:
        batch_size: Samples per batch (per rank).
        shuffle_window: Rows held for shuffling (0 = no shuffle). Rows are shuffled before media are decoded.
        seed: Base seed; epoch ``e`` shuffles with ``seed + e``.
        num_parallel_calls: Decoding threads.
        length_buckets: Upper bounds (tokens of ``bucket_by``) of length buckets; ``None`` = batches in order.
        bucket_by: Modality whose length selects the bucket (default: the first non-image modality).
        remainder: ``"drop"`` (default) drops samples that cannot fill a batch on every rank and reports them;
            ``"pad"`` pads the last batches with masked copies (``batch["valid"]`` is False for them).
        pack_length: When set, each batch carries a packing plan (``batch["pack"]``) placing the samples of
            ``bucket_by`` into rows of this many tokens, for ``OnePeaceModel.forward_packed``.
        max_bad_fraction: Stop when more than this fraction of samples is bad...
        min_samples_for_bad_check: ... once at least this many samples were read.
        allow_changed: Resuming with other data than the saved state's (another manifest or changed files) is an
            error unless this is set; then the resumed run starts a new epoch on the new data.
    """

    batch_size: int = 8
    shuffle_window: int = 1000
    seed: int = 0
    num_parallel_calls: int = 2
    length_buckets: list[int] | None = None
    bucket_by: str | None = None
    remainder: str = "drop"
    pack_length: int | None = None
    max_bad_fraction: float = 0.01
    min_samples_for_bad_check: int = 1000
    allow_changed: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming a bad field."""
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.remainder not in ("drop", "pad"):
            raise ValueError(f"data.remainder must be 'drop' or 'pad', got {self.remainder!r}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")


@dataclass
class EpochStats:
    """What one epoch of one rank saw."""

    epoch: int = 0
    rows: int = 0
    samples: int = 0
    batches: int = 0
    slots: int = 0
    bad: Counter[str] = field(default_factory=Counter)
    remainder_dropped: int = 0
    padded_samples: int = 0
    padding: dict[str, list[int]] = field(default_factory=dict)  # modality -> [padded positions, all positions]

    @property
    def bad_total(self) -> int:
        """Number of bad samples."""
        return sum(self.bad.values())

    def padding_fraction(self) -> dict[str, float]:
        """Fraction of padded positions per padded modality."""
        return {m: p / t for m, (p, t) in self.padding.items() if t}

    def report(self) -> str:
        """One-paragraph human-readable summary."""
        parts = [f"epoch {self.epoch}: {self.samples} samples in {self.batches} batches"]
        if self.bad:
            parts.append(f"{self.bad_total} bad skipped ({', '.join(f'{k}: {v}' for k, v in self.bad.most_common())})")
        if self.remainder_dropped:
            parts.append(f"{self.remainder_dropped} remainder samples dropped")
        if self.padded_samples:
            parts.append(f"{self.padded_samples} masked padding samples")
        if self.padding:
            parts.append("padding " + ", ".join(f"{m} {f:.1%}" for m, f in self.padding_fraction().items()))
        return "; ".join(parts)


@dataclass
class _Bad:
    sid: str
    reason: str
    detail: str


def _stats_from_dict(d: Mapping[str, Any]) -> EpochStats:
    st = EpochStats(**{k: v for k, v in d.items() if k != "bad"})
    st.bad = Counter(d.get("bad", {}))
    return st


def _classify(modality: str, exc: DataError) -> str:
    """The count category of a bad sample: the error's own reason, with the modality for media problems."""
    if exc.reason in ("undecodable", "empty"):
        return f"{exc.reason} {modality}"
    return exc.reason


class MultimodalLoader:
    """Batches of several modalities from a manifest, in-memory rows, or WebDataset shards.

    Args:
        source: A ``.jsonl``/``.tsv`` manifest, a list of row dicts (values may be raw bytes), or a folder /
            list of ``.tar`` shards written by ``python -m one_peace.data.shard``.
        fields: Modality -> field (``data.fields``); default: fields named after the modalities.
        model_config: Options (image size, audio length ...) for the modality preprocessors.
        tokenizer: The tokenizer (needed by a modality whose plugin has ``needs_tokenizer``: text).
        config: Batching options.
        rank: This process's rank.
        world_size: Number of ranks.
        modalities: Modalities to load when ``fields`` is not given (default: fields named after modalities).
        validate: Check the manifest's structure up front.
        passthrough: Fields copied raw into ``batch["raw"]`` (e.g. captions and boxes for instructions).
    """

    def __init__(
        self,
        source: str | Path | Sequence[Mapping[str, Any]] | Sequence[str | Path],
        fields: Mapping[str, str] | None = None,
        model_config: ModelConfig | None = None,
        tokenizer: Any = None,
        config: LoaderConfig | None = None,
        rank: int = 0,
        world_size: int = 1,
        modalities: Sequence[str] | None = None,
        validate: bool = True,
        passthrough: Sequence[str] = (),
    ) -> None:
        from one_peace.config import model_config as _cfg
        from one_peace.data.shards import ShardReader, list_shards
        from one_peace.extras import require

        require("train", "fairseq2", feature="the streaming loader (MultimodalLoader, on fairseq2's pipeline)")
        self.config = config or LoaderConfig()
        self.config.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.rank, self.world = rank, world_size
        self.passthrough = tuple(passthrough)
        self.rows: list[tuple[int, Mapping[str, Any]]] | None = None
        self.manifest: Path | None = None
        self.shards: list[Path] | None = None
        self.base_dir = Path.cwd()
        if isinstance(source, str | Path) and Path(source).is_file() and Path(source).suffix != ".tar":
            self.manifest = Path(source)
            self.base_dir = self.manifest.parent
        elif isinstance(source, str | Path) or (
            isinstance(source, Sequence) and source and isinstance(source[0], str | Path)
        ):
            self.shards = list_shards(source)  # type: ignore[arg-type]
        else:
            self.rows = [(i + 1, r) for i, r in enumerate(source) if isinstance(r, Mapping)]
            if len(self.rows) != len(source):
                raise TypeError("in-memory data must be a sequence of dict rows")
        self.fields = dict(fields) if fields else default_fields(modalities or self._guess_modalities())
        known = list(list_modalities())
        if self.manifest is not None and validate:
            self.num_rows: int | None = validate_manifest(self.manifest, self.fields, known)
        else:
            for m in self.fields:
                if m not in known:
                    raise ValueError(f"unknown modality {m!r} in the field map; registered: {sorted(known)}")
            self.num_rows = len(self.rows) if self.rows is not None else ShardReader(self.shards or []).count()
        cfg = model_config or _cfg("tiny", tuple(self.fields))
        self.model_config = cfg
        self.plugins = {m: get_plugin(m) for m in self.fields}
        self._bucket_by: str | None = None
        self.preprocessors = {}
        for m, plugin in self.plugins.items():
            if plugin.needs_tokenizer and tokenizer is None:
                raise ValueError(
                    f"loading {m} needs a tokenizer (one_peace.tokenizer.load_tokenizer / train_tokenizer, or the "
                    "model's own: model.tokenizer)"
                )
            self.preprocessors[m] = plugin.build_preprocessor(cfg, tokenizer)
        self.epoch = 0
        self._pipeline: Any = None
        self._restored: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self.stats = EpochStats()
        self.total_seen = 0
        self.total_bad = 0
        self._abort: str | None = None
        self.bad_reasons: Counter[str] = Counter()  # this epoch's bad rows by reason (each row is read once)
        self.bad_ids: set[str] = set()  # distinct bad rows over all epochs
        self._pool: ThreadPoolExecutor | None = None

    def _guess_modalities(self) -> list[str]:
        first: Mapping[str, Any] | None = None
        if self.rows:
            first = self.rows[0][1]
        elif self.manifest is not None:
            reader = ManifestReader(self.manifest)
            first = next(iter(reader), (0, {}))[1]
            reader.close()
        keys = set(first or {})
        found = [m for m in list_modalities() if m in keys]
        if not found:
            raise ValueError(
                f"no field is named after a registered modality ({sorted(list_modalities())}); pass fields="
            )
        return found

    # ------------------------------------------------------------------------------------------- pipeline
    def _source_builder(self) -> Any:
        global _ATEXIT_REGISTERED
        dp = data_pipeline()
        if not _ATEXIT_REGISTERED:  # registered after fairseq2n's hook, so it runs first (LIFO)
            atexit.register(_close_live_loaders)
            _ATEXIT_REGISTERED = True
        _LIVE.add(self)
        if self.manifest is not None:
            builder = dp.read_iterator(ManifestReader(self.manifest), reset_fn=lambda r: r.reset(), infinite=False)
        elif self.shards is not None:
            from one_peace.data.shards import ShardReader

            builder = dp.read_iterator(ShardReader(self.shards), reset_fn=lambda r: r.reset(), infinite=False)
        else:
            builder = dp.read_sequence(list(range(len(self.rows or []))))
        return builder

    def per_rank_rows(self) -> int:
        """Rows each rank reads per epoch (the global remainder of ``rows % world`` is dropped)."""
        return (self.num_rows or 0) // self.world

    def batches_per_epoch(self) -> int | None:
        """Batches every rank yields per epoch with fixed batching (``None`` with length buckets)."""
        if self.config.length_buckets:
            return None
        n = self.per_rank_rows()
        b = self.config.batch_size
        return n // b if self.config.remainder == "drop" else math.ceil(n / b)

    def _build(self) -> Any:
        # Rows are shuffled and grouped into batches *before* decoding, so the pipeline state holds row
        # references only (no decoded media) and batch counts depend on row counts alone.
        c = self.config
        builder = self._source_builder()
        if c.length_buckets:
            # Every rank reads all rows (cheap: no media decoded), shuffles them identically, forms the same
            # length buckets, and takes every world-th *batch*: equal batch counts on all ranks, no duplicates.
            if c.shuffle_window:
                builder = builder.shuffle(c.shuffle_window, seed=c.seed + self.epoch)
            builder = builder.map(self._with_length)
            sizes = [(c.batch_size, int(b)) for b in sorted(c.length_buckets)]
            builder = builder.bucket_by_length(
                sizes, selector="length", skip_above_max_examples=True, drop_remainder=c.remainder == "drop"
            )
            builder = builder.map(lambda items: [i["row"] for i in items])
            builder = builder.shard(self.rank, self.world, allow_uneven=False)
        else:
            builder = builder.shard(self.rank, self.world, allow_uneven=False)
            if c.shuffle_window:
                builder = builder.shuffle(c.shuffle_window, seed=c.seed + self.epoch)
            builder = builder.bucket(c.batch_size, drop_remainder=c.remainder == "drop")
        # Samples of a batch are decoded on a pool of ``num_parallel_calls`` threads inside one map call: a
        # fairseq2 parallel map would keep finished (decoded) batches in its state; this keeps the state rows-only.
        return builder.map(self._decode_batch).and_return()

    def _bucket_modality(self) -> str:
        """``data.bucket_by``, else the first loaded modality whose plugin estimates lengths (else the first).

        Decided once (it is asked for every row while bucketing)."""
        if self._bucket_by is None:
            default = ModalityPlugin.estimate_length
            estimating = [m for m, p in self.plugins.items() if type(p).estimate_length is not default]
            by = self.config.bucket_by or next(iter(estimating), next(iter(self.fields)))
            if by not in self.fields:
                raise ValueError(f"data.bucket_by: {by!r} is not one of the loaded modalities {list(self.fields)}")
            self._bucket_by = by
        return self._bucket_by

    def _with_length(self, item: Any) -> dict[str, Any]:
        """Attach a cheap length estimate (tokens, from the plugin) for length bucketing, without decoding media."""
        _, row = self._row(item)
        by = self._bucket_modality()
        plugin = self.plugins[by]
        try:
            value = plugin.resolve(row[self.fields[by]], self.base_dir)
            length = max(1, int(plugin.estimate_length(value, self.model_config, self.preprocessors[by])))
        except Exception:  # a bad sample: decoding will skip and count it
            length = 1
        # never longer than the largest bucket: bucket_by_length would drop such rows without a word; the bounds
        # group rows for batching, and a longer row simply joins the last bucket
        length = min(length, max(int(b) for b in self.config.length_buckets or [length]))
        # a zero-size tensor whose first dim is the length: what bucket_by_length measures, no memory
        return {"row": item, "length": torch.empty(length, 0)}

    def _row(self, item: Any) -> tuple[int, Mapping[str, Any]]:
        if isinstance(item, int) and self.rows is not None:
            return self.rows[item]
        return item  # type: ignore[no-any-return]

    def _decode_batch(self, items: list[Any]) -> dict[str, Any]:
        if self._pool is None and self.config.num_parallel_calls > 1:
            self._pool = ThreadPoolExecutor(self.config.num_parallel_calls, thread_name_prefix="one-peace-decode")
        samples = (
            list(self._pool.map(self._decode, items)) if self._pool is not None else [self._decode(i) for i in items]
        )
        good = [s for s in samples if not isinstance(s, _Bad)]
        return self._collate(good, len(items))

    def _decode(self, item: Any) -> dict[str, Any] | _Bad:
        line_no, row = self._row(item)
        sid = str(row.get("id", f"line {line_no}")) if isinstance(row, Mapping) else f"line {line_no}"
        modality = "row"
        try:
            if "__error__" in row:
                raise InvalidValue(row["__error__"])
            sample: dict[str, Any] = {"id": sid}
            for modality, fld in self.fields.items():
                if fld not in row:
                    raise MissingField(f"missing field {fld!r}")
                value = self.plugins[modality].resolve(row[fld], self.base_dir)
                out = self.preprocessors[modality](value)
                for k, v in out.items():
                    if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                        raise NonFiniteData(f"decoded {modality} {k} contains NaN or infinity")
                sample[modality] = out
            for fld in self.passthrough:
                if fld not in row:
                    raise MissingField(f"missing field {fld!r}")
                sample.setdefault("raw", {})[fld] = row[fld]
            result: dict[str, Any] | _Bad = sample
        except DataError as exc:  # a bad sample; anything else is a bug (of ours or a plugin's) and stops the run
            result = _Bad(sid, _classify(modality, exc), f"{type(exc).__name__}: {exc}")
        with self._lock:
            self.total_seen += 1
            if isinstance(result, _Bad):
                self.total_bad += 1
                self.bad_reasons[result.reason] += 1
                if result.sid not in self.bad_ids:  # logged once per row, not once per epoch
                    self.bad_ids.add(result.sid)
                    logger.warning("skipping sample %s: %s (%s)", result.sid, result.reason, result.detail)
            if self.total_seen >= self.config.min_samples_for_bad_check:
                self._judge_bad_fraction()
        return result

    def _judge_bad_fraction(self) -> None:
        """Set the abort report when this epoch's bad fraction (of distinct rows read) exceeds the limit."""
        c = self.config
        if self.total_seen and self.total_bad / self.total_seen > c.max_bad_fraction and self._abort is None:
            self._abort = (
                f"epoch {self.epoch}: {self.total_bad} of {self.total_seen} distinct samples were bad "
                f"({self.total_bad / self.total_seen:.1%} > {c.max_bad_fraction:.1%}); "
                f"reasons: {dict(self.bad_reasons)}"
            )

    def _collate(self, samples: list[dict[str, Any]], slots: int) -> dict[str, Any]:
        """Collate ``samples``; empty slots (bad samples, padded remainder) are masked copies (``valid`` False)."""
        target = max(slots, self.config.batch_size if self.config.remainder == "pad" else slots)
        valid = [True] * len(samples) + [False] * (target - len(samples))
        if not samples:
            return {"ids": [], "valid": torch.zeros(target, dtype=torch.bool), "empty": True}
        filled = samples + [samples[0]] * (target - len(samples))
        batch: dict[str, Any] = {"ids": [s["id"] for s in filled], "valid": torch.tensor(valid)}
        for m in self.fields:
            batch[m] = self.plugins[m].collate([s[m] for s in filled])
        if self.passthrough:
            batch["raw"] = {f: [s["raw"][f] for s in filled] for f in self.passthrough}
        if self.config.pack_length:
            from one_peace.models.packing import plan_packing

            by = self._bucket_modality()
            lengths = self.plugins[by].token_lengths(batch[by])
            batch["pack"] = {
                "modality": by,
                "row_length": self.config.pack_length,
                "rows": plan_packing(lengths, self.config.pack_length),
            }
        return batch

    def _account(self, batch: dict[str, Any]) -> None:
        st = self.stats
        st.batches += 1
        st.slots += len(batch["valid"])
        st.samples += int(batch["valid"].sum())
        st.padded_samples += int((~batch["valid"]).sum())
        for m, plugin in self.plugins.items():
            pad = plugin.padding(batch[m])
            if pad is not None:
                acc = st.padding.setdefault(m, [0, 0])
                acc[0] += int(pad.sum())
                acc[1] += pad.numel()

    # --------------------------------------------------------------------------------------------- public
    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (a new shuffle order) at the next iteration."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._pipeline = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches of the current epoch (resuming mid-epoch after :meth:`load_state_dict`).

        Every batch has ``ids``, ``valid`` (False for masked slots: bad samples, padded remainder) and one
        collated batch per modality.
        """
        if self._pipeline is None:
            self._pipeline = self._build()
            restored = self._restored
            self._restored = None
            if restored is not None:
                self._pipeline.load_state_dict(restored["pipeline"])
                self.stats = _stats_from_dict(restored["stats"])
                self.total_seen, self.total_bad = restored["seen"], restored["bad"]
                self.bad_reasons = Counter(restored["bad_reasons"])
                self.bad_ids = set(restored.get("bad_ids", ()))
            else:
                self.stats = EpochStats(epoch=self.epoch, rows=self.per_rank_rows())
                # counts are per epoch: a bad row read again in the next epoch is the same bad row, not a new one
                self.total_seen, self.total_bad, self.bad_reasons = 0, 0, Counter()
        yielded = 0
        resumed_mid_epoch = self.stats.batches > 0
        for batch in self._pipeline:
            if self._abort:
                raise TooManyBadSamples(self._abort)
            if batch.get("empty"):  # every sample of this batch was bad: nothing to yield
                self.stats.batches += 1
                self.stats.slots += len(batch["valid"])
                continue
            self._account(batch)
            yielded += 1
            yield batch
        if self.total_seen < self.config.min_samples_for_bad_check:  # a whole epoch smaller than the sample size
            with self._lock:
                self._judge_bad_fraction()
        if self._abort:
            self._pipeline = None
            raise TooManyBadSamples(self._abort)
        if yielded == 0 and not resumed_mid_epoch:
            self._pipeline = None
            rows = self.per_rank_rows()
            why = (
                f"remainder='drop' drops the {rows} rows that cannot fill a batch of {self.config.batch_size}"
                if self.config.remainder == "drop" and rows < self.config.batch_size
                else f"every sample read was bad ({dict(self.bad_reasons)})"
            )
            raise ValueError(
                f"{self.manifest or 'the data'}: epoch {self.epoch} yields no batch on rank {self.rank} of "
                f"{self.world}: {rows} rows per rank, batch size {self.config.batch_size}; {why}. "
                "Use more rows, a smaller trainer.batch_size, or data.remainder=pad."
            )
        self.stats.bad = Counter(self.bad_reasons)
        if self.config.remainder == "drop":  # rows of this rank that did not fill a batch
            self.stats.remainder_dropped = max(0, self.stats.rows - self.stats.slots)
        logger.info("%s", self.stats.report())
        self._pipeline = None
        self.epoch += 1

    def close(self) -> None:
        """Release the fairseq2 pipeline and the decoding threads (call before the interpreter exits)."""
        self._pipeline = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def state_dict(self) -> dict[str, Any]:
        """Resume state: epoch, the fairseq2 pipeline state (position, shuffle buffer of *rows*, RNG) and counters.

        It holds rows and RNG tensors, not decoded media; save it with ``torch.save`` in the training state.
        """
        pipeline = self._pipeline.state_dict() if self._pipeline is not None else None
        return {
            "epoch": self.epoch,
            "pipeline": pipeline,
            "stats": dataclasses.asdict(self.stats),
            "seen": self.total_seen,
            "bad": self.total_bad,
            "bad_reasons": dict(self.bad_reasons),
            "bad_ids": sorted(self.bad_ids),
            "data": self.data_identity(),
        }

    def data_identity(self) -> dict[str, Any]:
        """What data this loader reads: path(s), sizes, a hash of each file's first and last KiB, row count."""
        from one_peace.data.shards import files_identity

        files = [self.manifest] if self.manifest is not None else list(self.shards or [])
        return {"files": files_identity(files), "rows": self.num_rows}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next iteration continues exactly where it stopped.

        Raises:
            ValueError: the state was saved over other data (unless ``allow_changed``, which starts a new epoch).
        """
        saved, now = state.get("data"), self.data_identity()
        if saved is not None and saved != now:
            if not self.config.allow_changed:
                raise ValueError(
                    f"resume: the data differs from the checkpoint's (saved {saved}, now {now}); resume with the "
                    "same data, or set data.allow_changed=true to start a new epoch on the new data"
                )
            logger.warning(
                "resume: the data changed (data.allow_changed=true): starting epoch %s afresh", state["epoch"] + 1
            )
            self.epoch = int(state["epoch"]) + 1
            self._pipeline = None
            self._restored = None
            return
        self.epoch = int(state["epoch"])
        self._pipeline = None
        self._restored = dict(state) if state.get("pipeline") is not None else None
