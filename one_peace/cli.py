"""``key=value`` command lines for the tools (``embed``, ``search``, ``eval``), typed by a dataclass schema.

The same syntax as ``python -m one_peace.run`` (OmegaConf dot-lists: ``query.text="a dog"``, ``pair=[image,text]``)
without Hydra's output folders. A misspelled key or a wrong type ends the tool with one line naming the key and
what was expected; ``--help`` prints every key with its default and meaning (from the schema's docstring).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def key_docs(cls: type) -> dict[str, str]:
    """``Attributes:`` of a dataclass docstring, key -> text (also the recipes' key reference)."""
    docs: dict[str, str] = {}
    key = None
    for line in (cls.__doc__ or "").split("Attributes:")[-1].splitlines():
        stripped = line.strip()
        head, sep, rest = stripped.partition(": ")
        if sep and head.isidentifier() and line.startswith(" " * 8) and not line.startswith(" " * 12):
            key = head
            docs[key] = rest
        elif key and stripped:
            docs[key] += " " + stripped
    return docs


def usage(prog: str, schema: type) -> str:
    """``prog key=value ...`` and one line per key: default and meaning."""
    lines = [f"usage: {prog} key=value ...", "", (schema.__doc__ or "").split("\n\n")[0].strip(), "", "keys:"]
    docs = key_docs(schema)
    fields = dataclasses.fields(schema)  # type: ignore[arg-type]
    for f in fields:
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "(required)" if default == "???" else repr(default)
        lines.append(f"  {f.name}={shown}  {docs.get(f.name, '')}")
    if any(f.name in ("modality", "modalities", "query") for f in fields):
        lines += ["", modalities_line()]
    return "\n".join(lines)


def modalities_line() -> str:
    """``modalities: text, image, ...``: every registered modality (built-in or plugin), for help and errors."""
    from one_peace.registry import list_modalities, plugin_errors

    names = ", ".join(list_modalities()) or "none"
    broken = f" ({len(plugin_errors())} failed to load)" if plugin_errors() else ""
    return f"registered modalities: {names}{broken}; python -m one_peace.modalities lists where each comes from"


def parse(schema: type[T], argv: Sequence[str] | None, prog: str) -> T:
    """Parse ``key=value`` arguments into an instance of ``schema`` (a dataclass); exits with a clear message."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(usage(prog, schema))
        raise SystemExit(0)
    bad = [a for a in args if "=" not in a]
    if bad:
        raise SystemExit(f"error: {prog}: arguments are key=value, got {bad[0]!r} (see --help)")
    try:
        base = OmegaConf.structured(schema)
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(args))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise SystemExit(f"error: {prog}: missing required key(s): {', '.join(missing)} (see --help)")
        obj: Any = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        msg = str(exc).splitlines()[0]
        raise SystemExit(f"error: {prog}: {f'key {key}: ' if key else ''}{msg}") from None
    return obj  # type: ignore[no-any-return]
