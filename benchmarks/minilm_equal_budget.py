"""The equal-budget comparison on MiniLM (bench_minilm.py's ``eq_*`` rows): prune, then recover.

Every row starts from the same dense model (``dense_model``, the dense start of ``dense_rerun.json``),
gets the same steps with the same logit distillation from it, and the rows that read calibration
data read the same training sentences (draw ``row.seed``, which is also the training seed). How a row
prunes is its ``pruner`` (minilm_rows.py):

* ``hf_flop``, ``same_share``, ``torch_pruning_masks``, ``torch_pruning``: prune once, compact, then
  every step recovers at the small size (``DistillationTrainer``);
* ``gradual``: one-shot + refit in GRADUAL_STAGES, compacting each time, recovering between;
* ``learned``: ``PruningTrainer`` with the row's ``trainer_args`` (one phase, two phases, or one-shot
  masks before the first step).

The summary (``bench_minilm_equal_budget.json`` / ``.png``) gives every recipe and target its seeds,
their mean and spread.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import common
from minilm_rows import (
    EQUAL_BUDGET_FIRST,
    EQUAL_BUDGET_LAST,
    GRADUAL_STAGES,
    ONESHOT_CALIBRATION,
    PRUNING_PHASE,
    ROWS,
    SETTINGS,
    MiniLMRow,
)


def phase_equal_budget(row: MiniLMRow, out: Path, settings: dict, root: Path, save_to: Path | None = None) -> dict:
    """One equal-budget row (see the module docstring); ``save_to``: also save the recovered model there."""
    from torch_pruning_baseline import DistillationTrainer, encoder_linear_params

    from hf_flop import compact, sparsity_report
    from hf_flop.trainer import PruningArguments

    batches, size = ONESHOT_CALIBRATION[common.results_mode(root)]
    _, train, test, collator, calibration, dense = common.dense_start(root, settings, batches, size, row.seed)
    model = copy.deepcopy(dense)
    dense_linear = encoder_linear_params(dense)

    result = {"row": row.recipe, "target": row.target, "seed": row.seed, "calibration_sentences": batches * size}
    work = str(out / "work")
    start = time.perf_counter()
    result.update(hidden_distillation_weight=row.hidden_distillation, learning_rate=row.learning_rate)
    if row.pruner == "gradual":
        small, trainer = _gradual_recovery(row, model, dense, train, collator, calibration, settings, work)
        result["sparsity"] = 1 - encoder_linear_params(small) / dense_linear
    elif row.pruner == "learned":
        gated, trainer = _pruning_trainer(row, model, dense, train, collator, calibration, settings, work)
        result["sparsity"] = sparsity_report(gated).deterministic_sparsity
        result["boundary"] = trainer.boundary
        small = compact(gated).eval()
    else:  # prune once, compact, then every step recovers at the small size
        model, result["sparsity"] = _prune(row, model, dense, calibration, dense_linear)
        result["prune_time_s"] = time.perf_counter() - start
        result["accuracy_before_recovery"] = common.accuracy(model.eval(), test, collator)
        model.train()
        trainer = DistillationTrainer(
            model=model,
            args=common.epoch_arguments(
                work,
                settings,
                PruningArguments,
                seed=row.seed,
                hidden_distillation_weight=row.hidden_distillation,
                learning_rate=row.learning_rate,
            ),
            teacher_model=dense,
            train_dataset=train,
            data_collator=collator,
        )
        trainer.train()
        small = model.eval()
    result["wall_time_s"] = time.perf_counter() - start
    result["accuracy"] = common.accuracy(small, test, collator)
    result["accuracy_dense"] = common.accuracy(dense, test, collator)
    result["flops_ratio"] = common.linear_flops_ratio(dense, small)
    result["log"] = [e for e in trainer.state.log_history if "loss" in e]
    if save_to is not None:
        small.save_pretrained(save_to)
    return result


def _prune(row: MiniLMRow, model, dense, calibration, dense_linear: int):
    """The pruning step of a prune-then-recover row: the smaller model and the share of the linears removed."""
    from torch_pruning_baseline import encoder_linear_params, prune_with_torch_pruning

    from hf_flop import FlopConfig, compact, get_flop_model, prune_oneshot, sparsity_report

    if row.pruner == "torch_pruning":
        example = {k: v for k, v in calibration[0].items() if k != "labels"}
        prune_with_torch_pruning(model, example, row.target, row.score, calibration)
        return model, 1 - encoder_linear_params(model) / dense_linear
    gated = get_flop_model(model, FlopConfig(levels=list(row.levels), target_sparsity=row.target))
    if row.pruner == "same_share":  # every layer keeps the same share of its heads and FFN rows (TP's allocation)
        _keep_top_share(gated, calibration, 1 - row.target, row.score)
    elif row.pruner == "torch_pruning_masks":  # Torch-Pruning's heads and rows, hf_flop's refit (or none)
        _keep_what_torch_pruning_keeps(gated, copy.deepcopy(dense), calibration, row)
    else:
        prune_oneshot(gated, None, calibration, row.score, reconstruct=row.refit)
    sparsity = sparsity_report(gated).deterministic_sparsity
    return compact(gated), sparsity


def _pruning_trainer(row: MiniLMRow, model, dense, train, collator, calibration, settings: dict, work: str):
    """A learned row: PruningTrainer with the row's arguments on the gated model; returns it and the trainer."""
    from hf_flop import FlopConfig, get_flop_model
    from hf_flop.trainer import PruningArguments, PruningTrainer

    gated = get_flop_model(model, FlopConfig(levels=list(row.levels), target_sparsity=row.target))
    trainer = PruningTrainer(  # with pruning_phase < 1 it starts from scores of the calibration data
        model=gated,
        args=common.epoch_arguments(work, settings, PruningArguments, seed=row.seed, **row.trainer_args),
        teacher_model=dense,
        train_dataset=train,
        data_collator=collator,
        reconstruction_data=calibration if row.reconstruction_data else None,
    )
    trainer.train()
    return gated, trainer


def _gradual_recovery(row: MiniLMRow, model, dense, train, collator, calibration, settings: dict, work: str):
    """Prune in GRADUAL_STAGES, each a one-shot prune + refit of the current (compacted) model; between
    stages recover on the next slice of one seeded pass over the data, under one linear warm-up/decay
    schedule for the whole run (the optimizer restarts at each stage: the shapes change)."""
    import torch
    from torch_pruning_baseline import DistillationTrainer, encoder_linear_params
    from transformers import get_linear_schedule_with_warmup

    from hf_flop import FlopConfig, compact, get_flop_model, prune_oneshot
    from hf_flop.trainer import PruningArguments

    order = train.shuffle(seed=row.seed)
    size = settings["batch_size"]
    total = len(order) // size
    dense_linear = encoder_linear_params(dense)
    bounds = [round(frac * total) for frac, _ in GRADUAL_STAGES] + [total]
    trainer = None
    for k, (_, share) in enumerate(GRADUAL_STAGES):
        kept_now = encoder_linear_params(model) / dense_linear
        relative = 1 - (1 - share * row.target) / kept_now  # of the current model's linears
        gated = get_flop_model(model, FlopConfig(levels=list(row.levels), target_sparsity=relative))
        prune_oneshot(gated, None, calibration, row.score)
        model = compact(gated).train()
        rows = order.select(range(bounds[k] * size, min(len(order), bounds[k + 1] * size)))
        if not len(rows):
            continue
        args = common.epoch_arguments(
            work + f"_{k}",
            settings,
            PruningArguments,
            seed=row.seed,
            hidden_distillation_weight=row.hidden_distillation,
            learning_rate=row.learning_rate,
        )
        trainer = DistillationTrainer(
            model=model, args=args, teacher_model=dense, train_dataset=rows, data_collator=collator
        )
        trainer.create_optimizer()
        whole = get_linear_schedule_with_warmup(trainer.optimizer, round(0.1 * total), total)
        offset = bounds[k]
        trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            trainer.optimizer, lambda step, f=whole.lr_lambdas[0], o=offset: f(step + o)
        )
        trainer.train()
    return model.eval(), trainer


def _keep_top_share(gated, calibration, share: float, score: str) -> None:
    """Per gate (each layer's heads, each layer's FFN rows) keep the top ``share`` of units by ``score``,
    then refit: hf_flop's scores and reconstruction with Torch-Pruning's per-layer allocation."""
    import torch

    from hf_flop import compute_scores, reconstruct
    from hf_flop.scores import find_gated_units

    scores = compute_scores(gated, calibration, score)
    for unit in find_gated_units(gated):
        keep = torch.zeros(unit.n_units, dtype=torch.bool)
        keep[torch.argsort(scores[unit.key], descending=True)[: round(share * unit.n_units)]] = True
        unit.gate.set_mask(keep)
    reconstruct(gated, calibration)


def _keep_what_torch_pruning_keeps(gated, dense, calibration, row: MiniLMRow) -> None:
    """Set ``gated``'s masks to the heads and FFN rows Torch-Pruning keeps at the row's target, then refit (``row.refit``).

    Torch-Pruning removes rows physically; every kept row is an exact copy of a dense row, which is how
    the kept indices are found (the query rows of a head's first dimension, the FFN up rows)."""
    import torch
    from torch_pruning_baseline import prune_with_torch_pruning

    from hf_flop import reconstruct
    from hf_flop.scores import find_gated_units

    example = {k: v for k, v in calibration[0].items() if k != "labels"}
    pruned = prune_with_torch_pruning(copy.deepcopy(dense), example, row.target, row.score, calibration)
    head_dim = dense.config.hidden_size // dense.config.num_attention_heads
    keep = {}
    for i, (full, small) in enumerate(zip(dense.bert.encoder.layer, pruned.bert.encoder.layer)):
        for key, w_full, w_small, step in (
            (f"head_{i}", full.attention.self.query.weight, small.attention.self.query.weight, head_dim),
            (f"row_{i}", full.intermediate.dense.weight, small.intermediate.dense.weight, 1),
        ):
            first_rows = w_full[::step]  # a unit's first row identifies it
            found = torch.cdist(w_small[::step].detach(), first_rows.detach()).argmin(1)
            assert torch.equal(w_small[::step], first_rows[found]), "a kept row is not a copy of a dense row"
            mask = torch.zeros(len(first_rows), dtype=torch.bool)
            mask[found] = True
            keep[key] = mask
    for unit in find_gated_units(gated):
        unit.gate.set_mask(keep[unit.key])
    if row.refit:
        reconstruct(gated, calibration)


def summarize_equal_budget(results: dict, start: dict, mode: str) -> None:
    """bench_minilm_equal_budget[_quick].json/.png: per recipe and target, the seeds, their mean and spread."""
    from phase_runner import write_summary

    groups: dict[tuple[str, int], list[dict]] = {}
    for name, r in results.items():
        if ROWS[name].kind == "equal_budget":
            groups.setdefault((r["row"], round(100 * r["target"])), []).append(r)

    def place(recipe: str) -> int:  # EQUAL_BUDGET_FIRST in order, then the others, then EQUAL_BUDGET_LAST
        if recipe in EQUAL_BUDGET_LAST:
            return len(EQUAL_BUDGET_FIRST) + 1 + EQUAL_BUDGET_LAST.index(recipe)
        return EQUAL_BUDGET_FIRST.index(recipe) if recipe in EQUAL_BUDGET_FIRST else len(EQUAL_BUDGET_FIRST)

    rows = []
    for (recipe, target), runs in sorted(groups.items(), key=lambda item: (item[0][1], place(item[0][0]))):
        accuracy = [100 * r["accuracy"] for r in runs]
        rows.append(
            {
                "row": recipe,
                "target": target / 100,
                "seeds": [r["seed"] for r in runs],
                "accuracy": accuracy,
                "mean": statistics.mean(accuracy),
                "spread": statistics.stdev(accuracy) if len(accuracy) > 1 else None,
                "drop_vs_dense_points": 100 * start.get("accuracy", 0) - statistics.mean(accuracy),
                "sparsity": [r["sparsity"] for r in runs],
                "accuracy_before_recovery": [
                    100 * r["accuracy_before_recovery"] for r in runs if "accuracy_before_recovery" in r
                ],
                "wall_time_s": statistics.mean(r["wall_time_s"] for r in runs),
                "peak_rss_mb": max(r.get("peak_rss_mb", 0) for r in runs),
            }
        )
    summary = {
        "mode": mode,
        "settings": SETTINGS[mode],
        "dense_start": start,
        "pruning_phase": PRUNING_PHASE,
        "note": "spread: standard deviation over seeds (training seed and calibration draw); drop against the "
        "dense start every row was pruned from",
        "rows": rows,
    }
    write_summary("bench_minilm_equal_budget", summary, _plot)


# Plot colours by what chooses the structure (the legend's wording)
FAMILIES = {
    "obs": ("C3", "hf_flop one-shot, score obs (the default) + refit, then recovery"),
    "oneshot": ("C0", "hf_flop one-shot, other scores (+ refit), then recovery"),
    "torch_pruning": ("C1", "Torch-Pruning Taylor"),
    "torch_pruning_masks": ("C2", "Torch-Pruning's structure in hf_flop (compacted, refit or not)"),
    "learned": ("C7", "hf_flop learned gates (one or two phases)"),
}


def _family(row: MiniLMRow) -> str:
    if row.pruner in ("torch_pruning", "torch_pruning_masks"):
        return row.pruner
    if row.pruner == "learned":  # one-shot masks before the first step (pruning_phase 0, the default), or gates
        if row.trainer_args.get("pruning_phase", 0.0) != 0.0:
            return "learned"
        return "obs" if row.trainer_args.get("oneshot_score", "obs") == "obs" else "oneshot"
    return "obs" if row.score == "obs" else "oneshot"


def _plot(summary: dict, path: Path) -> None:
    """Horizontal bars (one per recipe, mean over seeds, dots: the seeds), one panel per target; colour by family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_recipe = {row.recipe: row for row in ROWS.values() if row.kind == "equal_budget"}
    targets = sorted({r["target"] for r in summary["rows"]})
    height = max(len([r for r in summary["rows"] if r["target"] == t]) for t in targets)
    fig, axes = plt.subplots(1, len(targets), figsize=(6.5 * len(targets), 1.2 + 0.32 * height), squeeze=False)
    dense = 100 * summary["dense_start"].get("accuracy", 0)
    for ax, target in zip(axes[0], targets):
        rows = sorted((r for r in summary["rows"] if r["target"] == target), key=lambda r: r["mean"])
        ys = range(len(rows))
        colours = [FAMILIES[_family(by_recipe[r["row"]])][0] for r in rows]
        ax.barh(ys, [r["mean"] for r in rows], color=colours, alpha=0.8)
        for y, r in zip(ys, rows):
            ax.plot(r["accuracy"], [y] * len(r["accuracy"]), "k.", ms=5)  # every seed
            ax.annotate(
                f"{r['mean']:.1f} (n={len(r['accuracy'])})",
                (max(r["accuracy"]), y),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
            )
        ax.axvline(dense, color="gray", ls="--", lw=1)
        low = min(min(r["accuracy"]) for r in rows)
        ax.set_xlim(max(0, low - 3), dense + 2)
        ax.set_yticks(list(ys), [r["row"] for r in rows], fontsize=8)
        ax.set(xlabel="test accuracy (%)", title=f"{int(100 * target)} % of the encoder linears removed")
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour, alpha=0.8) for colour, _ in FAMILIES.values()]
    labels = [text for _, text in FAMILIES.values()]
    handles.append(plt.Line2D([], [], color="gray", ls="--"))
    labels.append(f"dense start {dense:.1f}")
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle("MiniLM-L6, equal budget (250 steps, the same distillation per row); bars: mean, dots: seeds")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    common.save_figure(fig, path)
