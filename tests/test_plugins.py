"""#12 The plugin contract: the conformance sweep, broken plugins reported, and core naming no built-in modality."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import one_peace
from one_peace import registry
from one_peace.models.adapter import Adapter, AdapterOutput
from one_peace.registry import MaskingPolicy, ModalityPlugin, PluginOptionError, PluginOptions
from one_peace.testing import ConformanceError, check_modality

pytestmark = pytest.mark.core
ROOT = Path(__file__).resolve().parents[1]
BUILTIN_NAMES = {"text", "image", "audio", "video"}

#: Every place under one_peace/ that may name a built-in modality or import a built-in plugin: (file, scope) -> why.
ALLOWED = {
    ("config.py", "<module>"): "OFFICIAL_MODALITIES, the official 4B model's modalities (build_model's default)",
    ("tokenizer.py", "<module>"): "LANGUAGE, the modality of instruction prompts, captions and seq2seq targets",
    ("registry.py", "<module>"): "BUILTIN_MODULES, the import fallback when the package metadata is absent",
    ("checkpoint/official.py", "infer_config"): "the official file's architecture: its modalities' option shapes",
    ("checkpoint/__init__.py", "read_official_config"): "re-gridding an official checkpoint's image positions",
    ("checkpoint/__init__.py", "official_state_items"): "the same, for the official relative table",
    ("checkpoint/pretrain.py", "decoder_from_official_state"): "the official pretraining decoder's key names",
    ("data/demo.py", "make_demo_dataset"): "the built-in demo data set (images, captions, sounds, videos)",
    ("data/demo.py", "make_numbers_dataset"): "the numbers demo's rows: digit images and their number words",
    ("data/demo.py", "make_av_dataset"): "'video' there is the name of the `video` extra (PyAV) the clips need",
    ("demo.py", "main"): "the quick demo of the built-in modalities",
    ("eval/__main__.py", "EvalConfig"): "CLI defaults: image-text retrieval, image zero-shot",
    ("eval/retrieval.py", "RetrievalEvaluator"): "default pair (image, text)",
    ("eval/zero_shot.py", "ZeroShotEvaluator"): "default modality (image)",
    ("train/objectives.py", "__init__"): "the contrastive objective's default pair (image, text)",
    ("extras.py", "<module>"): "'video' there is the name of the `video` extra (PyAV)",
    ("data/rows.py", "<module>"): "DEFAULT_EXTENSIONS: standard WebDataset extensions (jpg, txt, wav...) as the fields "
    "of the built-in modality they hold",
    ("serve/limits.py", "_duration"): "PyAV's stream types ('audio', 'video'), read to bound an upload's duration",
    ("checkpoint/generators.py", "<module>"): "TEXT_TARGET: a decoder's kind of target (words, not a box), not the "
    "text modality",
    ("st.py", "_unwrap"): "sentence-transformers' audio input {'array', 'sampling_rate'} as our (waveform, rate) pair",
}


def _places() -> dict[tuple[str, str], list[str]]:
    """(file, enclosing scope) -> what names a built-in modality there (docstrings excluded)."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted((ROOT / "one_peace").rglob("*.py")):
        rel = path.relative_to(ROOT / "one_peace").as_posix()
        tree = ast.parse(path.read_text())
        parent = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}

        def scope(node: ast.AST, parent: dict[ast.AST, ast.AST] = parent) -> str:
            while node in parent:
                node = parent[node]
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    return node.name
            return "<module>"

        for node in ast.walk(tree):
            what = None
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and not isinstance(parent[node], ast.Expr)
            ):
                if node.value in BUILTIN_NAMES or node.value.startswith("one_peace.adapters."):
                    what = repr(node.value)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("one_peace.adapters"):
                what = f"import {node.module}"
            elif isinstance(node, ast.Import) and any(a.name.startswith("one_peace.adapters") for a in node.names):
                what = "import one_peace.adapters"
            if what:
                found.setdefault((rel, scope(node)), []).append(f"line {node.lineno}: {what}")
    return found


def test_core_names_no_builtin_modality_outside_the_allow_list():
    found = _places()
    extra = {k: v for k, v in found.items() if k not in ALLOWED}
    assert not extra, (
        "core code names a built-in modality (ask the plugin instead, or allow-list it with a reason): "
        + ("; ".join(f"{f} {s}: {', '.join(v)}" for (f, s), v in extra.items()))
    )
    stale = [k for k in ALLOWED if k not in found]
    assert not stale, f"allow-list entries that no longer name anything (remove them): {stale}"


def test_models_import_nothing_from_checkpoint():
    for path in (ROOT / "one_peace" / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("one_peace.checkpoint"), f"{path.name} imports {node.module}"


@pytest.mark.parametrize("name", sorted(one_peace.list_modalities()))
def test_conformance_of_every_registered_modality(name: str):
    """The sweep: built-ins and installed plugins (the examples, in CI) pass every conformance check."""
    report = check_modality(name)
    assert report.ok, str(report)
    assert report.results["forward_backward"] == "ok" and report.results["save_load"] == "ok"


# ---------------------------------------------------------------------------------- the suite can fail
class SeqAdapter(Adapter):
    """A variable-length sequence adapter; ``leak`` forgets the padding mask, ``unused`` adds a dead parameter."""

    def __init__(self, dim: int, heads: int, leak: bool, unused: bool) -> None:
        super().__init__()
        from one_peace.models.relpos import bucket_1d_rows

        self.proj = nn.Linear(4, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(65, dim) * 0.02)
        self.table = nn.Parameter(torch.zeros(bucket_1d_rows(8), heads))
        self.leak = leak
        if unused:
            self.dead = nn.Parameter(torch.zeros(3))

    def embed(self, batch):
        from one_peace.models.relpos import bucket_1d

        x = batch["values"]
        t = x.shape[1] + 1
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), self.proj(x)], 1) + self.pos[:t]
        pad = torch.cat([torch.zeros_like(batch["padding_mask"][:, :1]), batch["padding_mask"]], 1)
        return AdapterOutput(tokens, None if self.leak else pad, bucket_1d(t, 8), self.table)


def _seq_plugin(name: str, leak: bool = False, unused: bool = False) -> type[ModalityPlugin]:
    class Seq(ModalityPlugin):
        def build_adapter(self, config, siblings):
            return SeqAdapter(config.embed_dim, config.heads, leak, unused)

        def build_preprocessor(self, config, tokenizer=None):
            return lambda v: {"values": torch.as_tensor(v, dtype=torch.float32)}

        def collate(self, samples):
            t = max(len(s["values"]) for s in samples)
            values = torch.zeros(len(samples), t, 4)
            pad = torch.ones(len(samples), t, dtype=torch.bool)
            for i, s in enumerate(samples):
                values[i, : len(s["values"])] = s["values"]
                pad[i, : len(s["values"])] = False
            return {"values": values, "padding_mask": pad}

        def example_samples(self, config, n, generator):
            return [{"values": torch.randn(3 + 2 * i, 4, generator=generator)} for i in range(n)]

        def example_batch(self, config, batch_size, generator):
            return self.collate(self.example_samples(config, batch_size, generator))

    Seq.name = name
    return Seq


@pytest.fixture
def registered():
    names: list[str] = []

    def add(cls: type[ModalityPlugin]) -> type[ModalityPlugin]:
        registry.register_modality(cls)
        names.append(cls.name)
        return cls

    yield add
    for n in names:
        registry.unregister(n)


def test_a_correct_outside_plugin_passes(registered):
    registered(_seq_plugin("goodseq"))
    report = check_modality("goodseq")
    assert report.ok and report.results["padding"] == "ok" and report.results["fused"] == "ok", str(report)


def test_the_suite_catches_an_unused_parameter_and_a_padding_leak(registered):
    registered(_seq_plugin("deadseq", unused=True))
    registered(_seq_plugin("leakseq", leak=True))
    with pytest.raises(ConformanceError, match=r"forward_backward +FAILED.*adapters\.deadseq\.dead"):
        check_modality("deadseq")
    report = check_modality("leakseq", raise_on_failure=False)
    assert (
        report.results["padding"].startswith("FAILED") and "depends on its batch's padding" in report.results["padding"]
    )
    assert report.results["forward_backward"] == "ok"


def test_typed_options_refuse_unknown_keys_and_wrong_types(registered):
    from dataclasses import dataclass

    @dataclass
    class Opts(PluginOptions):
        width: int = 4
        scale: float = 1.0

    cls = _seq_plugin("optseq")
    cls.Options = Opts
    cls.__init_subclass__()  # (the class body ran before Options was set)
    cls.defaults = Opts().as_dict()
    registered(cls)
    plugin = one_peace.get_plugin("optseq")
    assert plugin.parse_options({"scale": 2}).scale == 2  # ints count as floats
    with pytest.raises(PluginOptionError, match=r"modality_options\.optseq\.widht: the 'optseq' plugin has no option"):
        one_peace.build_model("tiny", modalities=("optseq",), modality_options={"optseq": {"widht": 3}})
    with pytest.raises(PluginOptionError, match=r"modality_options\.optseq\.width: expected int"):
        one_peace.build_model("tiny", modalities=("optseq",), modality_options={"optseq": {"width": "3"}})


def test_a_masking_kind_must_be_registered_and_whole_word_needs_word_starts():
    with pytest.raises(registry.PluginError, match=r"unknown masking kind 'blocky'"):

        @registry.register_modality
        class Blocky(_seq_plugin("blocky")):  # type: ignore[misc, valid-type]
            name = "blocky"
            masking = MaskingPolicy(kind="blocky")

    with pytest.raises(registry.PluginError, match=r"'whole_word' needs the plugin's word_starts"):

        @registry.register_modality
        class Wordy(_seq_plugin("wordy")):  # type: ignore[misc, valid-type]
            name = "wordy"
            masking = MaskingPolicy(kind="whole_word")

    assert "blocky" not in one_peace.list_modalities() and "wordy" not in one_peace.list_modalities()


BROKEN = {
    "dup_plugin": "from one_peace.adapters.text import TextModality as T\nclass Dup(T):\n    pass\n",
    "half_plugin": (
        "from one_peace.registry import ModalityPlugin\n"
        "class Half(ModalityPlugin):\n    name = 'half'\n    def build_adapter(self, c, s): ...\n"
    ),
    "boom_plugin": "raise RuntimeError('boom at import')\n",
}


@pytest.fixture
def broken_dist(tmp_path: Path):
    for mod, src in BROKEN.items():
        (tmp_path / f"{mod}.py").write_text(src)
    dist = tmp_path / "bad_plugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bad-plugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[one_peace.modalities]\ndup = dup_plugin:Dup\nhalf = half_plugin:Half\nboom = boom_plugin:Boom\n"
    )
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    registry.discover(force=True)
    yield
    sys.path.remove(str(tmp_path))
    for name in ("dup", "half", "boom"):
        registry.unregister(name)
    for mod in BROKEN:
        sys.modules.pop(mod, None)
    registry.discover(force=True)


def test_broken_plugins_are_reported_with_their_package_and_the_rest_works(broken_dist):
    errors = registry.plugin_errors()
    assert "is a built-in's name" in errors["dup"] and "bad-plugins" in errors["dup"]
    assert "missing required piece" in errors["half"] and "bad-plugins" in errors["half"]
    assert "boom at import" in errors["boom"] and "bad-plugins" in errors["boom"]
    assert one_peace.get_plugin("text").source.startswith("built-in")  # the duplicate did not replace it
    model = one_peace.build_model("tiny", modalities=("text", "image"), modality_options={"image": {"image_size": 32}})
    out = model.forward_features(one_peace.example_inputs(("text", "image"), 2, model.config))
    assert out.hidden["image"].shape[0] == 2


def test_the_scaffold_writes_a_plugin_that_installs_and_passes_its_own_test(tmp_path):
    """``python -m one_peace.new_modality``: installed with --target into a temporary folder, its test passes."""
    import os
    import subprocess

    pkg, site = tmp_path / "pkg", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "one_peace.new_modality", "depth_map", str(pkg)], check=True)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site)]
    subprocess.run([*pip, str(pkg)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    listed = subprocess.run(
        [sys.executable, "-m", "one_peace.modalities"], env=env, capture_output=True, text=True, check=True
    )
    assert "depth_map" in listed.stdout and "one-peace-depth-map" in listed.stdout, listed.stdout
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg / "tests")],
        cwd=pkg,
        env=env,
        capture_output=True,
        text=True,
    )
    assert tests.returncode == 0 and "3 passed" in tests.stdout, tests.stdout + tests.stderr
    again = subprocess.run(
        [sys.executable, "-m", "one_peace.new_modality", "text", str(tmp_path / "other")],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "'text' is already registered" in again.stderr


def test_ci_and_the_readme_install_every_example_plugin():
    examples = sorted(p.name for p in (ROOT / "examples" / "plugins").iterdir() if (p / "pyproject.toml").is_file())
    assert examples == ["one-peace-motion", "one-peace-pointcloud"]
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    import tomllib

    testpaths = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["testpaths"]
    for name in examples:
        assert f"-e examples/plugins/{name}" in readme and "readme_block setup" in ci  # CI runs the README set-up
        assert f"examples/plugins/{name}/tests" in testpaths


def test_the_scaffolds_closing_hint_installs_the_folder_not_a_registry_package(tmp_path, capsys, monkeypatch):
    """``pip install one-peace-physio`` (the old hint for a relative folder) asks the package registry for a package
    of that name; the hint now names the folder as a path."""
    from one_peace.new_modality import main

    monkeypatch.chdir(tmp_path)
    assert main(["physio", "one-peace-physio"]) == 0
    out = capsys.readouterr().out
    assert "next: pip install -e ./one-peace-physio && python -m pytest ./one-peace-physio/tests" in out


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("módulo", "lower-case ASCII"),
        ("x_", "lower-case ASCII"),
        ("__init__", "lower-case ASCII"),
        ("a__b", "lower-case ASCII"),
        ("valid", "a key every training batch already has"),
        ("s" * 41, "at most 40"),
    ],
)
def test_the_scaffold_refuses_names_that_cannot_make_a_working_package_before_writing(tmp_path, name, why):
    """Such names used to produce packages that do not install, a plugin that crashes training ('valid', a batch
    key), or a partial package on an over-long name."""
    from one_peace.new_modality import write_plugin

    with pytest.raises(ValueError, match=why):
        write_plugin(name, tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


def test_the_scaffold_and_the_motion_example_run_on_the_fast_path(tmp_path, monkeypatch):
    """No host read in the adapter's forward (it runs on the meta device, whose tensors hold no values), and a
    position_padding equal to the adapter's own padding, so denoising masks are drawn on the host; the scaffold also
    estimates lengths from a .npy header."""
    import importlib

    import numpy as np

    from one_peace.new_modality import write_plugin

    write_plugin("fastpath", tmp_path / "pkg")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    importlib.invalidate_caches()
    scaffold = importlib.import_module("one_peace_fastpath.plugin").FastpathModality()
    from one_peace_motion.plugin import MotionModality

    for plugin in (scaffold, MotionModality()):
        config = one_peace.model_config("tiny", ("text",))
        adapter = plugin.build_adapter(config, {})
        batch = plugin.collate(plugin.example_samples(config, 3, torch.Generator().manual_seed(0)))
        out = adapter(batch)
        assert out.padding_mask is not None and torch.equal(plugin.position_padding(batch), out.padding_mask)
        meta = {k: v.to("meta") for k, v in batch.items()}
        assert adapter.to("meta")(meta).tokens.device.type == "meta", type(plugin).__name__
    np.save(tmp_path / "seq.npy", np.zeros((17, 8), dtype=np.float32))
    config = one_peace.model_config("tiny", ("text",))
    prep = scaffold.build_preprocessor(config)
    assert (
        scaffold.estimate_length(tmp_path / "seq.npy", config, prep)
        == 18
        == len(prep(tmp_path / "seq.npy")["frames"]) + 1
    )
    sys.modules.pop("one_peace_fastpath", None)
    sys.modules.pop("one_peace_fastpath.plugin", None)
