"""Multi-task training (OFASys style): several tasks share one encoder; every optimizer step mixes all of them.

Each task has its own data (a :class:`~one_peace.data.MultimodalLoader`), its own objectives or instruction, and a
weight; a step draws one batch per task and minimises the weighted sum of their losses, logging each task's
loss under ``<task>/...``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from one_peace.train.objectives import Logs


class MultiTask(nn.Module):
    """Weighted sum of several tasks over one shared encoder (``model``).

    Args:
        model: The shared encoder (every task must hold this same object as ``.model``).
        tasks: Name -> task module (``task(batch) -> (loss, logs)``).
        weights: Name -> loss weight.
    """

    def __init__(self, model: nn.Module, tasks: Mapping[str, nn.Module], weights: Mapping[str, float]) -> None:
        super().__init__()
        for name, task in tasks.items():
            if getattr(task, "model", None) is not model:
                raise ValueError(f"multi-task: task {name!r} does not share the encoder")
        missing = set(tasks) - set(weights)
        if missing:
            raise ValueError(f"multi-task: no weight for task(s) {sorted(missing)}")
        self.model = model
        self.tasks = nn.ModuleDict(dict(tasks))
        self.weights = {k: float(weights[k]) for k in tasks}

    def forward(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, Logs]:
        """``batch`` maps task name -> that task's batch; returns the weighted loss and per-task logs."""
        total = torch.zeros((), device=next(self.model.parameters()).device)
        logs: Logs = {}
        for name, task in self.tasks.items():
            loss, sub = task(batch[name])
            total = total + self.weights[name] * loss
            logs.update({f"{name}/{k}": v for k, v in sub.items()})
        logs["loss"] = total.detach()
        return total, logs


class MultiLoader:
    """Yields ``{task: batch}`` forever; each task's loader restarts (next epoch) independently when exhausted.

    ``state_dict``/``load_state_dict`` combine the loaders' resume states.
    """

    def __init__(self, loaders: Mapping[str, Any]) -> None:
        self.loaders = dict(loaders)
        self._iters: dict[str, Iterator[Any]] = {}

    @property
    def epoch(self) -> int:
        """The smallest epoch among the loaders."""
        return min(ld.epoch for ld in self.loaders.values())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            out = {}
            for name, loader in self.loaders.items():
                it = self._iters.get(name)
                if it is None:
                    it = self._iters[name] = iter(loader)
                try:
                    out[name] = next(it)
                except StopIteration:
                    it = self._iters[name] = iter(loader)
                    out[name] = next(it)
            yield out

    def state_dict(self) -> dict[str, Any]:
        """Each loader's resume state."""
        return {name: ld.state_dict() for name, ld in self.loaders.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._iters = {}
        for name, s in state.items():
            self.loaders[name].load_state_dict(s)

    def close(self) -> None:
        """Close every loader."""
        self._iters = {}
        for ld in self.loaders.values():
            ld.close()
