"""Package discovery for the three source roots (metadata lives in pyproject.toml).

``one_peace/`` is the package; ``adapters/`` installs as ``one_peace.adapters`` and ``recipes/`` as
``one_peace.recipes`` (a PyPI package already owns the import name ``adapters``). Every folder with an
``__init__.py`` under a root is a package, and every other file in it (YAML, HTML, JS, ``py.typed``...) is package
data, so nothing has to be listed by hand.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup

ROOTS = {"one_peace": "one_peace", "one_peace.adapters": "adapters", "one_peace.recipes": "recipes"}
SKIP_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
SKIP_SUFFIXES = {".py", ".pyc", ".pyo"}


def discover() -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    """Packages, their folders and their data files under each root."""
    here = Path(__file__).resolve().parent
    packages: list[str] = []
    package_data: dict[str, list[str]] = {}
    for name, folder in ROOTS.items():
        root = here / folder
        dirs = [d for d in [root, *sorted(root.rglob("*"))] if d.is_dir() and (d / "__init__.py").is_file()]
        dirs = [d for d in dirs if not SKIP_DIRS & set(d.relative_to(root).parts)]
        pkg_of = {d: ".".join([name, *d.relative_to(root).parts]) for d in dirs}
        packages += pkg_of.values()
        for f in sorted(root.rglob("*")):
            rel_parts = set(f.relative_to(root).parts)
            if not f.is_file() or f.suffix in SKIP_SUFFIXES or SKIP_DIRS & rel_parts or f.name.startswith("."):
                continue
            if any(p.endswith(".egg-info") for p in rel_parts):
                continue
            owner = next(p for p in [f.parent, *f.parent.parents] if p in pkg_of)
            package_data.setdefault(pkg_of[owner], []).append(f.relative_to(owner).as_posix())
    package_dir = {name: folder for name, folder in ROOTS.items()}
    return packages, package_dir, package_data


packages, package_dir, package_data = discover()
setup(packages=packages, package_dir=package_dir, package_data=package_data, include_package_data=False)
