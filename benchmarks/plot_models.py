"""Plots of a benchmarks/models.py results file: speedup and peak memory per case, against both baselines.

    pip install -e ".[bench]"     # matplotlib: only this script needs it
    python benchmarks/plot_models.py results.json --out docs/img/models

writes ``<out>_speedup.png`` (each contender's speedup over PEFT eager, top, and over
torch.compile, bottom: median time of the baseline ÷ the contender's, > 1 is faster) and
``<out>_memory.png`` (peak GB above the resident weights, each contender, with the ratio of
dora_fused to torch.compile). Cases and rows are chosen as in models_table.py.
"""

from __future__ import annotations

import argparse
import os

from models_table import LABELS, load, pick

COLORS = {
    "peft_eager": "#8c8c8c",
    "inductor": "#4c72b0",
    "inductor_polyfill": "#64b5cd",
    "dora_fused": "#c44e52",
    "lora_inductor": "#55a868",
    "merged": "#dd8452",
}


def _ok(row: dict | None, key: str) -> float | None:
    if row is None or row.get("status") != "ok" or not row.get(key):
        return None
    return row[key]


def _bars(ax, cases: list[str], series: dict[str, list[float | None]]) -> None:
    width = 0.8 / max(1, len(series))
    for i, (contender, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(cases))]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, heights, width, label=LABELS[contender], color=COLORS[contender])
        for bar, v in zip(bars, values, strict=True):
            if v is None:  # not run, failed or out of memory: a mark instead of a bar
                ax.text(bar.get_x() + bar.get_width() / 2, 0, "×", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def plot(data: dict, out: str, title: str) -> list[str]:
    import matplotlib  # here, not at the top: ``--help`` works without it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = pick(data["rows"])
    cases = list(chosen)
    present = [c for c in LABELS if any(c in by for by in chosen.values())]
    width = max(8.0, 1.1 * len(cases) + 3)
    written = []

    baselines = [b for b in ("peft_eager", "inductor") if any(_ok(by.get(b), "ms") for by in chosen.values())]
    fig, axes = plt.subplots(max(1, len(baselines)), 1, figsize=(width, 4 * max(1, len(baselines))), squeeze=False)
    for ax, baseline in zip(axes[:, 0], baselines, strict=False):
        series = {}
        for contender in present:
            if contender == baseline:
                continue
            values = []
            for case in cases:
                base, mine = _ok(chosen[case].get(baseline), "ms"), _ok(chosen[case].get(contender), "ms")
                values.append(base / mine if base and mine else None)
            series[contender] = values
        _bars(ax, cases, series)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_ylabel(f"speedup over {LABELS[baseline]} (×)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[0, 0].set_title(f"{title}\nspeedup: median time of the baseline ÷ the contender's (higher is faster)")
    fig.tight_layout()
    path = f"{out}_speedup.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(width, 4.5))
    series = {c: [_ok(chosen[case].get(c), "peak_gb") for case in cases] for c in present}
    _bars(ax, cases, series)
    highest = max([v for values in series.values() for v in values if v is not None], default=1.0)
    for j, case in enumerate(cases):
        mine, base = _ok(chosen[case].get("dora_fused"), "peak_gb"), _ok(chosen[case].get("inductor"), "peak_gb")
        if mine and base:
            ax.text(j, highest * 1.03, f"{mine / base:.2f}×", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, highest * 1.15)
    ax.set_ylabel("peak GB above resident")
    ax.set_title(f"{title}\npeak memory above resident (numbers: dora_fused ÷ torch.compile)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = f"{out}_memory.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results")
    parser.add_argument("--out", required=True, help="path prefix: writes <out>_speedup.png and <out>_memory.png")
    parser.add_argument("--title", default=None, help="default: the GPU and date of the results")
    args = parser.parse_args()
    data = load(args.results)
    out = args.out.removesuffix(".png")
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    runs = list(data.get("meta", {}).get("runs", {}).values())
    title = args.title or (f"{runs[-1].get('gpu') or runs[-1].get('cpu')}, {runs[-1].get('date')}" if runs else "")
    for path in plot(data, out, title):
        print(path)


if __name__ == "__main__":
    main()
