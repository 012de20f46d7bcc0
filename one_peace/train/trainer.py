"""The trainer: AdamW, warmup + cosine, clipping, accumulation, atomic checkpoints and exact resume.

Checkpoints are folders ``<output_dir>/checkpoints/step_0000100/`` in the checkpoint-folder contract (weights as
safetensors + ``config.json``, so ``one_peace.load(folder)`` opens any of them) plus ``task.safetensors`` (the
task's other modules: decoders) and ``training_state/`` (optimizer, scheduler, RNG, data position). Each is
written to a temporary folder and renamed into place, and gets a ``COMPLETE`` marker last: a half-written
checkpoint is never picked up as the latest.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from one_peace.extras import optional

CKPT_RE = re.compile(r"^step_(\d{7})$")


@dataclass(kw_only=True)
class TrainerConfig:
    """Optimisation and bookkeeping.

    Attributes:
        max_steps: Optimizer steps.
        batch_size: Samples per batch per rank.
        lr: Peak learning rate.
        weight_decay: AdamW decay (not applied to norms, biases, embeddings, tables, scales).
        warmup_steps: Linear warmup steps, then cosine decay to ``min_lr_ratio * lr``.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        grad_clip: Max gradient norm (0 disables).
        accumulation: Micro-batches per optimizer step.
        layer_decay: Layer-wise lr decay for fine-tuning (``None`` disables): layer i of L gets ``decay**(L-i)``.
        bf16: bf16 autocast (default on GPU; opt-in on CPU, where it was measured slower than fp32).
        grad_checkpointing: Recompute encoder layers in the backward pass.
        log_every: Steps between metric lines.
        save_every: Steps between checkpoints (and one at the end).
        keep_last: Checkpoints kept (older ones are deleted).
        seed: Seed of parameters' init, data order and masking.
        resume: Continue from the latest complete checkpoint in ``output_dir``.
        trainable: Glob patterns of trainable parameter names (empty = all); ``frozen`` wins over it.
        frozen: Glob patterns of frozen parameter names.
        distributed: Under ``torchrun``: ``"ddp"`` (DistributedDataParallel) or ``"fsdp2"`` (``fully_shard`` per
            encoder layer and on the task; the resume state goes through ``torch.distributed.checkpoint`` and the
            weights are gathered and still written as safetensors).
        mixed_precision: FSDP2 parameter dtype for compute (``"bf16"``; default: none, fp32).
    """

    max_steps: int = 100
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    accumulation: int = 1
    layer_decay: float | None = None
    bf16: bool | None = None
    grad_checkpointing: bool = False
    log_every: int = 10
    save_every: int = 50
    keep_last: int = 2
    seed: int = 0
    resume: bool = False
    trainable: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()
    distributed: str = "ddp"
    mixed_precision: str | None = None


def apply_freezing(module: nn.Module, trainable: Sequence[str], frozen: Sequence[str]) -> list[str]:
    """Set ``requires_grad`` from glob patterns on parameter names; returns the trainable names."""
    names = []
    for name, p in module.named_parameters():
        train = not trainable or any(fnmatch.fnmatch(name, pat) for pat in trainable)
        if any(fnmatch.fnmatch(name, pat) for pat in frozen):
            train = False
        p.requires_grad_(train)
        if train:
            names.append(name)
    if not names:
        raise ValueError(
            f"freezing patterns leave nothing to train (trainable={list(trainable)}, frozen={list(frozen)})"
        )
    return names


def _layer_id(name: str, num_layers: int) -> int:
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    if name.startswith("model.layers.") and m:
        return int(m.group(1)) + 1
    if name.startswith("model.adapters."):
        return 0
    return num_layers + 1


def parameter_groups(task: nn.Module, cfg: TrainerConfig, num_layers: int) -> list[dict[str, Any]]:
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


def lr_at(step: int, cfg: TrainerConfig) -> float:
    """Warmup + cosine schedule multiplier (times ``cfg.lr``)."""
    if step < cfg.warmup_steps:
        return (step + 1) / max(1, cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest *complete* checkpoint folder (temporary and unmarked folders are ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = [p for p in root.iterdir() if CKPT_RE.match(p.name) and (p / "COMPLETE").is_file()]
    return max(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)), default=None)  # type: ignore[union-attr]


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain Python values (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(np.array(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


class Trainer:
    """Plain PyTorch loop over a task (an ``nn.Module`` with a ``.model`` encoder, returning ``(loss, logs)``).

    Args:
        task: The module to train; ``task(batch) -> (loss, logs)``; ``task.model`` is the encoder saved as weights.
        loader: Any :class:`one_peace.train.batches.BatchSource`: an iterable of batches (one pass per epoch) with
            ``state_dict()``/``load_state_dict()`` for exact resume, and optionally ``epoch`` and ``close()``. The
            fairseq2 :class:`one_peace.data.MultimodalLoader` is one; :class:`one_peace.train.batches.BatchList`
            holds batches in memory.
        config: Optimisation settings.
        output_dir: Where checkpoints, ``metrics.jsonl``, TensorBoard events and the loss plot go.
        extra_state: Callables saving/restoring additional resume state (e.g. the task's masking generator).
    """

    def __init__(
        self,
        task: nn.Module,
        loader: Any,
        config: TrainerConfig,
        output_dir: str | Path,
        extra_state: tuple[Callable[[], Any], Callable[[Any], None]] | None = None,
    ) -> None:
        self.task = task
        self.loader = loader
        self.cfg = config
        self.out = Path(output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.extra_state = extra_state
        apply_freezing(task, config.trainable, config.frozen)
        self.rank, self.world = _dist_info()
        self.forward_module: nn.Module = task
        self.sharded = False
        if self.world > 1:
            if config.distributed == "ddp":
                from torch.nn.parallel import DistributedDataParallel

                self.forward_module = DistributedDataParallel(task, find_unused_parameters=True)
            elif config.distributed == "fsdp2":
                self._fully_shard(task, config)
                self.sharded = True
            else:
                raise ValueError(f"trainer.distributed must be 'ddp' or 'fsdp2', got {config.distributed!r}")
        num_layers = len(getattr(task.model, "layers", []))
        self.opt = torch.optim.AdamW(
            parameter_groups(task, config, num_layers), lr=config.lr, betas=(0.9, 0.98), eps=1e-6
        )
        self.step = 0
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        if config.grad_checkpointing:
            task.model.set_grad_checkpointing(True)  # type: ignore[union-attr,operator]
        device = next(task.parameters()).device
        self.bf16 = config.bf16 if config.bf16 is not None else device.type == "cuda"
        self._tb: Any = None
        self._batches: Iterator[Any] | None = None
        self._yielded = 0

    # ----------------------------------------------------------------------------------------- checkpoint
    def save(self) -> Path:
        """Write ``checkpoints/step_N`` atomically (rank 0 writes the weights, every rank its resume state).

        Under FSDP2 the full encoder state is gathered (collective) and written as safetensors by rank 0, and the
        sharded model + optimizer state goes through ``torch.distributed.checkpoint`` (``training_state/dcp``).
        """
        from safetensors.torch import save_file

        import one_peace

        root = self.out / "checkpoints"
        final = root / f"step_{self.step:07d}"
        tmp = root / f".{final.name}.tmp"
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "training_state").mkdir(parents=True)
        _barrier()
        full_state = self._full_model_state()
        try:
            if self.sharded:
                import torch.distributed.checkpoint as dcp
                from torch.distributed.checkpoint.state_dict import get_state_dict

                model_sd, optim_sd = get_state_dict(self.task, self.opt)
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "training_state" / "dcp"))
            state = {
                "step": self.step,
                "epoch": self.epoch,
                "optimizer": None if self.sharded else self.opt.state_dict(),
                "rng": _rng_state(),
                "loader": self.loader.state_dict(),
                "history": self.history,
                "extra": self.extra_state[0]() if self.extra_state else None,
            }
            torch.save(state, tmp / "training_state" / f"rank{self.rank}.pt")
            _barrier()
            if self.rank == 0:
                one_peace.save(self.task.model, tmp / "weights", state_dict=full_state)  # type: ignore[arg-type]
                for f in (tmp / "weights").iterdir():
                    f.rename(tmp / f.name)
                (tmp / "weights").rmdir()
                if not self.sharded:
                    extra = {
                        k: v.detach().contiguous().cpu()
                        for k, v in self.task.state_dict().items()
                        if not k.startswith("model.") and ".model." not in k  # the encoder is in model.safetensors
                    }
                    if extra:
                        save_file(extra, str(tmp / "task.safetensors"))
                meta = {**asdict(self.cfg), "world_size": self.world}
                (tmp / "training_state" / "trainer.json").write_text(json.dumps(meta, indent=2, default=list) + "\n")
                (tmp / "COMPLETE").write_text(f"{self.step}\n")
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                kept = sorted((p for p in root.iterdir() if CKPT_RE.match(p.name)), key=lambda p: p.name)
                for old in kept[: -self.cfg.keep_last] if self.cfg.keep_last > 0 else []:
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        _barrier()
        return final

    def resume(self) -> bool:
        """Restore the latest complete checkpoint, if any; returns whether one was found."""
        from safetensors.torch import load_file

        from one_peace.checkpoint import _iter_safetensors, _weight_files

        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            return False
        if self.sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_sd, optim_sd = get_state_dict(self.task, self.opt)
            sd: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
            dcp.load(sd, checkpoint_id=str(ckpt / "training_state" / "dcp"))
            set_state_dict(self.task, self.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        params = dict(self.task.model.named_parameters())  # type: ignore[union-attr]
        with torch.no_grad():
            for name, tensor, _ in _iter_safetensors(_weight_files(ckpt)) if not self.sharded else ():
                params[name].copy_(tensor)
            if not self.sharded and (ckpt / "task.safetensors").is_file():
                own = dict(self.task.named_parameters())
                for k, v in load_file(str(ckpt / "task.safetensors")).items():
                    if k in own:
                        own[k].copy_(v)
        state_file = ckpt / "training_state" / f"rank{self.rank}.pt"
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{state_file}: no resume state for rank {self.rank} (was the world size different?)"
            )
        state = torch.load(state_file, weights_only=True)  # plain data and tensors only
        if state["optimizer"] is not None:
            self.opt.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.history = state["step"], state["epoch"], state["history"]
        _set_rng_state(state["rng"])
        self.loader.load_state_dict(state["loader"])
        if self.extra_state and state.get("extra") is not None:
            self.extra_state[1](state["extra"])
        return True

    # ------------------------------------------------------------------------------------------ training
    def _next_batch(self) -> Any:
        while True:
            if self._batches is None:
                self.epoch = int(getattr(self.loader, "epoch", self.epoch))
                self._batches = iter(self.loader)
                self._yielded = 0
            try:
                batch = next(self._batches)
                self._yielded += 1
                return batch
            except StopIteration:
                self._batches = None
                if self._yielded == 0:
                    raise RuntimeError(
                        f"the batch source {type(self.loader).__name__} yielded no batch in epoch {self.epoch}: "
                        "training cannot make progress"
                    ) from None
                if not hasattr(self.loader, "epoch"):  # the trainer counts passes for sources without an epoch
                    self.epoch += 1

    def _log(self, logs: dict[str, float]) -> None:
        self.history.append(logs)
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(logs) + "\n")
        if self._tb is None:
            self._tb = False
            if optional("tensorboard", "train", "TensorBoard logging"):  # metrics.jsonl is always written
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
        if self._tb:
            for k, v in logs.items():
                if k != "step":
                    self._tb.add_scalar(k, v, int(logs["step"]))

    @staticmethod
    def _fully_shard(task: nn.Module, config: TrainerConfig) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtype = {"bf16": torch.bfloat16, None: None, "fp32": None}[config.mixed_precision]
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
        for layer in task.model.layers:  # type: ignore[union-attr]
            fully_shard(layer, mp_policy=policy)
        fully_shard(task, mp_policy=policy)

    def _full_model_state(self) -> dict[str, torch.Tensor] | None:
        """The encoder's full (unsharded) state on rank 0 (collective under FSDP2), ``None`` when not sharded."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.task, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {
            k.removeprefix("model."): v
            for k, v in full.items()
            if k.startswith("model.") and isinstance(v, torch.Tensor)
        }

    def _mean_over_ranks(self, logs: dict[str, float]) -> dict[str, float]:
        import torch.distributed as dist

        keys = sorted(k for k, v in logs.items() if isinstance(v, float))
        t = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {**logs, **{k: float(v) / self.world for k, v in zip(keys, t.tolist())}}

    def fit(self) -> Path:
        """Train to ``max_steps`` (resuming when configured); returns the final checkpoint folder."""
        from tqdm import tqdm

        if self.cfg.resume and self.resume():
            print(f"resumed from step {self.step}")
        self.task.train()
        bar = tqdm(
            total=self.cfg.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=self.rank != 0,
        )
        last = None
        start = time.perf_counter()
        while self.step < self.cfg.max_steps:
            for group in self.opt.param_groups:
                group["lr"] = self.cfg.lr * lr_at(self.step, self.cfg) * group.get("lr_scale", 1.0)
            self.opt.zero_grad(set_to_none=True)
            agg: dict[str, float] = {}
            for _ in range(self.cfg.accumulation):
                batch = self._next_batch()
                with torch.autocast(
                    "cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16, enabled=self.bf16
                ):
                    loss, logs = self.forward_module(batch)
                (loss / self.cfg.accumulation).backward()
                for k, v in logs.items():
                    agg[k] = agg.get(k, 0.0) + v / self.cfg.accumulation
            if not math.isfinite(agg.get("loss", 0.0)):
                raise FloatingPointError(f"non-finite loss at step {self.step}: {agg}")
            params = [p for p in self.task.parameters() if p.grad is not None]
            if self.cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
                agg["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            self.opt.step()
            self.step += 1
            agg.update(step=self.step, lr=self.opt.param_groups[0]["lr"], seconds=time.perf_counter() - start)
            if self.world > 1:
                agg = self._mean_over_ranks(agg)
            if self.rank == 0 and (self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps):
                self._log(agg)
            bar.update(1)
            bar.set_postfix(loss=f"{agg['loss']:.3f}")
            if self.step % self.cfg.save_every == 0 or self.step == self.cfg.max_steps:
                last = self.save()
        bar.close()
        if self._batches is not None:
            close = getattr(self._batches, "close", None)
            if close is not None:
                close()
            self._batches = None
        if self._tb:
            self._tb.close()
        if self.rank == 0:
            self.plot()
        return last or self.save()

    def plot(self) -> Path | None:
        """Save the loss curves of ``metrics.jsonl`` as ``loss.png`` (skipped, with one warning, without matplotlib)."""
        if not self.history or not optional("matplotlib", "train", "the loss plot (loss.png)"):
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in self.history[-1] if k == "loss" or k.endswith("/loss")]
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [h["step"] for h in self.history]
        for k in keys:
            ax.plot(steps, [h.get(k, float("nan")) for h in self.history], label=k)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.out / "loss.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
