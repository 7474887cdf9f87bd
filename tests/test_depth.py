"""Level "layer": depth gates (whole layers, or sublayers), their accounting, scores and one-shot pruning."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import _ENCODER, VOCAB, _gqa_kwargs, tiny_distilbert, tiny_inputs, tiny_llama
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
)

import hf_flop
from hf_flop import FlopConfig, compact, get_flop_model, prune_oneshot, sparsity_report
from hf_flop.architectures import ARCHITECTURES
from hf_flop.config import FlopConfigError
from hf_flop.oneshot import prune_to_target
from hf_flop.recognition import recognise
from hf_flop.scores import SCORE_TYPES, compute_scores

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def llama4(**overrides):
    return tiny_llama(num_hidden_layers=4, **overrides).eval()


def gpt2_4():
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def gemma3_4():
    """Gemma 3 text with four layers of alternating types and norms on the residual branches."""
    torch.manual_seed(0)
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    config = Gemma3TextConfig(
        **{**_gqa_kwargs(), "num_hidden_layers": 4},
        head_dim=8,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=types,
    )
    return Gemma3ForCausalLM(config).eval()


def bert4():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**{**_ENCODER, "num_hidden_layers": 4})).eval()


def calibration(n: int = 4, length: int = 16, seed: int = 0, labels: bool = True) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (2, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # left padding in one row: padded tokens must not count
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels:
            batch["labels"] = ids.masked_fill(mask == 0, -100)
        batches.append(batch)
    return batches


def layer_list(model):
    for attr in ("model.layers", "transformer.h", "bert.encoder.layer"):
        try:
            return model.get_submodule(attr)
        except AttributeError:
            continue
    raise AssertionError(type(model).__name__)


def without_layer(model, i: int):
    """A copy of ``model`` with layer ``i`` deleted from its ModuleList: the reference for a skipped layer."""
    ref = copy.deepcopy(model)
    del layer_list(ref)[i]
    ref.config.num_hidden_layers -= 1
    return ref


def close(model, keep: list[bool], key: str = "layer"):
    model.base_model.flop_structure_gates[key].set_mask(torch.tensor(keep))


# --- the gate: exactly the layer skipped ---------------------------------------------------------------


@pytest.mark.parametrize("build", [llama4, gpt2_4, bert4], ids=["llama", "gpt2", "bert"])
def test_a_closed_layer_gate_is_the_layer_skipped(build):
    model = build()
    x = tiny_inputs(length=9)
    cache = {} if build is bert4 else {"use_cache": False}  # the copy's attention keeps its old layer_idx
    expected = without_layer(model, 1)(**x, **cache).logits
    dense = model(**x).logits
    gated = get_flop_model(model, FlopConfig(levels=["layer"])).eval()
    torch.testing.assert_close(gated(**x).logits, dense, atol=1e-5, rtol=0)  # starts as the dense model
    close(gated, [True, False, True, True])
    torch.testing.assert_close(gated(**x).logits, expected, atol=1e-5, rtol=0)
    report = sparsity_report(gated)
    assert len(report.layers_removed) == 1 and report.layers_removed[0].endswith(".1")
    assert report.deterministic_sparsity == pytest.approx(0.25)
    assert "layers removed (1)" in str(report)


def test_a_layer_gate_blends_input_and_output_by_its_value():
    model = llama4()
    gated = get_flop_model(model, FlopConfig(levels=["layer"])).eval()
    layer = gated.base_model.model.model.layers[2]
    h = torch.randn(2, 5, 32)
    position = gated.base_model.model.model.rotary_emb(h, torch.arange(5)[None])
    with torch.no_grad():
        gated.base_model.flop_structure_gates["layer"].log_alpha[2] = 0.0  # eval value sigmoid(0) = 0.5
        z = float(gated.base_model.flop_structure_gates["layer"].deterministic_mask()[2])
        out = layer(h, position_embeddings=position)
        plain = type(layer).forward(layer, h, position_embeddings=position)
    assert 0 < z < 1
    torch.testing.assert_close(out, h + z * (plain - h), atol=1e-6, rtol=0)


# --- sublayers -------------------------------------------------------------------------------------------


def zeroed_branch(model, layer: int, part: str, spec):
    """A copy of ``model`` with one sublayer's output projection zeroed (weight and bias): its branch adds nothing."""
    ref = copy.deepcopy(model)
    name = {"attention": spec.o, "ffn": spec.down}[part]
    module = layer_list(ref)[layer].get_submodule(name)
    with torch.no_grad():
        module.weight.zero_()
        if module.bias is not None:
            module.bias.zero_()
    return ref


@pytest.mark.parametrize(
    "build, spec", [(llama4, "llama"), (gpt2_4, "gpt2"), (gemma3_4, None)], ids=["llama", "gpt2", "gemma3"]
)
def test_a_closed_sublayer_gate_is_that_sublayer_skipped(build, spec):
    model = build()
    spec = ARCHITECTURES[spec] if spec else recognise(model)
    x = tiny_inputs(length=9)
    gated = get_flop_model(copy.deepcopy(model), FlopConfig(levels=["layer"], layer_granularity="sublayer")).eval()
    assert gated.base_model.flop_structure_gates["sublayer"].n == 8
    for unit, (layer, part) in ((1, (0, "ffn")), (4, (2, "attention"))):
        keep = [True] * 8
        keep[unit] = False
        close(gated, keep, "sublayer")
        expected = zeroed_branch(model, layer, part, spec)(**x).logits
        torch.testing.assert_close(gated(**x).logits, expected, atol=1e-5, rtol=0)
    removed = sparsity_report(gated).sublayers_removed
    assert len(removed) == 1 and removed[0].endswith(".2.attention")


def test_gemma_gates_its_sublayers_after_the_branch_norms():
    """Gating the output projection of Gemma would be normalised away by the norm after it."""
    spec = recognise(gemma3_4())
    assert spec.pre_norm_residual and spec.branches == ("post_attention_layernorm", "post_feedforward_layernorm")
    assert recognise(llama4()).branches == ("self_attn.o_proj", "mlp.down_proj")
    assert ARCHITECTURES["olmo2"].branches == ("post_attention_layernorm", "post_feedforward_layernorm")
    assert [ARCHITECTURES[t].pre_norm_residual for t in ("llama", "gpt2", "phi3", "modernbert")] == [True] * 4
    assert not ARCHITECTURES["bert"].pre_norm_residual and not ARCHITECTURES["distilbert"].pre_norm_residual


@pytest.mark.parametrize("build", [bert4, tiny_distilbert])
def test_post_norm_layers_refuse_sublayers(build):
    with pytest.raises(ValueError, match="post-norm"):
        get_flop_model(build(), FlopConfig(levels=["layer"], layer_granularity="sublayer"))


def test_config_errors():
    with pytest.raises(FlopConfigError, match="layer_granularity") as err:
        FlopConfig(levels=["row"], layer_granularity="sublayer")
    assert err.value.field == "layer_granularity"
    with pytest.raises(FlopConfigError, match="one of"):
        FlopConfig(levels=["layer"], layer_granularity="block")
    with pytest.raises(FlopConfigError, match="stock"):
        FlopConfig(levels=["layer"], layer_granularity="sublayer", uniform_shapes=True)
    FlopConfig(levels=["layer", "row"], uniform_shapes=True)  # whole layers keep a stock config
    gpt2 = gpt2_4()
    gpt2.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        get_flop_model(gpt2, FlopConfig(levels=["layer"]))
    with pytest.raises(ValueError, match="can remove nothing"):
        get_flop_model(llama4(), FlopConfig(levels=["layer"], target_modules=["lm_head"]))


# --- accounting -------------------------------------------------------------------------------------------


def test_expected_size_is_the_layer_keep_probability_times_the_inner_expectation():
    from hf_flop.accounting import _count_all

    gated = get_flop_model(llama4(), FlopConfig(levels=["layer", "head", "row"]))
    flop = gated.base_model
    layer_gate = flop.flop_structure_gates["layer"]
    with torch.no_grad():
        flop.flop_structure_gates["row_1"].log_alpha.uniform_(-2, 4)
        flop.flop_structure_gates["head_2"].log_alpha.copy_(torch.tensor([0.0, 5.0]))
        layer_gate.log_alpha.fill_(50.0)  # P(z != 0) = 1: the inner expected counts alone
        inner = {name: e.kept_params.detach() for name, e in _count_all(flop, deterministic=False).items()}
        layer_gate.log_alpha.copy_(torch.tensor([3.0, -1.0, 0.5, 2.0]))
    p_layer = layer_gate.keep_probability().detach()
    expected = sum(p_layer[int(name.split(".")[2])] * count for name, count in inner.items())
    report = sparsity_report(gated, differentiable=True)
    torch.testing.assert_close(report.expected_kept_params.detach(), expected, atol=1e-2, rtol=1e-6)
    report.expected_kept_params.backward()
    assert bool((layer_gate.log_alpha.grad > 0).all())  # keeping a layer keeps its parameters
    open_grad = flop.flop_structure_gates["row_1"].log_alpha.grad.abs().sum()
    assert open_grad > 0
    # the row gate's gradient is scaled by its layer's keep probability
    flop.zero_grad()
    with torch.no_grad():
        layer_gate.log_alpha[1] = -20.0
    sparsity_report(gated, differentiable=True).expected_kept_params.backward()
    assert flop.flop_structure_gates["row_1"].log_alpha.grad.abs().sum() < 1e-6 * open_grad


def test_units_inside_a_removed_layer_count_nothing():
    gated = get_flop_model(llama4(), FlopConfig(levels=["layer", "head", "row"]))
    gates = gated.base_model.flop_structure_gates
    gates["row_1"].set_mask(torch.arange(64) < 16)
    before = sparsity_report(gated)
    layer_1 = sum(e.kept_params for n, e in before.modules.items() if n.startswith("model.layers.1."))
    assert layer_1 == 1024 + 512 + 512 + 1024 + 3 * 16 * 32
    close(gated, [True, False, True, True])
    after = sparsity_report(gated)
    assert before.deterministic_kept_params - after.deterministic_kept_params == layer_1
    gates["row_1"].set_mask(torch.ones(64, dtype=torch.bool))  # inside the removed layer: changes nothing
    assert sparsity_report(gated).deterministic_kept_params == after.deterministic_kept_params
    from hf_flop.accounting import largest_unit_params, min_reachable_kept_params

    assert min_reachable_kept_params(gated) == 0
    assert largest_unit_params(gated) == 1024 * 2 + 512 * 2 + 2048 * 3  # a whole layer


# --- scores -------------------------------------------------------------------------------------------------


def test_block_influence_is_one_minus_the_cosine_of_layer_input_and_output():
    model = llama4()
    batches = calibration(labels=False)
    reference = torch.zeros(4)
    tokens = 0
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch, output_hidden_states=True).hidden_states
            mask = batch["attention_mask"].bool()
            for i in range(3):  # the last hidden state is after the final norm
                cos = torch.nn.functional.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)
                reference[i] += (1 - cos)[mask].sum()
            tokens += int(mask.sum())
    gated = get_flop_model(model, FlopConfig(levels=["layer"])).eval()
    scores = compute_scores(gated, batches, "block_influence")
    assert set(scores) == {"layer"}
    torch.testing.assert_close(scores["layer"][:3], reference[:3] / tokens, atol=1e-5, rtol=1e-4)
    assert bool((scores["layer"] > 0).all())
    # the activation-style scores give the depth gate its Block Influence too (they have no columns to weigh)
    torch.testing.assert_close(compute_scores(gated, batches, "activation")["layer"], scores["layer"])


def test_skip_loss_is_the_loss_increase_of_the_layer_skipped():
    model = llama4()
    batches = calibration()

    def mean_loss(m):
        with torch.no_grad():
            return sum(float(m(**b, use_cache=False).loss) for b in batches) / len(batches)

    base = mean_loss(model)
    reference = torch.tensor([mean_loss(without_layer(model, i)) - base for i in range(4)])
    gated = get_flop_model(model, FlopConfig(levels=["layer", "row"])).eval()
    scores = compute_scores(gated, batches, "skip_loss")
    torch.testing.assert_close(scores["layer"], reference, atol=1e-5, rtol=1e-4)
    assert set(scores) == {"layer", "row_0", "row_1", "row_2", "row_3"}  # the rows get their sensitivity
    assert torch.equal(gated.base_model.flop_structure_gates["layer"].deterministic_mask(), torch.ones(4))
    assert SCORE_TYPES["skip_loss"].needs_labels and not SCORE_TYPES["block_influence"].needs_labels
    assert {"block_influence", "skip_loss"} <= set(hf_flop.scores.SCORES)


def test_sublayer_block_influence_follows_the_residual_stream():
    model = llama4()
    batches = calibration(labels=False)
    gated = get_flop_model(model, FlopConfig(levels=["layer"], layer_granularity="sublayer")).eval()
    sub = compute_scores(gated, batches, "block_influence")["sublayer"]
    assert sub.shape == (8,) and bool((sub > 0).all())
    # by hand: the stream before the attention (the layer input), after it, and after the FFN (the layer output)
    layer = gated.base_model.model.model.layers[1]
    seen = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, a, k: seen.update(h0=k.get("hidden_states", a[0] if a else None)), with_kwargs=True
        ),
        layer.self_attn.o_proj.register_forward_hook(lambda m, a, o: seen.update(attn=o)),
        layer.register_forward_hook(lambda m, a, o: seen.update(h2=o)),
    ]
    sums, tokens = torch.zeros(2), 0
    with torch.no_grad():
        for batch in batches:
            gated(**batch)
            mask = batch["attention_mask"].bool()
            h1 = seen["h0"] + seen["attn"]
            for j, (a, b) in enumerate(((seen["h0"], h1), (h1, seen["h2"]))):
                sums[j] += (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1))[mask].sum()
            tokens += int(mask.sum())
    for h in hooks:
        h.remove()
    torch.testing.assert_close(sub[2:4], sums / tokens, atol=1e-5, rtol=1e-4)


# --- one-shot pruning ----------------------------------------------------------------------------------------


def test_prune_to_target_removes_the_lowest_scored_layers():
    gated = get_flop_model(llama4(), FlopConfig(levels=["layer"], target_sparsity=0.5))
    result = prune_to_target(gated, {"layer": torch.tensor([0.9, 0.1, 0.5, 0.3])})
    assert result.keep["layer"].tolist() == [True, False, True, False]
    assert sparsity_report(gated).layers_removed == ["model.layers.1", "model.layers.3"]
    result = prune_to_target(gated, {"layer": torch.tensor([0.05, 0.1, 0.5, 0.3])}, protect_layers=(0,))
    assert result.keep["layer"].tolist() == [True, False, True, False]  # layer 0 is protected, the next lowest go
    with pytest.raises(ValueError, match="cannot be reached"):
        prune_to_target(gated, {"layer": torch.ones(4)}, target_sparsity=0.9)  # one layer stays (min_units_per_gate)


@pytest.mark.parametrize("score", ["block_influence", "skip_loss", "obs", "magnitude", "sensitivity"])
def test_prune_oneshot_with_layers_heads_and_rows(score):
    batches = calibration()
    gated = prune_oneshot(llama4(), FlopConfig(levels=["layer", "head", "row"], target_sparsity=0.6), batches, score)
    report = sparsity_report(gated)
    assert abs(report.deterministic_sparsity - 0.6) <= 0.02
    x = tiny_inputs()
    gated.eval()
    small = compact(gated)
    assert small.config.num_hidden_layers == 4 - len(report.layers_removed)
    torch.testing.assert_close(small(**x).logits, gated(**x).logits, atol=1e-4, rtol=0)


def test_the_refit_runs_after_the_layers_are_removed():
    """Rows of the layer after a removed one are refit to its new inputs; the removed layer's modules are not refit."""
    batches = calibration(n=6, length=32)
    gated = get_flop_model(llama4(), FlopConfig(levels=["layer", "row"], target_sparsity=0.3))
    gated.base_model.flop_structure_gates["layer"].set_mask(torch.tensor([True, False, True, True]))
    for i in range(4):
        gated.base_model.flop_structure_gates[f"row_{i}"].set_mask(torch.arange(64) < 40)
    report = hf_flop.reconstruct(gated, batches, progress=False)
    refit = [r.name for r in report.layers]
    assert "model.layers.2.mlp.down_proj" in refit and not [n for n in refit if n.startswith("model.layers.1.")]


def test_the_config_round_trips_and_older_configs_load(tmp_path):
    config = FlopConfig(levels=["layer", "row"], layer_granularity="sublayer", target_sparsity=0.3)
    config.save_pretrained(tmp_path)
    loaded = FlopConfig.from_pretrained(tmp_path)
    assert loaded.levels == ["layer", "row"] and loaded.layer_granularity == "sublayer"
    raw = (tmp_path / "adapter_config.json").read_text().replace('"layer_granularity": "sublayer",', "")
    assert "layer_granularity" not in raw
    (tmp_path / "adapter_config.json").write_text(raw)
    assert FlopConfig.from_pretrained(tmp_path).layer_granularity == "layer"  # saved before the field existed
