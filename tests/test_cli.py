"""The README's main command, the module CLIs, and the installed wheel (adapters/recipes under our namespace)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

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


def test_demo_cli_encodes_every_modality(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "one_peace.demo"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 0, out.stderr
    for m in ("text", "image", "audio", "video"):
        assert re.search(rf"{m}: embeddings \(2, 64\)", out.stdout), out.stdout


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_command("test") in ci


def test_wheel_installs_adapters_and_recipes_under_our_namespace(tmp_path):
    """Build the wheel, install it alone into a folder, and import it from elsewhere (no editable finder)."""
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
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("one_peace-*.whl"))
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
