"""plot_training: one readable panel per quantity (issue 15), for both constraint types."""

from __future__ import annotations

import pytest

from hf_flop.app.plots import plot_training


def _logs(extra) -> list[dict]:
    return [
        {"step": s, "loss": 1.0 + s / 10, "task_loss": 1.0 - s / 20, "expected_sparsity": s / 20,
         "deterministic_sparsity": s / 20, "target_sparsity": min(s / 10, 0.5), **extra(s)}
        for s in range(1, 11)
    ]


@pytest.mark.parametrize(
    "extra, panels",
    [
        (lambda s: {"lambda_1": -0.1 * s, "lambda_2": 10.0 * s}, 4),  # loss, sparsity, lambda_1, lambda_2
        (lambda s: {"topk_strength": 50.0, "topk_gap": 0.1 / s}, 4),
        (lambda s: {}, 2),
        # one-shot masks then recovery (pruning_phase=0): the idle multipliers get no panels
        (lambda s: {"lambda_1": 0.0, "lambda_2": 0.0, "phase": "recovery"}, 2),
        (lambda s: {"lambda_1": 0.0, "lambda_2": 0.0, "phase": "pruning" if s < 5 else "recovery"}, 4),
    ],
)
def test_plot_training_gives_each_quantity_a_panel(tmp_path, monkeypatch, extra, panels):
    import matplotlib.figure

    seen = []
    savefig = matplotlib.figure.Figure.savefig

    def recording(fig, *args, **kwargs):
        # the main axes (the twin loss axis shares its position, so count the distinct positions)
        seen.append(len({tuple(ax.get_position().bounds) for ax in fig.axes}))
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording)
    out = plot_training(_logs(extra), tmp_path / "run.png", title="t")
    assert out.read_bytes()[:4] == b"\x89PNG" and seen == [panels]


def test_plot_training_needs_pruning_logs(tmp_path):
    with pytest.raises(ValueError, match="no pruning logs"):
        plot_training([{"step": 1, "loss": 1.0}], tmp_path / "x.png")
