"""The score registry: compute_scores and prune_oneshot dispatch through SCORE_TYPES, whose flags say what a
score needs; a new score is one decorated function."""

import pytest
import torch
from test_scores import calibration, injected
from tiny_models import tiny_llama

from hf_flop import FlopConfig, compute_scores, prune_oneshot, sparsity_report
from hf_flop.scores import SCORE_TYPES, SCORES, find_gated_units, register_score


def test_the_built_in_scores_and_what_they_need():
    assert SCORES == (
        "magnitude", "activation", "fluctuation", "obs", "sensitivity", "fisher", "block_influence", "skip_loss"
    )
    assert tuple(SCORE_TYPES)[: len(SCORES)] == SCORES
    assert [name for name in SCORES if not SCORE_TYPES[name].needs_data] == ["magnitude"]
    assert [name for name in SCORES if SCORE_TYPES[name].needs_labels] == ["sensitivity", "fisher", "skip_loss"]
    assert [name for name in SCORES if "ema_decay" in SCORE_TYPES[name].options] == ["sensitivity"]


@pytest.fixture
def registered():
    """A score registered for one test, and taken out of the registry after it."""
    names = set(SCORE_TYPES)
    yield register_score
    for name in set(SCORE_TYPES) - names:
        del SCORE_TYPES[name]


def test_a_registered_score_is_computed_and_pruned_by(registered):
    @registered("unit_order", needs_data=False, needs_labels=False)
    def unit_order(model):
        """Later units of each gate are more important."""
        return {s.key: torch.arange(s.n_units, dtype=torch.float32) for s in find_gated_units(model)}

    model = injected("llama", ["row"])
    scores = compute_scores(model, None, "unit_order")
    assert scores.keys() == compute_scores(model, None, "magnitude").keys()
    pruned = prune_oneshot(tiny_llama().eval(), FlopConfig(levels=["row"], target_sparsity=0.5), None, "unit_order",
                           reconstruct=False)
    gate = pruned.base_model.gates()["row_0"]
    kept = gate.deterministic_mask().detach() != 0
    assert not kept[0] and kept[-1] and sparsity_report(pruned).deterministic_sparsity > 0.4
    assert "unit_order" not in SCORES  # the vocabulary of the built-in scores does not grow


def test_the_flags_decide_what_is_asked_for(registered):
    @registered("needs_loss", needs_data=True, needs_labels=True)
    def needs_loss(model, calibration_data, *, max_batches=None):
        return {}

    model = injected("llama", ["row"])
    with pytest.raises(ValueError, match=r"^score='needs_loss' needs calibration_data: .* and 'labels' for its loss.*"
                       r"'magnitude' need\(s\) none"):
        compute_scores(model, None, "needs_loss")
    with pytest.raises(ValueError, match="^score='needs_loss' needs calibration_data"):
        prune_oneshot(tiny_llama(), FlopConfig(levels=["row"]), None, "needs_loss")
    with pytest.raises(ValueError, match=r"^ema_decay applies to score='sensitivity' only"):
        compute_scores(model, calibration("llama"), "needs_loss", ema_decay=0.9)
    without = [{k: v for k, v in b.items() if k != "labels"} for b in calibration("llama")]
    with pytest.raises(ValueError, match="^score='fisher' needs a loss, but calibration batch 0 has no 'labels'"):
        compute_scores(model, without, "fisher")


def test_bad_registrations_are_refused(registered):
    with pytest.raises(ValueError, match="'obs' is registered already"):
        registered("obs", needs_data=True, needs_labels=False)
    with pytest.raises(ValueError, match="needs_labels=True needs needs_data=True"):
        registered("odd", needs_data=False, needs_labels=True)


# --- the recommended one-shot score ---------------------------------------------------------------------
def test_the_recommended_score_is_obs_but_activation_with_uniform_shapes():
    from hf_flop.scores import recommended_oneshot_score

    assert recommended_oneshot_score(FlopConfig(levels=["head", "row"])) == "obs"
    assert recommended_oneshot_score(FlopConfig(levels=["head", "row"], uniform_shapes=True)) == "activation"


@pytest.mark.parametrize("uniform, expected", [(False, "obs"), (True, "activation")])
def test_prune_oneshot_defaults_to_the_recommended_score(uniform, expected):
    data = calibration("llama")

    def pruned(score=None):
        config = FlopConfig(levels=["head", "row"], target_sparsity=0.3, uniform_shapes=uniform)
        model = prune_oneshot(tiny_llama().eval(), config, data, score, reconstruct=False)
        return {k: g.deterministic_mask().detach() for k, g in model.base_model.gates().items()}

    default, chosen = pruned(), pruned(expected)
    assert default.keys() == chosen.keys() and all(torch.equal(default[k], chosen[k]) for k in default)
    # the default on a model that already has FLOP layers comes from its own config
    model = injected("llama", ["head", "row"], uniform_shapes=uniform, target_sparsity=0.3)
    masks = prune_oneshot(model, None, data, reconstruct=False).base_model.gates()
    assert all(torch.equal(masks[k].deterministic_mask().detach(), chosen[k]) for k in chosen)


def test_the_default_score_without_data_says_what_to_pass():
    model = tiny_llama()
    with pytest.raises(ValueError, match="recommended 'obs' by default .* or score='magnitude', which needs none"):
        prune_oneshot(model, FlopConfig(levels=["head", "row"]))
    assert not hasattr(model, "peft_config")  # refused before anything was injected
