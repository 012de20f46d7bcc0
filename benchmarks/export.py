"""Precisions and exported graphs, measured: speed and what each costs in retrieval quality.

Speed (``--size``, default base, random weights): images/s, texts/s and audio-seconds/s of one modality's encoder on
ready batches, for eager fp32, ``torch.compile`` fp32, pure bf16 (the model in bf16), ONNX Runtime fp32 and ONNX
Runtime int8 (dynamic quantisation), interleaved in rounds (every variant once per round, the best round kept) in
one process, next to the machine's fp32 and bf16 matmul peaks measured in the same run.

Quality: two tiny models are trained first on the embedded demo data (``vl_contrastive``: image-text;
``al_contrastive``: audio-text); on the held-out split the run generates, each precision's recall@1 (text->image,
text->audio, grouped by identical captions) and zero-shot accuracy (each image / sound against the distinct captions
/ sound descriptions) are compared with fp32.

    python -m benchmarks.export                       # base for speed, ~10 minutes on 2 cores
    python -m benchmarks.export --size tiny --seconds 1 --steps 100
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import one_peace
from benchmarks.common import machine, matmul_peak
from one_peace.export import export, run_exported

VARIANTS = ("eager fp32", "compiled fp32", "bf16", "onnxruntime fp32", "onnxruntime int8")


def _runners(model: Any, modality: str, folder: Path) -> dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]]:
    """One callable per variant: a collated batch -> L2-normalised embeddings (float32)."""
    from one_peace.models.encoding import forward_batch
    from one_peace.models.precision import model_in

    export(model, modality, folder, precision="int8", check_batch_sizes=())
    bf16 = model_in(model, "bf16")

    def eager(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return forward_batch(model, modality, batch, True)

    def compiled(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return forward_batch(model, modality, batch, True, compiled=True)

    def pure_bf16(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return forward_batch(bf16, modality, batch, True).float()

    return {
        "eager fp32": eager,
        "compiled fp32": compiled,
        "bf16": pure_bf16,
        "onnxruntime fp32": lambda b: run_exported(folder, b),
        "onnxruntime int8": lambda b: run_exported(folder, b, int8=True),
    }


def speed(size: str, seconds: float, rounds: int, root: Path) -> dict[str, Any]:
    """Items/s (and audio-seconds/s) of every variant on ready batches of each modality."""
    from one_peace.adapters.text import TextTokenizer

    words = ["a", "red", "green", "blue", "circle", "square", "triangle", "on", "white", "black", "dog", "runs"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=int(rng.integers(20, 40)))) for _ in range(32)]
    torch.manual_seed(0)
    cfg = one_peace.model_config(size, ("text", "image", "audio"))
    model = one_peace.build_model(cfg).eval()
    model.tokenizer = TextTokenizer.train(texts, vocab_size=300)
    clip_seconds = 5.0
    batches = {
        "text": model.prepare("text", texts),
        "image": model.prepare("image", [rng.integers(0, 255, (224, 224, 3), dtype=np.uint8) for _ in range(8)]),
        "audio": model.prepare(
            "audio", [(rng.standard_normal(int(clip_seconds * 16000)).astype(np.float32), 16000) for _ in range(4)]
        ),
    }
    out: dict[str, Any] = {}
    for modality, batch in batches.items():
        t0 = time.perf_counter()
        runners = _runners(model, modality, root / f"speed-{modality}")
        n = len(next(iter(batch.values())))
        with torch.inference_mode():
            reference = runners["eager fp32"](batch)
            for fn in runners.values():  # warm-up (compilation, ONNX Runtime's first run)
                fn(batch)
            best = dict.fromkeys(runners, float("inf"))
            for _ in range(rounds):
                for name, fn in runners.items():
                    iters, start = 0, time.perf_counter()
                    while iters < 1 or time.perf_counter() - start < seconds:
                        fn(batch)
                        iters += 1
                    best[name] = min(best[name], (time.perf_counter() - start) / iters)
            agreement = {
                name: float(F.cosine_similarity(fn(batch).float(), reference).min()) for name, fn in runners.items()
            }
        unit = "audio_seconds_per_s" if modality == "audio" else "items_per_s"
        scale = clip_seconds if modality == "audio" else 1.0
        out[modality] = {
            "batch": n,
            "setup_seconds": round(time.perf_counter() - t0, 1),
            **{
                name: {
                    unit: round(n * scale / best[name], 2),
                    "speedup_vs_eager": round(best["eager fp32"] / best[name], 2),
                    "min_cosine_to_eager": round(agreement[name], 5),
                }
                for name in runners
            },
        }
    return out


def _train(recipe: str, out: Path, steps: int) -> tuple[Path, Path]:
    """Train a tiny model with ``recipe`` on the demo data; its checkpoint and held-out manifest."""
    from hydra import compose, initialize_config_module

    from one_peace.run import run

    overrides = [
        f"recipe={recipe}",
        f"output_dir={out}",
        "data.image_size=32",
        "data.demo_valid=128",
        f"trainer.max_steps={steps}",
        f"trainer.save_every={steps}",
        f"trainer.log_every={steps}",
        "trainer.warmup_steps=20",
    ]
    if recipe == "al_contrastive":
        overrides += ["model.modality_options.audio.frontend=fbank", "model.modality_options.audio.feature_dim=64"]
    with initialize_config_module(config_module="one_peace.recipes", version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    with contextlib.redirect_stdout(sys.stderr):  # the run's report: stdout is the benchmark's JSON
        results = run(cfg)
    return Path(results["checkpoint"]), out / "demo_data" / "valid.jsonl"


def _quality(model: Any, rows: list[dict[str, Any]], root: Path, modality: str, field: str, folder: Path) -> dict:
    """Each variant's text->modality R@1 and zero-shot accuracy on ``rows`` (grouped by identical captions)."""
    items = [root / r[modality] for r in rows]
    captions = [r[field] for r in rows]
    classes = sorted(set(captions))
    truth = torch.tensor([classes.index(c) for c in captions])
    media, text, prompts = (
        model.prepare(modality, items),
        model.prepare("text", captions),
        model.prepare("text", classes),
    )
    out: dict[str, Any] = {"rows": len(rows), "classes": len(classes)}
    runners = {m: _runners(model, m, folder / m) for m in (modality, "text")}
    with torch.inference_mode():
        for name in VARIANTS:
            if name == "compiled fp32":
                continue  # the same numbers as eager
            m_emb = runners[modality][name](media).float()
            t_emb, p_emb = runners["text"][name](text).float(), runners["text"][name](prompts).float()
            top = (t_emb @ m_emb.T).argmax(1)  # text -> modality: right when the top item has the same caption
            r1 = float((truth[top] == truth).float().mean())
            zero_shot = float(((m_emb @ p_emb.T).argmax(1) == truth).float().mean())
            out[name] = {f"text->{modality} R@1": round(r1, 4), "zero-shot accuracy": round(zero_shot, 4)}
    base = out["eager fp32"]
    for name in VARIANTS:
        if name in out and name != "eager fp32":
            out[name]["change"] = {k: round(out[name][k] - base[k], 4) for k in base}
    out["chance zero-shot"] = round(1 / len(classes), 4)
    return out


def quality(steps: int, root: Path) -> dict[str, Any]:
    """Train the two tiny models, then compare every precision with fp32 on their held-out split."""
    out: dict[str, Any] = {}
    for recipe, modality, field in (("vl_contrastive", "image", "caption"), ("al_contrastive", "audio", "sound")):
        t0 = time.perf_counter()
        ckpt, valid = _train(recipe, root / recipe, steps)
        rows = [json.loads(x) for x in valid.read_text().splitlines()]
        model = one_peace.load(ckpt).eval()
        out[recipe] = _quality(model, rows, valid.parent, modality, field, root / f"{recipe}-graphs")
        out[recipe]["train_and_measure_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="base", help="model size for the speed part")
    p.add_argument("--seconds", type=float, default=2.0, help="time per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="training steps of each tiny model (quality part)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    args = p.parse_args(argv)
    result: dict[str, Any] = {
        "machine": machine(),
        "matmul_peak_gflops": {
            "fp32": round(matmul_peak(torch.float32) / 1e9, 1),
            "bf16": round(matmul_peak(torch.bfloat16) / 1e9, 1),
        },
    }
    with tempfile.TemporaryDirectory(prefix="one-peace-bench-export-") as tmp:
        if not args.skip_speed:
            result["speed"] = speed(args.size, args.seconds, args.rounds, Path(tmp))
        if not args.skip_quality:
            result["quality"] = quality(args.steps, Path(tmp))
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
