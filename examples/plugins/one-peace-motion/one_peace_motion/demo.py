"""``python -m one_peace_motion.demo OUT``: generated IMU recordings of activities, with captions to learn.

Each sample is a ``(T, 6)`` ``.npy`` sequence at 50 Hz (accelerometer x/y/z in g, gyroscope x/y/z in rad/s) of
2-6 s of one activity done slowly or quickly, with sensor noise, a random phase, amplitude jitter and a slightly
tilted sensor. ``OUT/train.jsonl`` and ``OUT/valid.jsonl`` hold ``{"id", "motion": "motion/<id>.npy", "text"}``;
the caption (``"a person walking quickly"``, 11 distinct ones) is what the sequence shows, so alignment can be
learnt and measured.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

RATE = 50
ACTIVITIES = ("walking", "running", "jumping", "sitting", "waving", "cycling")
MANNERS = {"slowly": 0.7, "quickly": 1.45}


def _signal(activity: str, speed: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    phase = rng.uniform(0, 2 * math.pi)
    amp = rng.uniform(0.85, 1.15) * (0.6 + 0.4 * speed)
    acc = np.zeros((len(t), 3))
    gyro = np.zeros((len(t), 3))
    acc[:, 2] = 1.0  # gravity
    if activity == "walking":
        f = 1.8 * speed
        acc[:, 2] += 0.35 * amp * np.sin(2 * math.pi * f * t + phase)
        acc[:, 0] += 0.2 * amp * np.sin(4 * math.pi * f * t + phase)
        gyro[:, 1] = 0.4 * amp * np.sin(2 * math.pi * f / 2 * t + phase)
    elif activity == "running":
        f = 2.7 * speed
        acc[:, 2] += 1.2 * amp * (np.abs(np.sin(2 * math.pi * f / 2 * t + phase)) - 0.6)
        acc[:, 0] += 0.5 * amp * np.sin(2 * math.pi * f * t + phase)
        gyro[:, 1] = 1.0 * amp * np.sin(2 * math.pi * f / 2 * t + phase)
    elif activity == "jumping":
        period = 0.9 / speed
        spikes = np.exp(-((((t + phase / (2 * math.pi) * period) % period) - period / 2) ** 2) / 0.003)
        acc[:, 2] += 2.5 * amp * spikes - 0.3 * amp
    elif activity == "sitting":
        acc[:, 0] += 0.03 * np.sin(2 * math.pi * 0.2 * speed * t + phase)
        gyro[:, 2] = 0.05 * speed * np.sin(2 * math.pi * 0.3 * t + phase)
    elif activity == "waving":
        f = 1.5 * speed
        gyro[:, 0] = 2.5 * amp * np.sin(2 * math.pi * f * t + phase)
        acc[:, 1] += 0.6 * amp * np.cos(2 * math.pi * f * t + phase)
    elif activity == "cycling":
        f = 1.2 * speed
        acc[:, 0] += 0.4 * amp * np.sin(2 * math.pi * f * t + phase)
        acc[:, 1] += 0.4 * amp * np.cos(2 * math.pi * f * t + phase)
        gyro[:, 2] = 0.8 * amp * np.sin(2 * math.pi * f * t + phase + 1.0)
    else:
        raise ValueError(f"unknown activity {activity!r}")
    a, b = rng.normal(0, 0.08, 2)  # a slightly tilted sensor
    rot = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]]) @ np.array(
        [[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]]
    )
    x = np.concatenate([acc @ rot.T, gyro @ rot.T], axis=1)
    return (x + rng.normal(0, 0.05, x.shape)).astype(np.float32)


def make_demo(out: str | Path, train: int = 384, valid: int = 96, seed: int = 0) -> tuple[Path, Path]:
    """Write the demo set under ``out``; returns the train and valid manifests."""
    out = Path(out)
    (out / "motion").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = [(a, m) for a in ACTIVITIES for m in MANNERS]
    paths = []
    for split, count in (("train", train), ("valid", valid)):
        rows = []
        for i in range(count):
            activity, manner = classes[(i + rng.integers(len(classes))) % len(classes)]
            seconds = float(rng.uniform(2.0, 6.0))
            sid = f"{split}-{i:05d}"
            np.save(out / "motion" / f"{sid}.npy", _signal(activity, MANNERS[manner], seconds, rng))
            caption = "a person sitting still" if activity == "sitting" else f"a person {activity} {manner}"
            rows.append({"id": sid, "motion": f"motion/{sid}.npy", "text": caption})
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m one_peace_motion.demo OUT [--train N] [--valid N] [--seed S]``."""
    p = argparse.ArgumentParser(prog="python -m one_peace_motion.demo", description=__doc__.splitlines()[0])
    p.add_argument("out", help="output folder")
    p.add_argument("--train", type=int, default=384, help="training samples (default 384)")
    p.add_argument("--valid", type=int, default=96, help="validation samples (default 96)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    train, valid = make_demo(args.out, args.train, args.valid, args.seed)
    print(f"wrote {train} and {valid}")


if __name__ == "__main__":
    main()
