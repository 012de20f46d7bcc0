"""``python -m one_peace.modalities``: list the registered modalities and where each came from.

The registry itself lives in :mod:`one_peace.registry`; its public names are re-exported here.
"""

from __future__ import annotations

from one_peace.registry import (
    ENTRY_POINT_GROUP,
    MaskingPolicy,
    ModalityPlugin,
    PluginError,
    get_plugin,
    list_modalities,
    plugin_clashes,
    plugin_errors,
    register_modality,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "MaskingPolicy",
    "ModalityPlugin",
    "PluginError",
    "get_plugin",
    "list_modalities",
    "main",
    "plugin_clashes",
    "plugin_errors",
    "register_modality",
]


def main() -> int:
    """Print the registered modalities and any plugin that failed to load; exit status 1 when a modality name is
    declared by several distributions (none of them is active then)."""
    mods = list_modalities()
    width = max((len(n) for n in mods), default=4)
    print(f"{'name':<{width}}  source")
    for name, source in mods.items():
        plugin = get_plugin(name)
        share = f"  (shares FFN/head with {plugin.shares})" if plugin.shares else ""
        print(f"{name:<{width}}  {source}{share}")
    clashes = plugin_clashes()
    for name, err in plugin_errors().items():
        print(f"{'CLASH' if name in clashes else 'FAILED'} {name}: {err}")
    return 1 if clashes else 0


if __name__ == "__main__":
    raise SystemExit(main())
