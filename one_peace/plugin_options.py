"""A plugin's typed options: the dataclass base, the type check of option values, and its error."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any


class PluginOptionError(ValueError):
    """A plugin option that does not exist or has a value of the wrong type; the message names both."""


@dataclass
class PluginOptions:
    """Base of a plugin's typed options: subclass it as a dataclass whose fields are the options.

    Instances also read like the dict they replace (``options["image_size"]``, ``options.get(...)``).
    """

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """The option ``key``, or ``default`` when there is no such option."""
        return getattr(self, key) if key in self.keys() else default

    def keys(self) -> list[str]:
        """The option names."""
        return [f.name for f in dataclasses.fields(self)]

    def as_dict(self) -> dict[str, Any]:
        """The options as a plain (JSON-friendly) dict."""
        return dataclasses.asdict(self)


def type_name(hint: Any) -> str:
    """A type annotation's readable name."""
    return str(getattr(hint, "__name__", hint))


def type_ok(value: Any, hint: Any, default: Any) -> bool:
    """Whether ``value`` fits the option's annotation (ints count as floats; bools are not ints)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, h, default) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is not None:  # list[int], dict[str, Any], tuple[int, ...], Literal[...]
        if origin is typing.Literal:
            return value in typing.get_args(hint)
        return isinstance(value, (list, tuple) if origin in (list, tuple) else origin)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


_HINTS: dict[int, tuple[type, dict[str, Any]]] = {}


def option_hints(options_cls: type) -> dict[str, Any]:
    """The resolved annotations of an options dataclass (once per class: option parsing runs per row in length
    estimates)."""
    cached = _HINTS.get(id(options_cls))
    if cached is None or cached[0] is not options_cls:
        cached = _HINTS[id(options_cls)] = (options_cls, typing.get_type_hints(options_cls))
    return cached[1]
