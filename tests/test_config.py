"""The typed recipe config: every key known, wrong keys and values refused naming the key, options reach plugins."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from importlib.resources import files
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from one_peace.runner import build
from one_peace.runner.config import RunConfig, TrainerSection, reference_markdown, register
from one_peace.train.trainer import TrainerConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(e.name.removesuffix(".yaml") for e in files("one_peace.recipes").joinpath("recipe").iterdir())
RECIPES = [r for r in RECIPES if not r.startswith("_")]
register()


def _compose(*overrides: str):
    with initialize_config_module(config_module="one_peace.recipes", version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def _keys(node: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in ("data.fields", "model.modality_options") and "task" not in key:
            out += _keys(v, key + ".")
        else:
            out.append(key)
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_key_of_every_recipe_is_in_the_structured_config(recipe):
    doc = yaml.safe_load(files("one_peace.recipes").joinpath("recipe", f"{recipe}.yaml").read_text())
    schema = OmegaConf.structured(RunConfig)
    for key in _keys(doc):
        node = schema
        for part in key.split("."):
            assert part in list(node.keys()), f"{recipe}.yaml: {key} is not a key of the structured config"
            node = node._get_node(part)
    cfg = _compose(f"recipe={recipe}")  # composing under the schema type-checks every value
    assert OmegaConf.get_type(cfg.trainer) is TrainerSection
    assert cfg.recipe_name == recipe


def test_resume_no_is_false_and_a_size_yaml_of_the_users_own_works(tmp_path):
    assert _compose("recipe=vl_contrastive", "trainer.resume=no").trainer.resume is False
    fields = _compose("recipe=vl_contrastive", "data.fields.image=img", "data.fields.text=caption").data.fields
    assert dict(fields) == {"image": "img", "text": "caption"}  # today's keys keep working
    assert _compose("recipe=vl_contrastive", "trainer.resume=yes").trainer.resume is True
    cfg = _compose("recipe=vl_contrastive", "model=base")
    assert (cfg.model.embed_dim, cfg.model.layers) == (768, 12)
    assert build.model_config(cfg, ["image", "text"], 100).layers == 12
    # a user's own size YAML (a config folder of theirs on Hydra's search path) is read by value, not by name
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mysize.yaml").write_text("size: mysize\nembed_dim: 48\nlayers: 1\nheads: 2\nffn_dim: 96\n")
    cfg = _compose("recipe=vl_contrastive", "model=mysize", f"hydra.searchpath=[file://{tmp_path}]")
    config = build.model_config(cfg, ["image", "text"], 100)
    assert (config.embed_dim, config.layers, config.heads, config.ffn_dim, config.name) == (48, 1, 2, 96, "mysize")


def test_trainer_section_mirrors_trainer_config():
    section = {f.name for f in dataclasses.fields(TrainerSection)}
    assert section | {"seed"} == {f.name for f in dataclasses.fields(TrainerConfig)}
    tcfg = build.trainer_config(_compose("recipe=vl_contrastive", "trainer.optimizer.betas=[0.8,0.9]"))
    assert tcfg.optimizer["betas"] == [0.8, 0.9] and tcfg.schedule == "warmup_cosine"


def test_plugin_options_reach_the_model_and_unknown_ones_are_refused():
    cfg = _compose("recipe=al_contrastive", "model.modality_options.audio.feature_dim=32")
    config = build.model_config(cfg, ["audio", "text"], 100)
    assert config.modality_options["audio"]["feature_dim"] == 32
    typo = _compose("recipe=al_contrastive", "model.modality_options.audio.feature_dimm=32")
    with pytest.raises(ValueError, match=r"model.modality_options.audio.feature_dimm: the 'audio' plugin has no"):
        build.model_config(typo, ["audio"], 1)
    wrong = _compose("recipe=al_contrastive", "model.modality_options.audio.feature_dim=x")
    with pytest.raises(ValueError, match=r"model.modality_options.audio.feature_dim: expected int"):
        build.model_config(wrong, ["audio"], 1)


def test_pretrained_official_start_keeps_its_own_resolution_unless_asked(parity, official_tiny):
    base = ["recipe=vl_contrastive", f"model.pretrained={official_tiny}", f"model.bpe_dir={parity / 'bpe'}"]
    said: list[str] = []
    model = build.load_pretrained(_compose(*base), ["image", "text"], said.append)
    assert model.config.modality_options["image"]["image_size"] == 256 and said == []
    model = build.load_pretrained(_compose(*base, "data.image_size=128"), ["image", "text"], said.append)
    assert model.config.modality_options["image"]["image_size"] == 128
    assert said and "128 px" in said[0]


def _launch(args: list[str], cwd: Path, prelude: str = "") -> subprocess.Popen[str]:
    code = prelude + textwrap.dedent(
        f"""
        import sys
        sys.argv = ["one_peace.run", *{args!r}]
        import one_peace.run
        one_peace.run.main()
        """
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_cli_refuses_bad_keys_and_values_naming_them(tmp_path, parity, official_tiny):
    """Through ``python -m one_peace.run``: each case fails before any work, and its message names the key."""
    common = ["recipe=vl_contrastive", "hydra.run.dir=.", "trainer.max_steps=1"]
    cases = {
        "trainer.batch_sizee=3": "trainer.batch_sizee",
        "trainer.batch_size=abc": "trainer.batch_size",
        "trainer.bf16=abc": "trainer.bf16",
        "seed=abc": "seed",
        "model.embed_dim=97": "model.embed_dim (97) must be divisible by heads (4)",
        "model.modality_options.image.image_sizee=32": "model.modality_options.image.image_sizee",
        "trainer.schedule=cosine_forever": "trainer.schedule: unknown schedule 'cosine_forever'",
        "trainer.optimizer.name=lion": "trainer.optimizer.name: unknown optimizer 'lion'",
        "data.remainder=keep": "data.remainder must be 'drop' or 'pad'",
        "trainer.save_every=0": "trainer.save_every must be an integer >= 1, got 0",
        f"model.pretrained={official_tiny} model=base": "drop the size overrides",
    }
    procs = {}
    for i, case in enumerate(cases):
        out = tmp_path / f"case{i}"
        out.mkdir()
        extra = [f"model.bpe_dir={parity / 'bpe'}"] if "pretrained" in case else []
        procs[case] = (_launch([*common, f"output_dir={out}", *case.split(), *extra], out), out)
    for case, (proc, out) in procs.items():
        text, _ = proc.communicate(timeout=300)
        assert proc.returncode != 0, f"{case} was accepted:\n{text[-1500:]}"
        assert cases[case] in text, f"{case}:\n{text[-1500:]}"
        assert not (out / "demo_data").exists() or "pretrained" in case, f"{case}: work was done before the error"


def test_cli_refuses_unknown_keys_with_a_suggestion_and_wrong_types_in_one_line(tmp_path):
    """#29 (part): with or without '+', a misspelled key stops at start with the closest known keys (Hydra accepted
    `+outptu_dir=x` and `+sed=3` silently, and its error for `trainer.max_step` was six lines with no suggestion)."""
    cases = {
        "+outptu_dir=x": "error: +outptu_dir: unknown key; did you mean output_dir?",
        "+sed=3": "did you mean seed?",
        "trainer.max_step=3": "error: trainer.max_step: unknown key; did you mean trainer.max_steps",
        "trainer.batch_size=four": "error: trainer.batch_size=four: trainer.batch_size must be an integer, got 'four'",
        "trainer.bf16=maybe": "trainer.bf16 must be true or false",
    }
    procs = {c: _launch(["recipe=vl_contrastive", f"output_dir={tmp_path / 'o'}", c], tmp_path) for c in cases}
    for case, proc in procs.items():
        text, _ = proc.communicate(timeout=300)
        assert proc.returncode != 0 and cases[case] in text, f"{case}:\n{text[-1500:]}"
        assert len([line for line in text.splitlines() if line.strip()]) == 1, text  # one line, no traceback
    assert not (tmp_path / "o").exists()


def test_cli_model_dimensions_are_built_and_saved_and_plotting_is_optional(tmp_path):
    """``model.layers=3 model.embed_dim=96`` builds and saves that model; without matplotlib and TensorBoard the run
    still finishes and returns its checkpoint."""
    prelude = 'import sys\nfor m in ("matplotlib", "tensorboard"):\n    sys.modules[m] = None\n'
    args = ["recipe=vl_contrastive", "hydra.run.dir=.", f"output_dir={tmp_path}", "trainer.max_steps=2"]
    args += ["data.demo_train=16", "data.demo_valid=8", "trainer.batch_size=4", "model.layers=3", "model.embed_dim=96"]
    proc = _launch(args, tmp_path, prelude)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-3000:]
    assert "model: " in text and " parameters (shared " in text and f"writing to {tmp_path.resolve()}" in text
    ckpt = Path(text.split("checkpoint: ")[-1].strip().splitlines()[0])
    saved = json.loads((ckpt / "config.json").read_text())["model"]
    assert (saved["layers"], saved["embed_dim"]) == (3, 96)
    assert "the loss plot (loss.png) skipped" in text and "TensorBoard logging skipped" in text
    assert not (tmp_path / "loss.png").exists()


def test_training_doc_lists_every_key_with_its_default():
    doc = (ROOT / "docs" / "TRAINING.md").read_text()
    assert reference_markdown() in doc, "docs/TRAINING.md is stale: paste `python -m one_peace.runner.config`"


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.save_every=0", "trainer.save_every must be an integer >= 1, got 0"),
        ("trainer.accumulation=0", "trainer.accumulation must be an integer >= 1, got 0"),
        ("trainer.max_steps=0", "trainer.max_steps must be an integer >= 1, got 0"),
        ("trainer.max_steps=-5", "trainer.max_steps must be an integer >= 1, got -5"),
        ("trainer.lr=0", "trainer.lr must be > 0"),
        ("trainer.distributed=horovod", "trainer.distributed must be 'ddp' or 'fsdp2'"),
    ],
)
def test_trainer_values_are_checked_before_any_work(override, message):
    """#10.15: these used to end in ZeroDivisionError, KeyError 'loss' or an untrained checkpoint."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build.check_config(_compose("recipe=vl_contrastive", override), ["image", "text"])


def test_model_config_takes_none_as_no_plugin_options():
    """``model_config(..., modality_options=None)`` raised a TypeError; None means no overrides, and a value that is
    not a mapping is a ValueError naming the field."""
    import one_peace

    cfg = one_peace.model_config("tiny", ("text", "image"), modality_options=None)
    assert cfg.modality_options == {}
    cfg = one_peace.model_config("tiny", ("text", "image"), modality_options={"image": None})
    assert cfg.modality_options == {"image": {}}
    with pytest.raises(ValueError, match="'modality_options' must map modality names to option dicts"):
        one_peace.model_config("tiny", ("text",), modality_options=["text"])
