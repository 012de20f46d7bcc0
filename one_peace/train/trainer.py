"""The trainer: the loop (accumulation, clipping, logging) over any resumable source of batches.

Optimizer, parameter groups and schedules live in :mod:`one_peace.train.optim`; atomic checkpoints and exact
resume in :mod:`one_peace.train.checkpointing`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from one_peace.data.loader import TooManyBadSamples
from one_peace.extras import optional, optional_import, warn_once
from one_peace.train.checkpointing import dist_info, latest_checkpoint, resume_checkpoint, save_checkpoint
from one_peace.train.device import (
    HOST_KEY,
    PRECISIONS,
    HostBatch,
    autocast_dtype,
    move_batch,
    resolve_device,
    resolve_precision,
)
from one_peace.train.objectives import FeatureCache, Logs
from one_peace.train.optim import build_optimizer, lr_at, parameter_groups
from one_peace.train.throughput import Throughput, TokenCounter, batch_samples, matmul_peak

#: Environment variable naming a file prefix where DDP's gradient all-reduce calls are counted per micro-step (tests).
COMM_LOG_ENV = "ONE_PEACE_COMM_LOG"

__all__ = ["Trainer", "TrainerConfig", "apply_freezing", "latest_checkpoint", "lr_at", "parameter_groups"]


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
        schedule: Registered schedule (``warmup_cosine``, ``warmup_linear``, ``constant``; see
            :mod:`one_peace.train.optim`).
        optimizer: ``name`` of a registered optimizer (``adamw``, ``sgd``) and its options (``betas``, ``eps``,
            ``momentum``).
        grad_clip: Max gradient norm (0 disables).
        accumulation: Micro-batches per optimizer step; gradients are communicated only in the last one's backward
            (DDP ``no_sync`` / FSDP2 ``set_requires_gradient_sync`` on the others). A contrastive objective sees
            the k-times batch of negatives (cached features, :class:`~one_peace.train.objectives.FeatureCache`).
        layer_decay: Layer-wise lr decay for fine-tuning (``None`` disables): layer i of L gets ``decay**(L-i)``.
        device: ``auto`` (``cuda:$LOCAL_RANK`` under torchrun when CUDA exists, else ``cuda``, else ``cpu``), or
            ``cpu`` / ``cuda`` / ``cuda:N``; the task is placed there before DDP/FSDP2 wrapping, and batches are
            moved there in one transfer step (see :mod:`one_peace.train.device`).
        precision: ``fp32`` (the CPU default), ``bf16-autocast`` (the GPU default), ``bf16`` (pure bf16 weights)
            or ``fp16`` (autocast with a gradient scaler).
        bf16: Deprecated alias (True: ``precision=bf16-autocast``, False: ``fp32``).
        grad_checkpointing: Recompute encoder layers in the backward pass.
        compile: ``torch.compile`` each shared encoder layer in place (regional compilation: adapters, heads and
            decoders stay eager; checkpoints keep their names).
        peak_tflops: The device's peak TFLOP/s for MFU; ``None``: measured once at start (a dense matmul in the
            training precision on the training device).
        log_every: Steps between metric lines (loss, lr, samples/s, tokens/s, data-wait fraction, MFU).
        save_every: Steps between checkpoints (and one at the end).
        eval_every: Steps between calls of the trainer's ``evaluate`` callback (0: never), logged to
            ``eval.jsonl`` (rank 0; not with ``fsdp2``, whose parameters are sharded during training).
        keep_last: Checkpoints kept (older ones are deleted).
        seed: Seed of parameters' init, data order and masking.
        resume: Continue from the latest complete checkpoint in ``output_dir``.
        trainable: Trainable parameter sets (empty = all): named groups of the model (``adapters.audio``,
            ``ffn.audio``, ``modality.audio``, ``backbone``, ...), ``decoder``, or glob patterns of names.
        frozen: Frozen parameter sets, the same way (wins over ``trainable``).
        distributed: Under ``torchrun``: ``"ddp"`` (DistributedDataParallel) or ``"fsdp2"`` (``fully_shard`` per
            encoder layer and on the task; the resume state goes through ``torch.distributed.checkpoint`` and the
            weights are gathered and still written as safetensors).
        mixed_precision: Deprecated alias: FSDP2's ``"bf16"`` is ``precision=bf16-autocast``.
    """

    max_steps: int = 100
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    schedule: str = "warmup_cosine"
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "adamw", "betas": [0.9, 0.98], "eps": 1e-6})
    grad_clip: float = 1.0
    accumulation: int = 1
    layer_decay: float | None = None
    device: str = "auto"
    precision: str | None = None
    bf16: bool | None = None
    grad_checkpointing: bool = False
    compile: bool = False
    peak_tflops: float | None = None
    log_every: int = 10
    save_every: int = 50
    eval_every: int = 0
    keep_last: int = 2
    seed: int = 0
    resume: bool = False
    trainable: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()
    distributed: str = "ddp"
    mixed_precision: str | None = None

    def validate(self) -> None:
        """Check the values, raising ``ValueError`` naming ``trainer.<key>`` and what was expected."""
        for key in ("max_steps", "batch_size", "save_every", "log_every", "accumulation"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"trainer.{key} must be an integer >= 1, got {value!r}")
        for key in ("warmup_steps", "keep_last", "eval_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"trainer.{key} must be >= 0, got {getattr(self, key)!r}")
        for key in ("weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ValueError(f"trainer.{key} must be >= 0, got {getattr(self, key)!r}")
        if not self.lr > 0:
            raise ValueError(f"trainer.lr must be > 0, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"trainer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"trainer.layer_decay must be in (0, 1] or null, got {self.layer_decay!r}")
        if self.distributed not in ("ddp", "fsdp2"):
            raise ValueError(f"trainer.distributed must be 'ddp' or 'fsdp2', got {self.distributed!r}")
        if self.eval_every and self.distributed == "fsdp2":
            raise ValueError("trainer.eval_every is not supported with trainer.distributed=fsdp2 (sharded parameters)")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"trainer.precision must be one of {list(PRECISIONS)} or null, got {self.precision!r}")
        if self.device != "auto" and str(self.device).split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"trainer.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"trainer.peak_tflops must be > 0 or null, got {self.peak_tflops!r}")
        if self.mixed_precision not in (None, "bf16", "fp32"):
            raise ValueError(f"trainer.mixed_precision must be 'bf16', 'fp32' or null, got {self.mixed_precision!r}")


def resolve_parameter_sets(module: nn.Module, entries: Sequence[str], key: str = "trainer.trainable") -> list[str]:
    """Glob patterns of ``module``'s parameter names for each entry: a named group of ``module.model`` (see
    :meth:`OnePeaceModel.named_parameter_groups`), ``decoder``, or a glob; an entry matching nothing is an error."""
    model = getattr(module, "model", None)
    groups: dict[str, list[str]] = {}
    if model is not None and hasattr(model, "named_parameter_groups"):
        groups = model.named_parameter_groups()
    names = [n for n, _ in module.named_parameters()]
    patterns: list[str] = []
    for entry in entries:
        if entry in groups:
            found = [f"model.{n}" for n in groups[entry]]
        elif entry == "decoder":
            found = [n for n in names if n.startswith("decoder.")]
        else:
            found = [n for n in names if fnmatch.fnmatch(n, entry)]
            found = [entry] if found else []
        if not found:
            shown = ", ".join(sorted(groups)) or "none"
            raise ValueError(
                f"{key}: {entry!r} matches no parameter (named groups: {shown}, decoder; or a glob of names "
                "such as 'model.adapters.audio.*')"
            )
        patterns += found
    return patterns


def apply_freezing(module: nn.Module, trainable: Sequence[str], frozen: Sequence[str]) -> list[str]:
    """Set ``requires_grad`` from parameter sets (named groups or globs); returns the trainable names."""
    train_pats = resolve_parameter_sets(module, trainable, "trainer.trainable")
    frozen_pats = resolve_parameter_sets(module, frozen, "trainer.frozen")
    names = []
    for name, p in module.named_parameters():
        train = not train_pats or any(fnmatch.fnmatch(name, pat) for pat in train_pats)
        if any(fnmatch.fnmatch(name, pat) for pat in frozen_pats):
            train = False
        p.requires_grad_(train)
        if train:
            names.append(name)
    if not names:
        raise ValueError(
            f"freezing patterns leave nothing to train (trainable={list(trainable)}, frozen={list(frozen)})"
        )
    return names


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
        evaluate: Called with the step every ``config.eval_every`` steps on rank 0; returns JSON-ready results
            (logged to ``eval.jsonl``, numbers also to TensorBoard as ``eval/<key>``).
    """

    def __init__(
        self,
        task: nn.Module,
        loader: Any,
        config: TrainerConfig,
        output_dir: str | Path,
        extra_state: tuple[Callable[[], Any], Callable[[Any], None]] | None = None,
        evaluate: Callable[[int], dict[str, Any]] | None = None,
    ) -> None:
        config.validate()
        self.evaluate = evaluate
        self.task = task
        self.loader = loader
        self.cfg = config
        self.out = Path(output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.extra_state = extra_state
        apply_freezing(task, config.trainable, config.frozen)
        self.rank, self.world = dist_info()
        self.device = resolve_device(config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(config.precision, self.device, config.bf16, config.mixed_precision)
        task.to(self.device)  # model, decoder, heads: everything the task owns, before any wrapping
        if self.precision == "bf16":
            task.to(torch.bfloat16)
        if config.compile:  # regional: each shared layer compiled in place, before any wrapping
            for layer in getattr(task.model, "layers", []):
                layer.compile()
        self.tokens = TokenCounter(task.model)  # type: ignore[arg-type]
        self.forward_module: nn.Module = task
        self.sharded = False
        self.autocast = autocast_dtype(self.precision)
        import torch.distributed as dist

        in_group = dist.is_available() and dist.is_initialized()
        if self.world > 1 or (in_group and config.distributed == "fsdp2"):  # FSDP2 also on one rank (tests, 1 GPU)
            if config.distributed == "ddp":
                from torch.nn.parallel import DistributedDataParallel

                ids = None
                if self.device.type == "cuda":
                    ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
                unused = bool(getattr(task, "leaves_parameters_unused", True))  # the task knows; else assume so
                self.forward_module = DistributedDataParallel(task, device_ids=ids, find_unused_parameters=unused)
            elif config.distributed == "fsdp2":
                self._fully_shard(task, config)
                self.autocast = None  # FSDP2's MixedPrecisionPolicy casts instead
                self.sharded = True
            else:
                raise ValueError(f"trainer.distributed must be 'ddp' or 'fsdp2', got {config.distributed!r}")
        num_layers = len(getattr(task.model, "layers", []))
        self.opt = build_optimizer(parameter_groups(task, config, num_layers), config.lr, dict(config.optimizer))
        self.step = 0
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        if config.grad_checkpointing:
            task.model.set_grad_checkpointing(True)  # type: ignore[union-attr,operator]
        self._install_comm_log()
        self.batch_dtype = torch.bfloat16 if self.precision == "bf16" else None
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self._tb: Any = None
        self._batches: Iterator[Any] | None = None
        self._yielded = 0
        self._empty_passes = 0
        self._flops_counted = False
        self.throughput = Throughput(self.world)
        self._step_samples = 0
        self._saved_loader_state: Any = None  # the loader's state at the start of the step (see fit)

    # ----------------------------------------------------------------------------------------- checkpoint
    def save(self) -> Path:
        """Write ``checkpoints/step_N`` atomically (see :func:`one_peace.train.checkpointing.save_checkpoint`)."""
        return save_checkpoint(self)

    def resume(self) -> bool:
        """Restore the latest complete checkpoint, if any; returns whether one was found."""
        return resume_checkpoint(self)

    # ------------------------------------------------------------------------------------------ training
    def _next_batch(self) -> Any:
        while True:
            if self._batches is None:
                self.epoch = int(getattr(self.loader, "epoch", self.epoch))
                self._batches = iter(self.loader)
                self._yielded = 0
            try:
                waited = time.perf_counter()
                batch = next(self._batches)
                self.throughput.add_wait(time.perf_counter() - waited)
                self._step_samples += batch_samples(batch)
                self._yielded += 1
                return batch
            except StopIteration:
                self._batches = None
                # a pass that yields nothing is fine once (a run resumed at the very end of an epoch), not twice
                self._empty_passes = self._empty_passes + 1 if self._yielded == 0 else 0
                if self._empty_passes >= 2:
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
        if self._tb is None:  # metrics.jsonl is always written; TensorBoard when it imports and works
            self._tb = False
            board = optional_import("torch.utils.tensorboard", "train", "TensorBoard logging")
            if board is not None:
                try:
                    self._tb = board.SummaryWriter(str(self.out / "tensorboard"))
                except Exception as exc:  # an installed but broken TensorBoard: training goes on
                    warn_once(f"TensorBoard logging skipped: {type(exc).__name__}: {exc}")
        if self._tb:
            try:
                for k, v in logs.items():
                    if k != "step":
                        self._tb.add_scalar(k, v, int(logs["step"]))
            except Exception as exc:
                warn_once(f"TensorBoard logging stopped: {type(exc).__name__}: {exc}")
                self._tb = False

    def _evaluate(self) -> None:
        """Run the ``evaluate`` callback on rank 0 (the others wait at their next collective), log its results."""
        if self.rank == 0:
            assert self.evaluate is not None
            results = self.evaluate(self.step)
            self.task.train()
            with open(self.out / "eval.jsonl", "a") as fh:
                fh.write(json.dumps({"step": self.step, **results}, default=str) + "\n")
            if self._tb:
                for k, v in results.items():
                    if isinstance(v, int | float) and not isinstance(v, bool):
                        self._tb.add_scalar(f"eval/{k}", v, self.step)

    def _fully_shard(self, task: nn.Module, config: TrainerConfig) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtype = torch.bfloat16 if self.precision == "bf16-autocast" else None
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
        for layer in task.model.layers:  # type: ignore[union-attr]
            fully_shard(layer, mp_policy=policy)
        fully_shard(task, mp_policy=policy)

    def _gradient_sync(self, sync: bool) -> Any:
        """No gradient communication on micro-steps 1..k-1 of an accumulated step (DDP ``no_sync``, FSDP2
        ``set_requires_gradient_sync``); the last micro-step's backward communicates the accumulated gradients."""
        if self.world == 1 or sync:
            if self.sharded:
                self.task.set_requires_gradient_sync(True)  # type: ignore[operator]
            return contextlib.nullcontext()
        if self.sharded:
            self.task.set_requires_gradient_sync(False)  # type: ignore[operator]
            return contextlib.nullcontext()
        return self.forward_module.no_sync()  # type: ignore[operator]

    def _install_comm_log(self) -> None:
        """``ONE_PEACE_COMM_LOG=path`` (tests): count DDP's gradient all-reduce calls per micro-step into ``path``."""
        path = os.environ.get(COMM_LOG_ENV)
        self._comm_calls = 0
        self._comm_path = None
        if not path or self.world == 1 or self.sharded:
            return
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks the annotations: none here
            self._comm_calls += 1
            return allreduce_hook(state, bucket)

        self.forward_module.register_comm_hook(None, counting)  # type: ignore[operator]
        self._comm_path = Path(f"{path}.rank{self.rank}")

    def _comm_record(self, micro: int) -> None:
        if getattr(self, "_comm_path", None) is None:
            return
        with open(self._comm_path, "a") as fh:  # type: ignore[arg-type]
            fh.write(json.dumps({"step": self.step, "micro": micro, "allreduce_calls": self._comm_calls}) + "\n")
        self._comm_calls = 0

    def _host_logs(self, logs: Logs) -> dict[str, float]:
        """The step's logs on the host: one stacked transfer of the device values (and, under torchrun, one
        all-reduce averaging them over ranks). Called at log steps only: the only synchronisation of a step."""
        keys = sorted(logs)
        values = torch.stack(
            [torch.as_tensor(logs[k], dtype=torch.float64, device=self.device).detach().reshape(()) for k in keys]
        )
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(values)
            values /= self.world
        return dict(zip(keys, values.tolist()))

    def _cast(self) -> Any:
        return torch.autocast(self.device.type, self.autocast) if self.autocast else contextlib.nullcontext()

    def _device_batch(self, batch: Any) -> Any:
        """The transfer step; tasks that ask for it (``uses_host_batch``) also get the host copy under ``HOST_KEY``."""
        moved = move_batch(batch, self.device, self.batch_dtype)
        if getattr(self.task, "uses_host_batch", False) and isinstance(moved, dict):
            moved[HOST_KEY] = HostBatch(batch)
        return moved

    def accumulate(self) -> Logs:
        """Forward and backward ``trainer.accumulation`` micro-batches into the gradients; returns their mean logs.

        When the task has objectives that cache features (``task.caches_features``, e.g. contrastive), the k
        micro-batches are read first and their features computed without gradient, so those objectives see the
        whole k-times batch (:class:`~one_peace.train.objectives.FeatureCache`); otherwise one micro-batch at a
        time. Gradients are communicated only in the last micro-step's backward.
        """
        k = self.cfg.accumulation
        batches: Iterator[Any] | list[Any] = (self._device_batch(self._next_batch()) for _ in range(k))
        caches: list[dict[str, FeatureCache]] | None = None
        if k > 1 and getattr(self.task, "caches_features", False):
            batches = list(batches)
            with torch.no_grad(), self._cast():
                feats = [self.forward_module(b, features_only=True) for b in batches]
            caches = [{key: FeatureCache([f[key] for f in feats], i) for key in feats[0]} for i in range(k)]
        agg: Logs = {}
        for micro, batch in enumerate(batches):
            kwargs = {} if caches is None else {"cache": caches[micro]}
            with self._gradient_sync(micro == k - 1), self._cast():
                loss, logs = self.forward_module(batch, **kwargs)
                scaled = loss / k
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            self._comm_record(micro)
            for key, v in logs.items():
                agg[key] = agg.get(key, 0.0) + v / k  # device tensors stay there (no synchronisation)
        return agg

    def _peak_flops(self) -> float:
        """``trainer.peak_tflops``, or a dense matmul measured now in the training precision on the device."""
        if self.cfg.peak_tflops is not None:
            return self.cfg.peak_tflops * 1e12
        dtype = {"bf16": torch.bfloat16, "bf16-autocast": torch.bfloat16, "fp16": torch.float16}.get(
            self.precision, torch.float32
        )
        n, seconds = (8192, 0.5) if self.device.type == "cuda" else (1024, 0.2)
        return matmul_peak(dtype, n=n, seconds=seconds, device=self.device)

    def _step(self) -> Logs:
        """One optimizer step's forward and backward passes; the first of the process also counts its FLOPs."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = None if self._flops_counted else FlopCounterMode(display=False)
        with counter if counter is not None else contextlib.nullcontext():
            agg = self.accumulate()
        tokens = self.tokens.take()
        self.throughput.add_step(self._step_samples, tokens)
        self._step_samples = 0
        if counter is not None:  # once, even when it finds nothing to count (then no MFU)
            self.throughput.set_step_flops(int(counter.get_total_flops()), tokens)
            self._flops_counted = True
        return agg

    def _stop_on_bad_data(self, exc: TooManyBadSamples) -> TooManyBadSamples:
        """Save the last completed step (unless saved already) before a too-many-bad-samples stop; the error to
        raise names the checkpoint and how to go on."""
        done = latest_checkpoint(self.out)
        if self.step == 0:
            saved = "no step had completed, nothing was saved"
        elif done is not None and done.name == f"step_{self.step:07d}":
            saved = f"the last completed step {self.step} is saved in {done}"
        else:
            saved = f"the last completed step {self.step} was saved to {self.save()}"
        return TooManyBadSamples(
            f"{exc}. Training stopped; {saved}. To go on, fix or remove the bad rows, or raise the limit "
            "(data.max_bad_fraction), and run again with trainer.resume=true",
            exc.bad_rows,
        )

    def fit(self) -> Path:
        """Train to ``max_steps`` (resuming when configured); returns the final checkpoint folder.

        Every ``log_every`` steps ``metrics.jsonl`` (and TensorBoard, and the progress bar) get the loss, the
        learning rate, ``samples_per_s`` and ``tokens_per_s`` (whole job), ``data_wait`` (fraction of the interval
        spent waiting for a batch) and ``mfu`` (see :mod:`one_peace.train.throughput`). A stop on too many bad
        samples first saves the last completed step.
        """
        from tqdm import tqdm

        if self.cfg.resume and self.rank == 0:
            print(
                f"resumed from step {self.step}"
                if self.resume()
                else f"trainer.resume: no checkpoint in {self.out}, starting fresh"
            )
        elif self.cfg.resume:
            self.resume()
        self.task.train()
        self.throughput.peak_flops = self._peak_flops()
        if self.rank == 0:
            backend = getattr(getattr(getattr(self.task, "model", None), "config", None), "attn_backend", "?")
            print(
                f"training on {self.device} (world size {self.world}), precision {self.precision}, attention "
                f"{backend}; MFU against a peak of {self.throughput.peak_flops / 1e12:.3g} TFLOP/s"
            )
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
        self.throughput.restart()
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)  # first step with a non-finite loss
        while self.step < self.cfg.max_steps:
            for group in self.opt.param_groups:
                group["lr"] = self.cfg.lr * lr_at(self.step, self.cfg) * group.get("lr_scale", 1.0)
            self.opt.zero_grad(set_to_none=True)
            if self.cfg.accumulation > 1:  # a stop in a later micro-batch saves the position of the step's start
                self._saved_loader_state = self.loader.state_dict()
            try:
                agg = self._step()
            except TooManyBadSamples as exc:
                bar.close()
                raise self._stop_on_bad_data(exc) from None
            self._saved_loader_state = None
            loss_value = torch.as_tensor(agg.get("loss", 0.0), device=self.device)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss_value), self.step, first_bad)
            params = [p for p in self.task.parameters() if p.grad is not None]
            if self.scaler is not None:
                self.scaler.unscale_(self.opt)
            if self.cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
                agg["grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            if self.scaler is not None:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
            self.step += 1
            log_now = self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps
            save_now = self.step % self.cfg.save_every == 0 or self.step == self.cfg.max_steps
            if log_now or save_now:  # the step's only host synchronisations: logs, and the loss check before saving
                bad = int(first_bad)
                if bad >= 0:
                    raise FloatingPointError(f"non-finite loss at step {bad} (detected at step {self.step})")
            if log_now:
                logs = self._host_logs(agg)
                rates = self.throughput.report()
                logs.update(step=self.step, lr=self.opt.param_groups[0]["lr"], seconds=time.perf_counter() - start)
                logs.update(rates)
                if self.rank == 0:
                    self._log(logs)
                postfix = {"loss": f"{logs['loss']:.3f}", "samples/s": f"{rates['samples_per_s']:.1f}"}
                postfix["wait"] = f"{rates['data_wait']:.0%}"
                if "mfu" in rates:
                    postfix["mfu"] = f"{rates['mfu']:.1%}"
                bar.set_postfix(postfix)
                self.throughput.restart()
            bar.update(1)
            paused = time.perf_counter()  # evaluation and checkpoints are not step time
            if self.evaluate is not None and self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                self._evaluate()
                self.tokens.take()
            if save_now:
                last = self.save()
            self.throughput.start += time.perf_counter() - paused
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
        if last is None:  # resumed at max_steps: the finished run's own checkpoint, not a re-save over it
            done = latest_checkpoint(self.out)
            last = done if done is not None and done.name == f"step_{self.step:07d}" else self.save()
        return last

    def plot(self) -> Path | None:
        """Save the loss curves of ``metrics.jsonl`` as ``loss.png`` (skipped, with one warning, without a working
        matplotlib)."""
        if not self.history or not optional("matplotlib", "train", "the loss plot (loss.png)"):
            return None
        try:
            return self._plot()
        except Exception as exc:  # an installed but broken matplotlib: the run's results stand without the plot
            warn_once(f"the loss plot (loss.png) skipped: {type(exc).__name__}: {exc}")
            return None

    def _plot(self) -> Path:
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
