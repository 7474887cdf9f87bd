"""Issue 14, item 2: FlopConfig(uniform_shapes=True) -- the same heads and FFN width in every layer, stock classes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from test_compact import _load_in_fresh_process, logits
from test_scores import calibration
from test_trainer import flop_llama, make_trainer
from tiny_models import ALL_BUILDERS, RECOGNISED_BUILDERS, TINY_BUILDERS, tiny_inputs, tiny_mqa_llama
from tiny_task import CountingTask

from hf_flop import FlopConfig, compact, compute_scores, get_flop_model, prune_oneshot, prune_to_target, sparsity_report
from hf_flop.accounting import check_target, largest_unit_params
from hf_flop.oneshot import fix_masks_at_target
from hf_flop.preflight import check_before_training
from hf_flop.uniform import uniform_counts, uniform_slices

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as in test_trainer, whose runs these reuse

# what a stock config can hold: heads only where it states the head size (Llama family)
LEVELS = {"llama": ["head", "row"], "mistral": ["head", "row"], "qwen2": ["head", "row"], "gpt2": ["row"]}
LEVELS |= {"bert": ["row"], "roberta": ["row"], "distilbert": ["row"]}
LEVELS |= {"olmo2": ["head", "row"], "phi3": ["head", "row"], "modernbert": ["row"]}  # ModernBERT derives head_dim
LEVELS |= {"deberta-v2": ["row"]}  # derives head_dim
LEVELS |= {arch: ["head", "row"] for arch in ["qwen3", "gemma2", "gemma3_text", *RECOGNISED_BUILDERS]}  # a stock config takes head_dim (stated or not)
ENCODERS = ("bert", "roberta", "distilbert", "modernbert", "deberta-v2")  # classifiers: their calibration labels are class ids
# rows alone reach at most about half of a tiny model's linears (its FFN is half of them)
TARGETS = {"bert": 0.3, "roberta": 0.3, "distilbert": 0.3, "gpt2": 0.4, "modernbert": 0.3, "deberta-v2": 0.3}
# the families whose saved uniform model is read back by plain transformers (one fresh process for all)
STOCK_RELOAD = [*sorted(TINY_BUILDERS), "modernbert", "olmo2", "phi3", "gemma2", "gemma3_text", "qwen3"]


def _uniform(arch: str, target: float | None = None, **config):
    config = {"levels": LEVELS[arch], "target_sparsity": target or TARGETS.get(arch, 0.5), **config}
    return get_flop_model(ALL_BUILDERS[arch]().eval(), FlopConfig(uniform_shapes=True, **config)).eval()


def _stock_reload_cases():
    """(name, gated model, calibration) of every family in STOCK_RELOAD, and a multi-query Llama losing query heads."""
    for arch in [*STOCK_RELOAD, *sorted(RECOGNISED_BUILDERS)]:
        yield arch, _uniform(arch), _calibration(arch)
    config = FlopConfig(levels=["query_head"], target_modules=["q_proj", "o_proj"], uniform_shapes=True)
    yield "llama_mqa_query_heads", get_flop_model(tiny_mqa_llama().eval(), config).eval(), _calibration("llama")


def _calibration(arch: str) -> list[dict[str, torch.Tensor]]:
    return calibration("bert" if arch in ENCODERS else arch)


def _layer_shapes(model) -> set[tuple]:
    """The distinct (kept units per level) of the transformer layers: one entry when shapes are uniform."""
    return {tuple(sorted(levels.items())) for levels in sparsity_report(model).structures.values()}


# --- the selection -----------------------------------------------------------------------------------


def test_uniform_counts_step_down_by_round_to_from_the_full_count():
    assert uniform_counts(4, 1, 1) == [4, 3, 2, 1]
    assert uniform_counts(37, 8, 1) == [37, 32, 24, 16, 8]
    assert uniform_counts(64, 8, 10) == [64, 56, 48, 40, 32, 24, 16]
    assert uniform_counts(2, 1, 5) == [2]


def test_slices_take_one_unit_per_layer_in_order_of_their_mean_priority():
    units = [SimpleNamespace(level=lvl, n_units=n) for lvl, n in (("head", 2), ("row", 3), ("head", 2), ("row", 3))]
    # head units: layer 0 [0.9, 0.1], layer 1 [0.8, 0.5]; rows: layer 0 [0.3, 0.2, 0.7], layer 1 [0.0, 0.6, 0.4]
    priority = torch.tensor([0.9, 0.1, 0.3, 0.2, 0.7, 0.8, 0.5, 0.0, 0.6, 0.4])
    slices = uniform_slices(units, priority, round_to=1)
    # rows' first slice (0.2, 0.0: mean 0.1) < heads' (0.1, 0.5: mean 0.3) < rows' second (0.3, 0.4: mean 0.35)
    assert [(lvl, sorted(ids.tolist())) for lvl, ids in slices] == [
        ("row", [3, 7]),
        ("head", [1, 6]),
        ("row", [2, 9]),
    ]
    rounded = uniform_slices(units, priority, round_to=2)  # rows go 3 -> 2 (a multiple of 2), never to 0
    assert [(lvl, len(ids)) for lvl, ids in rounded] == [("row", 2), ("head", 2)]
    at_least_two = uniform_slices(units, priority, round_to=1, min_count=2)  # heads stay at 2, rows go to 2
    assert [(lvl, sorted(ids.tolist())) for lvl, ids in at_least_two] == [("row", [3, 7])]
    with pytest.raises(ValueError, match="same row count"):
        uniform_slices([*units, SimpleNamespace(level="row", n_units=4)], torch.zeros(14), round_to=1)


@pytest.mark.parametrize("arch", sorted(LEVELS))
def test_oneshot_gives_the_same_shapes_in_every_layer_at_the_target(arch):
    model = prune_oneshot(_uniform(arch), None, _calibration(arch), "activation", reconstruct=False)
    report = sparsity_report(model)
    assert len(_layer_shapes(model)) == 1
    target = TARGETS.get(arch, 0.5)
    # within half a uniform slice of the target: the budget's granularity under uniform shapes
    assert abs(report.deterministic_sparsity - target) <= largest_unit_params(model) / report.prunable_params / 2
    assert check_target(model).met
    small = compact(model)
    assert type(small) is type(ALL_BUILDERS[arch]())  # the stock class, not FlopX
    assert "flop_plan" not in small.config.to_dict() and type(small.config).__module__.startswith("transformers.")
    torch.testing.assert_close(logits(small), logits(model), atol=1e-4, rtol=0)


@pytest.mark.parametrize("target", [0.2, 0.35, 0.5, 0.65, 0.72])  # 0.75: one KV group and 8 rows left
@pytest.mark.parametrize("ranking", ["per_gate", "per_parameter"])
def test_every_layer_keeps_its_top_scored_units_within_half_a_slice(target, ranking):
    model = _uniform("llama", target, round_to=8)
    scores = compute_scores(model, calibration("llama"), "activation")
    result = prune_to_target(model, scores, ranking=ranking)
    assert abs(result.kept_params - result.budget) <= result.step / 2
    assert result.step <= largest_unit_params(model)
    gates = model.base_model.gates()
    counts = {}
    for key, gate in gates.items():
        kept = gate.deterministic_mask() != 0
        counts.setdefault(key.split("_")[0], set()).add(int(kept.sum()))
        top = torch.argsort(scores[key], descending=True, stable=True)[: int(kept.sum())]
        assert kept[top].all(), key
    assert all(len(c) == 1 for c in counts.values()), counts
    (rows,) = counts["row"]
    assert rows % 8 == 0 or rows == 64  # FFN widths rounded to round_to
    small = compact(model)
    kv = small.config.num_key_value_heads
    assert (small.config.num_attention_heads, small.config.intermediate_size) == (2 * kv, rows)


def test_fixing_trained_masks_makes_them_uniform_keeping_the_firmest_units():
    model = flop_llama(0.5, levels=("head", "row"), uniform_shapes=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for gate in model.base_model.gates().values():
            gate.log_alpha.copy_(torch.randn(gate.n, generator=g) * 3)
    strength = {k: g.log_alpha.detach().clone() for k, g in model.base_model.gates().items()}
    with pytest.raises(ValueError, match=r"different counts per layer.*fix_masks_at_target\(model\)"):
        compact(model)
    result = fix_masks_at_target(model)
    assert abs(result.kept_params - result.budget) <= result.step / 2
    assert len(_layer_shapes(model)) == 1
    for key, gate in model.base_model.gates().items():
        kept = gate.deterministic_mask() != 0
        assert kept[torch.argsort(strength[key], descending=True)[: int(kept.sum())]].all(), key
    assert type(compact(model)).__name__ == "LlamaForCausalLM"


# --- loading with plain transformers ------------------------------------------------------------------


def test_saved_uniform_models_load_with_plain_transformers(tmp_path):
    """One-shot with the refit, uniform shapes, and the stock class reads the folder, here and in a process
    without hf_flop: every config value a family adds (head_dim, layer_types, query_pre_attn_scalar,
    multipliers) must round-trip."""
    cases = []
    for arch, gated, data in _stock_reload_cases():
        model = prune_oneshot(gated, None, data, "activation")
        small = compact(model)
        if arch == "llama_mqa_query_heads":  # 2 of the 4 query heads in every layer, the one KV head kept
            assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 1)
        folder = tmp_path / arch
        small.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        assert "auto_map" not in config and "flop_plan" not in config
        assert not list(folder.glob("*.py"))  # no remote code written
        reloaded = type(small).from_pretrained(folder)  # the stock class itself reads it
        inputs = tiny_inputs()
        torch.testing.assert_close(logits(reloaded, **inputs), logits(small, **inputs), atol=1e-5, rtol=0)
        torch.save((inputs, logits(model, **inputs)), tmp_path / f"{arch}.pt")
        auto = "AutoModelForSequenceClassification" if arch in ENCODERS else "AutoModelForCausalLM"
        reference = str(tmp_path / f"{arch}.pt")
        cases.append({"name": arch, "dir": str(folder), "ref": reference, "auto": auto, "stock": True})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = _load_in_fresh_process(tmp_path, "without")  # hf_flop not importable, no trust_remote_code
    assert out.pop("hf_flop_loaded") is False
    for case in cases:
        got = out[case["name"]]
        assert got["diff"] < 1e-4 and got["module"].startswith("transformers.models."), got


# --- training ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pruning_phase", [1.0, 0.5])
def test_pruning_trainer_ends_with_uniform_shapes(tmp_path, pruning_phase):
    model = flop_llama(0.5, levels=("head", "row"), uniform_shapes=True)
    trainer = make_trainer(tmp_path, model, steps=20, pruning_phase=pruning_phase, gate_learning_rate=0.5)
    trainer.train()
    assert len(_layer_shapes(model)) == 1
    assert (trainer.uniform_fix is not None) == (pruning_phase == 1.0)  # two phases: fixed at the boundary
    report = sparsity_report(model)
    assert abs(report.deterministic_sparsity - 0.5) <= largest_unit_params(model) / report.prunable_params / 2
    assert trainer.target_check.met
    small = compact(model)
    assert type(small).__name__ == "LlamaForCausalLM" and "flop_plan" not in small.config.to_dict()
    model.eval()
    inputs = {"input_ids": CountingTask(n=2, seed=5).ids}
    torch.testing.assert_close(logits(small, **inputs), logits(model, **inputs), atol=1e-4, rtol=0)
    if pruning_phase == 1.0:
        assert "uniform shapes" in trainer.training_facts()


# --- what cannot be uniform: clear errors ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "gpt2", "distilbert", "modernbert"])
def test_heads_of_architectures_that_derive_the_head_size_are_refused(arch):
    config = FlopConfig(levels=["head", "row"], uniform_shapes=True)
    with pytest.raises(ValueError, match=r"cannot prune heads.*derives the head size.*levels=\['row'\]"):
        get_flop_model(ALL_BUILDERS[arch](), config)
    with pytest.raises(ValueError, match="cannot prune heads"):  # and before training, on a weightless copy
        check_before_training(ALL_BUILDERS[arch](), config)


def test_a_layer_left_without_gates_is_refused():
    config = FlopConfig(levels=["head", "row"], uniform_shapes=True, exclude_modules=r".*layers\.1\.mlp\.down_proj")
    with pytest.raises(ValueError, match=r"every transformer layer.*model\.layers\.1"):
        get_flop_model(TINY_BUILDERS["llama"](), config)


def test_a_model_compacted_to_per_layer_shapes_is_refused():
    model = get_flop_model(TINY_BUILDERS["llama"](), FlopConfig(levels=["row"])).eval()
    model.base_model.gates()["row_0"].close(torch.arange(16))  # layer 0 narrower than layer 1
    per_layer = compact(model)
    assert type(per_layer).__name__ == "FlopLlamaForCausalLM"
    with pytest.raises(ValueError, match="flop_plan"):
        get_flop_model(per_layer, FlopConfig(levels=["row"], uniform_shapes=True))


def test_protected_layers_are_refused():
    with pytest.raises(ValueError, match="cannot protect layers"):
        prune_oneshot(_uniform("llama"), None, calibration("llama"), "activation", protect_layers=(0,))
