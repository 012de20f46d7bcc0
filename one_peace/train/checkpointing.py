"""Checkpoints of a training run: atomic save, exact resume (also through DCP under FSDP2), RNG state.

Checkpoints are folders ``<output_dir>/checkpoints/step_0000100/`` in the checkpoint-folder contract (weights as
safetensors + ``config.json``, so ``one_peace.load(folder)`` opens any of them) plus ``task.safetensors`` (the
task's other modules: decoders) and ``training_state/`` (optimizer, scheduler, RNG, data position). Each is
written to a temporary folder and renamed into place, and gets a ``COMPLETE`` marker last: a half-written
checkpoint is never picked up as the latest. The functions take the :class:`~one_peace.train.trainer.Trainer`
whose state they write or restore.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from one_peace.checkpoint import iter_weights, persistent_buffers
from one_peace.checkpoint import save as save_folder

CKPT_RE = re.compile(r"^step_(\d{7})$")


def _recover(root: Path) -> None:
    """Finish an interrupted replacement: a ``.step_N.old`` whose ``step_N`` is missing is put back."""
    for old in root.glob(".step_*.old"):
        final = root / old.name[1:].removesuffix(".old")
        if CKPT_RE.match(final.name) and not final.exists():
            os.replace(old, final)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Every *complete* checkpoint folder, newest first (temporary and unmarked folders are ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    _recover(root)
    found = [p for p in root.iterdir() if CKPT_RE.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)), reverse=True)  # type: ignore[union-attr]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest *complete* checkpoint folder, or ``None``."""
    found = complete_checkpoints(output_dir)
    return found[0] if found else None


def dist_info() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """A barrier across ranks (nothing outside a process group)."""
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


def module_rng_states(module: torch.nn.Module) -> dict[str, Any]:
    """Every RNG a module tree owns (``torch.Generator`` and ``random.Random`` attributes of any submodule), by path.

    One mechanism for every task: masking generators, instruction-template sampling, ``mask_ratio`` draws and
    whatever a plugin's task adds are all saved, without looking them up by name.
    """
    out: dict[str, Any] = {}
    for prefix, sub in module.named_modules():
        for attr, value in vars(sub).items():
            key = f"{prefix}.{attr}" if prefix else attr
            if isinstance(value, torch.Generator):
                out[key] = {"kind": "torch", "state": value.get_state()}
            elif isinstance(value, random.Random):
                out[key] = {"kind": "python", "state": value.getstate()}
    return out


def set_module_rng_states(module: torch.nn.Module, states: Mapping[str, Any]) -> None:
    """Restore :func:`module_rng_states`; an RNG the checkpoint lacks (or has but the module lacks) is an error."""
    own = module_rng_states(module)
    if set(own) != set(states):
        raise ValueError(
            f"resume state: the task's RNGs {sorted(own)} differ from the checkpoint's {sorted(states)} "
            "(was the run resumed with another recipe?)"
        )
    for key, entry in states.items():
        *path, attr = key.split(".")
        sub = module.get_submodule(".".join(path)) if path else module
        rng = getattr(sub, attr)
        if entry["kind"] == "torch":
            rng.set_state(entry["state"])
        else:
            rng.setstate(entry["state"])


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


def save_checkpoint(self: Any) -> Path:
    """Write ``checkpoints/step_N`` of a :class:`~one_peace.train.trainer.Trainer` atomically.

    Rank 0 writes the weights, every rank its resume state.

    Under FSDP2 the full encoder state is gathered (collective) and written as safetensors by rank 0, and the
    sharded model + optimizer state goes through ``torch.distributed.checkpoint`` (``training_state/dcp``).
    """
    root = self.out / "checkpoints"
    final = root / f"step_{self.step:07d}"
    tmp = root / f".{final.name}.tmp"
    if self.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "training_state").mkdir(parents=True)
    barrier()
    full_state, full_extra = full_task_state(self)
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
            # the position at the start of an interrupted step when the trainer kept one (a stop mid-accumulation)
            "loader": getattr(self, "_saved_loader_state", None) or self.loader.state_dict(),
            "history": self.history,
            "extra": self.extra_state[0]() if self.extra_state else None,
            "task_rngs": module_rng_states(self.task),
            "scaler": self.scaler.state_dict() if getattr(self, "scaler", None) is not None else None,
        }
        torch.save(state, tmp / "training_state" / f"rank{self.rank}.pt")
        barrier()
        if self.rank == 0:
            extra = full_extra if self.sharded else _task_only(self.task.state_dict())
            save_folder(  # the task's own modules (decoders) in task.safetensors, under FSDP2 too
                self.task.model,
                tmp / "weights",
                state_dict=full_state,  # type: ignore[arg-type]
                task_state={k: v.detach().contiguous().cpu() for k, v in (extra or {}).items()} or None,
            )
            for f in (tmp / "weights").iterdir():
                f.rename(tmp / f.name)
            (tmp / "weights").rmdir()
            meta = {**asdict(self.cfg), "world_size": self.world}
            (tmp / "training_state" / "trainer.json").write_text(json.dumps(meta, indent=2, default=list) + "\n")
            (tmp / "COMPLETE").write_text(f"{self.step}\n")
            if final.exists():  # never delete before the replacement is in place (see _recover)
                old = root / f".{final.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            kept = sorted((p for p in root.iterdir() if CKPT_RE.match(p.name)), key=lambda p: p.name)
            for old in kept[: -self.cfg.keep_last] if self.cfg.keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    return final


class UnreadableCheckpoint(RuntimeError):
    """A checkpoint folder that cannot be restored (corrupt or for another model)."""


def resume_checkpoint(self: Any) -> bool:
    """Restore the latest complete checkpoint, if any; returns whether one was found.

    When the newest one cannot be read (corrupt files), the previous complete one is used instead, and the
    fallback is printed (single process; under torchrun every rank must agree, so the error is raised instead).
    Rows of ``metrics.jsonl`` after the step resumed from (step 0 when there is no checkpoint) are dropped.
    """
    found = complete_checkpoints(self.out)
    for i, ckpt in enumerate(found):
        try:
            _restore(self, ckpt)
        except UnreadableCheckpoint as exc:
            if self.world > 1 or i + 1 == len(found):
                raise
            print(f"{exc}; falling back to the previous complete checkpoint {found[i + 1].name}")
            continue
        _trim_metrics(self)
        return True
    _trim_metrics(self)  # a run that died before its first checkpoint: its rows will be logged again from step 0
    return False


def _trim_metrics(self: Any) -> None:
    """Drop the rows of ``metrics.jsonl`` logged after the resumed step (they will be logged again)."""
    path = self.out / "metrics.jsonl"
    if self.rank != 0 or not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= self.step]
    if len(kept) != len(rows):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def _restore(self: Any, ckpt: Path) -> None:
    """Load one checkpoint folder into the trainer (weights, task modules, optimizer, RNG, data position)."""
    from safetensors.torch import load_file

    from one_peace.checkpoint import CheckpointError

    state_file = ckpt / "training_state" / f"rank{self.rank}.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file}: no resume state for rank {self.rank} (was the world size different?)")
    try:
        state = torch.load(state_file, weights_only=True)  # plain data and tensors only
    except Exception as exc:  # torch raises RuntimeError / UnpicklingError / EOFError for damaged files
        raise UnreadableCheckpoint(f"{state_file}: unreadable resume state ({type(exc).__name__}: {exc})") from None
    if self.sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.task, self.opt)
        sd: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=str(ckpt / "training_state" / "dcp"))
        set_state_dict(self.task, self.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    params = dict(self.task.model.named_parameters())  # type: ignore[union-attr]
    params.update(persistent_buffers(self.task.model))  # type: ignore[arg-type]
    try:
        with torch.no_grad():
            for name, tensor in iter_weights(ckpt) if not self.sharded else ():
                if name not in params:
                    raise ValueError(f"{ckpt}: weight {name!r} is not a parameter or buffer of this model")
                if params[name].shape != tensor.shape:
                    raise ValueError(
                        f"{ckpt}: {name} has shape {tuple(tensor.shape)}, the model's is {tuple(params[name].shape)} "
                        "(was the run resumed with another model size?)"
                    )
                params[name].copy_(tensor)
            if not self.sharded and (ckpt / "task.safetensors").is_file():
                own = {**dict(self.task.named_parameters()), **persistent_buffers(self.task)}
                for k, v in load_file(str(ckpt / "task.safetensors")).items():
                    if k in own:
                        own[k].copy_(v)
    except CheckpointError as exc:
        raise UnreadableCheckpoint(str(exc)) from None
    if state["optimizer"] is not None:
        self.opt.load_state_dict(state["optimizer"])
    self.step, self.epoch, self.history = state["step"], state["epoch"], state["history"]
    _set_rng_state(state["rng"])
    self.loader.load_state_dict(state["loader"])
    if self.extra_state and state.get("extra") is not None:
        self.extra_state[1](state["extra"])
    if state.get("scaler") is not None and getattr(self, "scaler", None) is not None:
        self.scaler.load_state_dict(state["scaler"])
    if state.get("task_rngs") is not None:  # absent in checkpoints written before this was saved
        set_module_rng_states(self.task, state["task_rngs"])


# ------------------------------------------------------------------------------------------ training


def _task_only(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The task's own tensors of a task state dict (the encoder, ``model.*`` at any depth, is written apart)."""
    return {
        k: v
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and not k.startswith("model.") and ".model." not in k
    }


def full_task_state(self: Any) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """The encoder's and the task's own (decoders) full (unsharded) states on rank 0 (collective under FSDP2);
    ``(None, None)`` when not sharded."""
    if not self.sharded:
        return None, None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(self.task, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    encoder = {
        k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.") and isinstance(v, torch.Tensor)
    }
    return encoder, _task_only(full)
