"""How long the rewrite pass takes on large graphs (CPU; no GPU needed).

Question: is matching linear in graph size, and well under a second for a model
of a few thousand nodes? Tiny-width Llamas with 2..32 layers, PEFT DoRA on every
linear layer; a backend times ``DoraRewritePass`` on Dynamo's graph (median of
5 runs on fresh copies of the graph) and then runs the graph as traced.

    python benchmarks/matching_cost.py
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import TINY_LLAMA, tiny_llama_dora

from dora_fused.passes import DoraRewritePass


def main() -> None:
    print("| layers | graph nodes | DoRA modules rewritten | pass ms (median of 5) | µs per node |")
    print("|---|---|---|---|---|")
    for layers in (2, 8, 16, 32):
        TINY_LLAMA["num_hidden_layers"] = layers
        model = tiny_llama_dora(torch.float32, torch.float32).eval()
        timings: list[float] = []
        facts: dict[str, int] = {}

        def backend(gm, example_inputs, timings=timings, facts=facts):
            facts["nodes"] = len(gm.graph.nodes)
            for _ in range(5):
                fresh = copy.deepcopy(gm)
                start = time.perf_counter()
                outcome = DoraRewritePass()(fresh)
                timings.append(time.perf_counter() - start)
                facts["rewritten"] = sum(r.status == "rewritten" for r in outcome.records)
            return gm.forward

        torch._dynamo.reset()
        torch.compile(model, backend=backend)(inputs_embeds=torch.randn(1, 5, TINY_LLAMA["hidden_size"]))
        ms = statistics.median(timings) * 1e3
        print(f"| {layers} | {facts['nodes']} | {facts['rewritten']} | {ms:.1f} | {1e3 * ms / facts['nodes']:.1f} |")


if __name__ == "__main__":
    main()
