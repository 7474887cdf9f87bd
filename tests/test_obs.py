"""Score "obs" (hf_flop.obs): greedy Optimal Brain Surgeon costs, checked against explicit refits."""

import pytest
import torch
from test_scores import calibration, injected, largest_unit
from tiny_models import TINY_BUILDERS

from hf_flop import FlopConfig, compute_scores, prune_oneshot, sparsity_report
from hf_flop.refit import Moments, fit_columns, output_error
from hf_flop.scores import find_gated_units, obs_scores


def consumer_moments(model, unit, data) -> torch.Tensor:
    """The second moments of the unit gate's consumer input, recorded independently of obs_scores."""
    moments = Moments(unit.n_units * unit.unit)
    handle = unit.observed.register_forward_pre_hook(lambda m, args: moments.add(args[0].detach()))
    try:
        with torch.no_grad():
            for batch in data:
                model(**batch)
    finally:
        handle.remove()
    return moments.matrix()


def refit_error(unit, moments: torch.Tensor, removed: list[int]) -> float:
    """Output error of the consumer with the units ``removed`` gone and every other column refit (no ridge)."""
    weight = unit.observed.folded_weight().double()
    bias = unit.observed.bias
    bias = bias.detach().double() if bias is not None else None
    keep = torch.ones(unit.n_units, dtype=torch.bool)
    keep[removed] = False
    fit = fit_columns(weight, bias, moments, keep.repeat_interleave(unit.unit), fit_bias=bias is not None, ridge=0.0)
    return output_error(fit.weight, fit.bias, weight, bias, moments)


@pytest.mark.parametrize("arch", sorted(TINY_BUILDERS))
def test_obs_costs_are_the_errors_left_after_refitting(arch):
    """The first removed unit costs what removing it alone and refitting leaves; the second what removing both
    adds to that (its score is the running maximum); and no single unit is cheaper than the first."""
    model = injected(arch, ["head", "row"])
    data = calibration(arch)
    scores = obs_scores(model, data, ridge=0.0, rounds=256)  # rounds >= units per gate: one unit per greedy step
    for unit in find_gated_units(model):
        moments = consumer_moments(model, unit, data)
        cost = scores[unit.key].double() ** 2
        first, second = torch.argsort(cost, stable=True)[:2].tolist()
        alone = [refit_error(unit, moments, [u]) for u in range(unit.n_units)]
        scale = max(alone)
        assert cost[first] == pytest.approx(alone[first], rel=1e-4, abs=1e-9 * scale)
        assert alone[first] == pytest.approx(min(alone), rel=1e-4, abs=1e-9 * scale)
        added = refit_error(unit, moments, [first, second]) - alone[first]
        assert cost[second] == pytest.approx(max(cost[first], added), rel=1e-4, abs=1e-9 * scale)


def test_a_repeated_ffn_row_costs_nothing_though_it_is_loud():
    """Two identical FFN neurons: after the refit either one stands in for the other, so OBS removes one
    first at almost no cost (the ridge term keeps it above 0), where the activation score rates both above the
    layer's median."""
    model = injected("llama", ["head", "row"])
    layer = model.base_model.model.model.layers[0].mlp
    with torch.no_grad():
        loud = torch.linalg.vector_norm(layer.up_proj.base_layer.weight, dim=1).argmax().item()
        twin = (loud + 1) % layer.up_proj.base_layer.weight.shape[0]
        for proj in (layer.up_proj, layer.gate_proj):
            proj.base_layer.weight[twin] = proj.base_layer.weight[loud]
    data = calibration("llama")
    obs = compute_scores(model, data, "obs")["row_0"]
    activation = compute_scores(model, data, "activation")["row_0"]
    assert min(activation[loud], activation[twin]) > activation.median()
    assert min(obs[loud], obs[twin]) < 0.1 * obs.median()
    assert torch.argsort(obs)[0].item() in (loud, twin)


@pytest.mark.parametrize("arch", sorted(TINY_BUILDERS))
def test_prune_oneshot_with_obs_hits_the_target(arch):
    data = calibration(arch)
    pruned = prune_oneshot(
        TINY_BUILDERS[arch]().eval(), FlopConfig(levels=["head", "row"], target_sparsity=0.45), data, "obs"
    )
    report = sparsity_report(pruned)
    assert abs(report.deterministic_kept_params - 0.55 * report.prunable_params) <= largest_unit(pruned) / 2
    with torch.no_grad():
        assert torch.isfinite(pruned.eval()(input_ids=data[0]["input_ids"]).logits).all()


def test_gates_without_a_consumer_get_their_activation_score():
    data = calibration("llama")
    model = injected("llama", ["rank", "head", "row"])
    obs, activation = compute_scores(model, data, "obs"), compute_scores(model, data, "activation")
    assert obs.keys() == activation.keys()
    levels = {s.key: s.level for s in find_gated_units(model)}
    assert {levels[k] for k in obs} == {"rank", "head", "row"}
    for key in obs:
        if levels[key] == "rank":
            torch.testing.assert_close(obs[key], activation[key])
        else:
            assert not torch.allclose(obs[key], activation[key])


def test_a_one_off_iterator_is_read_for_both_scores():
    """With rank gates beside head/row gates the data is read twice (activation, then OBS): a generator works."""
    model = injected("llama", ["rank", "head", "row"])
    from_list = obs_scores(model, calibration("llama"))
    from_generator = obs_scores(model, (batch for batch in calibration("llama")))
    assert from_list.keys() == from_generator.keys()
    for key in from_list:
        torch.testing.assert_close(from_list[key], from_generator[key])


def test_obs_refuses_bad_arguments():
    data = calibration("llama")
    model = injected("llama", ["head", "row"])
    with pytest.raises(ValueError, match="rounds"):
        obs_scores(model, data, rounds=0)
    with pytest.raises(ValueError, match="ridge"):
        obs_scores(model, data, ridge=-1.0)
    with pytest.raises(ValueError, match="calibration_data"):
        compute_scores(model, None, "obs")
    closed = find_gated_units(model)[1]  # a closed unit reads zeros: without a ridge its moments are singular
    closed.gate.set_mask(torch.arange(closed.n_units) > 0)
    with pytest.raises(ValueError, match="singular"):
        obs_scores(model, data, ridge=0.0)
    assert obs_scores(model, data)[closed.key][0] < obs_scores(model, data)[closed.key][1:].min()
