"""Embedding extraction: items/s and peak memory through bare forward, ``encode`` and the embed CLI pipeline.

For image, audio and text (``--size``, default base, random weights) it measures, on a corpus of generated files:

* ``forward``: ready batches, forward only (the ceiling);
* ``encode``: ``model.encode`` on the files (decode + preprocess + length batching + forward);
* ``pipeline``: :func:`one_peace.embed.embed` (thread-pool decode + forward + float16 parts + parquet), no index.

In the same run, open_clip's ViT-B-16 image tower (random weights, same batch and resolution) in fp32 and, where
the CPU has native bf16, pure bf16; FLOPs of both are counted by ``torch.utils.flop_counter`` (open_clip's
``nn.MultiheadAttention`` fast path off, which otherwise hides the attention projections from the counter).
Finally the tiny model embeds a corpus and a 10x corpus through the pipeline: time and peak memory ratios.

    python -m benchmarks.embed                        # base, batch 16
    python -m benchmarks.embed --size tiny --items 32 --seconds 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import one_peace
from benchmarks.common import PeakRSS, count_flops, machine, matmul_peak, time_call

WORDS = [
    "a",
    "red",
    "green",
    "blue",
    "circle",
    "square",
    "triangle",
    "on",
    "white",
    "black",
    "background",
    "moving",
    "slowly",
    "quickly",
    "dog",
]


def make_corpus(root: Path, modality: str, n: int, image_size: int, seconds: float, seed: int = 0) -> Path:
    """``n`` files (PNG / WAV) or texts of ``modality`` and their manifest."""
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"id": f"{modality}{i}"}
        if modality == "image":
            arr = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / f"{i}.png")
            row["image"] = f"{i}.png"
        elif modality == "audio":
            sf.write(root / f"{i}.wav", (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), 16000)
            row["audio"] = f"{i}.wav"
        else:
            row["text"] = " ".join(rng.choice(WORDS, size=int(rng.integers(8, 40))))
        rows.append(row)
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def _items(manifest: Path, modality: str) -> list[Any]:
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    return [r[modality] if modality == "text" else manifest.parent / r[modality] for r in rows]


def bench_modality(
    model: one_peace.OnePeaceModel, modality: str, manifest: Path, ckpt: Path, batch: int, seconds: float
) -> dict[str, Any]:
    """Items/s and peak RSS of forward, encode and the pipeline for one modality."""
    from one_peace.embed import EmbedConfig, embed

    items = _items(manifest, modality)
    n = len(items)
    batches = [model.prepare(modality, items[i : i + batch]) for i in range(0, n, batch)]

    def forward() -> None:
        with torch.inference_mode():
            for b in batches:
                model.encode(modality, b)

    out: dict[str, Any] = {"items": n}
    with PeakRSS() as mem:
        t = time_call(forward, seconds, warmup=1, min_iters=1)
    out["forward"] = {"items_per_s": n / t, "peak_rss_mb": mem.peak / 2**20}
    with PeakRSS() as mem:
        t = time_call(lambda: model.encode(modality, items, batch_size=batch), seconds, warmup=0, min_iters=1)
    out["encode"] = {"items_per_s": n / t, "peak_rss_mb": mem.peak / 2**20}
    runs = []
    with PeakRSS() as mem:
        for k in range(2):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = EmbedConfig(
                    checkpoint=str(ckpt),
                    data=str(manifest),
                    modality=modality,
                    out=f"{tmp}/o{k}",
                    batch_size=batch,
                    workers=4,
                    index="none",
                    progress=False,
                )
                t0 = time.perf_counter()
                embed(cfg, model=model)
                runs.append(time.perf_counter() - t0)
    out["pipeline"] = {"items_per_s": n / min(runs), "peak_rss_mb": mem.peak / 2**20}
    out["pipeline_vs_forward"] = out["pipeline"]["items_per_s"] / out["forward"]["items_per_s"]
    with torch.inference_mode():
        flops = count_flops(lambda: model.encode(modality, batches[0]))
    out["flops_per_item"] = flops / len(next(iter(batches[0].values())))
    return out


def bench_open_clip(batch: int, image_size: int, seconds: float, bf16: bool) -> dict[str, Any]:
    """open_clip ViT-B-16 image tower, random weights: images/s and FLOPs per image (fp32, and pure bf16)."""
    try:
        import open_clip
    except ImportError:
        return {"skipped": "open_clip not importable (pip install open_clip_torch)"}
    model = open_clip.create_model("ViT-B-16", pretrained=None, force_image_size=image_size).visual.eval()
    x = torch.randn(batch, 3, image_size, image_size)
    out: dict[str, Any] = {}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # so that the flop counter sees the attention projections
    with torch.inference_mode():
        out["flops_per_item"] = count_flops(lambda: model(x)) / batch
    torch.backends.mha.set_fastpath_enabled(fastpath)  # timed as users run it
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype == torch.bfloat16 and not bf16:
            out[name] = "skipped: no native bf16 matmul on this CPU"
            continue
        m, xi = model.to(dtype), x.to(dtype)

        def step(m: Any = m, xi: torch.Tensor = xi) -> None:
            m(xi)

        with torch.inference_mode():
            t = time_call(step, seconds, warmup=1, min_iters=1)
        out[name] = {"items_per_s": batch / t}
    model.float()
    return out


def scaling(root: Path, batch: int, items: int) -> dict[str, Any]:
    """Tiny model, pipeline: 1x and 10x corpus, time and peak memory."""
    from one_peace.embed import EmbedConfig, embed

    cfg = one_peace.model_config("tiny", ("image",))
    cfg.modality_options = {"image": {"image_size": 64}}
    model = one_peace.build_model(cfg).eval()
    ckpt = one_peace.save(model, root / "tiny")
    out = {}
    for factor in (1, 10):
        manifest = make_corpus(root / f"scale{factor}", "image", items * factor, 64, 1.0, seed=factor)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            embed(
                EmbedConfig(
                    checkpoint=str(ckpt),
                    data=str(manifest),
                    modality="image",
                    out=str(root / f"s{factor}"),
                    batch_size=batch,
                    index="flat",
                    progress=False,
                    part_size=max(64, items),
                ),
                model=model,
            )
            secs = time.perf_counter() - t0
        out[f"{factor}x"] = {"items": items * factor, "seconds": secs, "peak_rss_delta_mb": mem.delta / 2**20}
    out["time_ratio"] = out["10x"]["seconds"] / out["1x"]["seconds"]
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="base")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--items", type=int, default=32, help="images and audio clips per corpus (texts: 8x)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--audio-seconds", type=float, default=5.0)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--scale-items", type=int, default=256)
    p.add_argument("--modalities", nargs="+", default=["image", "audio", "text"])
    p.add_argument("--compile", action="store_true", help="also time the image forward through encode(compile=True)")
    p.add_argument("--out", default=None, help="also write the JSON here (the embed tool prints to stdout)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    result: dict[str, Any] = {"machine": machine(), "size": args.size, "batch": args.batch_size}
    peak32 = matmul_peak(torch.float32)
    peak16 = matmul_peak(torch.bfloat16)
    result["matmul_peak_gflops"] = {"fp32": peak32 / 1e9, "bf16": peak16 / 1e9}
    native_bf16 = peak16 > 1.5 * peak32
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from one_peace.adapters.text import TextTokenizer

        tok = TextTokenizer.train([" ".join(WORDS)] * 8, vocab_size=300)
        cfg = one_peace.model_config(args.size, tuple(args.modalities))
        options = {"image": {"image_size": args.image_size}, "text": {"vocab_size": tok.vocab_size}}
        cfg.modality_options = {m: o for m, o in options.items() if m in args.modalities}
        model = one_peace.build_model(cfg).eval()
        model.tokenizer = tok
        ckpt = one_peace.save(model, root / "model")
        for m in args.modalities:
            n = args.items * (8 if m == "text" else 1)
            manifest = make_corpus(root / m, m, n, args.image_size, args.audio_seconds)
            result[m] = bench_modality(model, m, manifest, ckpt, args.batch_size, args.seconds)
            if m == "image" and native_bf16:  # pure bf16 forward of the same ready batches
                half = one_peace.build_model(cfg).eval().to(torch.bfloat16)
                half.load_state_dict(model.state_dict())
                items = _items(manifest, m)
                ready = [half.prepare(m, items[i : i + args.batch_size]) for i in range(0, len(items), args.batch_size)]

                def bf16_forward(h: Any = half, batches: list[Any] = ready, name: str = m) -> None:
                    with torch.inference_mode():
                        for b in batches:
                            h.encode(name, b)

                t = time_call(bf16_forward, args.seconds, warmup=1, min_iters=1)
                result[m]["forward_bf16"] = {"items_per_s": len(items) / t}
                del half
            if m == "image" and args.compile:  # the same ready batches through encode(compile=True)
                items = _items(manifest, m)
                ready = [
                    model.prepare(m, items[i : i + args.batch_size]) for i in range(0, len(items), args.batch_size)
                ]
                started = time.perf_counter()
                with torch.inference_mode():
                    model.encode(m, ready[0], compile=True)  # the one-time compilation, outside the timing
                first = time.perf_counter() - started

                def compiled_forward(batches: list[Any] = ready, name: str = m) -> None:
                    with torch.inference_mode():
                        for b in batches:
                            model.encode(name, b, compile=True)

                t = time_call(compiled_forward, args.seconds, warmup=1, min_iters=1)
                result[m]["forward_compiled"] = {
                    "items_per_s": len(items) / t,
                    "first_call_seconds": first,
                }
            print(f"{m}: {json.dumps(result[m])}", file=sys.stderr)
        if "image" in args.modalities:
            oc = bench_open_clip(args.batch_size, args.image_size, args.seconds, native_bf16)
            result["open_clip_vit_b16"] = oc
            if "fp32" in oc and isinstance(oc["fp32"], dict):
                ours = result["image"]["forward"]["items_per_s"] * result["image"]["flops_per_item"]
                theirs = oc["fp32"]["items_per_s"] * oc["flops_per_item"]
                result["image_flops_throughput_vs_open_clip"] = ours / theirs
                result["image_mfu_fp32"] = ours / peak32
                result["open_clip_mfu_fp32"] = theirs / peak32
                if "forward_compiled" in result["image"]:
                    compiled = result["image"]["forward_compiled"]["items_per_s"] * result["image"]["flops_per_item"]
                    result["image_compiled_flops_throughput_vs_open_clip"] = compiled / theirs
            if "forward_bf16" in result.get("image", {}) and isinstance(oc.get("bf16"), dict):
                result["image_bf16_vs_open_clip_bf16_per_flop"] = (
                    result["image"]["forward_bf16"]["items_per_s"] * result["image"]["flops_per_item"]
                ) / (oc["bf16"]["items_per_s"] * oc["flops_per_item"])
        result["scaling_tiny"] = scaling(root, args.batch_size, args.scale_items)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
