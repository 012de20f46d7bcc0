"""``python -m one_peace_pointcloud.demo OUT``: generated coloured shapes as point clouds, with captions to learn.

Each sample is an ``(N, 6)`` ``.npy`` cloud (xyz, rgb in 0..255) of 600-1200 points on the surface of one shape
(sphere, cube, cylinder, cone, torus, pyramid) in one colour (red, green, blue), randomly rotated about the
vertical, scaled, stretched a little and jittered. ``OUT/train.jsonl`` and ``OUT/valid.jsonl`` hold
``{"id", "pointcloud": "points/<id>.npy", "text"}`` with the caption ``"a red torus"`` (18 distinct ones).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

SHAPES = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid")
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 230)}


def _surface(shape: str, n: int, rng: np.random.Generator) -> np.ndarray:
    u, v = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    if shape == "sphere":
        z = 2 * u - 1
        r = np.sqrt(1 - z**2)
        return np.stack([r * np.cos(2 * math.pi * v), r * np.sin(2 * math.pi * v), z], 1)
    if shape == "cube":
        face = rng.integers(0, 6, n)
        p = rng.uniform(-1, 1, (n, 3))
        p[np.arange(n), face % 3] = np.where(face < 3, -1.0, 1.0)
        return p
    if shape == "cylinder":
        a = 2 * math.pi * v
        return np.stack([np.cos(a), np.sin(a), 2 * u - 1], 1)
    if shape == "cone":
        a, h = 2 * math.pi * v, np.sqrt(u)
        return np.stack([h * np.cos(a), h * np.sin(a), 1 - 2 * h], 1)
    if shape == "torus":
        a, b = 2 * math.pi * u, 2 * math.pi * v
        return np.stack([(1 + 0.35 * np.cos(b)) * np.cos(a), (1 + 0.35 * np.cos(b)) * np.sin(a), 0.35 * np.sin(b)], 1)
    if shape == "pyramid":
        side = rng.integers(0, 4, n)
        h = np.sqrt(u)
        t = 2 * v - 1
        corners = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=float)
        a, b = corners[side], corners[(side + 1) % 4]
        xy = (a + (b - a) * ((t[:, None] + 1) / 2)) * h[:, None]
        return np.concatenate([xy, (1 - 2 * h)[:, None]], 1)
    raise ValueError(f"unknown shape {shape!r}")


def _cloud(shape: str, color: str, rng: np.random.Generator) -> np.ndarray:
    n = int(rng.integers(600, 1200))
    xyz = _surface(shape, n, rng) * rng.uniform(0.8, 1.2, 3)  # a little stretched
    a = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    xyz = xyz @ rot.T * rng.uniform(0.5, 2.0) + rng.normal(0, 0.02, (n, 3))
    rgb = np.clip(np.array(COLORS[color]) + rng.normal(0, 20, (n, 3)), 0, 255)
    return np.concatenate([xyz, rgb], 1).astype(np.float32)[rng.permutation(n)]


def make_demo(out: str | Path, train: int = 384, valid: int = 96, seed: int = 0) -> tuple[Path, Path]:
    """Write the demo set under ``out``; returns the train and valid manifests."""
    out = Path(out)
    (out / "points").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = [(s, c) for s in SHAPES for c in COLORS]
    paths = []
    for split, count in (("train", train), ("valid", valid)):
        rows = []
        for i in range(count):
            shape, color = classes[int(rng.integers(len(classes)))]
            sid = f"{split}-{i:05d}"
            np.save(out / "points" / f"{sid}.npy", _cloud(shape, color, rng))
            rows.append({"id": sid, "pointcloud": f"points/{sid}.npy", "text": f"a {color} {shape}"})
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m one_peace_pointcloud.demo OUT [--train N] [--valid N] [--seed S]``."""
    p = argparse.ArgumentParser(prog="python -m one_peace_pointcloud.demo", description=__doc__.splitlines()[0])
    p.add_argument("out", help="output folder")
    p.add_argument("--train", type=int, default=384, help="training samples (default 384)")
    p.add_argument("--valid", type=int, default=96, help="validation samples (default 96)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    train, valid = make_demo(args.out, args.train, args.valid, args.seed)
    print(f"wrote {train} and {valid}")


if __name__ == "__main__":
    main()
