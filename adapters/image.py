"""Image modality: hMLP stem (stride 16), CLS, learned absolute positions, 2-D BEiT relative bias."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from one_peace.config import ModelConfig
from one_peace.errors import InvalidValue, OversizedMedia, UndecodableMedia, bomb_pixels
from one_peace.media import MediaTypes, Preview
from one_peace.models.adapter import Adapter, AdapterOutput, init_rel_table, require
from one_peace.models.relpos import bucket_2d, bucket_2d_rows
from one_peace.registry import MaskingPolicy, ModalityPlugin, OfficialKeyRule, PluginOptions, register_modality

#: the image files the preprocessor reads (PIL decodes them)
IMAGE_TYPES = MediaTypes(("image/*",), (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"))

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH = 16
#: the largest ``image_size`` a config may ask for (ONE-PEACE fine-tunes up to 896 for segmentation)
MAX_IMAGE_SIZE = 1024


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dim of a ``(B, C, H, W)`` map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise each pixel's channel vector."""
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class HMLPStem(nn.Module):
    """Hierarchical MLP stem: conv4/s4 -> LN -> GELU -> conv2/s2 -> LN -> GELU -> conv2/s2 (total stride 16)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        inner = dim // 4
        self.conv1 = nn.Conv2d(3, inner, 4, 4)
        self.norm1 = ChannelLayerNorm(inner)
        self.conv2 = nn.Conv2d(inner, inner, 2, 2)
        self.norm2 = ChannelLayerNorm(inner)
        self.conv3 = nn.Conv2d(inner, dim, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, D, H/16, W/16)``."""
        x = F.gelu(self.norm1(self.conv1(x)))
        x = F.gelu(self.norm2(self.conv2(x)))
        return self.conv3(x)


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic-resize the patch rows of ``pos_embed (1+G*G, D)`` to ``grid`` (CLS row kept), as the official code."""
    n, d = pos_embed.shape
    src = round((n - 1) ** 0.5)
    if (src, src) == tuple(grid):
        return pos_embed
    patches = pos_embed[1:].reshape(1, src, src, d).permute(0, 3, 1, 2)
    resized = F.interpolate(patches.float(), size=grid, mode="bicubic", align_corners=False).to(pos_embed.dtype)
    return torch.cat([pos_embed[:1], resized.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], d)], dim=0)


class ImageAdapter(Adapter):
    """hMLP stem + CLS + absolute positions (resized for other resolutions) + 2-D relative bias."""

    modality = "image"

    def __init__(self, dim: int, heads: int, bucket_size: int = 16, rel_bucket_size: int = 16) -> None:
        super().__init__()
        self.rel_grid = rel_bucket_size
        self.stem = HMLPStem(dim)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(bucket_size * bucket_size + 1, dim) * 0.02)
        self.rel_pos_table = init_rel_table(bucket_2d_rows(rel_bucket_size), heads)

    def patch_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Stem output flattened row-major: ``(N, H/16*W/16, D)`` and the grid."""
        feats = self.stem(pixels)
        grid = (feats.shape[2], feats.shape[3])
        return feats.flatten(2).transpose(1, 2), grid

    def embed(self, batch: dict[str, Any]) -> AdapterOutput:
        """Embed ``batch["pixels"] (B, 3, H, W)`` (H, W multiples of 16) into ``(B, 1+HW/256, D)``."""
        pixels = require(batch, "pixels", "image")
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"image batch 'pixels' must be (B, 3, H, W), got {tuple(pixels.shape)}")
        if pixels.shape[2] % PATCH or pixels.shape[3] % PATCH:
            raise ValueError(f"image size {tuple(pixels.shape[2:])} must be a multiple of {PATCH} on both sides")
        patches, grid = self.patch_tokens(pixels)
        b = patches.shape[0]
        pos = resize_pos_embed(self.pos_embed, grid)
        x = torch.cat([self.cls_embedding.expand(b, -1, -1), patches], dim=1) + pos
        index = bucket_2d(grid[0], grid[1], self.rel_grid, pixels.device)
        return AdapterOutput(x, None, index, self.rel_pos_table)


def load_image(item: Any) -> Any:
    """Open ``item`` (path, bytes, PIL image, HWC uint8 array) as an RGB PIL image, with a clear error.

    Raises:
        one_peace.errors.InvalidValue: a value that is not one image (a list of paths, a number, ...).
        one_peace.errors.OversizedMedia: an image over PIL's decompression-bomb limit (``2 x
            PIL.Image.MAX_IMAGE_PIXELS`` pixels, checked on the header before anything is decoded).
        one_peace.errors.UndecodableMedia: bytes that are not an image PIL reads.
    """
    from PIL import Image

    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray) or _is_tensor(item):
        return to_rgb(Image.fromarray(array_to_uint8(item)))
    if isinstance(item, list | tuple):
        raise InvalidValue(
            f"an image is one path, bytes, PIL image or array; got a list of {len(item)} values"
            " (a row names one image; frames are a video)"
        )
    if not isinstance(item, str | Path | bytes | bytearray | memoryview):
        raise InvalidValue(
            f"an image is one path, bytes, PIL image or array; got a value of type {type(item).__name__}"
        )
    name = str(item)[:120] if isinstance(item, str | Path) else "<bytes>"
    try:
        img = Image.open(item if isinstance(item, str | Path) else io.BytesIO(bytes(item)))
        img.load()
    except Image.DecompressionBombError as exc:
        raise OversizedMedia(_too_large(name, exc)) from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises SyntaxError for some malformed headers
        raise UndecodableMedia(f"cannot decode image {name}: {exc}") from exc
    return to_rgb(img)


def _too_large(name: str, exc: Exception) -> str:
    """The message for an image over PIL's pixel limit (its pixel count as PIL's header check read it)."""
    from PIL import Image

    count = bomb_pixels(exc)
    pixels = f" has {count:,} pixels," if count is not None else " is"
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return (
        f"image {name}{pixels} over PIL's decompression-bomb limit of {limit:,} pixels"
        " (2 x PIL.Image.MAX_IMAGE_PIXELS: raise it to read such images)"
    )


def _is_tensor(item: Any) -> bool:
    return isinstance(item, torch.Tensor)


def array_to_uint8(item: Any) -> np.ndarray:
    """An image array as ``HxW`` or ``HxWxC`` uint8: CHW tensors/arrays are moved to HWC, floats in [0, 1] scaled.

    Accepted: uint8 of any layout PIL reads, and float arrays (``[0, 1]``, or 0..255 when larger).
    """
    arr = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise InvalidValue(f"image array must be HxW, HxWxC or CxHxW, got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        wide = np.nan_to_num(arr.astype(np.float64))
        wide = wide * 255.0 if wide.max(initial=0) <= 1.0 else wide
        arr = np.clip(np.rint(wide), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def to_rgb(img: Any) -> Any:
    """RGB of any PIL mode. 16-bit, 32-bit integer and float images are scaled to 8 bits first (PIL's own
    ``convert("RGB")`` clips them at 255, so a 16-bit PNG came out almost white); every other mode (1-bit, L, P,
    RGBA, LA, CMYK, ...) goes through ``convert`` as the official preprocessing does (alpha is dropped)."""
    from PIL import Image

    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0
        elif img.mode == "I":
            arr = arr / 257.0 if arr.max(initial=0) > 255 else arr
        else:  # float images: [0, 1] when they fit, else taken as 0..255
            arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
        img = Image.fromarray(np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def preprocess_image(item: Any, size: int = 256) -> torch.Tensor:
    """Official image preprocessing: RGB, bicubic resize to ``size x size`` (no crop), CLIP mean/std."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    img = load_image(item).resize((size, size), Image.Resampling.BICUBIC)
    return TF.normalize(TF.to_tensor(img), CLIP_MEAN, CLIP_STD)


#: The official stem's module indices -> ours.
OFFICIAL_STEM = {
    "0": "stem.conv1",
    "1.layer_norm": "stem.norm1.norm",
    "3": "stem.conv2",
    "4.layer_norm": "stem.norm2.norm",
    "6": "stem.conv3",
}


@dataclass
class ImageOptions(PluginOptions):
    """Options of the image plugin.

    Attributes:
        image_size: Side of the (square) input images in pixels.
        bucket_size: Grid side of the absolute position table.
        rel_bucket_size: Grid side of the relative table (default: ``image_size // 16``).
    """

    image_size: int = 256
    bucket_size: int = 16
    rel_bucket_size: int | None = None


@register_modality
class ImageModality(ModalityPlugin):
    """Image plugin (official ONE-PEACE vision adapter)."""

    name = "image"
    uses_all_parameters = True  # every adapter parameter takes part in every forward
    Options = ImageOptions
    masking = MaskingPolicy(kind="random", ratio=0.75, paired_ratio=0.6875)

    def build_adapter(self, config: ModelConfig, siblings: dict[str, nn.Module]) -> nn.Module:
        """Build an :class:`ImageAdapter` whose relative grid matches ``image_size``."""
        o = self.options(config)
        return ImageAdapter(
            config.embed_dim, config.heads, o["bucket_size"], o["rel_bucket_size"] or o["image_size"] // PATCH
        )

    def build_preprocessor(self, config: ModelConfig, tokenizer: Any = None) -> Any:
        """Return ``path/bytes/PIL/array -> {"pixels": (3, S, S)}``."""
        size = self.options(config)["image_size"]
        return lambda item: {"pixels": preprocess_image(item, size)}

    def validate_options(self, options: PluginOptions) -> None:
        """``image_size`` a multiple of the 16-pixel patch up to :data:`MAX_IMAGE_SIZE`; grid sides in ``[1, 64]``
        (bounds checked before anything is allocated)."""
        size = options["image_size"]
        if size < PATCH or size % PATCH:
            raise ValueError(f"image_size must be a positive multiple of {PATCH}, got {size}")
        if size > MAX_IMAGE_SIZE:
            raise ValueError(
                f"image_size must be at most {MAX_IMAGE_SIZE}, got {size} (an image is (image_size / {PATCH})**2 "
                "tokens; its attention and relative-position index grow with the 4th power of the side: 2048 needs "
                "over 4 GB a forward)"
            )
        most = MAX_IMAGE_SIZE // PATCH
        for key in ("bucket_size", "rel_bucket_size"):
            value = options[key]
            if value is not None and not 1 <= value <= most:
                raise ValueError(f"{key} must be in [1, {most}] (the grid of the largest image_size), got {value}")

    def position_padding(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """Images are never padded."""
        return None

    def media_types(self) -> MediaTypes:
        """Image files PIL decodes."""
        return IMAGE_TYPES

    def preview(self, value: Any, config: ModelConfig, max_size: int = 256) -> Preview | None:
        """A PNG thumbnail of the image as decoded (RGB, aspect kept)."""
        return Preview.png(np.asarray(load_image(value)), max_size)

    def describe_preprocessing(self, config: ModelConfig) -> dict[str, Any]:
        """RGB, bicubic resize to a square (no crop), CLIP mean/std."""
        size = self.options(config)["image_size"]
        return {
            **super().describe_preprocessing(config),
            "input": "RGB image (other PIL modes converted; 16-bit scaled to 8 bits; alpha dropped)",
            "resize": {"size": [size, size], "interpolation": "bicubic", "crop": None},
            "scale": "pixels / 255",
            "mean": list(CLIP_MEAN),
            "std": list(CLIP_STD),
            "tensor": {"pixels": ["batch", 3, size, size]},
        }

    def example_inputs(self, config: ModelConfig, folder: Path, n: int, generator: torch.Generator) -> list[Any]:
        """``n`` small PNG files of different sizes (paths relative to ``folder``)."""
        from PIL import Image

        names = []
        for i in range(n):
            side = 24 + 8 * i
            pixels = torch.randint(0, 256, (side, side + 4, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"image_{i}.png")
            names.append(f"image_{i}.png")
        return names

    def decoder_positions(self) -> int:
        """The official decoder's 257 rows (a 16 x 16 grid + CLS), resized to other grids at run time."""
        return 257

    def official_key_rules(self) -> list[OfficialKeyRule]:
        """The official convolutional stem (``embed_images.<i>``)."""
        theirs = {v: k for k, v in OFFICIAL_STEM.items()}
        return [
            OfficialKeyRule(
                r"^encoder_wrapper\.image_adapter\.embed_images\.(0|1\.layer_norm|3|4\.layer_norm|6)\.(weight|bias)$",
                lambda m: f"adapters.image.{OFFICIAL_STEM[m[1]]}.{m[2]}",
                r"^adapters\.image\.(stem\.\w+(?:\.norm)?)\.(weight|bias)$",
                lambda m: f"encoder_wrapper.image_adapter.embed_images.{theirs[m[1]]}.{m[2]}",
            )
        ]

    def decoder_position_embed(self, table: torch.Tensor, length: int) -> torch.Tensor:
        """The table's grid resized to the sequence's (square) grid."""
        if length == table.shape[0]:
            return table
        grid = round((length - 1) ** 0.5)
        return resize_pos_embed(table, (grid, grid))

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Stack images (all of one size)."""
        return {"pixels": torch.stack([s["pixels"] for s in samples])}

    def example_batch(self, config: ModelConfig, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        """Random normalised pixels at the configured size."""
        size = self.options(config)["image_size"]
        return {"pixels": torch.randn(batch_size, 3, size, size, generator=generator)}

    def example_samples(self, config: ModelConfig, n: int, generator: torch.Generator) -> list[dict[str, Any]]:
        """Random normalised images (all of the configured size: images do not pad)."""
        size = self.options(config)["image_size"]
        return [{"pixels": torch.randn(3, size, size, generator=generator)} for _ in range(n)]
