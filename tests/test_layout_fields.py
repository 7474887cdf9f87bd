"""The architecture table's layout fields: fused producers, norms over a projection, per-layer config views.

The per-architecture checks (``test_structures``, ``test_compact``, ``test_uniform``) run every family;
these tests pin down what each field does on the family that needs it (tiny configs).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from tiny_models import tiny_inputs, tiny_olmo2, tiny_phi3, tiny_qwen2

from hf_flop import FlopConfig, compact, get_flop_model
from hf_flop.architectures import arch_spec
from hf_flop.compact import write_back
from hf_flop.modeling.modeling_flop import ConfigView
from hf_flop.projection_norms import KeptHeadsStatistic

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _hidden(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**(inputs or tiny_inputs()), output_hidden_states=True).hidden_states[-1]


def _olmo2_with_a_closed_head():
    model = get_flop_model(tiny_olmo2().eval(), FlopConfig(levels=["head", "row"])).eval()
    model.base_model.flop_structure_gates["head_0"].close(torch.tensor([0]))  # layer 0: one of two KV groups
    return model


# --- norms over the whole projection (OLMo-2) -------------------------------------------------------------


def test_the_projection_norm_statistic_covers_the_kept_heads_only():
    """Gated and compacted agree; had the closed head stayed in q_norm's mean of squares, they would not."""
    model = _olmo2_with_a_closed_head()
    small = compact(model)
    attention = small.model.layers[0].self_attn
    assert attention.q_norm.weight.shape == (16,) and attention.k_norm.weight.shape == (8,)  # 2 of 4 heads, 1 of 2
    gated = _hidden(model)
    torch.testing.assert_close(_hidden(small), gated, atol=1e-5, rtol=0)

    full_width = copy.deepcopy(model)  # the norms averaging over every head again
    for module in full_width.modules():
        for key in [k for k, hook in module._forward_hooks.items() if isinstance(hook, KeptHeadsStatistic)]:
            del module._forward_hooks[key]
    assert (_hidden(full_width) - gated).abs().max().item() > 1e-2


def test_the_statistic_hook_is_the_norm_over_the_kept_features():
    """Kept features: the norm over them alone; removed ones: divided by the same statistic; gradients finite."""
    norm = tiny_olmo2().model.layers[0].self_attn.q_norm  # over 4 heads of 8 features, 2 heads per KV group
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    model = _olmo2_with_a_closed_head()
    gate = model.base_model.flop_structure_gates["head_0"]
    group = next(g for g in model.base_model.structure_groups if g.key == "head_0")
    hook = KeptHeadsStatistic(gate, group, unit=16, round_to=1)
    x = torch.randn(3, 5, 32, requires_grad=True)
    keep = hook.kept_features()
    assert keep.tolist() == [False] * 16 + [True] * 16
    y = hook(norm, (x,), norm(x))
    rms = (x[..., keep].pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).sqrt()
    torch.testing.assert_close(y, norm.weight * x / rms)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and bool((x.grad[..., keep] != 0).all())


def test_merge_and_unload_refuses_closed_heads_under_projection_norms():
    with pytest.raises(ValueError, match=r"projection_norms.*hf_flop\.compact"):
        _olmo2_with_a_closed_head().merge_and_unload()
    open_model = get_flop_model(tiny_olmo2().eval(), FlopConfig(levels=["head", "row"])).eval()
    open_model.base_model.flop_structure_gates["row_0"].close(torch.arange(8))  # rows: no norm involved
    reference = _hidden(open_model)
    torch.testing.assert_close(_hidden(open_model.merge_and_unload()), reference, atol=1e-5, rtol=0)


def test_write_back_puts_the_kept_norm_features_back():
    model = _olmo2_with_a_closed_head()
    small = compact(model)
    with torch.no_grad():
        for norm in ("q_norm", "k_norm"):
            getattr(small.model.layers[0].self_attn, norm).weight.mul_(1.5)  # as if recovery had trained them
    write_back(model, small)
    norm = model.base_model.model.model.layers[0].self_attn.q_norm.weight
    assert torch.equal(norm[16:], small.model.layers[0].self_attn.q_norm.weight)
    torch.testing.assert_close(_hidden(compact(model)), _hidden(small), atol=1e-5, rtol=0)


# --- per-layer head counts read from the config (Phi-3) -----------------------------------------------------


def test_each_layer_reads_its_own_head_count_through_a_config_view():
    model = get_flop_model(tiny_phi3().eval(), FlopConfig(levels=["head", "row"])).eval()
    model.base_model.flop_structure_gates["head_1"].close(torch.tensor([1]))
    small = compact(model)
    views = [layer.self_attn.config for layer in small.model.layers]
    assert all(isinstance(view, ConfigView) for view in views)
    assert [view.num_attention_heads for view in views] == [4, 2]
    assert [layer.self_attn.num_key_value_heads for layer in small.model.layers] == [2, 1]
    assert small.config.num_attention_heads == 4  # the shared config keeps the model's own counts
    torch.testing.assert_close(_hidden(small), _hidden(model), atol=1e-5, rtol=0)

    small.set_attn_implementation("eager")  # the view follows the shared config
    assert views[1]._attn_implementation == "eager"
    twin = copy.deepcopy(small)
    assert twin.model.layers[1].self_attn.config.num_attention_heads == 2
    torch.testing.assert_close(_hidden(twin), _hidden(model), atol=1e-5, rtol=0)


# --- the fields' own checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"up_chunks": 0}, "up_chunks must be at least 1"),
        ({"projection_norms": {"self_attn.q_norm": "query"}}, r"projection_norms.*one of \['k', 'q', 'v'\]"),
        ({"attention_head_attrs": {"num_heads": "head"}}, "attention_head_attrs values"),
    ],
)
def test_a_bad_field_is_refused_with_what_it_may_be(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(arch_spec("llama"), **change)


def test_per_head_norms_need_no_field():
    """Qwen2 has none; a spec without projection_norms cuts no norm (Qwen3/Gemma 3 norms are per head)."""
    model = get_flop_model(tiny_qwen2().eval(), FlopConfig(levels=["head"])).eval()
    assert all(not group.norms for group in model.base_model.structure_groups)
