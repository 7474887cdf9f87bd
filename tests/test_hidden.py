"""Level "hidden": one gate over the residual-stream channels, exact compaction to a narrower model."""

from __future__ import annotations

import json

import pytest
import torch
from test_compact import _load_in_fresh_process, logits
from test_scores import calibration
from tiny_models import (
    ARCH_BUILDERS,
    tiny_bert,
    tiny_gemma2,
    tiny_gemma3_text,
    tiny_inputs,
    tiny_llama,
    tiny_olmo2,
    tiny_qwen3_moe,
)

from hf_flop import FlopConfig, compact, compute_scores, get_flop_model, prune_oneshot, sparsity_report
from hf_flop.accounting import expected_sparsity
from hf_flop.hidden import HIDDEN_NAME, hidden_channels
from hf_flop.hidden_cuts import compensate_norms

N = 32  # the tiny Llama's hidden size


def gated(levels=("hidden",), tied: bool = False, **config):
    model = tiny_llama(tie_word_embeddings=tied).eval()
    return get_flop_model(model, FlopConfig(levels=list(levels), **config)).eval()


def channels(model):
    return hidden_channels(model.base_model)


def soft_mask(model, seed: int = 0, closed: float = 0.3):
    """Close about ``closed`` of the channels and give the kept ones eval values in (0.5, 1) (folded at compaction)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(N, generator=g) > closed
    gate = channels(model).gate
    gate.set_mask(keep)
    with torch.no_grad():
        gate.log_alpha[keep] = torch.rand(int(keep.sum()), generator=g) * 3 + 1
    for name, other in model.base_model.gates().items():
        if name.startswith(("head_", "row_")) or name.endswith(".rank"):
            units = torch.rand(other.n, generator=g) > 0.3
            units[0] = True
            other.set_mask(units)
    return gate.deterministic_mask().detach() != 0  # the expected-zeros rule may close one more


def test_injection_keeps_the_outputs_and_adds_one_gate_over_the_channels():
    model = tiny_llama().eval()
    inputs = tiny_inputs()
    before = logits(model, **inputs)
    flop = gated()
    torch.testing.assert_close(logits(flop, **inputs), before, atol=1e-6, rtol=0)
    assert list(flop.base_model.gates()) == [f"{HIDDEN_NAME}.channels"] and channels(flop).gate.n == N
    assert float(sparsity_report(flop).expected_sparsity) < 1e-3


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("levels", [("hidden",), ("hidden", "head", "row"), ("hidden", "rank")])
def test_compaction_is_exact_with_soft_eval_values(levels, tied):
    model = gated(levels, tied)
    keep = soft_mask(model)
    inputs = tiny_inputs()
    small = compact(model)
    assert small.config.hidden_size == int(keep.sum()) and small.config.head_dim == 8
    assert small.model.embed_tokens.weight.shape == (97, int(keep.sum()))
    assert small.model.norm.weight.shape == (int(keep.sum()),)
    torch.testing.assert_close(logits(small, **inputs), logits(model, **inputs), atol=1e-4, rtol=0)
    # the accounting counts exactly what compaction writes: here every parameter of the model
    assert sparsity_report(model).deterministic_kept_params == sum(p.numel() for p in small.parameters())
    if tied:
        assert small.lm_head.weight is small.model.embed_tokens.weight


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_the_other_llama_family_tables_compact_exactly(arch):
    model = get_flop_model(ARCH_BUILDERS[arch]().eval(), FlopConfig(levels=["hidden", "head", "row"])).eval()
    keep = torch.ones(N, dtype=torch.bool)
    keep[::3] = False
    channels(model).gate.set_mask(keep)
    small = compact(model)
    assert small.config.hidden_size == int(keep.sum())
    inputs = tiny_inputs()
    torch.testing.assert_close(logits(small, **inputs), logits(model, **inputs), atol=1e-4, rtol=0)


def test_a_channel_costs_every_parameter_it_crosses():
    model = gated(("hidden", "row"))
    full = sparsity_report(model)
    assert full.prunable_params == sum(p.numel() for n, p in tiny_llama().named_parameters())
    keep = torch.ones(N, dtype=torch.bool)
    keep[3] = False
    channels(model).gate.set_mask(keep)
    # 4 readers per layer (q 32, k 16, v 16 rows; gate and up 64 each), 2 writers (o 32, down 64 columns), the
    # embedding and the untied head (97 each), 2 norms per layer and the final norm (1 each)
    per_channel = 2 * (32 + 16 + 16 + 64 + 64 + 32 + 64 + 2) + 97 + 97 + 1
    assert full.deterministic_kept_params - sparsity_report(model).deterministic_kept_params == per_channel
    assert channels(model).unit_params == channels(model).shape[0] == per_channel
    # composition with row gates: down keeps kept_rows * kept_channels
    model.base_model.flop_structure_gates["row_0"].set_mask(torch.arange(64) < 40)
    assert sparsity_report(model).modules["model.layers.0.mlp.down_proj"].kept_params == 40 * (N - 1)


def test_training_uses_the_expected_count_and_the_gate_learns():
    model = gated(init_log_alpha=1.0).train()
    inputs = tiny_inputs()
    out = model(**inputs, labels=inputs["input_ids"])
    (out.loss + expected_sparsity(model)).backward()
    grad = channels(model).gate.log_alpha.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # one sample per forward: every write and norm of that pass saw the same values
    assert channels(model)._sample is not None


def test_norms_take_their_statistic_over_the_kept_channels():
    model = gated()
    keep = torch.ones(N, dtype=torch.bool)
    keep[:8] = False
    channels(model).gate.set_mask(keep)
    seen = {}
    norm = model.base_model.model.model.layers[1].input_layernorm
    handle = norm.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o), prepend=False)
    model(**tiny_inputs())
    handle.remove()
    x, y = seen["x"], seen["y"]
    assert (x[..., :8] == 0).all() and (y[..., :8] == 0).all()
    kept = x[..., 8:]
    expected = norm.weight[8:] * kept / (kept.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).sqrt()
    torch.testing.assert_close(y[..., 8:], expected, atol=1e-5, rtol=1e-5)


def test_activation_scores_read_the_norm_outputs_and_prune_oneshot_hits_the_target():
    model = gated(("hidden", "head", "row"), target_sparsity=0.4)
    data = calibration("llama")
    scores = compute_scores(model, data, "activation")
    key = f"{HIDDEN_NAME}.channels"
    assert scores[key].shape == (N,) and (scores[key] > 0).all()
    pruned = prune_oneshot(model, None, data, "activation")
    report = sparsity_report(pruned)
    assert abs(report.deterministic_sparsity - 0.4) < 0.02
    assert int(channels(pruned).kept_channels().sum()) < N  # channels went, not only heads and rows
    inputs = tiny_inputs()
    torch.testing.assert_close(logits(compact(pruned), **inputs), logits(pruned, **inputs), atol=1e-4, rtol=0)


def test_every_built_in_score_scores_the_channels_and_prune_oneshot_compacts_exactly():
    from hf_flop.scores import SCORES

    data = calibration("llama")
    for score in SCORES:
        model = gated(("hidden", "head", "row"), target_sparsity=0.4)
        values = compute_scores(model, data, score)[f"{HIDDEN_NAME}.channels"]
        assert values.shape == (N,) and torch.isfinite(values).all() and values.abs().sum() > 0, score
        model = prune_oneshot(model, None, data, score)
        assert abs(sparsity_report(model).deterministic_sparsity - 0.4) < 0.02, score
        inputs = tiny_inputs()
        torch.testing.assert_close(logits(compact(model), **inputs), logits(model, **inputs), atol=1e-4, rtol=0)


def test_a_channel_with_a_large_activation_scores_highest():
    model = tiny_llama().eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 50
    flop = get_flop_model(model, FlopConfig(levels=["hidden"])).eval()
    score = compute_scores(flop, calibration("llama"), "activation")[f"{HIDDEN_NAME}.channels"]
    assert int(score.argmax()) == 5


def test_the_norm_compensation_folds_the_measured_rms_ratio_and_keeps_compaction_exact():
    model = gated(target_sparsity=0.25)
    data = calibration("llama")
    inputs_of_final_norm = []
    norm = model.base_model.model.model.norm
    handle = norm.register_forward_hook(lambda m, a, o: inputs_of_final_norm.append(a[0].detach()))
    for batch in data:
        model(**batch)  # the dense model: every channel open
    handle.remove()
    prune_oneshot(model, None, data, "activation", reconstruct=False)
    keep = channels(model).kept_channels()
    assert 0 < int(keep.sum()) < N
    weight = norm.weight.detach().clone()
    factors = compensate_norms(model, data)
    x = torch.cat([t.reshape(-1, N) for t in inputs_of_final_norm])
    eps = norm.variance_epsilon
    ratio = ((x[:, keep].pow(2).mean(-1) + eps) / (x.pow(2).mean(-1) + eps)).sqrt().mean()
    assert len(factors) == 2 * 2 + 1 and factors["model.norm"] == pytest.approx(float(ratio), rel=1e-5)
    torch.testing.assert_close(norm.weight.detach(), weight * factors["model.norm"])
    inputs = tiny_inputs()
    torch.testing.assert_close(logits(compact(model), **inputs), logits(model, **inputs), atol=1e-4, rtol=0)


def test_uniform_hidden_and_rows_compact_to_the_stock_class_and_reload_without_hf_flop(tmp_path):
    model = gated(("hidden", "row"), uniform_shapes=True, target_sparsity=0.3)
    model = prune_oneshot(model, None, calibration("llama"), "activation")
    small = compact(model)
    assert type(small).__name__ == "LlamaForCausalLM"
    assert small.config.hidden_size < N and small.config.hidden_size % small.config.num_attention_heads == 0
    # whole multiples of the head count go: no closed channel is kept as padding
    assert int((channels(model).gate.deterministic_mask() != 0).sum()) == small.config.hidden_size
    folder = tmp_path / "llama_hidden"
    small.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "flop_plan" not in config and config["head_dim"] == 8 and not list(folder.glob("*.py"))
    inputs = tiny_inputs()
    torch.save((inputs, logits(model, **inputs)), tmp_path / "llama_hidden.pt")
    case = {"name": "llama_hidden", "dir": str(folder), "ref": str(tmp_path / "llama_hidden.pt")}
    (tmp_path / "cases.json").write_text(json.dumps([{**case, "auto": "AutoModelForCausalLM", "stock": True}]))
    out = _load_in_fresh_process(tmp_path, "without")
    assert out.pop("hf_flop_loaded") is False
    got = out["llama_hidden"]
    assert got["diff"] < 1e-4 and got["module"].startswith("transformers.models."), got


def test_non_uniform_hidden_counts_load_as_remote_code():
    model = gated()
    keep = torch.ones(N, dtype=torch.bool)
    keep[:5] = False  # 27 channels: no multiple of the 4 heads, which Llama's stock config requires
    channels(model).gate.set_mask(keep)
    small = compact(model)
    assert type(small).__name__ == "FlopLlamaForCausalLM" and small.config.hidden_size == 27


@pytest.mark.parametrize(
    "build, levels, match",
    [
        (tiny_bert, ["hidden"], "derives the head size"),
        (tiny_olmo2, ["hidden"], "does not name"),
        (tiny_gemma2, ["hidden"], "does not name"),  # norms on the sublayer outputs, a width-scaled embedding
        (tiny_gemma3_text, ["hidden"], "does not name"),
        (tiny_qwen3_moe, ["hidden"], "mixture-of-experts"),
        (tiny_llama, ["hidden", "block"], "cannot be combined"),
        (tiny_llama, ["hidden", "embedding"], "cannot be combined"),
    ],
)
def test_what_the_level_cannot_do_is_refused_before_any_work(build, levels, match):
    model = build()
    with pytest.raises(ValueError, match=match):
        get_flop_model(model, FlopConfig(levels=levels))
    assert not hasattr(model, HIDDEN_NAME)


def test_untargeted_readers_are_refused():
    with pytest.raises(ValueError, match="must be targeted"):
        get_flop_model(tiny_llama(), FlopConfig(levels=["hidden"], target_modules=["q_proj", "k_proj", "v_proj"]))


def test_merge_and_unload_refuses_removed_channels():
    model = gated()
    soft_mask(model)
    with pytest.raises(ValueError, match="compact"):
        model.merge_and_unload()


@pytest.mark.parametrize("pruning_phase", [1.0, 0.0])
def test_pruning_trainer_learns_or_sets_the_channels_and_compaction_stays_exact(tmp_path, pruning_phase):
    """Learned gates (one phase) and one-shot masks with recovery: channels go, the compacted model is exact."""
    from test_trainer import make_trainer
    from tiny_task import VOCAB as TASK_VOCAB
    from tiny_task import tiny_llama as task_llama

    model = get_flop_model(task_llama(0), FlopConfig(levels=["hidden", "row"], target_sparsity=0.3))
    trainer = make_trainer(tmp_path, model, steps=12, pruning_phase=pruning_phase, gate_learning_rate=2.0)
    trainer.train()
    model.eval()
    assert int(channels(model).kept_channels().sum()) < 48  # the task model's hidden size
    if pruning_phase == 0.0:  # one-shot masks at the target
        assert abs(sparsity_report(model).deterministic_sparsity - 0.3) < 0.02
    inputs = {"input_ids": torch.randint(0, TASK_VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))}
    torch.testing.assert_close(logits(compact(model), **inputs), logits(model, **inputs), atol=1e-4, rtol=0)
