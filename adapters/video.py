"""Video modality: sampled frames through the image stem and image FFNs, plus a learned temporal embedding.

The video adapter reuses the image adapter's stem, CLS, absolute positions and relative table (it holds a
reference, so no weight is stored twice) and adds only ``temporal_embed``. Video tokens go through the
image FFNs, final LayerNorm and head (``shares = "image"``), so the 4B model keeps 3 FFNs per layer.
Zero-initialised, the temporal embedding makes a one-frame video encode exactly like the image.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from one_peace.config import ModelConfig
from one_peace.errors import EmptyMedia, InvalidValue, UndecodableMedia
from one_peace.media import MediaTypes, Preview
from one_peace.models.adapter import Adapter, AdapterOutput, padding_or_none, require
from one_peace.models.relpos import bucket_2d
from one_peace.registry import MaskingPolicy, ModalityPlugin, PluginOptions, get_plugin, register_modality
from one_peace.segments import Segment, SegmentSpec, plan_windows

from .image import PATCH, ImageAdapter, preprocess_image, resize_pos_embed

#: the video files PyAV decodes
VIDEO_TYPES = MediaTypes(("video/*",), (".mp4", ".webm", ".mkv", ".mov", ".avi", ".ogv"))


class VideoAdapter(Adapter):
    """Frames ``(B, F, 3, H, W)`` -> ``[CLS, frame0 patches, frame1 patches, ...]`` tokens."""

    modality = "video"

    def __init__(self, image: ImageAdapter, dim: int, max_frames: int = 64) -> None:
        super().__init__()
        object.__setattr__(self, "_image", image)  # shared, not re-registered (no duplicate weights)
        self.temporal_embed = nn.Parameter(torch.zeros(max_frames, dim))

    @property
    def image(self) -> ImageAdapter:
        """The image adapter whose stem and positions this adapter shares."""
        image: ImageAdapter = self.__dict__["_image"]
        return image

    def embed(self, batch: dict[str, Any]) -> AdapterOutput:
        """Embed ``batch["frames"] (B, F, 3, H, W)`` with optional ``frame_mask (B, F)`` (True = padded frame)."""
        frames = require(batch, "frames", "video")
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"video batch 'frames' must be (B, F, 3, H, W), got {tuple(frames.shape)}")
        b, nf = frames.shape[:2]
        if nf > self.temporal_embed.shape[0]:
            raise ValueError(f"video has {nf} frames but the model supports at most {self.temporal_embed.shape[0]}")
        patches, grid = self.image.patch_tokens(frames.flatten(0, 1))
        p, d = patches.shape[1], patches.shape[2]
        pos = resize_pos_embed(self.image.pos_embed, grid)
        x = patches.view(b, nf, p, d) + pos[1:] + self.temporal_embed[:nf, None, :]
        cls = (self.image.cls_embedding + pos[0]).expand(b, 1, d)
        x = torch.cat([cls, x.reshape(b, nf * p, d)], dim=1)
        mask = None
        frame_mask = batch.get("frame_mask")
        if frame_mask is not None:
            mask = torch.cat([frame_mask.new_zeros(b, 1), frame_mask.bool().repeat_interleave(p, dim=1)], dim=1)
            mask = padding_or_none(mask)
        img_index = bucket_2d(grid[0], grid[1], self.image.rel_grid, frames.device)
        index = torch.empty(1 + nf * p, 1 + nf * p, dtype=img_index.dtype, device=frames.device)
        index[1:, 1:] = img_index[1:, 1:].repeat(nf, nf)
        index[0, :] = img_index[0, 1]
        index[:, 0] = img_index[1, 0]
        index[0, 0] = img_index[0, 0]
        return AdapterOutput(x, mask, index, self.image.rel_pos_table)


def sample_frame_indices(total: int, num: int) -> list[int]:
    """``num`` indices spread uniformly over ``total`` frames (segment centres)."""
    if total <= 0:
        raise EmptyMedia("video has no frames")
    return [min(total - 1, int((i + 0.5) * total / num)) for i in range(num)]


def sample_times(start: float, end: float, num: int) -> list[float]:
    """``num`` times spread uniformly over ``[start, end)`` (segment centres)."""
    return [start + (i + 0.5) * (end - start) / num for i in range(num)]


def _require_av() -> None:
    from one_peace.extras import require

    require("video", "av", feature="decoding video files")


def _open_video(item: Any) -> Any:
    _require_av()
    import av

    return av.open(str(item) if isinstance(item, str | Path) else io.BytesIO(bytes(item)), "r")


def video_duration(container: Any) -> float | None:
    """Seconds of the first video stream from the container's metadata (``None`` when it does not say)."""
    stream = container.streams.video[0]
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration) / 1_000_000
    return None


def frames_at(container: Any, times: Sequence[float]) -> tuple[list[Any], int]:
    """The frames shown at ``times`` (seconds, ascending), reached by seeking to the key frame before each time and
    decoding forward to it; returns ``(PIL images, frames decoded)``. Only the chosen frames become images."""
    stream = container.streams.video[0]
    base = stream.start_time or 0
    images: list[Any] = []
    decoded = 0
    for t in times:
        container.seek(base + int(t / stream.time_base), stream=stream, backward=True, any_frame=False)
        previous = None
        chosen = None
        for frame in container.decode(stream):
            decoded += 1
            at = frame.time
            if at is None:
                raise UndecodableMedia("video frames carry no timestamps")
            if at > t + 1e-6:
                chosen = previous if previous is not None else frame
                break
            previous = frame
        chosen = chosen if chosen is not None else previous
        if chosen is None:
            raise EmptyMedia("video has no frames")
        images.append(chosen.to_image())
    return images, decoded


def _frames_by_index(item: Any, num_frames: int) -> list[Any]:
    """Streams without timing: count the frames once, then keep only the sampled ones (two passes, no frame kept
    but those)."""
    with _open_video(item) as container:
        total = sum(1 for _ in container.decode(video=0))
    wanted = sample_frame_indices(total, num_frames)
    picked: dict[int, Any] = {}
    with _open_video(item) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted and i not in picked:
                picked[i] = frame.to_image()
            if i >= wanted[-1]:
                break
    return [picked[i] for i in wanted]


def load_video_frames(item: Any, num_frames: int) -> list[Any]:
    """Frames of a video: a folder of images, a list of images/paths, or a file decoded with PyAV by seeking to
    ``num_frames`` uniformly spread times (only those frames are decoded into images; memory does not grow with
    the video's length)."""
    if isinstance(item, list | tuple):
        frames = list(item)
    elif isinstance(item, str | Path) and Path(item).is_dir():
        exts = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
        frames = sorted(p for p in Path(item).iterdir() if p.suffix.lower() in exts)
        if not frames:
            raise EmptyMedia(f"video folder {item} holds no image frames")
    else:
        _require_av()  # a missing extra is said as such, not as an undecodable video
        try:
            with _open_video(item) as container:
                if not container.streams.video:
                    raise UndecodableMedia(f"{str(item)[:120]} has no video stream")
                duration = video_duration(container)
                if duration:
                    return frames_at(container, sample_times(0.0, duration, num_frames))[0]
            return _frames_by_index(item, num_frames)
        except (UndecodableMedia, EmptyMedia):
            raise
        except Exception as exc:
            label = str(item)[:120] if isinstance(item, str | Path) else "<bytes>"
            raise UndecodableMedia(f"cannot decode video {label}: {exc}") from exc
    return [frames[i] for i in sample_frame_indices(len(frames), num_frames)]


def video_segments(item: Any, num_frames: int, spec: SegmentSpec) -> Iterator[Segment]:
    """Windows of a video file, each ``num_frames`` frames reached by seeking (see :func:`frames_at`)."""
    label = str(item)[:120] if isinstance(item, str | Path) else "<bytes>"
    if isinstance(item, list | tuple) or (isinstance(item, str | Path) and Path(item).is_dir()):
        raise InvalidValue("timed segments need a video file (frames given as images carry no times)")
    _require_av()
    try:
        with _open_video(item) as container:
            if not container.streams.video:
                raise UndecodableMedia(f"{label} has no video stream")
            duration = video_duration(container)
            if not duration:
                raise UndecodableMedia(f"{label}: the container does not state its duration")
            for start, end in plan_windows(duration, spec):
                yield Segment(start, end, frames_at(container, sample_times(start, end, num_frames))[0])
    except (UndecodableMedia, EmptyMedia):
        raise
    except Exception as exc:
        raise UndecodableMedia(f"cannot decode video {label}: {exc}") from exc


@dataclass
class VideoOptions(PluginOptions):
    """Options of the video plugin.

    Attributes:
        num_frames: Frames sampled uniformly from a clip.
        max_frames: Rows of the temporal embedding.
    """

    num_frames: int = 8
    max_frames: int = 64


@register_modality
class VideoModality(ModalityPlugin):
    """Video plugin: uniform frame sampling, image stem/FFNs/head, learned temporal embedding."""

    name = "video"
    uses_all_parameters = True  # every adapter parameter takes part in every forward
    shares = "image"
    requires = ("image",)
    Options = VideoOptions
    masking = MaskingPolicy(kind="random", ratio=0.75)
    decoder = False  # no branch of its own in the pretraining decoder (it shares image's)

    def build_adapter(self, config: ModelConfig, siblings: dict[str, nn.Module]) -> nn.Module:
        """Build a :class:`VideoAdapter` over the already built image adapter."""
        image = siblings.get("image")
        if not isinstance(image, ImageAdapter):
            raise ValueError("video modality needs the image modality's adapter (add 'image' to modalities)")
        return VideoAdapter(image, config.embed_dim, self.options(config)["max_frames"])

    def build_preprocessor(self, config: ModelConfig, tokenizer: Any = None) -> Any:
        """Return ``video -> {"frames": (F, 3, S, S)}`` (file via PyAV, folder of frames, or list of images)."""
        n = self.options(config)["num_frames"]
        size = config.modality_options.get("image", {}).get("image_size", 256)

        def preprocess(item: Any) -> dict[str, Any]:
            return {"frames": torch.stack([preprocess_image(f, size) for f in load_video_frames(item, n)])}

        return preprocess

    def segment_defaults(self, config: ModelConfig) -> SegmentSpec | None:
        """10-s windows, no overlap, a last one kept from 1 s; each gets ``num_frames`` frames."""
        return SegmentSpec(10.0, None, 1.0)

    def iter_segments(self, value: Any, config: ModelConfig, spec: SegmentSpec) -> Iterator[Segment]:
        """Windows of a video file, their frames reached by seeking (:func:`video_segments`)."""
        return video_segments(value, self.options(config)["num_frames"], spec)

    def padding(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """Padded frames."""
        mask = batch.get("frame_mask")
        return mask if isinstance(mask, torch.Tensor) else None

    def token_lengths(self, batch: Mapping[str, Any]) -> list[int]:
        """CLS plus every patch of every real frame."""
        frames = batch["frames"]
        per_frame = (frames.shape[-2] // PATCH) * (frames.shape[-1] // PATCH)
        mask = batch.get("frame_mask")
        real = (~mask.bool()).sum(1).tolist() if isinstance(mask, torch.Tensor) else [frames.shape[1]] * len(frames)
        return [1 + int(n) * per_frame for n in real]

    def position_padding(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """The adapter's token padding from ``frame_mask``: every patch of a padded frame (CLS never)."""
        mask = batch.get("frame_mask")
        if not isinstance(mask, torch.Tensor):
            return None
        frames = batch["frames"]
        per_frame = (frames.shape[-2] // PATCH) * (frames.shape[-1] // PATCH)
        return torch.cat([mask.new_zeros(mask.shape[0], 1), mask.bool().repeat_interleave(per_frame, dim=1)], dim=1)

    def validate_options(self, options: PluginOptions) -> None:
        """``1 <= num_frames <= max_frames``."""
        if not 1 <= options["num_frames"] <= options["max_frames"]:
            raise ValueError(
                f"num_frames must be in [1, max_frames={options['max_frames']}], got {options['num_frames']}"
            )

    def media_types(self) -> MediaTypes:
        """Video files PyAV decodes (a folder or list of frames is accepted in manifests too)."""
        return VIDEO_TYPES

    def preview(self, value: Any, config: ModelConfig, max_size: int = 256) -> Preview | None:
        """A PNG thumbnail of the clip's middle frame."""
        import numpy as np

        from .image import load_image

        frame = load_video_frames(value, 1)[0]
        return Preview.png(np.asarray(load_image(frame)), max_size)

    def describe_preprocessing(self, config: ModelConfig) -> dict[str, Any]:
        """Uniform frame sampling, then the image preprocessing of every frame."""
        o = self.options(config)
        image = get_plugin("image").describe_preprocessing(config)
        return {
            **super().describe_preprocessing(config),
            "input": "video file (PyAV), folder of frame images, or list of images",
            "frames": {"count": o["num_frames"], "sampling": "uniform, segment centres"},
            "per_frame": {k: image[k] for k in ("resize", "scale", "mean", "std") if k in image},
        }

    def example_inputs(self, config: ModelConfig, folder: Path, n: int, generator: torch.Generator) -> list[Any]:
        """``n`` folders of 2-4 PNG frames (paths relative to ``folder``): no video codec needed."""
        from PIL import Image

        names = []
        for i in range(n):
            clip = folder / f"video_{i}"
            clip.mkdir()
            for j in range(2 + i % 3):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(clip / f"{j:03d}.png")
            names.append(clip.name)
        return names

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad frame sequences (zeros) and mark padded frames in ``frame_mask``."""
        nf = max(s["frames"].shape[0] for s in samples)
        shape = samples[0]["frames"].shape[1:]
        frames = torch.zeros(len(samples), nf, *shape)
        mask = torch.ones(len(samples), nf, dtype=torch.bool)
        for i, s in enumerate(samples):
            frames[i, : s["frames"].shape[0]] = s["frames"]
            mask[i, : s["frames"].shape[0]] = False
        return {"frames": frames, "frame_mask": mask}

    def example_samples(self, config: ModelConfig, n: int, generator: torch.Generator) -> list[dict[str, Any]]:
        """Random clips of 1-3 frames at the image size."""
        size = config.modality_options.get("image", {}).get("image_size", 256)
        return [{"frames": torch.randn(1 + i % 3, 3, size, size, generator=generator)} for i in range(n)]

    def example_batch(self, config: ModelConfig, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        """Random 2-frame clips at the image size."""
        size = config.modality_options.get("image", {}).get("image_size", 256)
        return {"frames": torch.randn(batch_size, 2, 3, size, size, generator=generator)}
