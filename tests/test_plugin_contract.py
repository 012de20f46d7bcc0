"""The plugin contract (#21): broken hooks named by the conformance suite, plugin records in checkpoints, presentation
hooks, one bad-sample vocabulary, option validation, text padding by mask, and the registry on the ground floor."""

from __future__ import annotations

import ast
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import one_peace
from one_peace.checkpoint import CheckpointError
from one_peace.registry import PluginError, PluginOptionError, get_plugin, register_modality, unregister
from one_peace.testing import check_modality

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ broken variants
def _variant(kind: str) -> type:
    motion = pytest.importorskip("one_peace_motion.plugin")
    base = motion.MotionModality

    class Broken(base):  # type: ignore[misc, valid-type]
        name = f"broken_{kind}"

        if kind == "preprocessor":

            def build_preprocessor(self, config, tokenizer=None):
                def preprocess(item):
                    raise RuntimeError("this preprocessor always fails")

                return preprocess

        if kind == "estimate":

            def estimate_length(self, value, config, preprocess):
                raise OSError("cannot read the header")

        if kind == "position_padding":

            def position_padding(self, batch):
                return torch.zeros_like(batch["padding_mask"], dtype=torch.bool)  # claims nothing is padded

        if kind == "options":

            def validate_options(self, options):
                raise ValueError("patch must be even")  # refuses even its own defaults

        if kind == "host_read":

            def build_adapter(self, config, siblings):
                adapter = super().build_adapter(config, siblings)
                embed = adapter.embed

                def reading(batch):
                    out = embed(batch)
                    if bool(out.tokens.abs().sum() > 0):  # a host read: a device sync per step on accelerators
                        return out
                    return out

                adapter.embed = reading
                return adapter

    Broken.__name__ = f"Broken{kind.title()}"
    return Broken


@pytest.mark.parametrize(
    ("kind", "check", "hook"),
    [
        ("preprocessor", "inputs", "build_preprocessor"),
        ("estimate", "estimate_length", "estimate_length"),
        ("position_padding", "position_padding", "position_padding"),
        ("options", "options", "Options / validate_options"),
        ("host_read", "host_reads", "build_adapter"),
    ],
)
def test_each_broken_hook_fails_the_suite_naming_the_hook(kind, check, hook):
    """The old suite passed all of these: it never called the preprocessor, estimate_length or position_padding, and
    ran the adapter only on the CPU."""
    cls = _variant(kind)
    register_modality(cls)
    try:
        report = check_modality(cls.name, raise_on_failure=False)
    finally:
        unregister(cls.name)
    assert report.results[check].startswith(f"FAILED [{hook}]"), str(report)


def test_an_option_default_of_the_wrong_type_is_refused_naming_the_plugin_and_the_option():
    """It used to surface as a raw torch error naming no plugin, at model build."""
    from dataclasses import dataclass

    from one_peace.plugin import ModalityPlugin, PluginOptions

    @dataclass
    class Opts(PluginOptions):
        patch: int = "10"  # type: ignore[assignment]

    with pytest.raises(
        PluginError, match=r"SensorPlugin.*option 'patch' has default '10', not of its declared type int"
    ):

        class SensorPlugin(ModalityPlugin):
            name = "sensor_typo"
            Options = Opts


def test_option_values_are_validated_naming_the_key_and_the_plugin():
    with pytest.raises(
        PluginOptionError, match=r"modality_options\.image: image_size must be a positive multiple of 16.*'image'"
    ):
        one_peace.build_model("tiny", modalities=("image",), modality_options={"image": {"image_size": 50}})
    with pytest.raises(PluginOptionError, match=r"max_tokens must be >= 1"):
        one_peace.build_model("tiny", modalities=("text",), modality_options={"text": {"max_tokens": -5}})


# ---------------------------------------------------------------------------------------- plugin records
def test_checkpoints_record_each_plugin_and_an_old_record_warns_and_keeps_its_options(tmp_path):
    """A run with default options wrote no entry for the plugin and no version: a release with another default then
    loaded the old checkpoint silently, with other embeddings."""
    pytest.importorskip("one_peace_motion")
    torch.manual_seed(0)
    model = one_peace.build_model("tiny", modalities=("motion",)).eval()
    folder = one_peace.save(model, tmp_path / "ck")
    doc = json.loads((folder / "config.json").read_text())
    record = doc["plugins"]["motion"]
    assert record["distribution"] == "one-peace-motion" and record["version"]
    assert record["options"] == get_plugin("motion").defaults  # every option, defaults included

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_peace.load(folder)  # the same version: silent

    # as saved by an older release whose sequences were standardised by default
    record["version"], record["options"]["standardize"] = "0.0.1", True
    old = tmp_path / "old"
    old.mkdir()
    for f in folder.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    (old / "config.json").write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match=r"saved with one-peace-motion 0\.0\.1; installed: one-peace-motion"):
        loaded = one_peace.load(old, dtype=None)
    assert get_plugin("motion").options(loaded.config)["standardize"] is True  # as recorded, not today's default

    record["options"]["from_the_future"] = 1
    (old / "config.json").write_text(json.dumps(doc))
    refused = pytest.raises(CheckpointError, match=r"option\(s\) \['from_the_future'\] that the installed plugin")
    with refused, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one_peace.load(old)


# ---------------------------------------------------------------------------------- presentation hooks
def test_previews_media_types_and_descriptions_of_a_builtin_and_an_example_plugin(tmp_path):
    from PIL import Image

    cfg = one_peace.model_config("tiny", ["image", "text"], modality_options={"image": {"image_size": 32}})
    image = get_plugin("image")
    path = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 400, 3), dtype=np.uint8)).save(path)
    preview = image.preview(path, cfg, max_size=100)
    assert preview is not None and preview.mime_type == "image/png"
    with Image.open(io.BytesIO(preview.data)) as thumb:
        assert thumb.size[0] == 100 and thumb.size[1] in (12, 13)  # aspect kept, longest side max_size
    assert preview.data_uri().startswith("data:image/png;base64,")
    assert image.media_types().accepts("photo.JPG") and image.media_types().accepts("image/webp")
    assert not image.media_types().accepts("clip.wav")
    desc = image.describe_preprocessing(cfg)
    assert desc["resize"]["size"] == [32, 32] and desc["mean"][0] == pytest.approx(0.48145466)
    json.dumps(desc)
    assert get_plugin("text").preview("a dog", cfg).data == b"a dog"

    motion = pytest.importorskip("one_peace_motion")
    del motion
    mcfg = one_peace.model_config("tiny", ["motion"])
    plugin = get_plugin("motion")
    np.save(tmp_path / "walk.npy", np.random.default_rng(1).normal(size=(120, 6)).astype(np.float32))
    shown = plugin.preview(tmp_path / "walk.npy", mcfg, max_size=64)
    assert shown is not None and shown.mime_type == "image/png" and shown.data[:8] == b"\x89PNG\r\n\x1a\n"
    assert plugin.media_types().accepts("walk.npy")
    assert plugin.describe_preprocessing(mcfg)["frames_per_token"] == 10


# ------------------------------------------------------------------------------------ one vocabulary
def test_one_bad_row_gets_the_same_reason_label_in_training_embed_and_eval(tmp_path):
    """A misspelled field was fatal in training, `_Missing: ...` (a private class) in embed and `DataError: ...` in
    eval."""
    from one_peace.adapters.text import TextTokenizer
    from PIL import Image

    from one_peace import embed as embed_mod
    from one_peace.data import LoaderConfig, MultimodalLoader
    from one_peace.eval import EvalContext
    from one_peace.eval.base import embed_rows

    rows = []
    for i in range(6):
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"id": f"r{i}", "image": f"{i}.png", "caption": "a grey square"})
    rows[2] = {"id": "r2", "imgae": "2.png", "caption": "a grey square"}  # the misspelled field
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    tok = TextTokenizer.train(["a grey square"] * 4, vocab_size=280)
    cfg = one_peace.model_config("tiny", ("text", "image"), modality_options={"image": {"image_size": 32}})
    cfg.modality_options["text"] = {"vocab_size": tok.vocab_size}
    model = one_peace.build_model(cfg).eval()
    model.tokenizer = tok

    loader = MultimodalLoader(
        manifest,
        fields={"image": "image", "text": "caption"},
        model_config=cfg,
        tokenizer=tok,
        config=LoaderConfig(batch_size=3, shuffle_window=0, max_bad_fraction=0.5),
    )
    list(loader)
    assert dict(loader.bad_reasons) == {"missing field": 1}

    checkpoint = one_peace.save(model, tmp_path / "ck")
    out = tmp_path / "emb"
    embed_mod.embed(
        embed_mod.EmbedConfig(
            checkpoint=str(checkpoint), data=str(manifest), modality="image", out=str(out), progress=False
        )
    )
    (bad,) = [json.loads(x) for x in (out / "bad.jsonl").read_text().splitlines()]
    info = json.loads((out / "info.json").read_text())
    assert info["plugin"]["distribution"] == "one-peace" and info["plugin"]["options"]["image_size"] == 32
    assert info["preprocessing"]["description"]["resize"]["size"] == [32, 32]

    ctx = EvalContext(model, [json.loads(line) for line in manifest.read_text().splitlines()], tmp_path)
    _, ok, eval_bad = embed_rows(ctx, "image")
    assert int(ok.sum()) == 5
    for record in (bad, eval_bad[0]):
        assert record["id"] == "r2" and record["reason"] == "missing field", record
        assert record["detail"] == "MissingField: missing field 'image'"


# ---------------------------------------------------------------------------------- text padding by mask
def test_an_embedding_does_not_depend_on_batch_padding_with_another_pad_id():
    """Collation, ``padding`` and ``position_padding`` used the constant 1: with ``pad_id=0`` an embedding depended
    on its batch-mates (max diff 0.43)."""
    report = check_modality("text", modality_options={"text": {"pad_id": 0}}, raise_on_failure=False)
    assert report.results["padding"] == "ok" and report.results["position_padding"] == "ok", str(report)


# ------------------------------------------------------------------------------------------- ground floor
def test_the_registry_imports_nothing_from_the_upper_floors():
    """Every import of one_peace/registry.py, lazy ones (inside functions, under TYPE_CHECKING) included."""
    tree = ast.parse((ROOT / "one_peace" / "registry.py").read_text())
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported.append("." * node.level + (node.module or ""))
    assert "one_peace.media" in imported and "importlib" in imported  # the walk sees the imports
    upper = ("one_peace.data", "one_peace.train", "one_peace.retrieval", "one_peace.serve")
    relative = [m for m in imported if m.startswith(".")]
    assert not relative, f"relative imports hide their floor: {relative}"
    assert not [m for m in imported if m.startswith(upper)], imported


def test_cli_help_lists_every_registered_modality(capsys):
    from one_peace.search import main

    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    listed = help_text.split("registered modalities: ")[1].split(";")[0].split(", ")
    assert listed == sorted(one_peace.list_modalities()) and "pointcloud" in listed
