"""PNG plots of a pruning run: the constraint over the steps, and what each layer kept.

Needs ``matplotlib`` (the ``examples`` extra). Files are written atomically.
"""

from __future__ import annotations

import re
from pathlib import Path

from .files import atomic_file

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
    """Sparsity (expected, eval-mask, target), Lagrange multipliers and loss against the step.

    ``log_history`` is ``trainer.state.log_history`` of a ``PruningTrainer`` run.
    """
    plt = _pyplot()
    logs = [e for e in log_history if "expected_sparsity" in e and "step" in e]
    if not logs:
        raise ValueError("log_history has no pruning logs (no 'expected_sparsity'); was it a PruningTrainer run?")
    steps = [e["step"] for e in logs]
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    for key, style in (("target_sparsity", "k--"), ("expected_sparsity", "C0-"), ("deterministic_sparsity", "C1-")):
        if key in logs[0]:
            axes[0].plot(steps, [e[key] for e in logs], style, label=key.replace("_", " "))
    axes[0].set_ylabel("sparsity")
    axes[0].legend(loc="lower right")
    for key, style in (("lambda_1", "C2-"), ("lambda_2", "C3-")):
        if key in logs[0]:
            axes[1].plot(steps, [e[key] for e in logs], style, label=key.replace("_", " "))
    axes[1].set_ylabel("multiplier")
    axes[1].axhline(0.0, color="0.8", lw=0.8)
    axes[1].legend(loc="best")
    for key, style in (("loss", "C4-"), ("task_loss", "C5-")):
        if key in logs[0]:
            axes[2].plot(steps, [e[key] for e in logs], style, label=key.replace("_", " "))
    axes[2].set_ylabel("loss")
    axes[2].set_xlabel("step")
    axes[2].legend(loc="best")
    if title:
        axes[0].set_title(title)
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
