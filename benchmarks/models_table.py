"""Markdown tables of a benchmarks/models.py results file: time, memory, compile, accuracy per case.

    python benchmarks/models_table.py results.json [--out table.md]

Per (case, contender) it takes the latest row with status "ok", else the latest row (whose
status is then shown: "timeout", "error", "skipped"). Speedups are ratios of median times:
> 1 means dora_fused is faster. Standard library only.
"""

from __future__ import annotations

import argparse
import json

LABELS = {  # contender → column label, in column order
    "peft_eager": "PEFT eager",
    "inductor": "torch.compile",
    "inductor_polyfill": "torch.compile + polyfill",
    "dora_fused": "dora_fused",
    "lora_inductor": "LoRA compiled",
    "merged": "merged",
}
DORA_MATH = ("peft_eager", "inductor", "inductor_polyfill", "dora_fused", "merged")


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def pick(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """{case: {contender: row}}: the latest ok row, else the latest row; cases in first-seen order."""
    chosen: dict[str, dict[str, dict]] = {}
    for row in rows:
        if row["contender"] == "fp64_ref":
            continue
        slot = chosen.setdefault(row["case"], {})
        old = slot.get(row["contender"])
        if old is None or row.get("status") == "ok" or old.get("status") != "ok":
            slot[row["contender"]] = row
    return chosen


def _status(row: dict | None) -> str | None:
    if row is None:
        return "—"
    status = row.get("status", "")
    if status == "ok":
        return None
    if "OutOfMemory" in row.get("error", "") or "out of memory" in row.get("error", ""):
        return "OOM"
    return status.split(":")[0]


def _num(row: dict | None, key: str, fmt: str) -> str:
    status = _status(row)
    if status is not None:
        return status
    value = row.get(key)
    return "—" if value is None else format(value, fmt)


def _time(row: dict | None) -> str:
    """Median ms; for training, the whole step with its forward+backward part in parentheses."""
    text = _num(row, "ms", ".1f")
    if _status(row) is None and row.get("fwd_bwd_ms") is not None:
        text += f" ({row['fwd_bwd_ms']:.1f})"
    return text


def _ratio(a: dict | None, b: dict | None, key: str = "ms") -> str:
    if _status(a) is not None or _status(b) is not None or not a.get(key) or not b.get(key):
        return "—"
    return f"{a[key] / b[key]:.2f}×"


def _describe(any_row: dict) -> str:
    adapters = "bf16 base + fp32 adapters" if any_row["adapters"] == "fp32ad" else "all-bf16"
    tokens = f"{any_row['batch']}×{any_row['seq']}"
    micro = any_row.get("micro_batches") or (4 if any_row["mode"] == "train-accum4" else 1)
    scope = " (each layer compiled)" if any_row.get("compile_scope") == "block" else ""
    return f"{any_row['layers']} layers{scope}, r={any_row['r']}, {adapters}, {tokens} tokens" + (
        f" × {micro} micro-batches" if micro > 1 else ""
    )


def tables(data: dict) -> str:
    chosen = pick(data["rows"])
    present = [c for c in LABELS if any(c in by for by in chosen.values())]
    lines = []
    runs = {row["run_id"] for by in chosen.values() for row in by.values()}
    for run_id in sorted(runs):
        env = data.get("meta", {}).get("runs", {}).get(run_id)
        if env:
            lines.append(
                f"Run {run_id}: {env.get('gpu') or env.get('cpu')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
                f"triton {env.get('triton')}, peft {env.get('peft')}, transformers {env.get('transformers')}, "
                f"Python {env.get('python')}, {env.get('date')}{' (--tiny)' if env.get('tiny') else ''}."
            )
    lines.append("")

    head = " | ".join(LABELS[c] for c in present)
    polyfill = "inductor_polyfill" in present
    lines += [
        "**Time** (median ms per call: prefill for `infer`; for `train*` the whole optimizer step, its "
        "forward+backward in parentheses; speedups from these medians, > 1: dora_fused faster)",
        "",
        f"| case | setup | {head} | dora_fused vs PEFT eager | vs torch.compile | "
        + ("vs torch.compile + polyfill | " if polyfill else "")
        + "dora_fused ÷ LoRA |",
        "|---|---|" + "---|" * (len(present) + 3 + polyfill),
    ]
    for case, by in chosen.items():
        any_row = next(iter(by.values()))
        d = by.get("dora_fused")
        cells = [_time(by.get(c)) for c in present]
        ratios = [_ratio(by.get("peft_eager"), d), _ratio(by.get("inductor"), d)]
        ratios += [_ratio(by.get("inductor_polyfill"), d)] if polyfill else []
        ratios += [_ratio(d, by.get("lora_inductor"))]
        lines.append(f"| {case} | {_describe(any_row)} | " + " | ".join(cells + ratios) + " |")

    lines += [
        "",
        "**Peak memory** (GB above the resident weights, optimizer state and inputs; resident GB of dora_fused)",
        "",
        f"| case | resident | {head} | dora_fused ÷ torch.compile |",
        "|---|---|" + "---|" * (len(present) + 1),
    ]
    for case, by in chosen.items():
        d = by.get("dora_fused")
        cells = [_num(by.get(c), "peak_gb", ".2f") for c in present]
        lines.append(
            f"| {case} | {_num(d, 'resident_gb', '.1f')} | "
            + " | ".join([*cells, _ratio(d, by.get("inductor"), "peak_gb")])
            + " |"
        )

    split = [(case, by) for case, by in chosen.items() if any(r.get("peak_fwd_bwd_gb") for r in by.values())]
    if split:
        lines += [
            "",
            "**Training peak, split** (GB above the resident set: the peak of the first timed step's forward+backward, "
            "its adapter gradients included, and of the whole step, the optimizer's included)",
            "",
            "| case | " + " | ".join(f"{LABELS[c]}: fwd+bwd / step" for c in present if c != "merged") + " |",
            "|---|" + "---|" * len([c for c in present if c != "merged"]),
        ]
        for case, by in split:
            cells = []
            for c in present:
                if c == "merged":
                    continue
                row = by.get(c)
                both = _status(row) is None and row.get("peak_fwd_bwd_gb") is not None
                cells.append(f"{row['peak_fwd_bwd_gb']:.2f} / {row['peak_gb']:.2f}" if both else "—")
            lines.append(f"| {case} | " + " | ".join(cells) + " |")

    compiled = [c for c in present if c != "peft_eager"]
    lines += [
        "",
        "**Compile and rewrites** (compile s: the first call and the warm-up calls minus their steady-state "
        "time; rewritten: DoRA modules dora_fused rewrote / DoRA modules; graphs: Dynamo graphs compiled, with "
        "recompile-limit hits in parentheses)",
        "",
        "| case | "
        + " | ".join(f"compile s: {LABELS[c]}" for c in compiled)
        + " | rewritten | graphs: torch.compile | graphs: dora_fused |",
        "|---|" + "---|" * (len(compiled) + 3),
    ]
    for case, by in chosen.items():
        d = by.get("dora_fused")
        if _status(d):
            rewritten = _status(d)
        elif d.get("graphs_compiled") == 0:  # the process had compiled this graph for an earlier case
            rewritten = "graph reused"
        elif d.get("compile_scope") == "block":  # one graph shared by every decoder layer
            rewritten = f"{d.get('rewritten', '—')}/{d.get('dora_modules', 0) // max(1, d['layers'])} per layer"
        else:
            rewritten = f"{d.get('rewritten', '—')}/{d.get('dora_modules', '—')}"

        def graphs(row):
            if _status(row):
                return _status(row)
            hits = row.get("recompile_limit_hits") or 0
            return f"{row.get('graphs_compiled', '—')}" + (f" ({hits})" if hits else "")

        cells = [_num(by.get(c), "compile_s", ".0f") for c in compiled]
        cells += [rewritten, graphs(by.get("inductor")), graphs(d)]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")

    checked = [c for c in present if c in DORA_MATH]
    with_grads = [c for c in checked if c not in ("merged",)]
    lines += [
        "",
        "**Error against PEFT's math in float64** (‖x − x₆₄‖ / ‖x₆₄‖: logits of the last position; gradients "
        "of every magnitude and of layer 0's q_proj and down_proj adapters, training cases)",
        "",
        "| case | "
        + " | ".join([f"logits: {LABELS[c]}" for c in checked] + [f"grads: {LABELS[c]}" for c in with_grads])
        + " |",
        "|---|" + "---|" * (len(checked) + len(with_grads)),
    ]
    for case, by in chosen.items():
        cells = [_num(by.get(c), "rel_err", ".1e") for c in checked]
        cells += [_num(by.get(c), "grad_rel_err", ".1e") for c in with_grads]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results")
    parser.add_argument("--out", default=None, help="write the markdown here instead of printing it")
    args = parser.parse_args()
    text = tables(load(args.results))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
