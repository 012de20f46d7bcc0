"""The output folder of a run: one run at a time (an OS-level lock), and never another run's leftovers.

An output folder is *in use* when it holds a run's ``checkpoints/`` or ``metrics.jsonl`` (Hydra's ``.hydra/``, the
log, demo data and ``tokenizer.json`` do not count). A fresh run into one is refused unless it resumes
(``trainer.resume=true``) or replaces it (``overwrite=true``, which moves the old run into ``previous-<time>/``).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import IO, Any

LOCK_NAME = ".one_peace.lock"
RUN_FILES = ("checkpoints", "metrics.jsonl", "eval.json", "tensorboard", "loss.png")


class OutputDirInUse(RuntimeError):
    """Another live run holds the output folder's lock."""


def lock_output_dir(out: Path) -> IO[str]:
    """Take the folder's exclusive lock (released when the process ends, even by SIGKILL); returns its file."""
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / LOCK_NAME, "a+")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise OutputDirInUse(
            f"output_dir={out} is in use by another run (pid {holder}); wait for it or choose another output_dir"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def prepare_output_dir(out: Path, resume: bool, overwrite: bool, say: Any = print) -> None:
    """Refuse a fresh run into a folder holding another run, or move that run aside with ``overwrite``."""
    found = [name for name in ("checkpoints", "metrics.jsonl") if (out / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise ValueError(
            f"output_dir={out} holds another run ({', '.join(found)}): pass trainer.resume=true to continue it, "
            "overwrite=true to move it aside and start afresh, or another output_dir"
        )
    aside = out / time.strftime("previous-%Y%m%d-%H%M%S")
    suffix = 0
    while aside.exists():
        suffix += 1
        aside = aside.with_name(f"{aside.name.split('.')[0]}.{suffix}")
    aside.mkdir()
    moved = []
    for name in RUN_FILES:
        if (out / name).exists():
            os.replace(out / name, aside / name)
            moved.append(name)
    say(f"overwrite=true: moved the previous run ({', '.join(moved)}) to {aside}")


def code_versions() -> dict[str, str]:
    """The versions a run records: one-peace (and its git commit, ``-dirty`` with uncommitted changes, when it runs
    from a git checkout), torch and Python."""
    import platform
    import subprocess

    import torch

    import one_peace

    found = {"one-peace": one_peace.__version__, "torch": str(torch.__version__), "python": platform.python_version()}
    root = Path(one_peace.__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    # only a checkout that tracks this package: an install inside another project's work tree is not ours
    if git("ls-files", "--error-unmatch", "one_peace/__init__.py") is not None:
        commit = git("rev-parse", "HEAD")
        if commit:
            dirty = git("status", "--porcelain", "--untracked-files=no", "--", "one_peace", "adapters", "recipes")
            found["git commit"] = commit + ("-dirty" if dirty else "")
    return found


def record_config(out: Path, cfg: Any, overrides: list[str]) -> None:
    """Write the run's composed config, command-line overrides and code versions to ``.hydra/`` (``config.yaml``,
    ``overrides.yaml``, ``versions.yaml``: :func:`code_versions`), atomically, once the run holds the folder: Hydra's
    own copy (``hydra.output_subdir``) was written before the lock was taken, so a refused second run replaced the
    live run's record."""
    from omegaconf import OmegaConf

    folder = out / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    records = (
        ("config.yaml", OmegaConf.to_yaml(cfg)),
        ("overrides.yaml", OmegaConf.to_yaml(overrides)),
        ("versions.yaml", OmegaConf.to_yaml(code_versions())),
    )
    for name, content in records:
        tmp = folder / f".{name}.tmp"
        tmp.write_text(content)
        os.replace(tmp, folder / name)
