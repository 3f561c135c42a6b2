"""The Axolotl plugin: named in the YAML's ``plugins:``, it turns the Inductor hook on for ``torch_compile: true``.

Axolotl 0.19 pins peft 0.20, transformers 5.16 and accelerate 1.13, so it rarely shares an
environment with this project's test extra. Where it is installed, Axolotl's own
``prepare_plugins`` loads the plugin from the config and its ``PluginManager`` calls the hooks.
Where it is not, the same steps run as Axolotl 0.19 takes them: ``load_plugin`` splits the dotted
path, imports the module and instantiates the class; ``prepare_plugins`` calls ``register(cfg)``;
the model loader calls ``pre_model_load(cfg)``; a rejected config calls
``on_config_validation_error(cfg)``; the end of training calls ``post_train(cfg, model)``.
"""

from __future__ import annotations

import importlib
import inspect
import logging

import pytest
import torch
import yaml

import dora_fused
from dora_fused.integrations.axolotl import AXOLOTL_LORA_KERNELS, DoraFusedPlugin

PLUGIN = "dora_fused.integrations.axolotl.DoraFusedPlugin"
CONFIG = f"""
base_model: ./tiny-llama
adapter: lora
peft_use_dora: true
lora_r: 4
lora_target_linear: true
torch_compile: true
plugins:
  - {PLUGIN}
"""

try:
    from axolotl.integrations.base import BasePlugin, PluginManager
    from axolotl.utils.config import prepare_plugins
    from axolotl.utils.dict import DictDefault
except ImportError:
    PluginManager = None


@pytest.fixture
def hook_settings():
    """Inductor's pre-grad settings restored after the test, and the hook off."""
    config = torch._inductor.config
    before = (config.pre_grad_custom_pass, config.pre_grad_pass_timing)
    dora_fused.disable_inductor_hook()
    yield
    dora_fused.disable_inductor_hook()
    config.pre_grad_custom_pass, config.pre_grad_pass_timing = before


def _load_as_axolotl_does(cfg: dict):
    """The plugin instance Axolotl's ``prepare_plugins`` registers for ``cfg``; ``register(cfg)`` called."""
    if PluginManager is not None:
        cfg = DictDefault(cfg)
        prepare_plugins(cfg)
        return PluginManager.get_instance().plugins[PLUGIN], cfg
    module_name, class_name = PLUGIN.rsplit(".", 1)
    plugin = getattr(importlib.import_module(module_name), class_name)()
    plugin.register(cfg)
    return plugin, cfg


def test_the_yaml_plugins_entry_turns_the_hook_on_and_a_rejected_config_turns_it_off(hook_settings):
    plugin, cfg = _load_as_axolotl_does(yaml.safe_load(CONFIG))
    assert isinstance(plugin, DoraFusedPlugin)
    assert dora_fused.inductor_hook_enabled()
    # Axolotl's validation would switch its LoRA kernels on, replacing PEFT's DoRA forward
    assert all(cfg[key] is False for key in AXOLOTL_LORA_KERNELS)
    if PluginManager is not None:
        assert isinstance(plugin, BasePlugin)
        PluginManager.get_instance().pre_model_load(cfg)
        PluginManager.get_instance().on_config_validation_error(cfg)
    else:
        plugin.pre_model_load(cfg)
        plugin.on_config_validation_error(cfg)
    assert not dora_fused.inductor_hook_enabled()
    plugin.pre_model_load(cfg)  # the loader's hook turns it on as well
    assert dora_fused.inductor_hook_enabled()


@pytest.mark.parametrize(
    "settings,warning",
    [
        ({"torch_compile": False}, "nothing is compiled"),
        ({"torch_compile_backend": "eager"}, "Inductor's compiles"),
        ({"lora_qkv_kernel": True}, "lora_qkv_kernel on: the layers they cover are not rewritten"),
    ],
)
def test_the_plugin_warns_when_the_config_compiles_nothing_it_can_rewrite(hook_settings, caplog, settings, warning):
    cfg = {**yaml.safe_load(CONFIG), **settings}
    with caplog.at_level(logging.WARNING, logger="axolotl.integrations.dora_fused"):
        _, cfg = _load_as_axolotl_does(cfg)
    assert any(warning in record.getMessage() for record in caplog.records), caplog.text
    assert all(cfg[key] is settings.get(key, False) for key in AXOLOTL_LORA_KERNELS)  # a setting given is kept


def test_post_train_logs_what_the_compiled_graphs_rewrote(caplog):
    dora_fused.clear_reports()
    with caplog.at_level(logging.INFO, logger="axolotl.integrations.dora_fused"):
        DoraFusedPlugin().post_train({}, None)
    assert "0 compiled graphs, 0 DoRA modules rewritten" in caplog.text


@pytest.mark.skipif(PluginManager is None, reason="Axolotl is not installed")
def test_the_hooks_take_the_arguments_axolotl_passes():
    for name in ("register", "on_config_validation_error", "pre_model_load", "post_train"):
        ours = list(inspect.signature(getattr(DoraFusedPlugin, name)).parameters)
        theirs = list(inspect.signature(getattr(BasePlugin, name)).parameters)
        assert ours == theirs, name
