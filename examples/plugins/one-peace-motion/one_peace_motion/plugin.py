"""The ``motion`` modality: variable-length multichannel sequences (IMU / accelerometer, joint rotations).

A sequence is ``(T, C)``: ``T`` frames of ``C`` channels (6 by default: a 3-axis accelerometer and a 3-axis
gyroscope, as in ImageBind's IMU data; joint rotations as in OFASys's MOTION modality are ``C = 3 * joints``).
Frames are grouped into patches of ``patch`` frames; each patch is one token (a linear patch embedding), with a
learned CLS token, learned absolute positions and a 1-D bucketed relative bias. Denoising masks spans of patches.

Accepted inputs: a ``.npy`` file (path or bytes), a ``.csv`` file of ``T`` rows, a numpy array or a torch tensor.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
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
class MotionOptions(PluginOptions):
    """Options of the motion plugin (``model.modality_options.motion.<option>``).

    Attributes:
        channels: Channels per frame (6: accelerometer + gyroscope).
        patch: Frames per token.
        max_frames: Longer sequences are cut (from the start) to this many frames.
        standardize: Scale every sequence to zero mean and unit variance per channel (off: amplitudes carry
            meaning in sensor data, e.g. sitting vs running).
        bucket_size: Relative-position buckets.
    """

    channels: int = 6
    patch: int = 10
    max_frames: int = 640
    standardize: bool = False
    bucket_size: int = 32


def load_motion(item: Any) -> np.ndarray:
    """A ``(T, C)`` float32 array from a path / bytes (``.npy`` or ``.csv``), an array or a tensor.

    Raises:
        UndecodableMedia: bytes or a file that is neither a ``.npy`` array nor numeric CSV.
        InvalidValue: something else than a 2-D sequence.
    """
    if isinstance(item, torch.Tensor):
        array = item.detach().cpu().numpy()
    elif isinstance(item, np.ndarray):
        array = item
    elif isinstance(item, bytes | str | Path):
        data = item if isinstance(item, bytes) else Path(item).read_bytes()
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False) if data[:6] == b"\x93NUMPY" else _csv(data)
        except ValueError as exc:
            raise UndecodableMedia(f"not a .npy array or numeric CSV: {exc}") from None
    elif isinstance(item, list):
        array = np.asarray(item, dtype=np.float32)
    else:
        raise InvalidValue(f"motion input must be a .npy/.csv file, bytes or an array, got {type(item).__name__}")
    if array.ndim != 2:
        raise InvalidValue(f"a motion sequence must be (frames, channels), got shape {tuple(array.shape)}")
    return array.astype(np.float32, copy=False)


def _csv(data: bytes) -> np.ndarray:
    return np.loadtxt(io.StringIO(data.decode("utf-8", errors="strict")), delimiter=",", ndmin=2, dtype=np.float32)


class MotionAdapter(Adapter):
    """``frames (B, T, C)`` -> patch tokens with CLS, positions and a 1-D relative bias."""

    modality = "motion"

    def __init__(self, dim: int, heads: int, options: MotionOptions) -> None:
        super().__init__()
        self.options = options
        self.patch_embed = nn.Linear(options.patch * options.channels, dim)
        self.norm = nn.LayerNorm(dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        patches = -(-options.max_frames // options.patch)
        self.positions = nn.Parameter(torch.randn(patches + 1, dim) * 0.02)
        self.rel_pos_table = init_rel_table(bucket_1d_rows(options.bucket_size), heads)

    def embed(self, batch: dict[str, Any]) -> AdapterOutput:
        """Embed ``batch["frames"] (B, T, C)`` (``T`` a multiple of ``patch``), ``padding_mask (B, T/patch + 1)``."""
        frames = require(batch, "frames", "motion")
        b, t, c = frames.shape
        p = self.options.patch
        if c != self.options.channels or t % p:
            raise ValueError(f"motion batch 'frames' must be (B, k*{p}, {self.options.channels}), got {(b, t, c)}")
        tokens = self.norm(self.patch_embed(frames.reshape(b, t // p, p * c)))
        n = tokens.shape[1] + 1
        if n > self.positions.shape[0]:
            raise ValueError(f"motion: {t} frames exceed max_frames={self.options.max_frames}")
        x = torch.cat([self.cls.expand(b, -1, -1), tokens], dim=1) + self.positions[:n]
        pad = batch.get("padding_mask")  # kept as given on accelerators: no host read in the forward
        pad = padding_or_none(pad if isinstance(pad, torch.Tensor) else None)
        return AdapterOutput(x, pad, bucket_1d(n, self.options.bucket_size, x.device), self.rel_pos_table)


class MotionModality(ModalityPlugin):
    """Motion and sensor sequences."""

    name = "motion"
    Options = MotionOptions
    masking = MaskingPolicy(kind="span", ratio=0.5, span=3)

    def build_adapter(self, config: ModelConfig, siblings: dict[str, nn.Module]) -> nn.Module:
        """A :class:`MotionAdapter`."""
        return MotionAdapter(config.embed_dim, config.heads, self._opts(config))

    def _opts(self, config: ModelConfig) -> MotionOptions:
        opts = self.options(config)
        assert isinstance(opts, MotionOptions)
        return opts

    def build_preprocessor(self, config: ModelConfig, tokenizer: Any = None) -> Callable[[Any], dict[str, Any]]:
        """``file/bytes/array -> {"frames": (T', C), "patches": n}``: cut, standardised, padded to whole patches."""
        o = self._opts(config)

        def preprocess(item: Any) -> dict[str, Any]:
            array = load_motion(item)
            if array.shape[1] != o.channels:
                raise InvalidValue(f"motion sequence has {array.shape[1]} channels, the model expects {o.channels}")
            if array.shape[0] == 0:
                raise EmptyMedia("motion sequence has no frames")
            if not np.isfinite(array).all():
                raise NonFiniteData("motion sequence contains NaN or infinity")
            frames = torch.from_numpy(np.ascontiguousarray(array[: o.max_frames]))
            if o.standardize:
                frames = (frames - frames.mean(0)) / (frames.std(0, unbiased=False) + 1e-5)
            n = -(-frames.shape[0] // o.patch)
            padded = torch.zeros(n * o.patch, o.channels)
            padded[: frames.shape[0]] = frames
            return {"frames": padded, "patches": n}

        return preprocess

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad with zero frames; ``padding_mask (B, P + 1)`` marks padded patches (CLS first)."""
        p = max(s["patches"] for s in samples)
        frames_per = samples[0]["frames"].shape[0] // max(1, samples[0]["patches"])
        channels = samples[0]["frames"].shape[1]
        frames = torch.zeros(len(samples), p * frames_per, channels)
        mask = torch.ones(len(samples), p + 1, dtype=torch.bool)
        mask[:, 0] = False
        for i, s in enumerate(samples):
            frames[i, : s["frames"].shape[0]] = s["frames"]
            mask[i, 1 : s["patches"] + 1] = False
        return {"frames": frames, "padding_mask": mask}

    def estimate_length(self, value: Any, config: ModelConfig, preprocess: Callable[[Any], dict[str, Any]]) -> int:
        """Tokens from a ``.npy`` header (no data read); other inputs are decoded."""
        o = self._opts(config)
        if isinstance(value, str | Path) and str(value).endswith(".npy"):
            frames = int(np.load(value, mmap_mode="r").shape[0])
        else:
            frames = int(preprocess(value)["frames"].shape[0])
        return 1 + -(-min(frames, o.max_frames) // o.patch)

    def example_samples(self, config: ModelConfig, n: int, generator: torch.Generator) -> list[dict[str, Any]]:
        """Random sequences of 2-5 patches."""
        o = self._opts(config)
        out = []
        for i in range(n):
            patches = 2 + i % 4
            out.append({"frames": torch.randn(patches * o.patch, o.channels, generator=generator), "patches": patches})
        return out

    def example_batch(self, config: ModelConfig, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        """A padded batch of :meth:`example_samples`."""
        return self.collate(self.example_samples(config, batch_size, generator))

    def padding(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """Padded patches (CLS first)."""
        return batch["padding_mask"]  # type: ignore[no-any-return]

    def position_padding(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """The adapter's padding from the batch alone (denoising masks are drawn on the host, no device read)."""
        return batch["padding_mask"].bool()  # type: ignore[no-any-return]

    def validate_options(self, options: PluginOptions) -> None:
        """Positive sizes; ``max_frames`` at least one patch."""
        small = [k for k in ("channels", "patch", "bucket_size") if options[k] < 1]
        if small:
            raise ValueError(f"{', '.join(small)} must be >= 1")
        if options["max_frames"] < options["patch"]:
            raise ValueError(f"max_frames must be >= patch ({options['patch']}), got {options['max_frames']}")

    def media_types(self) -> MediaTypes:
        """``.npy`` arrays and numeric CSV."""
        return MediaTypes(("application/octet-stream", "text/csv"), (".npy", ".csv"))

    def preview(self, value: Any, config: ModelConfig, max_size: int = 256) -> Preview | None:
        """A PNG line plot of every channel over time (each channel scaled to its own range)."""
        from PIL import Image, ImageDraw

        array = load_motion(value)[: self._opts(config).max_frames]
        if array.shape[0] == 0:
            raise EmptyMedia("motion sequence has no frames")
        width, height = max_size, max(16, max_size // 2)
        image = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(image)
        colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
        xs = np.linspace(0, width - 1, num=array.shape[0])
        for c in range(array.shape[1]):
            y = np.nan_to_num(array[:, c].astype(np.float64))
            span = float(y.max() - y.min()) or 1.0
            ys = (height - 1) * (1.0 - (y - y.min()) / span)
            draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=colours[c % len(colours)], width=1)
        return Preview.png(np.asarray(image), max_size)

    def describe_preprocessing(self, config: ModelConfig) -> dict[str, Any]:
        """Cut, optional standardisation, zero-padding to whole patches."""
        o = self._opts(config)
        return {
            **super().describe_preprocessing(config),
            "input": f"(frames, {o.channels}) float array: .npy, numeric CSV (one frame per row), numpy or torch",
            "max_frames": o.max_frames,
            "standardize": "per channel, zero mean and unit variance" if o.standardize else None,
            "frames_per_token": o.patch,
            "padding": "zero frames up to a whole patch",
            "tensor": {"frames": ["batch", "frames", o.channels], "padding_mask": ["batch", "tokens + 1"]},
        }

    def example_inputs(self, config: ModelConfig, folder: Path, n: int, generator: torch.Generator) -> list[Any]:
        """``n`` ``.npy`` sequences of 2-4 patches (one cut mid-patch), paths relative to ``folder``."""
        o = self._opts(config)
        names = []
        for i in range(n):
            frames = (2 + i % 3) * o.patch - (i % 2) * (o.patch // 2)
            np.save(folder / f"motion_{i}.npy", torch.randn(frames, o.channels, generator=generator).numpy())
            names.append(f"motion_{i}.npy")
        return names
