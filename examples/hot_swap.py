"""Switch DoRA adapters in a model compiled with the dora_fused backend.

Two ways, both giving the new adapter's outputs from the very next call:

1. ``model.set_adapter(name)`` between adapters loaded side by side. Dynamo guards on
   the active adapter's name, so each adapter is compiled once, the first time it is
   active; swapping back and forth after that compiles nothing.
2. Loading another adapter's weights *in place* into the active adapter
   (``set_peft_model_state_dict``, which copies into the existing tensors). Same
   shapes and same config (r, lora_alpha, target modules): nothing is recompiled.

PEFT's own ``peft.utils.hotswap.hotswap_adapter`` does not support DoRA in PEFT 0.21
(it raises a KeyError on the ``lora_magnitude_vector`` keys); way 2 does the same job.

Runs on the CPU in well under a minute (a tiny random-init Llama):

    python examples/hot_swap.py
"""

from __future__ import annotations

import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model, load_peft_weights, set_peft_model_state_dict
from tiny_llama import perturb_magnitudes, tiny_llama_config
from transformers import LlamaForCausalLM

import dora_fused


def base_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same base weights every time
    return LlamaForCausalLM(tiny_llama_config()).eval()


def save_random_adapter(path: str, seed: int) -> None:
    """Stand-in for a trained adapter: random A, B and magnitudes (not DoRA's identity init)."""
    model = base_model()
    torch.manual_seed(seed)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    model = get_peft_model(model, lora)
    perturb_magnitudes(model)
    model.save_pretrained(path)


def main() -> None:
    compiles = []
    inner = dora_fused.backend()  # what backend="dora_fused" runs; wrapped here only to count compiles

    def counting_backend(gm, example_inputs, **kwargs):
        compiles.append(gm)
        return inner(gm, example_inputs, **kwargs)

    input_ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: f"{tmp}/{name}" for name in ("a", "b", "c")}
        for seed, path in enumerate(paths.values()):
            save_random_adapter(path, seed)

        model = PeftModel.from_pretrained(base_model(), paths["a"], adapter_name="a")
        model.load_adapter(paths["b"], adapter_name="b")
        model.set_adapter("a")  # before compiling: PEFT's first set_adapter changes what Dynamo guards on
        compiled = torch.compile(model, backend=counting_backend)

        def reference(adapter_path: str) -> torch.Tensor:
            eager = PeftModel.from_pretrained(base_model(), adapter_path)
            return eager(input_ids=input_ids).logits

        with torch.no_grad():
            # 1. set_adapter between loaded adapters
            for name in ("a", "b", "a", "b"):
                model.set_adapter(name)
                diff = (compiled(input_ids=input_ids).logits - reference(paths[name])).abs().max().item()
                print(f"set_adapter({name!r}): max |compiled - eager| = {diff:.2g}, compiles so far: {len(compiles)}")

            # 2. adapter c's weights copied in place into the active adapter "b"
            set_peft_model_state_dict(model, load_peft_weights(paths["c"]), adapter_name="b")
            diff = (compiled(input_ids=input_ids).logits - reference(paths["c"])).abs().max().item()
            print(
                f"c loaded in place into 'b': max |compiled - eager c| = {diff:.2g}, compiles so far: {len(compiles)}"
            )

    print(dora_fused.last_report().summary())


if __name__ == "__main__":
    main()
