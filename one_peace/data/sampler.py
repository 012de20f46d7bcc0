"""The batch plan of an epoch: one deterministic sampler owning shuffling, rank sharding, length bucketing, and the
remainder; its state is ``(epoch, position)`` under a fixed seed.

Every rank computes the same global order from ``(seed, epoch)`` alone (no communication), then takes its share.
The plan is a list of :class:`Plan` (row indices of one batch); the loader decodes plans in worker processes
(or fairseq2's threads), and a resumed run rebuilds the epoch's plan and skips the batches the training loop had
consumed. Nothing else is needed to resume exactly, whichever backend decodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Plan:
    """One batch to decode: ``rows`` (indices into the row source); only the first ``real`` are samples of the
    epoch, the rest are fillers (decoded for their shapes, masked with ``valid=False``, never counted)."""

    rows: tuple[int, ...]
    real: int


def shuffled_order(n: int, window: int, seed: int, epoch: int) -> torch.Tensor:
    """The visiting order of ``n`` rows in ``epoch``: in order (``window=0``), a full permutation (``window >= n``),
    or a block shuffle: blocks of ``window`` consecutive rows in a random order, rows shuffled within each block
    (reads stay local in files and shards, as a shuffle buffer's would, but any position can be computed)."""
    if window <= 0 or n <= 1:
        return torch.arange(n, dtype=torch.int64)
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    if window >= n:
        return torch.randperm(n, generator=gen)
    blocks = (n + window - 1) // window
    block_rank = torch.empty(blocks, dtype=torch.float64)
    block_rank[torch.randperm(blocks, generator=gen)] = torch.arange(blocks, dtype=torch.float64)
    keys = block_rank[torch.arange(n) // window] + torch.rand(n, generator=gen, dtype=torch.float64)
    return torch.argsort(keys, stable=True)


@dataclass(kw_only=True)
class EpochSampler:
    """Batch plans of every epoch for one rank.

    Args:
        num_rows: Rows of the source.
        batch_size: Samples per batch.
        rank: This rank.
        world: Number of ranks.
        shuffle_window: See :func:`shuffled_order`.
        seed: Base seed (epoch ``e`` uses ``(seed, e)``).
        remainder: ``drop`` (only full batches; leftover rows are reported) or ``pad`` (the last batch is partial and
            padded by the collator; a rank left without a batch in the last round gets a filler batch).
        length_buckets: Upper bounds of length buckets (``None``: batches in visiting order).
        lengths: ``lengths() -> (num_rows,)`` int tensor of length estimates (asked once, with buckets only).

    Without buckets, the ``num_rows % world`` last rows of the order are left out and rank ``r`` takes every
    ``world``-th row of the order from ``r`` (the same rows per rank, disjoint). With buckets, the order is grouped
    into batches of rows of one bucket (a batch is emitted when its bucket fills), and rank ``r`` takes every
    ``world``-th batch: every rank gets the same number of batches.
    """

    num_rows: int
    batch_size: int
    rank: int = 0
    world: int = 1
    shuffle_window: int = 0
    seed: int = 0
    remainder: str = "drop"
    length_buckets: list[int] | None = None
    lengths: Callable[[], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        self._lengths: torch.Tensor | None = None
        self._cache: tuple[int, list[Plan], int] | None = None

    def describe(self) -> dict[str, object]:
        """What the plan depends on besides the epoch: saved with the position, compared on resume."""
        return {
            "num_rows": self.num_rows,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world": self.world,
            "shuffle_window": self.shuffle_window,
            "seed": self.seed,
            "remainder": self.remainder,
            "length_buckets": list(self.length_buckets) if self.length_buckets else None,
        }

    def rows_per_rank(self) -> int:
        """Rows each rank reads per epoch without buckets (``num_rows // world``)."""
        return self.num_rows // self.world

    def plans(self, epoch: int) -> list[Plan]:
        """This rank's batches of ``epoch``, in order."""
        if self._cache is None or self._cache[0] != epoch:
            plans, dropped = self._bucketed(epoch) if self.length_buckets else self._plain(epoch)
            self._cache = (epoch, plans, dropped)
        return self._cache[1]

    def dropped(self, epoch: int) -> int:
        """Rows of this rank's share left out of ``epoch``'s batches by ``remainder=drop`` (0 with ``pad``)."""
        self.plans(epoch)
        assert self._cache is not None
        return self._cache[2]

    def _plain(self, epoch: int) -> tuple[list[Plan], int]:
        order = shuffled_order(self.num_rows, self.shuffle_window, self.seed, epoch)
        mine = order[: self.rows_per_rank() * self.world][self.rank :: self.world].tolist()
        b = self.batch_size
        full = len(mine) // b
        plans = [Plan(tuple(mine[i * b : (i + 1) * b]), b) for i in range(full)]
        rest = mine[full * b :]
        if rest and self.remainder == "pad":
            plans.append(Plan(tuple(rest), len(rest)))
            return plans, 0
        return plans, len(rest)

    def _bucket_lengths(self) -> torch.Tensor:
        if self._lengths is None:
            if self.lengths is None:
                raise ValueError("length bucketing needs the rows' length estimates")
            lengths = torch.as_tensor(self.lengths(), dtype=torch.int64)
            if lengths.shape != (self.num_rows,):
                raise ValueError(f"length estimates: expected {self.num_rows} values, got {tuple(lengths.shape)}")
            self._lengths = lengths
        return self._lengths

    def _bucketed(self, epoch: int) -> tuple[list[Plan], int]:
        bounds = torch.tensor(sorted(int(b) for b in self.length_buckets or []), dtype=torch.int64)
        # a row longer than the largest bound joins the last bucket (bounds group rows; nothing is dropped for it)
        bucket_of = torch.bucketize(self._bucket_lengths(), bounds).clamp(max=len(bounds) - 1).tolist()
        order = shuffled_order(self.num_rows, self.shuffle_window, self.seed, epoch).tolist()
        open_buckets: dict[int, list[int]] = {}
        batches: list[list[int]] = []
        for row in order:
            bucket = open_buckets.setdefault(bucket_of[row], [])
            bucket.append(row)
            if len(bucket) == self.batch_size:
                batches.append(bucket)
                open_buckets[bucket_of[row]] = []
        leftovers = [rows for _, rows in sorted(open_buckets.items()) if rows]
        dropped_total = 0
        if self.remainder == "pad":
            batches += leftovers
            rounds = -(-len(batches) // self.world)
        else:
            dropped_total = sum(len(rows) for rows in leftovers)
            rounds = len(batches) // self.world
            dropped_total += sum(len(rows) for rows in batches[rounds * self.world :])
        plans: list[Plan] = []
        for i in range(rounds):
            j = i * self.world + self.rank
            if j < len(batches):
                plans.append(Plan(tuple(batches[j]), len(batches[j])))
            else:  # pad: this rank has no batch in the last round; a masked filler keeps the ranks in step
                plans.append(Plan((order[0],), 0))
        # the dropped rows, shared out over the ranks (their sum is the global count)
        share = dropped_total // self.world + (1 if self.rank < dropped_total % self.world else 0)
        return plans, share
