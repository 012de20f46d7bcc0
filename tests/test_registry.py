"""The modality registry: built-ins, decorator errors, entry-point plugins (working and broken)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import one_peace
from one_peace import registry
from one_peace.registry import ModalityPlugin, PluginError, register_modality

pytestmark = pytest.mark.core

PLUGIN_SRC = """
import torch
from torch import nn
from one_peace.registry import ModalityPlugin, MaskingPolicy
from one_peace.models.adapter import Adapter, AdapterOutput
from one_peace.models.relpos import bucket_1d, bucket_1d_rows


class TabularAdapter(Adapter):
    modality = "tabular"

    def __init__(self, dim, heads, features):
        super().__init__()
        self.proj = nn.Linear(1, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(features + 1, dim))
        self.table = nn.Parameter(torch.randn(bucket_1d_rows(8), heads))

    def embed(self, batch):
        x = batch["values"]
        tok = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.proj(x[..., None])], 1) + self.pos[: x.shape[1] + 1]
        return AdapterOutput(tok, None, bucket_1d(x.shape[1] + 1, 8), self.table)


class TabularModality(ModalityPlugin):
    name = "tabular"
    defaults = {"features": 6}
    masking = MaskingPolicy(kind="random", ratio=0.5)

    def build_adapter(self, config, siblings):
        return TabularAdapter(config.embed_dim, config.heads, self.options(config)["features"])

    def build_preprocessor(self, config, tokenizer=None):
        return lambda row: {"values": torch.as_tensor(row, dtype=torch.float32)}

    def collate(self, samples):
        return {"values": torch.stack([s["values"] for s in samples])}

    def example_batch(self, config, batch_size, generator):
        return {"values": torch.randn(batch_size, self.options(config)["features"], generator=generator)}
"""


@pytest.fixture
def plugin_path(tmp_path: Path):
    """A fake installed distribution exposing one working and one broken entry point."""
    (tmp_path / "tabular_plugin.py").write_text(PLUGIN_SRC)
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('this plugin is broken on purpose')\n")
    dist = tmp_path / "tabular_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tabular-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[one_peace.modalities]\ntabular = tabular_plugin:TabularModality\nbroken = broken_plugin:Plugin\n"
    )
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    registry.discover(force=True)
    yield tmp_path
    sys.path.remove(str(tmp_path))
    registry.unregister("tabular")
    registry.unregister("broken")
    sys.modules.pop("tabular_plugin", None)


def test_builtins_are_registered_with_their_source():
    mods = one_peace.list_modalities()
    for name in ("text", "image", "audio", "video"):
        assert name in mods
        assert "one_peace.adapters" in mods[name]


def test_entry_point_plugin_is_discovered_and_broken_one_reported(plugin_path: Path):
    mods = one_peace.list_modalities()
    assert "tabular" in mods and "entry point" in mods["tabular"] and "tabular-plugin" in mods["tabular"]
    errors = registry.plugin_errors()
    assert "broken" in errors and "broken on purpose" in errors["broken"]
    assert {"text", "image", "audio", "video"} <= set(mods)  # the broken plugin did not stop the others
    # the plugin works end to end: fused with text, forward + backward, token dropping
    model = one_peace.build_model("tiny", modalities=("text", "tabular"))
    inputs = one_peace.example_inputs(("text", "tabular"), 3, model.config)
    out = model.forward_features(inputs)
    out.hidden["tabular"].sum().backward()
    assert model.adapters["tabular"].proj.weight.grad is not None
    keep = torch.tensor([[0, 2, 5]] * 3)
    dropped = model.forward_features({"tabular": inputs["tabular"]}, keep_ids={"tabular": keep})
    assert dropped.hidden["tabular"].shape == (3, 3, 64)
    emb = model.encode("tabular", [[1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 1]])
    assert emb.shape == (2, 64)


def test_cli_lists_plugins_and_failures(plugin_path: Path):
    env_path = f"{plugin_path}:{':'.join(sys.path)}"
    out = subprocess.run(
        [sys.executable, "-m", "one_peace.modalities"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert "tabular" in out.stdout and "entry point" in out.stdout
    assert "FAILED broken" in out.stdout
    assert "video" in out.stdout and "shares FFN/head with image" in out.stdout


def test_duplicate_name_is_rejected_naming_both_sources():
    with pytest.raises(PluginError, match=r"'text' is registered twice"):

        @register_modality
        class AnotherText(ModalityPlugin):
            name = "text"

            def build_adapter(self, config, siblings): ...
            def build_preprocessor(self, config, tokenizer=None): ...
            def collate(self, samples): ...
            def example_batch(self, config, batch_size, generator): ...


def test_missing_piece_is_reported_with_plugin_name():
    with pytest.raises(PluginError, match=r"'halfdone'.*missing required piece\(s\): collate, example_batch"):

        @register_modality
        class HalfDone(ModalityPlugin):
            name = "halfdone"

            def build_adapter(self, config, siblings): ...
            def build_preprocessor(self, config, tokenizer=None): ...

    assert "halfdone" not in one_peace.list_modalities()


def test_unknown_modality_error_lists_known():
    with pytest.raises(KeyError, match=r"unknown modality .smell.*registered modalities: audio, image, .*text"):
        one_peace.build_model("tiny", modalities=("smell",))


def test_plugin_source_written_as_file(tmp_path: Path):
    """A plugin module can also register itself in-tree with the decorator."""
    mod = tmp_path / "inline_plugin.py"
    mod.write_text(
        textwrap.dedent(PLUGIN_SRC).replace('name = "tabular"', 'name = "inline"')
        + "\nfrom one_peace.registry import register_modality\nregister_modality(TabularModality)\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        importlib.import_module("inline_plugin")
        assert one_peace.list_modalities()["inline"] == "module inline_plugin"
    finally:
        sys.path.remove(str(tmp_path))
        registry.unregister("inline")
