"""Plots of a benchmarks/training.py results file: the target ratios, step times against LoRA's, peak memory.

    pip install -e ".[bench]"     # matplotlib: only the plots need it
    python benchmarks/plot_training.py training.json [--out docs/img/training]

writes ``<out>_ratios.png`` (one panel per target ratio of training.py, a bar per case, the
target as a dashed line), ``<out>_vs_lora.png`` (each contender's median step time ÷ LoRA's,
per case: 1 is LoRA's cost) and, where the run had CUDA, ``<out>_memory.png`` (peak MB above
the resident weights, per contender, training cases).
"""

from __future__ import annotations

import argparse
import json
import os

COLORS = {"peft_eager": "#8c8c8c", "torch_compile": "#4c72b0", "dora_fused": "#c44e52", "lora": "#55a868"}


def _grouped_bars(ax, cases: list[str], series: dict[str, list[float | None]]) -> None:
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(cases))]
        ax.bar(xs, [v or 0.0 for v in values], width, label=label, color=COLORS.get(label))
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def plot(data: dict, out: str) -> list[str]:
    import matplotlib  # here, not at the top: ``--help`` works without it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = data["meta"]
    title = f"{meta.get('gpu') or meta.get('cpu')}, torch {meta.get('torch')}, {meta.get('date')}"
    ok = {(r["case"], r["contender"]): r for r in data["rows"] if r.get("status") == "ok"}
    cases = list(dict.fromkeys(r["case"] for r in data["rows"]))
    contenders = [c for c in COLORS if any(key[1] == c for key in ok)]
    width = min(40.0, max(8.0, 0.6 * len(cases) + 3))
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(f"{out}_{name}.png", dpi=120)
        plt.close(fig)
        written.append(f"{out}_{name}.png")

    ratios = {entry["case"]: entry for entry in meta.get("ratios", [])}
    targets = meta.get("targets", {})  # ratio: (target, whether the ratio must be at least the target)
    fig, axes = plt.subplots(max(1, len(targets)), 1, figsize=(width, 3 * max(1, len(targets))), squeeze=False)
    for ax, (key, (target, at_least)) in zip(axes[:, 0], targets.items(), strict=False):
        _grouped_bars(ax, cases, {"dora_fused": [ratios.get(c, {}).get(key) for c in cases]})
        ax.axhline(target, color="black", lw=0.8, ls="--")
        ax.set_title(f"{key}, target {'≥' if at_least else '≤'} {target:.2f} (dashed)", fontsize=9)
    fig.suptitle(title)
    save(fig, "ratios")

    def relative(case: str, contender: str, key: str) -> float | None:
        mine, lora = ok.get((case, contender)), ok.get((case, "lora"))
        return mine[key] / lora[key] if mine and lora and mine.get(key) and lora.get(key) else None

    fig, ax = plt.subplots(figsize=(width, 4.5))
    _grouped_bars(ax, cases, {c: [relative(case, c, "ms") for case in cases] for c in contenders})
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylabel("median step time ÷ LoRA's")
    ax.set_title(title)
    ax.legend(fontsize=8)
    save(fig, "vs_lora")

    train = [c for c in cases if any((ok.get((c, k)) or {}).get("peak_mb") for k in contenders) and "-train" in c]
    if train:
        fig, ax = plt.subplots(figsize=(max(8.0, 0.6 * len(train) + 3), 4.5))
        _grouped_bars(ax, train, {k: [(ok.get((c, k)) or {}).get("peak_mb") for c in train] for k in contenders})
        ax.set_ylabel("peak MB above resident, training step")
        ax.set_title(title)
        ax.legend(fontsize=8)
        save(fig, "memory")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results")
    parser.add_argument("--out", default="docs/img/training", help="path prefix of the PNG files")
    args = parser.parse_args()
    with open(args.results) as f:
        data = json.load(f)
    out = args.out.removesuffix(".png")
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    for path in plot(data, out):
        print(path)


if __name__ == "__main__":
    main()
