"""Audio modality: raw 16 kHz waveform, wav2vec2-style conv extractor (stride 320), conv positions, 1-D bias."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from one_peace.config import ModelConfig
from one_peace.errors import EmptyMedia, InvalidValue, NonFiniteData, UndecodableMedia
from one_peace.media import MediaTypes, Preview
from one_peace.models.adapter import (
    Adapter,
    AdapterOutput,
    check_keep_ids,
    host_checks,
    init_rel_table,
    padding_or_none,
    require,
)
from one_peace.models.relpos import bucket_1d, bucket_1d_rows
from one_peace.registry import MaskingPolicy, ModalityPlugin, OfficialKeyRule, PluginOptions, register_modality
from one_peace.segments import Segment, SegmentSpec, stream_windows

SAMPLE_RATE = 16000
CONV_SPEC: tuple[tuple[int, int], ...] = ((10, 5),) + ((3, 2),) * 4 + ((2, 2),) * 2
#: log-mel front end: 25 ms windows every 10 ms, then a stride-2 conv: one frame per 320 samples, like CONV_SPEC
FBANK_SPEC: tuple[tuple[int, int], ...] = ((400, 160), (2, 2))
FRONTENDS = {"waveform": CONV_SPEC, "fbank": FBANK_SPEC}


def num_frames(samples: int | torch.Tensor, spec: Sequence[tuple[int, int]] = CONV_SPEC) -> Any:
    """Frames the conv extractor yields for ``samples`` waveform samples (int or tensor)."""
    n = samples
    for k, s in spec:
        n = (n - k) // s + 1
    return n


class ConvFeatureExtractor(nn.Module):
    """7 x [Conv1d (no bias) -> LayerNorm over channels -> GELU], then LayerNorm and Linear to the model width."""

    def __init__(self, dim: int, channels: int = 512, spec: Sequence[tuple[int, int]] = CONV_SPEC) -> None:
        super().__init__()
        self.spec = tuple(spec)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        in_ch = 1
        for k, s in self.spec:
            self.convs.append(nn.Conv1d(in_ch, channels, k, s, bias=False))
            self.norms.append(nn.LayerNorm(channels, eps=1e-5))
            in_ch = channels
        self.out_norm = nn.LayerNorm(channels, eps=1e-5)
        self.proj = nn.Linear(channels, dim)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` waveform -> ``(B, T, D)`` frame features."""
        x = wave.unsqueeze(1)
        for conv, norm in zip(self.convs, self.norms):
            x = F.gelu(norm(conv(x).transpose(1, 2)).transpose(1, 2))
        return self.proj(self.out_norm(x.transpose(1, 2)))


def mel_filterbank(n_mels: int, n_fft: int = 400, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Triangular HTK-scale mel filters ``(n_fft // 2 + 1, n_mels)`` from 0 Hz to Nyquist."""
    mel = np.linspace(0.0, 2595.0 * np.log10(1.0 + (sample_rate / 2) / 700.0), n_mels + 2)
    hz = 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (freqs[None, :] - lower) / (centre - lower)
    down = (upper - freqs[None, :]) / (upper - centre)
    return torch.from_numpy(np.maximum(0.0, np.minimum(up, down)).T.astype(np.float32))


class LogMelFrontEnd(nn.Module):
    """A cheap alternative to the waveform extractor: log-mel filterbank features (25 ms / 10 ms, ``n_mels`` bins),
    a stride-2 Conv1d to ``channels``, GELU, LayerNorm and Linear to the model width (one frame per 320 samples,
    as the waveform extractor). The window and filters are computed, not stored: nothing to load or save."""

    def __init__(self, dim: int, channels: int = 256, n_mels: int = 80) -> None:
        super().__init__()
        self.spec = FBANK_SPEC
        self.n_mels = n_mels
        self.conv = nn.Conv1d(n_mels, channels, 2, 2)
        self.out_norm = nn.LayerNorm(channels, eps=1e-5)
        self.proj = nn.Linear(channels, dim)
        self._consts: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _window_and_filters(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (str(like.device), like.dtype)
        if key not in self._consts:
            window = torch.hann_window(400, device=like.device, dtype=like.dtype)
            self._consts[key] = (window, mel_filterbank(self.n_mels).to(like.device, like.dtype))
        return self._consts[key]

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` waveform -> ``(B, T, D)`` frame features (the spectrum in float32 whatever the model's dtype:
        the FFT has no bf16/fp16 kernels on CPUs, and the log of small powers needs the range)."""
        window, filters = self._window_and_filters(wave.float())
        spec = torch.stft(wave.float(), 400, 160, window=window, center=False, return_complex=True).abs().pow(2)
        logmel = torch.log(torch.einsum("bft,fm->bmt", spec, filters) + 1e-6)
        x = F.gelu(self.conv(logmel.to(wave.dtype)))
        return self.proj(self.out_norm(x.transpose(1, 2)))


class ConvPositions(nn.Module):
    """Convolutional positional signal: depth x [grouped Conv1d -> LayerNorm (no affine) -> GELU]."""

    def __init__(self, dim: int, depth: int = 5, width: int = 95, groups: int = 16) -> None:
        super().__init__()
        k = max(3, width // depth)
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, k, padding=k // 2, groups=groups) for _ in range(depth))
        self.trim = 1 if k % 2 == 0 else 0
        self.dim = dim

    def forward(self, f: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        """``(B, T, D) -> (B, T, D)``; with ``pad (B, T)`` padded frames are zeroed before every conv."""
        x = f.transpose(1, 2)
        keep = None if pad is None else (~pad).unsqueeze(1).to(x.dtype)
        for conv in self.convs:
            if keep is not None:
                x = x * keep
            x = conv(x)
            if self.trim:
                x = x[..., : -self.trim]
            x = F.gelu(F.layer_norm(x.transpose(1, 2), (self.dim,), eps=1e-5).transpose(1, 2))
        return x.transpose(1, 2)


class AudioAdapter(Adapter):
    """Waveform -> conv features (+ conv positions) with CLS; 1-D bucketed relative bias.

    Attributes:
        official_padding: When True, padded frames are *not* masked before the positional convolutions
            (the official behaviour, needed for parity); when False an item's output never depends on its batch.
    """

    modality = "audio"

    def __init__(
        self,
        dim: int,
        heads: int,
        feature_dim: int = 512,
        bucket_size: int = 512,
        pos_depth: int = 5,
        pos_width: int = 95,
        pos_groups: int = 16,
        frontend: str = "waveform",
        n_mels: int = 80,
    ) -> None:
        super().__init__()
        if frontend not in FRONTENDS:
            raise ValueError(f"audio option 'frontend' must be one of {sorted(FRONTENDS)}, got {frontend!r}")
        self.bucket_size = bucket_size
        self.official_padding = False
        self.spec = FRONTENDS[frontend]
        self.feature_extractor: nn.Module = (
            ConvFeatureExtractor(dim, feature_dim)
            if frontend == "waveform"
            else LogMelFrontEnd(dim, feature_dim, n_mels)
        )
        self.positions = ConvPositions(dim, pos_depth, pos_width, pos_groups)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, dim))
        self.rel_pos_table = init_rel_table(bucket_1d_rows(bucket_size), heads)

    def _frame_mask(self, batch: dict[str, Any], wave: torch.Tensor, frames: int) -> torch.Tensor | None:
        if "padding_mask" in batch and batch["padding_mask"] is not None:
            mask = batch["padding_mask"].bool()
            if mask.shape != (wave.shape[0], frames + 1):
                raise ValueError(
                    f"audio batch 'padding_mask' must be (B, T+1) = {(wave.shape[0], frames + 1)}, "
                    f"got {tuple(mask.shape)}"
                )
            return mask
        if "lengths" in batch and batch["lengths"] is not None:
            valid = num_frames(batch["lengths"].long().to(wave.device), self.spec)
            pos = torch.arange(frames + 1, device=wave.device)
            return pos[None, :] > valid[:, None]
        return None

    def _finish(self, f: torch.Tensor, frame_pad: torch.Tensor | None) -> torch.Tensor:
        p = self.positions(f, None if self.official_padding else frame_pad)
        b = f.shape[0]
        x = torch.cat([self.cls_embedding.expand(b, -1, -1), f], dim=1)
        return x + torch.cat([self.cls_pos_embed.expand(b, -1, -1), p], dim=1)

    def forward(self, batch: dict[str, Any], keep_ids: torch.Tensor | None = None) -> AdapterOutput:
        """Embed ``batch["waveform"] (B, N)`` with ``padding_mask (B, T+1)`` or ``lengths (B,)`` (optional).

        With ``keep_ids`` the frames are gathered *before* the positional convolutions (official semantics).
        """
        wave = require(batch, "waveform", "audio")
        if wave.dim() != 2:
            raise ValueError(f"audio batch 'waveform' must be (B, N) at 16 kHz, got {tuple(wave.shape)}")
        if wave.shape[1] < 400:
            raise ValueError(f"audio waveform too short: {wave.shape[1]} samples (need >= 400, i.e. one frame)")
        f = self.feature_extractor(wave)
        b, t, d = f.shape
        mask = self._frame_mask(batch, wave, t)
        full_index = bucket_1d(t + 1, self.bucket_size, wave.device)
        if keep_ids is None:
            x = self._finish(f, None if mask is None else mask[:, 1:])
            return AdapterOutput(x, padding_or_none(mask), full_index, self.rel_pos_table)
        keep_ids = check_keep_ids(keep_ids, b, t + 1, "audio adapter")
        if host_checks(keep_ids) and bool((keep_ids[:, 0] != 0).any()):
            raise ValueError("audio adapter: keep_ids must keep CLS (position 0) first in every row")
        k = keep_ids.shape[1]
        kpad = keep_ids.eq(-1)
        g = keep_ids.masked_fill(kpad, k - 1)
        if mask is not None:  # kept frames that were padding stay padding
            kpad = kpad | mask.gather(1, g)
        frames = (g[:, 1:] - 1).clamp(min=0)
        fk = f.gather(1, frames[:, :, None].expand(b, k - 1, d))
        x = self._finish(fk, kpad[:, 1:])
        idx = full_index.expand(b, t + 1, t + 1)
        rel = idx.gather(1, g[:, :, None].expand(b, k, t + 1)).gather(2, g[:, None, :].expand(b, k, k))
        return AdapterOutput(x, padding_or_none(kpad), rel, self.rel_pos_table)


#: containers whose sound track is decoded with PyAV (the ``video`` extra) when soundfile cannot read them
AV_SUFFIXES = {".mp4", ".m4a", ".mkv", ".webm", ".mov", ".avi", ".ogv", ".opus", ".aac", ".mp3"}
#: the files the audio preprocessor reads: soundfile's formats and the sound track of PyAV's containers
AUDIO_TYPES = MediaTypes(
    ("audio/*", "video/mp4", "video/webm"), (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus", ".aac", ".webm", ".mp4")
)


def _load_with_av(item: Any) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of a container (a video's sound track, WebM/Opus) with PyAV: mono float32 at
    16 kHz whatever the stream's layout and sample format."""
    chunks = list(_av_chunks(item))
    if not chunks:
        label = str(item)[:120] if isinstance(item, str | Path) else "<bytes>"
        raise EmptyMedia(f"the audio stream of {label} has no samples")
    return np.concatenate(chunks).astype(np.float32), SAMPLE_RATE


def _av_chunks(item: Any) -> Iterator[np.ndarray]:
    """The first audio stream of a container as mono float32 chunks at 16 kHz, decoded as they are read."""
    from one_peace.extras import require

    require("video", "av", feature="decoding the sound track of a video or WebM/Opus file")
    import av

    source = str(item) if isinstance(item, str | Path) else io.BytesIO(bytes(item))
    label = str(item)[:120] if isinstance(item, str | Path) else "<bytes>"
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=SAMPLE_RATE)
    try:
        with av.open(source, mode="r") as container:
            if not container.streams.audio:
                raise UndecodableMedia(f"{label} has no audio stream")
            for frame in container.decode(audio=0):
                for f in resampler.resample(frame):
                    yield f.to_ndarray().reshape(-1).astype(np.float32)
            for f in resampler.resample(None):
                yield f.to_ndarray().reshape(-1).astype(np.float32)
    except UndecodableMedia:
        raise
    except Exception as exc:
        raise UndecodableMedia(f"cannot decode audio {label}: {exc}") from exc


def audio_chunks(item: Any, seconds: float = 1.0) -> tuple[Iterator[np.ndarray], int]:
    """``(mono float32 chunks, rate)`` of ``item`` read ``seconds`` at a time (a file is never read whole): sound
    files at their own rate through soundfile, containers' sound tracks at 16 kHz through PyAV, arrays as one chunk.

    Raises:
        one_peace.errors.DataError: an input that does not open (later chunks raise while being read).
    """
    import soundfile as sf

    if isinstance(item, tuple | torch.Tensor | np.ndarray):
        data, rate = load_audio(item)
        return iter([data.mean(axis=1, dtype=np.float32) if data.ndim == 2 else data]), rate
    if isinstance(item, str | Path) and Path(item).suffix.lower() in AV_SUFFIXES:
        return _av_chunks(item), SAMPLE_RATE
    if not isinstance(item, str | Path | bytes | bytearray | memoryview):
        raise InvalidValue(f"unsupported audio input type {type(item).__name__} (path, bytes, (array, rate), array)")
    label = str(item) if isinstance(item, str | Path) else "<bytes>"
    try:
        handle = sf.SoundFile(str(item) if isinstance(item, str | Path) else io.BytesIO(bytes(item)))
    except (RuntimeError, sf.LibsndfileError) as exc:
        if isinstance(item, bytes | bytearray | memoryview) and _av_available():
            return _av_chunks(item), SAMPLE_RATE
        raise UndecodableMedia(f"cannot decode audio {label}: {exc}") from exc

    def blocks() -> Iterator[np.ndarray]:
        with handle:
            try:
                for block in handle.blocks(blocksize=max(1, int(seconds * handle.samplerate)), dtype="float32"):
                    yield block.mean(axis=1, dtype=np.float32) if block.ndim == 2 else block
            except (RuntimeError, sf.LibsndfileError) as exc:
                raise UndecodableMedia(f"cannot decode audio {label}: {exc}") from exc

    return blocks(), int(handle.samplerate)


def load_audio(item: Any) -> tuple[np.ndarray, int]:
    """Decode ``item`` to a float32 ``(N,)`` or ``(N, C)`` array and its rate.

    ``item``: a path or bytes of a sound file (soundfile; the sound track of a video / WebM / Opus file through
    PyAV), a ``(waveform, sample_rate)`` pair (numpy or torch), or a bare 1-D waveform taken as 16 kHz.
    """
    import soundfile as sf

    if isinstance(item, tuple) and len(item) == 2:
        data, sr = item
        if (
            isinstance(sr, bool)
            or not isinstance(sr, int | np.integer | float)
            or not (sr > 0 and float(sr).is_integer())
        ):
            raise InvalidValue(f"an audio sample rate must be a positive integer (Hz), got {sr!r}")
        return _waveform(data), int(sr)
    if isinstance(item, torch.Tensor | np.ndarray):
        return _waveform(item), SAMPLE_RATE
    if isinstance(item, str | Path) and Path(item).suffix.lower() in AV_SUFFIXES:
        return _load_with_av(item)
    try:
        if isinstance(item, str | Path):
            data, sr = sf.read(str(item), dtype="float32", always_2d=False)
        elif isinstance(item, bytes | bytearray | memoryview):
            data, sr = sf.read(io.BytesIO(bytes(item)), dtype="float32", always_2d=False)
        else:
            raise TypeError(
                f"unsupported audio input type {type(item).__name__} (path, bytes, (array, sample_rate) or array)"
            )
    except (RuntimeError, sf.LibsndfileError) as exc:
        if isinstance(item, bytes | bytearray | memoryview) and _av_available():
            try:  # bytes of a container soundfile does not read (an uploaded WebM recording, an mp4)
                return _load_with_av(item)
            except UndecodableMedia:
                pass
        raise UndecodableMedia(
            f"cannot decode audio {item if isinstance(item, str | Path) else '<bytes>'}: {exc}"
        ) from exc
    return data, int(sr)


def _waveform(data: Any) -> np.ndarray:
    """A waveform array as float32 ``(N,)`` or ``(N, C)``: channels-first ``(C, N)`` (torchaudio's layout, up to 16
    channels) is turned around; anything else is an :class:`~one_peace.errors.InvalidValue`."""
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    try:
        arr = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidValue(f"an audio waveform must be a numeric array, got {type(data).__name__}: {exc}") from None
    if arr.ndim == 2 and arr.shape[0] <= 16 and arr.shape[0] < arr.shape[1]:
        arr = arr.T
    if arr.ndim not in (1, 2):
        raise InvalidValue(f"an audio waveform is (samples,) or (samples, channels), got shape {tuple(arr.shape)}")
    return arr


def _av_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("av") is not None


def preprocess_audio(
    item: Any, max_seconds: float = 15.0, min_samples: int = SAMPLE_RATE, spec: Sequence[tuple[int, int]] = CONV_SPEC
) -> dict[str, torch.Tensor]:
    """Official audio preprocessing: mono (channel mean), soxr HQ to 16 kHz, normalise the whole clip, keep 15 s,
    repeat clips under 1 s; returns ``{"waveform": (N,), "padding_mask": (T+1,)}``."""
    data, sr = load_audio(item)
    if data.ndim == 2:
        data = data.mean(axis=1, dtype=np.float32)
    if data.size == 0:
        raise EmptyMedia("audio input has no samples")
    if not np.isfinite(data).all():
        raise NonFiniteData("audio input contains NaN or infinity")
    if sr != SAMPLE_RATE:
        import soxr

        data = soxr.resample(data, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)
    # normalise the whole clip in float64: huge finite samples (e.g. +-3e38 in a float WAV) overflow float32
    wide = data.astype(np.float64)
    wide = (wide - wide.mean()) / np.sqrt(wide.var() + 1e-5)
    if not np.isfinite(wide).all():
        raise NonFiniteData("audio input cannot be normalised (non-finite after normalisation)")
    wave = torch.from_numpy(np.ascontiguousarray(wide.astype(np.float32)))
    wave = wave[: int(max_seconds * SAMPLE_RATE)]
    if wave.numel() < min_samples:
        wave = wave.repeat(math.ceil(min_samples / wave.numel()))[:min_samples]
    t = int(num_frames(wave.numel(), spec))
    return {"waveform": wave, "padding_mask": torch.zeros(t + 1, dtype=torch.bool)}


@dataclass
class AudioOptions(PluginOptions):
    """Options of the audio plugin.

    Attributes:
        feature_dim: Channels of the front end's features.
        bucket_size: Relative-position buckets.
        pos_depth: Convolutional positional-embedding layers.
        pos_width: Total kernel width of the positional convolutions.
        pos_groups: Groups of the positional convolutions.
        max_seconds: Clips are cut at this length.
        frontend: ``"waveform"`` (official conv feature extractor) or ``"fbank"`` (log-mel filterbank, cheaper).
        n_mels: Mel bands of the fbank front end.
    """

    feature_dim: int = 512
    bucket_size: int = 512
    pos_depth: int = 5
    pos_width: int = 95
    pos_groups: int = 16
    max_seconds: float = 15.0
    frontend: str = "waveform"
    n_mels: int = 80


@register_modality
class AudioModality(ModalityPlugin):
    """Audio plugin (official ONE-PEACE audio adapter)."""

    name = "audio"
    uses_all_parameters = True  # every adapter parameter takes part in every forward
    Options = AudioOptions
    masking = MaskingPolicy(kind="span", ratio=0.55, span=5)

    def build_adapter(self, config: ModelConfig, siblings: dict[str, nn.Module]) -> nn.Module:
        """Build an :class:`AudioAdapter`."""
        o = self.options(config)
        adapter = AudioAdapter(
            config.embed_dim,
            config.heads,
            o["feature_dim"],
            o["bucket_size"],
            o["pos_depth"],
            o["pos_width"],
            o["pos_groups"],
            o["frontend"],
            o["n_mels"],
        )
        adapter.official_padding = config.official_padding
        return adapter

    def build_preprocessor(self, config: ModelConfig, tokenizer: Any = None) -> Any:
        """Return ``path/bytes/(array, sr) -> {"waveform", "padding_mask"}``."""
        o = self.options(config)
        spec = FRONTENDS.get(o["frontend"], CONV_SPEC)
        return lambda item: preprocess_audio(item, o["max_seconds"], spec=spec)

    def estimate_length(self, value: Any, config: ModelConfig, preprocess: Callable[[Any], dict[str, Any]]) -> int:
        """Tokens from the file's header, as decoding makes them: cut at ``max_seconds``, repeated up to 1 s, plus
        CLS."""
        import soundfile as sf

        o = self.options(config)
        info = sf.info(io.BytesIO(value) if isinstance(value, bytes) else str(value))
        seconds = min(info.frames / info.samplerate, float(o["max_seconds"]))
        samples = max(int(seconds * SAMPLE_RATE), SAMPLE_RATE)
        return max(1, int(num_frames(samples, FRONTENDS.get(o["frontend"], CONV_SPEC)))) + 1

    def segment_defaults(self, config: ModelConfig) -> SegmentSpec | None:
        """Windows of ``max_seconds`` (the longest clip the model reads), no overlap, a last one kept from 1 s."""
        return SegmentSpec(float(self.options(config)["max_seconds"]), None, 1.0)

    def check_segments(self, spec: SegmentSpec, config: ModelConfig) -> None:
        """A window no longer than ``max_seconds`` (the longest clip the model reads)."""
        longest = float(self.options(config)["max_seconds"])
        if spec.window > longest + 1e-9:
            raise ValueError(f"segments.window {spec.window:g} s is longer than audio max_seconds {longest:g} s")

    def iter_segments(self, value: Any, config: ModelConfig, spec: SegmentSpec) -> Iterator[Segment]:
        """Windows of ``(waveform, rate)`` read block by block (each then preprocessed as a clip of its own)."""
        self.check_segments(spec, config)
        chunks, rate = audio_chunks(value)
        return stream_windows(chunks, rate, spec)

    def validate_options(self, options: PluginOptions) -> None:
        """A known front end, a positive clip length and positive sizes."""
        if options["frontend"] not in FRONTENDS:
            raise ValueError(f"frontend must be one of {sorted(FRONTENDS)}, got {options['frontend']!r}")
        if not options["max_seconds"] > 0:
            raise ValueError(f"max_seconds must be > 0, got {options['max_seconds']}")
        sizes = ("feature_dim", "bucket_size", "pos_depth", "pos_width", "pos_groups", "n_mels")
        small = [k for k in sizes if options[k] < 1]
        if small:
            raise ValueError(f"{', '.join(small)} must be >= 1")

    def media_types(self) -> MediaTypes:
        """Sound files soundfile reads, and the sound track of the containers PyAV opens."""
        return AUDIO_TYPES

    def preview(self, value: Any, config: ModelConfig, max_size: int = 256) -> Preview | None:
        """The first 10 s as a 16-bit WAV (mono, the file's own rate)."""
        data, sr = load_audio(value)
        if data.ndim == 2:
            data = data.mean(axis=1)
        if data.size == 0:
            raise EmptyMedia("audio input has no samples")
        peak = float(np.abs(data).max())
        return Preview.wav(data / peak if peak > 1.0 else data, sr)

    def describe_preprocessing(self, config: ModelConfig) -> dict[str, Any]:
        """Mono, soxr HQ to 16 kHz, whole-clip normalisation, cut and minimum length."""
        o = self.options(config)
        return {
            **super().describe_preprocessing(config),
            "input": "sound file or (waveform, sample_rate); channels averaged to mono",
            "sample_rate": SAMPLE_RATE,
            "resampler": "soxr HQ",
            "normalise": "(x - mean) / sqrt(var + 1e-5) over the whole clip",
            "max_seconds": o["max_seconds"],
            "min_seconds": 1.0,
            "shorter_clips": "repeated up to min_seconds",
            "frontend": o["frontend"],
            "samples_per_token": 320,
            "tensor": {"waveform": ["batch", "samples"], "padding_mask": ["batch", "tokens + 1"]},
        }

    def example_inputs(self, config: ModelConfig, folder: Path, n: int, generator: torch.Generator) -> list[Any]:
        """``n`` mono WAV files of 1 to 2 s at 16 kHz (paths relative to ``folder``)."""
        import soundfile as sf

        names = []
        for i in range(n):
            length = SAMPLE_RATE + (i % 3) * SAMPLE_RATE // 2
            wave = 0.1 * torch.randn(length, generator=generator).numpy()
            sf.write(folder / f"audio_{i}.wav", wave, SAMPLE_RATE, subtype="PCM_16")
            names.append(f"audio_{i}.wav")
        return names

    def position_padding(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """The batch's frame-level ``padding_mask`` (B, T+1), as the collator writes it; ``None`` without padding.
        Batches padded by ``lengths`` only are left to the adapter (their frame count depends on its front end)."""
        mask = batch.get("padding_mask")
        if isinstance(mask, torch.Tensor):
            return mask.bool()
        if batch.get("lengths") is not None:
            raise NotImplementedError
        return None

    def decoder_positions(self) -> int:
        """The official decoder's 1026 rows."""
        return 1026

    def official_key_rules(self) -> list[OfficialKeyRule]:
        """The official feature extractor (``embed_audios``) and positional convolutions (``embed_positions``)."""
        enc = "encoder_wrapper.audio_adapter"
        return [
            OfficialKeyRule(
                r"^encoder_wrapper\.audio_adapter\.embed_audios\.0\.conv_layers\.(\d+)\.0\.weight$",
                lambda m: f"adapters.audio.feature_extractor.convs.{m[1]}.weight",
                r"^adapters\.audio\.feature_extractor\.convs\.(\d+)\.weight$",
                lambda m: f"{enc}.embed_audios.0.conv_layers.{m[1]}.0.weight",
            ),
            OfficialKeyRule(
                r"^encoder_wrapper\.audio_adapter\.embed_audios\.0\.conv_layers\.(\d+)\.2\.1\.(weight|bias)$",
                lambda m: f"adapters.audio.feature_extractor.norms.{m[1]}.{m[2]}",
                r"^adapters\.audio\.feature_extractor\.norms\.(\d+)\.(weight|bias)$",
                lambda m: f"{enc}.embed_audios.0.conv_layers.{m[1]}.2.1.{m[2]}",
            ),
            OfficialKeyRule(
                r"^encoder_wrapper\.audio_adapter\.embed_audios\.2\.(weight|bias)$",
                lambda m: f"adapters.audio.feature_extractor.out_norm.{m[1]}",
                r"^adapters\.audio\.feature_extractor\.out_norm\.(weight|bias)$",
                lambda m: f"{enc}.embed_audios.2.{m[1]}",
            ),
            OfficialKeyRule(
                r"^encoder_wrapper\.audio_adapter\.embed_audios\.3\.(weight|bias)$",
                lambda m: f"adapters.audio.feature_extractor.proj.{m[1]}",
                r"^adapters\.audio\.feature_extractor\.proj\.(weight|bias)$",
                lambda m: f"{enc}.embed_audios.3.{m[1]}",
            ),
            OfficialKeyRule(
                r"^encoder_wrapper\.audio_adapter\.embed_positions\.(\d+)\.0\.(weight|bias)$",
                lambda m: f"adapters.audio.positions.convs.{int(m[1]) - 1}.{m[2]}",
                r"^adapters\.audio\.positions\.convs\.(\d+)\.(weight|bias)$",
                lambda m: f"{enc}.embed_positions.{int(m[1]) + 1}.0.{m[2]}",
            ),
        ]

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad waveforms with 0.0 and frame masks with True."""
        n = max(s["waveform"].numel() for s in samples)
        t = max(s["padding_mask"].numel() for s in samples)
        wave = torch.zeros(len(samples), n)
        mask = torch.ones(len(samples), t, dtype=torch.bool)
        for i, s in enumerate(samples):
            wave[i, : s["waveform"].numel()] = s["waveform"]
            mask[i, : s["padding_mask"].numel()] = s["padding_mask"]
        return {"waveform": wave, "padding_mask": mask}

    def example_samples(self, config: ModelConfig, n: int, generator: torch.Generator) -> list[dict[str, Any]]:
        """Random clips of 0.5-1 s at 16 kHz."""
        rows = []
        spec = FRONTENDS.get(self.options(config)["frontend"], CONV_SPEC)
        for i in range(n):
            length = 16000 - (i % 3) * 4000
            wave = torch.randn(length, generator=generator)
            mask = torch.zeros(int(num_frames(length, spec)) + 1, dtype=torch.bool)
            rows.append({"waveform": wave, "padding_mask": mask})
        return rows

    def example_batch(self, config: ModelConfig, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        """Random clips of 0.5-1 s at 16 kHz, padded."""
        return self.collate(self.example_samples(config, batch_size, generator))
