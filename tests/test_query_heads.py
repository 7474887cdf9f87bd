"""Level "query_head": query heads removed inside their KV groups (GQA/MQA), every KV head kept."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_compact import logits
from test_scores import calibration
from test_trainer import make_trainer
from tiny_models import tiny_inputs, tiny_llama, tiny_mqa_llama, tiny_olmo2, tiny_phi3
from transformers import BertConfig, BertForSequenceClassification

from hf_flop import FlopConfig, compact, compute_scores, get_flop_model, prune_oneshot, sparsity_report
from hf_flop.architectures import ARCHITECTURES, arch_spec, layer_layouts
from hf_flop.compact import write_back
from hf_flop.config import FlopConfigError
from hf_flop.layers import FlopLinear
from hf_flop.lookup import find_flop_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEAD_DIM = 8  # the tiny configs: hidden 32, 4 query heads
BUILDERS = {"mqa": tiny_mqa_llama, "gqa": tiny_llama, "olmo2": tiny_olmo2, "phi3": tiny_phi3}


def _gated(build, levels=("query_head",), **config):
    config = {"levels": list(levels), "target_sparsity": 0.3, **config}
    return get_flop_model(build().eval(), FlopConfig(**config)).eval()


def _close(model, closed: dict[int, list[int]]) -> None:
    """Close query-head slots per layer: ``{layer: [slot, ...]}``."""
    gates = find_flop_model(model).flop_structure_gates
    for layer, slots in closed.items():
        keep = torch.ones(gates[f"query_head_{layer}"].n, dtype=torch.bool)
        keep[slots] = False
        gates[f"query_head_{layer}"].set_mask(keep)


def _attention(model, layer: int):
    return find_flop_model(model).model.model.layers[layer].self_attn


# --- what a unit is --------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_a_closed_slot_zeroes_the_jth_query_head_of_every_kv_group(kv_heads):
    dense = tiny_mqa_llama(kv_heads).eval()
    model = _gated(lambda: tiny_mqa_llama(kv_heads))
    group = 4 // kv_heads
    assert find_flop_model(model).flop_structure_gates["query_head_0"].n == group
    _close(model, {0: [group - 1]})
    with torch.no_grad():  # the same as zeroing those heads' output-projection columns in the dense model
        o = dense.model.layers[0].self_attn.o_proj.weight
        for g in range(kv_heads):
            head = g * group + group - 1
            o[:, head * HEAD_DIM : (head + 1) * HEAD_DIM] = 0
    inputs = tiny_inputs()
    torch.testing.assert_close(logits(model, **inputs), logits(dense, **inputs), atol=1e-5, rtol=0)


# --- counting -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_counting_is_exactly_the_removed_query_rows_and_output_columns(kv_heads):
    model = _gated(lambda: tiny_mqa_llama(kv_heads))
    group = 4 // kv_heads
    _close(model, {0: [0], 1: list(range(group))})  # layer 1 all closed: one slot kept (folded 0)
    report = sparsity_report(model)
    kept_heads = {0: (group - 1) * kv_heads, 1: kv_heads}
    for layer, heads in kept_heads.items():
        entries = {k.rsplit(".", 1)[-1]: v for k, v in report.modules.items() if f"layers.{layer}." in k}
        assert entries["q_proj"].kept_shape == (heads * HEAD_DIM, 32)
        assert entries["o_proj"].kept_shape == (32, heads * HEAD_DIM)
        assert entries["k_proj"].kept_shape == entries["v_proj"].kept_shape == (kv_heads * HEAD_DIM, 32)
    removed = sum(4 * HEAD_DIM * 32 * 2 - heads * HEAD_DIM * 32 * 2 for heads in kept_heads.values())
    assert report.prunable_params - report.deterministic_kept_params == removed
    small = compact(model)
    linears = sum(m.weight.numel() for n, m in small.named_modules() if n.endswith("_proj"))
    assert linears == report.deterministic_kept_params


# --- compaction -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_compaction_is_exact_and_keeps_every_kv_head(arch, attn):
    build = BUILDERS[arch]
    model = get_flop_model(build().eval(), FlopConfig(levels=["query_head", "row"])).eval()
    model.config._attn_implementation = attn
    gates = find_flop_model(model).flop_structure_gates
    n = gates["query_head_0"].n
    _close(model, {0: [0], 1: [n - 1] if n > 2 else [1]})
    torch.manual_seed(1)
    gates["row_0"].set_mask(torch.rand(gates["row_0"].n) > 0.4)
    small = compact(model)
    inputs = tiny_inputs()
    gap = (logits(small, **inputs) - logits(model, **inputs)).abs().max()
    assert gap < 1e-4, gap
    spec = arch_spec(small.config.model_type)
    before = {layout.prefix: layout for layout in layer_layouts(find_flop_model(model).model, spec)}
    for layout in layer_layouts(small, spec):  # read back from the compacted modules
        assert layout.kv_heads == before[layout.prefix].kv_heads
        assert layout.heads == layout.kv_heads * (n - 1)
        assert small.get_submodule(f"{layout.prefix}.self_attn").num_key_value_groups == n - 1


def test_compacted_model_generates_like_the_gated_model():
    model = _gated(tiny_mqa_llama)
    _close(model, {0: [1, 2], 1: [0]})
    small = compact(model)
    ids = tiny_inputs(batch=1)["input_ids"]
    with torch.no_grad():
        gated = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        compacted = small.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(gated, compacted)


# --- one-shot -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("score", ["magnitude", "activation", "obs"])
def test_oneshot_reaches_the_target_and_compacts_exactly(kv_heads, score):
    config = FlopConfig(levels=["query_head", "row"], target_sparsity=0.4)
    model = prune_oneshot(tiny_mqa_llama(kv_heads).eval(), config, calibration("llama", n=4), score)
    report = sparsity_report(model)
    slot = 2 * kv_heads * HEAD_DIM * 32  # the largest unit: a query-head slot's Q rows and O columns
    assert abs(report.deterministic_sparsity - 0.4) * report.prunable_params <= slot / 2
    inputs = tiny_inputs()
    assert (logits(compact(model), **inputs) - logits(model.eval(), **inputs)).abs().max() < 1e-4


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_oneshot_on_the_attention_alone_removes_query_heads_to_the_target(kv_heads):
    config = FlopConfig(levels=["query_head"], target_modules=["q_proj", "o_proj"], target_sparsity=0.5)
    model = prune_oneshot(tiny_mqa_llama(kv_heads).eval(), config, calibration("llama", n=4), "obs")
    assert sparsity_report(model).deterministic_sparsity == 0.5  # half the slots of every layer, on average
    small = compact(model)
    assert sum(a.num_key_value_groups for a in (m.self_attn for m in small.model.layers)) == 4 // kv_heads
    inputs = tiny_inputs()
    assert (logits(small, **inputs) - logits(model.eval(), **inputs)).abs().max() < 1e-4


def test_magnitude_of_a_slot_sums_its_query_heads_in_every_kv_group():
    model = _gated(lambda: tiny_mqa_llama(2))
    scores = compute_scores(model, None, "magnitude")
    attention = _attention(model, 0)
    q = attention.q_proj.base_layer.weight.reshape(2, 2, HEAD_DIM, 32)  # (KV group, slot, head_dim, in)
    o = attention.o_proj.base_layer.weight.reshape(32, 2, 2, HEAD_DIM)
    expected = (q.pow(2).sum((0, 2, 3)) * o.pow(2).sum((0, 1, 3))).sqrt()
    torch.testing.assert_close(scores["query_head_0"], expected.detach())
    assert compute_scores(model, calibration("llama", n=2), "activation")["query_head_0"].shape == (2,)


def test_uniform_shapes_compact_to_the_stock_class():
    config = FlopConfig(levels=["query_head"], target_modules=["q_proj", "o_proj"], uniform_shapes=True)
    model = prune_oneshot(tiny_mqa_llama().eval(), config, calibration("llama", n=4), "activation")
    small = compact(model)
    assert type(small).__name__ == "LlamaForCausalLM" and not hasattr(small.config, "flop_plan")
    assert small.config.num_key_value_heads == 1 and small.config.head_dim == HEAD_DIM
    assert small.config.num_attention_heads == 2  # half of the 4 query heads, in every layer
    inputs = tiny_inputs()
    assert (logits(small, **inputs) - logits(model.eval(), **inputs)).abs().max() < 1e-4


# --- refused before any work ------------------------------------------------------------------------


def test_head_and_query_head_together_are_refused():
    with pytest.raises(FlopConfigError, match="cannot combine 'head' and 'query_head'") as err:
        FlopConfig(levels=["head", "query_head"])
    assert err.value.field == "levels"


def test_level_head_on_a_multi_query_model_points_to_query_head():
    model = tiny_mqa_llama()
    with pytest.raises(ValueError, match="one KV head .*could remove nothing.*'query_head'"):
        get_flop_model(model, FlopConfig(levels=["head", "row"]))
    assert not any(isinstance(m, FlopLinear) for m in model.modules())  # nothing was replaced


def test_level_query_head_without_grouped_queries_points_to_head():
    bert = BertForSequenceClassification(
        BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    )
    with pytest.raises(ValueError, match="one query head per KV head.*Use level 'head'"):
        get_flop_model(bert, FlopConfig(levels=["query_head"]))


def test_an_architecture_without_a_group_size_attribute_is_refused(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "llama", replace(ARCHITECTURES["llama"], attention_head_attrs={}))
    with pytest.raises(ValueError, match="attention_head_attrs value 'group_size'"):
        get_flop_model(tiny_llama(), FlopConfig(levels=["query_head"]))


# --- training and the write-back ---------------------------------------------------------------------


def test_write_back_of_the_compacted_weights_round_trips():
    model = _gated(tiny_mqa_llama)
    _close(model, {0: [1, 3], 1: [2]})
    small = compact(model)
    with torch.no_grad():
        for param in small.parameters():
            param.add_(0.01)
    write_back(model, small)
    again = compact(model)
    for name, param in small.state_dict().items():
        assert torch.equal(param, again.state_dict()[name]), name


@pytest.mark.parametrize("pruning_phase", [0.0, 0.5])  # one-shot + recovery, two phases
def test_pruning_trainer_prunes_query_heads_to_the_target_and_compacts_exactly(tmp_path, pruning_phase):
    config = FlopConfig(levels=["query_head"], target_modules=["q_proj", "o_proj"], target_sparsity=0.5)
    model = get_flop_model(tiny_mqa_llama(), config)
    make_trainer(tmp_path, model, steps=4, pruning_phase=pruning_phase).train()
    model.eval()
    assert sparsity_report(model).deterministic_sparsity == 0.5
    inputs = tiny_inputs()
    assert (logits(compact(model), **inputs) - logits(model, **inputs)).abs().max() < 1e-4


def test_merge_and_unload_folds_the_query_head_masks():
    model = _gated(lambda: tiny_mqa_llama(2))
    _close(model, {0: [1], 1: [0]})
    inputs = tiny_inputs()
    expected = logits(model, **inputs)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, FlopLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, **inputs), expected, atol=1e-5, rtol=0)
