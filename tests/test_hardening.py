"""Bad input never stops a long job, never hangs, never reads outside its folder (issue #23).

Each test reproduces a case a user hit: it failed on the code before the change and passes after it.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import one_peace


def bomb_png(path: Path, side: int = 20_000) -> Path:
    """A 70-byte PNG whose header claims ``side x side`` pixels: PIL refuses it as a decompression bomb at open."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    header = bytearray(raw[16:29])
    header[0:8] = struct.pack(">II", side, side)
    raw[16:29] = header
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(header)))
    path.write_bytes(bytes(raw))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny text + image model, its saved folder and a manifest of 6 rows: row 2 is an image over PIL's pixel
    limit, row 4 names a list of paths as its image."""
    from one_peace.adapters.text import TextTokenizer
    from PIL import Image

    root = tmp_path_factory.mktemp("hard")
    tok = TextTokenizer.train(["a grey square", "a red circle"] * 4, vocab_size=280)
    torch.manual_seed(0)
    cfg = one_peace.model_config("tiny", ("text", "image"), layer_scale_init=1.0)
    cfg.modality_options = {"text": {"vocab_size": tok.vocab_size}, "image": {"image_size": 32}}
    model = one_peace.build_model(cfg).eval()
    model.tokenizer = tok
    checkpoint = one_peace.save(model, root / "ck")
    rows = []
    for i in range(6):
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"id": f"r{i}", "image": f"{i}.png", "caption": "a grey square"})
    bomb_png(root / "bomb.png")
    rows[2]["image"] = "bomb.png"
    rows[4]["image"] = ["0.png", "1.png"]
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "model": model, "config": cfg, "tokenizer": tok, "checkpoint": checkpoint, "rows": rows}


# ------------------------------------------------------------------------- one bad row, every long job
@pytest.mark.parametrize("workers", [0, 1])
def test_an_oversized_image_and_a_list_as_path_are_skipped_in_training(tiny, workers):
    """Both stopped training mid-epoch with a raw error (DecompressionBombError, TypeError)."""
    from one_peace.data import LoaderConfig, MultimodalLoader

    loader = MultimodalLoader(
        tiny["root"] / "m.jsonl",
        fields={"image": "image", "text": "caption"},
        model_config=tiny["config"],
        tokenizer=tiny["tokenizer"],
        config=LoaderConfig(batch_size=2, shuffle_window=0, max_bad_fraction=0.5, num_workers=workers),
    )
    ids = [i for b in loader for i, ok in zip(b["ids"], b["valid"].tolist()) if ok]
    assert sorted(ids) == ["r0", "r1", "r3", "r5"]
    assert dict(loader.bad_reasons) == {"too large image": 1, "invalid value": 1}


def test_embed_skips_them_and_its_resume_goes_past_them(tiny, tmp_path):
    from one_peace import embed as embed_mod

    cfg = embed_mod.EmbedConfig(
        checkpoint=str(tiny["checkpoint"]),
        data=str(tiny["root"] / "m.jsonl"),
        modality="image",
        out=str(tmp_path / "e"),
        progress=False,
        workers=0,
    )
    info = embed_mod.embed(cfg)
    assert info["count"] == 4 and info["bad"] == 2
    bad = {b["id"]: b for b in map(json.loads, (tmp_path / "e" / "bad.jsonl").read_text().splitlines())}
    assert bad["r2"]["reason"] == "too large image" and "400,000,000 pixels" in bad["r2"]["detail"]
    assert bad["r4"]["reason"] == "invalid value" and "a list of 2" in bad["r4"]["detail"]
    again = embed_mod.embed(embed_mod.EmbedConfig(**{**cfg.__dict__, "mode": "resume"}))
    assert again["count"] == 4


def test_eval_counts_them_as_bad_rows(tiny):
    from one_peace.eval import EvalContext
    from one_peace.eval.base import embed_rows

    ctx = EvalContext(tiny["model"], tiny["rows"], tiny["root"])
    _, ok, bad = embed_rows(ctx, "image")
    assert ok.tolist() == [True, True, False, True, False, True]
    assert [b["reason"] for b in bad] == ["too large image", "invalid value"]


def test_encode_names_the_input_and_what_was_expected(tiny):
    from one_peace.errors import DataError

    model = tiny["model"]
    with pytest.raises(DataError, match=r"image input 1: .*400,000,000 pixels.*MAX_IMAGE_PIXELS"):
        model.encode("image", [tiny["root"] / "0.png", tiny["root"] / "bomb.png"])
    with pytest.raises(DataError, match=r"image input 0: an image is one path, bytes, PIL image or array; got a list"):
        model.encode("image", [[tiny["root"] / "0.png", tiny["root"] / "1.png"]])


def test_search_answers_with_one_line(tiny, tmp_path, capsys):
    from one_peace import embed as embed_mod
    from one_peace.search import main

    folder = tmp_path / "e"
    embed_mod.embed(
        embed_mod.EmbedConfig(
            checkpoint=str(tiny["checkpoint"]),
            data=str(tiny["root"] / "m.jsonl"),
            modality="image",
            out=str(folder),
            progress=False,
            workers=0,
        )
    )
    with pytest.raises(SystemExit, match=r"^error: image input 0: .*400,000,000 pixels"):
        main([f"index={folder}", f"query.image={tiny['root'] / 'bomb.png'}"])
    with pytest.raises(SystemExit, match=r"^error: image input 0: an image is one path.*got a list of 2"):
        main([f"index={folder}", f"query.image=[{tiny['root'] / '0.png'},{tiny['root'] / '1.png'}]"])


# ------------------------------------------------------------------------------ the data a resume reads
def test_resuming_over_a_same_size_edit_is_refused_naming_the_file_or_starts_a_new_epoch(tmp_path):
    """The identity hashed the first and last KiB and the size: a one-character edit in the middle resumed."""
    from one_peace.adapters.text import TextTokenizer
    from one_peace.data import LoaderConfig, MultimodalLoader

    cfg = one_peace.model_config("tiny", ("text",))
    tok = TextTokenizer.train(["a red square", "a blue circle"] * 4, vocab_size=280)
    manifest = tmp_path / "train.jsonl"
    rows = [{"id": f"r{i:03d}", "text": "a red square " + "x" * 40} for i in range(200)]  # > 2 KiB: a middle exists
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def loader(allow: bool = False) -> MultimodalLoader:
        lc = LoaderConfig(batch_size=4, shuffle_window=0, allow_changed=allow)
        return MultimodalLoader(manifest, fields={"text": "text"}, model_config=cfg, tokenizer=tok, config=lc)

    first = loader()
    next(iter(first))
    state = first.state_dict()
    first.close()
    text = manifest.read_text()
    middle = text.index('"r100"')
    manifest.write_text(text[:middle] + '"r1X0"' + text[middle + 6 :])  # the same size, one character changed
    assert manifest.stat().st_size == len(text)
    with pytest.raises(ValueError, match=r"train\.jsonl: same size \([\d,]+ bytes\), other content.*allow_changed"):
        loader().load_state_dict(state)
    allowed = loader(allow=True)
    allowed.load_state_dict(state)
    assert allowed.epoch == state["epoch"] + 1 and allowed.position == 0
    allowed.close()
