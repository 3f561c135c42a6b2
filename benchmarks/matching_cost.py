"""How long the rewrite pass takes on large graphs (CPU; no GPU needed).

Question: is matching linear in graph size, and well under a second for a model
of a few thousand nodes? Tiny-width Llamas with 2..32 layers, PEFT DoRA on every
linear layer; a backend times ``DoraRewritePass`` on Dynamo's graph (median of
--reps runs on fresh copies of the graph, ``time.perf_counter``) and then runs the
graph as traced. Prints a markdown table; --json writes the rows with the CPU,
versions and date.

    python benchmarks/matching_cost.py [--layers 2,8,16,32] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import TINY_LLAMA, tiny_llama_dora

from dora_fused.passes import DoraRewritePass

from timing import summarize, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="2,8,16,32", help="decoder layers of each model")
    parser.add_argument("--reps", type=int, default=5, help="timed runs of the pass per model")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    print(f"| layers | graph nodes | DoRA modules rewritten | pass ms (median of {args.reps}) | µs per node |")
    print("|---|---|---|---|---|")
    for layers in [int(n) for n in args.layers.split(",")]:
        TINY_LLAMA["num_hidden_layers"] = layers
        model = tiny_llama_dora(torch.float32, torch.float32).eval()
        timings: list[float] = []
        facts: dict[str, int] = {}

        def backend(gm, example_inputs, timings=timings, facts=facts):
            facts["nodes"] = len(gm.graph.nodes)
            for _ in range(args.reps):
                fresh = copy.deepcopy(gm)
                start = time.perf_counter()
                outcome = DoraRewritePass()(fresh)
                timings.append((time.perf_counter() - start) * 1e3)
                facts["rewritten"] = sum(r.status == "rewritten" for r in outcome.records)
            return gm.forward

        torch._dynamo.reset()
        torch.compile(model, backend=backend)(inputs_embeds=torch.randn(1, 5, TINY_LLAMA["hidden_size"]))
        stats = summarize(timings)
        ms = stats["ms"]
        print(f"| {layers} | {facts['nodes']} | {facts['rewritten']} | {ms:.1f} | {1e3 * ms / facts['nodes']:.1f} |")
        rows.append(dict(layers=layers, **facts, **stats))
    write_json(args.json, rows, reps=args.reps)


if __name__ == "__main__":
    main()
