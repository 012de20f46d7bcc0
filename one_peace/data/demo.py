"""Embedded demo data: ``python -m one_peace.data.demo OUT_DIR`` writes a small multimodal dataset in seconds.

Images are rendered shapes with captions ("a red circle on a white background"), audio clips are synthesised
tones and chirps with descriptions ("a high tone", "a rising chirp"), and videos are short mp4 clips of a shape
moving across the frame. ``train.jsonl`` and ``valid.jsonl`` manifests reference the files by relative path.
No download; everything is generated from a seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
SOUNDS = {
    "low tone": ("tone", 220.0, 220.0),
    "high tone": ("tone", 1760.0, 1760.0),
    "rising chirp": ("chirp", 300.0, 3000.0),
    "falling chirp": ("chirp", 3000.0, 300.0),
}
SPEEDS = {"slowly": 0.5, "quickly": 1.5}


def _draw(shape: str, color: tuple[int, int, int], bg: tuple[int, int, int], size: int, cx: float, cy: float, r: float):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return img


def _audio(kind: str, f0: float, f1: float, seconds: float, rng: np.random.Generator, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    freq = f0 + (f1 - f0) * t / seconds
    phase = 2 * np.pi * np.cumsum(freq) / sr
    wave = 0.4 * np.sin(phase) + 0.01 * rng.standard_normal(t.size)
    return wave.astype(np.float32)


def _video(path: Path, shape: str, color: tuple[int, int, int], speed: float, size: int = 64, frames: int = 12) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            x = (0.2 + 0.6 * ((i * speed / frames) % 1.0)) * size
            img = _draw(shape, color, BACKGROUNDS["white"], size, x, size / 2, size / 6)
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


#: audio-visual demo: a picture colour and a sound pitch; the scene is decided by the pair only (neither alone)
AV_COLOURS = {"red": (210, 40, 40), "blue": (40, 70, 210)}
AV_PITCHES = {"low": 220.0, "high": 880.0}


def av_scene(colour: str, pitch: str) -> str:
    """``harmony`` for red+low and blue+high, ``clash`` for the other two pairs (an XOR: each half alone says
    nothing about the scene)."""
    return "harmony" if (colour == "red") == (pitch == "low") else "clash"


def _av_clip(path: Path, colour: tuple[int, int, int], freq: float, rng: np.random.Generator, size: int = 32) -> None:
    """A 1-s mp4 with 8 frames (a square of ``colour`` moving over grey noise) and an AAC sound track (``freq`` Hz
    with noise), both in the one file."""
    import av

    rate, fps = 16000, 8
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=rate)
        audio.layout = "mono"
        x0, y0 = rng.integers(0, size // 2, size=2)
        for i in range(fps):
            img = rng.integers(90, 140, size=(size, size, 3), dtype=np.uint8)
            x = (x0 + i) % (size // 2)
            img[y0 : y0 + size // 2, x : x + size // 2] = colour
            for packet in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        t = np.arange(rate) / rate
        wave = (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
        step = audio.frame_size or 1024
        for start in range(0, wave.size, step):
            frame = av.AudioFrame.from_ndarray(wave[None, start : start + step], format="fltp", layout="mono")
            frame.sample_rate = rate
            for packet in audio.encode(frame):
                container.mux(packet)
        for stream in (video, audio):
            for packet in stream.encode():
                container.mux(packet)


def make_av_dataset(root: str | Path, n_train: int = 256, n_valid: int = 64, seed: int = 0) -> dict[str, Path]:
    """The audio-visual demo under ``root``: rows ``id``, ``clip`` (one mp4 with picture and sound), ``colour``,
    ``pitch`` and ``scene`` (:func:`av_scene`); returns ``{"train": manifest, "valid": manifest}``."""
    from one_peace.extras import require

    require("video", "av", feature="the audio-visual demo clips")
    root = Path(root)
    (root / "av").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("valid", n_valid)):
        path = root / f"{split}.jsonl"
        with open(path, "w") as fh:
            for i in range(n):
                sid = f"{split}{i:05d}"
                colour = list(AV_COLOURS)[i % 2]
                pitch = list(AV_PITCHES)[(i // 2) % 2] if split == "valid" else list(AV_PITCHES)[rng.integers(2)]
                _av_clip(root / "av" / f"{sid}.mp4", AV_COLOURS[colour], AV_PITCHES[pitch], rng)
                row = {"id": sid, "clip": f"av/{sid}.mp4", "colour": colour, "pitch": pitch}
                fh.write(json.dumps({**row, "scene": av_scene(colour, pitch)}) + "\n")
        out[split] = path
    return out


#: the languages of the numbers demo besides English (number words from num2words)
NUMBER_LANGUAGES = ("de", "fr", "es", "it", "nl")


def number_words(lang: str) -> list[str]:
    """The words for 0-9 in ``lang`` (from num2words, the ``languages`` extra)."""
    from one_peace.extras import require

    require("languages", "num2words", feature="the number words of the languages demo")
    from num2words import num2words

    return [str(num2words(n, lang=lang)) for n in range(10)]


def make_numbers_dataset(
    root: str | Path,
    n_train: int = 2000,
    n_valid: int = 1000,
    seed: int = 0,
    image_size: int = 64,
    languages: tuple[str, ...] = NUMBER_LANGUAGES,
) -> dict[str, Path]:
    """Digits 0-9 drawn large at random sizes, places and colours, named by their English number word, and parallel
    number words in ``languages`` (the ``add_language`` recipe's data).

    Writes ``train.jsonl`` / ``valid.jsonl`` (``id``, ``image``, ``label`` 0-9, ``text`` the English word),
    ``parallel.jsonl`` (``text`` a word in any language, English included, ``english`` its English word, ``lang``)
    and ``prompts/<lang>.json`` (English word -> [the word in ``lang``]: zero-shot prompts whose labels are the rows'
    ``text``); returns their paths.
    """
    from PIL import Image, ImageDraw, ImageFont

    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "prompts").mkdir(exist_ok=True)
    words = {lang: number_words(lang) for lang in ("en", *languages)}
    rng = np.random.default_rng(seed)
    fonts = {size: ImageFont.load_default(size=size) for size in range(int(image_size * 0.7), int(image_size * 0.95))}
    out: dict[str, Path] = {}
    for split, n in (("train", n_train), ("valid", n_valid)):
        path = root / f"{split}.jsonl"
        with open(path, "w") as fh:
            for i in range(n):
                sid, digit = f"{split}{i:05d}", int(rng.integers(10))
                fg = rng.integers(0, 256, size=3)
                bg = (fg + rng.integers(90, 166, size=3)) % 256  # a colour far enough from the digit's
                img = Image.new("RGB", (image_size, image_size), tuple(int(c) for c in bg))
                font = fonts[int(rng.integers(min(fonts), max(fonts) + 1))]
                box = ImageDraw.Draw(img).textbbox((0, 0), str(digit), font=font)
                w, h = int(box[2] - box[0]), int(box[3] - box[1])
                x = int(rng.integers(0, max(1, image_size - w))) - int(box[0])
                y = int(rng.integers(0, max(1, image_size - h))) - int(box[1])
                ImageDraw.Draw(img).text((x, y), str(digit), fill=tuple(int(c) for c in fg), font=font)
                img.save(root / "img" / f"{sid}.png")
                row = {"id": sid, "image": f"img/{sid}.png", "label": digit, "text": words["en"][digit]}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        out[split] = path
    with open(root / "parallel.jsonl", "w") as fh:
        for lang, names in words.items():
            for digit, word in enumerate(names):
                row = {"text": word, "english": words["en"][digit], "lang": lang, "label": digit}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    out["parallel"] = root / "parallel.jsonl"
    for lang, names in words.items():
        prompts = {en: [word] for en, word in zip(words["en"], names)}
        (root / "prompts" / f"{lang}.json").write_text(json.dumps(prompts, ensure_ascii=False) + "\n")
    return out


def make_demo_dataset(
    root: str | Path, n_train: int = 256, n_valid: int = 64, seed: int = 0, image_size: int = 64, video: bool = True
) -> dict[str, Path]:
    """Generate the demo dataset under ``root``; returns ``{"train": manifest, "valid": manifest}``.

    Each row has ``id``, ``image`` + ``caption`` (shape/colour/background), ``box`` (the shape's bounding box
    in pixels) with ``width``/``height``, ``audio`` + ``sound`` (tone/chirp),
    ``video`` + ``motion`` (mp4 of a moving shape, when ``video``), and ``text`` = the caption.
    """
    import soundfile as sf

    if video:
        from one_peace.extras import require

        require("video", "av", feature="the demo videos (pass video=False or --no-video to skip them)")
    root = Path(root)
    for sub in ("img", "wav", "vid"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("valid", n_valid)):
        path = root / f"{split}.jsonl"
        with open(path, "w") as fh:
            for i in range(n):
                sid = f"{split}{i:05d}"
                shape = SHAPES[rng.integers(len(SHAPES))]
                cname = list(COLORS)[rng.integers(len(COLORS))]
                bname = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
                r = image_size * rng.uniform(0.18, 0.32)
                cx, cy = rng.uniform(r, image_size - r, size=2)
                _draw(shape, COLORS[cname], BACKGROUNDS[bname], image_size, cx, cy, r).save(root / "img" / f"{sid}.png")
                sound = list(SOUNDS)[rng.integers(len(SOUNDS))]
                kind, f0, f1 = SOUNDS[sound]
                seconds = float(rng.uniform(0.6, 2.0))
                sf.write(root / "wav" / f"{sid}.wav", _audio(kind, f0, f1, seconds, rng), 16000)
                caption = f"a {cname} {shape} on a {bname} background"
                row = {
                    "id": sid,
                    "image": f"img/{sid}.png",
                    "caption": caption,
                    "text": caption,
                    "audio": f"wav/{sid}.wav",
                    "sound": f"a {sound}",
                    "box": [round(cx - r, 1), round(cy - r, 1), round(cx + r, 1), round(cy + r, 1)],
                    "width": image_size,
                    "height": image_size,
                }
                if video:
                    speed = list(SPEEDS)[rng.integers(len(SPEEDS))]
                    _video(root / "vid" / f"{sid}.mp4", shape, COLORS[cname], SPEEDS[speed])
                    row.update(video=f"vid/{sid}.mp4", motion=f"a {cname} {shape} moving {speed}")
                fh.write(json.dumps(row) + "\n")
        out[split] = path
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m one_peace.data.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--valid", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-video", action="store_true")
    p.add_argument(
        "--kind",
        choices=("shapes", "av", "numbers"),
        default="shapes",
        help="shapes (the default demo), av (audio-visual clips, the av_fusion recipe's) or numbers (digits and "
        "number words in six languages, the add_language recipe's; the languages extra)",
    )
    args = p.parse_args(argv)
    if args.kind == "av":
        paths = make_av_dataset(args.out_dir, args.train, args.valid, args.seed)
    elif args.kind == "numbers":
        paths = make_numbers_dataset(args.out_dir, args.train, args.valid, args.seed)
    else:
        paths = make_demo_dataset(args.out_dir, args.train, args.valid, args.seed, video=not args.no_video)
    print(f"wrote {paths['train']} ({args.train} rows) and {paths['valid']} ({args.valid} rows)")
    if "parallel" in paths:
        prompts = Path(args.out_dir) / "prompts"
        print(f"and {paths['parallel']} (parallel number words) with zero-shot prompts in {prompts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["make_av_dataset", "make_demo_dataset", "make_numbers_dataset"]
