"""SmolLM2-135M pruned to 50 % on the Penn Treebank, CPU: LoRA recovery against full recovery at equal steps.

Rows in lora_rows.py (``--list`` prints them). ``oneshot`` prunes the pretrained model (obs scores and
the refit on the equal-budget rows' calibration, heads and FFN rows) and saves the compacted model;
each recovery row loads it in a fresh process and trains it for the equal-budget rows' steps (160)
with the same seeded blocks and logit distillation from the pretrained model that PruningTrainer
applies: ``full`` trains every weight, ``lora_*`` trains the adapters of
``hf_flop.training.lora_recovery.with_lora`` (PruningTrainer's LoRA wrapping) and merges them after.
Each row records perplexity, training wall time, trainable parameters and its process's peak RSS.

    .venv/bin/python benchmarks/bench_lora.py --list
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_lora.py    # resumable: measured rows are skipped
    .venv/bin/python benchmarks/bench_lora.py --quick                          # smoke test

Results: benchmarks/results/smollm2_lora[_quick]/<row id>.json, summary in bench_lora[_quick].json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when imported
import common  # noqa: E402
from bench_smollm2 import _args, _linear_params, _perplexity  # noqa: E402
from lora_rows import ROWS, SCORE, SETTINGS, LoraRow  # noqa: E402
from smollm2_rows import LEVELS, TARGET  # noqa: E402


def _compacted_folder(root: Path) -> Path:
    return root / "oneshot" / "model"


def phase_oneshot(row: LoraRow, out: Path, settings: dict, root: Path) -> dict:
    """Prune one-shot, save the compacted model for the recovery rows; its perplexity before any recovery."""
    from hf_flop import FlopConfig, compact, get_flop_model, prune_oneshot, sparsity_report

    model, tokenizer = common.smollm2()
    _, test, _ = common.ptb_blocks(settings, tokenizer)
    dense_linear = _linear_params(model)
    calibration = common.ptb_calibration(tokenizer, settings["oneshot_sequences"], settings["oneshot_block"])
    start = time.perf_counter()
    gated = get_flop_model(model, FlopConfig(levels=LEVELS, target_sparsity=TARGET))
    prune_oneshot(gated, None, calibration, SCORE, reconstruct_options={"progress": False})
    small = compact(gated).eval()
    prune_time = time.perf_counter() - start
    small.save_pretrained(_compacted_folder(root))
    return {
        "score": SCORE,
        "prune_time_s": prune_time,
        "deterministic_sparsity": sparsity_report(gated).deterministic_sparsity,
        "perplexity": _perplexity(small, test),
        "total_params": small.num_parameters(),
        "linear_sparsity": 1 - _linear_params(small) / dense_linear,
    }


def phase_recover(row: LoraRow, out: Path, settings: dict, root: Path) -> dict:
    """Load the compacted model, recover it (full or LoRA, merged after) with the shared distillation."""
    import torch
    from peft import LoraConfig
    from torch_pruning_baseline import DistillationTrainer
    from transformers import AutoModelForCausalLM, default_data_collator

    from hf_flop.training.lora_recovery import DEFAULT_TARGET_MODULES, merged, with_lora

    folder = _compacted_folder(root)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} is missing: run the oneshot row first (--only oneshot).")
    teacher, tokenizer = common.smollm2()
    train, test, _ = common.ptb_blocks(settings, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.use_cache = False
    total = model.num_parameters()
    if row.lora_rank is not None:
        config = LoraConfig(
            r=row.lora_rank, lora_alpha=2 * row.lora_rank, target_modules=DEFAULT_TARGET_MODULES, lora_dropout=0.0
        )
        model = with_lora(model, config, {})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    trainer = DistillationTrainer(
        model=model,
        args=_args(out, settings, learning_rate=row.learning_rate),
        teacher_model=teacher,
        train_dataset=train,
        data_collator=default_data_collator,
    )
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    small = merged(model).eval()
    return {
        "lora_rank": row.lora_rank,
        "learning_rate": row.learning_rate,
        "steps": settings["steps"],
        "perplexity": _perplexity(small, test),
        "trainable_params": trainable,
        "total_params": small.num_parameters(),
        "merged_params_equal": small.num_parameters() == total,
        "wall_time_s": wall,
        "log": [e for e in trainer.state.log_history if "loss" in e],
    }


PHASES_BY_KIND = {"oneshot": phase_oneshot, "recover": phase_recover}


def run_phase(row: LoraRow, out: Path, settings: dict, root: Path) -> dict:
    return PHASES_BY_KIND[row.kind](row, out, settings, root)


def summarize(root: Path, mode: str) -> None:
    """The measured rows into ``bench_lora[_quick].json``, each beside the full-recovery row."""
    from phase_runner import read_results, write_summary

    results = read_results(root, ROWS)
    full, oneshot = results.get("full"), results.get("oneshot", {})
    rows = []
    for run, r in results.items():
        if ROWS[run].kind != "recover":
            continue
        rows.append(
            {
                "run": run,
                "lora_rank": r["lora_rank"],
                "learning_rate": r["learning_rate"],
                "perplexity": r["perplexity"],
                "perplexity_vs_full": r["perplexity"] / full["perplexity"] if full else None,
                "trainable_params": r["trainable_params"],
                "peak_rss_mb": r["peak_rss_mb"],
                "peak_rss_vs_full": r["peak_rss_mb"] / full["peak_rss_mb"] if full else None,
                "wall_time_s": r["wall_time_s"],
                "wall_time_vs_full": r["wall_time_s"] / full["wall_time_s"] if full else None,
            }
        )
    summary = {"mode": mode, "settings": SETTINGS[mode], "target": TARGET, "oneshot": oneshot, "rows": rows}
    write_summary("bench_lora", summary, lambda summary, path: None)
    print(json.dumps(summary["oneshot"], indent=1))


def main() -> None:
    from phase_runner import run_benchmark

    run_benchmark(__file__, "smollm2_lora", ROWS, SETTINGS, run_phase, summarize)


if __name__ == "__main__":
    main()
