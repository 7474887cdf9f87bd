"""search_shape: candidate mixes of width, depth, heads and rows at one size, each pruned one-shot and scored."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_bert, tiny_llama

import hf_flop.shape_search as shape_search
from hf_flop import FlopConfig, ShapeMix, ShapeSearchConfig, compact, search_shape, sparsity_report
from hf_flop.hidden import hidden_channels
from hf_flop.lookup import find_flop_model

LEVELS = ["head", "row", "hidden", "layer"]
# two hidden fractions x two layer counts; at 40 % the widest and deepest pair cannot stay on target
OPTIONS = dict(score="activation", hidden_fractions=(0.0, 0.25), layer_fractions=(0.0, 0.25))


def _batches(vocab: int, n: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (2, 16), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


@pytest.fixture(scope="module")
def searched():
    model = tiny_llama(num_hidden_layers=4).eval()
    data = _batches(model.config.vocab_size)
    before = copy.deepcopy(model.state_dict())
    config = FlopConfig(levels=LEVELS, target_sparsity=0.4)
    result = search_shape(model, config, data, options=ShapeSearchConfig(**OPTIONS))
    return model, data, before, config, result


def test_candidates_land_at_one_size(searched):
    _, _, _, _, result = searched
    kept = [c.kept_params for c in result.candidates]
    assert len(result.candidates) == 3 and [s["mix"]["name"] for s in result.skipped] == ["hidden 25% + 1 layer"]
    step = max(c.step for c in result.candidates)
    assert max(kept) - min(kept) <= step
    for c in result.candidates:
        assert abs(c.kept_params - result.budget) <= c.step / 2 + 1e-9
    mixes = {c.mix for c in result.candidates}
    assert mixes == {ShapeMix(), ShapeMix(0.25, 0), ShapeMix(0.0, 1)}
    by_mix = {c.mix: c for c in result.candidates}
    assert by_mix[ShapeMix(0.25, 0)].kept_units["hidden"] == (24, 32)
    assert by_mix[ShapeMix(0.0, 1)].layers_removed and not by_mix[ShapeMix()].layers_removed


def test_chosen_is_lowest_and_model_unchanged(searched):
    model, _, before, _, result = searched
    assert result.best.loss == min(c.loss for c in result.candidates)
    assert len({c.loss for c in result.candidates}) == len(result.candidates)  # the mixes really differ
    assert result.model is None and not model.training
    assert not hasattr(model, "peft_config") and hidden_channels(model) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    table = result.table()
    assert table["chosen"] == result.best_index and len(table["candidates"]) == 3
    assert "<- chosen" in str(result)


def test_apply_reproduces_the_search_and_compacts_exactly(searched):
    model, data, _, config, result = searched
    model = copy.deepcopy(model)
    applied = search_shape(model, config, data, options=ShapeSearchConfig(**OPTIONS), apply=True)
    assert applied.table() == result.table()  # the same seed: the same split, scores, masks and losses
    pruned = applied.model.eval()
    assert sparsity_report(pruned).deterministic_kept_params == result.best.kept_params
    _, heldout = shape_search._split(data, ShapeSearchConfig(**OPTIONS))
    assert shape_search.heldout_loss(pruned, heldout) == pytest.approx(result.best.loss, abs=1e-6)  # the chosen model
    assert find_flop_model(pruned).flop_config.levels == LEVELS
    small = compact(pruned).eval()
    ids = data[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).logits, pruned(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    dense = sum(p.numel() for p in tiny_llama(num_hidden_layers=4).parameters())
    assert sum(p.numel() for p in small.parameters()) < dense


def test_uniform_shapes_search_compacts_to_the_stock_class():
    model = tiny_llama(num_hidden_layers=4).eval()
    data = _batches(model.config.vocab_size)
    # every level: the kept channels stay a multiple of whichever head count the heads end at
    config = FlopConfig(levels=["head", "row", "hidden", "layer"], target_sparsity=0.4, uniform_shapes=True)
    result = search_shape(model, config, data, options=ShapeSearchConfig(**OPTIONS), apply=True)
    assert len(result.candidates) == 3
    small = compact(result.model.eval()).eval()
    assert type(small) is type(model) and small.config.hidden_size == result.best.kept_units["hidden"][0]
    assert small.config.hidden_size % small.config.num_attention_heads == 0
    ids = data[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            small(input_ids=ids).logits, result.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )


def test_distillation_steps_score_after_a_short_recovery(searched):
    model, data, _, config, result = searched
    options = ShapeSearchConfig(**OPTIONS, distill_steps=3, distill_learning_rate=1e-3)
    distilled = search_shape(model, config, data, [ShapeMix()], options)
    refit_only = next(c for c in result.candidates if c.mix == ShapeMix())
    assert distilled.best.kept_params == refit_only.kept_params
    assert distilled.best.loss != refit_only.loss


def test_a_number_target_searches_the_default_levels():
    model = tiny_llama(num_hidden_layers=4).eval()
    data = _batches(model.config.vocab_size)
    result = search_shape(model, 0.3, data, [ShapeMix(0.125)], ShapeSearchConfig(score="activation"))
    (only,) = result.candidates
    assert only.kept_units["hidden"] == (28, 32) and not only.layers_removed
    assert abs(only.kept_params - result.budget) <= only.step / 2 + 1e-9


@pytest.fixture
def no_scoring(monkeypatch):
    """Errors must come before any work: scoring the model fails the test."""

    def fail(*args, **kwargs):
        raise AssertionError("the model was scored before the bad input was refused")

    monkeypatch.setattr(shape_search, "compute_scores", fail)


@pytest.mark.parametrize(
    ("config", "candidates", "match"),
    [
        (FlopConfig(levels=LEVELS, target_sparsity=0.97), None, "cannot be reached by any candidate"),
        (FlopConfig(levels=LEVELS, target_sparsity=0.4), [], "candidates is empty"),
        (FlopConfig(levels=LEVELS, target_sparsity=0.4), [ShapeMix(0.25, 1)], "alone removes more than the target"),
        (FlopConfig(levels=LEVELS, target_sparsity=0.4), [ShapeMix(0.0, 4)], "at least one must stay"),
        (FlopConfig(levels=["head", "row"], target_sparsity=0.4), [ShapeMix(0.25)], "lack 'hidden'"),
        (FlopConfig(levels=["head", "row"], target_sparsity=0.4), [ShapeMix(0.0, 1)], "lack 'layer'"),
        (FlopConfig(levels=["hidden", "layer"], target_sparsity=0.4), None, "add 'head' and/or 'row'"),
    ],
)
def test_bad_inputs_are_refused_before_any_work(no_scoring, config, candidates, match):
    model = tiny_llama(num_hidden_layers=4).eval()
    with pytest.raises(ValueError, match=match):
        search_shape(model, config, _batches(model.config.vocab_size), candidates, ShapeSearchConfig(**OPTIONS))


def test_unsupported_level_and_bad_data_are_refused(no_scoring):
    bert = tiny_bert()
    with pytest.raises(ValueError, match="level 'hidden' is not supported"):
        search_shape(bert, FlopConfig(levels=["head", "row", "hidden"], target_sparsity=0.3), _batches(100))
    model = tiny_llama(num_hidden_layers=4).eval()
    unlabelled = [{"input_ids": b["input_ids"]} for b in _batches(model.config.vocab_size)]
    with pytest.raises(ValueError, match="labels"):
        search_shape(model, 0.3, unlabelled)
    with pytest.raises(ValueError, match="at least 2 calibration batches"):
        search_shape(model, 0.3, _batches(model.config.vocab_size, n=2))
    with pytest.raises(ValueError, match=r"target_sparsity=1\.5"):
        search_shape(model, 1.5, _batches(model.config.vocab_size))
    with pytest.raises(TypeError, match="ShapeSearchConfig"):
        search_shape(model, 0.3, _batches(model.config.vocab_size), options={"seed": 1})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden_fractions": (1.5,)}, "hidden_fractions"),
        ({"layer_fractions": ()}, "layer_fractions is empty"),
        ({"heldout": 0.0}, "heldout"),
        ({"ranking": "nope"}, "ranking"),
        ({"distill_steps": -1}, "distill_steps"),
        ({"max_batches": 2}, "max_batches"),
    ],
)
def test_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapeSearchConfig(**kwargs)
    with pytest.raises(ValueError, match="hidden_fraction"):
        ShapeMix(hidden_fraction=1.0)
