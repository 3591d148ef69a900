"""The vLLM engine's driver side. vLLM builds its models only inside a rank, so sources are
routed on the ranks' live models (the default), and it forms its process group once per
process: a restarted rank restarts its whole engine."""

from __future__ import annotations

from actors.engines.plugin import EngineOptions, EnginePlugin
from actors.engines.vllm import platform


class VllmEngine(EnginePlugin):
    name = "vllm"
    runtime = "actors.engines.vllm.runtime:VllmRuntime"
    capabilities = frozenset({"staging"})

    def check_options(self, options: EngineOptions) -> None:
        platform.check_options(options)

    def check_model(self, options: EngineOptions) -> None:
        platform.check_model(options)
