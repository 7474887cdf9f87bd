"""PNG plots of a pruning run: the constraint over the steps, and what each layer kept.

Needs ``matplotlib`` (the ``examples`` extra). Files are written atomically.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..files import atomic_file

_LAYER = re.compile(r"\.(\d+)\.")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plots need matplotlib: pip install 'hf-flop[examples]' (or pip install matplotlib)."
        ) from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    return Path(path)


def plot_training(log_history: list[dict], path: str | Path, *, title: str = "") -> Path:
    """The run against the step, one readable panel per quantity.

    Panels: the task loss (the headline; the total that is optimised, which adds the constraint term
    and any distillation and may climb while the task loss falls, thin on its own axis); sparsity (target dashed, expected and eval-mask
    with distinct styles and markers, so neither hides the other); ``lambda_1`` and ``lambda_2`` each
    on its own axis (their scales differ by orders of magnitude), or for Top-k gates the
    regularizer's strength and gap. ``log_history`` is ``trainer.state.log_history`` of a
    ``PruningTrainer`` run.
    """
    plt = _pyplot()
    logs = [e for e in log_history if "expected_sparsity" in e and "step" in e]
    if not logs:
        raise ValueError("log_history has no pruning logs (no 'expected_sparsity'); was it a PruningTrainer run?")
    steps = [e["step"] for e in logs]

    def series(key: str) -> list[float] | None:
        return [e[key] for e in logs] if all(key in e for e in logs) else None

    multipliers = [k for k in ("lambda_1", "lambda_2", "topk_strength", "topk_gap") if series(k) is not None]
    if all(e.get("phase") == "recovery" for e in logs):  # one-shot masks (pruning_phase=0): no constraint ran
        multipliers = []
    fig, axes = plt.subplots(2 + len(multipliers), 1, figsize=(7, 3.0 + 1.9 * (1 + len(multipliers))), sharex=True)
    # 1. loss: the task loss leads; the total gets a thin line on a twin axis
    ax = axes[0]
    task, total = series("task_loss"), series("loss")
    if task is not None:
        ax.plot(steps, task, "C0-", lw=2, marker="o", ms=3, label="task loss")
        ax.set_ylabel("task loss")
        if total is not None:
            twin = ax.twinx()
            twin.plot(
                steps,
                total,
                color="0.55",
                lw=1,
                ls=":",
                label="total loss (optimised: with distillation and constraint)",
            )
            twin.set_ylabel("total loss", color="0.45")
            twin.tick_params(axis="y", colors="0.45")
            lines = ax.get_lines() + twin.get_lines()
            # above the panel: inside it would cover the curves, which fill the panel by construction
            ax.legend(
                lines,
                [line.get_label() for line in lines],
                loc="lower center",
                bbox_to_anchor=(0.5, 1.0),
                ncol=2,
                fontsize=8,
                frameon=False,
            )
        else:
            ax.legend(loc="upper right", fontsize=8)
    elif total is not None:
        ax.plot(steps, total, "C0-", lw=2, label="loss")
        ax.set_ylabel("loss")
        ax.legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    # 2. sparsity: three curves that often coincide, told apart by style and marker
    ax = axes[1]
    styles = {
        "target_sparsity": dict(color="k", ls="--", lw=1.2, label="target (warmed up)"),
        "expected_sparsity": dict(color="C1", ls="-", lw=2.2, marker="o", ms=4, label="expected (constrained)"),
        "deterministic_sparsity": dict(
            color="C2", ls="-.", lw=1.4, marker="x", ms=6, mew=1.5, label="eval masks (what compaction keeps)"
        ),
    }
    for key, style in styles.items():
        if series(key) is not None:
            ax.plot(steps, series(key), **style)
    ax.set_ylabel("sparsity")
    # no offset notation, and at least 0.1 of range: a size held fixed must read as a flat line at its value
    ax.ticklabel_format(axis="y", useOffset=False)
    values = [v for key in styles if series(key) is not None for v in series(key)]
    if max(values) - min(values) < 0.1:
        middle = (max(values) + min(values)) / 2
        ax.set_ylim(middle - 0.05, middle + 0.05)
    ax.legend(loc="lower right", fontsize=8)
    # 3+. each multiplier on its own axis: lambda_2 is often 10-100x lambda_1
    labels = {
        "lambda_1": "lambda_1\n(linear multiplier)",
        "lambda_2": "lambda_2\n(quadratic multiplier)",
        "topk_strength": "Top-k penalty\nstrength",
        "topk_gap": "Top-k gap\n(kept - target)",
    }
    for ax, key, color in zip(axes[2:], multipliers, ("C3", "C4", "C3", "C4")):
        ax.plot(steps, series(key), color=color, marker=".", lw=1.5)
        ax.axhline(0.0, color="0.8", lw=0.8)
        ax.set_ylabel(labels[key], fontsize=9)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _layer_index(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def plot_kept(report, path: str | Path, *, title: str = "") -> Path:
    """Per layer: kept fraction of each module's rank (or of its params when dense), heads and FFN rows.

    ``report`` is ``hf_flop.sparsity_report(model)`` at the end of the run.
    """
    plt = _pyplot()
    kinds: dict[str, dict[int, float]] = {}
    for name, mod in report.modules.items():
        layer = _layer_index(name)
        if layer is None:
            continue
        kind = name[_LAYER.search(name).end() :]  # e.g. "attention.self.query"
        if mod.rank:
            kept = mod.kept_rank / mod.rank
        else:
            kept = mod.kept_params / (mod.shape[0] * mod.shape[1])
        kinds.setdefault(kind, {})[layer] = kept
    levels: dict[str, dict[int, float]] = {}
    for block, per_level in report.structures.items():
        layer = _layer_index(block + ".")
        for level, (kept, total) in per_level.items():
            levels.setdefault(level, {})[layer if layer is not None else len(levels.get(level, {}))] = kept / total
    panels = 2 if levels else 1
    fig, axes = plt.subplots(panels, 1, figsize=(8, 4.2 * panels), squeeze=False, layout="constrained")
    ax = axes[0][0]
    width = 0.8 / max(len(kinds), 1)
    for i, (kind, per_layer) in enumerate(kinds.items()):  # in the model's order
        xs = sorted(per_layer)
        ax.bar([x + (i - (len(kinds) - 1) / 2) * width for x in xs], [per_layer[x] for x in xs], width, label=kind)
    ax.set_ylabel("kept rank fraction\n(params fraction if dense)")
    ax.set_xlabel("layer")
    ax.set_xticks(sorted({x for per_layer in kinds.values() for x in per_layer}))
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    if title:
        ax.set_title(title)
    if levels:
        ax = axes[1][0]
        width = 0.8 / len(levels)
        for i, (level, per_layer) in enumerate(sorted(levels.items())):
            xs = sorted(per_layer)
            ax.bar(
                [x + (i - (len(levels) - 1) / 2) * width for x in xs], [per_layer[x] for x in xs], width, label=level
            )
        ax.set_ylabel("kept fraction (heads / FFN rows)")
        ax.set_xlabel("layer")
        ax.set_xticks(sorted({x for per_layer in levels.values() for x in per_layer}))
        ax.set_ylim(0, 1.05)
        ax.legend(loc="upper right")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
