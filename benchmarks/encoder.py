"""Encoder throughput per modality: forward and forward+backward samples/s and tokens/s, peak memory, and MFU.

MFU is measured against the dense matmul peak measured in the same run on the same device (fp32 and bf16).
FLOPs are counted by PyTorch's flop counter on the real forward/backward (adapters included).

Modes: ``fwd`` / ``fwd+bwd`` in fp32 (MFU against the fp32 peak); ``fwd-bf16`` with pure bf16 weights;
``fwd-amp`` / ``fwd+bwd-amp`` under bf16 autocast (these three against the bf16 peak). On ``--device cuda`` the
default modes are the bf16 ones, peak memory is the allocator's, and ``--compile`` runs ``torch.compile(model)``.

    python benchmarks/encoder.py                      # base config, batch 32, all modalities
    python benchmarks/encoder.py --size tiny --batch-size 4 --modalities text image --seconds 1
    python benchmarks/encoder.py --device cuda --size large --batch-size 64 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

import torch

import one_peace
from benchmarks.common import count_flops, machine, matmul_peak, peak_memory, time_call


def make_batch(modality: str, batch: int, cfg: one_peace.ModelConfig, args: argparse.Namespace) -> dict[str, Any]:
    """A benchmark batch on ``args.device``: fixed lengths so every sample has the same token count."""
    g = torch.Generator().manual_seed(0)
    if modality == "text":
        out = {"tokens": torch.randint(4, 50000, (batch, args.text_len), generator=g)}
    elif modality == "image":
        out = {"pixels": torch.randn(batch, 3, args.image_size, args.image_size, generator=g)}
    elif modality == "audio":
        out = {"waveform": torch.randn(batch, int(args.audio_seconds * 16000), generator=g)}
    elif modality == "video":
        out = {"frames": torch.randn(batch, args.video_frames, 3, args.image_size, args.image_size, generator=g)}
    else:
        out = one_peace.get_plugin(modality).example_batch(cfg, batch, g)
    return {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def cast(batch: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Floating tensors of ``batch`` in ``dtype``."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def bench(
    model: Any, modality: str, batch: dict[str, Any], mode: str, seconds: float, device: torch.device
) -> dict[str, Any]:
    """Measure one (modality, mode) pair; mode is ``fwd``, ``fwd+bwd``, ``fwd-bf16``, ``fwd-amp`` or ``fwd+bwd-amp``.

    ``model`` may be a compiled module; its encoder is ``getattr(model, "_orig_mod", model)``.
    """
    n = next(iter(batch.values())).shape[0]
    encoder = getattr(model, "_orig_mod", model)

    def cast() -> Any:
        return torch.autocast(device.type, torch.bfloat16) if mode.endswith("-amp") else contextlib.nullcontext()

    if mode.startswith("fwd+bwd"):
        encoder.train()

        def step() -> None:
            encoder.zero_grad(set_to_none=True)
            with cast():
                out = model({modality: batch})
                out.hidden[modality].float().square().mean().backward()
    else:
        encoder.eval()

        def step() -> None:
            with torch.inference_mode(), cast():
                model({modality: batch})

    with torch.no_grad():
        tokens = encoder.adapters[modality](batch).tokens.shape[1]
    step()  # compile (when compiled) and allocate before the peak is measured
    with peak_memory(device) as mem:
        flops = count_flops(lambda: (encoder.zero_grad(set_to_none=True), step()))
        sec = time_call(step, seconds, device=device)
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
        "peak_gb": mem.peak / 2**30,
        "peak_delta_gb": mem.delta / 2**30,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table (and JSON with ``--json``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="base")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--modalities", nargs="+", default=["text", "image", "audio", "video"])
    p.add_argument(
        "--modes", nargs="+", help="default: fwd fwd+bwd fwd-bf16 (CPU), fwd-amp fwd+bwd-amp fwd-bf16 (CUDA)"
    )
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--audio-seconds", type=float, default=5.0)
    p.add_argument("--video-frames", type=int, default=4)
    p.add_argument("--video-batch", type=int, default=8, help="video is 1+frames*256 tokens per sample")
    p.add_argument("--seconds", type=float, default=5.0, help="minimum timed seconds per measurement")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--compile", action="store_true", help="measure torch.compile(model)")
    p.add_argument("--attn-backend", default="sdpa", choices=["sdpa", "flex", "xformers"])
    p.add_argument("--force-bf16", action="store_true", help="run bf16 modes even without native bf16 matmul")
    p.add_argument("--json", help="also write results to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.device = device
    torch.manual_seed(0)
    print(machine(device))
    peaks = {"fp32": matmul_peak(torch.float32, device=device), "bf16": matmul_peak(torch.bfloat16, device=device)}
    print(
        f"measured matmul peak on {device}: fp32 {peaks['fp32'] / 1e12:.2f} TFLOP/s, "
        f"bf16 {peaks['bf16'] / 1e12:.2f} TFLOP/s"
    )
    modes = list(
        args.modes
        or (["fwd-amp", "fwd+bwd-amp", "fwd-bf16"] if device.type == "cuda" else ["fwd", "fwd+bwd", "fwd-bf16"])
    )
    if peaks["bf16"] < peaks["fp32"] and not args.force_bf16:
        skipped = [m for m in modes if m.endswith(("-bf16", "-amp"))]
        modes = [m for m in modes if m not in skipped]
        if skipped:
            print(f"skipping {skipped}: no native bf16 matmul here (bf16 peak below fp32); --force-bf16 to run them")
    mods = tuple(args.modalities)
    model = one_peace.build_model(args.size, modalities=mods).to(device)
    model.set_attn_backend(args.attn_backend)
    model16 = None
    results = []
    print(
        f"{'modality':>8} {'mode':>11} {'batch':>5} {'tok/smp':>7} {'smp/s':>8} {'tok/s':>9} "
        f"{'TFLOP/s':>8} {'MFU':>6} {'peakGB':>7} {'+GB':>6}"
    )
    for m in mods:
        bsz = args.video_batch if m == "video" else args.batch_size
        batch = make_batch(m, bsz, model.config, args)
        for mode in modes:
            if mode == "fwd-bf16":
                if model16 is None:
                    import copy

                    model16 = copy.deepcopy(model).to(torch.bfloat16)
                run_model, run_batch = model16, cast(batch, torch.bfloat16)
            else:
                run_model, run_batch = model, batch
            if args.compile:
                run_model = torch.compile(run_model)
            r = bench(run_model, m, run_batch, mode, args.seconds, device)
            r["mfu"] = r["achieved_flops"] / peaks["fp32" if mode in ("fwd", "fwd+bwd") else "bf16"]
            results.append(r)
            print(
                f"{m:>8} {mode:>11} {r['batch']:>5} {r['tokens_per_sample']:>7} {r['samples_per_s']:>8.1f} "
                f"{r['tokens_per_s']:>9.0f} {r['achieved_flops'] / 1e12:>8.2f} {r['mfu']:>6.1%} "
                f"{r['peak_gb']:>7.2f} {r['peak_delta_gb']:>6.2f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "machine": machine(device),
                    "peaks": peaks,
                    "size": args.size,
                    "compile": args.compile,
                    "results": results,
                },
                fh,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
