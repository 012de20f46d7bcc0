"""Training throughput of ``pretrain_vl`` (contrastive + 4 denoising objectives): samples/s, peak memory, MFU,
and the cost of each objective as a share of the step.

MFU is against the fp32 matmul peak measured in the same run; FLOPs are counted by PyTorch's flop counter on a
real training step (forward, backward; the optimizer update is not counted).

    python benchmarks/train.py                       # base config, batch 8, 224 px, 32-token captions
    python benchmarks/train.py --size tiny --batch-size 4 --seconds 1
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

import one_peace
from benchmarks.common import PeakRSS, count_flops, machine, matmul_peak, time_call
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
    args = p.parse_args(argv)
    print(machine())
    peak = matmul_peak(torch.float32)
    print(f"measured fp32 matmul peak (2048^2): {peak / 1e9:.0f} GFLOP/s")
    torch.manual_seed(0)
    cfg = one_peace.model_config(
        args.size, ("text", "image"), modality_options={"image": {"image_size": args.image_size}}
    )
    model = one_peace.build_model(cfg)
    width = 768 if cfg.embed_dim >= 768 else max(32, cfg.embed_dim // 2)
    decoder = DenoiseDecoder(
        DecoderConfig(
            encoder_dim=cfg.embed_dim,
            embed_dim=width,
            heads=max(1, width // 64),
            ffn_dim=width * 8 // 3,
            modalities=("text", "image"),
        )
    )
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
    params = list(model.parameters()) + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step_of(task: Task) -> Any:
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss, _ = task(batch)
            loss.backward()

        return step

    full = make_task(model, decoder, list(OBJECTIVES))
    with PeakRSS() as mem:
        flops = count_flops(step_of(full))
        sec = time_call(lambda: (step_of(full)(), opt.step()), args.seconds)
    n = args.batch_size
    print(
        f"pretrain_vl step ({args.size}, batch {n}, {args.image_size} px, {args.text_len} tokens): "
        f"{sec:.2f} s/step, {n / sec:.2f} samples/s, {flops / sec / 1e9:.0f} GFLOP/s, MFU {flops / sec / peak:.1%}, "
        f"peak RSS {mem.peak / 2**30:.2f} GiB"
    )
    costs = {}
    for key in OBJECTIVES:
        costs[key] = time_call(step_of(make_task(model, decoder, [key])), args.seconds / 2)
    total = sum(costs.values())
    print("cost of each objective alone (its own views, fwd+bwd), and share of their sum:")
    for key, t in costs.items():
        print(f"  {key:>11}: {t:6.2f} s  {t / total:6.1%}")
    print(f"  (sum {total:.2f} s vs {sec:.2f} s for the full step: shared views are computed once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
