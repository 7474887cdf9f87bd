"""Print the README's benchmark tables (markdown) from the committed JSON summaries.

.venv/bin/python benchmarks/tables.py            # full runs
.venv/bin/python benchmarks/tables.py --quick    # the --quick smoke runs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _fmt(value, spec: str = ".2f", missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def _levels(row: dict) -> str:
    if row["run"].startswith("tp_"):
        return "heads + FFN (Torch-Pruning)"
    return row.get("levels") or "rank,head,row"  # results written before the levels sweep existed


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
        limit = r.get("flops_ratio")
        of_limit = (
            f"{r['speedup_b1'] / limit:.2f} / {r['speedup_b32'] / limit:.2f}" if limit and r.get("speedup_b1") else "–"
        )
        lines.append(
            f"| {r['run']} | {_levels(r)} | {_fmt(r['sparsity'], '.3f')} ({r['target']}) | "
            f"{_fmt(100 * r['accuracy'], '.1f')} ({_fmt(r['drop_vs_dense_points'], '+.1f')}) | "
            f"{_fmt(r['speedup_b1'])} / {_fmt(r['speedup_b32'])} | {_fmt(limit)} | {of_limit} | "
            f"{_fmt(r['wall_vs_dense_same_epochs'])}x | {_fmt(r['peak_rss_vs_dense'])}x |"
        )
    return "\n".join(lines)


def smollm2_table(summary: dict) -> str:
    pre = summary["pretrained"]
    lines = [
        f"Pretrained: perplexity {_fmt(pre.get('perplexity'), '.1f')} on {pre.get('test_tokens')} PTB test tokens, "
        f"{pre.get('total_params'):,} parameters ({pre.get('linear_params'):,} in the linears, "
        f"{pre.get('embedding_params'):,} in the tied embedding).",
        "",
        "| run | perplexity before recovery | perplexity after | linears removed | total params (vs pretrained) | "
        "speed-up b1 | train time (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['run']} | {_fmt(r['perplexity_before_recovery'], ',.1f')} | {_fmt(r['perplexity'], ',.1f')} | "
            f"{_fmt(r['linear_sparsity'], '.3f')} | {r['total_params']:,} ({_fmt(r['total_vs_pretrained'], '.3f')}) | "
            f"{_fmt(r['speedup_b1'])} | {_fmt(r['wall_time_s'], '.0f')} | {_fmt(r['peak_rss_mb'], '.0f')} |"
        )
    return "\n".join(lines)


def _method(run: str) -> str:
    """What a one-shot row did, from its phase name (os<T>_<method> / os_<method>_<T>)."""
    if run.startswith("os_"):  # MiniLM: os_<method>_<T>[_s<seed>]
        parts = run[3:].split("_")
        method = "_".join(parts[:-2] if parts[-1].startswith("s") else parts[:-1])
    else:  # SmolLM2: os<T>_<method>
        method = run.split("_", 1)[1]
    if method in ("flap", "tptaylor"):
        return {
            "flap": "FLAP-style (fluctuation, standardised, bias compensation)",
            "tptaylor": "Torch-Pruning Taylor",
        }[method]
    score, *options = method.split("_")
    names = {"std": "standardised", "bias": "+ bias", "uniform": "uniform shapes", "rows": "FFN rows only"}
    extra = [names[o] for o in options]
    return f"hf_flop {score}" + (f" ({', '.join(extra)})" if extra else "")


def oneshot_table(summary: dict, metric: str) -> str:
    """One-shot rows without training: the plain-removal value beside the reconstructed one."""
    rows = summary.get("oneshot_rows", [])
    if not rows:
        return "(no one-shot rows yet)"
    scale, spec = (100, ".1f") if metric == "accuracy" else (1, ",.1f")
    lines = [
        f"| run | method | target | removed | {metric}, plain removal | {metric}, reconstructed (baselines: result) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        plain = r.get(f"{metric}_plain")
        removed = r.get("linear_sparsity", r.get("sparsity"))
        lines.append(
            f"| {r['run']} | {_method(r['run'])} | {r['target']} | {_fmt(removed, '.3f')} | "
            f"{_fmt(plain * scale if plain is not None else None, spec)} | {_fmt(r[metric] * scale, spec)} |"
        )
    return "\n".join(lines)


ROW_NAMES = {  # bench_minilm's equal-budget rows (issue 13), as the README names them
    "trainer": "PruningTrainer() with its defaults (one-shot obs + refit, compacted recovery)",
    "oneshotobs": "one-shot obs + refit, then recovery",
    "oneshotobslr10": "one-shot obs + refit, then recovery at lr 1e-4",
    "oneshot": "one-shot activation + refit, then recovery",
    "recipe": "one-shot activation through PruningTrainer(pruning_phase=0), masks held at full size",
    "tptaylor": "Torch-Pruning Taylor, then recovery",
    "twophase": "two-phase, rank+head+row (prune 40 %, fix, refit, recover)",
    "twophasehr": "two-phase, head+row",
    "old": "FLOP single phase, rank+head+row (old default)",
}


def equal_budget_table(summary: dict) -> str:
    dense = 100 * summary["dense_start"]["accuracy"]
    lines = [
        f"Dense start {dense:.1f} %. Mean over seeds, spread = standard deviation (n = number of seeds).",
        "",
        "| target | row | accuracy % per seed | mean (spread, n) | drop | before recovery | removed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        seeds = ", ".join(f"{a:.1f}" for a in r["accuracy"])
        spread = _fmt(r["spread"], ".1f")
        before = ", ".join(f"{a:.1f}" for a in r["accuracy_before_recovery"]) or "–"
        removed = ", ".join(f"{x:.3f}" for x in sorted({round(x, 3) for x in r["sparsity"]}))
        lines.append(
            f"| {int(100 * r['target'])} % | {ROW_NAMES.get(r['row'], r['row'])} | {seeds} | {r['mean']:.1f} "
            f"({spread}, {len(r['accuracy'])}) | {r['drop_vs_dense_points']:.1f} | {before} | {removed} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tables of the --quick smoke runs.")
    suffix = "_quick" if parser.parse_args().quick else ""
    for name, render in (("bench_minilm", minilm_tables), ("bench_smollm2", smollm2_table)):
        path = RESULTS / f"{name}{suffix}.json"
        if path.exists():
            summary = json.loads(path.read_text())
            print(f"### {path.name}\n\n{render(summary)}\n")
            metric = "accuracy" if name == "bench_minilm" else "perplexity"
            print(f"#### {path.name}: one-shot, no training\n\n{oneshot_table(summary, metric)}\n")
        else:
            print(f"### {path.name}: not run yet\n")
    path = RESULTS / f"bench_minilm_equal_budget{suffix}.json"
    if path.exists():
        print(f"### {path.name}\n\n{equal_budget_table(json.loads(path.read_text()))}\n")


if __name__ == "__main__":
    main()
