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
    "plugin_errors",
    "register_modality",
]


def main() -> None:
    """Print the registered modalities and any plugin that failed to load."""
    mods = list_modalities()
    width = max((len(n) for n in mods), default=4)
    print(f"{'name':<{width}}  source")
    for name, source in mods.items():
        plugin = get_plugin(name)
        share = f"  (shares FFN/head with {plugin.shares})" if plugin.shares else ""
        print(f"{name:<{width}}  {source}{share}")
    for name, err in plugin_errors().items():
        print(f"FAILED {name}: {err}")


if __name__ == "__main__":
    main()
