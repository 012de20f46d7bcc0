"""Encoder throughput per modality: forward and forward+backward samples/s and tokens/s, peak memory, and MFU.

MFU is measured against the dense matmul peak measured in the same run on the same machine (fp32 and bf16).
FLOPs are counted by PyTorch's flop counter on the real forward/backward (adapters included).

    python benchmarks/encoder.py                      # base config, batch 32, all modalities
    python benchmarks/encoder.py --size tiny --batch-size 4 --modalities text image --seconds 1
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

import one_peace
from benchmarks.common import PeakRSS, count_flops, machine, matmul_peak, time_call


def make_batch(modality: str, batch: int, cfg: one_peace.ModelConfig, args: argparse.Namespace) -> dict[str, Any]:
    """A benchmark batch: fixed lengths so every sample has the same token count."""
    g = torch.Generator().manual_seed(0)
    if modality == "text":
        return {"tokens": torch.randint(4, 50000, (batch, args.text_len), generator=g)}
    if modality == "image":
        return {"pixels": torch.randn(batch, 3, args.image_size, args.image_size, generator=g)}
    if modality == "audio":
        return {"waveform": torch.randn(batch, int(args.audio_seconds * 16000), generator=g)}
    if modality == "video":
        return {"frames": torch.randn(batch, args.video_frames, 3, args.image_size, args.image_size, generator=g)}
    return one_peace.get_plugin(modality).example_batch(cfg, batch, g)


def cast(batch: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Floating tensors of ``batch`` in ``dtype``."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def bench(
    model: one_peace.OnePeaceModel, modality: str, batch: dict[str, Any], mode: str, seconds: float
) -> dict[str, Any]:
    """Measure one (modality, mode) pair; mode is ``fwd``, ``fwd+bwd`` or ``fwd-bf16``."""
    n = next(iter(batch.values())).shape[0]
    if mode == "fwd+bwd":
        model.train()

        def step() -> None:
            model.zero_grad(set_to_none=True)
            out = model.forward_features({modality: batch})
            out.hidden[modality].float().square().mean().backward()
    else:
        model.eval()

        def step() -> None:
            with torch.inference_mode():
                model.forward_features({modality: batch})

    with torch.no_grad():
        tokens = model.adapters[modality](batch).tokens.shape[1]
    with PeakRSS() as mem:  # baseline taken before the first step, so the delta includes activations
        flops = count_flops(step)
        sec = time_call(step, seconds)
    return {
        "modality": modality,
        "mode": mode,
        "batch": n,
        "tokens_per_sample": tokens,
        "seconds_per_step": sec,
        "samples_per_s": n / sec,
        "tokens_per_s": n * tokens / sec,
        "flops_per_step": flops,
        "achieved_flops": flops / sec,
        "peak_rss_gb": mem.peak / 2**30,
        "peak_delta_gb": mem.delta / 2**30,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table (and JSON with ``--json``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="base")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--modalities", nargs="+", default=["text", "image", "audio", "video"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd", "fwd-bf16"])
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--audio-seconds", type=float, default=5.0)
    p.add_argument("--video-frames", type=int, default=4)
    p.add_argument("--video-batch", type=int, default=8, help="video is 1+frames*256 tokens per sample")
    p.add_argument("--seconds", type=float, default=5.0, help="minimum timed seconds per measurement")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--force-bf16", action="store_true", help="run fwd-bf16 even without native bf16 matmul")
    p.add_argument("--json", help="also write results to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine())
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(
        f"measured matmul peak (2048^2): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s"
    )
    modes = list(args.modes)
    if "fwd-bf16" in modes and peaks["bf16"] < peaks["fp32"] and not args.force_bf16:
        modes.remove("fwd-bf16")
        print("skipping fwd-bf16: this CPU has no native bf16 matmul (bf16 peak below fp32); --force-bf16 to run it")
    mods = tuple(args.modalities)
    model = one_peace.build_model(args.size, modalities=mods)
    model16 = None
    results = []
    print(
        f"{'modality':>8} {'mode':>9} {'batch':>5} {'tok/smp':>7} {'smp/s':>8} {'tok/s':>9} "
        f"{'GFLOP/s':>8} {'MFU':>6} {'peakGB':>7} {'+GB':>6}"
    )
    for m in mods:
        bsz = args.video_batch if m == "video" else args.batch_size
        batch = make_batch(m, bsz, model.config, args)
        for mode in modes:
            if mode == "fwd-bf16":
                if model16 is None:
                    import copy

                    model16 = copy.deepcopy(model).to(torch.bfloat16)
                r = bench(model16, m, cast(batch, torch.bfloat16), mode, args.seconds)
                r["mfu"] = r["achieved_flops"] / peaks["bf16"]
            else:
                r = bench(model, m, batch, mode, args.seconds)
                r["mfu"] = r["achieved_flops"] / peaks["fp32"]
            results.append(r)
            print(
                f"{m:>8} {mode:>9} {r['batch']:>5} {r['tokens_per_sample']:>7} {r['samples_per_s']:>8.1f} "
                f"{r['tokens_per_s']:>9.0f} {r['achieved_flops'] / 1e9:>8.0f} {r['mfu']:>6.1%} "
                f"{r['peak_rss_gb']:>7.2f} {r['peak_delta_gb']:>6.2f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "peaks": peaks, "size": args.size, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
