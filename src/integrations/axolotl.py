"""Axolotl plugin: DoRA layers rewritten when Axolotl compiles the model, set from the YAML config.

.. code-block:: yaml

    adapter: lora
    peft_use_dora: true
    torch_compile: true            # Axolotl hands the model to torch.compile (backend "inductor")
    plugins:
      - dora_fused.integrations.axolotl.DoraFusedPlugin

Axolotl imports the class by its dotted path and calls its hooks.
:meth:`DoraFusedPlugin.register` (when the config is loaded, in every process that
loads it) enables ``dora_fused``'s Inductor hook (``dora_fused.enable_inductor_hook``),
before the model is built or compiled; :meth:`DoraFusedPlugin.pre_model_load` enables
it again (a no-op) in case a run skips registration. Leave ``torch_compile_backend``
unset: accelerate accepts only its own list of backend names, and the hook acts on
Inductor's compiles. After training, the plugin logs how many DoRA modules the
compiled graphs rewrote (``dora_fused.reports()``).

Outside Axolotl the class derives from ``object`` and keeps the same hooks, so this
module imports without Axolotl.
"""

from __future__ import annotations

from typing import Any

import dora_fused
from dora_fused.logs import log

try:
    from axolotl.integrations.base import BasePlugin
except ImportError:  # Axolotl is not installed: nothing calls the plugin but a test
    BasePlugin = object

__all__ = ["DoraFusedPlugin"]


def _get(cfg: Any, key: str) -> Any:
    """``cfg[key]`` from Axolotl's ``DictDefault`` (missing keys read None) or a plain dict."""
    return cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)


class DoraFusedPlugin(BasePlugin):
    """Turns on the DoRA rewrite for Axolotl's ``torch_compile: true`` (see the module docstring)."""

    def register(self, cfg: Any) -> None:
        """Enable the Inductor hook when the config is loaded; warn about settings under which it does nothing."""
        dora_fused.enable_inductor_hook()
        if not _get(cfg, "torch_compile"):
            log.warning("dora_fused: torch_compile is not set: nothing is compiled, so no DoRA layer is rewritten")
        backend = _get(cfg, "torch_compile_backend")
        if backend not in (None, "inductor"):
            log.warning("dora_fused: torch_compile_backend=%r: the rewrite acts on Inductor's compiles only", backend)

    def on_config_validation_error(self, cfg: Any) -> None:
        """Axolotl rejected the config: undo :meth:`register`."""
        dora_fused.disable_inductor_hook()

    def pre_model_load(self, cfg: Any) -> None:
        """Enable the Inductor hook before the model is built (a no-op after :meth:`register`)."""
        dora_fused.enable_inductor_hook()

    def post_train(self, cfg: Any, model: Any) -> None:
        """Log what the compiled graphs rewrote: graphs, DoRA modules rewritten and left alone."""
        graphs = dora_fused.reports()
        rewritten = {name for report in graphs for name in report.rewritten}
        skipped = {name for report in graphs for name, _ in report.skipped}
        errors = [report.error for report in graphs if report.error]
        log.info(
            "dora_fused: %d compiled graphs, %d DoRA modules rewritten, %d left alone, %d pass errors",
            len(graphs),
            len(rewritten),
            len(skipped - rewritten),
            len(errors),
        )
