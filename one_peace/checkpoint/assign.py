"""Streaming a state into a model built on the ``meta`` device: names and shapes checked, buffers included."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from one_peace.checkpoint.safe_pickle import CheckpointError
from one_peace.config import ModelConfig
from one_peace.models.encoder import OnePeaceModel


def _build_meta(config: ModelConfig) -> OnePeaceModel:
    with torch.device("meta"):
        return OnePeaceModel(config)


def _kind(dtype: torch.dtype) -> str:
    """``float``, ``complex``, ``bool`` or ``int``: what a stored tensor must share with the model's."""
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "int"


def persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers that belong in a state dict (``register_buffer(..., persistent=True)``), by name."""
    out = {}
    for module_name, module in model.named_modules():
        for attr, buf in module.named_buffers(recurse=False):
            if buf is not None and attr not in module._non_persistent_buffers_set:
                out[f"{module_name}.{attr}" if module_name else attr] = buf
    return out


def _assign(
    model: OnePeaceModel,
    items: Iterator[tuple[str, torch.Tensor, str]],
    source: str,
    dtype: torch.dtype | None,
    device: str | torch.device,
) -> None:
    """Stream ``(our_name, tensor, key_in_file)`` into a meta-built model, checking names and shapes.

    Parameters and persistent buffers (a plugin adapter's, for example) are loaded; non-persistent buffers, which
    checkpoints never hold, are then computed again on the target device (:func:`_materialise_buffers`).
    """
    params = dict(model.named_parameters())
    buffers = persistent_buffers(model)
    seen: set[str] = set()
    for name, tensor, key in items:
        if name not in params and name not in buffers:
            raise CheckpointError(f"{source}: unexpected key {key!r} (no such parameter or buffer in the model)")
        p = params.get(name, buffers.get(name))
        assert p is not None
        if tuple(tensor.shape) != tuple(p.shape):
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(p.shape)}"
            )
        if _kind(tensor.dtype) != _kind(p.dtype):
            raise CheckpointError(
                f"{source}: key {key!r} holds {tensor.dtype} values, the model expects "
                + ("floating-point ones" if p.is_floating_point() else str(p.dtype))
            )
        target_dtype = dtype or (torch.float32 if tensor.is_floating_point() else tensor.dtype)
        if not tensor.is_floating_point():
            target_dtype = tensor.dtype
        value = tensor.to(device=device, dtype=target_dtype)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if name in params:
            setattr(module, attr, torch.nn.Parameter(value, requires_grad=p.requires_grad))
        else:
            module._buffers[attr] = value
        seen.add(name)
    missing = sorted((set(params) | set(buffers)) - seen)
    if missing:
        raise CheckpointError(
            f"{source}: missing weights for {len(missing)} parameter(s) or buffer(s): "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
    _materialise_buffers(model, device, dtype, source)


def _materialise_buffers(
    model: OnePeaceModel, device: str | torch.device, dtype: torch.dtype | None, source: str
) -> None:
    """Non-persistent buffers left on ``meta``: rebuilt by building their adapter or FFN again (small modules)."""
    pending = [name for name, buf in model.named_buffers() if buf is not None and buf.device.type == "meta"]
    if not pending:
        return
    fresh: dict[str, torch.nn.Module] = {}
    for name in pending:
        parts = name.split(".")
        if parts[0] == "adapters":
            owner = ".".join(parts[:2])
            if owner not in fresh:
                m = parts[1]
                fresh[owner] = model.plugins[m].build_adapter(model.config, dict(model.adapters.items()))
        elif parts[0] == "layers" and len(parts) > 3 and parts[2] == "ffns":
            owner = ".".join(parts[:4])
            if owner not in fresh:
                fresh[owner] = model.plugins[parts[3]].build_ffn(model.config)
        else:
            raise CheckpointError(
                f"{source}: cannot rebuild the non-persistent buffer {name!r} (not in an adapter or FFN)"
            )
        rel = name[len(owner) + 1 :]
        value = fresh[owner].get_buffer(rel)
        if value.is_floating_point() and dtype is not None:
            value = value.to(dtype)
        module_name, _, attr = name.rpartition(".")
        model.get_submodule(module_name)._buffers[attr] = value.to(device)
