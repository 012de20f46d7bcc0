"""``python -m one_peace.new_modality NAME DIR``: write a working modality plugin package to start from.

The package (``DIR/pyproject.toml``, ``DIR/one_peace_NAME/``, ``DIR/tests/``, ``DIR/README.md``) holds an entry
point, a typed options dataclass, an adapter (frames of ``C`` features -> one token each, CLS, learned positions,
a 1-D relative bias), a preprocessor (``.npy`` / ``.csv`` / arrays, with typed errors for bad input), a collator
with padding, a demo-data command writing ``train.jsonl`` / ``valid.jsonl`` with learnable captions, and a test that
runs the conformance suite. It installs and passes its own test as generated; then make it yours.
"""

from __future__ import annotations

import argparse
import keyword
import re
import shutil
import string
from pathlib import Path

from one_peace.registry import list_modalities

PYPROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "one-peace-$dist"
version = "0.1.0"
description = "A one-peace modality plugin: $name."
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["one-peace", "torch", "numpy"]

[project.entry-points."one_peace.modalities"]
$name = "$package.plugin:${cls}Modality"

[tool.setuptools]
packages = ["$package"]
"""

README = """\
# one-peace-$dist

The `$name` modality for [one-peace](https://github.com/one-peace), written by `python -m one_peace.new_modality`.

```bash
pip install .                                    # registers `$name` (entry point one_peace.modalities)
python -m one_peace.modalities                   # lists it
python -m $package.demo OUT                      # OUT/train.jsonl, OUT/valid.jsonl
python -m one_peace.run recipe=add_modality modality=$name \\
    data.train=OUT/train.jsonl data.valid=OUT/valid.jsonl data.text_field=text
python -m pytest tests                           # the conformance suite and the demo
```

Edit `$package/plugin.py`: the options dataclass, the adapter, the preprocessor and the collator. The
contract and every optional piece are described in one-peace's docs/PLUGINS.md.
"""

INIT = '''\
"""The `$name` modality for one-peace."""

from $package.plugin import ${cls}Adapter, ${cls}Modality, ${cls}Options

__all__ = ["${cls}Adapter", "${cls}Modality", "${cls}Options"]
'''

PLUGIN = '''\
"""The `$name` modality: sequences of ``features``-dimensional frames (one token per frame)."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from one_peace.plugin import (
    Adapter,
    AdapterOutput,
    EmptyMedia,
    InvalidValue,
    MaskingPolicy,
    MediaTypes,
    ModalityPlugin,
    ModelConfig,
    NonFiniteData,
    PluginOptions,
    Preview,
    UndecodableMedia,
    bucket_1d,
    bucket_1d_rows,
    init_rel_table,
    padding_or_none,
    require,
)


@dataclass
class ${cls}Options(PluginOptions):
    """Options (``model.modality_options.$name.<option>``).

    Attributes:
        features: Numbers per frame.
        max_frames: Longer sequences are cut to this many frames.
        bucket_size: Relative-position buckets.
    """

    features: int = 8
    max_frames: int = 256
    bucket_size: int = 32


def load_frames(item: Any) -> np.ndarray:
    """A ``(T, features)`` float32 array from a ``.npy``/``.csv`` path or bytes, a nested list or an array."""
    if isinstance(item, torch.Tensor):
        array = item.detach().cpu().numpy()
    elif isinstance(item, bytes | str | Path):
        data = item if isinstance(item, bytes) else Path(item).read_bytes()
        try:
            if data[:6] == b"\\\\x93NUMPY":
                array = np.load(io.BytesIO(data), allow_pickle=False)
            else:
                array = np.loadtxt(io.StringIO(data.decode("utf-8")), delimiter=",", ndmin=2, dtype=np.float32)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UndecodableMedia(f"not a .npy array or numeric CSV: {exc}") from None
    else:
        array = np.asarray(item, dtype=np.float32)
    if array.ndim != 2:
        raise InvalidValue(f"$name input must be (frames, features), got shape {tuple(array.shape)}")
    return array.astype(np.float32, copy=False)


class ${cls}Adapter(Adapter):
    """``frames (B, T, F)`` -> one token per frame, CLS, learned positions, a 1-D relative bias."""

    modality = "$name"

    def __init__(self, dim: int, heads: int, options: ${cls}Options) -> None:
        super().__init__()
        self.options = options
        self.proj = nn.Linear(options.features, dim)
        self.norm = nn.LayerNorm(dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.positions = nn.Parameter(torch.randn(options.max_frames + 1, dim) * 0.02)
        self.rel_pos_table = init_rel_table(bucket_1d_rows(options.bucket_size), heads)

    def embed(self, batch: dict[str, Any]) -> AdapterOutput:
        """Embed ``batch["frames"]`` with ``padding_mask (B, T + 1)`` (CLS first)."""
        frames = require(batch, "frames", "$name")
        b, t, _ = frames.shape
        x = torch.cat([self.cls.expand(b, -1, -1), self.norm(self.proj(frames))], dim=1) + self.positions[: t + 1]
        pad = batch.get("padding_mask")  # kept as given on accelerators: no host read in the forward
        pad = padding_or_none(pad if isinstance(pad, torch.Tensor) else None)
        return AdapterOutput(x, pad, bucket_1d(t + 1, self.options.bucket_size, x.device), self.rel_pos_table)


class ${cls}Modality(ModalityPlugin):
    """The `$name` modality."""

    name = "$name"
    Options = ${cls}Options
    masking = MaskingPolicy(kind="span", ratio=0.5, span=2)

    def _opts(self, config: ModelConfig) -> ${cls}Options:
        opts = self.options(config)
        assert isinstance(opts, ${cls}Options)
        return opts

    def build_adapter(self, config: ModelConfig, siblings: dict[str, nn.Module]) -> nn.Module:
        """The adapter."""
        return ${cls}Adapter(config.embed_dim, config.heads, self._opts(config))

    def build_preprocessor(self, config: ModelConfig, tokenizer: Any = None) -> Callable[[Any], dict[str, Any]]:
        """``file/bytes/array -> {"frames": (T, F)}`` (bad input raises a typed error: the loader skips it)."""
        o = self._opts(config)

        def preprocess(item: Any) -> dict[str, Any]:
            array = load_frames(item)
            if array.shape[1] != o.features:
                raise InvalidValue(f"$name input has {array.shape[1]} features per frame, expected {o.features}")
            if array.shape[0] == 0:
                raise EmptyMedia("$name input has no frames")
            if not np.isfinite(array).all():
                raise NonFiniteData("$name input contains NaN or infinity")
            return {"frames": torch.from_numpy(np.ascontiguousarray(array[: o.max_frames]))}

        return preprocess

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad with zero frames; ``padding_mask (B, T + 1)`` marks the padding (CLS first)."""
        t = max(len(s["frames"]) for s in samples)
        frames = torch.zeros(len(samples), t, samples[0]["frames"].shape[1])
        mask = torch.ones(len(samples), t + 1, dtype=torch.bool)
        mask[:, 0] = False
        for i, s in enumerate(samples):
            frames[i, : len(s["frames"])] = s["frames"]
            mask[i, 1 : len(s["frames"]) + 1] = False
        return {"frames": frames, "padding_mask": mask}

    def padding(self, batch: Any) -> torch.Tensor | None:
        """Padded positions of a collated batch (CLS first): the loader's padding report and packing."""
        return batch["padding_mask"]  # type: ignore[no-any-return]

    def position_padding(self, batch: Any) -> torch.Tensor | None:
        """The adapter's padding, from the batch alone: denoising draws its masks on the host (no device read)."""
        return batch["padding_mask"].bool()  # type: ignore[no-any-return]

    def estimate_length(self, value: Any, config: ModelConfig, preprocess: Callable[[Any], dict[str, Any]]) -> int:
        """Tokens from a ``.npy`` header (no data read), for length bucketing; other inputs are decoded."""
        if isinstance(value, str | Path) and str(value).endswith(".npy"):
            frames = int(np.load(value, mmap_mode="r").shape[0])
        else:
            frames = int(preprocess(value)["frames"].shape[0])
        return 1 + min(frames, self._opts(config).max_frames)

    def validate_options(self, options: PluginOptions) -> None:
        """Option values the types alone do not rule out (the message names the option)."""
        for key in ("features", "max_frames", "bucket_size"):
            if options[key] < 1:
                raise ValueError(f"{key} must be >= 1, got {options[key]}")

    def media_types(self) -> MediaTypes:
        """The files the preprocessor reads (the search page's upload field lists them)."""
        return MediaTypes(("application/octet-stream", "text/csv"), (".npy", ".csv"))

    def preview(self, value: Any, config: ModelConfig, max_size: int = 256) -> Preview | None:
        """What a person sees of one input on the search page: here a text summary of the sequence."""
        array = load_frames(value)
        if array.size == 0:
            return Preview.text("an empty sequence")
        shape = f"{array.shape[0]} frames x {array.shape[1]} features"
        return Preview.text(f"{shape}, values in [{array.min():.3g}, {array.max():.3g}]")

    def describe_preprocessing(self, config: ModelConfig) -> dict[str, Any]:
        """What the preprocessor does, in plain words (search page, exported encoders)."""
        o = self._opts(config)
        return {
            **super().describe_preprocessing(config),
            "input": f"(frames, {o.features}) float array: .npy, numeric CSV, nested list or array",
            "max_frames": o.max_frames,
            "tensor": {"frames": ["batch", "frames", o.features], "padding_mask": ["batch", "frames + 1"]},
        }

    def example_inputs(self, config: ModelConfig, folder: Path, n: int, generator: torch.Generator) -> list[Any]:
        """``n`` ``.npy`` files of different lengths (for the conformance suite's real-path checks)."""
        o = self._opts(config)
        names = []
        for i in range(n):
            np.save(folder / f"${name}_{i}.npy", torch.randn(3 + 2 * (i % 4), o.features, generator=generator).numpy())
            names.append(f"${name}_{i}.npy")
        return names

    def example_samples(self, config: ModelConfig, n: int, generator: torch.Generator) -> list[dict[str, Any]]:
        """Random sequences of 3-9 frames."""
        o = self._opts(config)
        return [{"frames": torch.randn(3 + 2 * (i % 4), o.features, generator=generator)} for i in range(n)]

    def example_batch(self, config: ModelConfig, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        """A padded batch of :meth:`example_samples`."""
        return self.collate(self.example_samples(config, batch_size, generator))
'''

DEMO = '''\
"""``python -m $package.demo OUT``: generated `$name` data with captions (train.jsonl, valid.jsonl)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

KINDS = {"rising": 1.0, "falling": -1.0, "flat": 0.0}
LEVELS = {"low": -2.0, "high": 2.0}


def make_demo(out: str | Path, train: int = 384, valid: int = 96, seed: int = 0, features: int = 8) -> None:
    """Sequences whose trend and level the caption names ("a rising high signal")."""
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("valid", valid)):
        rows = []
        for i in range(count):
            kind, level = rng.choice(list(KINDS)), rng.choice(list(LEVELS))
            t = int(rng.integers(16, 64))
            ramp = np.linspace(-1, 1, t)[:, None] * KINDS[kind] * 2
            x = ramp + LEVELS[level] + rng.normal(0, 0.3, (t, features))
            sid = f"{split}-{i:05d}"
            np.save(out / "data" / f"{sid}.npy", x.astype(np.float32))
            rows.append({"id": sid, "$name": f"data/{sid}.npy", "text": f"a {kind} {level} signal"})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\\\\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    p = argparse.ArgumentParser(prog="python -m $package.demo")
    p.add_argument("out")
    p.add_argument("--train", type=int, default=384)
    p.add_argument("--valid", type=int, default=96)
    args = p.parse_args(argv)
    make_demo(args.out, args.train, args.valid)
    print(f"wrote {args.out}/train.jsonl and {args.out}/valid.jsonl")


if __name__ == "__main__":
    main()
'''

TEST = '''\
"""The `$name` plugin passes one-peace's conformance suite, and its demo data reads through its preprocessor."""

from __future__ import annotations

import json

import numpy as np
import pytest

import one_peace
from one_peace.errors import InvalidValue
from one_peace.testing import check_modality


def test_registered_through_the_entry_point():
    assert "$name" in one_peace.list_modalities()


def test_conformance():
    report = check_modality("$name")
    assert report.ok, str(report)


def test_demo_reads_back(tmp_path):
    from $package.demo import make_demo

    make_demo(tmp_path, train=8, valid=4)
    rows = [json.loads(x) for x in (tmp_path / "valid.jsonl").read_text().splitlines()]
    config = one_peace.model_config("tiny", ("$name",))
    prep = one_peace.get_plugin("$name").build_preprocessor(config)
    sample = prep(tmp_path / rows[0]["$name"])
    assert sample["frames"].shape[1] == 8
    with pytest.raises(InvalidValue):
        prep(np.zeros((4, 3), np.float32))
'''


def _cls_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


#: keys a loader batch already holds besides the modalities (and the instruction slot kind ``box``): a modality of
#: that name would collide with them at the first training step
RESERVED_NAMES = frozenset({"ids", "valid", "raw", "pack", "empty", "box"})
MAX_NAME_LENGTH = 40
_NAME = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")


def check_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` makes a modality, a package and a distribution that install: lower-case
    ASCII letters and digits, single underscores between them, starting with a letter, at most 40 characters, not a
    Python keyword and not a key a loader batch already holds."""
    if not _NAME.fullmatch(name) or keyword.iskeyword(name):
        raise ValueError(
            f"modality name {name!r} must be lower-case ASCII letters and digits with single underscores between "
            "them, starting with a letter (e.g. 'depth' or 'eeg_raw')"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"modality name {name!r} is {len(name)} characters long; at most {MAX_NAME_LENGTH}")
    if name in RESERVED_NAMES:
        raise ValueError(f"modality name {name!r} is a key every training batch already has; choose another name")


def write_plugin(name: str, folder: str | Path, force: bool = False) -> list[Path]:
    """Write the plugin package for modality ``name`` into ``folder``; returns the files written.

    Raises:
        ValueError: ``name`` fails :func:`check_name`, is already a registered modality, or ``folder`` exists and
            is not empty (unless ``force``). Nothing is written then; a write that fails midway removes its files.
    """
    check_name(name)
    taken = list_modalities()
    if name in taken:
        raise ValueError(f"modality {name!r} is already registered (by {taken[name]}); choose another name")
    root = Path(folder)
    if root.exists() and any(root.iterdir()) and not force:
        raise ValueError(f"{root} exists and is not empty (pass --force to write into it)")
    package = f"one_peace_{name}"
    values = {"name": name, "package": package, "dist": name.replace("_", "-"), "cls": _cls_name(name)}
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"{package}/__init__.py": INIT,
        f"{package}/plugin.py": PLUGIN,
        f"{package}/demo.py": DEMO,
        f"tests/test_{name}.py": TEST,
    }
    written: list[Path] = []
    existed = root.exists()
    try:
        for rel, template in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(string.Template(template).substitute(values).replace("\\\\", "\\"))
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if not existed:
            shutil.rmtree(root, ignore_errors=True)
        raise
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m one_peace.new_modality NAME DIR [--force]``."""
    p = argparse.ArgumentParser(prog="python -m one_peace.new_modality", description=__doc__.splitlines()[0])
    p.add_argument("name", help="the modality's name (a lower-case identifier)")
    p.add_argument("dir", help="the folder to write the package into")
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    args = p.parse_args(argv)
    try:
        files = write_plugin(args.name, args.dir, args.force)
    except ValueError as exc:
        p.error(str(exc))
    print(f"wrote {len(files)} files under {args.dir}:")
    for f in files:
        print(f"  {f}")
    # a bare folder name would be read by pip as a package to fetch from the registry: always a path
    folder = args.dir if Path(args.dir).is_absolute() or args.dir.startswith(".") else f"./{args.dir}"
    print(f"next: pip install -e {folder} && python -m pytest {folder}/tests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
