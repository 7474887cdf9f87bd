"""Issue 13: fixing trained masks at exactly the target size."""

from __future__ import annotations

import pytest
import torch
from test_trainer import flop_llama

from hf_flop import sparsity_report
from hf_flop.accounting import largest_unit_params
from hf_flop.oneshot import fix_masks_at_target, gate_order_scores, prune_to_target


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _masks(model) -> dict[str, torch.Tensor]:
    return {k: g.deterministic_mask().detach().clone() for k, g in model.base_model.gates().items()}


def _half_unit(model) -> float:
    """Half the largest unit, as a fraction of the prunable parameters: how close a fixed size can get."""
    return largest_unit_params(model) / sparsity_report(model).prunable_params / 2


def _randomised_gates(levels, seed: int = 1):
    model = flop_llama(0.5, levels=levels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.base_model.gates().values():
            gate.log_alpha.copy_(torch.randn(gate.n, generator=g) * 3)
    return model


# --- fixing the masks at the target ------------------------------------------------------------------


@pytest.mark.parametrize("levels", [("rank",), ("head", "row"), ("rank", "head", "row")])
def test_fixing_the_masks_hits_the_target_within_half_a_unit(levels):
    model = _randomised_gates(levels)
    result = fix_masks_at_target(model)
    report = sparsity_report(model)
    assert abs(report.deterministic_sparsity - 0.5) <= _half_unit(model)
    assert abs(result.kept_params - result.budget) <= result.step / 2
    for gate in model.base_model.gates().values():  # set_mask: every eval value exactly 0 or 1
        assert set(gate.deterministic_mask().unique().tolist()) <= {0.0, 1.0}


def test_fixing_the_masks_keeps_the_trained_decisions_and_changes_only_the_edge():
    """At the eval masks' own size the masks are reproduced; sparser, every dropped unit stays dropped and the
    least firmly kept units (lowest log_alpha) close first. Heads and rows only: no rank component is reopened
    for compacting to a dense matrix."""
    model = _randomised_gates(("head", "row"))
    before = _masks(model)
    strength = {k: g.log_alpha.detach().clone() for k, g in model.base_model.gates().items()}
    own = sparsity_report(model).deterministic_sparsity
    fix_masks_at_target(model, own)
    assert all(torch.equal(before[k] != 0, m != 0) for k, m in _masks(model).items())

    model = _randomised_gates(("head", "row"))
    fix_masks_at_target(model, min(own + 0.2, 0.9))
    after = _masks(model)
    newly_closed = []
    for key, mask in after.items():
        assert not ((before[key] == 0) & (mask != 0)).any(), key  # nothing dropped was reopened
        newly_closed += strength[key][(before[key] != 0) & (mask == 0)].tolist()
    kept_strengths = torch.cat([strength[k][after[k] != 0] for k in after])
    assert newly_closed and max(newly_closed) <= kept_strengths.min().item()


def test_gate_order_scores_rank_kept_units_above_dropped_ones():
    model = _randomised_gates(("rank", "head", "row"))
    scores, masks = gate_order_scores(model), _masks(model)
    kept = torch.cat([scores[k][masks[k] != 0] for k in masks])
    dropped = torch.cat([scores[k][masks[k] == 0] for k in masks])
    assert len(dropped) and dropped.max() < kept.min()
    assert sorted(torch.cat(list(scores.values())).tolist()) == list(range(len(kept) + len(dropped)))
    with pytest.raises(ValueError, match="ranking"):
        prune_to_target(model, scores, ranking="raw")
