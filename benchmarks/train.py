"""Training throughput of ``pretrain_vl`` (contrastive + 4 denoising objectives): samples/s, peak memory, MFU,
and the cost of each objective as a share of the step.

MFU is against the matmul peak measured in the same run on the same device (fp32, or bf16 for
``--precision bf16-autocast``, the default on CUDA); FLOPs are counted by PyTorch's flop counter on a real training
step (forward, backward; the optimizer update is not counted). Peak memory: RSS on the CPU, the allocator's peak
on CUDA.

    python benchmarks/train.py                       # base config, batch 8, 224 px, 32-token captions
    python benchmarks/train.py --size tiny --batch-size 4 --seconds 1
    python benchmarks/train.py --device cuda --size large --batch-size 32
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

import torch

import one_peace
from benchmarks.common import count_flops, machine, matmul_peak, peak_memory, time_call
from one_peace.models.decoder import DecoderConfig, DenoiseDecoder
from one_peace.train.objectives import ContrastiveObjective, DenoiseObjective
from one_peace.train.task import Task

OBJECTIVES = {
    "contrastive": (lambda: ContrastiveObjective(("image", "text")), 1.0),
    "text": (lambda: DenoiseObjective("text"), 0.5),
    "image": (lambda: DenoiseObjective("image"), 1.0),
    "pair_text": (lambda: DenoiseObjective("text", paired_with="image"), 0.5),
    "pair_image": (lambda: DenoiseObjective("image", paired_with="text"), 0.5),
}


def make_task(model: one_peace.OnePeaceModel, decoder: DenoiseDecoder, keys: list[str]) -> Task:
    """A task with the given subset of the pretrain_vl objectives (sharing model and decoder)."""
    return Task(model, {k: (OBJECTIVES[k][0](), OBJECTIVES[k][1]) for k in keys}, decoder=decoder)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="base")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=["fp32", "bf16-autocast"], help="default: fp32 on CPU, bf16-autocast on CUDA")
    p.add_argument("--skip-objectives", action="store_true", help="skip the per-objective cost breakdown")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    precision = args.precision or ("bf16-autocast" if device.type == "cuda" else "fp32")
    print(machine(device))
    peak = matmul_peak(torch.bfloat16 if precision == "bf16-autocast" else torch.float32, device=device)
    print(f"measured {'bf16' if precision != 'fp32' else 'fp32'} matmul peak on {device}: {peak / 1e12:.2f} TFLOP/s")
    torch.manual_seed(0)
    cfg = one_peace.model_config(
        args.size, ("text", "image"), modality_options={"image": {"image_size": args.image_size}}
    )
    model = one_peace.build_model(cfg).to(device)
    width = 768 if cfg.embed_dim >= 768 else max(32, cfg.embed_dim // 2)
    decoder = DenoiseDecoder(
        DecoderConfig(
            encoder_dim=cfg.embed_dim,
            embed_dim=width,
            heads=max(1, width // 64),
            ffn_dim=width * 8 // 3,
            modalities=("text", "image"),
        )
    ).to(device)
    g = torch.Generator().manual_seed(0)
    batch: dict[str, Any] = {
        "text": {
            "tokens": torch.cat(
                [
                    torch.randint(4, 50000, (args.batch_size, args.text_len - 1), generator=g),
                    torch.full((args.batch_size, 1), 2),
                ],
                1,
            )
        },
        "image": {"pixels": torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)},
        "valid": torch.ones(args.batch_size, dtype=torch.bool),
    }
    batch = {
        k: v.to(device) if isinstance(v, torch.Tensor) else {n: t.to(device) for n, t in v.items()}
        for k, v in batch.items()
    }
    params = list(model.parameters()) + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step_of(task: Task) -> Any:
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            cast = torch.autocast(device.type, torch.bfloat16) if precision != "fp32" else contextlib.nullcontext()
            with cast:
                loss, _ = task(batch)
            loss.backward()

        return step

    full = make_task(model, decoder, list(OBJECTIVES))
    step_of(full)()  # allocate (and build caches) before the peak is measured
    with peak_memory(device) as mem:
        flops = count_flops(step_of(full))
        sec = time_call(lambda: (step_of(full)(), opt.step()), args.seconds, device=device)
    n = args.batch_size
    print(
        f"pretrain_vl step ({args.size}, {precision}, batch {n}, {args.image_size} px, {args.text_len} tokens): "
        f"{sec:.3f} s/step, {n / sec:.2f} samples/s, {flops / sec / 1e12:.3f} TFLOP/s, MFU {flops / sec / peak:.1%}, "
        f"peak memory {mem.peak / 2**30:.2f} GiB"
    )
    if args.skip_objectives:
        return 0
    costs = {}
    for key in OBJECTIVES:
        costs[key] = time_call(step_of(make_task(model, decoder, [key])), args.seconds / 2, device=device)
    total = sum(costs.values())
    print("cost of each objective alone (its own views, fwd+bwd), and share of their sum:")
    for key, t in costs.items():
        print(f"  {key:>11}: {t:6.2f} s  {t / total:6.1%}")
    print(f"  (sum {total:.2f} s vs {sec:.2f} s for the full step: shared views are computed once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
