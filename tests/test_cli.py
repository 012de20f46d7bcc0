"""The README's main command, the module CLIs, and the installed wheel (adapters/recipes under our namespace)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_command(kind: str) -> str:
    """The command under the README's ``<!-- kind -->`` marker (what users and CI run)."""
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {kind} -->\s*```bash\n(.+?)\n```", text, re.S)
    assert m, f"README has no {kind} command block"
    return m.group(1).strip()


def test_readme_main_job_runs_and_beats_the_baseline(tmp_path):
    """The README's main job (after its install step), from another directory: vl_seq2seq on the demo data."""
    setup = _readme_command("setup")
    job = setup.split("&&")[-1].strip()
    assert job.startswith(".venv/bin/python -m ")
    module_args = job.removeprefix(".venv/bin/python ").split()
    out = subprocess.run([sys.executable, *module_args], capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint: " in out.stdout
    results = json.loads((tmp_path / "outputs" / "vl_seq2seq" / "eval.json").read_text())
    assert results["token_f1"] > results["baseline_token_f1"], results
    assert Path(results["checkpoint"]).is_dir()
    recorded = (tmp_path / "outputs" / "vl_seq2seq" / ".hydra" / "config.yaml").read_text()  # written by the run
    assert "recipe_name: vl_seq2seq" in recorded, recorded[:500]
    rows = [json.loads(x) for x in (tmp_path / "outputs" / "vl_seq2seq" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all({"samples_per_s", "tokens_per_s", "data_wait", "mfu"} <= set(r) for r in rows), rows[-1]
    assert all(r["samples_per_s"] > 0 and 0 <= r["data_wait"] <= 1 and 0 < r["mfu"] < 1.5 for r in rows)


def test_demo_cli_encodes_every_modality(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "one_peace.demo"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 0, out.stderr
    for m in ("text", "image", "audio", "video"):
        assert re.search(rf"{m}: embeddings \(2, 64\)", out.stdout), out.stdout


@pytest.mark.core
def test_ci_runs_the_readme_commands_as_written():
    """.ci/run reads the set-up, test and fairseq2-check blocks from the README (the regex of _readme_command) and
    runs them; the set-up ends on the newest torch (no pin) and the fairseq2 check is its own environment."""
    ci = (ROOT / ".ci" / "run").read_text()
    for kind in ("setup", "test", "fairseq2-setup", "fairseq2-test"):
        _readme_command(kind)  # present
        assert f"readme_block {kind})" in ci
    assert 'bash -c "${SETUP}"' in ci and 'run_pytest "${TESTS}"' in ci and 'run_pytest "${FS2_TESTS}"' in ci
    setup = _readme_command("setup")
    assert setup.startswith("python3 -m venv .venv && .venv/bin/pip install -e '.[all,dev]'") and "torch" not in setup
    assert _readme_command("test") == ".venv/bin/python -m pytest -q"
    fs2 = _readme_command("fairseq2-setup")
    assert fs2 == "python3 -m venv .venv-fairseq2 && .venv-fairseq2/bin/pip install -e '.[fairseq2,dev]'"
    assert _readme_command("fairseq2-test") == ".venv-fairseq2/bin/python -m pytest -q -m fairseq2"
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    torch_family = ("torch", "torchvision")
    pinned = {e for e, deps in extras.items() for d in deps if re.split("[=<>]", d)[0] in torch_family}
    assert pinned == {"fairseq2"} and "fairseq2" not in extras["all"][0], extras


SOURCE_ROOTS = {"one_peace": "one_peace", "adapters": "one_peace/adapters", "recipes": "one_peace/recipes"}
CACHE_PARTS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}


def _expected_wheel_files(tree: Path) -> set[str]:
    """Every source and data file under the three roots, at its installed path."""
    out = set()
    for folder, installed in SOURCE_ROOTS.items():
        for f in (tree / folder).rglob("*"):
            rel = f.relative_to(tree / folder)
            if f.is_file() and not CACHE_PARTS & set(rel.parts) and f.suffix != ".pyc" and not f.name.startswith("."):
                out.add(f"{installed}/{rel.as_posix()}")
    return out


@pytest.mark.core
def test_wheel_installs_adapters_and_recipes_under_our_namespace(tmp_path):
    """Build the wheel, install it alone into a folder, and import it from elsewhere (no editable finder).

    The wheel is built from a copy of the tree with a new subpackage and a new static file added: packages and data
    are discovered, so both must arrive without any listing, and the wheel holds every file of the three roots.
    """
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    for folder in SOURCE_ROOTS:
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns(*CACHE_PARTS, "*.pyc"))
    probe = tree / "one_peace" / "probe_pkg"
    (probe / "static" / "css").mkdir(parents=True)
    (probe / "__init__.py").write_text("VALUE = 7\n")
    (probe / "static" / "index.html").write_text("<html></html>\n")
    (probe / "static" / "css" / "page.css").write_text("body {}\n")
    (tree / "recipes" / "recipe" / "probe_recipe.yaml").write_text("x: 1\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(tree),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("one_peace-*.whl"))
    names = {n for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in n}
    expected = _expected_wheel_files(tree)
    assert expected - names == set(), f"missing from the wheel: {sorted(expected - names)}"
    assert names - expected == set(), f"unexpected in the wheel: {sorted(names - expected)}"
    assert {"one_peace/probe_pkg/static/css/page.css", "one_peace/recipes/recipe/probe_recipe.yaml"} <= names
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    assert not (target / "adapters").exists(), "the top-level adapters/ folder must install as one_peace.adapters"
    code = (
        "import one_peace, one_peace.adapters.text as t, importlib.resources as r;"
        "import one_peace.data.loader, one_peace.train.trainer, one_peace.run, one_peace.convert;"
        "import one_peace.probe_pkg as probe; assert probe.VALUE == 7;"
        "print(one_peace.__file__); print(t.__file__);"
        "print(sorted(e.name for e in r.files('one_peace.recipes').joinpath('model').iterdir()));"
        "print(sorted(one_peace.list_modalities()))"
    )
    env = {"PYTHONPATH": f"{target}{os.pathsep}{sysconfig.get_paths()['purelib']}", "PATH": os.environ.get("PATH", "")}
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(str(target)) and lines[1].startswith(str(target / "one_peace" / "adapters"))
    assert "tiny.yaml" in lines[2] and "one_peace_4b.yaml" in lines[2]
    recipes = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            "import importlib.resources as r; "
            "print(sorted(e.name for e in r.files('one_peace.recipes').joinpath('recipe').iterdir()))",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert "vl_seq2seq.yaml" in recipes.stdout and "pretrain_al.yaml" in recipes.stdout, recipes.stderr
    assert lines[3] == "['audio', 'image', 'text', 'video']"
