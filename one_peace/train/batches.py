"""What the trainer trains from: any resumable iterable of batches (the :class:`BatchSource` protocol).

The fairseq2 streaming loader (:class:`one_peace.data.MultimodalLoader`, the ``train`` extra) is one such source;
:class:`BatchList` is another, for batches already in memory (tests, GPU checks, small experiments), and needs
only the core install.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class BatchSource(Protocol):
    """A resumable iterable of batches, as :class:`one_peace.train.trainer.Trainer` reads it.

    Required:
        ``__iter__()``: one pass (an epoch) over the batches, starting from the current position; the trainer calls
        it again when a pass ends.
        ``state_dict()`` / ``load_state_dict(state)``: the position (epoch and place within it) as tensors and plain
        values, saved in every checkpoint and restored on resume, so the next ``__iter__`` continues exactly where
        the saved run was.

    Optional (read with ``getattr``):
        ``epoch`` (int): the epoch the next pass belongs to; without it the trainer counts passes itself.

    A pass that yields no batch at all stops training with an error (it could never make progress).
    """

    def __iter__(self) -> Iterator[Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class BatchList:
    """Batches held in memory as a resumable :class:`BatchSource` (optionally reshuffled every epoch).

    Args:
        batches: The batches, each whatever the task's ``forward`` takes (usually a dict of tensors).
        shuffle: Visit the batches in a new order every epoch (a permutation seeded by ``seed`` and the epoch).
        seed: Seed of that order.
    """

    def __init__(self, batches: Sequence[Any], shuffle: bool = False, seed: int = 0) -> None:
        if len(batches) == 0:
            raise ValueError("BatchList needs at least one batch")
        self.batches = list(batches)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.batches)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.batches)))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.batches), generator=gen).tolist()

    def __iter__(self) -> Iterator[Any]:
        """The rest of the current epoch, then the epoch counter moves on."""
        order = self._order()
        while self.position < len(order):
            batch = self.batches[order[self.position]]
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        """Epoch and position within it (plain ints)."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position <= len(self.batches):
            raise ValueError(f"BatchList state: position {position} outside 0..{len(self.batches)}")
        self.epoch, self.position = epoch, position
