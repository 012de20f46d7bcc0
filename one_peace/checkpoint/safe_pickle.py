"""Reading official ``.pt`` files safely: ``torch.load(weights_only=True)`` plus an explicit allow-list.

fairseq checkpoints pickle their config as omegaconf ``DictConfig``/``ListConfig`` objects or an argparse
``Namespace``. Those classes are *not* imported or executed: each allowed global name is mapped to an inert
stand-in defined here, and the stand-ins are turned into plain dicts, lists and scalars afterwards. Any other
global (``os.system``, arbitrary classes, numpy objects ...) makes the load fail with a message naming it.
There is no fallback to unrestricted unpickling.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model; the message names the file (and key)."""


class _Stub:
    """Inert object created for an allowed global; keeps the pickled state and nothing else."""

    kind = "object"

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _DictConfigStub(_Stub):
    kind = "dictconfig"


class _ListConfigStub(_Stub):
    kind = "listconfig"


class _NodeStub(_Stub):
    kind = "node"


class _MetadataStub(_Stub):
    kind = "metadata"


class _NamespaceStub(_Stub):
    kind = "namespace"


class _Sentinel:
    """Stands for a type object referenced as a value (``typing.Any``, ``dict`` ...) in config metadata."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


def _plain_dict(*args: Any) -> dict[str, Any]:
    return {}


_OMEGACONF_NODES = (
    "AnyNode",
    "StringNode",
    "IntegerNode",
    "FloatNode",
    "BooleanNode",
    "EnumNode",
    "BytesNode",
    "PathNode",
    "InterpolationResultNode",
)

#: Every global an official checkpoint may reference beyond tensors, mapped to its inert stand-in.
ALLOWED_GLOBALS: dict[str, Any] = {
    "omegaconf.dictconfig.DictConfig": _DictConfigStub,
    "omegaconf.listconfig.ListConfig": _ListConfigStub,
    "omegaconf.base.ContainerMetadata": _MetadataStub,
    "omegaconf.base.Metadata": _MetadataStub,
    **{f"omegaconf.nodes.{n}": _NodeStub for n in _OMEGACONF_NODES},
    "argparse.Namespace": _NamespaceStub,
    "collections.defaultdict": _plain_dict,
    "typing.Any": _Sentinel("typing.Any"),
    "builtins.dict": _Sentinel("dict"),
    "builtins.list": _Sentinel("list"),
    "builtins.int": _Sentinel("int"),
    "builtins.float": _Sentinel("float"),
    "builtins.str": _Sentinel("str"),
    "builtins.bool": _Sentinel("bool"),
    "builtins.tuple": _Sentinel("tuple"),
    "builtins.object": _Sentinel("object"),
}


#: values (dict entries, list items, scalars, tensors) a checkpoint may expand to: an official 4B file has about
#: 3,000 tensors and a config of a few thousand values. Pickle's memo lets a 2 kB file share one list many times
#: over (``a = [b, b]``, ``b = [c, c]``, ...): walked as a tree, 40 levels are 2**40 values.
MAX_VALUES = 1_000_000
#: nesting depth of a checkpoint's containers (an official config nests about 6 deep)
MAX_DEPTH = 64


class _TooLarge(Exception):
    """A checkpoint whose objects expand past :data:`MAX_VALUES` or nest past :data:`MAX_DEPTH`."""


def to_plain(obj: Any) -> Any:
    """Turn stand-ins into plain Python data (dicts, lists, scalars); tensors are left as they are.

    Raises:
        _TooLarge: more than :data:`MAX_VALUES` values counted as a tree (shared references count each time they
            are reached: what the result would be when written out), or deeper than :data:`MAX_DEPTH`.
    """
    seen = 0

    def walk(o: Any, depth: int) -> Any:
        nonlocal seen
        seen += 1
        if seen > MAX_VALUES:
            raise _TooLarge(f"its objects expand to more than {MAX_VALUES:,} values (shared references)")
        if depth > MAX_DEPTH:
            raise _TooLarge(f"its objects nest deeper than {MAX_DEPTH} levels")
        if isinstance(o, _DictConfigStub):
            content = (o.state or {}).get("_content")
            return {k: walk(v, depth + 1) for k, v in content.items()} if isinstance(content, dict) else content
        if isinstance(o, _ListConfigStub):
            content = (o.state or {}).get("_content")
            return [walk(v, depth + 1) for v in content] if isinstance(content, list) else content
        if isinstance(o, _NodeStub):
            return walk((o.state or {}).get("_val"), depth + 1)
        if isinstance(o, _NamespaceStub):
            return {k: walk(v, depth + 1) for k, v in (o.state or {}).items()}
        if isinstance(o, _MetadataStub | _Sentinel):
            return None
        if isinstance(o, dict):
            return {k: walk(v, depth + 1) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return type(o)(walk(v, depth + 1) for v in o)
        return o

    return walk(obj, 0)


def safe_torch_load(path: str | Path, mmap: bool = False) -> Any:
    """Load a torch pickle with ``weights_only=True`` and the config allow-list; return plain data + tensors.

    Raises:
        CheckpointError: the file is missing, truncated, corrupted, or references a global outside the allow-list.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals([(v, k) for k, v in ALLOWED_GLOBALS.items()]):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(
            r"GLOBAL ([\w.]+)|unrecognized function ([^\s]+)|new object for [^\n]*? but got ([^\n]+)", text
        )
        if found:
            msg = f"it references {next(g for g in found.groups() if g)}"
        else:  # torch's own text advises weights_only=False, which is exactly what must not be done here
            msg = "it is not a torch checkpoint of tensors and config objects (damaged or not a .pt file)"
        raise CheckpointError(
            f"{path}: refused to unpickle: {msg}. Only tensors and omegaconf/argparse config objects are allowed "
            "(weights_only=True with an explicit allow-list); the file was not executed."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).split("\n")[0][:200].split("weights_only")[0].rstrip(" .,(")
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupted?): {first}") from None
    except (TypeError, AttributeError, RecursionError, KeyError, IndexError) as exc:
        # only allowed names were used, but put together into something our stand-ins cannot be (crafted files)
        raise CheckpointError(
            f"{path}: refused: its config objects are malformed ({type(exc).__name__}); not a ONE-PEACE checkpoint "
            "(nothing in it was executed)"
        ) from None
    try:
        return to_plain(data)
    except _TooLarge as exc:
        raise CheckpointError(
            f"{path}: refused: {exc}; not a ONE-PEACE checkpoint (nothing in it was executed)"
        ) from None
    except (TypeError, AttributeError, RecursionError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: refused: its config objects are malformed ({type(exc).__name__}); not a ONE-PEACE checkpoint "
            "(nothing in it was executed)"
        ) from None
