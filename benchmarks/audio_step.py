"""Audio training step of the ``tiny`` model (``al_contrastive``: audio-text contrast): seconds per step and where
the time goes, for the wav2vec2-style extractor at several widths (``model.modality_options.audio.feature_dim``)
and for the log-mel front end (``model.modality_options.audio.frontend=fbank``).

    python -m benchmarks.audio_step                       # batch 64 of 1-second clips, widths 512 (default) and 64
    python -m benchmarks.audio_step --feature-dims 512 128 64 --batch-size 32
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import one_peace
from benchmarks.common import machine
from one_peace.train.objectives import ContrastiveObjective
from one_peace.train.task import Task


def step_seconds(
    feature_dim: int, batch_size: int, seconds: float, repeats: int, frontend: str = "waveform"
) -> tuple[float, float]:
    """Median seconds of one forward+backward step, and the share of it spent in the audio extractor."""
    torch.manual_seed(0)
    model = one_peace.build_model(
        "tiny",
        modalities=("text", "audio"),
        modality_options={"audio": {"feature_dim": feature_dim, "frontend": frontend}},
    )
    task = Task(model, {"c": (ContrastiveObjective(("audio", "text")), 1.0)}).train()
    batch = one_peace.example_inputs(("text", "audio"), batch_size=batch_size, config=model.config)
    samples = int(seconds * 16000)
    batch["audio"] = {"waveform": torch.randn(batch_size, samples) * 0.1, "lengths": torch.full((batch_size,), samples)}
    batch["valid"] = torch.ones(batch_size, dtype=torch.bool)
    extractor = model.adapters["audio"].feature_extractor
    spent = [0.0]

    def pre(*_: object) -> None:
        spent.append(-time.perf_counter())

    def post(*_: object) -> None:
        spent[-1] += time.perf_counter()

    extractor.register_forward_pre_hook(pre)
    extractor.register_forward_hook(post)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        spent[:] = [0.0]
        t0 = time.perf_counter()
        loss, _ = task(batch)
        loss.backward()
        task.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    fwd_extractor = sum(spent)
    return times[len(times) // 2], fwd_extractor / times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--feature-dims", type=int, nargs="+", default=[512, 64])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--frontends", nargs="+", default=["waveform", "fbank"])
    args = p.parse_args(argv)
    print(machine())
    base = None
    for frontend, dim in ((f, d) for f in args.frontends for d in args.feature_dims):
        sec, share = step_seconds(dim, args.batch_size, args.seconds, args.repeats, frontend)
        base = base or sec
        print(
            f"{frontend:8s} feature_dim {dim:4d}: {sec:6.2f} s/step (batch {args.batch_size} x {args.seconds:g} s), "
            f"extractor forward {100 * share:4.1f} % of the step, {base / sec:5.1f}x vs the first"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
