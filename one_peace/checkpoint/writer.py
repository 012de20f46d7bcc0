"""Writing weights into a checkpoint folder in the Hugging Face layout, tensor by tensor: ``model.safetensors`` when
they fit one file, else ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json`` (``metadata``
with ``total_size``, and ``weight_map``). At most one shard is held in memory (the tensors added since the last
flush: views of a memory-mapped source stay views until safetensors serialises them).

Used by the converter (official ``.pt`` -> folder) and by :func:`one_peace.hub.save_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from one_peace.checkpoint.folder import INDEX, WEIGHTS


def parse_size(text: str | int) -> int:
    """Bytes of a size such as ``"500MB"``, ``"2GB"``, ``"64k"`` or ``1048576`` (binary units)."""
    if isinstance(text, int):
        return text
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").rstrip("b")
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise ValueError(f"expected a size such as 500MB or 2GB, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"a shard size must be positive, got {text!r}")
    return int(value)


class WeightWriter:
    """Streams ``(name, tensor)`` pairs into safetensors shards of about ``shard_size`` bytes in ``folder``.

    A shard is closed once it reaches ``shard_size`` (a single tensor larger than that gets a shard of its own);
    :meth:`finish` gives the shards their final names and writes the index when there is more than one.
    """

    def __init__(self, folder: Path, shard_size: int = 2 << 30) -> None:
        self.folder = Path(folder)
        self.shard_size = shard_size
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._shard: dict[str, torch.Tensor] = {}
        self._bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Add one tensor (written when its shard is full)."""
        if name in self.weight_map or name in self._shard:
            raise ValueError(f"weight {name!r} written twice")
        self._shard[name] = tensor.detach().contiguous()
        size = tensor.numel() * tensor.element_size()
        self._bytes += size
        self.total_size += size
        if self._bytes >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._shard:
            return
        name = f".shard-{len(self.files):05d}.safetensors"
        save_file(self._shard, str(self.folder / name), metadata={"format": "pt"})
        self.files.append(name)
        self.weight_map.update(dict.fromkeys(self._shard, name))
        self._shard, self._bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, name the files (and write the index); returns the weight files' names."""
        self._flush()
        if not self.files:
            raise ValueError("no weights were written")
        if len(self.files) == 1:
            (self.folder / self.files[0]).rename(self.folder / WEIGHTS)
            self.files = [WEIGHTS]
            self.weight_map = dict.fromkeys(self.weight_map, WEIGHTS)
            return self.files
        n = len(self.files)
        renames = {old: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, old in enumerate(self.files)}
        for old, new in renames.items():
            (self.folder / old).rename(self.folder / new)
        self.files = list(renames.values())
        self.weight_map = {k: renames[v] for k, v in sorted(self.weight_map.items())}
        index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return self.files
