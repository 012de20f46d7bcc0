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


def png_claiming(width: int, height: int) -> bytes:
    """A 70-byte PNG whose header claims ``width x height`` pixels (nothing behind it is that large)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    header = bytearray(raw[16:29])
    header[0:8] = struct.pack(">II", width, height)
    raw[16:29] = header
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(header)))
    return bytes(raw)


def bomb_png(path: Path, side: int = 20_000) -> Path:
    """A PNG claiming ``side x side`` pixels: PIL refuses it as a decompression bomb at open."""
    path.write_bytes(png_claiming(side, side))
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


# ------------------------------------------------------------------------------------- crafted checkpoints
def _variant(tiny, tmp_path: Path, edit=None, shard: bool = False) -> Path:
    """A copy of the tiny checkpoint folder, optionally as one shard + index, with ``edit(doc)`` on config.json."""
    import shutil

    folder = tmp_path / "v"
    shutil.copytree(tiny["checkpoint"], folder)
    if shard:
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        from safetensors import safe_open

        with safe_open(str(folder / "model-00001-of-00001.safetensors"), framework="pt") as fh:
            keys = list(fh.keys())
        index = {"metadata": {}, "weight_map": dict.fromkeys(keys, "model-00001-of-00001.safetensors")}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    if edit is not None:
        doc = json.loads((folder / "config.json").read_text())
        edit(doc)
        (folder / "config.json").write_text(json.dumps(doc))
    return folder


def _set(path: str, value):
    def edit(doc):
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[key]
        node[last] = value

    return edit


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("model.layer_scale_init", "abc", r"'layer_scale_init': expected float, got 'abc'"),
        ("model.official_padding", "yes", r"'official_padding': expected bool, got 'yes'"),
        ("model.drop_path_rate", float("nan"), r"'drop_path_rate' must be a finite number"),
        ("model.modalities", ["text", "image", "smell"], r"unknown modality 'smell'; registered modalities: .*image"),
        ("model.modality_options.text.max_tokens", "70", r"max_tokens: expected int .*got '70'"),
        ("model.modality_options.text.max_tokens", -5, r"max_tokens must be >= 1, got -5"),
        ("model.modality_options.image.image_size", 2048, r"image_size must be at most 1024, got 2048"),
        ("model.layers", 10**6, r"at least [\d,]+ parameters \(1000000 layers.*the weights hold"),
        ("model.embed_dim", 4096, r"at least [\d,]+ parameters .*width 4096"),
        ("tokenizer.max_tokens", -5, r"\(tokenizer\): max_tokens must be an integer >= 1, got -5"),
        ("tokenizer.max_tokens", "70", r"\(tokenizer\): max_tokens must be an integer >= 1, got '70'"),
        ("tokenizer.files", ["/etc/passwd"], r"\(tokenizer\): '/etc/passwd' is not a file of the folder"),
        ("tokenizer", ["tokenizer.json"], r"'tokenizer' must be an object"),
    ],
)
def test_a_bad_config_json_is_refused_before_building_naming_file_and_key(tiny, tmp_path, path, value, message):
    """Raw TypeError/KeyError naming no file, a 40-billion-parameter build from a 3 kB edit, an image_size that
    allocates gigabytes, a tokenizer limit of -5 that silently dropped the last 5 tokens of every text."""
    from one_peace.checkpoint import CheckpointError

    folder = _variant(tiny, tmp_path, _set(path, value))
    with pytest.raises(CheckpointError, match=rf"{folder}.*config\.json.*{message}"):
        one_peace.load(folder)


def _fifo(folder: Path) -> str:
    import os

    os.mkfifo(folder / "pipe.safetensors")
    return "pipe.safetensors"


@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        ("absolute", r"'/.*' is not a file of the folder"),
        ("escape", r"'\.\./.*' is not a file of the folder"),
        ("fifo", r"pipe\.safetensors is not a regular file \(a FIFO"),
        ("link", r"is a link to .*outside the folder"),
        ("missing", r"'weight_map' must be a non-empty object"),
        ("list", r"'weight_map' must be a non-empty object .* got list"),
        ("number", r"weight_map values must be file names, got 3"),
        ("invalid", r"invalid JSON \(safetensors index\)"),
    ],
)
def test_the_safetensors_index_never_leads_out_of_the_folder_or_hangs(tiny, tmp_path, weight_map, message):
    """An absolute weight_map entry loaded weights from anywhere, a FIFO hung load for ever, a missing or list
    weight_map or invalid JSON gave KeyError/TypeError/JSONDecodeError naming no file."""
    from one_peace.checkpoint import CheckpointError

    folder = _variant(tiny, tmp_path, shard=True)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    outside = tmp_path / "elsewhere.safetensors"
    import shutil

    shutil.copyfile(folder / "model-00001-of-00001.safetensors", outside)
    if weight_map == "absolute":
        index["weight_map"][first] = str(outside)
    elif weight_map == "escape":
        index["weight_map"][first] = "../elsewhere.safetensors"
    elif weight_map == "fifo":
        index["weight_map"][first] = _fifo(folder)
    elif weight_map == "link":
        (folder / "linked.safetensors").symlink_to(outside)
        index["weight_map"][first] = "linked.safetensors"
    elif weight_map == "missing":
        del index["weight_map"]
    elif weight_map == "list":
        index["weight_map"] = list(index["weight_map"])
    elif weight_map == "number":
        index["weight_map"][first] = 3
    text = json.dumps(index) if weight_map != "invalid" else json.dumps(index)[:-5]
    index_path.write_text(text)
    with pytest.raises(CheckpointError, match=rf"{index_path}.*{message}|{message}"):
        one_peace.load(folder)


def test_a_hub_snapshot_may_link_into_its_blobs(tiny, tmp_path):
    """The Hugging Face cache stores files in blobs/ and links them from snapshots/<revision>/: that stays loadable."""
    import shutil

    blobs, snapshot = tmp_path / "models--x" / "blobs", tmp_path / "models--x" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in Path(tiny["checkpoint"]).iterdir():
        shutil.copyfile(f, blobs / f"sha-{f.name}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"sha-{f.name}")
    model = one_peace.load(snapshot)
    assert model.config.embed_dim == tiny["config"].embed_dim


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_integer_or_bool_weights_are_refused_naming_the_key(tiny, tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    from one_peace.checkpoint import CheckpointError

    folder = _variant(tiny, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = torch.ones_like(state[key], dtype=dtype)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"key '{key}' holds {dtype}.*expects floating-point"):
        one_peace.load(folder)


def test_a_pickle_of_shared_lists_is_refused_at_once(tmp_path):
    """A 2 kB .pt of nested lists sharing references expanded exponentially in the safe loader (2.5 GB in 45 s)."""
    import subprocess
    import sys

    nested: list = [1]
    for _ in range(60):
        nested = [nested, nested]
    path = tmp_path / "shared.pt"
    torch.save({"model": {"encoder_wrapper.x": torch.zeros(1)}, "cfg": {"model": nested}}, path)
    assert path.stat().st_size < 4096
    for code in (
        "from one_peace.checkpoint.safe_pickle import safe_torch_load as f; f(p)",
        "from one_peace.convert import main; raise SystemExit(main([p, p + '.out']))",
    ):
        got = subprocess.run(
            [sys.executable, "-c", f"import sys; p = sys.argv[1]; {code}", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert got.returncode != 0
        assert "expand to more than 1,000,000 values (shared references)" in got.stderr, got.stderr[-2000:]


# ----------------------------------------------------------------------------------------------- encode inputs
@pytest.fixture(scope="module")
def audio_model():
    from one_peace.adapters.text import TextTokenizer

    tok = TextTokenizer.train(["a red square", "a blue circle"] * 4, vocab_size=280)
    cfg = one_peace.model_config("tiny", ("text", "audio"))
    cfg.modality_options = {"text": {"vocab_size": tok.vocab_size}}
    model = one_peace.build_model(cfg).eval()
    model.tokenizer = tok
    return model


@pytest.mark.parametrize(
    ("modality", "item", "message"),
    [
        ("audio", (np.zeros(16000, np.float32), 0), r"sample rate must be a positive integer \(Hz\), got 0"),
        ("audio", (np.zeros(16000, np.float32), 44.1), r"sample rate must be a positive integer \(Hz\), got 44\.1"),
        ("audio", np.zeros((2, 2, 16000), np.float32), r"\(samples,\) or \(samples, channels\), got shape \(2, 2"),
        ("audio", (["a", "b"], 16000), r"waveform must be a numeric array"),
        ("text", "abc \ud800 def", r"character 4 is a lone surrogate"),
    ],
)
def test_encode_refuses_bad_values_naming_the_input(audio_model, modality, item, message):
    """Raw ValueError('Sample rate should be over 0'), RuntimeError(expand ...) and TypeError(TextInputSequence must
    be str) before."""
    from one_peace.errors import InvalidValue

    with pytest.raises(InvalidValue, match=rf"{modality} input 1: .*{message}"):
        audio_model.encode(modality, ["fine" if modality == "text" else np.zeros(16000, np.float32), item])


def test_channels_first_audio_is_read_as_channels(audio_model):
    """torchaudio's (channels, samples) layout was averaged over samples: one value per channel, then repeated."""
    wave = np.sin(np.linspace(0, 400, 32000)).astype(np.float32)
    first = audio_model.encode("audio", [(torch.from_numpy(wave)[None], 16000)])
    last = audio_model.encode("audio", [(wave[:, None], 16000)])
    torch.testing.assert_close(first, last)


# ------------------------------------------------------------------------------------------------- manifests
@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_a_byte_order_mark_is_not_part_of_the_first_field_or_row(tmp_path, fmt):
    """Excel's "CSV UTF-8" starts the file with a BOM: the TSV header's first field was '\\ufeffid' (so no 'id'),
    and a JSONL first row did not parse."""
    from one_peace.data.manifest import iter_manifest
    from one_peace.data.rows import ManifestRows

    path = tmp_path / f"m.{fmt}"
    if fmt == "tsv":
        path.write_bytes(b"\xef\xbb\xbfid\ttext\nr0\ta red square\nr1\ta blue circle\n")
    else:
        path.write_bytes(b'\xef\xbb\xbf{"id": "r0", "text": "a red square"}\n{"id": "r1", "text": "a blue circle"}\n')
    streamed = [row for _, row in iter_manifest(path)]
    indexed = ManifestRows(path)
    assert streamed == [indexed[i][1] for i in range(len(indexed))]
    assert streamed == [{"id": "r0", "text": "a red square"}, {"id": "r1", "text": "a blue circle"}]


# ---------------------------------------------------------------------------------------------- runs
def test_a_resume_without_a_checkpoint_drops_the_dead_runs_metrics(tmp_path):
    """A run killed before its first checkpoint left steps 1-3 in metrics.jsonl; the resumed run (from step 0)
    logged them again: each step twice."""
    from types import SimpleNamespace

    from one_peace.train.checkpointing import resume_checkpoint

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    trainer = SimpleNamespace(out=tmp_path, rank=0, world=1, step=0)
    assert resume_checkpoint(trainer) is False
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_a_refused_second_run_leaves_the_live_runs_config_alone(tmp_path):
    """Hydra wrote .hydra/config.yaml before the run found the folder locked: the live run's record was replaced."""
    import subprocess
    import sys

    from one_peace.runner.outputs import lock_output_dir, record_config

    out = tmp_path / "run"
    live = lock_output_dir(out)  # a live run holds the folder
    try:
        record_config(out, {"seed": 1}, ["seed=1"])
        before = (out / ".hydra" / "config.yaml").read_text()
        got = subprocess.run(
            [sys.executable, "-m", "one_peace.run", f"output_dir={out}", "seed=7"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        live.close()
    assert got.returncode != 0 and f"output_dir={out} is in use by another run" in got.stderr, got.stderr[-2000:]
    assert (out / ".hydra" / "config.yaml").read_text() == before == "seed: 1\n"


def _run_cli(tmp_path: Path, *args: str) -> str:
    import subprocess
    import sys

    got = subprocess.run(
        [sys.executable, "-m", "one_peace.run", "recipe=vl_contrastive", f"output_dir={tmp_path / 'o'}", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert got.returncode != 0
    return got.stderr.strip().splitlines()[-1]


def test_run_level_mistakes_get_one_line_naming_the_key_before_any_work(tmp_path, tiny):
    """A missing data.train read 'shard ... not found'; output_dir a file, a Hydra traceback; a prompts file that is
    not JSON, a raw JSONDecodeError after training; data.image_size=50 with a checkpoint, refused after loading it."""
    (tmp_path / "afile").write_text("")
    (tmp_path / "prompts.json").write_text("not json")
    (tmp_path / "t.jsonl").write_text('{"id": "a", "text": "x"}\n')
    cases = [
        (
            (f"data.train={tmp_path / 'nope.jsonl'}", f"data.valid={tmp_path / 't.jsonl'}"),
            r"^error: data\.train=.*nope\.jsonl: not found",
        ),
        ((f"output_dir={tmp_path / 'afile' / 'run'}",), r"^error: output_dir=.*afile is a file, not a folder"),
        (
            ("eval.task=zero_shot", f"eval.prompts={tmp_path / 'prompts.json'}"),
            r"^error: eval\.prompts: .*prompts\.json is not valid JSON",
        ),
        (
            (f"model.pretrained={tiny['checkpoint']}", "data.image_size=50"),
            r"^error: data\.image_size=50: .*multiple of 16",
        ),
        (("trainer.device=tpu",), r"^error: trainer\.device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ]
    import re

    for args, message in cases:
        line = _run_cli(tmp_path, *args)
        assert re.search(message, line), (args, line)
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_embed_refuses_a_file_as_out_and_an_unknown_device_before_loading(tmp_path, tiny):
    from one_peace import embed as embed_mod

    (tmp_path / "afile").write_text("")
    base = dict(
        checkpoint=str(tiny["checkpoint"]), data=str(tiny["root"] / "m.jsonl"), modality="image", progress=False
    )
    with pytest.raises(ValueError, match=r"^out: .*afile is a file; embed writes a folder"):
        embed_mod.embed(embed_mod.EmbedConfig(out=str(tmp_path / "afile"), **base))
    with pytest.raises(ValueError, match=r"^device must be auto, cpu, cuda or cuda:N, got 'tpu'"):
        embed_mod.embed(embed_mod.EmbedConfig(out=str(tmp_path / "e"), device="tpu", **base))


# ------------------------------------------------------------------------------------------------- shard CLI
def test_the_shard_cli_skips_a_malformed_line_and_names_a_media_field_it_does_not_store(tmp_path, capsys):
    """A malformed line stopped the CLI with a partial .tar left behind; a media field named 'img' was stored as
    its file name, so the shards held no images, without a word."""
    from PIL import Image

    from one_peace.data.shards import iter_rows, main

    lines = []
    for i in range(5):
        Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"id": f"r{i}", "img": f"{i}.png", "text": "a square"}))
    lines.insert(2, '{"id": "broken", "img": ')
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    assert main([str(tmp_path / "m.jsonl"), str(tmp_path / "shards"), "--shard-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "field 'img' holds image file names ('0.png') but is stored as text" in printed
    assert "--fields image=img" in printed and "skipped 1 line(s)" in printed and "m.jsonl:3" in printed
    index = json.loads((tmp_path / "shards" / "shards.json").read_text())
    assert index["counts"] == {"shard-000000.tar": 2, "shard-000001.tar": 2, "shard-000002.tar": 1}
    assert index["skipped_count"] == 1
    assert [row["id"] for _, row in iter_rows(tmp_path / "shards")] == [f"r{i}" for i in range(5)]
    assert main([str(tmp_path / "m.jsonl"), str(tmp_path / "mapped"), "--fields", "image=img"]) == 0
    assert "stored as text" not in capsys.readouterr().out
    assert all(isinstance(row["img"], bytes) for _, row in iter_rows(tmp_path / "mapped"))


def test_an_interrupted_shard_run_leaves_no_partial_tar(tmp_path, monkeypatch):
    from one_peace.data import shards as shards_mod

    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "text": "x"}) + "\n" for i in range(5)))
    real, calls = shards_mod.json.dumps, []

    def dumps(obj, *a, **kw):
        calls.append(1)
        if len(calls) == 4:  # the fourth sample's header: mid-way through the second shard
            raise KeyboardInterrupt
        return real(obj, *a, **kw)

    monkeypatch.setattr(shards_mod.json, "dumps", dumps)
    with pytest.raises(KeyboardInterrupt):
        shards_mod.write_shards(tmp_path / "m.jsonl", tmp_path / "out", shard_size=2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["shard-000000.tar"]  # complete, nothing partial
