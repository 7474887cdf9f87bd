"""Issue 7 (item 2): one-shot scores (magnitude, activation, sensitivity), prune_oneshot, warm starts."""

import copy

import pytest
import torch
from tiny_models import TINY_BUILDERS, VOCAB, tiny_bert, tiny_gpt2, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

import hf_flop
from hf_flop import FlopConfig, get_flop_model, prune_oneshot, sparsity_report
from hf_flop.gates import open_log_alpha
from hf_flop.layers import dense_weight
from hf_flop.oneshot import open_all_gates, prune_to_target, warm_start_gates
from hf_flop.scores import (
    activation_scores,
    compute_scores,
    magnitude_scores,
    sensitivity_scores,
)
from hf_flop.scores import (
    find_gated_units as find_structures,
)

LEVEL_SETS = [["rank"], ["head", "row"], ["rank", "head", "row"]]
SCORES = ["magnitude", "activation", "sensitivity"]


def calibration(arch: str, n: int = 8, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """Batches with labels: next-token labels for LMs, class ids for the BERT classifier.

    Enough tokens (7 fit batches of 32) for prune_oneshot's default reconstruction of the widest tiny layer (128).
    """
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (2, 16), generator=g)
        labels = torch.randint(0, 2, (2,), generator=g) if arch == "bert" else ids.clone()
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def injected(arch: str, levels: list[str], **config):
    return get_flop_model(TINY_BUILDERS[arch]().eval(), FlopConfig(levels=levels, **config)).eval()


def largest_unit(model) -> int:
    return max(s.unit_params for s in find_structures(model))


# --- the scores themselves ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(TINY_BUILDERS))
def test_magnitude_of_rank_components_is_the_singular_value(arch):
    model = TINY_BUILDERS[arch]()
    originals = {n: dense_weight(m).detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    peft_model = get_flop_model(model, FlopConfig(levels=["rank"]))
    scores = magnitude_scores(peft_model)
    layers = hf_flop.accounting.find_flop_model(peft_model).flop_layers()
    assert set(scores) == {f"{n}.rank" for n in layers}
    for name in layers:
        expected = torch.linalg.svdvals(originals[name].double()).float()
        torch.testing.assert_close(scores[f"{name}.rank"], expected, rtol=1e-4, atol=1e-5)


def _captured_inputs(model, module_name: str, batches) -> torch.Tensor:
    """Inputs of one module over the batches, recorded independently of hf_flop.scores."""
    seen = []
    module = dict(model.named_modules())[module_name]
    handle = module.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    return torch.cat(seen)


def test_activation_score_of_rank_components_is_weight_times_input_norm():
    data = calibration("llama")
    peft_model = injected("llama", ["rank"])
    name = "base_model.model.model.layers.1.mlp.down_proj"
    x = _captured_inputs(peft_model, name, data).double()
    weight = dense_weight(dict(peft_model.named_modules())[name].base_layer).double()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    # ||P[:, k]|| * RMS(Q[k, :] x) with P = U sqrt(S), Q = sqrt(S) V^T
    expected = s.sqrt() * (s.sqrt()[:, None] * (vh @ x.T)).pow(2).mean(1).sqrt()
    scores = activation_scores(peft_model, data)
    key = name.removeprefix("base_model.model.") + ".rank"
    torch.testing.assert_close(scores[key].double(), expected, rtol=1e-4, atol=1e-6)


def test_activation_score_of_ffn_rows_is_column_norm_times_input_norm():
    data = calibration("gpt2")
    peft_model = injected("gpt2", ["head", "row"])
    name = "base_model.model.transformer.h.0.mlp.c_proj"
    x = _captured_inputs(peft_model, name, data)
    weight = dense_weight(dict(peft_model.named_modules())[name].base_layer)  # (out, in)
    expected = weight.norm(dim=0) * x.pow(2).mean(0).sqrt()
    torch.testing.assert_close(activation_scores(peft_model, data)["row_0"], expected, rtol=1e-4, atol=1e-6)


def test_sensitivity_is_first_order_taylor_of_the_gate():
    """|dL/dz_j| at z = 1 matches a finite difference of scaling unit j's consumer column by (1 - eps)."""
    data = calibration("llama", n=1)
    peft_model = injected("llama", ["rank", "head", "row"]).double()
    flop = hf_flop.accounting.find_flop_model(peft_model)
    scores = sensitivity_scores(peft_model, data)
    assert all(p.grad is None for p in peft_model.parameters())  # only the probes got gradients

    def loss() -> float:  # the model's causal LM loss, in float64 (transformers computes it in float32)
        batch = data[0]
        with torch.no_grad():
            logits = peft_model(input_ids=batch["input_ids"]).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()).item()

    base, eps = loss(), 1e-2  # RMSNorm computes in float32, so a small eps drowns in rounding
    down = flop.flop_layers()["model.layers.0.mlp.down_proj"]
    p, q = (t.data for t in down.factors())
    # FFN row j scales down's input feature j (column j of Q); rank component k scales column k of P
    for key, weights in [("row_0", q), ("model.layers.0.mlp.down_proj.rank", p)]:
        for unit in (0, 5):
            saved = weights[:, unit].clone()
            weights[:, unit] *= 1 - eps
            finite = (base - loss()) / eps
            weights[:, unit] = saved
            assert abs(scores[key][unit].item() - abs(finite)) <= 2e-2 * abs(finite) + 1e-7


def test_sensitivity_ema_and_mean_combine_per_batch_scores():
    data = calibration("gpt2", n=2)
    peft_model = injected("gpt2", ["rank", "head", "row"])
    first = sensitivity_scores(peft_model, data[:1])
    second = sensitivity_scores(peft_model, data[1:])
    mean = sensitivity_scores(peft_model, data)
    ema = sensitivity_scores(peft_model, data, ema_decay=0.75)
    for key in first:
        torch.testing.assert_close(mean[key], (first[key] + second[key]) / 2)
        torch.testing.assert_close(ema[key], 0.75 * first[key] + 0.25 * second[key])
    assert any(not torch.equal(first[k], second[k]) for k in first)  # the batches really differ


@pytest.mark.parametrize("score", SCORES)
def test_scores_are_deterministic_and_cover_every_gate(score):
    data = calibration("llama")
    peft_model = injected("llama", ["rank", "head", "row"])
    peft_model.train()  # scoring must not depend on (or change) the mode
    a = compute_scores(peft_model, data, score)
    b = compute_scores(peft_model, data, score)
    assert peft_model.training
    gates = hf_flop.accounting.find_flop_model(peft_model).gates()
    assert set(a) == set(gates)
    for key, gate in gates.items():
        assert a[key].shape == (gate.n,) and torch.equal(a[key], b[key])
        assert (a[key] >= 0).all() and a[key].sum() > 0


# --- one-shot pruning to the target ---------------------------------------------------------------------


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("levels", LEVEL_SETS, ids="+".join)
@pytest.mark.parametrize("arch", sorted(TINY_BUILDERS))
def test_prune_oneshot_hits_the_target(arch, levels, score):
    model = TINY_BUILDERS[arch]().eval()
    data = calibration(arch)
    target = 0.45
    pruned = prune_oneshot(model, FlopConfig(levels=levels, target_sparsity=target), data, score)
    report = sparsity_report(pruned)
    budget = (1 - target) * report.prunable_params
    # "exactly": the deterministic count is within half of the largest unit of the budget
    assert abs(report.deterministic_kept_params - budget) <= largest_unit(pruned) / 2
    assert report.deterministic_kept_params < report.prunable_params
    # the closed units are really zero in the eval masks, and the model still runs
    flop = hf_flop.accounting.find_flop_model(pruned)
    closed = sum(int((g.deterministic_mask() == 0).sum()) for g in flop.gates().values())
    assert closed > 0
    pruned.eval()
    with torch.no_grad():
        logits = pruned(input_ids=data[0]["input_ids"]).logits
    assert torch.isfinite(logits).all()
    if "head" in levels:  # no block lost all its heads or rows (min_units_per_gate=1)
        assert all(kept >= 1 for levels_ in report.structures.values() for kept, _ in levels_.values())


EXTRA_LEVELS = [
    ("bert", ["block"]),
    ("llama", ["block", "head", "row"]),
    ("gpt2", ["rank", "embedding"]),
    ("llama_tied", ["head", "row", "embedding"]),
]


def extra_config(levels: list[str], target: float) -> FlopConfig:
    return FlopConfig(levels=levels, target_sparsity=target, block_size=8, embedding_cutoffs=[10, 40])


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("arch, levels", EXTRA_LEVELS, ids=lambda v: v if isinstance(v, str) else "+".join(v))
def test_prune_oneshot_hits_the_target_with_blocks_and_embeddings(arch, levels, score):
    model = tiny_llama(tie_word_embeddings=True) if arch == "llama_tied" else TINY_BUILDERS[arch]()
    data = calibration(arch.removesuffix("_tied"))
    target = 0.4
    pruned = prune_oneshot(model.eval(), extra_config(levels, target), data, score)
    report = sparsity_report(pruned)
    assert abs(report.deterministic_kept_params - (1 - target) * report.prunable_params) <= largest_unit(pruned) / 2
    gates = hf_flop.accounting.find_flop_model(pruned).gates()
    for level in ("block", "embedding") if score != "sensitivity" else ():
        if level in levels:  # the new structures take part (per-gate ranking cuts every kind of gate)
            assert any((g.deterministic_mask() == 0).any() for k, g in gates.items() if f".{level}" in k)
    with torch.no_grad():
        assert torch.isfinite(pruned.eval()(input_ids=data[0]["input_ids"]).logits).all()


def test_magnitude_of_blocks_and_embedding_clusters():
    model = tiny_llama(tie_word_embeddings=True)
    embedding = model.get_input_embeddings().weight.detach().clone()
    down = model.model.layers[0].mlp.down_proj.weight.detach().clone()  # (32, 64)
    peft_model = get_flop_model(model, extra_config(["block", "embedding"], 0.5))
    scores = magnitude_scores(peft_model)
    blocks = scores["model.layers.0.mlp.down_proj.block"]  # unit i * cols + j is rows 8i.., columns 8j..
    torch.testing.assert_close(blocks, down.reshape(4, 8, 8, 8).pow(2).sum((1, 3)).sqrt().flatten())
    for c, (start, end) in enumerate([(0, 10), (10, 40), (40, VOCAB)]):
        expected = torch.linalg.svdvals(embedding[start:end].double()).float()
        torch.testing.assert_close(scores[f"model.embed_tokens.embedding_{c}"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ranking", ["per_gate", "per_parameter"])
def test_result_reports_the_boundary_and_lands_on_the_closer_side(ranking):
    peft_model = injected("bert", ["rank", "head", "row"], target_sparsity=0.6)
    open_all_gates(peft_model)
    result = prune_to_target(peft_model, magnitude_scores(peft_model), ranking=ranking, refinements=0)
    assert result.kept_params == sparsity_report(peft_model).deterministic_kept_params
    assert abs(result.kept_params - result.budget) <= result.step / 2
    assert 0 < result.step <= largest_unit(peft_model)
    # without refinement the order is pure: every closed unit ranks no higher than any
    # kept unit that was a candidate (each gate's best unit is protected by min_units_per_gate=1). Gates
    # with nothing closed are left out: rank gates of layers that stay dense are re-opened on purpose.
    fresh = injected("bert", ["rank", "head", "row"], target_sparsity=0.6)
    dense_scores = magnitude_scores(fresh)
    params = {s.key: s.unit_params for s in find_structures(fresh)}
    closed, candidates = [], []
    for key, keep in result.keep.items():
        if keep.all():
            continue
        scale = params[key] if ranking == "per_parameter" else dense_scores[key].mean()
        priority = dense_scores[key] / scale
        closed.append(priority[~keep])
        candidates.append(priority[keep & (torch.arange(len(keep)) != priority.argmax())])
    closed, candidates = torch.cat(closed), torch.cat(candidates)
    assert closed.numel() > 0 and candidates.numel() > 0
    assert closed.max() <= candidates.min()


def test_rank_components_of_layers_that_stay_dense_are_reopened():
    peft_model = injected("llama", ["rank"], target_sparsity=0.3)
    # ranked per parameter, the singular values leave some layers above break-even and cut others below
    result = prune_to_target(peft_model, magnitude_scores(peft_model), ranking="per_parameter")
    report = sparsity_report(peft_model)
    dense = [n for n, m in report.modules.items() if not m.factorized_after_compaction]
    factored = [n for n, m in report.modules.items() if m.factorized_after_compaction]
    assert dense and factored  # at 30% some layers are factorized, the others keep every component
    assert all(result.keep[f"{n}.rank"].all() for n in dense)
    assert all(not result.keep[f"{n}.rank"].all() for n in factored)


def test_prune_oneshot_on_an_injected_model_with_topk_gates_and_a_dataloader():
    model = tiny_llama()
    peft_model = get_flop_model(model, FlopConfig(levels=["rank", "head", "row"], gate="topk", target_sparsity=0.3))
    loader = torch.utils.data.DataLoader(
        [{"input_ids": b["input_ids"][i], "labels": b["labels"][i]} for b in calibration("llama") for i in range(2)],
        batch_size=2,
    )
    pruned = prune_oneshot(peft_model, None, loader, "sensitivity", target_sparsity=0.5)
    assert pruned is peft_model
    report = sparsity_report(pruned)
    assert abs(report.deterministic_kept_params - 0.5 * report.prunable_params) <= largest_unit(pruned) / 2


def test_one_shot_is_reproducible():
    data = calibration("gpt2")
    masks = []
    for _ in range(2):
        pruned = prune_oneshot(
            tiny_gpt2(), FlopConfig(levels=["rank", "head", "row"], target_sparsity=0.5), data, "activation"
        )
        gates = hf_flop.accounting.find_flop_model(pruned).gates()
        masks.append({k: g.deterministic_mask() for k, g in gates.items()})
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_target_zero_keeps_the_dense_model():
    model = tiny_bert().eval()
    data = calibration("bert")
    with torch.no_grad():
        reference = model(input_ids=data[0]["input_ids"]).logits
    pruned = prune_oneshot(
        model, FlopConfig(levels=["rank", "head", "row"], target_sparsity=0.0), data, "magnitude"
    ).eval()
    assert sparsity_report(pruned).deterministic_sparsity == 0.0
    with torch.no_grad():
        assert (pruned(input_ids=data[0]["input_ids"]).logits - reference).abs().max() < 1e-4


# --- warm start ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["hard_concrete", "topk"])
def test_warm_start_orders_the_gates_by_score_and_keeps_the_dense_start(gate):
    model = tiny_llama().eval()
    data = calibration("llama")
    with torch.no_grad():
        reference = model(input_ids=data[0]["input_ids"]).logits
    peft_model = get_flop_model(model, FlopConfig(levels=["rank", "head", "row"], gate=gate)).eval()
    scores = compute_scores(peft_model, data, "activation")
    warm_start_gates(peft_model, scores)
    gates = hf_flop.accounting.find_flop_model(peft_model).gates()
    values = torch.cat([(g.log_alpha if gate == "hard_concrete" else g.scores).detach() for g in gates.values()])
    priority = torch.cat([scores[k] / scores[k].mean() for k in gates])  # ranking="per_gate"
    order = torch.argsort(priority, stable=True)
    assert (values[order].diff() >= 0).all() and values.max() > values.min()
    if gate == "hard_concrete":
        top = max(open_log_alpha(g.n) for g in gates.values())  # the default high (init_log_alpha=None)
        assert values.min() == pytest.approx(3.0) and values.max() == pytest.approx(top)
        with torch.no_grad():  # every eval mask is still 1: training starts from the dense model
            assert (peft_model(input_ids=data[0]["input_ids"]).logits - reference).abs().max() < 1e-4
    with pytest.raises(ValueError, match="low <= high"):
        warm_start_gates(peft_model, scores, low=6.0, high=5.0)


def test_warm_start_lifts_large_gates_to_a_dense_start():
    """A gate with thousands of units would zero some in eval mode (round of the expected zeros)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=3000
    )
    model = LlamaForCausalLM(config).eval()
    ids = calibration("llama")[0]["input_ids"]
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    peft_model = get_flop_model(model, FlopConfig(levels=["row"])).eval()
    gate = hf_flop.accounting.find_flop_model(peft_model).gates()["row_0"]
    scores = magnitude_scores(peft_model)
    warm_start_gates(peft_model, scores, dense_start=False)
    assert (gate.deterministic_mask() == 0).any()  # the problem is real at this size
    warm_start_gates(peft_model, scores)
    assert (gate.deterministic_mask() == 1).all()
    assert torch.equal(torch.argsort(gate.log_alpha.detach(), stable=True), torch.argsort(scores["row_0"], stable=True))
    with torch.no_grad():
        assert (peft_model(input_ids=ids).logits - reference).abs().max() < 1e-4


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, score, error, match",
    [
        (["some text", "more text"], "activation", TypeError, "tokenize first"),
        ("one string", "activation", TypeError, "single str"),
        ({"input_ids": torch.ones(1, 4, dtype=torch.long)}, "activation", TypeError, "single dict"),
        ([{"attention_mask": torch.ones(1, 4)}], "activation", ValueError, "no 'input_ids'"),
        ([{"input_ids": [[1, 2, 3]]}], "activation", TypeError, "not a tensor"),
        ([{"input_ids": torch.ones(4, dtype=torch.long)}], "activation", ValueError, "2-D integer"),
        ([torch.ones(1, 4, dtype=torch.long)], "activation", TypeError, "dict of tensors"),
        ([{"input_ids": torch.ones(1, 4, dtype=torch.long)}], "sensitivity", ValueError, "no 'labels'"),
        ([], "activation", ValueError, "no batches"),
        (5, "sensitivity", TypeError, "not iterable"),
        (None, "activation", ValueError, "needs calibration_data"),
    ],
)
def test_bad_calibration_data_is_refused(data, score, error, match):
    peft_model = injected("llama", ["rank", "row"])
    with pytest.raises(error, match=match):
        compute_scores(peft_model, data, score)


def test_bad_arguments_are_refused():
    data = calibration("llama")
    with pytest.raises(ValueError, match="score='wanda'"):
        prune_oneshot(tiny_llama(), FlopConfig(), data, "wanda")
    with pytest.raises(ValueError, match="needs calibration_data"):
        prune_oneshot(tiny_llama(), FlopConfig(), None, "sensitivity")
    with pytest.raises(ValueError, match="no FLOP layers yet"):
        prune_oneshot(tiny_llama(), None, data)
    with pytest.raises(TypeError, match="FlopConfig or None"):
        prune_oneshot(tiny_llama(), {"levels": ["rank"]}, data)
    peft_model = injected("llama", ["rank"])
    with pytest.raises(ValueError, match="already has FLOP layers"):
        prune_oneshot(peft_model, FlopConfig(), data)
    with pytest.raises(ValueError, match="cannot be reached"):  # heads alone leave the FFN untouched
        prune_oneshot(tiny_llama(), FlopConfig(levels=["head"], target_sparsity=0.9), data, score="magnitude")
    with pytest.raises(ValueError, match="ema_decay"):
        compute_scores(peft_model, data, "sensitivity", ema_decay=1.5)
    with pytest.raises(ValueError, match="shape"):
        prune_to_target(peft_model, {k: v[:-1] for k, v in magnitude_scores(peft_model).items()})
    with pytest.raises(ValueError, match="lack the gates"):
        prune_to_target(peft_model, {})


def test_copy_of_a_pruned_model_keeps_its_masks():
    config = FlopConfig(levels=["rank", "head", "row"], target_sparsity=0.5)
    pruned = prune_oneshot(tiny_gpt2(), config, score="magnitude")
    clone = copy.deepcopy(pruned)
    assert sparsity_report(clone).deterministic_kept_params == sparsity_report(pruned).deterministic_kept_params


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_one_shot_model_compacts_to_the_counted_size(arch):
    model = TINY_BUILDERS[arch]().eval()
    dense_params = sum(p.numel() for p in model.parameters())
    data = calibration(arch)
    pruned = prune_oneshot(model, FlopConfig(levels=["rank", "head", "row"], target_sparsity=0.5), data, "activation")
    report = sparsity_report(pruned)
    with torch.no_grad():
        gated = pruned.eval()(input_ids=data[0]["input_ids"]).logits
    small = hf_flop.compact(pruned).eval()
    with torch.no_grad():
        assert (small(input_ids=data[0]["input_ids"]).logits - gated).abs().max() < 1e-4
    removed = dense_params - sum(p.numel() for p in small.parameters())
    # every counted weight is gone (biases of removed heads/rows, not counted as prunable, may go too)
    assert removed >= report.prunable_params - report.deterministic_kept_params > 0
