"""Issue 2: injection keeps the model's function, gradients flow, bad input is refused cleanly."""

import copy

import pytest
import torch
from tiny_models import TINY_BUILDERS, tiny_inputs, tiny_llama
from transformers import BertConfig, BertModel

import hf_flop
from hf_flop import FlopConfig, FlopLinear, get_flop_model, prune_oneshot, sparsity_report
from hf_flop.architectures import arch_spec

LEVEL_SETS = [["rank"], ["rank", "head", "row"], ["head", "row"]]


@pytest.mark.parametrize("levels", LEVEL_SETS, ids="+".join)
@pytest.mark.parametrize("arch", sorted(TINY_BUILDERS))
def test_injection_preserves_outputs(arch, levels):
    model = TINY_BUILDERS[arch]().eval()
    inputs = tiny_inputs()
    with torch.no_grad():
        reference = model(**inputs).logits
    peft_model = get_flop_model(copy.deepcopy(model), FlopConfig(levels=levels, target_sparsity=0.5)).eval()
    with torch.no_grad():
        out = peft_model(**inputs).logits
    assert (out - reference).abs().max().item() < 1e-4
    report = sparsity_report(peft_model)
    assert abs(report.expected_sparsity) < 1e-3
    assert report.deterministic_sparsity == 0.0
    # exactly the architecture's attention and MLP projections were replaced, nothing else
    spec = arch_spec(model.config.model_type)
    replaced = {n for n, m in peft_model.named_modules() if isinstance(m, FlopLinear)}
    suffixes = set(spec.default_targets())
    assert replaced and all(any(n.endswith(s) for s in suffixes) for n in replaced)
    expected_count = sum(1 for n, _ in model.named_modules() if any(n.endswith("." + s) for s in suffixes))
    assert len(replaced) == expected_count


def test_only_listed_modules_replaced():
    model = TINY_BUILDERS["llama"]()
    peft_model = get_flop_model(model, FlopConfig(target_modules=["q_proj", "down_proj"]))
    replaced = sorted(n.split(".")[-1] for n, m in peft_model.named_modules() if isinstance(m, FlopLinear))
    assert replaced == ["down_proj", "down_proj", "q_proj", "q_proj"]


def test_regex_and_exclude_modules():
    model = TINY_BUILDERS["bert"]()
    config = FlopConfig(
        target_modules=r".*layer\.\d+\.(attention|output)\..*dense", exclude_modules=["attention.output.dense"]
    )
    peft_model = get_flop_model(model, config)
    replaced = [n for n, m in peft_model.named_modules() if isinstance(m, FlopLinear)]
    assert replaced and all(n.endswith("layer.0.output.dense") or n.endswith("layer.1.output.dense") for n in replaced)


def test_gpt2_conv1d_factorization_is_exact():
    model = TINY_BUILDERS["gpt2"]()
    conv = model.transformer.h[0].attn.c_attn
    layer = FlopLinear(conv, "default", factorized=True, gate_factory=hf_flop.HardConcreteGate, live_threshold=0.8)
    layer.eval()
    x = torch.randn(3, 32)
    assert torch.allclose(layer(x), conv(x), atol=1e-5)
    assert torch.allclose(layer.folded_weight(), conv.weight.t(), atol=1e-5)


@pytest.mark.parametrize("arch", sorted(TINY_BUILDERS))
def test_gradients_reach_factors_and_gates(arch):
    peft_model = get_flop_model(TINY_BUILDERS[arch](), FlopConfig(levels=["rank", "head", "row"]))
    peft_model.train()
    flop = peft_model.base_model
    layer = next(iter(flop.flop_layers().values()))
    params = {"P": layer.factors()[0], "Q": layer.factors()[1], "rank_gate": layer.gate.log_alpha}
    params["head_gate"] = flop.flop_structure_gates["head_0"].log_alpha
    params["row_gate"] = flop.flop_structure_gates["row_0"].log_alpha
    before = {k: v.detach().clone() for k, v in params.items()}
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    inputs = tiny_inputs()
    for _ in range(3):
        out = peft_model(**inputs).logits
        loss = out.pow(2).mean() + hf_flop.expected_sparsity(peft_model) * -1.0
        optimizer.zero_grad()
        loss.backward()
        for name, p in params.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        optimizer.step()
    for name, p in params.items():
        assert not torch.equal(before[name], p.detach()), name


def test_live_component_path_is_exact():
    layer = FlopLinear(
        torch.nn.Linear(16, 12), "default", factorized=True, gate_factory=hf_flop.HardConcreteGate, live_threshold=0.8
    )
    layer.gate.close(torch.arange(0, 12, 2))  # half the components dead
    layer.eval()
    x = torch.randn(4, 16)
    fast = layer(x)
    layer.live_threshold = 0.0  # force the full computation
    slow = layer(x)
    assert torch.allclose(fast, slow, atol=1e-6)


def test_merge_and_unload_gives_plain_model_with_same_outputs():
    model = tiny_llama().eval()
    peft_model = get_flop_model(model, FlopConfig(levels=["rank", "head", "row"])).eval()
    flop = peft_model.base_model
    flop.flop_structure_gates["row_0"].close(torch.arange(10))
    flop.flop_structure_gates["head_1"].close(torch.tensor([0]))
    next(iter(flop.flop_layers().values())).gate.close(torch.arange(5))
    inputs = tiny_inputs()
    with torch.no_grad():
        gated = peft_model(**inputs).logits
        plain = peft_model.merge_and_unload()
        merged = plain(**inputs).logits
    assert not any(isinstance(m, FlopLinear) for m in plain.modules())
    assert (gated - merged).abs().max().item() < 1e-4


# --- bad input: a clear error, nothing mutated ------------------------------------------------------
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()]


def _assert_unchanged(model, snapshot):
    state, types = snapshot
    assert [type(m).__name__ for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_target_modules_matching_nothing_lists_candidates():
    model = tiny_llama()
    snapshot = _state(model)
    with pytest.raises(ValueError, match=r"matches no module.*q_proj"):
        get_flop_model(model, FlopConfig(target_modules=["attn.query"]))
    _assert_unchanged(model, snapshot)


def test_a_target_name_matching_nothing_is_refused_even_when_others_match():
    model = tiny_llama()
    snapshot = _state(model)
    with pytest.raises(ValueError, match=r"entries \['qq_proj', 'mlp.upp'\] match no module.*'q_proj'"):
        get_flop_model(model, FlopConfig(target_modules=["q_proj", "qq_proj", "mlp.upp", "mlp.up_proj"]))
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("training", [False, True])
def test_get_flop_model_and_prune_oneshot_return_the_model_in_the_mode_it_came_in(training):
    model = get_flop_model(tiny_llama().train(training), FlopConfig(levels=["rank", "head", "row"]))
    assert {m.training for m in model.modules()} == {training}
    data = [{"input_ids": tiny_inputs(length=16)["input_ids"]} for _ in range(4)]
    pruned = prune_oneshot(tiny_llama().train(training), FlopConfig(levels=["head", "row"]), data, "activation")
    assert {m.training for m in pruned.modules()} == {training}


def test_non_linear_target_is_refused():
    model = tiny_llama()
    snapshot = _state(model)
    with pytest.raises(TypeError, match="only nn.Linear"):
        get_flop_model(model, FlopConfig(target_modules=["q_proj", "input_layernorm"]))
    _assert_unchanged(model, snapshot)


def test_injecting_twice_is_refused():
    peft_model = get_flop_model(tiny_llama(), FlopConfig())
    snapshot = _state(peft_model)
    configs_before = dict(peft_model.peft_config)
    with pytest.raises(ValueError, match="injected twice"):
        get_flop_model(peft_model, FlopConfig())
    with pytest.raises(ValueError, match="injected twice"):
        get_flop_model(peft_model.base_model.model, FlopConfig(target_sparsity=0.9))
    _assert_unchanged(peft_model, snapshot)
    assert peft_model.peft_config == configs_before


def test_unknown_architecture_needs_explicit_targets():
    class OddConfig(BertConfig):
        model_type = "my_odd_model"

    config = OddConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = BertModel(config)
    with pytest.raises(ValueError, match=r"model_type='my_odd_model' is not one of.*target_modules"):
        get_flop_model(model, FlopConfig())
    # rank pruning with explicit targets works on any architecture
    peft_model = get_flop_model(model, FlopConfig(target_modules=["query", "value"]))
    assert sum(isinstance(m, FlopLinear) for m in peft_model.modules()) == 2


def test_check_before_training_raises_what_injection_would_and_leaves_the_model_alone():
    from tiny_models import tiny_bert

    from hf_flop.preflight import check_before_training

    model = tiny_bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    check_before_training(model, FlopConfig(levels=["rank", "head", "row"], target_sparsity=0.9))
    with pytest.raises(ValueError, match="target_sparsity=0.6 cannot be reached") as early:
        check_before_training(model, FlopConfig(levels=["row"], target_sparsity=0.6))
    with pytest.raises(ValueError, match="block_size=5 does not divide"):
        check_before_training(model, FlopConfig(levels=["block"], block_size=5))
    assert not any(isinstance(m, FlopLinear) for m in model.modules()) and not hasattr(model, "peft_config")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # the same refusal, later, from the trainer
    from hf_flop import PruningArguments, PruningTrainer

    with pytest.raises(ValueError) as late:
        PruningTrainer(
            model=get_flop_model(model, FlopConfig(levels=["row"], target_sparsity=0.6)),
            args=PruningArguments(output_dir="unused", report_to=[], use_cpu=True),
        )
    assert str(late.value) == str(early.value)
