"""Plot of a benchmarks/convergence.py results file: loss curves and |Δloss| per contender.

    pip install -e ".[bench]"     # matplotlib: only this script needs it
    python benchmarks/plot_convergence.py results.json     # docs/img/convergence_<device>.png

Three panels over the optimizer steps, each contender averaged over the seeds that ran:
the training loss; ``|l_c(t) − l_ref(t)|`` against the fp32 reference; ``|l_c(t) − l_eager(t)|``
against bf16 eager. The per-step loss and its differences are smoothed with a centered moving
average of ``--window`` steps (|Δloss| is averaged before smoothing, so it stays an absolute
deviation). The dashed line is the reference's seed-to-seed spread (different weights and
batches), for scale.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLORS = {
    "reference": "#000000",
    "eager": "#8c8c8c",
    "torch_compile": "#4c72b0",
    "dora_fused": "#c44e52",
    "dora_fused_fp32": "#dd8452",
    "torch_compile_fp32": "#64b5cd",
}
IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


def _by_contender(rows: list[dict]) -> dict[str, dict[int, list[float]]]:
    losses: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        if row["status"] == "ok":
            losses.setdefault(row["contender"], {})[row["seed"]] = row["losses"]
    return losses


def plot(data: dict, out: str, window: int = 25) -> str:
    import matplotlib  # here, not at the top: ``--help`` works without it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def smooth(values: np.ndarray) -> np.ndarray:
        w = max(1, min(window, len(values)))
        padded = np.pad(values, (w // 2, w - 1 - w // 2), mode="edge")
        return np.convolve(padded, np.ones(w) / w, mode="valid")

    losses = _by_contender(data["rows"])
    meta = data["meta"]
    fig, axes = plt.subplots(3, 1, figsize=(12, 11), sharex=True)
    for name, seeds in losses.items():
        color = COLORS.get(name)
        mean = np.mean([seeds[s] for s in sorted(seeds)], axis=0)
        axes[0].plot(smooth(mean), color=color, lw=1.0, label=name)
        for ax, against in ((axes[1], "reference"), (axes[2], "eager")):
            if name == against or against not in losses:
                continue
            common = sorted(set(seeds) & set(losses[against]))
            if not common:
                continue
            deviation = np.mean([np.abs(np.subtract(seeds[s], losses[against][s])) for s in common], axis=0)
            ax.plot(smooth(deviation), color=color, lw=1.0, label=f"{name} (mean {deviation.mean():.2e})")
    spread = meta.get("summary", {}).get("reference_seed_spread_mean_abs")
    for ax, against in ((axes[1], "fp32 reference"), (axes[2], "bf16 eager")):
        if spread:
            ax.axhline(spread, color="black", ls="--", lw=0.8, label=f"reference seed-to-seed ({spread:.2e})")
        ax.set_yscale("log")
        ax.set_ylabel(f"|Δloss| to {against}")
    axes[0].set_ylabel("training loss")
    axes[-1].set_xlabel("optimizer step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    model = meta["model"]
    device = meta.get("gpu") or meta.get("cpu") or meta["device"]
    axes[0].set_title(
        f"PEFT DoRA fine-tune, random Llama ({model['layers']} layers, hidden {model['hidden']}, r {model['rank']}), "
        f"stdlib bytes\n{len(meta['seeds'])} seeds × {meta['steps']} steps, {meta['device']} ({device}), "
        f"moving average of {window} steps, mean over seeds",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a benchmarks/convergence.py results JSON")
    parser.add_argument("--out", default=None, help="PNG path (default docs/img/convergence_<device>.png)")
    parser.add_argument("--window", type=int, default=25, help="moving-average window, steps")
    args = parser.parse_args()
    with open(args.results) as f:
        data = json.load(f)
    out = args.out or str(IMG / f"convergence_{data['meta']['device']}.png")
    print(plot(data, out, args.window))


if __name__ == "__main__":
    main()
