"""The README tables of the total-size rows of bench_smollm2.py (width_depth.py): pure Python, no torch."""

from __future__ import annotations

import statistics

import smollm2_rows
from smollm2_rows import TOTAL_SIZE_PRUNERS


def is_total_size(run: str) -> bool:
    row = smollm2_rows.ROWS.get(run)
    return row is not None and row.pruner in TOTAL_SIZE_PRUNERS


def _shape(r: dict) -> str:
    s = r.get("shape") or {}
    if not s:
        return "–"
    return (
        f"{s['hidden_size']} wide, {s['num_hidden_layers']} layers, {s['num_attention_heads']}/"
        f"{s['num_key_value_heads']} heads, FFN {s['intermediate_size']}"
    )


# the equal-budget rows at 81.4 M these are read against: heads + rows (uniform, per-layer), Torch-Pruning's FFN
REFERENCES = ("oneshotuniformlr20", "oneshotlr20", "tptaylorlr20")


def width_depth_table(summary: dict) -> str:
    """One line per total-size recipe (seeds pooled), after the reference rows: size, shape, class,
    perplexity before and after recovery."""
    groups: dict[str, list[dict]] = {recipe: [] for recipe in REFERENCES}
    for r in summary["rows"]:
        row = smollm2_rows.ROWS.get(r["run"])
        if row is not None and (is_total_size(r["run"]) or (row.kind == "equal_budget" and row.recipe in REFERENCES)):
            groups.setdefault(row.recipe, []).append(r)
    labels = {row.recipe: row.label for row in smollm2_rows.ROWS.values() if row.kind == "equal_budget"}
    lines = [
        "| row | parameters | shape | class | before recovery | perplexity per seed | mean (sd) | speed-up b1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for recipe, runs in groups.items():
        if not runs:
            continue
        values = [r["perplexity"] for r in runs]
        spread = f" (sd {statistics.stdev(values):.1f})" if len(values) > 1 else ""
        first = runs[0]
        mix = f" (chose: {first['chosen_mix']})" if first.get("chosen_mix") else ""
        lines.append(
            f"| {labels[recipe]}{mix} | {first['total_params'] / 1e6:.2f} M | {_shape(first)} | "
            f"{first.get('compacted_class', '–')} | {first['perplexity_before_recovery']:,.1f} | "
            f"{', '.join(f'{v:.1f}' for v in values)} | {statistics.mean(values):.1f}{spread} | "
            f"{first['speedup_b1']:.2f} |"
        )
    return "\n".join(lines)


def search_candidates_table(summary: dict) -> str:
    """Every candidate each search row tried: the mix, the kept units, the held-out loss (lowest chosen)."""
    lines = [
        "| search row | candidate | channels kept | layers removed | KV groups kept | FFN rows kept | held-out loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        for c in r.get("search", []):
            kept = c["kept_units"]

            def units(level: str, kept=kept) -> str:
                return f"{kept[level][0]} of {kept[level][1]}" if level in kept else "–"

            lines.append(
                f"| {r['run']} | {c['mix']['name']} | {units('hidden')} | {len(c['layers_removed'])} | "
                f"{units('head')} | {units('row')} | {c['loss']:.4f} |"
            )
    return "\n".join(lines)


def llama_cpp_table(summary: dict) -> str:
    """The llama.cpp rows: per model, the f16 file, tokens/s against the pretrained model, greedy agreement."""
    lines = [
        "| llama.cpp row | model | parameters | f16 file | generation tok/s | vs pretrained | prompt tok/s | "
        "first 32 greedy tokens as transformers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run, result in summary.get("llama_cpp", {}).items():
        for name, f in result["files"].items():
            lines.append(
                f"| {run} | {name} | {f['params'] / 1e6:.2f} M | {f['bytes'] / 1e6:.1f} MB | "
                f"{f['gen_tokens_per_s']:.1f} | {f['gen_vs_dense']:.2f}x | {f['prompt_tokens_per_s']:.0f} | "
                f"{'yes' if f['greedy_matches_transformers'] else 'no'} ({f['greedy_agreement']}/32) |"
            )
    return "\n".join(lines)
