"""SmolLM2-135M on the Penn Treebank, CPU, a fixed budget: hf_flop against Torch-Pruning and FLAP-style baselines.

Every row is declared in smollm2_rows.py (``--list`` prints them). Every trained row gets the same
recovery budget: ``steps`` optimizer steps of ``batch`` blocks of ``block`` tokens (the same seeded
blocks in the same order), learning rate 5e-5 unless the row sets its own, and, for every pruned
model, the same logit distillation from the pretrained model. The target is 50 % of the non-embedding
linear weights (q, k, v, o, gate, up, down) removed; the embedding rows remove the same number of
parameters in total from the linears and the (tied) embedding together. The long rows and the
equal-budget rows (``eq_*``: every row from the pretrained model with the same distillation and the
same calibration blocks) train for 4x the steps; the no-training rows (``os<T>_*``) prune one-shot at
30 or 50 % and are measured with no recovery at all. The total-size rows (``width_depth.py``) are
equal-budget rows pruned to a total parameter count by any mix of levels (residual channels, layers,
heads, rows, or the mix ``search_shape`` picks), with Torch-Pruning's width pruning as the peer; the
``gguf_total_size`` rows time their saved models in llama.cpp (``width_depth_measure.py``).

Each row runs in its own process; a row whose JSON exists is skipped, so a run resumes.

    .venv/bin/python benchmarks/bench_smollm2.py --list     # the rows, and which are measured
    .venv/bin/python benchmarks/bench_smollm2.py            # full run (hours on 2 cores; measured rows are skipped)
    .venv/bin/python benchmarks/bench_smollm2.py --quick    # smoke test: a few steps, tiny subsets
    .venv/bin/python benchmarks/bench_smollm2.py --only os50_cost --threads 2   # the cost row, alone

Results: benchmarks/results/smollm2[_quick]/<row id>.json, summary in bench_smollm2[_quick].json/.png.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when imported
import common  # noqa: E402
import smollm2_rows  # noqa: E402
from smollm2_rows import EMBEDDING_CLUSTERS, LEVELS, LONG_BUDGET, ROWS, SETTINGS, TARGET, SmolLM2Row  # noqa: E402
from width_depth import prune_hf_flop, prune_torch_pruning_width  # noqa: E402
from width_depth_measure import phase_gguf_total_size, saved_model  # noqa: E402

# the total-size rows (width_depth.py): prune to a total parameter count, by the names smollm2_rows declares
TOTAL_SIZE_PRUNERS = dict(zip(smollm2_rows.TOTAL_SIZE_PRUNERS, (prune_hf_flop, prune_torch_pruning_width)))


def _model(settings: dict):
    """The benchmark's pretrained model and tokenizer (``settings["model"]``: SmolLM2 unless a row set says so)."""
    return common.causal_lm(settings.get("model", "smollm2"))


def _levels(settings: dict, row: SmolLM2Row) -> list[str]:
    """hf_flop's levels: the row's own, else the model's (heads and rows; query heads for a multi-query model)."""
    return list(row.levels or settings.get("levels", LEVELS))


def _args(out: Path, settings: dict, **extra):
    from hf_flop.trainer import PruningArguments

    return common.training_arguments(
        out / "work",
        PruningArguments,
        max_steps=settings["steps"],
        per_device_train_batch_size=settings["batch"],
        logging_steps=max(1, settings["steps"] // 20),
        **extra,
    )


def _perplexity(model, test) -> float:
    from transformers import default_data_collator

    from hf_flop.metrics import evaluate_model

    return evaluate_model(model, test, task="causal-lm", collator=default_data_collator, batch_size=8)["perplexity"]


def _linear_params(model) -> int:
    """q, k, v, o, gate, up, down weights: the budget's base."""
    from torch_pruning_baseline import encoder_linear_params

    return encoder_linear_params(model)


def _latency(dense, small, test) -> dict:
    """Batch 1, one block, one thread: the ratio stays meaningful on a shared machine."""
    import torch

    inputs = {"input_ids": torch.tensor([test[0]["input_ids"]])}
    return common.speedup_vs_dense(dense, small, inputs, repeats=10, warmup=2, threads=1)


def _train(trainer) -> float:
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def _sizes(model, dense_linear: int) -> dict:
    linear = _linear_params(model)
    return {
        "total_params": model.num_parameters(),
        "linear_params": linear,
        "linear_sparsity": 1 - linear / dense_linear,
    }


def _pretrained_stats(root: Path) -> dict:
    return json.loads((root / "pretrained.json").read_text())


def phase_pretrained(row: SmolLM2Row, out: Path, settings: dict, root: Path) -> dict:
    model, tokenizer = _model(settings)
    _, test, _ = common.ptb_blocks(settings, tokenizer)
    embedding = model.get_input_embeddings().weight.numel()
    return {
        "perplexity": _perplexity(model, test),
        "total_params": model.num_parameters(),
        "linear_params": _linear_params(model),
        "embedding_params": embedding,
        "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
        "test_tokens": len(test) * settings["block"],
    }


def phase_dense(row: SmolLM2Row, out: Path, settings: dict, root: Path) -> dict:
    from transformers import Trainer, default_data_collator

    model, tokenizer = _model(settings)
    train, test, _ = common.ptb_blocks(settings, tokenizer)
    trainer = Trainer(model=model, args=_args(out, settings), train_dataset=train, data_collator=default_data_collator)
    wall = _train(trainer)
    return {"perplexity": _perplexity(model, test), "wall_time_s": wall, **_sizes(model, _linear_params(model))}


def _embedding_clusters(model, train) -> dict:
    """FlopConfig fields for level 'embedding': EMBEDDING_CLUSTERS clusters by frequency in the training blocks."""
    from hf_flop.embedding import frequency_cutoffs

    tokens = [t for row in train["input_ids"] for t in row]
    cutoffs, order = frequency_cutoffs(tokens, model.config.vocab_size, EMBEDDING_CLUSTERS)
    return {"embedding_cutoffs": cutoffs, "embedding_order": order}


def _flop_budget(model, pretrained_stats: dict, with_embedding: bool) -> float:
    """The target sparsity that keeps (1 - TARGET) of the linears plus the whole embedding, in total."""
    from hf_flop import sparsity_report

    if not with_embedding:
        return TARGET
    prunable = sparsity_report(model).prunable_params
    kept = (1 - TARGET) * pretrained_stats["linear_params"] + pretrained_stats["embedding_params"]
    return 1 - kept / prunable


def phase_learned(row: SmolLM2Row, out: Path, settings: dict, root: Path) -> dict:
    """PruningTrainer's learned gates (one phase), warm-started from activation scores, then compaction."""
    from transformers import default_data_collator

    from hf_flop import FlopConfig, compact, compute_scores, get_flop_model, sparsity_report, warm_start_gates
    from hf_flop.accounting import find_flop_model
    from hf_flop.trainer import PruningTrainer

    pretrained_stats = _pretrained_stats(root)
    model, tokenizer = _model(settings)
    train, test, calibration = common.ptb_blocks(settings, tokenizer)
    teacher = copy.deepcopy(model)  # the distillation teacher, then the dense side of the latency ratio
    levels = _levels(settings, row) + (["embedding"] if row.embedding else [])
    extra = _embedding_clusters(model, train) if row.embedding else {}
    config = FlopConfig(levels=levels, target_sparsity=TARGET, **extra)
    model = get_flop_model(model, config)
    flop_config = find_flop_model(model).flop_config  # the embedding's share is known once it is injected
    flop_config.target_sparsity = _flop_budget(model, pretrained_stats, row.embedding)
    warm_start_gates(model, compute_scores(model, calibration, "activation"))
    arguments = {"target_warmup_steps": 0.5, "gate_learning_rate": row.gate_learning_rate, "pruning_phase": 1.0}
    trainer = PruningTrainer(
        model=model,
        args=_args(out, settings, **arguments),
        teacher_model=teacher,
        train_dataset=train,
        data_collator=default_data_collator,
    )
    wall = _train(trainer)
    report = sparsity_report(model)
    gated_ppl = _perplexity(model, test)
    small = compact(model)
    return {
        "perplexity": _perplexity(small, test),
        "perplexity_gated": gated_ppl,
        "target_sparsity": flop_config.target_sparsity,
        "gate_learning_rate": row.gate_learning_rate,
        "deterministic_sparsity": report.deterministic_sparsity,
        "expected_sparsity": float(report.expected_sparsity),
        "embedding_cutoffs": extra.get("embedding_cutoffs"),
        "wall_time_s": wall,
        "latency_b1": _latency(teacher, small, test),
        **_sizes(small, pretrained_stats["linear_params"]),
        "log": [e for e in trainer.state.log_history if "expected_sparsity" in e],
    }


def _recover(out: Path, settings: dict, model, teacher, train, **extra) -> float:
    """The shared recovery budget: fine-tune with the same distillation PruningTrainer applies."""
    from torch_pruning_baseline import DistillationTrainer
    from transformers import default_data_collator

    model.train()
    trainer = DistillationTrainer(
        model=model,
        args=_args(out, settings, **extra),
        teacher_model=teacher,
        train_dataset=train,
        data_collator=default_data_collator,
    )
    return _train(trainer)


def _hf_flop_oneshot(row: SmolLM2Row, model, calibration, train, pretrained_stats: dict, levels: list[str]):
    """hf_flop's one-shot: gates closed by ``row.score``, then compaction to a plain smaller model.

    With ``row.embedding``: level 'embedding' too, at the total size of the head+row rows.
    """
    from hf_flop import FlopConfig, compact, get_flop_model, prune_oneshot, sparsity_report

    extra = _embedding_clusters(model, train) if row.embedding else {}
    levels = levels + (["embedding"] if row.embedding else [])
    gated = get_flop_model(model, FlopConfig(levels=levels, target_sparsity=TARGET, **extra))
    target = _flop_budget(gated, pretrained_stats, row.embedding)
    gated = prune_oneshot(gated, None, calibration, row.score, target_sparsity=target)
    report = sparsity_report(gated)
    return compact(gated), {"deterministic_sparsity": report.deterministic_sparsity, "target_sparsity": target}


def _torch_pruning_ffn(model, calibration, importance: str, target: float = TARGET):
    """Torch-Pruning's FFN channel pruning, the ratio set so the linears lose ``target`` of their weights."""
    from torch_pruning_baseline import prune_ffn_with_torch_pruning

    from hf_flop.architectures import layer_layouts
    from hf_flop.recognition import spec_for

    spec = spec_for(model)
    modules = dict(model.named_modules())
    layouts = layer_layouts(model, spec)
    ffn = sum(modules[f"{layout.prefix}.{n}"].weight.numel() for layout in layouts for n in (*spec.up, spec.down))
    ffn_ratio = target * _linear_params(model) / ffn
    example = {"input_ids": calibration[0]["input_ids"][:1]}
    return prune_ffn_with_torch_pruning(model, example, ffn_ratio, importance, calibration), {"ffn_ratio": ffn_ratio}


def phase_prune_then_recover(row: SmolLM2Row, out: Path, settings: dict, root: Path) -> dict:
    """One-shot pruning (hf_flop or Torch-Pruning, ``row.pruner``), then the shared recovery budget."""
    pretrained_stats = _pretrained_stats(root)
    model, tokenizer = _model(settings)
    train, test, calibration = common.ptb_blocks(settings, tokenizer)
    teacher = copy.deepcopy(model).eval()
    start = time.perf_counter()
    if row.pruner == "hf_flop":
        small, details = _hf_flop_oneshot(row, model, calibration, train, pretrained_stats, _levels(settings, row))
    else:
        small, details = _torch_pruning_ffn(model, calibration, row.score)
    prune_time = time.perf_counter() - start
    oneshot_ppl = _perplexity(small, test)
    wall = _recover(out, settings, small, teacher, train)
    return {
        "perplexity": _perplexity(small, test),
        "perplexity_oneshot": oneshot_ppl,
        "prune_time_s": prune_time,
        "wall_time_s": wall,
        "latency_b1": _latency(teacher, small.eval(), test),
        **details,
        **_sizes(small, pretrained_stats["linear_params"]),
    }


def phase_no_training(row: SmolLM2Row, out: Path, settings: dict, root: Path) -> dict:
    """One-shot pruning with no recovery: perplexity after plain removal, and after reconstruction."""
    from hf_flop import FlopConfig, compact, get_flop_model, prune_oneshot, reconstruct, sparsity_report

    pretrained_stats = _pretrained_stats(root)
    model, tokenizer = _model(settings)
    _, test, _ = common.ptb_blocks(settings, tokenizer)
    sequences = settings["cost_sequences" if row.cost else "oneshot_sequences"]
    calibration = common.ptb_calibration(tokenizer, sequences, settings["oneshot_block"])
    result = {
        "target_sparsity": row.target,
        "method": row.recipe,
        "calibration_tokens": sequences * settings["oneshot_block"],
    }
    start = time.perf_counter()
    if row.pruner == "torch_pruning":
        small, details = _torch_pruning_ffn(model, calibration, row.score, row.target)
        result.update(details, prune_time_s=time.perf_counter() - start, perplexity=_perplexity(small, test))
        return {**result, **_sizes(small, pretrained_stats["linear_params"])}
    config = FlopConfig(levels=_levels(settings, row), target_sparsity=row.target, uniform_shapes=row.uniform_shapes)
    gated = get_flop_model(model, config)
    if row.pruner == "flap":
        from flap_baseline import prune_flap

        result.update(prune_flap(gated, calibration, row.target), prune_time_s=time.perf_counter() - start)
        result["perplexity"] = _perplexity(gated, test)
    elif row.cost:  # the user's call: scores, pruning and reconstruction in one
        prune_oneshot(gated, None, calibration, row.score, reconstruct_options={"progress": False})
        result["prune_time_s"] = time.perf_counter() - start
        result["perplexity"] = _perplexity(gated, test)
    else:
        prune_oneshot(gated, None, calibration, row.score, ranking=row.ranking, reconstruct=False)
        result["prune_time_s"] = time.perf_counter() - start
        result["perplexity_plain"] = _perplexity(gated, test)
        start = time.perf_counter()
        report = reconstruct(gated, calibration, add_bias=row.add_bias, progress=False)
        result["reconstruct_time_s"] = time.perf_counter() - start
        result["refit_modules"] = [sum(r.applied for r in report.layers), len(report.layers)]
        result["perplexity"] = _perplexity(gated, test)
    result["deterministic_sparsity"] = sparsity_report(gated).deterministic_sparsity
    small = compact(gated)
    result["perplexity_compacted"] = _perplexity(small, test)  # the same model, smaller: a sanity check
    result["compacted_class"] = type(small).__name__  # the stock class, or the Flop* class of per-layer shapes
    return {**result, **_sizes(small, pretrained_stats["linear_params"])}


def phase_equal_budget(row: SmolLM2Row, out: Path, settings: dict, root: Path) -> dict:
    """One row of the equal-budget comparison (4x the budget; see the module docstring)."""
    from transformers import Trainer, default_data_collator

    from hf_flop import FlopConfig, compact, get_flop_model, prune_oneshot, sparsity_report
    from hf_flop.trainer import PruningTrainer

    pretrained_stats = _pretrained_stats(root)
    model, tokenizer = _model(settings)
    train, test, _ = common.ptb_blocks(settings, tokenizer)
    calibration = common.ptb_calibration(tokenizer, settings["oneshot_sequences"], settings["oneshot_block"])
    teacher = copy.deepcopy(model).eval()
    result = {
        "row": row.recipe,
        "seed": row.seed,
        "steps": settings["steps"],
        "calibration_tokens": sum(b["input_ids"].numel() for b in calibration),
    }
    start = time.perf_counter()
    if row.pruner == "dense":
        trainer = Trainer(
            model=model, args=_args(out, settings), train_dataset=train, data_collator=default_data_collator
        )
        trainer.train()
        small = model
    elif row.pruner in ("hf_flop", "torch_pruning", *TOTAL_SIZE_PRUNERS):  # prune once, compact, then recover
        result["learning_rate"] = row.learning_rate
        if row.pruner in TOTAL_SIZE_PRUNERS:
            model, details = TOTAL_SIZE_PRUNERS[row.pruner](row, model, calibration, pretrained_stats)
            result.update(details)
        elif row.pruner == "hf_flop":
            result["score"] = row.score
            config = FlopConfig(levels=_levels(settings, row), target_sparsity=row.target, uniform_shapes=row.uniform_shapes)
            gated = get_flop_model(model, config)
            prune_oneshot(gated, None, calibration, row.score, reconstruct_options={"progress": False})
            result["deterministic_sparsity"] = sparsity_report(gated).deterministic_sparsity
            model = compact(gated)
        else:
            model, details = _torch_pruning_ffn(model, calibration, row.score, row.target)
            result.update(details)
        result["prune_time_s"] = time.perf_counter() - start
        result["perplexity_before_recovery"] = _perplexity(model.eval(), test)
        _recover(out, settings, model, teacher, train, seed=row.seed, learning_rate=row.learning_rate)
        small = model.eval()
        if row.pruner in TOTAL_SIZE_PRUNERS:  # for the llama.cpp rows (gguf_total_size)
            small.save_pretrained(saved_model(root, row.id))
    else:  # learned: PruningTrainer warm-starts the gates from activation scores of the calibration data
        model = get_flop_model(model, FlopConfig(levels=_levels(settings, row), target_sparsity=row.target))
        trainer = PruningTrainer(
            model=model,
            args=_args(out, settings, **row.trainer_args),
            teacher_model=teacher,
            train_dataset=train,
            data_collator=default_data_collator,
            reconstruction_data=calibration,
        )
        trainer.train()
        result["deterministic_sparsity"] = sparsity_report(model).deterministic_sparsity
        result["boundary"] = trainer.boundary
        result["log"] = [e for e in trainer.state.log_history if "loss" in e]
        small = compact(model).eval()
    result["wall_time_s"] = time.perf_counter() - start
    result["perplexity"] = _perplexity(small, test)
    if row.pruner != "dense":
        result["latency_b1"] = _latency(teacher, small, test)
    return {**result, **_sizes(small, pretrained_stats["linear_params"])}


PHASES_BY_KIND = {
    "pretrained": phase_pretrained,
    "dense": phase_dense,
    "learned": phase_learned,
    "prune_then_recover": phase_prune_then_recover,
    "no_training": phase_no_training,
    "equal_budget": phase_equal_budget,
    "gguf_total_size": phase_gguf_total_size,
}


def run_phase(row: SmolLM2Row, out: Path, settings: dict, root: Path) -> dict:
    if row.steps_factor != 1:  # the long and equal-budget rows: more steps (and training blocks)
        settings = {**settings, "steps": row.steps_factor * settings["steps"]}
    return PHASES_BY_KIND[row.kind](row, out, settings, root)


def main() -> None:
    from phase_runner import run_benchmark

    run_benchmark(__file__, "smollm2", ROWS, SETTINGS, run_phase, summarize)


def summarize(
    root: Path,
    mode: str,
    *,
    rows: dict[str, SmolLM2Row] = ROWS,
    name: str = "bench_smollm2",
    settings: dict = SETTINGS,
    title: str = "SmolLM2-135M",
) -> None:
    """Every measured row of ``rows`` into ``<name>.json`` and ``<name>.png`` (another model: bench_gemma3.py)."""
    from phase_runner import read_results, write_summary

    declared = rows
    results = read_results(root, declared)
    pretrained = results.get("pretrained", {})
    rows, oneshot, llama_cpp = [], [], {}
    for run, row in declared.items():
        r = results.get(run)
        if r is None or row.kind == "pretrained":
            continue
        if row.kind == "gguf_total_size":
            llama_cpp[run] = r
            continue
        if row.kind == "no_training":
            oneshot.append(
                {
                    "run": run,
                    "target": r["target_sparsity"],
                    "linear_sparsity": r.get("linear_sparsity"),
                    "perplexity_plain": r.get("perplexity_plain"),
                    "perplexity": r["perplexity"],
                    "vs_pretrained": r["perplexity"] / pretrained["perplexity"] if pretrained else None,
                    "prune_time_s": r.get("prune_time_s"),
                    "reconstruct_time_s": r.get("reconstruct_time_s"),
                    "calibration_tokens": r.get("calibration_tokens"),
                    "peak_rss_mb": r.get("peak_rss_mb"),
                    "torch_threads": r.get("torch_threads"),
                }
            )
            continue
        rows.append(
            {
                "run": run,
                "perplexity": r["perplexity"],
                "perplexity_before_recovery": r.get("perplexity_oneshot", r.get("perplexity_before_recovery")),
                "total_params": r.get("total_params"),
                "linear_sparsity": r.get("linear_sparsity"),
                "total_vs_pretrained": r["total_params"] / pretrained["total_params"]
                if pretrained and r.get("total_params")
                else None,
                "speedup_b1": (r.get("latency_b1") or {}).get("speedup"),
                "wall_time_s": r.get("wall_time_s"),
                "peak_rss_mb": r.get("peak_rss_mb"),
                # the total-size rows (width_depth.py): the shape they reached, and the search's candidates
                **{k: r[k] for k in ("shape", "compacted_class", "chosen_mix", "prune_time_s") if k in r},
                **({"search": r["search"]["candidates"]} if "search" in r else {}),
            }
        )
    summary = {
        "mode": mode,
        "model": title,
        "settings": settings[mode],
        "target": TARGET,
        "levels": settings[mode].get("levels", LEVELS),
        "pretrained": pretrained,
        "rows": rows,
        "oneshot_rows": oneshot,
        "llama_cpp": llama_cpp,
    }
    write_summary(name, summary, _plot)


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, oneshot = summary["rows"], summary.get("oneshot_rows", [])
    width = max(10, 0.32 * max(len(rows), len(oneshot)))  # room for every row's label
    fig, axes = plt.subplots(2 if oneshot else 1, 1, figsize=(width, 9 if oneshot else 4.5), squeeze=False)
    ax = axes[0][0]
    names = [f"{r['run']} ({r['linear_sparsity']:.2f})" for r in rows]  # what was really removed
    after = [r["perplexity"] for r in rows]
    before = [r["perplexity_before_recovery"] or float("nan") for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], before, width=0.4, label="one-shot, no training", color="lightgray")
    ax.bar(
        [x + 0.2 for x in xs],
        after,
        width=0.4,
        label=f"after {summary['settings']['steps']} steps (_long, eq_: {LONG_BUDGET * summary['settings']['steps']})",
    )
    if summary["pretrained"]:
        ax.axhline(summary["pretrained"]["perplexity"], color="gray", ls="--", label="pretrained")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=8)
    ax.set(
        ylabel="PTB test perplexity (log)",
        title=f"{summary.get('model', 'SmolLM2-135M')} on PTB: 50% of the linears removed"
        + (", or a total parameter count" if any("shape" in r for r in rows) else "")
        + f" (linears removed in brackets; {summary['mode']})",
    )
    ax.legend()
    if oneshot:
        ax = axes[1][0]
        xs = range(len(oneshot))
        plain = [r["perplexity_plain"] or float("nan") for r in oneshot]
        ax.bar([x - 0.2 for x in xs], plain, width=0.4, color="lightgray", label="plain removal")
        ax.bar(
            [x + 0.2 for x in xs],
            [r["perplexity"] for r in oneshot],
            width=0.4,
            color="C2",
            label="hf_flop rows: after reconstruction; baselines (flap, tptaylor): their result",
        )
        if summary["pretrained"]:
            ax.axhline(summary["pretrained"]["perplexity"], color="gray", ls="--", label="pretrained")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), [r["run"] for r in oneshot], rotation=30, ha="right")
        ax.set(ylabel="PTB test perplexity (log)", title="one-shot, no training: heads + FFN rows at 30% / 50%")
        ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
