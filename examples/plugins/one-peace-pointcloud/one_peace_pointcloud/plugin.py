"""The ``pointcloud`` modality: ``(N, 3)`` xyz or ``(N, 6)`` xyz + rgb point clouds.

Point-BERT / Point-MAE style tokens: ``groups`` centres picked by farthest-point sampling, the ``group_size``
nearest points of each centre form a local patch, and a small PointNet (a shared MLP over the patch's points,
centred on its centre, then a max over them) embeds it: the token does not depend on the order of the points.
The centre's coordinates give the token its position (an MLP, no index order), and the relative bias is bucketed
by the distance between centres, so the whole sequence is permutation-invariant too.

Accepted inputs: ``.npy`` (path or bytes), ``.xyz`` / ``.txt`` / ``.csv`` text with 3 or 6 numbers per line, numpy
arrays and torch tensors. Clouds are centred, scaled into the unit sphere, and resampled to ``points`` points
(evenly over the points sorted by position, so the result does not depend on the order of the file either).
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
    init_rel_table,
    require,
)


@dataclass
class PointCloudOptions(PluginOptions):
    """Options of the point-cloud plugin (``model.modality_options.pointcloud.<option>``).

    Attributes:
        points: Points per cloud after resampling.
        groups: Local patches (tokens) per cloud, picked by farthest-point sampling.
        group_size: Points per patch (nearest neighbours of the centre).
        color: Use rgb (``N x 6`` inputs; ``N x 3`` clouds get mid grey); ``False`` reads xyz only.
        distance_buckets: Buckets of the distance-based relative bias.
    """

    points: int = 512
    groups: int = 32
    group_size: int = 16
    color: bool = True
    distance_buckets: int = 16


def load_points(item: Any) -> np.ndarray:
    """An ``(N, 3|6)`` float32 array from a path / bytes (``.npy`` or text), an array or a tensor.

    Raises:
        UndecodableMedia: bytes or a file that is neither ``.npy`` nor numeric text.
        InvalidValue: not ``(N, 3)`` or ``(N, 6)``.
    """
    if isinstance(item, torch.Tensor):
        array = item.detach().cpu().numpy()
    elif isinstance(item, np.ndarray):
        array = item
    elif isinstance(item, bytes | str | Path):
        data = item if isinstance(item, bytes) else Path(item).read_bytes()
        try:
            if data[:6] == b"\x93NUMPY":
                array = np.load(io.BytesIO(data), allow_pickle=False)
            else:
                text = data.decode("utf-8").replace(",", " ")
                array = np.loadtxt(io.StringIO(text), ndmin=2, dtype=np.float32)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UndecodableMedia(f"not a .npy array or numeric point text: {exc}") from None
    else:
        raise InvalidValue(f"point cloud input must be a file, bytes or an array, got {type(item).__name__}")
    if array.ndim != 2 or array.shape[1] not in (3, 6):
        raise InvalidValue(f"a point cloud must be (N, 3) or (N, 6), got shape {tuple(array.shape)}")
    return array.astype(np.float32, copy=False)


def farthest_point_sample(xyz: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, k)`` indices of ``k`` farthest-point-sampled points of ``xyz (B, N, 3)``.

    Starts from the point farthest from the centroid, so the choice does not depend on the points' order.
    """
    b, n, _ = xyz.shape
    dist = torch.full((b, n), float("inf"), device=xyz.device)
    far = (xyz - xyz.mean(1, keepdim=True)).norm(dim=-1).argmax(1)
    out = torch.empty(b, k, dtype=torch.long, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    for i in range(k):
        out[:, i] = far
        centre = xyz[rows, far][:, None]
        dist = torch.minimum(dist, (xyz - centre).pow(2).sum(-1))
        far = dist.argmax(1)
    return out


class PointCloudAdapter(Adapter):
    """``points (B, N, 3|6)`` -> FPS + kNN patch tokens (mini-PointNet), centre positions, distance-bucketed bias."""

    modality = "pointcloud"

    def __init__(self, dim: int, heads: int, options: PointCloudOptions) -> None:
        super().__init__()
        self.options = options
        channels = 6 if options.color else 3
        self.point_mlp = nn.Sequential(nn.Linear(channels, 64), nn.GELU(), nn.Linear(64, dim))
        self.patch_norm = nn.LayerNorm(dim)
        self.centre_mlp = nn.Sequential(nn.Linear(3, 64), nn.GELU(), nn.Linear(64, dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.rel_pos_table = init_rel_table(options.distance_buckets + 1, heads)  # the last row: to/from CLS

    def embed(self, batch: dict[str, Any]) -> AdapterOutput:
        """Embed ``batch["points"] (B, N, C)``."""
        points = require(batch, "points", "pointcloud")
        o = self.options
        b, n, c = points.shape
        if c != (6 if o.color else 3) or n < o.group_size:
            raise ValueError(f"pointcloud batch 'points' must be (B, >={o.group_size}, {6 if o.color else 3})")
        xyz = points[..., :3]
        rows = torch.arange(b, device=points.device)[:, None]
        centres = xyz[rows, farthest_point_sample(xyz.detach(), o.groups)]  # (B, G, 3)
        near = torch.cdist(centres, xyz).topk(o.group_size, dim=-1, largest=False).indices  # (B, G, K)
        local = points[rows[:, :, None], near]  # (B, G, K, C)
        local = torch.cat([local[..., :3] - centres[:, :, None], local[..., 3:]], dim=-1)
        patches = self.patch_norm(self.point_mlp(local).amax(dim=2)) + self.centre_mlp(centres)
        x = torch.cat([self.cls.expand(b, -1, -1), patches], dim=1)
        d = torch.cdist(centres, centres)  # unit-sphere clouds: distances in [0, 2]
        bucket = (d / 2 * o.distance_buckets).long().clamp(max=o.distance_buckets - 1)
        index = torch.full((b, o.groups + 1, o.groups + 1), o.distance_buckets, dtype=torch.long, device=x.device)
        index[:, 1:, 1:] = bucket
        return AdapterOutput(x, None, index, self.rel_pos_table)


class PointCloudModality(ModalityPlugin):
    """Point clouds."""

    name = "pointcloud"
    Options = PointCloudOptions
    masking = MaskingPolicy(kind="random", ratio=0.6)

    def _opts(self, config: ModelConfig) -> PointCloudOptions:
        opts = self.options(config)
        assert isinstance(opts, PointCloudOptions)
        return opts

    def build_adapter(self, config: ModelConfig, siblings: dict[str, nn.Module]) -> nn.Module:
        """A :class:`PointCloudAdapter`."""
        return PointCloudAdapter(config.embed_dim, config.heads, self._opts(config))

    def build_preprocessor(self, config: ModelConfig, tokenizer: Any = None) -> Callable[[Any], dict[str, Any]]:
        """``file/bytes/array -> {"points": (points, 3|6)}``: centred, unit sphere, resampled, colour in [0, 1]."""
        o = self._opts(config)

        def preprocess(item: Any) -> dict[str, Any]:
            array = load_points(item)
            if len(array) == 0:
                raise EmptyMedia("point cloud has no points")
            if not np.isfinite(array).all():
                raise NonFiniteData("point cloud contains NaN or infinity")
            xyz = array[:, :3] - array[:, :3].mean(0)
            xyz = xyz / max(float(np.linalg.norm(xyz, axis=1).max()), 1e-6)
            if o.color:
                rgb = array[:, 3:6] if array.shape[1] == 6 else np.full((len(array), 3), 0.5, np.float32)
                rgb = rgb / 255.0 if rgb.max() > 1.0 else rgb
                array = np.concatenate([xyz, rgb], axis=1)
            else:
                array = xyz
            # evenly spaced picks over the points sorted by position: the subset does not depend on the file's order
            order = np.lexsort(array[:, 2::-1].T)
            index = order[np.linspace(0, len(array) - 1, o.points).round().astype(np.int64)]  # fewer: repeats
            return {"points": torch.from_numpy(np.ascontiguousarray(array[index], dtype=np.float32))}

        return preprocess

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Stack clouds (all resampled to the same number of points)."""
        return {"points": torch.stack([s["points"] for s in samples])}

    def example_samples(self, config: ModelConfig, n: int, generator: torch.Generator) -> list[dict[str, Any]]:
        """Random unit-sphere clouds with colours."""
        o = self._opts(config)
        out = []
        for _ in range(n):
            xyz = torch.nn.functional.normalize(torch.randn(o.points, 3, generator=generator), dim=-1)
            xyz = xyz * torch.rand(o.points, 1, generator=generator)
            parts = [xyz, torch.rand(o.points, 3, generator=generator)] if o.color else [xyz]
            out.append({"points": torch.cat(parts, dim=1)})
        return out

    def example_batch(self, config: ModelConfig, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        """A batch of :meth:`example_samples`."""
        return self.collate(self.example_samples(config, batch_size, generator))

    def estimate_length(self, value: Any, config: ModelConfig, preprocess: Callable[[Any], dict[str, Any]]) -> int:
        """Every cloud makes ``groups`` tokens plus CLS (nothing is read)."""
        return self._opts(config).groups + 1

    def position_padding(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """Clouds are resampled to one size: nothing is ever padded."""
        return None

    def validate_options(self, options: PluginOptions) -> None:
        """``group_size <= points``, ``groups <= points``, positive sizes."""
        small = [k for k in ("points", "groups", "group_size", "distance_buckets") if options[k] < 1]
        if small:
            raise ValueError(f"{', '.join(small)} must be >= 1")
        if max(options["groups"], options["group_size"]) > options["points"]:
            raise ValueError(
                f"groups ({options['groups']}) and group_size ({options['group_size']}) must not exceed "
                f"points ({options['points']})"
            )

    def media_types(self) -> MediaTypes:
        """``.npy`` arrays and point text files."""
        return MediaTypes(("application/octet-stream", "text/plain", "text/csv"), (".npy", ".xyz", ".txt", ".csv"))

    def preview(self, value: Any, config: ModelConfig, max_size: int = 256) -> Preview | None:
        """A PNG of the cloud seen from above (x right, y up; colour from rgb, or depth for xyz clouds)."""
        array = load_points(value)
        if len(array) == 0:
            raise EmptyMedia("point cloud has no points")
        xyz = np.nan_to_num(array[:, :3] - array[:, :3].mean(0))
        xyz = xyz / max(float(np.abs(xyz[:, :2]).max()), 1e-6)
        side = max_size
        image = np.full((side, side, 3), 255, dtype=np.uint8)
        cols = ((xyz[:, 0] + 1) / 2 * (side - 1)).round().astype(np.int64).clip(0, side - 1)
        rows = ((1 - xyz[:, 1]) / 2 * (side - 1)).round().astype(np.int64).clip(0, side - 1)
        if array.shape[1] == 6:
            rgb = array[:, 3:6]
            colour = (rgb if rgb.max() > 1.0 else rgb * 255.0).clip(0, 255).astype(np.uint8)
        else:
            depth = (xyz[:, 2] - xyz[:, 2].min()) / max(float(np.ptp(xyz[:, 2])), 1e-6)
            colour = np.stack([depth * 255, 64 + 0 * depth, (1 - depth) * 255], axis=1).astype(np.uint8)
        order = np.argsort(xyz[:, 2])  # nearer the viewer (higher z) drawn last
        image[rows[order], cols[order]] = colour[order]
        return Preview.png(image, max_size)

    def describe_preprocessing(self, config: ModelConfig) -> dict[str, Any]:
        """Centring, unit-sphere scaling, order-free resampling, colour scaling."""
        o = self._opts(config)
        return {
            **super().describe_preprocessing(config),
            "input": "(N, 3) xyz or (N, 6) xyz + rgb: .npy, text with 3 or 6 numbers per line, numpy or torch",
            "centre": "mean of xyz subtracted",
            "scale": "into the unit sphere (largest distance from the centre = 1)",
            "resample": f"{o.points} points, evenly over the points sorted by position (repeats when fewer)",
            "color": "rgb scaled to [0, 1] (0-255 inputs divided by 255); xyz clouds get 0.5" if o.color else None,
            "tokens": o.groups + 1,
            "tensor": {"points": ["batch", o.points, 6 if o.color else 3]},
        }

    def example_inputs(self, config: ModelConfig, folder: Path, n: int, generator: torch.Generator) -> list[Any]:
        """``n`` ``.xyz`` text files of 100-300 coloured points (paths relative to ``folder``)."""
        names = []
        for i in range(n):
            count = 100 + 100 * (i % 3)
            xyz = torch.randn(count, 3, generator=generator)
            rgb = torch.randint(0, 256, (count, 3), generator=generator).float()
            rows = torch.cat([xyz, rgb], dim=1).numpy()
            (folder / f"cloud_{i}.xyz").write_text("\n".join(" ".join(f"{v:.5f}" for v in r) for r in rows) + "\n")
            names.append(f"cloud_{i}.xyz")
        return names
