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
    @register_modality
    class First(ModalityPlugin):
        name = "twice"

        def build_adapter(self, config, siblings): ...
        def build_preprocessor(self, config, tokenizer=None): ...
        def collate(self, samples): ...
        def example_batch(self, config, batch_size, generator): ...

    try:
        with pytest.raises(PluginError, match=r"'twice' is registered twice: by module .* and by module"):

            @register_modality
            class Second(First):
                pass

        assert type(registry.get_plugin("twice")) is First
    finally:
        registry.unregister("twice")


def test_a_builtins_name_can_never_be_taken():
    """A plugin module registering "text", imported before anything else, used to replace the built-in."""
    with pytest.raises(PluginError, match=r"'text' is a built-in's name; module .* cannot take it"):

        @register_modality
        class AnotherText(ModalityPlugin):
            name = "text"

            def build_adapter(self, config, siblings): ...
            def build_preprocessor(self, config, tokenizer=None): ...
            def collate(self, samples): ...
            def example_batch(self, config, batch_size, generator): ...

    assert type(registry.get_plugin("text")).__module__ == "one_peace.adapters.text"


def _distribution(root: Path, dist: str, module: str, source: str, entry: str) -> None:
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[one_peace.modalities]\n{entry} = {module}:TabularModality\n")


def test_name_clashes_between_distributions_leave_the_name_inactive_until_chosen(tmp_path, monkeypatch):
    """Two outside distributions declaring one name: neither is active (the newcomer used to take over silently),
    the listing names both and exits 1; ONE_PEACE_MODALITY_CHOICE picks one. A built-in's name declared by an outside
    distribution is refused; a plugin calling sys.exit() at import fails alone."""
    src = textwrap.dedent(PLUGIN_SRC).replace('name = "tabular"', 'name = "physio"')
    _distribution(tmp_path, "physio-a", "physio_a", src, "physio")
    _distribution(tmp_path, "physio-b", "physio_b", src.replace("defaults = {", "defaults = {'b': 1, "), "physio")
    _distribution(tmp_path, "text-thief", "text_thief", src.replace('name = "physio"', 'name = "text"'), "text")
    _distribution(tmp_path, "quitter", "quitter", "import sys\nsys.exit(3)\n", "quitter")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    env = {"PYTHONPATH": f"{tmp_path}:{':'.join(sys.path)}", "PATH": "/usr/bin:/bin"}
    try:
        registry.discover(force=True)
        assert "physio" not in one_peace.list_modalities()
        clash = registry.plugin_errors()["physio"]
        assert "physio-a, physio-b" in clash and "ONE_PEACE_MODALITY_CHOICE=physio=<distribution>" in clash
        assert "is a built-in's name" in registry.plugin_errors()["text"]
        assert "SystemExit(3)" in registry.plugin_errors()["quitter"]
        assert type(registry.get_plugin("text")).__module__ == "one_peace.adapters.text"
        listing = subprocess.run(
            [sys.executable, "-m", "one_peace.modalities"], capture_output=True, text=True, env=env
        )
        assert listing.returncode == 1 and "CLASH physio" in listing.stdout and "FAILED quitter" in listing.stdout
        assert "text " in listing.stdout and "built-in" in listing.stdout
        monkeypatch.setenv("ONE_PEACE_MODALITY_CHOICE", "physio=physio-b")
        registry.unregister("physio")
        registry.discover(force=True)
        assert "physio-b" in one_peace.list_modalities()["physio"]
        assert "b" in registry.get_plugin("physio").Options().as_dict()  # the chosen distribution's plugin
        chosen = subprocess.run(
            [sys.executable, "-m", "one_peace.modalities"],
            capture_output=True,
            text=True,
            env={**env, "ONE_PEACE_MODALITY_CHOICE": "physio=physio-b"},
        )
        assert chosen.returncode == 0 and "physio-b" in chosen.stdout, chosen.stdout + chosen.stderr
    finally:
        for name in ("physio", "quitter"):
            registry.unregister(name)
        registry._REGISTRY.errors.pop("text", None)
        for module in ("physio_a", "physio_b", "text_thief", "quitter"):
            sys.modules.pop(module, None)


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
