"""Issue 5: the structure table is right for every architecture it lists (tiny random configs).

For each entry of ``hf_flop.architectures.ARCHITECTURES``, and each family whose layout is recognised
instead (``tiny_models.RECOGNISED_BUILDERS``): injection with rank+head+row keeps the outputs, a few
training steps run, the head/row gates sit on the right modules and rows (checked functionally: rows
of a closed unit can be scrambled without changing the output), padding behaves with closed gates,
and an unknown architecture gets a clear error.
"""

import copy
import dataclasses
import logging
import re

import pytest
import torch
from tiny_models import (
    ALL_BUILDERS,
    ARCH_BUILDERS,
    MOE_BUILDERS,
    RECOGNISED_BUILDERS,
    VOCAB,
    tiny_granite,
    tiny_llama,
    tiny_qwen3,
)
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from hf_flop import (
    FlopConfig,
    FlopLinear,
    UnsupportedArchitectureError,
    compact,
    get_flop_model,
    prune_oneshot,
    recognition,
    sparsity_report,
)
from hf_flop.architectures import ARCHITECTURES, RECOGNISED, arch_spec
from hf_flop.architectures import layer_layouts as block_layouts
from hf_flop.layers import dense_weight
from hf_flop.preflight import check_before_training
from hf_flop.recognition import spec_for

ARCHS = sorted(ARCH_BUILDERS)  # the table's entries but the MoE ones (tests/test_experts.py)
FAMILIES = sorted(ALL_BUILDERS)  # the table's and the recognised ones
# families with grouped-query attention (every recognised one)
GQA_FAMILIES = [a for a in FAMILIES if a in RECOGNISED_BUILDERS or arch_spec(a).kv_heads_attr]


def _inputs(model, batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    # ids >= 2 so no token is a pad/bos id of any tiny config (RoBERTa derives positions from pad ids)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _labels(model, inputs):
    if hasattr(model, "lm_head"):  # causal LM: the inputs are the labels
        return inputs["input_ids"]
    return torch.tensor([0, 1] * (len(inputs["input_ids"]) // 2))


def _flop(peft_model):
    return peft_model.base_model


def test_every_architecture_has_a_tiny_builder():
    # the MoE entries have their own tests (tests/test_experts.py)
    assert set(ARCH_BUILDERS) | set(MOE_BUILDERS) == set(ARCHITECTURES)
    assert not set(RECOGNISED_BUILDERS) & set(ARCHITECTURES)
    for model_type, build in ALL_BUILDERS.items():
        assert build().config.model_type == model_type


@pytest.mark.parametrize("arch", FAMILIES)
def test_all_levels_keep_outputs_and_train(arch):
    model = ALL_BUILDERS[arch]().eval()
    inputs = _inputs(model)
    inputs["attention_mask"][0, -2:] = 0  # some padding too
    with torch.no_grad():
        reference = model(**inputs).logits
    peft_model = get_flop_model(copy.deepcopy(model), FlopConfig(levels=["rank", "head", "row"])).eval()
    with torch.no_grad():
        out = peft_model(**inputs).logits
    assert (out - reference).abs().max().item() < 1e-4

    peft_model.train()
    gates = _flop(peft_model).gate_parameters()
    before = [p.detach().clone() for p in gates]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = peft_model(**inputs, labels=_labels(model, inputs)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(b, p) for b, p in zip(before, gates))
    peft_model.eval()
    with torch.no_grad():
        assert torch.isfinite(peft_model(**inputs).logits).all()


@pytest.mark.parametrize("arch", FAMILIES)
def test_structure_groups_cover_the_right_modules(arch):
    model = ALL_BUILDERS[arch]()
    spec = spec_for(model)
    config = model.config
    heads = getattr(config, spec.heads_attr)
    kv_heads = getattr(config, spec.kv_heads_attr) if spec.kv_heads_attr else heads
    layouts = block_layouts(model, spec)
    assert len(layouts) == 2 and all(lay.heads == heads and lay.kv_heads == kv_heads for lay in layouts)
    ffn = 4 * config.hidden_size if arch == "gpt2" else 64  # the tiny GPT-2 leaves n_inner at its 4x default
    assert all(lay.intermediate == ffn for lay in layouts)

    peft_model = get_flop_model(model, FlopConfig(levels=["head", "row"]))
    flop = _flop(peft_model)
    layers = flop.flop_layers()
    groups = {g.key: g for g in flop.structure_groups}
    assert sorted(groups) == ["head_0", "head_1", "row_0", "row_1"]
    for i, layout in enumerate(layouts):
        head, row = groups[f"head_{i}"], groups[f"row_{i}"]
        # one head unit per KV group: the query/KV ratio stays valid whatever is closed
        assert head.n_units == kv_heads
        assert head.consumer == f"{layout.prefix}.{spec.o}"
        assert head.consumer_unit == (heads // kv_heads) * layout.head_dim
        extras = {f"{layout.prefix}.{m}" for m in spec.head_extra_producers} & set(dict(model.named_modules()))
        qkv = {f"{layout.prefix}.{n}" for n in (spec.q, spec.k, spec.v)}
        assert {s.module for s in head.producers} == qkv | extras  # and DeBERTa's position projections
        assert bool(extras) == (arch == "deberta-v2")
        assert row.n_units == ffn and row.consumer == f"{layout.prefix}.{spec.down}" and row.consumer_unit == 1
        # a fused producer ([gate; up]) appears once per chunk, its chunks one after the other
        assert [s.module for s in row.producers] == [
            f"{layout.prefix}.{n}" for n in spec.up for _ in range(spec.up_chunks)
        ]
        assert [s.offset for s in row.producers] == [c * ffn for _ in spec.up for c in range(spec.up_chunks)]
        for group in (head, row):
            # every producer segment lies inside its module and the units tile the consumer's input
            assert layers[group.consumer].in_features == group.n_units * group.consumer_unit
            for seg in group.producers:
                assert seg.offset + seg.unit * group.n_units <= layers[seg.module].out_features


def _scramble_rows(layer: FlopLinear, start: int, stop: int, scale: float = 3.0) -> None:
    with torch.no_grad():
        weight = dense_weight(layer.base_layer)  # a view for Conv1D too: edits reach the stored weight
        weight[start:stop] += scale * torch.randn_like(weight[start:stop])
        if layer.bias is not None:
            layer.bias[start:stop] += scale


@pytest.mark.parametrize("arch", FAMILIES)
def test_closed_units_own_exactly_their_rows(arch):
    """Scrambling a closed unit's Q/K/V (or up/gate) rows changes nothing; an open unit's rows matter.

    This checks every Segment of the table against the real forward code: compaction removes
    exactly these rows, so a wrong offset or unit width would show here first.
    """
    model = ALL_BUILDERS[arch]()
    inputs = _inputs(model)
    peft_model = get_flop_model(model, FlopConfig(levels=["head", "row"])).eval()
    flop = _flop(peft_model)
    layers = flop.flop_layers()
    for group in flop.structure_groups:
        gate = flop.flop_structure_gates[group.key]
        closed, open_ = group.n_units - 1, 0
        gate.close(torch.tensor([closed]))
        reference = _last_hidden(peft_model, inputs)
        for seg in group.producers:
            start = seg.offset + closed * seg.unit
            _scramble_rows(layers[seg.module], start, start + seg.unit)
        after = _last_hidden(peft_model, inputs)
        assert (after - reference).abs().max().item() < 1e-5, f"{group.key}: a closed unit's rows still matter"
        seg = group.producers[-1]
        start = seg.offset + open_ * seg.unit
        _scramble_rows(layers[seg.module], start, start + seg.unit)
        changed = _last_hidden(peft_model, inputs)
        assert (changed - after).abs().max().item() > 1e-2, f"{group.key}: an open unit's rows do not matter"


@pytest.mark.parametrize("arch", ARCHS)
def test_oneshot_with_refit_removes_heads_and_rows_and_compacts_exactly(arch):
    model = ARCH_BUILDERS[arch]().eval()
    data = [_inputs(model, batch=4, length=16) for _ in range(4)]  # 256 tokens: enough for the refit
    config = FlopConfig(levels=["head", "row"], target_sparsity=0.5)
    peft_model = prune_oneshot(model, config, data, "activation", reconstruct_options={"progress": False}).eval()
    kept = sparsity_report(peft_model).structures.values()  # per layer: {level: (kept, units)}
    assert any(levels["head"][0] < levels["head"][1] for levels in kept)  # heads did go
    assert any(levels["row"][0] < levels["row"][1] for levels in kept)
    small = compact(peft_model)
    inputs = _inputs(model)
    inputs["attention_mask"][0, -2:] = 0
    torch.testing.assert_close(_last_hidden(small, inputs), _last_hidden(peft_model, inputs), atol=1e-4, rtol=0)


def _last_hidden(model, inputs) -> torch.Tensor:
    # the last hidden state, not the logits: random tiny heads shrink differences to ~1e-5
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[-1]


def _close_some(peft_model) -> None:
    flop = _flop(peft_model)
    for group in flop.structure_groups:
        units = torch.tensor([0]) if group.level == "head" else torch.arange(0, group.n_units, 3)
        flop.flop_structure_gates[group.key].close(units)
    for layer in flop.flop_layers().values():
        if layer.factorized:
            layer.gate.close(torch.arange(layer.rank - 5, layer.rank))


@pytest.mark.parametrize("arch", FAMILIES)
def test_padding_gives_the_same_logits_as_each_example_alone(arch):
    model = ALL_BUILDERS[arch]()
    peft_model = get_flop_model(model, FlopConfig(levels=["rank", "head", "row"]))
    _close_some(peft_model)
    peft_model.eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    g = torch.Generator().manual_seed(3)
    lengths = [5, 8]
    examples = [torch.randint(2, VOCAB, (n,), generator=g) for n in lengths]
    ids = torch.full((2, max(lengths)), pad)
    mask = torch.zeros_like(ids)
    for i, ex in enumerate(examples):
        ids[i, : len(ex)] = ex
        mask[i, : len(ex)] = 1
    with torch.no_grad():
        batched = peft_model(input_ids=ids, attention_mask=mask).logits
        for i, ex in enumerate(examples):
            alone = peft_model(input_ids=ex[None], attention_mask=torch.ones(1, len(ex), dtype=torch.long)).logits[0]
            got = batched[i, : len(ex)] if batched.dim() == 3 else batched[i]
            assert (got - alone).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", GQA_FAMILIES)
def test_gqa_gated_generate_with_cache_matches_no_cache(arch):
    model = ALL_BUILDERS[arch]()
    peft_model = get_flop_model(model, FlopConfig(levels=["rank", "head", "row"]))
    _close_some(peft_model)
    peft_model.eval()
    prompt = _inputs(model, batch=1, length=4)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = peft_model.generate(**prompt, use_cache=True, **kwargs)
        uncached = peft_model.generate(**prompt, use_cache=False, **kwargs)
    assert cached.shape[1] == 10 and torch.equal(cached, uncached)


@pytest.mark.parametrize("arch", GQA_FAMILIES)
def test_gqa_compacted_keeps_the_query_kv_ratio_and_caches_correctly(arch):
    """Block 0 loses one of its two KV groups, block 1 keeps both: per-layer head counts differ."""
    model = ALL_BUILDERS[arch]()
    config = model.config
    ratio = config.num_attention_heads // config.num_key_value_heads
    peft_model = get_flop_model(model, FlopConfig(levels=["rank", "head", "row"]))
    flop = _flop(peft_model)
    flop.flop_structure_gates["head_0"].close(torch.tensor([1]))
    flop.flop_structure_gates["row_1"].close(torch.arange(0, 64, 2))
    peft_model.eval()
    small = compact(peft_model)
    spec = spec_for(model)
    kv_per_block = []
    for layout in block_layouts(small, spec):
        attention = small.get_submodule(f"{layout.prefix}.{spec.attention}")
        q_rows = small.get_submodule(f"{layout.prefix}.{spec.o}").in_features // layout.head_dim
        kv_rows = small.get_submodule(f"{layout.prefix}.{spec.k}").out_features // layout.head_dim
        if spec.fused_qkv:  # [q; k; v] in one module
            kv_rows = (kv_rows - q_rows) // 2
        assert q_rows == ratio * kv_rows and attention.num_key_value_groups == ratio
        kv_per_block.append(kv_rows)
    assert kv_per_block == [1, 2]
    prompt = _inputs(small, batch=2, length=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = small.generate(**prompt, use_cache=True, **kwargs)
        uncached = small.generate(**prompt, use_cache=False, **kwargs)
        gated = peft_model.generate(**prompt, use_cache=True, **kwargs)
    assert cached.shape == (2, 11) and torch.equal(cached, uncached) and torch.equal(cached, gated)


def _tiny_neox() -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    return GPTNeoXForCausalLM(config)


@pytest.mark.parametrize("levels", [["head"], ["row"], ["rank", "row"]])
def test_unknown_architecture_gets_a_clear_error(levels):
    with pytest.raises(UnsupportedArchitectureError) as err:
        get_flop_model(_tiny_neox(), FlopConfig(levels=levels, target_modules=["dense_h_to_4h", "dense_4h_to_h"]))
    message = str(err.value)
    assert "gpt_neox" in message and "architectures.py" in message
    assert all(arch in message for arch in ARCHS)
    # the part recognition could not find, and the fused module it saw instead
    assert "could not recognise the attention projections" in message and "query_key_value" in message


def test_unknown_architecture_without_targets_and_rank_with_targets():
    with pytest.raises(UnsupportedArchitectureError, match="target_modules"):
        get_flop_model(_tiny_neox(), FlopConfig(levels=["rank"]))
    # rank pruning needs no table entry when the targets are named
    peft_model = get_flop_model(_tiny_neox(), FlopConfig(levels=["rank"], target_modules=["dense_h_to_4h"]))
    assert len(_flop(peft_model).flop_layers()) == 1


# --- layouts recognised from the model, and specs hf_flop does not ship, verified before use ----------------


@pytest.fixture
def fresh_recognition(monkeypatch):
    """No layout recognised or verified yet in this process (restored afterwards)."""
    for model_type in list(RECOGNISED):
        monkeypatch.delitem(RECOGNISED, model_type)
    monkeypatch.setattr(recognition, "_verified", {})


def test_a_recognised_layout_is_verified_once_and_noted(fresh_recognition, caplog):
    with caplog.at_level(logging.INFO, logger="hf_flop"):
        get_flop_model(tiny_granite(), FlopConfig(levels=["head", "row"]))
        get_flop_model(tiny_granite(), FlopConfig(levels=["row"]))  # verified already: no second note
    notes = [r.getMessage() for r in caplog.records if r.name.startswith("hf_flop")]
    assert len(notes) == 1 and "'granite'" in notes[0] and "verified for head, row on a small copy" in notes[0]
    granite = RECOGNISED["granite"]
    assert granite.q == "self_attn.q_proj" and granite.up == ("mlp.gate_proj", "mlp.up_proj")


def _unchanged(model) -> bool:
    return not hasattr(model, "peft_config") and not any(isinstance(m, FlopLinear) for m in model.modules())


@pytest.mark.parametrize(
    "wrong, level, part",
    [
        ({"up": ("mlp.up_proj",)}, "row", "the MLP rows (mlp.up_proj -> mlp.down_proj)"),  # gate_proj left uncut
        ({"head_dim_attr": None}, "head", "the attention heads"),  # head size taken as hidden / heads: 8, not 16
    ],
)
def test_a_wrong_user_spec_is_refused_before_any_work(fresh_recognition, monkeypatch, wrong, level, part):
    monkeypatch.setitem(ARCHITECTURES, "qwen3", dataclasses.replace(ARCHITECTURES["llama"], **wrong))
    model = tiny_qwen3(head_dim=16)
    with pytest.raises(UnsupportedArchitectureError, match=re.escape(f"could not verify {part}")) as err:
        get_flop_model(model, FlopConfig(levels=[level]))
    assert "levels=['rank'], target_modules=" in str(err.value)  # the rank fallback
    assert _unchanged(model)
    with pytest.raises(UnsupportedArchitectureError, match=re.escape(f"could not verify {part}")):
        check_before_training(model, FlopConfig(levels=[level]))  # the CLI's checks before training say it too


def test_a_level_that_removes_nothing_is_refused_before_any_work():
    mqa = tiny_llama(num_key_value_heads=1)
    with pytest.raises(ValueError, match=r"'head' can remove nothing.*single KV head.*levels=\['row'\]"):
        get_flop_model(mqa, FlopConfig(levels=["head", "row"]))
    assert _unchanged(mqa)
    assert len(_flop(get_flop_model(mqa, FlopConfig(levels=["row"]))).structure_groups) == 2
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"'head' can remove nothing: its gate in a layer needs all of"):
        get_flop_model(model, FlopConfig(levels=["head"], target_modules=["q_proj", "k_proj", "v_proj"]))
    assert _unchanged(model)
