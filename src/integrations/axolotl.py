"""Axolotl plugin: DoRA layers rewritten when Axolotl compiles the model, set from the YAML config.

.. code-block:: yaml

    adapter: lora
    peft_use_dora: true
    torch_compile: true            # Axolotl hands the model to torch.compile (backend "inductor")
    plugins:
      - dora_fused.integrations.axolotl.DoraFusedPlugin

Axolotl imports the class by its dotted path and calls its hooks.
:meth:`DoraFusedPlugin.register` (when the config is loaded, in every process that
loads it, before Axolotl validates the config) enables ``dora_fused``'s Inductor hook
(``dora_fused.enable_inductor_hook``), before the model is built or compiled, and
turns off Axolotl's own LoRA kernels (``lora_mlp_kernel``, ``lora_qkv_kernel``,
``lora_o_kernel``, ``lora_embedding_kernel``) where the config leaves them unset:
Axolotl switches them on by default, and they replace PEFT's DoRA forward, which is
what the rewrite finds in the graph. Kernels the config sets to true are kept, with a
warning: those layers are not rewritten. :meth:`DoraFusedPlugin.pre_model_load`
enables the hook again (a no-op) in case a run skips registration. Leave
``torch_compile_backend`` unset: accelerate accepts only its own list of backend
names, and the hook acts on Inductor's compiles. After training, the plugin logs how
many DoRA modules the compiled graphs rewrote (``dora_fused.reports()``), under the
logger ``axolotl.integrations.dora_fused``, which Axolotl shows at INFO; the per-graph
lines of the ``dora_fused`` logger (``DORA_FUSED_LOG=info``) also need Axolotl's
``LOG_LEVEL=INFO``.

Outside Axolotl the class derives from ``object`` and keeps the same hooks, so this
module imports without Axolotl.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import dora_fused

try:
    from axolotl.integrations.base import BasePlugin
except ImportError:  # Axolotl is not installed: nothing calls the plugin but a test
    BasePlugin = object

__all__ = ["AXOLOTL_LORA_KERNELS", "DoraFusedPlugin"]

# Axolotl's logging drops records below WARNING from loggers outside "axolotl." (unless LOG_LEVEL
# says otherwise): the plugin's own lines go under Axolotl's integrations, where INFO shows.
log = logging.getLogger("axolotl.integrations.dora_fused")

# Axolotl's fused LoRA kernels (on by default when unset): they replace PEFT's LoRA/DoRA forward
AXOLOTL_LORA_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")


class DoraFusedPlugin(BasePlugin):
    """Turns on the DoRA rewrite for Axolotl's ``torch_compile: true`` (see the module docstring)."""

    def register(self, cfg: MutableMapping[str, Any]) -> None:
        """Enable the Inductor hook and keep PEFT's DoRA forward; warn about settings under which nothing is rewritten.

        ``cfg`` is the config as loaded, before Axolotl validates it: Axolotl's LoRA kernels
        left unset here are set to False, so that its validation does not switch them on.
        """
        dora_fused.enable_inductor_hook()
        unset = [key for key in AXOLOTL_LORA_KERNELS if cfg.get(key) is None]
        for key in unset:
            cfg[key] = False
        if unset:
            log.info("dora_fused: %s set to false: Axolotl's LoRA kernels replace PEFT's forward", ", ".join(unset))
        kept = [key for key in AXOLOTL_LORA_KERNELS if cfg.get(key)]
        if kept:
            log.warning("dora_fused: %s on: the layers they cover are not rewritten", ", ".join(kept))
        if not cfg.get("torch_compile"):
            log.warning("dora_fused: torch_compile is not set: nothing is compiled, so no DoRA layer is rewritten")
        backend = cfg.get("torch_compile_backend")
        if backend not in (None, "inductor"):
            log.warning("dora_fused: torch_compile_backend=%r: the rewrite acts on Inductor's compiles only", backend)

    def on_config_validation_error(self, cfg: MutableMapping[str, Any]) -> None:
        """Axolotl rejected the config: undo :meth:`register`."""
        dora_fused.disable_inductor_hook()

    def pre_model_load(self, cfg: MutableMapping[str, Any]) -> None:
        """Enable the Inductor hook before the model is built (a no-op after :meth:`register`)."""
        dora_fused.enable_inductor_hook()

    def post_train(self, cfg: MutableMapping[str, Any], model: Any) -> None:
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
