"""Mixture-of-experts pruning (hf_flop.experts): whole experts and each expert's rows, for qwen3_moe and mixtral.

The tiny Qwen3-MoE has a dense layer 0 (mlp_only_layers) and MoE layers 1-2 (6 experts of width 16, top-2,
renormalised); the tiny Mixtral two MoE layers of 4 experts. Every check is against numbers: the gated model
against the dense one, against the compacted one, and against a stock model cut by hand.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from tiny_models import VOCAB, tiny_mixtral, tiny_qwen3_moe
from transformers import AutoModelForCausalLM, MixtralForCausalLM, Qwen3MoeForCausalLM

from hf_flop import FlopConfig, compact, get_flop_model, sparsity_report
from hf_flop.accounting import check_target
from hf_flop.experts import FlopExperts
from hf_flop.oneshot import prune_oneshot
from hf_flop.reconstruction import reconstruct
from hf_flop.refit import Moments, fit_columns
from hf_flop.scores import compute_scores

BUILDERS = {"qwen3_moe": tiny_qwen3_moe, "mixtral": tiny_mixtral}
ATOL = 1e-4


def _inputs(batch: int = 2, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _data(n: int = 4, length: int = 12) -> list[dict[str, torch.Tensor]]:
    return [_inputs(length=length, seed=10 + i) for i in range(n)]


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _experts(peft_model) -> dict[str, FlopExperts]:
    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, FlopExperts)}


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_injection_keeps_outputs_and_counts_the_experts(arch):
    model = BUILDERS[arch]().eval()
    inputs = _inputs()
    reference = _logits(model, inputs)
    n_experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    routers = sum(p.numel() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight"))
    linears = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    peft_model = get_flop_model(copy.deepcopy(model), FlopConfig(levels=["head", "row", "expert"])).eval()
    assert (_logits(peft_model, inputs) - reference).abs().max().item() < 1e-5
    experts = _experts(peft_model)
    assert len(experts) == (2 if arch == "qwen3_moe" else 2)
    gates = peft_model.base_model.gates()
    first = next(iter(experts))
    assert f"{first}.expert" in gates and f"{first}.row_0" in gates
    # the experts' weights and router rows are prunable parameters, next to every targeted linear
    assert sparsity_report(peft_model).prunable_params == n_experts + routers + linears


def test_training_steps_reach_the_expert_and_row_gates():
    model = tiny_qwen3_moe()
    inputs = _inputs()
    peft_model = get_flop_model(model, FlopConfig(levels=["row", "expert"])).train()
    experts = next(iter(_experts(peft_model).values()))
    gates = [experts.flop_expert_gate.log_alpha, experts.flop_row_gates[0].log_alpha]
    before = [g.detach().clone() for g in gates]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = peft_model(**inputs, labels=inputs["input_ids"]).loss
        loss = loss + sparsity_report(peft_model, differentiable=True).expected_kept_params * 1e-6
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert all(not torch.equal(b, g) for b, g in zip(before, gates))


def _close(peft_model, experts=None, rows=None) -> None:
    """Close experts ``{layer name: [experts]}`` and rows ``{layer name: {expert: [rows]}}``."""
    for name, module in _experts(peft_model).items():
        if experts and name in experts:
            keep = torch.ones(module.n_experts, dtype=torch.bool)
            keep[experts[name]] = False
            module.flop_expert_gate.set_mask(keep)
        for e, closed in (rows or {}).get(name, {}).items():
            keep = torch.ones(module.width, dtype=torch.bool)
            keep[closed] = False
            module.flop_row_gates[e].set_mask(keep)


def test_removed_experts_leave_the_routing_as_a_router_without_them():
    model = tiny_qwen3_moe().eval()
    inputs = _inputs()
    peft_model = get_flop_model(copy.deepcopy(model), FlopConfig(levels=["expert"], target_sparsity=0.2)).eval()
    _close(peft_model, experts={"model.layers.1.mlp.experts": [1, 4], "model.layers.2.mlp.experts": [0, 5]})
    gated = _logits(peft_model, inputs)
    # by hand: a stock model with those experts' slices and router rows cut out
    config = copy.deepcopy(model.config)
    config.num_experts = 4
    by_hand = Qwen3MoeForCausalLM(config).eval()
    state = model.state_dict()
    for layer, kept in ((1, [0, 2, 3, 5]), (2, [1, 2, 3, 4])):
        for key in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"):
            state[f"model.layers.{layer}.{key}"] = state[f"model.layers.{layer}.{key}"][kept]
    by_hand.load_state_dict(state)
    assert (gated - _logits(by_hand, inputs)).abs().max().item() < ATOL
    assert (gated - _logits(model, inputs)).abs().max().item() > 1e-3  # closing them changed something
    compacted = compact(peft_model)
    assert type(compacted) is Qwen3MoeForCausalLM  # every MoE layer keeps 4 experts of full width: a stock config
    assert compacted.config.num_experts == 4
    assert compacted.model.layers[1].mlp.experts.num_experts == compacted.model.layers[1].mlp.gate.num_experts == 4
    assert (_logits(compacted, inputs) - gated).abs().max().item() < ATOL


def test_rows_per_expert_are_cut_inside_each_expert():
    model = tiny_mixtral().eval()
    inputs = _inputs()
    peft_model = get_flop_model(copy.deepcopy(model), FlopConfig(levels=["row"])).eval()
    rows = {"model.layers.0.mlp.experts": {0: [1, 2, 3], 2: list(range(8))}, "model.layers.1.mlp.experts": {3: [0]}}
    _close(peft_model, rows=rows)
    gated = _logits(peft_model, inputs)
    # by hand: the closed rows' down columns zeroed in a stock copy
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        for name, closed in rows.items():
            down = by_hand.get_submodule(name).down_proj
            for e, r in closed.items():
                down[e][:, r] = 0.0
    assert (gated - _logits(by_hand, inputs)).abs().max().item() < ATOL
    report = sparsity_report(peft_model)
    compacted = compact(peft_model)
    # layer 0 keeps 16 rows (expert 1 lost none): widths per layer are the widest kept expert's
    assert compacted.model.layers[0].mlp.experts.down_proj.shape == (4, 32, 16)
    assert compacted.model.layers[1].mlp.experts.down_proj.shape == (4, 32, 16)
    assert (_logits(compacted, inputs) - gated).abs().max().item() < ATOL
    # every row of every expert closed in layer 1 but one row, except expert 3 with 12: narrower experts are padded
    for e in range(4):
        closed = list(range(15)) if e != 3 else list(range(4))
        _close(peft_model, rows={"model.layers.1.mlp.experts": {e: closed}})
    gated = _logits(peft_model, inputs)
    compacted = compact(peft_model)
    assert compacted.model.layers[1].mlp.experts.down_proj.shape == (4, 32, 12)
    assert compacted.model.layers[1].mlp.experts.intermediate_dim == 12
    assert (_logits(compacted, inputs) - gated).abs().max().item() < ATOL
    kept = sum(p.numel() for n, p in compacted.named_parameters() if ".experts." in n or n.endswith("mlp.gate.weight"))
    kept += sum(
        m.weight.numel() for n, m in compacted.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    assert sparsity_report(peft_model).deterministic_kept_params == kept < report.deterministic_kept_params


def _routed(model, layer: int, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MoE block input of ``layer`` (tokens, hidden), and its top-k experts and weights, from the stock model."""
    found = {}
    block = model.model.layers[layer].mlp
    handle = block.register_forward_pre_hook(lambda m, args: found.update(x=args[0].reshape(-1, args[0].shape[-1])))
    _logits(model, inputs)
    handle.remove()
    _, weights, index = block.gate(found["x"])
    return found["x"], index, weights


def test_scores_come_from_each_experts_routed_tokens():
    model = tiny_qwen3_moe().eval()
    data = _data(2)
    peft_model = get_flop_model(copy.deepcopy(model), FlopConfig(levels=["row", "expert"])).eval()
    scores = compute_scores(peft_model, data, "activation")
    layer, experts = 2, model.model.layers[2].mlp.experts
    sq = torch.zeros(6, 16)
    routed = torch.zeros(6)
    out_sq = torch.zeros(6)
    tokens = 0
    for batch in data:
        x, index, weights = _routed(model, layer, batch)
        tokens += len(x)
        for e in range(6):
            token, pos = torch.where(index == e)
            gate, up = F.linear(x[token], experts.gate_up_proj[e]).chunk(2, dim=-1)
            h = F.silu(gate) * up * weights[token, pos, None]
            sq[e] += h.pow(2).sum(0)
            routed[e] += len(token)
            out_sq[e] += F.linear(h, experts.down_proj[e]).pow(2).sum()
    name = f"model.layers.{layer}.mlp.experts"
    for e in range(6):
        expected = (experts.down_proj[e].pow(2).sum(0) * sq[e] / routed[e]).sqrt()
        torch.testing.assert_close(scores[f"{name}.row_{e}"], expected.detach(), rtol=1e-4, atol=1e-6)
    # an expert: the root mean square of what it adds to the output, over all tokens
    torch.testing.assert_close(scores[f"{name}.expert"], (out_sq / tokens).sqrt().detach(), rtol=1e-4, atol=1e-6)
    obs = compute_scores(peft_model, data, "obs")
    assert all(torch.isfinite(obs[k]).all() and obs[k].shape == scores[k].shape for k in scores)


def test_refit_of_an_experts_down_projection_uses_its_routed_tokens():
    model = tiny_qwen3_moe().eval()
    data = _data(8, length=48)  # about 200 fit tokens reach each expert
    peft_model = get_flop_model(copy.deepcopy(model), FlopConfig(levels=["row"])).eval()
    name, e, closed = "model.layers.2.mlp.experts", 3, [0, 2, 5, 7, 11]
    _close(peft_model, rows={name: {e: closed}})
    module = _experts(peft_model)[name]
    moments = Moments(16)  # what reaches the expert's down projection, on the fit batches (the last is held out)
    handle = module.flop_taps[e].register_forward_pre_hook(lambda m, args: moments.add(args[0]))
    for batch in data[:7]:
        _logits(peft_model, batch)
    handle.remove()
    keep = torch.ones(16, dtype=torch.bool)
    keep[closed] = False
    expected = fit_columns(experts_down(model, 2, e), None, moments.matrix(), keep, fit_bias=False, ridge=1e-3)
    report = reconstruct(peft_model, data, progress=False)
    (entry,) = [r for r in report.layers if r.name == f"{name}.flop_taps.{e}"]
    assert entry.applied and entry.refit_error < entry.plain_error
    torch.testing.assert_close(module.down_weight()[e].detach().double(), expected.weight, rtol=1e-4, atol=1e-5)


def experts_down(model, layer: int, e: int) -> torch.Tensor:
    return model.model.layers[layer].mlp.experts.down_proj[e].detach()


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_oneshot_with_refit_compacts_exactly(arch):
    model = BUILDERS[arch]()
    config = FlopConfig(levels=["head", "row", "expert"], target_sparsity=0.4)
    peft_model = prune_oneshot(model, config, _data(4), reconstruct_options={"progress": False}).eval()
    report = sparsity_report(peft_model)
    assert abs(report.deterministic_sparsity - 0.4) < 0.02
    assert check_target(peft_model).met
    assert all(len(m.kept_experts()) >= m.top_k for m in _experts(peft_model).values())
    inputs = _inputs()
    compacted = compact(peft_model)
    assert (_logits(compacted, inputs) - _logits(peft_model, inputs)).abs().max().item() < ATOL


_RELOAD = r"""
import json, sys
class _HideHfFlop:  # a process without hf_flop
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hf_flop":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, _HideHfFlop())
import torch, transformers
out = {}
for folder in sys.argv[1:]:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, experts_implementation="eager"
    ).eval()
    data = torch.load(folder + "/check.pt")
    with torch.no_grad():
        logits = model(**data["inputs"]).logits
    out[folder] = {"diff": (logits - data["logits"]).abs().max().item(), "class": type(model).__name__}
out["hf_flop_imported"] = any(m.split(".")[0] == "hf_flop" for m in sys.modules)
print("RESULT" + json.dumps(out))
"""


def _save_compacted(tmp_path) -> dict[bool, str]:
    """Uniform and uneven one-shot prunings of the tiny Qwen3-MoE, compacted and saved with their check logits."""
    inputs = _inputs()
    folders = {}
    for uniform in (True, False):
        model = tiny_qwen3_moe()
        config = FlopConfig(levels=["row", "expert"], target_sparsity=0.5, uniform_shapes=uniform)
        peft_model = prune_oneshot(model, config, _data(4), score="activation", reconstruct=False).eval()
        compacted = compact(peft_model)
        assert (_logits(compacted, inputs) - _logits(peft_model, inputs)).abs().max().item() < ATOL
        if uniform:  # every expert the same width, every MoE layer the same count: the stock class and config
            assert type(compacted) is Qwen3MoeForCausalLM and not hasattr(compacted.config, "flop_plan")
            layers = compacted.model.layers[1:]
            assert compacted.config.num_experts == layers[0].mlp.experts.num_experts < 6
            assert compacted.config.moe_intermediate_size == layers[1].mlp.experts.intermediate_dim < 16
            assert {tuple(m.mlp.experts.down_proj.shape) for m in layers} == {
                (compacted.config.num_experts, 32, compacted.config.moe_intermediate_size)
            }
        folder = tmp_path / ("stock" if uniform else "planned")
        compacted.save_pretrained(folder)
        torch.save({"inputs": inputs, "logits": _logits(compacted, inputs)}, folder / "check.pt")
        folders[uniform] = str(folder)
    return folders


def test_uniform_shapes_reload_as_the_stock_class(tmp_path):
    folders = _save_compacted(tmp_path)
    for uniform, folder in folders.items():
        data = torch.load(f"{folder}/check.pt")
        loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, experts_implementation="eager")
        assert (type(loaded) is Qwen3MoeForCausalLM) == uniform
        assert (_logits(loaded.eval(), data["inputs"]) - data["logits"]).abs().max().item() < ATOL


@pytest.mark.slow
def test_compacted_moe_models_reload_without_hf_flop(tmp_path):
    folders = _save_compacted(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", _RELOAD, *folders.values()], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, result.stderr[-3000:]
    got = json.loads(lines[0][len("RESULT") :])
    assert got["hf_flop_imported"] is False
    assert got[folders[True]]["class"] == "Qwen3MoeForCausalLM"
    assert got[folders[False]]["class"] == "FlopQwen3MoeForCausalLM"
    assert all(got[f]["diff"] < ATOL for f in folders.values()), got


def test_a_target_needing_fewer_experts_than_top_k_is_refused_before_any_work():
    model = tiny_mixtral()
    with pytest.raises(ValueError, match=r"fewer than num_experts_per_tok=2 experts"):
        get_flop_model(model, FlopConfig(levels=["expert"], target_sparsity=0.6))
    assert not any(isinstance(m, FlopExperts) for m in model.modules())  # nothing was replaced
    with pytest.raises(ValueError, match=r"fewer than num_experts_per_tok=2 experts"):  # a one-shot target too
        prune_oneshot(model, FlopConfig(levels=["expert"], target_sparsity=0.1), _data(2), target_sparsity=0.6)
    assert not any(isinstance(m, FlopExperts) for m in model.modules())
    get_flop_model(copy.deepcopy(model), FlopConfig(levels=["expert", "row", "head"], target_sparsity=0.6))  # reachable
    with pytest.raises(ValueError, match=r"level 'expert' can remove nothing"):
        get_flop_model(tiny_mixtral(num_local_experts=2), FlopConfig(levels=["expert"]))
    with pytest.raises(ValueError, match=r"level 'expert' removes whole experts"):
        from tiny_models import tiny_llama

        get_flop_model(tiny_llama(), FlopConfig(levels=["expert"]))
    assert MixtralForCausalLM is type(model)


def test_pruning_trainer_one_shot_and_recovery_on_a_moe_model(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
    from tiny_task import CountingTask

    from hf_flop import PruningArguments, PruningTrainer

    config = FlopConfig(levels=["head", "row", "expert"], target_sparsity=0.4)
    model = get_flop_model(tiny_qwen3_moe(vocab_size=64), config)
    args = PruningArguments(
        output_dir=str(tmp_path),
        max_steps=10,
        per_device_train_batch_size=16,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
    )
    PruningTrainer(model=model, args=args, train_dataset=CountingTask()).train()  # one-shot masks, refit, recovery
    model.eval()
    assert check_target(model).met
    assert all(len(m.kept_experts()) >= m.top_k for m in _experts(model).values())
    ids = CountingTask()[0]["input_ids"][None]
    assert (_logits(compact(model), {"input_ids": ids}) - _logits(model, {"input_ids": ids})).abs().max() < ATOL


def test_merge_and_unload_folds_rows_and_refuses_removed_experts():
    model = tiny_mixtral().eval()
    inputs = _inputs()
    peft_model = get_flop_model(copy.deepcopy(model), FlopConfig(levels=["row", "expert"], target_sparsity=0.2)).eval()
    _close(peft_model, rows={"model.layers.0.mlp.experts": {1: [0, 3, 9]}})
    gated = _logits(peft_model, inputs)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    assert type(merged.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert not merged.model.layers[0].mlp.gate._forward_hooks  # the routing hook is gone with the gates
    assert (_logits(merged, inputs) - gated).abs().max().item() < ATOL
    _close(peft_model, experts={"model.layers.1.mlp.experts": [2]})
    with pytest.raises(ValueError, match=r"cannot remove experts \[2\].*compact"):
        peft_model.merge_and_unload()
    assert (_logits(peft_model, inputs) - _logits(merged, inputs)).abs().max().item() > 1e-4  # still gated, intact


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_half_precision_computes_as_the_stock_experts(arch):
    # the gated experts keep the stock order of operations (Mixtral's float32 routing weights included)
    model = BUILDERS[arch]().to(torch.bfloat16).eval()
    inputs = _inputs()
    peft_model = get_flop_model(copy.deepcopy(model), FlopConfig(levels=["row", "expert"], target_sparsity=0.2)).eval()
    assert torch.equal(_logits(peft_model, inputs), _logits(model, inputs))
    name = "model.layers.1.mlp.experts"
    _close(peft_model, experts={name: [1]}, rows={name: {0: [1, 2]}})
    compacted = compact(peft_model)
    assert compacted.dtype == torch.bfloat16
    assert (_logits(compacted, inputs).float() - _logits(peft_model, inputs).float()).abs().max().item() < 1e-2


def test_a_layer_with_every_expert_closed_adds_nothing():
    model = tiny_mixtral().eval()
    inputs = _inputs()
    peft_model = get_flop_model(copy.deepcopy(model), FlopConfig(levels=["expert"], target_sparsity=0.1)).eval()
    _close(peft_model, experts={"model.layers.1.mlp.experts": [0, 1, 2, 3]})
    gated = _logits(peft_model, inputs)
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        by_hand.model.layers[1].mlp.experts.down_proj.zero_()
    assert torch.isfinite(gated).all() and (gated - _logits(by_hand, inputs)).abs().max().item() < ATOL
    with pytest.raises(ValueError, match=r"keep 0 experts, fewer than the 2 the router picks"):
        compact(peft_model)


def test_level_layer_is_refused_on_a_mixture_of_experts_model_before_any_work():
    """Removing layers would shift the config's index-placed expert layers: refused, naming the levels that work."""
    model = tiny_qwen3_moe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="level 'layer' does not support mixture-of-experts"):
        get_flop_model(model, FlopConfig(levels=["layer", "row"]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing replaced
