"""The engines a rank actor can host, by name.

``native`` (``actors/engines/native/``) and ``vllm`` (``actors/engines/vllm/``) are built in
and imported only when named. Any other engine is an ``EnginePlugin`` registered from
outside the package with ``register_engine``, before the ``EngineConfig`` that names it is
built; nothing in the orchestrator changes.
"""

from __future__ import annotations

import importlib

from actors.engines.plugin import CAPABILITIES, Capability, EngineOptions, EnginePlugin

BUILT_IN: dict[str, str] = {
    "native": "actors.engines.native.plugin:NativeEngine",
    "vllm": "actors.engines.vllm.plugin:VllmEngine",
}
"""name -> ``module:Class`` of the plugin (light modules: no engine is imported)."""
_registered: dict[str, EnginePlugin] = {}


def register_engine(plugin: EnginePlugin) -> EnginePlugin:
    """Make ``plugin`` available as ``EngineConfig(engine=plugin.name)``."""
    unknown = sorted(set(plugin.capabilities) - set(CAPABILITIES))
    if unknown:
        raise ValueError(f"engine {plugin.name!r} declares unknown capabilities {unknown} "
                         f"(known: {list(CAPABILITIES)})")
    if plugin.name in BUILT_IN:
        raise ValueError(f"engine name {plugin.name!r} is built in")
    _registered[plugin.name] = plugin
    return plugin


def engine_names() -> list[str]:
    return [*BUILT_IN, *_registered]


def engine_plugin(name: str) -> EnginePlugin:
    if name in _registered:
        return _registered[name]
    if name not in BUILT_IN:
        raise ValueError(f"unknown engine {name!r} (known: {', '.join(engine_names())})")
    module, _, attribute = BUILT_IN[name].partition(":")
    plugin = getattr(importlib.import_module(module), attribute)()
    _registered[name] = plugin
    return plugin


__all__ = ["Capability", "EngineOptions", "EnginePlugin", "engine_names", "engine_plugin",
           "register_engine"]
