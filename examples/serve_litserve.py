"""Serve a PEFT DoRA model compiled with the dora_fused backend over HTTP, with LitServe.

vLLM and SGLang refuse DoRA adapters. LitServe (``pip install litserve``) serves any
PyTorch model: each worker loads the base model and the adapter, compiles it with
``backend="dora_fused"`` and warms it up before ``/health`` reports ready.

    python examples/serve_litserve.py                     # a tiny random-init Llama + DoRA adapter
    python examples/serve_litserve.py --model BASE_DIR --adapter ADAPTER_DIR --port 8000
    python examples/serve_litserve.py --model BASE_DIR --adapter ADAPTER_DIR --frozen   # a fixed adapter

    curl -s 127.0.0.1:8000/predict -H 'Content-Type: application/json' \\
         -d '{"input_ids": [1, 5, 9, 2], "max_new_tokens": 4}'
    {"tokens": [...], "logits": [[...], ...]}   # greedy continuation, and each step's next-token logits

``"logits": false`` in the request leaves the logits out of the answer.

``--frozen`` serves with frozen inference (``dora_fused.backend(frozen=True)``): each DoRA
module's norm is computed once, at compile time, so a layer costs what LoRA costs;
``--merge-budget-bytes N`` also merges whole weights (the merged model's cost) while N
bytes of extra weight memory last. A changed adapter is still seen at the next request.

Requests are decoded greedily, one full forward per new token (no KV cache): a
small, exact reference for tests, not a fast decoder.
"""

from __future__ import annotations

import argparse
import tempfile

import litserve as ls
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_llama import perturb_magnitudes, tiny_llama_config
from transformers import AutoModelForCausalLM, LlamaForCausalLM


@torch.no_grad()
def greedy(model: torch.nn.Module, input_ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding by full forwards: the new tokens and each step's next-token logits [steps, vocab]."""
    ids = torch.tensor([input_ids])
    steps = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids).logits[0, -1].float()
        steps.append(logits)
        ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0, len(input_ids) :].tolist(), torch.stack(steps)


class DoraLM(ls.LitAPI):
    def __init__(
        self,
        model_dir: str,
        adapter_dir: str,
        inner: str = "inductor",
        *,
        dtype: str = "float32",
        frozen: bool = False,
        merge_budget_bytes: int = 0,
        compile: bool = True,
    ):
        super().__init__()
        self.model_dir, self.adapter_dir, self.inner = model_dir, adapter_dir, inner
        self.dtype, self.frozen, self.merge_budget_bytes, self.compile = dtype, frozen, merge_budget_bytes, compile

    def setup(self, device: str) -> None:
        import dora_fused

        base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, self.dtype))
        model = PeftModel.from_pretrained(base, self.adapter_dir).to(device).eval()
        if not self.compile:
            self.model = model  # PEFT eager, for comparison
        elif self.inner == "inductor" and not self.frozen:
            self.model = torch.compile(model, backend="dora_fused")
        else:
            # frozen=True: norms (or, within the budget, whole weights) computed once; requests run without grad
            backend = dora_fused.backend(
                inner=self.inner, frozen=self.frozen or None, merge_budget_bytes=self.merge_budget_bytes
            )
            self.model = torch.compile(model, backend=backend)
        # Compile before serving: two lengths, so the second compile makes the sequence length dynamic.
        for length in (4, 5):
            greedy(self.model, list(range(length)), 1)

    def decode_request(self, request: dict) -> tuple[list[int], int, bool]:
        ids = [int(t) for t in request["input_ids"]]
        return ids, int(request.get("max_new_tokens", 8)), bool(request.get("logits", True))

    def predict(self, request: tuple[list[int], int, bool]) -> tuple[list[int], torch.Tensor | None]:
        ids, max_new_tokens, with_logits = request
        tokens, logits = greedy(self.model, ids, max_new_tokens)
        return tokens, logits if with_logits else None

    def encode_response(self, output: tuple[list[int], torch.Tensor | None]) -> dict:
        tokens, logits = output
        return {"tokens": tokens} if logits is None else {"tokens": tokens, "logits": logits.tolist()}


def save_tiny_model(root: str) -> tuple[str, str]:
    """A tiny random-init Llama and a DoRA adapter off its identity init, saved as a user would have them."""
    torch.manual_seed(0)
    config = tiny_llama_config()
    LlamaForCausalLM(config).save_pretrained(f"{root}/base")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(f"{root}/base"), lora)
    perturb_magnitudes(model)
    model.save_pretrained(f"{root}/adapter")
    return f"{root}/base", f"{root}/adapter"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="base model directory (default: a tiny random-init Llama)")
    parser.add_argument("--adapter", help="PEFT DoRA adapter directory (required with --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--inner",
        default="inductor",
        choices=["inductor", "aot_eager", "eager"],
        help="what compiles the rewritten graph (tests use aot_eager: no C++ compile on CPU)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="base dtype")
    parser.add_argument("--frozen", action="store_true", help="frozen inference: DoRA norms computed once")
    parser.add_argument(
        "--merge-budget-bytes", type=int, default=0, help="with --frozen: extra bytes for merged weights"
    )
    parser.add_argument("--eager", action="store_true", help="serve PEFT eager, uncompiled (for comparison)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model, args.adapter = save_tiny_model(tmp)
        elif args.adapter is None:
            parser.error("--adapter is required with --model")
        api = DoraLM(
            args.model,
            args.adapter,
            args.inner,
            dtype=args.dtype,
            frozen=args.frozen,
            merge_budget_bytes=args.merge_budget_bytes,
            compile=not args.eager,
        )
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
        server = ls.LitServer(api, accelerator=accelerator, devices=1, timeout=120)
        server.run(host=args.host, port=args.port, num_api_servers=1, generate_client_file=False)


if __name__ == "__main__":
    main()
