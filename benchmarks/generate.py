"""Seq2seq generation throughput: generated tokens/s of the batched, KV-cached ``generate`` against the
per-sample, prefix-recomputing ``generate_reference`` (the implementation before the cache), on the same inputs.

The decoder has random weights; its EOS logit is lowered so every sample decodes ``--max-len`` tokens (random
decoders otherwise stop at arbitrary lengths, which makes tokens/s depend on the seed). Both paths must return the
same tokens; the script checks that before it reports.

    python benchmarks/generate.py                        # base-sized decoder, batch 16, greedy and beam 5
    python benchmarks/generate.py --size tiny --batch-size 4 --max-len 8 --seconds 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from benchmarks.common import machine
from one_peace.models.seq2seq import EOS, Seq2SeqConfig, TextDecoder, Trie, generate, generate_reference

SIZES = {
    "tiny": {"embed_dim": 64, "layers": 2, "heads": 4, "ffn_dim": 128, "encoder_dim": 64, "vocab_size": 512},
    "base": {"embed_dim": 512, "layers": 6, "heads": 8, "ffn_dim": 2048, "encoder_dim": 768, "vocab_size": 32000},
}


def timed(fn: Any, seconds: float) -> tuple[float, Any]:
    """Mean seconds per call (at least one call and ``seconds`` of calls) and the last result."""
    out, calls, start = fn(), 1, time.perf_counter()
    while time.perf_counter() - start < seconds:
        out = fn()
        calls += 1
    return (time.perf_counter() - start) / max(calls - 1, 1) if calls > 1 else seconds, out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; prints one JSON line per (mode, implementation) and returns them."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="base")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--memory-len", type=int, default=197, help="encoder states per sample (197 = 224-px image)")
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--beams", type=int, nargs="+", default=[1, 5])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    size = SIZES[args.size]
    config = Seq2SeqConfig(**size, max_positions=max(args.max_len + 1, 32))
    decoder = TextDecoder(config).eval().to(args.device)
    with torch.no_grad():
        decoder.embed.weight[EOS].mul_(0.0)  # EOS scores ~0: samples run to max_len
    memory = torch.randn(args.batch_size, args.memory_len, size["encoder_dim"], device=args.device)
    pad = torch.zeros(args.batch_size, args.memory_len, dtype=torch.bool, device=args.device)
    pad[1::2, args.memory_len // 2 :] = True  # half the samples padded
    trie = Trie([[t, t + 1, t + 2, EOS] for t in range(10, 10 + 50)])
    print(f"# {machine()}, device {args.device}, decoder {args.size} {size}", file=sys.stderr)
    rows = []
    for mode, beam, constraint in [*((f"beam{b}", b, None) for b in args.beams), ("trie-beam3", 3, trie)]:
        result = {}
        for name, fn in (("reference", generate_reference), ("cached", generate)):
            seconds, out = timed(
                lambda fn=fn, beam=beam, trie=constraint: fn(
                    decoder, memory, pad, beam=beam, max_len=args.max_len, trie=trie
                ),
                args.seconds,
            )
            result[name] = (seconds, out)
            tokens = sum(len(o) for o in out)
            row = {
                "mode": mode,
                "impl": name,
                "batch": args.batch_size,
                "tokens": tokens,
                "seconds": round(seconds, 4),
                "tokens_per_s": round(tokens / seconds, 1),
            }
            rows.append(row)
            print(json.dumps(row))
        if result["reference"][1] != result["cached"][1]:
            raise SystemExit(f"{mode}: the cached generation differs from the reference")
        speedup = result["reference"][0] / result["cached"][0]
        print(json.dumps({"mode": mode, "speedup": round(speedup, 2)}))
    return rows


if __name__ == "__main__":
    main()
