"""The benchmark tables (markdown) from the committed JSON; benchmarks/README.md rendered from them.

    .venv/bin/python benchmarks/tables.py            # the MiniLM and SmolLM2 tables of the full runs
    .venv/bin/python benchmarks/tables.py --quick    # the same for the --quick smoke runs
    .venv/bin/python benchmarks/tables.py --write    # benchmarks/README.md from README.in.md and the results
    .venv/bin/python benchmarks/tables.py --check    # exit 1 if benchmarks/README.md is not what --write writes

benchmarks/README.in.md is the hand-written text; every ``{{ name }}`` line in it is replaced by the
table ``README_TABLES[name]`` renders from benchmarks/results, so the tables cannot drift from the
files. Row labels come from the row registries (minilm_rows.py, smollm2_rows.py). Pure Python: no
torch, no training.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the row registries, also when imported
import gemma3_rows  # noqa: E402
import lora_rows  # noqa: E402
import minilm_rows  # noqa: E402
import smollm2_rows  # noqa: E402
import width_depth_tables  # noqa: E402
from common import RESULTS  # noqa: E402

TEMPLATE = HERE / "README.in.md"
README = HERE / "README.md"


def _fmt(value, spec: str = ".2f", missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


# ---- MiniLM and SmolLM2: the summaries of bench_minilm.py and bench_smollm2.py -----------------------


def minilm_tables(summary: dict) -> str:
    dense, more = summary["dense"], summary["dense_more"]
    lines = [
        f"Dense start: accuracy {_fmt(100 * dense['accuracy'], '.1f')} % on {dense.get('test_examples')} test "
        f"sentences; dense fine-tuned for the same budget (`dense_more`): {_fmt(100 * more.get('accuracy', 0), '.1f')} %, "
        f"{_fmt(more.get('wall_time_s'), '.0f')} s, peak RSS {_fmt(more.get('peak_rss_mb'), '.0f')} MB.",
        "",
        "| run | levels | removed (target) | accuracy % (drop) | speed-up b1 / b32 | FLOP-count limit | "
        "of the limit b1 / b32 | wall time vs dense | peak RSS vs dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        row = minilm_rows.ROWS[r["run"]]
        levels = "heads + FFN (Torch-Pruning)" if row.kind == "torch_pruning" else ",".join(row.levels)
        limit = r.get("flops_ratio")
        of_limit = (
            f"{r['speedup_b1'] / limit:.2f} / {r['speedup_b32'] / limit:.2f}" if limit and r.get("speedup_b1") else "–"
        )
        lines.append(
            f"| {r['run']} | {levels} | {_fmt(r['sparsity'], '.3f')} ({r['target']}) | "
            f"{_fmt(100 * r['accuracy'], '.1f')} ({_fmt(r['drop_vs_dense_points'], '+.1f')}) | "
            f"{_fmt(r['speedup_b1'])} / {_fmt(r['speedup_b32'])} | {_fmt(limit)} | {of_limit} | "
            f"{_fmt(r['wall_vs_dense_same_epochs'])}x | {_fmt(r['peak_rss_vs_dense'])}x |"
        )
    return "\n".join(lines)


def smollm2_table(summary: dict, kinds: tuple[str, ...] | None = None, rows: dict | None = None) -> str:
    """The trained rows (``kinds``: only rows of these kinds, by default every one; ``rows``: SmolLM2's unless given)."""
    declared = rows or smollm2_rows.ROWS
    pretrained = summary["pretrained"]
    lines = [
        f"Pretrained: perplexity {_fmt(pretrained.get('perplexity'), '.1f')} on {pretrained.get('test_tokens')} PTB test tokens, "
        f"{pretrained.get('total_params'):,} parameters ({pretrained.get('linear_params'):,} in the linears, "
        f"{pretrained.get('embedding_params'):,} in the tied embedding).",
        "",
        "| run | perplexity before recovery | perplexity after | linears removed | total params (vs pretrained) | "
        "speed-up b1 | train time (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        if kinds is not None and declared[r["run"]].kind not in kinds:
            continue
        lines.append(
            f"| {r['run']} | {_fmt(r['perplexity_before_recovery'], ',.1f')} | {_fmt(r['perplexity'], ',.1f')} | "
            f"{_fmt(r['linear_sparsity'], '.3f')} | {r['total_params']:,} ({_fmt(r['total_vs_pretrained'], '.3f')}) | "
            f"{_fmt(r['speedup_b1'])} | {_fmt(r['wall_time_s'], '.0f')} | {_fmt(r['peak_rss_mb'], '.0f')} |"
        )
    return "\n".join(lines)


def _metric(metric: str) -> tuple[int, str]:
    """Scale and format of a metric: accuracy in percent, perplexity as it is."""
    return (100, ".1f") if metric == "accuracy" else (1, ",.1f")


def oneshot_table(summary: dict, metric: str, rows: dict) -> str:
    """One-shot rows without training, one line per run: the plain-removal value beside the reconstructed one."""
    oneshot = summary.get("oneshot_rows", [])
    if not oneshot:
        return "(no one-shot rows yet)"
    scale, spec = _metric(metric)
    lines = [
        f"| run | method | target | removed | {metric}, plain removal | {metric}, reconstructed (baselines: result) |",
        "|---|---|---|---|---|---|",
    ]
    for r in oneshot:
        plain = r.get(f"{metric}_plain")
        removed = r.get("linear_sparsity", r.get("sparsity"))
        lines.append(
            f"| {r['run']} | {rows[r['run']].label} | {r['target']} | {_fmt(removed, '.3f')} | "
            f"{_fmt(plain * scale if plain is not None else None, spec)} | {_fmt(r[metric] * scale, spec)} |"
        )
    return "\n".join(lines)


def oneshot_pivot(summary: dict, metric: str, rows: dict) -> str:
    """One line per method, one column per target: plain removal -> reconstructed; over draws, mean (range)."""
    scale, spec = _metric(metric)
    better = max if metric == "accuracy" else min
    declared = list(rows)
    cells: dict[str, dict[float, list[dict]]] = {}  # label -> target -> runs (calibration draws), in row order
    for r in sorted(summary["oneshot_rows"], key=lambda r: declared.index(r["run"])):
        cells.setdefault(rows[r["run"]].label, {}).setdefault(r["target"], []).append(r)
    targets = sorted({r["target"] for r in summary["oneshot_rows"]})
    best = {
        t: better(statistics.mean(r[metric] for r in runs[t]) for runs in cells.values() if t in runs) for t in targets
    }
    lines = [
        "| method | " + " | ".join(f"{round(100 * t)} %" for t in targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for label, by_target in cells.items():
        line = f"| {label} |"
        for t in targets:
            runs = by_target.get(t)
            if not runs:
                line += " – |"
                continue
            value = statistics.mean(r[metric] for r in runs)
            text = format(scale * value, spec)
            text = f"**{text}**" if value == best[t] else text
            plain = [r[f"{metric}_plain"] for r in runs if r.get(f"{metric}_plain") is not None]
            if plain:
                text = f"{format(scale * statistics.mean(plain), spec)} → {text}"
            if len(runs) > 1:
                low, high = (format(scale * f(r[metric] for r in runs), spec) for f in (min, max))
                text += f" ({low}–{high}, {len(runs)} draws)"
            line += f" {text} |"
        lines.append(line)
    return "\n".join(lines)


# ---- the equal-budget comparison ---------------------------------------------------------------------


def _recipe_labels(rows: dict) -> dict[str, str]:
    """Equal-budget recipe name (the "row" its results store) -> label."""
    return {row.recipe: row.label for row in rows.values() if row.kind == "equal_budget"}


def _seeds(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def equal_budget_table(summary: dict) -> str:
    labels = _recipe_labels(minilm_rows.ROWS)
    dense = 100 * summary["dense_start"]["accuracy"]
    lines = [
        f"Dense start {dense:.1f} %. Mean over seeds, spread = standard deviation (n = number of seeds).",
        "",
        "| target | row | accuracy % per seed | mean (spread, n) | drop | before recovery | removed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        spread = _fmt(r["spread"], ".1f")
        before = _seeds(r["accuracy_before_recovery"]) or "–"
        removed = ", ".join(f"{x:.3f}" for x in sorted({round(x, 3) for x in r["sparsity"]}))
        lines.append(
            f"| {int(100 * r['target'])} % | {labels[r['row']]} | {_seeds(r['accuracy'])} | {r['mean']:.1f} "
            f"({spread}, {len(r['accuracy'])}) | {r['drop_vs_dense_points']:.1f} | {before} | {removed} |"
        )
    return "\n".join(lines)


def _paired_lead(row: dict, baseline: dict) -> tuple[float, list[float]]:
    """Mean and per-seed differences of ``row``'s accuracy over ``baseline``'s, on the seeds both have."""
    theirs = dict(zip(baseline["seeds"], baseline["accuracy"]))
    diffs = [mine - theirs[s] for s, mine in zip(row["seeds"], row["accuracy"]) if s in theirs]
    return statistics.mean(diffs), diffs


def equal_budget_lead(summary: dict, pairs: tuple[tuple[str, str], ...]) -> str:
    """Each (recipe, baseline) pair per target: seeds, mean (spread), drop, the recipe's lead paired by seed."""
    labels = _recipe_labels(minilm_rows.ROWS)
    found = {(r["row"], r["target"]): r for r in summary["rows"]}
    lines = [
        "| target | row | accuracy % per seed | mean (spread) | drop | lead over the baseline (paired by seed) | "
        "before recovery |",
        "|---|---|---|---|---|---|---|",
    ]
    for target in sorted({t for _, t in found}):
        for recipe, baseline in pairs:
            for name in (recipe, baseline):
                r = found.get((name, target))
                if r is None:
                    continue
                lead = ""
                if name == recipe and (baseline, target) in found:
                    mean, diffs = _paired_lead(r, found[(baseline, target)])
                    lead = f"**{mean:+.1f}** ({_seeds(diffs)})"
                mean_text = f"{r['mean']:.1f} ({_fmt(r['spread'], '.1f')})"
                lines.append(
                    f"| {round(100 * target)} % | {labels[name]} | {_seeds(r['accuracy'])} | "
                    f"{f'**{mean_text}**' if lead else mean_text} | {r['drop_vs_dense_points']:.1f} | {lead} | "
                    f"{_seeds(r['accuracy_before_recovery']) or '–'} |"
                )
    return "\n".join(lines)


# (target, what, threshold): the goals the equal-budget comparison was set against Torch-Pruning Taylor
EQUAL_BUDGET_GOALS = ((0.5, "drop", 1.0), (0.5, "lead", 0.5), (0.75, "drop", 3.0), (0.75, "lead", 1.0))


def equal_budget_goals(summary: dict, columns: tuple[tuple[str, str, str], ...]) -> str:
    """Each goal (drop at most, lead at least) per column (title, recipe, baseline): met or missed, and by what."""
    found = {(r["row"], r["target"]): r for r in summary["rows"]}
    lines = ["| goal | " + " | ".join(title for title, _, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    for target, what, threshold in EQUAL_BUDGET_GOALS:
        sign = "≤" if what == "drop" else "≥"
        line = f"| {round(100 * target)} %: {what} {sign} {threshold} |"
        for _, recipe, baseline in columns:
            r = found[(recipe, target)]
            if what == "drop":
                value, met, text = r["drop_vs_dense_points"], r["drop_vs_dense_points"] <= threshold, "{:.1f}"
            else:
                value = _paired_lead(r, found[(baseline, target)])[0]
                met, text = value >= threshold, "{:+.1f}"
            line += f" {'**met**' if met else 'missed'}: {text.format(value)} |"
        lines.append(line)
    return "\n".join(lines)


def smollm2_equal_budget(summary: dict, rows: dict | None = None) -> str:
    """The equal-budget rows of a causal-LM benchmark (SmolLM2 unless ``rows`` says), one line per recipe."""
    rows = rows or smollm2_rows.ROWS
    labels = _recipe_labels(rows)
    groups: dict[str, list[dict]] = {}
    for r in summary["rows"]:
        row = rows[r["run"]]
        if row.kind == "equal_budget" and row.pruner not in smollm2_rows.TOTAL_SIZE_PRUNERS:
            groups.setdefault(row.recipe, []).append(r)
    lines = [
        "| row | perplexity per seed | mean (sd) | before recovery | linears removed | speed-up b1 |",
        "|---|---|---|---|---|---|",
    ]
    for recipe, runs in groups.items():
        values = [r["perplexity"] for r in runs]
        spread = f" (sd {statistics.stdev(values):.1f})" if len(values) > 1 else ""
        lines.append(
            f"| {labels[recipe]} | {_seeds(values)} | {statistics.mean(values):.1f}{spread} | "
            f"{_fmt(runs[0]['perplexity_before_recovery'], ',.1f')} | {_fmt(runs[0]['linear_sparsity'], '.3f')} | "
            f"{_fmt(runs[0]['speedup_b1'])} |"
        )
    return "\n".join(lines)


def wall_time_table(result: dict) -> str:
    """bench_minilm.py's wall_time row: the dense fine-tune and both PruningTrainer routes, back to back."""
    dense = result["dense_finetune_s"]
    lines = ["| run, the same steps | wall time (s) | vs dense | accuracy % |", "|---|---|---|---|"]
    lines.append(f"| dense fine-tune (`Trainer`) | {dense:.1f} | 1.00x | – |")
    for route, what in (("compacted", "compacted recovery (the default)"), ("masked", "masks held at full size")):
        seconds = result[f"pruning_trainer_{route}_s"]
        lines.append(
            f"| `PruningTrainer(pruning_phase=0)`, {what} | {seconds:.1f} | {seconds / dense:.2f}x | "
            f"{100 * result[f'accuracy_{route}']:.1f} |"
        )
    return "\n".join(lines)


# ---- training cost, kernels, latency, deployment ------------------------------------------------------


def trainer_runs_table(result: dict) -> str:
    """bench_trainer.py's runs: wall time, step time at the start and end, memory, final sparsity."""
    runs = result["runs"]
    dense = runs["dense"]["wall_s"]
    lines = [
        f"| run, {result['steps']} steps | `train()` wall | step time, first -> last 10% of steps | "
        "resident memory, before `train()` -> peak | final sparsity, eval / expected |",
        "|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        tenth = max(1, len(r["step_s"]) // 10)
        first, last = (1000 * statistics.mean(s) for s in (r["step_s"][:tenth], r["step_s"][-tenth:]))
        what = "dense `Trainer`" if name == "dense" else f"`PruningTrainer`, {name}"
        ratio = "" if name == "dense" else f" ({r['wall_s'] / dense:.2f}x)"
        final = r.get("final_sparsity")
        sparsity = f"{final['deterministic']:.3f} / {final['expected']:.3f}" if final else "–"
        lines.append(
            f"| {what} | {r['wall_s']:.1f} s{ratio} | {first:.0f} -> {last:.0f} ms | "
            f"{r['rss_before_train_mb']:.0f} -> {r['peak_rss_mb']:.0f} MB | {sparsity} |"
        )
    return "\n".join(lines)


def trainer_layers_table(result: dict) -> str:
    """bench_trainer.py's one-layer timings: forward + backward per live fraction, with and without the speed-up."""
    shapes = result["layers"]
    fractions = next(iter(shapes.values()))["fractions"]
    lines = [
        "| one layer, fwd+bwd (ms) at live fraction | " + " | ".join(f"{f:g}" for f in fractions) + " | dense |",
        "|---|" + "---|" * (len(fractions) + 1),
    ]

    def ms(seconds: float) -> str:
        return f"{1000 * seconds:.0f}" if seconds >= 0.01 else f"{1000 * seconds:.1f}"

    for shape, timing in shapes.items():
        for key, what in (("skip_s", "live components only (default)"), ("no_skip_s", "all components")):
            values = " | ".join(ms(t) for t in timing[key])
            lines.append(f"| {shape}, {what} | {values} | {ms(timing['dense_s'])} |")
    return "\n".join(lines)


def blocks_table(result: dict) -> str:
    """bench_blocks.py's break-even block sparsity per weight shape, tokens per call and kernel."""
    kernels = ("bsr", "gather", "rowwise")
    lines = ["| weight (out x in) | tokens per call | " + " | ".join(kernels) + " |", "|---|---|" + "---|" * 3]
    for key, found in result["break_even"].items():
        shape, tokens = key.split("@")
        lines.append(f"| {shape} | {tokens} | " + " | ".join(_fmt(found[k], "g", "never") for k in kernels) + " |")
    return "\n".join(lines)


def latency_table(result: dict) -> str:
    """bench_latency.py: speed-up over dense and file size of each compacted model."""
    lines = [
        "| levels | target | sparsity | batch 1 | batch 32 | model.safetensors |",
        "|---|---:|---:|---:|---:|---:|",
        f"| dense | – | 0 | 1.00x | 1.00x | {result['dense']['file_bytes'] / 1e6:.1f} MB |",
    ]
    for r in result["rows"]:
        levels = r["levels"] + (f", `round_to={r['round_to']}`" if r["round_to"] > 1 else "")
        lines.append(
            f"| {levels} | {r['target_sparsity']} | {r['deterministic_sparsity']:.3f} | {r['speedup_batch1']:.2f}x | "
            f"{r['speedup_batch32']:.2f}x | {r['file_bytes'] / 1e6:.1f} MB |"
        )
    return "\n".join(lines)


def onnx_table(result: dict) -> str:
    """bench_onnx.py: ONNX Runtime and PyTorch latency of the dense and compacted models."""
    lines = [
        "| model | sparsity | parameters | model.onnx (MB) | ONNX Runtime b1 ms (speed-up) | ONNX Runtime b32 ms "
        "(speed-up) | PyTorch b1 / b32 ms | max logit diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['sparsity']:.3f} | {r['params']:,} | {r['onnx_bytes'] / 1e6:.1f} | "
            f"{r['ort_ms_b1']:.2f} ({r['ort_speedup_b1']:.2f}x) | {r['ort_ms_b32']:.1f} ({r['ort_speedup_b32']:.2f}x) | "
            f"{r['torch_ms_b1']:.2f} / {r['torch_ms_b32']:.1f} | "
            f"{max(r['max_logit_diff_b1'], r['max_logit_diff_b32']):.1e} |"
        )
    return "\n".join(lines)


def gguf_table(summary: dict) -> str:
    """bench_gguf.py: llama.cpp tokens per second, dense -> pruned, per file type."""
    lines = [
        "| file | size dense → pruned | prompt tokens/s dense → pruned | generated tokens/s dense → pruned | "
        "first greedy tokens = transformers |",
        "|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        same = (
            "yes, both" if r["dense_greedy_matches_transformers"] and r["pruned_greedy_matches_transformers"] else "no"
        )
        lines.append(
            f"| {r['dtype']} | {r['dense_bytes'] / 1e6:.1f} → {r['pruned_bytes'] / 1e6:.1f} MB | "
            f"{r['dense_prompt_tokens_per_s']:.1f} → {r['pruned_prompt_tokens_per_s']:.1f} ({r['prompt_speedup']:.2f}x) | "
            f"{r['dense_gen_tokens_per_s']:.1f} → {r['pruned_gen_tokens_per_s']:.1f} (**{r['gen_speedup']:.2f}x**) | "
            f"{same} |"
        )
    return "\n".join(lines)


def pareto_table(summary: dict) -> str:
    """bench_pareto.py: every pruned x quantized file, its size, its metric and its speed, measured on the file."""
    lines = [
        "| model | pruned | file | size MB (vs dense) | metric on the file (PyTorch float32) | speed | speed-up vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        head = f"| {r['model']} | {r['pruned']:.0%} | {r['format']} {r['type']} | "
        size = f"{r['bytes'] / 1e6:.1f} ({r['size_vs_dense']:.2f}x) | "
        if r["metric"] == "perplexity":
            metric = f"perplexity {r['value']:.1f} ({r['pytorch_value']:.1f}) | "
            speed = f"generation {r['gen_tokens_per_s']:.0f} tok/s, prompt {r['prompt_tokens_per_s']:.0f} tok/s | "
            ratio = f"{r['gen_speedup']:.2f}x / {r['prompt_speedup']:.2f}x |"
        else:
            metric = f"accuracy {100 * r['value']:.1f} % ({100 * r['pytorch_value']:.1f} %) | "
            speed = f"batch 1 {r['ms_b1']:.2f} ms, batch 32 {r['ms_b32']:.1f} ms | "
            ratio = f"{r['speedup_b1']:.2f}x / {r['speedup_b32']:.2f}x |"
        lines.append(head + size + metric + speed + ratio)
    return "\n".join(lines)


def pareto_goals(summary: dict) -> str:
    """bench_pareto.py's goals: the measured value, the bound, met or missed."""
    lines = ["| goal | measured | bound | met |", "|---|---|---|---|"]
    for g in summary["goals"]:
        lines.append(f"| {g['goal']} | {g['value']:.2f} | {g['bound']} | {'yes' if g['met'] else '**no**'} |")
    return "\n".join(lines)


def stream_cost_table(result: dict) -> str:
    """stream_cost.py: cost per layer across widths, peak RSS across depths, the 8B estimate."""
    ratio = result.get("cost_per_param_vs_135m", {})
    lines = [
        "| shape | d | FFN | parameters per layer | CPU s per layer | µs per parameter | vs 135M | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["width_series"]:
        lines.append(
            f"| {r['shape']} ({r['layers']} layer{'s' if r['layers'] > 1 else ''}) | {r['hidden']:,} | {r['intermediate']:,} | "
            f"{r['layer_params'] / 1e6:.1f} M | {r['cpu_s_per_layer']:.1f} | {r['cpu_us_per_param']:.2f} | "
            f"{_fmt(ratio.get(r['shape']))}x | {r['peak_rss_mb']:,.0f} MB |"
        )
    depth = sorted((r for r in result["runs"] if r["layers"] > 2), key=lambda r: (r["shape"], r["layers"]))
    if depth:
        lines += [
            "",
            "| shape, layers | parameters | float32 checkpoint | peak RSS | RSS / checkpoint | wall time |",
            "|---|---|---|---|---|---|",
        ]
        for r in depth:
            lines.append(
                f"| {r['shape']}, {r['layers']} | {r['params'] / 1e6:,.0f} M | {r['checkpoint_mb']:,.0f} MB | "
                f"{r['peak_rss_mb']:,.0f} MB | {r['rss_over_checkpoint']:.2f} | {r['wall_s'] / 60:.1f} min |"
            )
    notes = []
    if result.get("time_exponent_vs_layer_params") is not None:
        notes.append(
            f"CPU time per layer grows as (parameters per layer)^{result['time_exponent_vs_layer_params']:.2f} "
            f"and as d^{result['time_exponent_vs_hidden']:.2f}"
        )
    if result.get("rss_growth_per_depth_doubling"):
        growth = ", ".join(f"{g:+.1%}" for g in result["rss_growth_per_depth_doubling"])
        notes.append(f"peak RSS per doubling of depth: {growth}")
    estimate = result.get("llama8b_on_this_cpu")
    if estimate:
        notes.append(
            f"Llama-3.1-8B's {estimate['layers']} layers at the measured cost of its layer: "
            f"{estimate['cpu_hours_one_thread']:.1f} CPU hours on one thread of this machine, "
            f"peak RSS about {estimate['peak_rss_mb_one_layer_run']:,.0f} MB (an estimate from one layer)"
        )
    return "\n".join(lines) + ("\n\n" + "; ".join(notes) + "." if notes else "")


# ---- benchmarks/README.md ----------------------------------------------------------------------------

def lora_table(summary: dict) -> str:
    """bench_lora.py: LoRA against full recovery of the same one-shot compacted model, at equal steps."""
    oneshot = summary["oneshot"]
    lines = [
        f"The one-shot model (obs + refit, linear sparsity {_fmt(oneshot.get('linear_sparsity'), '.3f')}, "
        f"{oneshot.get('total_params'):,} parameters): perplexity {_fmt(oneshot.get('perplexity'), '.1f')} before "
        f"recovery; every row then trains it for {summary['settings']['steps']} steps of "
        f"{summary['settings']['batch']} x {summary['settings']['block']} tokens, one thread.",
        "",
        "| recovery | trainable parameters | perplexity (vs full) | peak RSS MB (vs full) | training wall time s (vs full) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {lora_rows.ROWS[r['run']].label} | {r['trainable_params']:,} | {_fmt(r['perplexity'], '.1f')} "
            f"({_fmt(r['perplexity_vs_full'], '.2f')}x) | {_fmt(r['peak_rss_mb'], '.0f')} "
            f"({_fmt(r['peak_rss_vs_full'], '.2f')}x) | {_fmt(r['wall_time_s'], '.0f')} "
            f"({_fmt(r['wall_time_vs_full'], '.2f')}x) |"
        )
    return "\n".join(lines)


OBS_AGAINST_TAYLOR = (("oneshotobs", "tptaylor"),)
OBS_AGAINST_TAYLOR_LR = (("oneshotobslr10", "tptaylorlr10"),)
GOAL_COLUMNS = (
    ("lr 5e-5 (six seeds)", "oneshotobs", "tptaylor"),
    ("lr 1e-4 (six seeds)", "oneshotobslr10", "tptaylorlr10"),
)
# placeholder in README.in.md -> the table it stands for
README_TABLES: dict[str, Callable[[], str]] = {
    "minilm": lambda: minilm_tables(_load("bench_minilm.json")),
    "smollm2": lambda: smollm2_table(_load("bench_smollm2.json"), kinds=("dense", "learned", "prune_then_recover")),
    "minilm_oneshot": lambda: oneshot_pivot(_load("bench_minilm.json"), "accuracy", minilm_rows.ROWS),
    "smollm2_oneshot": lambda: oneshot_pivot(_load("bench_smollm2.json"), "perplexity", smollm2_rows.ROWS),
    "equal_budget_obs": lambda: equal_budget_lead(_load("bench_minilm_equal_budget.json"), OBS_AGAINST_TAYLOR),
    "equal_budget_obs_lr": lambda: equal_budget_lead(_load("bench_minilm_equal_budget.json"), OBS_AGAINST_TAYLOR_LR),
    "equal_budget_goals": lambda: equal_budget_goals(_load("bench_minilm_equal_budget.json"), GOAL_COLUMNS),
    "equal_budget_all": lambda: equal_budget_table(_load("bench_minilm_equal_budget.json")),
    "smollm2_equal_budget": lambda: smollm2_equal_budget(_load("bench_smollm2.json")),
    "gemma3": lambda: smollm2_table(_load("bench_gemma3.json"), kinds=("prune_then_recover",), rows=gemma3_rows.ROWS),
    "gemma3_oneshot": lambda: oneshot_pivot(_load("bench_gemma3.json"), "perplexity", gemma3_rows.ROWS),
    "wall_time": lambda: wall_time_table(_load("minilm/wall_time.json")),
    "trainer_runs": lambda: trainer_runs_table(_load("bench_trainer.json")),
    "trainer_layers": lambda: trainer_layers_table(_load("bench_trainer.json")),
    "blocks": lambda: blocks_table(_load("bench_blocks.json")),
    "latency": lambda: latency_table(_load("bench_latency.json")),
    "onnx": lambda: onnx_table(_load("bench_onnx.json")),
    "gguf": lambda: gguf_table(_load("bench_gguf.json")),
    "stream_cost": lambda: stream_cost_table(_load("stream_cost.json")),
    "lora": lambda: lora_table(_load("bench_lora.json")),
    "pareto": lambda: pareto_table(_load("bench_pareto.json")),
    "pareto_goals": lambda: pareto_goals(_load("bench_pareto.json")),
    "width_depth": lambda: width_depth_tables.width_depth_table(_load("bench_smollm2.json")),
    "width_depth_search": lambda: width_depth_tables.search_candidates_table(_load("bench_smollm2.json")),
    "width_depth_llama_cpp": lambda: width_depth_tables.llama_cpp_table(_load("bench_smollm2.json")),
}
PLACEHOLDER = re.compile(r"^\{\{ *([a-z0-9_]+) *\}\}$", re.MULTILINE)
GENERATED_NOTE = (
    "<!-- Generated by `python benchmarks/tables.py --write` from benchmarks/README.in.md and the JSON in "
    "benchmarks/results/: edit those, not this file. -->\n\n"
)


def render_readme(template: str) -> str:
    """The template with every ``{{ name }}`` line replaced by its table."""
    unknown = sorted(set(PLACEHOLDER.findall(template)) - set(README_TABLES))
    if unknown:
        raise SystemExit(f"{TEMPLATE.name}: unknown table placeholder(s) {unknown}; known: {sorted(README_TABLES)}.")
    return GENERATED_NOTE + PLACEHOLDER.sub(lambda m: README_TABLES[m.group(1)](), template)


def print_tables(quick: bool) -> None:
    """The MiniLM, SmolLM2 and equal-budget tables of the full (or --quick) runs, as markdown."""
    suffix = "_quick" if quick else ""
    for name, render in (("bench_minilm", minilm_tables), ("bench_smollm2", smollm2_table)):
        path = RESULTS / f"{name}{suffix}.json"
        if path.exists():
            summary = json.loads(path.read_text())
            print(f"### {path.name}\n\n{render(summary)}\n")
            metric, rows = (
                ("accuracy", minilm_rows.ROWS) if name == "bench_minilm" else ("perplexity", smollm2_rows.ROWS)
            )
            print(f"#### {path.name}: one-shot, no training\n\n{oneshot_table(summary, metric, rows)}\n")
        else:
            print(f"### {path.name}: not run yet\n")
    path = RESULTS / f"bench_minilm_equal_budget{suffix}.json"
    if path.exists():
        print(f"### {path.name}\n\n{equal_budget_table(json.loads(path.read_text()))}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--quick", action="store_true", help="Tables of the --quick smoke runs.")
    action.add_argument("--write", action="store_true", help=f"Write {README.name} from {TEMPLATE.name}.")
    action.add_argument("--check", action="store_true", help=f"Exit 1 if {README.name} differs from --write's.")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        print_tables(args.quick)
        return 0
    expected = render_readme(TEMPLATE.read_text())
    if args.write:
        README.write_text(expected)
        print(f"wrote {README}")
        return 0
    if not README.exists() or README.read_text() != expected:
        print(
            f"{README} is not what {TEMPLATE.name} and the results give: run `python benchmarks/tables.py --write` "
            "and commit it.",
            file=sys.stderr,
        )
        return 1
    print(f"{README} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
