"""``python -m one_peace.convert SRC DST [--bpe-dir DIR]``: official ONE-PEACE ``.pt`` -> our checkpoint folder.

The source is memory-mapped and read tensor by tensor; weights are written in safetensors shards of at most
``--shard-size`` bytes, so converting the 4B model needs about one copy of the weights in memory. Unknown and
missing keys are reported by name; pretraining-only keys (the denoising decoder) are carried over unchanged
into ``pretrain_decoder.safetensors``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from one_peace.checkpoint import (
    PRETRAIN,
    _build_meta,
    _replace_dir,
    official_state_items,
    read_official_config,
    write_config,
)
from one_peace.checkpoint.official import IGNORED, is_ignored
from one_peace.checkpoint.safe_pickle import CheckpointError
from one_peace.checkpoint.writer import WeightWriter, parse_size

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ConversionReport:
    """What a conversion did.

    Attributes:
        tensors: Encoder/head tensors written.
        ignored: Official keys dropped on purpose (see ``one_peace.checkpoint.official.IGNORED``).
        pretrain: Pretraining-only keys carried over unchanged.
        unknown: Keys no rule maps (skipped).
        missing: Model parameters without a source (conversion fails when non-empty).
        shards: Weight files written.
        seconds: Wall time.
    """

    tensors: int = 0
    ignored: list[str] = field(default_factory=list)
    pretrain: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0


def convert(
    src: str | Path,
    dst: str | Path,
    bpe_dir: str | Path | None = None,
    shard_size: int = 2 << 30,
    dtype: torch.dtype | None = None,
    image_size: int | None = None,
) -> ConversionReport:
    """Convert an official checkpoint to our folder format (atomically: a temp folder renamed into place).

    Raises:
        CheckpointError: unreadable file, wrong shapes, or model parameters left without a source.
    """
    from safetensors.torch import save_file

    from one_peace.checkpoint import tokenizer_modality
    from one_peace.tokenizer import load_tokenizer

    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    state, config, extra = read_official_config(src, image_size, mmap=True)
    expected = {k: tuple(p.shape) for k, p in _build_meta(config).named_parameters()}
    report = ConversionReport(ignored=[k for k in state if is_ignored(k)])
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        pretrain: dict[str, torch.Tensor] = {}
        writer = WeightWriter(tmp, shard_size)
        seen: set[str] = set()
        for name, tensor, key in official_state_items(state, config, extra, str(src), report.unknown, pretrain):
            if name not in expected:
                raise CheckpointError(f"{src}: mapped key {name!r} is not a parameter of the inferred model")
            if tuple(tensor.shape) != expected[name]:
                raise CheckpointError(
                    f"{src}: key {key!r} (ours: {name}) has shape {tuple(tensor.shape)}, expected {expected[name]}"
                )
            # mmapped source: no copy until safetensors serialises the shard
            writer.add(name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor)
            seen.add(name)
            report.tensors += 1
        report.shards = writer.finish()
        report.missing = sorted(set(expected) - seen)
        if report.missing:
            raise CheckpointError(f"{src}: no source for model parameter(s) {report.missing[:10]}")
        if pretrain:
            save_file({k: v.contiguous() for k, v in pretrain.items()}, str(tmp / PRETRAIN))
            report.pretrain = sorted(pretrain)
        tokenizer = load_tokenizer(bpe_dir, modality=tokenizer_modality(config)) if bpe_dir is not None else None
        write_config(tmp, config, tokenizer, converted_from=str(src.name), ignored_keys=sorted(IGNORED))
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - start
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m one_peace.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="official ONE-PEACE checkpoint (.pt)")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--bpe-dir", help="folder with encoder.json, vocab.bpe, dict.txt (copied into the output)")
    parser.add_argument("--shard-size", default="2GB", help="largest weight file (e.g. 500MB, 2GB)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), help="store floats in this dtype (default: as in the file)")
    parser.add_argument("--image-size", type=int, help="interpolate the image relative table for this size (e.g. 384)")
    args = parser.parse_args(argv)
    try:
        rep = convert(
            args.src,
            args.dst,
            args.bpe_dir,
            parse_size(args.shard_size),
            _DTYPES[args.dtype] if args.dtype else None,
            args.image_size,
        )
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}: {rep.tensors} tensors in {len(rep.shards)} file(s) in {rep.seconds:.1f}s")
    print(
        f"ignored {len(rep.ignored)} official buffer(s): "
        f"{', '.join(rep.ignored[:6])}{' ...' if len(rep.ignored) > 6 else ''}"
    )
    if rep.pretrain:
        print(f"carried {len(rep.pretrain)} pretraining-only key(s) into {PRETRAIN}")
    if rep.unknown:
        print(f"WARNING: skipped {len(rep.unknown)} unknown key(s): {', '.join(rep.unknown)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
