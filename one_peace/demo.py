"""``python -m one_peace.demo``: build a model and encode example inputs of every registered modality.

Runs on the embedded defaults (tiny config, random example inputs), needs no download, and prints what it did.
"""

from __future__ import annotations

import argparse
import time

import torch

import one_peace


def main(argv: list[str] | None = None) -> int:
    """Build a model with every registered modality, encode examples, and run one fused forward."""
    parser = argparse.ArgumentParser(prog="python -m one_peace.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=sorted(one_peace.SIZES))
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    modalities = tuple(one_peace.list_modalities())
    model = one_peace.build_model(args.size, modalities=modalities).eval()
    print(
        f"model {args.size}: {one_peace.count_parameters(model) / 1e6:.2f}M parameters, "
        f"modalities {list(model.adapters)}"
    )
    inputs = one_peace.example_inputs(modalities, args.batch_size, model.config)
    embeddings = {}
    with torch.inference_mode():
        for name, batch in inputs.items():
            t0 = time.perf_counter()
            emb = model.encode(name, batch)
            embeddings[name] = emb
            norms = emb.norm(dim=-1)
            print(
                f"  {name:>6}: embeddings {tuple(emb.shape)}, norms {norms.min():.3f}..{norms.max():.3f}, "
                f"{(time.perf_counter() - t0) * 1e3:.0f} ms"
            )
        fused = [m for m in ("text", "image", "audio") if m in inputs]
        out = model.forward_features({m: inputs[m] for m in fused})
        print("  fused " + " + ".join(fused) + ": " + ", ".join(f"{m} {tuple(h.shape)}" for m, h in out.hidden.items()))
        if "text" in embeddings and "image" in embeddings:
            sim = embeddings["text"] @ embeddings["image"].T
            print(f"  text-image cosine similarities (untrained weights): {sim.flatten().tolist()}")
    print("demo finished")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
