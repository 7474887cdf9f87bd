"""One-shot allocation across layers: the Fisher score, standardised ranking, protected layers."""

from __future__ import annotations

import pytest
import torch
from test_scores import calibration, injected, largest_unit
from tiny_models import tiny_gpt2, tiny_llama

from hf_flop import FlopConfig, compute_scores, prune_oneshot, prune_to_target, sparsity_report
from hf_flop.architectures import arch_spec, find_layers
from hf_flop.model import find_flop_model
from hf_flop.ranking import removal_order as _removal_order
from hf_flop.scores import find_gated_units


@pytest.mark.parametrize("levels", [["head", "row"], ["rank", "head", "row"]])
def test_fisher_on_one_batch_is_the_squared_sensitivity(levels):
    model = injected("llama", levels)
    batch = calibration("llama", n=1)
    fisher = compute_scores(model, batch, "fisher")
    sensitivity = compute_scores(model, batch, "sensitivity")
    assert set(fisher) == set(sensitivity) == set(find_flop_model(model).gates())
    for key in fisher:
        assert torch.allclose(fisher[key], sensitivity[key] ** 2, rtol=1e-5, atol=1e-12)
    assert any(bool((v > 0).any()) for v in fisher.values())


def test_fisher_sums_over_batches():
    model = injected("gpt2", ["head", "row"])
    data = calibration("gpt2", n=3)
    total = compute_scores(model, data, "fisher")
    parts = [compute_scores(model, [b], "fisher") for b in data]
    for key in total:
        assert torch.allclose(total[key], sum(p[key] for p in parts), rtol=1e-5, atol=1e-12)


def test_standardized_ranking_ignores_each_gates_offset_and_scale():
    """FLAP's allocation: a gate whose scores are all shifted or scaled (another layer's activation
    scale) loses no more and no fewer units for it; the per-gate ratio is scale-free but not shift-free."""
    model = injected("llama", ["head", "row"])
    units = find_gated_units(model)
    g = torch.Generator().manual_seed(0)
    scores = {s.key: torch.rand(s.n_units, generator=g) + 0.5 for s in units}
    moved = {s.key: (3.0**i) * scores[s.key] + 10.0 * i for i, s in enumerate(units)}
    assert torch.equal(_removal_order(units, scores, "standardized"), _removal_order(units, moved, "standardized"))
    assert not torch.equal(_removal_order(units, scores, "per_gate"), _removal_order(units, moved, "per_gate"))


@pytest.mark.parametrize("ranking", ["standardized", "per_gate"])
def test_standardized_pruning_hits_the_target(ranking):
    model = injected("gpt2", ["rank", "head", "row"])
    scores = compute_scores(model, calibration("gpt2"), "fisher")
    result = prune_to_target(model, scores, 0.4, ranking=ranking)
    assert abs(result.kept_params - result.budget) <= result.step / 2
    assert sparsity_report(model).deterministic_kept_params == result.kept_params
    assert abs(result.kept_params - 0.6 * sparsity_report(model).prunable_params) <= largest_unit(model) / 2


def test_protected_layers_keep_every_unit():
    model = tiny_llama().eval()
    pruned = prune_oneshot(
        model, FlopConfig(levels=["head", "row"], target_sparsity=0.2), calibration("llama"), "fisher",
        protect_layers=(0,), reconstruct=False,
    )
    flop = find_flop_model(pruned)
    first = find_layers(flop.model, arch_spec("llama"))[0]
    for group in flop.structure_groups:
        open_units = int(flop.flop_structure_gates[group.key].l0(True))
        if group.layer == first:
            assert open_units == group.n_units
    assert sparsity_report(pruned).deterministic_sparsity > 0.1  # the others took the cut


def test_protect_layers_errors():
    with pytest.raises(ValueError, match="protect_layers"):
        prune_oneshot(tiny_gpt2(), FlopConfig(levels=["head", "row"]), calibration("gpt2"), "activation",
                      protect_layers=(5,), reconstruct=False)
    with pytest.raises(ValueError, match="cannot be reached"):
        prune_oneshot(tiny_gpt2(), FlopConfig(levels=["head", "row"], target_sparsity=0.6), calibration("gpt2"),
                      "activation", protect_layers=(0, -1), reconstruct=False)


def test_fluctuation_is_column_energy_times_input_variance():
    model = injected("llama", ["head", "row"])
    flop = find_flop_model(model)
    group = next(g for g in flop.structure_groups if g.level == "row")
    consumer = flop.flop_layers()[group.consumer]
    seen = []
    handle = consumer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    data = calibration("llama", n=3)
    scores = compute_scores(model, data, "fluctuation")
    with torch.no_grad():
        for batch in data:
            model(**batch)
    handle.remove()
    x = torch.cat(seen).double()
    variance = x.var(0, unbiased=False)
    energy = consumer.folded_weight().double().pow(2).sum(0)
    assert torch.allclose(scores[group.key].double(), energy * variance, rtol=1e-4, atol=1e-10)
    activation = compute_scores(model, data, "activation")[group.key]
    assert not torch.allclose(activation, scores[group.key])
