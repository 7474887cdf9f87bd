"""MiniLM-L6 on the Rotten Tomatoes sentiment sentences, CPU: hf_flop against Torch-Pruning and FLAP-style baselines.

Every row is declared in minilm_rows.py (``--list`` prints them): the dense start and its same-budget
fine-tune, ``hf-flop prune`` at 50 and 75 % and across levels, Torch-Pruning, one-shot pruning with no
training at all (``os_*``), the equal-budget comparison (``eq_*``: every row from the same dense start
with the same steps and distillation, see minilm_equal_budget.py) and the wall-time run.

Each row runs in its own process, so its peak memory is its own; a row whose JSON exists is skipped,
so an interrupted run resumes; one torch thread each unless --threads says otherwise.

    .venv/bin/python benchmarks/bench_minilm.py --list     # the rows, and which are measured
    .venv/bin/python benchmarks/bench_minilm.py            # full run (hours on 2 cores; measured rows are skipped)
    .venv/bin/python benchmarks/bench_minilm.py --quick    # minutes: small subsets, a smoke test
    .venv/bin/python benchmarks/bench_minilm.py --only wall_time --threads 2   # run the wall-time row alone

Results: benchmarks/results/minilm[_quick]/<row id>.json, summaries in bench_minilm[_quick].json/.png
and bench_minilm_equal_budget.json/.png.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when imported
import common  # noqa: E402
from minilm_equal_budget import phase_equal_budget, summarize_equal_budget  # noqa: E402
from minilm_rows import LATENCY_THREADS, ONESHOT_CALIBRATION, RANK_HEAD_ROW, ROWS, SETTINGS, MiniLMRow  # noqa: E402


def _latency(dense, small, test_set, tokenizer, max_length: int) -> dict:
    """Speed-up at batch 1 and 32 on padded test sentences, LATENCY_THREADS threads."""
    result = {}
    for batch in (1, 32):
        rows = [{k: v for k, v in test_set[i].items() if k != "labels"} for i in range(batch)]
        inputs = dict(tokenizer.pad(rows, padding="max_length", max_length=max_length, return_tensors="pt"))
        repeats = 10 if batch == 1 else 5
        result[str(batch)] = common.speedup_vs_dense(dense, small, inputs, repeats=repeats, threads=LATENCY_THREADS)
    return result


def _fine_tune(out: Path, settings: dict, source: str, save_to: Path | None) -> dict:
    """A plain Trainer fine-tune of ``source`` plus a new classifier head; its accuracy and time."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        set_seed,
    )

    tokenizer = AutoTokenizer.from_pretrained(source)
    train, test = common.sentiment_splits(settings, tokenizer)
    args = common.epoch_arguments(out / "work", settings)
    set_seed(args.seed)  # the new classifier head is drawn before Trainer seeds anything
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    collator = DataCollatorWithPadding(tokenizer)
    start = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=train, data_collator=collator).train()
    wall = time.perf_counter() - start
    accuracy = common.accuracy(model, test, collator)
    if save_to is not None:
        model.save_pretrained(save_to)
        tokenizer.save_pretrained(save_to)
    return {"accuracy": accuracy, "wall_time_s": wall, "train_examples": len(train), "test_examples": len(test)}


def _dense_start(out: Path, settings: dict, save_to: Path) -> dict:
    start = {**settings, "train_samples": settings["dense_train_samples"], "epochs": settings["dense_epochs"]}
    return _fine_tune(out, start, str(common.minilm_path()), save_to=save_to)


def phase_dense_start(row: MiniLMRow, out: Path, settings: dict, root: Path) -> dict:
    """MiniLM's pretrained weights fine-tuned on the start settings; saved as root/dense_model for every other row."""
    return _dense_start(out, settings, root / "dense_model")


def phase_dense_same_budget(row: MiniLMRow, out: Path, settings: dict, root: Path) -> dict:
    return _fine_tune(out, settings, str(root / "dense_model"), save_to=None)


def phase_cli(row: MiniLMRow, out: Path, settings: dict, root: Path) -> dict:
    """``hf-flop prune`` from the dense start for the shared budget, then the compacted model's FLOP ratio."""
    from hf_flop_cli import main

    dense_model = root / "dense_model"
    levels = ",".join(row.levels)
    options = {
        "--model": dense_model,
        "--dense-epochs": 0,
        "--epochs": settings["epochs"],
        "--target": row.target,
        "--levels": levels,
        "--latency-threads": LATENCY_THREADS,
        "--train-samples": settings["train_samples"],
        "--eval-samples": settings["eval_samples"],
        "--batch-size": settings["batch_size"],
        "--max-length": settings["max_length"],
        "--output-dir": out / "run",
    }
    code = main(["prune", *(str(x) for pair in options.items() for x in pair), "--overwrite"])
    if code:
        raise SystemExit(f"hf-flop prune failed with status {code}")
    summary = json.loads((out / "run" / "summary.json").read_text())
    from transformers import AutoModelForSequenceClassification

    import hf_flop  # noqa: F401  (registers the compacted model classes)

    small = AutoModelForSequenceClassification.from_pretrained(out / "run" / "model")
    dense = AutoModelForSequenceClassification.from_pretrained(dense_model)
    return {
        "accuracy_dense": summary["results"]["dense"],
        "accuracy": summary["results"]["pruned"],
        "sparsity": summary["params"]["sparsity"],
        "target": row.target,
        "levels": levels,
        "params": summary["params"],
        "latency": summary["latency_ms"],
        "speedup": summary["speedup"],
        "wall_time_s": summary["wall_time_s"].get("pruning"),
        "flops_ratio": common.linear_flops_ratio(dense, small),
    }


def phase_torch_pruning(row: MiniLMRow, out: Path, settings: dict, root: Path) -> dict:
    """Torch-Pruning heads + FFN channels to the target, then the shared budget with the same distillation."""
    from torch_pruning_baseline import DistillationTrainer, encoder_linear_params, prune_with_torch_pruning

    from hf_flop.trainer import PruningArguments

    # Taylor importance from 8 batches of 16 training sentences
    tokenizer, train, test, collator, calibration, dense = common.dense_start(root, settings, 8, 16)
    model = copy.deepcopy(dense)
    example = {k: v for k, v in calibration[0].items() if k != "labels"}
    before = encoder_linear_params(model)
    prune_with_torch_pruning(model, example, row.target, row.score, calibration)
    sparsity = 1 - encoder_linear_params(model) / before
    accuracy_oneshot = common.accuracy(model, test, collator)
    model.train()
    start = time.perf_counter()
    DistillationTrainer(
        model=model,
        args=common.epoch_arguments(out / "work", settings, PruningArguments),
        teacher_model=dense,
        train_dataset=train,
        data_collator=collator,
    ).train()
    wall = time.perf_counter() - start
    accuracy = common.accuracy(model, test, collator)
    model.eval()
    return {
        "accuracy": accuracy,
        "accuracy_oneshot": accuracy_oneshot,
        "sparsity": sparsity,
        "target": row.target,
        "latency": _latency(dense, model, test, tokenizer, settings["max_length"]),
        "flops_ratio": common.linear_flops_ratio(dense, model),
        "wall_time_s": wall,
    }


def phase_no_training(row: MiniLMRow, out: Path, settings: dict, root: Path) -> dict:
    """One-shot heads + FFN rows from the dense start, no training: accuracy after plain removal and after the refit.

    ``row.seed`` > 0 draws the calibration sentences from another shuffle of the training set (the spread
    of a one-shot result is the spread over calibration draws; the test set stays the same)."""
    from torch_pruning_baseline import encoder_linear_params, prune_with_torch_pruning

    from hf_flop import FlopConfig, compact, get_flop_model, prune_oneshot, reconstruct, sparsity_report

    batches, size = ONESHOT_CALIBRATION[common.results_mode(root)]
    _, _, test, collator, calibration, model = common.dense_start(root, settings, batches, size, row.seed)

    result = {
        "method": row.recipe,
        "target": row.target,
        "calibration_sentences": batches * size,
        "calibration_seed": row.seed,
    }
    start = time.perf_counter()
    if row.pruner == "torch_pruning":
        before = encoder_linear_params(model)
        example = {k: v for k, v in calibration[0].items() if k != "labels"}
        prune_with_torch_pruning(model, example, row.target, row.score, calibration)
        result.update(sparsity=1 - encoder_linear_params(model) / before, prune_time_s=time.perf_counter() - start)
        return {**result, "accuracy": common.accuracy(model, test, collator)}
    config = FlopConfig(levels=list(row.levels), target_sparsity=row.target, uniform_shapes=row.uniform_shapes)
    gated = get_flop_model(model, config)
    if row.pruner == "flap":
        from flap_baseline import prune_flap

        prune_flap(gated, calibration, row.target)
        result["prune_time_s"] = time.perf_counter() - start
    else:
        prune_oneshot(gated, None, calibration, row.score, ranking=row.ranking, reconstruct=False)
        result["prune_time_s"] = time.perf_counter() - start
        result["accuracy_plain"] = common.accuracy(gated, test, collator)
        start = time.perf_counter()
        report = reconstruct(gated, calibration, progress=False)
        result["reconstruct_time_s"] = time.perf_counter() - start
        result["refit_modules"] = [sum(r.applied for r in report.layers), len(report.layers)]
    result["accuracy"] = common.accuracy(gated, test, collator)
    result["sparsity"] = sparsity_report(gated).deterministic_sparsity
    small = compact(gated)
    result["accuracy_compacted"] = common.accuracy(small, test, collator)  # the same model, smaller: a sanity check
    result["compacted_class"] = type(small).__name__  # the stock class, or the Flop* class of per-layer shapes
    return result


def phase_wall_time(row: MiniLMRow, out: Path, settings: dict, root: Path) -> dict:
    """The pruning run's wall time against a dense fine-tune of the same steps.

    One process, back to back, with nothing else running (run it alone): a plain ``Trainer`` on the
    dense model, then ``PruningTrainer(pruning_phase=0)`` at the row's target with the teacher (one-shot
    scores, refit, then every step recovers) twice: with ``compact_recovery`` (the default: the steps
    train the compacted model) and without (the full-size model with its masks held). Each from a fresh
    copy of the dense model, the same data and seed; the accuracy of each pruned model is recorded too.
    """
    from transformers import Trainer

    from hf_flop import FlopConfig, compact, get_flop_model
    from hf_flop.trainer import PruningArguments, PruningTrainer

    batches, size = ONESHOT_CALIBRATION[common.results_mode(root)]
    _, train, test, collator, calibration, dense = common.dense_start(root, settings, batches, size)
    work = out / "work"
    result = {}

    start = time.perf_counter()
    Trainer(
        model=copy.deepcopy(dense).train(),
        args=common.epoch_arguments(work, settings),
        train_dataset=train,
        data_collator=collator,
    ).train()
    result["dense_finetune_s"] = time.perf_counter() - start

    for route, compacted in (("compacted", True), ("masked", False)):
        gated = get_flop_model(copy.deepcopy(dense), FlopConfig(levels=list(row.levels), target_sparsity=row.target))
        start = time.perf_counter()
        trainer = PruningTrainer(
            model=gated,
            args=common.epoch_arguments(
                work, settings, PruningArguments, pruning_phase=0.0, compact_recovery=compacted
            ),
            teacher_model=dense,
            train_dataset=train,
            data_collator=collator,
            reconstruction_data=calibration,
        )
        trainer.train()
        result[f"pruning_trainer_{route}_s"] = time.perf_counter() - start
        result[f"pruning_trainer_{route}_vs_dense"] = result[f"pruning_trainer_{route}_s"] / result["dense_finetune_s"]
        result[f"accuracy_{route}"] = common.accuracy(compact(gated), test, collator)
        assert trainer.compacted_recovery == compacted
    result["load_avg_end"] = list(os.getloadavg())
    return result


PHASES_BY_KIND = {
    "dense_start": phase_dense_start,
    "dense_same_budget": phase_dense_same_budget,
    "cli": phase_cli,
    "torch_pruning": phase_torch_pruning,
    "no_training": phase_no_training,
    "equal_budget": phase_equal_budget,
    "wall_time": phase_wall_time,
}


def ensure_dense_model(root: Path, settings: dict) -> None:
    """Re-create ``root/dense_model`` (not committed) on a machine that lacks it, and check that it is the
    dense start the committed rows used: the same fine-tune must give the accuracy ``dense_rerun.json`` holds."""
    import shutil

    target = root / "dense_model"
    if target.is_dir():
        return
    print(f"{target} is missing (models are not committed): fine-tuning the dense start again", flush=True)
    partial = root / "dense_model.partial"
    shutil.rmtree(partial, ignore_errors=True)
    (root / "dense_rerun").mkdir(exist_ok=True)
    result = _dense_start(root / "dense_rerun", settings, partial)
    recorded = root / "dense_rerun.json"
    recorded_accuracy = json.loads(recorded.read_text())["accuracy"] if recorded.exists() else result["accuracy"]
    if recorded_accuracy != result["accuracy"]:
        raise SystemExit(
            f"the re-created dense start scores {result['accuracy']}, the recorded one "
            f"{recorded_accuracy}: new rows would not start where the committed rows "
            f"did (a start whose classifier head was drawn unseeded, as the first ones were, cannot be re-created; "
            f"rows compared with new ones must be re-run from this start). It is kept at {partial} for inspection."
        )
    partial.rename(target)


def run_phase(row: MiniLMRow, out: Path, settings: dict, root: Path) -> dict:
    if row.kind != "dense_start":
        ensure_dense_model(root, settings)
    return PHASES_BY_KIND[row.kind](row, out, settings, root)


def main() -> None:
    from phase_runner import run_benchmark

    run_benchmark(__file__, "minilm", ROWS, SETTINGS, run_phase, summarize)


def _speedups(latency: dict) -> tuple[float | None, float | None]:
    """Batch-1 and batch-32 speed-ups (results of the first runs hold only the milliseconds)."""

    def speedup(timing: dict) -> float | None:
        return timing.get("speedup", timing.get("dense", 0) / timing["pruned"] if "pruned" in timing else None)

    return speedup(latency.get("1", {})), speedup(latency.get("32", {}))


def summarize(root: Path, mode: str) -> None:
    from phase_runner import read_results, write_summary

    results = read_results(root, ROWS)
    dense = results.get("dense", {})
    dense_more = results.get("dense_more", {})
    start = results.get("dense_rerun", dense)  # the dense model the one-shot rows were pruned from
    rows, oneshot = [], []
    for name, r in results.items():
        kind = ROWS[name].kind
        if kind == "no_training":
            oneshot.append(
                {
                    "run": name,
                    "target": r["target"],
                    "sparsity": r.get("sparsity"),
                    "accuracy_plain": r.get("accuracy_plain"),
                    "accuracy": r["accuracy"],
                    "drop_vs_dense_points": 100 * (start.get("accuracy", 0) - r["accuracy"]),
                    "prune_time_s": r.get("prune_time_s"),
                    "reconstruct_time_s": r.get("reconstruct_time_s"),
                }
            )
        if kind not in ("cli", "torch_pruning"):
            continue
        speedup_b1, speedup_b32 = _speedups(r.get("latency", {}))
        rows.append(
            {
                "run": name,
                "target": r.get("target"),
                "levels": r.get("levels"),
                "sparsity": r.get("sparsity"),
                "accuracy": r.get("accuracy"),
                "drop_vs_dense_points": 100 * (dense.get("accuracy", 0) - r["accuracy"]),
                "speedup_b1": speedup_b1,
                "speedup_b32": speedup_b32,
                "flops_ratio": r.get("flops_ratio"),
                "wall_time_s": r.get("wall_time_s"),
                "wall_vs_dense_same_epochs": (r["wall_time_s"] / dense_more["wall_time_s"])
                if r.get("wall_time_s") and dense_more.get("wall_time_s")
                else None,
                "peak_rss_mb": r.get("peak_rss_mb"),
                "peak_rss_vs_dense": r["peak_rss_mb"] / dense_more["peak_rss_mb"]
                if dense_more.get("peak_rss_mb")
                else None,
            }
        )
    summarize_equal_budget(results, start, mode)
    summary = {
        "mode": mode,
        "settings": SETTINGS[mode],
        "machine": {"cpus": os.cpu_count()},
        "dense": dense,
        "dense_more": dense_more,
        "dense_oneshot_start": start,
        "rows": rows,
        "oneshot_rows": oneshot,
    }
    write_summary("bench_minilm", summary, _plot)


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, oneshot = summary["rows"], summary.get("oneshot_rows", [])
    fig = plt.figure(figsize=(12, 8.5 if oneshot else 4))
    grid = fig.add_gridspec(2 if oneshot else 1, 2)
    axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])]
    if oneshot:
        axes.append(fig.add_subplot(grid[1, :]))

    def series(r: dict) -> str:  # one line per method across targets: hf-flop prune rank+head+row, each importance
        row = ROWS[r["run"]]
        if row.kind == "torch_pruning":
            return f"tp_{row.score}"
        return "flop" if row.levels == RANK_HEAD_ROW else ""

    for method, marker in (("flop", "o"), ("tp_magnitude", "s"), ("tp_taylor", "^")):
        pts = [r for r in rows if series(r) == method]
        if pts:
            axes[0].plot([r["sparsity"] for r in pts], [100 * r["accuracy"] for r in pts], marker=marker, label=method)
            axes[1].plot(
                [r["sparsity"] for r in pts], [r["speedup_b32"] or 0 for r in pts], marker=marker, label=method
            )
    for r in rows:  # the levels at 50 %: single points, labelled
        if ROWS[r["run"]].kind == "cli" and ROWS[r["run"]].target == 0.5:
            axes[0].plot(r["sparsity"], 100 * r["accuracy"], "x", color="C0")
            axes[1].plot(r["sparsity"], r["speedup_b32"] or 0, "x", color="C0")
            axes[0].annotate(r["levels"], (r["sparsity"], 100 * r["accuracy"]), fontsize=7)
            axes[1].annotate(r["levels"], (r["sparsity"], r["speedup_b32"] or 0), fontsize=7)
    if summary["dense"]:
        axes[0].axhline(100 * summary["dense"]["accuracy"], color="gray", ls="--", label="dense")
    axes[0].set(xlabel="removed fraction of encoder linear weights", ylabel="test accuracy (%)", title="accuracy")
    axes[1].set(xlabel="removed fraction of encoder linear weights", ylabel="CPU speed-up, batch 32", title="latency")
    if oneshot:
        ax = axes[2]
        xs = range(len(oneshot))
        ax.bar(
            [x - 0.2 for x in xs],
            [100 * (r["accuracy_plain"] or float("nan")) for r in oneshot],
            width=0.4,
            color="lightgray",
            label="plain removal",
        )
        ax.bar(
            [x + 0.2 for x in xs],
            [100 * r["accuracy"] for r in oneshot],
            width=0.4,
            color="C2",
            label="hf_flop: reconstructed; flap / tptaylor: their result",
        )
        if summary["dense"]:
            start = summary.get("dense_oneshot_start") or summary["dense"]
            ax.axhline(100 * start["accuracy"], color="gray", ls="--", label="dense start of these rows")
        ax.set_xticks(list(xs), [r["run"].removeprefix("os_") for r in oneshot], rotation=60, ha="right", fontsize=8)
        ax.set(ylabel="test accuracy (%)", title="one-shot, no fine-tuning (heads + FFN rows)", ylim=(45, 90))
    for ax in axes:
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    if oneshot:
        axes[2].legend(fontsize=8, loc="lower left", framealpha=0.9)
    fig.suptitle(f"MiniLM-L6 on Rotten Tomatoes sentences ({summary['mode']})")
    fig.tight_layout()
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
