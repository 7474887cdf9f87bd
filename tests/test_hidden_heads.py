"""Residual channels and heads pruned together under uniform shapes: a stock config at every target."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_scores import calibration
from tiny_models import tiny_inputs, tiny_llama
from transformers import LlamaConfig

from hf_flop import FlopConfig, compact, get_flop_model, prune_oneshot
from hf_flop.hidden_heads import head_channel_plan
from hf_flop.uniform import uniform_slices


def llama_config(heads: int, kv_heads: int, hidden: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8)


@pytest.mark.parametrize(
    "heads, kv_heads, hidden, multiple, head_units",
    [
        (9, 3, 576, 18, None),  # SmolLM2: 3, 6 or 9 heads, all of which divide a multiple of 18
        (4, 2, 32, 4, None),  # the tiny Llama: 2 or 4 heads
        (32, 8, 4096, 32, (1, 2, 4, 8)),  # Llama-3-8B: lcm(4, ..., 32) = 3360 is too coarse
        (8, 8, 512, 8, (1, 2, 4, 8)),  # no GQA: lcm(1, ..., 8) = 840 > 512 / 8
    ],
)
def test_the_channel_multiple_fits_every_head_count_the_removal_may_end_at(
    heads, kv_heads, hidden, multiple, head_units
):
    plan = head_channel_plan(llama_config(heads, kv_heads, hidden), ["hidden", "head", "row"])
    assert (plan.multiple, plan.head_units) == (multiple, head_units)
    group = heads // kv_heads
    for kept in plan.head_units or range(1, kv_heads + 1):
        assert plan.multiple % (group * kept) == 0
    assert head_channel_plan(llama_config(heads, kv_heads, hidden), ["hidden", "row"]).multiple == heads


def test_uniform_slices_stop_only_at_the_allowed_counts():
    units = [SimpleNamespace(level="head", n_units=8), SimpleNamespace(level="head", n_units=8)]  # what it reads
    priority = torch.arange(16, dtype=torch.float)
    free = uniform_slices(units, priority, round_to=1)
    held = uniform_slices(units, priority, round_to=1, allowed={"head": (1, 2, 4)})
    assert [len(ids) // 2 for _, ids in free] == [1] * 7  # every count from 7 down to 1
    assert [len(ids) // 2 for _, ids in held] == [4, 2, 1]  # 8 -> 4 -> 2 -> 1 heads per layer


@pytest.mark.parametrize("target", [0.3, 0.7])
def test_heads_rows_and_channels_compact_exactly_to_the_stock_class(target, tmp_path):
    model = tiny_llama(tie_word_embeddings=True, hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
    config = FlopConfig(levels=["hidden", "head", "row"], target_sparsity=target, uniform_shapes=True)
    gated = prune_oneshot(model.eval(), config, calibration("llama"), "activation").eval()
    small = compact(gated)
    heads, hidden = small.config.num_attention_heads, small.config.hidden_size
    assert type(small).__name__ == "LlamaForCausalLM" and hidden < 48
    # 6 heads in 3 groups: lcm(2, 4, 6) = 12 is over 48 / 8, so the heads end at 2 or 6 and channels go by 6
    assert heads in (2, 6) and hidden % 6 == 0 and (heads < 6) == (target > 0.5)
    inputs = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, gated(**inputs).logits, atol=1e-4, rtol=0)
    small.save_pretrained(tmp_path / "stock")
    reloaded = type(small).from_pretrained(tmp_path / "stock").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, small(**inputs).logits, atol=1e-5, rtol=0)


def test_query_heads_with_channels_under_uniform_shapes_are_refused():
    with pytest.raises(ValueError, match="query heads pruned inside their KV groups"):
        get_flop_model(tiny_llama(), FlopConfig(levels=["hidden", "query_head"], uniform_shapes=True))
