"""Multimodal batches for training: a deterministic sampler of ours, decoding in ``DataLoader`` worker processes.

Rows (manifest lines, in-memory dicts, WebDataset shard samples) are addressed by index
(:mod:`one_peace.data.rows`). The :class:`~one_peace.data.sampler.EpochSampler` owns the order: shuffling, rank
sharding, length bucketing, the remainder and the packing plan all follow from ``(seed, epoch)``, so the resume
state is the epoch and the number of batches the training loop consumed. Decoding and collation run in
``torch.utils.data.DataLoader`` worker processes (``num_workers``; prefetching, persistent workers, pinned memory
for CUDA), or, with ``backend="fairseq2"``, on fairseq2's parallel map over the same plan (the same batches).

A bad sample is skipped, counted by reason and logged once with its id; the counts travel with each batch, so they
are exact however many batches the workers had prefetched. Above ``max_bad_fraction`` (judged after
``min_samples_for_bad_check`` samples, or at the end of a smaller epoch) the run stops with a report.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import warnings
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from one_peace.config import ModelConfig
from one_peace.data.decode import REPORT_KEY, BatchDecoder
from one_peace.data.manifest import default_fields, validate_manifest
from one_peace.data.rows import ManifestRows, RowSource, ShardRows, open_rows
from one_peace.data.sampler import EpochSampler, Plan
from one_peace.data.shards import describe_change, same_identity
from one_peace.registry import ModalityPlugin, get_plugin, list_modalities

logger = logging.getLogger(__name__)

#: ``LoaderConfig.backend`` values; ``auto`` is the torch backend
BACKENDS = ("auto", "torch", "fairseq2")
#: version of :meth:`MultimodalLoader.state_dict`'s layout (1: the fairseq2 pipeline state of one-peace 0.1)
STATE_VERSION = 2


class TooManyBadSamples(RuntimeError):
    """More than the allowed fraction of samples failed to decode; the message is the report.

    Attributes:
        bad_rows: ``(id, reason)`` of the distinct bad rows seen so far (at most 20).
    """

    def __init__(self, message: str, bad_rows: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.bad_rows = list(bad_rows)


@dataclass(kw_only=True)
class LoaderConfig:
    """How batches are formed.

    Attributes:
        batch_size: Samples per batch (per rank).
        shuffle_window: 0 = in order; ``>=`` the row count = a full permutation every epoch; otherwise blocks of this
            many consecutive rows in a random order, shuffled within (see
            :func:`one_peace.data.sampler.shuffled_order`).
        seed: Base seed; epoch ``e`` shuffles with ``(seed, e)``.
        backend: ``auto`` (= ``torch``): ``DataLoader`` worker processes; ``fairseq2``: fairseq2's parallel map and
            prefetch over the same plan (the ``fairseq2`` extra, torch 2.9.1). Both yield the same batches.
        num_workers: Decoding worker processes (torch backend; 0 = in the training process), or fairseq2's
            parallel calls (fairseq2 backend; at least 1).
        prefetch_factor: Batches each worker decodes ahead (fairseq2: ``prefetch_factor * num_workers`` batches).
        persistent_workers: Keep worker processes across epochs.
        pin_memory: Collate into pinned memory (set when training on CUDA).
        worker_start: Start method of worker processes (``fork``, ``spawn``, ``forkserver``; ``None``: the
            platform's default, but ``forkserver`` instead of ``fork`` once fairseq2 is loaded in the process).
            ``spawn``/``forkserver`` are the safe choices once CUDA is initialised.
        length_buckets: Upper bounds (tokens of ``bucket_by``) of length buckets; ``None`` = batches in order.
        bucket_by: Modality whose length selects the bucket (default: the first with a length estimate).
        remainder: ``"drop"`` (default) drops samples that cannot fill a batch on every rank and reports them;
            ``"pad"`` pads the last batches with masked copies (``batch["valid"]`` is False for them).
        pack_length: When set, each batch carries a packing plan (``batch["pack"]``) placing the samples of
            ``bucket_by`` into rows of this many tokens, for ``OnePeaceModel.forward_packed``.
        max_bad_fraction: Stop when more than this fraction of samples is bad...
        min_samples_for_bad_check: ... once at least this many samples were read.
        allow_changed: Resuming with other data or batching than the saved state's (another manifest, changed files,
            another batch size or world size) is an error unless this is set; then the resumed run starts a new
            epoch.
        extensions: Shards without a one-peace header: member extension -> the field it also fills, over the
            WebDataset defaults (``jpg`` -> ``image``, ``txt`` -> ``text``...; ``one_peace.data.rows``).
        num_parallel_calls: Deprecated (one release): taken as ``num_workers`` with a warning.
    """

    batch_size: int = 8
    shuffle_window: int = 1000
    seed: int = 0
    backend: str = "auto"
    num_workers: int = 0
    prefetch_factor: int = 2
    persistent_workers: bool = True
    pin_memory: bool = False
    worker_start: str | None = None
    length_buckets: list[int] | None = None
    bucket_by: str | None = None
    remainder: str = "drop"
    pack_length: int | None = None
    max_bad_fraction: float = 0.01
    min_samples_for_bad_check: int = 1000
    allow_changed: bool = False
    extensions: dict[str, str] = field(default_factory=dict)
    num_parallel_calls: int | None = None

    def __post_init__(self) -> None:
        if self.num_parallel_calls is not None:
            warnings.warn(
                "data.num_parallel_calls is deprecated and will be removed in the next release: use data.num_workers "
                f"(decoding worker processes); taken as num_workers={self.num_parallel_calls} for now",
                FutureWarning,
                stacklevel=3,
            )
            self.num_workers = int(self.num_parallel_calls)
            self.num_parallel_calls = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming a bad field."""
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.remainder not in ("drop", "pad"):
            raise ValueError(f"data.remainder must be 'drop' or 'pad', got {self.remainder!r}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.backend not in BACKENDS:
            raise ValueError(f"data.backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.worker_start not in (None, "fork", "spawn", "forkserver"):
            raise ValueError(f"data.worker_start must be fork, spawn, forkserver or null, got {self.worker_start!r}")
        if self.length_buckets is not None and not self.length_buckets:
            raise ValueError("data.length_buckets must name at least one bound, or be null")


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


def _stats_from_dict(d: Mapping[str, Any]) -> EpochStats:
    st = EpochStats(**{k: v for k, v in d.items() if k != "bad"})
    st.bad = Counter(d.get("bad", {}))
    return st


class _PlanFeed(torch.utils.data.Sampler):
    """The ``DataLoader``'s sampler: the plans of the current epoch from the resume position (set before each
    ``iter``). It lives in the training process; workers receive plans, never the position."""

    def __init__(self) -> None:
        self.plans: list[Plan] = []

    def __iter__(self) -> Iterator[Plan]:
        return iter(self.plans)

    def __len__(self) -> int:
        return len(self.plans)


def _worker_context(start: str | None) -> Any:
    """The multiprocessing context of the workers: ``start``, else the platform's default, except ``forkserver``
    where that default is ``fork`` and fairseq2's native library is loaded in this process: its thread pool does not
    survive a fork (a worker forked after a fairseq2 pipeline ran deadlocked in 1 of 2 tries)."""
    import multiprocessing

    if start is None and "fairseq2n" in sys.modules and multiprocessing.get_start_method() == "fork":
        start = "forkserver"
    return multiprocessing.get_context(start) if start else None


def _pass_through(batch: Any) -> Any:
    return batch


def _shutdown(dataloader: torch.utils.data.DataLoader[Any]) -> None:
    """Stop a ``DataLoader``'s persistent workers now. Left to garbage collection, the iterator's own clean-up
    waited 5 s per worker (measured: 10 s for 2 workers) before terminating them."""
    it = getattr(dataloader, "_iterator", None)
    if it is not None:
        it._shutdown_workers()
        dataloader._iterator = None


class MultimodalLoader:
    """Batches of several modalities from a manifest, in-memory rows, or WebDataset shards.

    Args:
        source: A ``.jsonl``/``.tsv`` manifest, a list of row dicts (values may be raw bytes), or a folder /
            list of ``.tar`` shards written by ``python -m one_peace.data.shard``.
        fields: Modality -> field (``data.fields``); default: fields named after the modalities.
        model_config: Options (image size, audio length ...) for the modality preprocessors.
        tokenizer: The tokenizer (needed by a modality whose plugin has ``needs_tokenizer``: text).
        config: Batching and decoding options.
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

        self.config = config or LoaderConfig()
        self.config.validate()
        if self.config.backend == "fairseq2":
            from one_peace.extras import require

            require("fairseq2", "fairseq2", feature="data.backend=fairseq2")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.rank, self.world = rank, world_size
        self.passthrough = tuple(passthrough)
        if isinstance(source, Sequence) and not isinstance(source, str) and not source:
            raise ValueError("the data source is empty (no rows, no shards)")
        self.source: RowSource = open_rows(source, self.config.extensions)
        self.manifest: Path | None = self.source.path if isinstance(self.source, ManifestRows) else None
        self.shards: list[Path] | None = self.source.files() if isinstance(self.source, ShardRows) else None
        self.base_dir = self.source.base_dir
        self.fields = dict(fields) if fields else default_fields(modalities or self._guess_modalities())
        known = list(list_modalities())
        if self.manifest is not None and validate:
            validate_manifest(self.manifest, self.fields, known)
        else:
            for m in self.fields:
                if m not in known:
                    raise ValueError(f"unknown modality {m!r} in the field map; registered: {sorted(known)}")
        self.num_rows = len(self.source)
        cfg = model_config or _cfg("tiny", tuple(self.fields))
        self.model_config = cfg
        self.plugins = {m: get_plugin(m) for m in self.fields}
        for m, plugin in self.plugins.items():
            if plugin.needs_tokenizer and tokenizer is None:
                raise ValueError(
                    f"loading {m} needs a tokenizer (one_peace.tokenizer.load_tokenizer / train_tokenizer, or the "
                    "model's own: model.tokenizer)"
                )
        c = self.config
        self.decoder = BatchDecoder(
            self.source,
            self.fields,
            cfg,
            tokenizer,
            self.passthrough,
            slots=c.batch_size if c.remainder == "pad" else None,
            pack_length=c.pack_length,
            bucket_by=self._bucket_modality(),
        )
        self.preprocessors = self.decoder.preprocessors
        self.sampler = EpochSampler(
            num_rows=self.num_rows,
            batch_size=c.batch_size,
            rank=rank,
            world=world_size,
            shuffle_window=c.shuffle_window,
            seed=c.seed,
            remainder=c.remainder,
            length_buckets=list(c.length_buckets) if c.length_buckets else None,
            lengths=self._lengths,
        )
        self.epoch = 0
        self.position = 0  # batches of this epoch the consumer has received
        self._restored: dict[str, Any] | None = None
        self.stats = EpochStats()
        self.total_seen = 0
        self.total_bad = 0
        self._abort: str | None = None
        self.bad_reasons: Counter[str] = Counter()  # this epoch's bad rows by reason (each row is read once)
        self.bad_ids: set[str] = set()  # distinct bad rows over all epochs
        self._bad_examples: dict[str, str] = {}  # id -> reason, the first few (for the stop message)
        self._logged: set[str] = set()  # bad rows already logged
        self._identity: dict[str, Any] | None = None
        self._feed = _PlanFeed()
        self._dataloader: torch.utils.data.DataLoader[Any] | None = None
        self._live: Any = None  # the running DataLoader iterator or fairseq2 pipeline
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def _guess_modalities(self) -> list[str]:
        keys = set(self.source[0][1]) if len(self.source) else set()
        found = [m for m in list_modalities() if m in keys]
        if not found:
            raise ValueError(
                f"no field is named after a registered modality ({sorted(list_modalities())}); pass fields="
            )
        return found

    def _bucket_modality(self) -> str:
        """``data.bucket_by``, else the first loaded modality whose plugin estimates lengths (else the first)."""
        default = ModalityPlugin.estimate_length
        estimating = [m for m, p in self.plugins.items() if type(p).estimate_length is not default]
        by = self.config.bucket_by or next(iter(estimating), next(iter(self.fields)))
        if by not in self.fields:
            raise ValueError(f"data.bucket_by: {by!r} is not one of the loaded modalities {list(self.fields)}")
        return by

    def _lengths(self) -> torch.Tensor:
        """Length estimates of every row (once per loader; asked by the sampler when bucketing)."""
        from tqdm import tqdm

        n = self.num_rows
        bar = tqdm(range(n), desc="length estimates", unit="row", leave=False, disable=n < 20_000 or self.rank != 0)
        return torch.tensor([self.decoder.length(i) for i in bar], dtype=torch.int64)

    # --------------------------------------------------------------------------------------------- sizes
    def per_rank_rows(self) -> int:
        """Rows each rank reads per epoch (the global remainder of ``rows % world`` is dropped)."""
        return self.num_rows // self.world

    def batches_per_epoch(self) -> int | None:
        """Batches every rank yields per epoch with fixed batching (``None`` with length buckets)."""
        if self.config.length_buckets:
            return None
        n = self.per_rank_rows()
        b = self.config.batch_size
        return n // b if self.config.remainder == "drop" else math.ceil(n / b)

    # ------------------------------------------------------------------------------------------ backends
    def _batches(self, plans: list[Plan]) -> Iterator[dict[str, Any]]:
        """Decoded batches of ``plans``, in order: in this process, in ``DataLoader`` workers, or by fairseq2."""
        c = self.config
        if c.backend == "fairseq2":
            from one_peace.data._fairseq2 import pipeline_batches

            return pipeline_batches(self.decoder, plans, c)
        if c.num_workers == 0:
            return (self.decoder[p] for p in plans)
        self._feed.plans = plans
        if self._dataloader is None:
            self._dataloader = torch.utils.data.DataLoader(
                self.decoder,  # type: ignore[arg-type]
                batch_size=None,
                sampler=self._feed,
                num_workers=c.num_workers,
                collate_fn=_pass_through,
                pin_memory=c.pin_memory,
                prefetch_factor=c.prefetch_factor,
                persistent_workers=c.persistent_workers,
                multiprocessing_context=_worker_context(c.worker_start),
            )
            self._finalizer = weakref.finalize(self, _shutdown, self._dataloader)
        return iter(self._dataloader)

    # ---------------------------------------------------------------------------------------- accounting
    def _take_report(self, report: Mapping[str, Any]) -> bool:
        """Count a consumed batch's samples and bad rows (in the training process, in consumption order).

        Returns False, committing nothing, when the batch takes the bad fraction over the limit: the stop then
        leaves the position before it, so a run resumed with a higher limit trains on it.
        """
        seen = self.total_seen + int(report["seen"])
        new_bad = report["bad"]
        bad = self.total_bad + len(new_bad)
        reasons, examples = self.bad_reasons, self._bad_examples
        if new_bad:  # (most batches have none: nothing is copied for them)
            reasons = reasons + Counter(reason for _, reason, _ in new_bad)
            examples = dict(examples)
            for sid, reason, detail in new_bad:
                if sid not in self.bad_ids and sid not in self._logged:  # logged once per row, not once per epoch
                    self._logged.add(sid)
                    logger.warning("skipping sample %s: %s (%s)", sid, reason, detail)
                if len(examples) < 20:
                    examples.setdefault(sid, reason)
        limit = self.config.max_bad_fraction
        if seen and seen >= self.config.min_samples_for_bad_check and bad / seen > limit:
            self._abort = self._report_stop(seen, bad, reasons, examples)
            self._bad_examples = examples
            return False
        self.total_seen, self.total_bad, self.bad_reasons, self._bad_examples = seen, bad, reasons, examples
        self.bad_ids.update(sid for sid, _, _ in new_bad)
        return True

    def _report_stop(self, seen: int, bad: int, reasons: Mapping[str, int], examples: Mapping[str, str]) -> str:
        shown = ", ".join(f"{sid} ({reason})" for sid, reason in list(examples.items())[:5])
        limit = self.config.max_bad_fraction
        return (
            f"epoch {self.epoch}: {bad} of {seen} distinct samples were bad ({bad / seen:.1%} > {limit:.1%}, the "
            f"limit data.max_bad_fraction={limit}); reasons: {dict(reasons)}; first bad rows: {shown}"
        )

    def _judge_bad_fraction(self) -> None:
        """Set the abort report when this epoch's bad fraction (of distinct rows read) exceeds the limit."""
        seen, bad = self.total_seen, self.total_bad
        if seen and bad / seen > self.config.max_bad_fraction and self._abort is None:
            self._abort = self._report_stop(seen, bad, self.bad_reasons, self._bad_examples)

    def _stop(self) -> TooManyBadSamples:
        assert self._abort is not None
        return TooManyBadSamples(self._abort, list(self._bad_examples.items()))

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
            self.position = 0
            self._restored = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches of the current epoch (resuming mid-epoch after :meth:`load_state_dict`).

        Every batch has ``ids``, ``valid`` (False for masked slots: bad samples, padded remainder) and one
        collated batch per modality.
        """
        self._release()
        self._abort = None
        restored, self._restored = self._restored, None
        if restored is not None and self.position > 0:  # resumed mid-epoch: the counters of the saved run
            self.stats = _stats_from_dict(restored["stats"])
            self.total_seen, self.total_bad = restored["seen"], restored["bad"]
            self.bad_reasons = Counter(restored["bad_reasons"])
        elif self.position == 0:  # a new epoch (an iteration left mid-epoch continues where it was)
            self.stats = EpochStats(epoch=self.epoch, rows=self.per_rank_rows())
            # counts are per epoch: a bad row read again in the next epoch is the same bad row, not a new one
            self.total_seen, self.total_bad, self.bad_reasons = 0, 0, Counter()
        plans = self.sampler.plans(self.epoch)
        resumed_mid_epoch = self.position > 0
        yielded = 0
        self._live = self._batches(plans[self.position :])
        for batch in self._live:
            if not self._take_report(batch.pop(REPORT_KEY)):
                self._release()
                raise self._stop()
            self.position += 1  # consumed: the training loop holds it from here on (what resume must skip)
            if batch.get("empty"):  # every sample of this batch was bad: nothing to yield
                self.stats.batches += 1
                self.stats.slots += len(batch["valid"])
                continue
            self._account(batch)
            yielded += 1
            yield batch
        self._live = None
        if self.total_seen < self.config.min_samples_for_bad_check:  # a whole epoch smaller than the sample size
            self._judge_bad_fraction()
        if self._abort:
            raise self._stop()
        if yielded == 0 and not resumed_mid_epoch:
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
        self.stats.remainder_dropped = self.sampler.dropped(self.epoch)
        logger.info("%s", self.stats.report())
        self.epoch += 1
        self.position = 0

    def _release(self) -> None:
        """Drop the running iteration: its prefetched batches are discarded (persistent workers stay)."""
        live, self._live = self._live, None
        close = getattr(live, "close", None)  # generators: in-process decoding, the fairseq2 pipeline
        if close is not None:
            close()
        elif live is not None and not self.config.persistent_workers:
            live._shutdown_workers()

    def close(self) -> None:
        """Stop worker processes and close files (a later iteration starts them again)."""
        self._release()
        if self._finalizer is not None:
            self._finalizer()  # the persistent workers
            self._finalizer = None
        self._dataloader = None
        self.source.close()

    def state_dict(self) -> dict[str, Any]:
        """Resume state: epoch, batches consumed in it, the sampler's settings, and the bad-sample counters.

        Plain values only (no pipeline, no decoded media): what the training loop consumed, not what the workers
        had prefetched.
        """
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "sampler": self.sampler.describe(),
            "stats": dataclasses.asdict(self.stats),
            "seen": self.total_seen,
            "bad": self.total_bad,
            "bad_reasons": dict(self.bad_reasons),
            "bad_ids": sorted(self.bad_ids),
            "data": self.data_identity(),
        }

    def data_identity(self) -> dict[str, Any]:
        """What data this loader reads: path(s), sizes, content hashes (:func:`~one_peace.data.shards.files_identity`),
        row count (read once)."""
        from one_peace.data.shards import files_identity

        if self._identity is None:  # once: the files are not expected to change under a running loader
            self._identity = {"files": files_identity(self.source.files()), "rows": self.num_rows}
        return self._identity

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next iteration continues exactly where the saved run's loop was.

        Raises:
            ValueError: the state was saved over other data or batching (unless ``allow_changed``, which starts a
                new epoch), or by the fairseq2 pipeline of one-peace 0.1 (whose position cannot be carried over).
        """
        self._release()
        saved_epoch = int(state["epoch"])
        problem = None
        if "pipeline" in state and "version" not in state:
            problem = (
                "resume: this checkpoint's data position was saved by the fairseq2 pipeline of one-peace 0.1 (a "
                "shuffle buffer), which the sampler cannot continue exactly; resume with data.allow_changed=true to "
                f"go on from epoch {saved_epoch + 1} (model, optimizer and step are restored as saved)"
            )
        elif state.get("data") is not None and not same_identity(state["data"], self.data_identity()):
            change = describe_change(state["data"], self.data_identity())
            problem = (
                f"resume: the data differs from the checkpoint's ({change}); resume with the same data, or set "
                "data.allow_changed=true to start a new epoch on the new data"
            )
        elif state.get("sampler") is not None and state["sampler"] != self.sampler.describe():
            ours = self.sampler.describe()
            diff = ", ".join(
                f"{k}: saved {v}, now {ours.get(k)}" for k, v in state["sampler"].items() if ours.get(k) != v
            )
            problem = (
                f"resume: the batching differs from the checkpoint's ({diff}); "
                "resume with the same data settings, or set data.allow_changed=true to start a new epoch"
            )
        self.bad_ids = set(state.get("bad_ids", ()))
        if problem is not None:
            if not self.config.allow_changed:
                raise ValueError(problem)
            logger.warning(
                "%s; data.allow_changed=true: starting epoch %s afresh", problem.split(";")[0], saved_epoch + 1
            )
            self.epoch, self.position, self._restored = saved_epoch + 1, 0, None
            return
        self.epoch = saved_epoch
        self.position = int(state["position"])
        self._restored = dict(state)
