"""Optimisation pieces of the trainer: parameter groups, learning-rate schedules and the optimizer registry.

Schedules and optimizers are chosen by name from a recipe (``trainer.schedule``, ``trainer.optimizer.name``);
:func:`register_schedule` and :func:`register_optimizer` add more.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def _layer_id(name: str, num_layers: int) -> int:
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    if name.startswith("model.layers.") and m:
        return int(m.group(1)) + 1
    if name.startswith("model.adapters."):
        return 0
    return num_layers + 1


def parameter_groups(task: nn.Module, cfg: Any, num_layers: int) -> list[dict[str, Any]]:
    """AdamW groups: no decay on norms, biases, embeddings, relative tables, CLS and scales; optional layer decay."""
    groups: dict[tuple[bool, int], list[nn.Parameter]] = {}
    for name, p in task.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.dim() <= 1 or any(
            k in name for k in ("embed", "rel_pos_table", "cls_", "logit_scale", "positions", "mask_token")
        )
        layer = _layer_id(name, num_layers) if cfg.layer_decay else 0
        groups.setdefault((no_decay, layer), []).append(p)
    out = []
    for (no_decay, layer), params in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        scale = cfg.layer_decay ** (num_layers + 1 - layer) if cfg.layer_decay else 1.0
        out.append({"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay, "lr_scale": scale})
    return out


def _warmup(step: int, cfg: Any) -> float | None:
    if step < cfg.warmup_steps:
        return (step + 1) / max(1, cfg.warmup_steps)
    return None


def _progress(step: int, cfg: Any) -> float:
    return min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))


def _warmup_cosine(step: int, cfg: Any) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio``."""
    w = _warmup(step, cfg)
    if w is not None:
        return w
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * _progress(step, cfg)))


def _warmup_linear(step: int, cfg: Any) -> float:
    """Linear warmup, then linear decay to ``min_lr_ratio``."""
    w = _warmup(step, cfg)
    return w if w is not None else 1.0 - (1.0 - cfg.min_lr_ratio) * _progress(step, cfg)


def _constant(step: int, cfg: Any) -> float:
    """Linear warmup, then constant."""
    w = _warmup(step, cfg)
    return w if w is not None else 1.0


SCHEDULES: dict[str, Callable[[int, Any], float]] = {
    "warmup_cosine": _warmup_cosine,
    "warmup_linear": _warmup_linear,
    "constant": _constant,
}


def register_schedule(name: str, fn: Callable[[int, Any], float]) -> None:
    """Add a schedule ``fn(step, trainer_config) -> multiplier of lr``."""
    SCHEDULES[name] = fn


def lr_at(step: int, cfg: Any) -> float:
    """The schedule's multiplier (times ``cfg.lr``) at ``step``; ``cfg.schedule`` picks it (default warmup+cosine)."""
    name = getattr(cfg, "schedule", "warmup_cosine")
    if name not in SCHEDULES:
        raise ValueError(f"trainer.schedule: unknown schedule {name!r}; registered: {sorted(SCHEDULES)}")
    return SCHEDULES[name](step, cfg)


def _adamw(groups: Iterable[dict[str, Any]], lr: float, options: dict[str, Any]) -> torch.optim.Optimizer:
    betas = tuple(float(b) for b in options.get("betas", (0.9, 0.98)))
    if len(betas) != 2:
        raise ValueError(f"trainer.optimizer.betas must hold two numbers, got {list(betas)}")
    return torch.optim.AdamW(list(groups), lr=lr, betas=betas, eps=float(options.get("eps", 1e-6)))  # type: ignore[arg-type]


def _sgd(groups: Iterable[dict[str, Any]], lr: float, options: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.SGD(list(groups), lr=lr, momentum=float(options.get("momentum", 0.9)))


OPTIMIZERS: dict[str, Callable[[Iterable[dict[str, Any]], float, dict[str, Any]], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "sgd": _sgd,
}


def register_optimizer(
    name: str, fn: Callable[[Iterable[dict[str, Any]], float, dict[str, Any]], torch.optim.Optimizer]
) -> None:
    """Add an optimizer ``fn(param_groups, lr, options) -> torch.optim.Optimizer``."""
    OPTIMIZERS[name] = fn


def build_optimizer(groups: Iterable[dict[str, Any]], lr: float, options: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer ``options["name"]`` (default ``adamw``) over ``groups``."""
    name = options.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"trainer.optimizer.name: unknown optimizer {name!r}; registered: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](groups, lr, options)
