"""Compaction: exact outputs, exact parameter counts, smaller files, loading with and without hf_flop."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import ALL_BUILDERS, ARCH_BUILDERS, RECOGNISED_BUILDERS, TINY_BUILDERS, VOCAB, tiny_inputs
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import hf_flop
from hf_flop import FlopConfig, compact, get_flop_model, sparsity_report
from hf_flop.gates import HardConcreteGate
from hf_flop.layers import FlopLinear
from hf_flop.modeling import FlopCompactedMixin, LowRankLinear

ENCODERS = ("bert", "roberta", "distilbert", "modernbert", "deberta-v2")  # the tiny sequence classifiers
AUTO = {
    arch: AutoModelForSequenceClassification if arch in ENCODERS else AutoModelForCausalLM for arch in ALL_BUILDERS
}
LEVELS = [["rank"], ["head"], ["row"], ["head", "row"], ["rank", "head", "row"]]


def prune_randomly(peft_model, seed: int = 0) -> None:
    """Set every gate to a random state: hard-concrete eval masks get zeros, fractions and ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in peft_model.base_model.gates().values():
            if isinstance(gate, HardConcreteGate):
                gate.log_alpha.copy_(torch.randn(gate.n, generator=g) * 4 - 3)
            else:
                gate.close(torch.randperm(gate.n, generator=g)[: int(torch.randint(0, gate.n, (1,), generator=g))])


def pruned(arch: str, levels: list[str], seed: int = 0, **config):
    model = get_flop_model(ALL_BUILDERS[arch](), FlopConfig(levels=levels, **config)).eval()
    prune_randomly(model, seed)
    return model


def logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**(inputs or tiny_inputs())).logits


def pruned_linear_params(model, names) -> int:
    """Weights (no biases) of the modules that replaced the given FLOP layers."""
    total = 0
    for name in names:
        module = model.get_submodule(name)
        total += sum(p.numel() for n, p in module.named_parameters() if not n.endswith("bias"))
    return total


CASES = [(arch, levels, 1) for arch in sorted(TINY_BUILDERS) for levels in LEVELS]
CASES += [(arch, ["rank", "head", "row"], 4) for arch in sorted(TINY_BUILDERS)]  # rounded ranks and rows
CASES += [(arch, ["rank", "head", "row"], 1) for arch in sorted(set(ARCH_BUILDERS) - set(TINY_BUILDERS))]
CASES += [(arch, ["rank", "head", "row"], 1) for arch in sorted(RECOGNISED_BUILDERS)]  # layouts recognised


@pytest.mark.parametrize("arch, levels, round_to", CASES, ids=lambda v: "+".join(v) if isinstance(v, list) else str(v))
def test_compact_is_exact_and_has_the_reported_size(arch, levels, round_to):
    model = pruned(arch, levels, round_to=round_to)
    reference = logits(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    small = compact(model)

    assert isinstance(small, type(model.base_model.model))
    assert not any(isinstance(m, FlopLinear) for m in small.modules())
    assert not any("flop_" in n for n, _ in small.named_parameters())
    assert not small.training
    torch.testing.assert_close(logits(small), reference, atol=1e-4, rtol=0)
    # compaction does not touch the gated model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    torch.testing.assert_close(logits(model), reference, atol=0, rtol=0)

    report = sparsity_report(model)
    assert pruned_linear_params(small, report.modules) == report.deterministic_kept_params
    assert report.deterministic_kept_params < report.prunable_params
    for name, info in report.modules.items():
        assert isinstance(small.get_submodule(name), LowRankLinear) == info.factorized_after_compaction, name


@pytest.mark.parametrize("arch", sorted(TINY_BUILDERS))
def test_block_level_compacts_to_block_sparse_layers(arch):
    model = pruned(arch, ["block"], block_size=8, seed=6)
    small = compact(model)
    torch.testing.assert_close(logits(small), logits(model), atol=1e-4, rtol=0)
    report = sparsity_report(model)
    assert pruned_linear_params(small, report.modules) == report.deterministic_kept_params
    assert all(type(small.get_submodule(n)).__name__ == "BlockSparseLinear" for n in report.modules)


@pytest.mark.parametrize("second", [["head", "row"], ["block"]])
def test_a_compacted_model_can_be_pruned_and_compacted_again(second, tmp_path):
    # the two-step pipeline: head/row first, compact, then prune the compacted model again
    first = compact(pruned("llama", ["head", "row"], round_to=8, seed=3))
    model = get_flop_model(first, FlopConfig(levels=second, block_size=8)).eval()
    prune_randomly(model, seed=4)
    small = compact(model)
    torch.testing.assert_close(logits(small), logits(model), atol=1e-4, rtol=0)
    report = sparsity_report(model)
    assert pruned_linear_params(small, report.modules) == report.deterministic_kept_params
    small.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path)), logits(model), atol=1e-4, rtol=0)


def test_topk_gates_compact_exactly():
    model = pruned("llama", ["rank", "head", "row"], gate="topk", seed=3)
    small = compact(model)
    torch.testing.assert_close(logits(small), logits(model), atol=1e-4, rtol=0)
    report = sparsity_report(model)
    assert pruned_linear_params(small, report.modules) == report.deterministic_kept_params


@pytest.mark.parametrize("arch", sorted(TINY_BUILDERS))
def test_block_with_every_head_and_row_closed(arch):
    model = get_flop_model(TINY_BUILDERS[arch](), FlopConfig(levels=["rank", "head", "row"], round_to=4)).eval()
    gates = model.base_model.gates()
    gates["head_0"].close(torch.arange(gates["head_0"].n))
    gates["row_0"].close(torch.arange(gates["row_0"].n))
    gates["row_1"].close(torch.arange(gates["row_1"].n))
    small = compact(model)
    torch.testing.assert_close(logits(small), logits(model), atol=1e-4, rtol=0)
    block = small.config.flop_plan["layers"]
    first = next(iter(block.values()))
    assert first["kv_heads"] == 1 and first["intermediate"] == 4  # one zeroed group; rows rounded to 4
    report = sparsity_report(model)
    assert pruned_linear_params(small, report.modules) == report.deterministic_kept_params


def test_compacting_a_model_without_flop_layers_is_refused():
    with pytest.raises(ValueError, match="no FLOP layers"):
        compact(TINY_BUILDERS["bert"]())


def _close_uniformly(model, heads: int, rows: int) -> None:
    for name, gate in model.base_model.gates().items():
        if name.startswith("head_"):
            gate.close(torch.arange(heads))
        elif name.startswith("row_"):
            gate.close(torch.arange(rows))


def test_uniform_pruning_gives_a_stock_config():
    # Llama keeps head_dim in its config, so fewer (uniform) heads and a narrower FFN are stock
    model = get_flop_model(TINY_BUILDERS["llama"](), FlopConfig(levels=["head", "row"])).eval()
    _close_uniformly(model, heads=1, rows=16)
    small = compact(model)
    assert type(small) is LlamaForCausalLM and type(small.config) is LlamaConfig
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 1)
    assert small.config.intermediate_size == 48 and small.config.head_dim == 8
    torch.testing.assert_close(logits(small), logits(model), atol=1e-4, rtol=0)
    # GPT-2 rows: stock (n_inner); BERT heads: head size is hidden / heads there, so not stock
    gpt2 = get_flop_model(TINY_BUILDERS["gpt2"](), FlopConfig(levels=["row"])).eval()
    _close_uniformly(gpt2, heads=0, rows=40)
    assert type(compact(gpt2)) is GPT2LMHeadModel and compact(gpt2).config.n_inner == 88
    bert = get_flop_model(TINY_BUILDERS["bert"](), FlopConfig(levels=["head"])).eval()
    _close_uniformly(bert, heads=1, rows=0)
    assert isinstance(compact(bert), FlopCompactedMixin)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_with_and_without_cache(arch):
    model = pruned(arch, ["rank", "head", "row"], seed=1)
    small = compact(model)
    prompt = tiny_inputs(batch=2, length=5)["input_ids"]
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = small.generate(prompt, use_cache=True, **kwargs)
        uncached = small.generate(prompt, use_cache=False, **kwargs)
        gated = model.base_model.model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (2, 13)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, gated)
    if arch == "llama":  # GQA survived: query heads per KV head unchanged in every block
        for counts in small.config.flop_plan["layers"].values():
            assert counts["heads"] // counts["kv_heads"] == 2 and counts["heads"] % counts["kv_heads"] == 0


# --- saved folders, loaded in a fresh process ------------------------------------------------------
_LOADER = r"""
import json, sys, torch
mode, cases_file = sys.argv[1], sys.argv[2]
if mode == "without":
    class Hide:  # make hf_flop unimportable, as on a machine where it is not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "hf_flop":
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, Hide())
else:
    import hf_flop
import transformers
out = {}
for case in json.load(open(cases_file)):
    auto = getattr(transformers, case["auto"])
    remote = mode == "without" and not case["stock"]
    model = auto.from_pretrained(case["dir"], trust_remote_code=True) if remote else auto.from_pretrained(case["dir"])
    inputs, reference = torch.load(case["ref"])
    with torch.no_grad():
        diff = (model(**inputs).logits - reference).abs().max().item()
    out[case["name"]] = {"diff": diff, "class": type(model).__name__, "module": type(model).__module__}
out["hf_flop_loaded"] = any(k.split(".")[0] == "hf_flop" for k in sys.modules)
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Pruned tiny models, compacted and saved, with reference inputs and logits; plus dense copies."""
    root = tmp_path_factory.mktemp("compacted")
    cases = []
    models = {arch: pruned(arch, ["rank", "head", "row"], seed=2) for arch in ALL_BUILDERS}
    stock = get_flop_model(TINY_BUILDERS["llama"](), FlopConfig(levels=["head", "row"])).eval()
    _close_uniformly(stock, heads=1, rows=16)
    models["llama_stock"] = stock
    models["gpt2_block"] = pruned("gpt2", ["block"], block_size=8, seed=2)
    for name, model in models.items():
        arch = name if name in ALL_BUILDERS else name.rsplit("_", 1)[0]  # "gemma3_text", "llama_stock"
        folder = root / name
        compact(model).save_pretrained(folder)
        ALL_BUILDERS[arch]().save_pretrained(root / f"{name}_dense")
        inputs = tiny_inputs()
        torch.save((inputs, logits(model, **inputs)), root / f"{name}.pt")
        stock_config = "flop_plan" not in json.loads((folder / "config.json").read_text())
        cases.append(
            {
                "name": name,
                "dir": str(folder),
                "ref": str(root / f"{name}.pt"),
                "auto": AUTO[arch].__name__,
                "stock": stock_config,
            }
        )
    (root / "cases.json").write_text(json.dumps(cases))
    return root, models, cases


def _load_in_fresh_process(root, mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    result = subprocess.run(
        [sys.executable, "-c", _LOADER, mode, str(root / "cases.json")],
        capture_output=True,
        text=True,
        cwd=root,  # not the repository: nothing importable by accident
        env={**env, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "modules_cache")},
        timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, result.stderr[-3000:]
    return json.loads(lines[0][len("RESULT") :])


@pytest.mark.parametrize("mode", ["with", "without"])
def test_load_in_a_fresh_process(saved, mode):
    root, _, cases = saved
    out = _load_in_fresh_process(root, mode)
    assert out.pop("hf_flop_loaded") is (mode == "with")
    for case in cases:
        got = out[case["name"]]
        assert got["diff"] < 1e-4, (case["name"], got)
        if mode == "without" and not case["stock"]:
            assert got["module"].startswith("transformers_modules."), got  # the copied remote code
        if case["stock"]:
            assert not got["class"].startswith("Flop")


def test_saved_folders(saved):
    root, models, cases = saved
    for case in cases:
        files = set(os.listdir(case["dir"]))
        assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
        config = json.loads((root / case["name"] / "config.json").read_text())
        if case["stock"]:
            assert "auto_map" not in config and "modeling_flop.py" not in files
            continue
        assert {"configuration_flop.py", "modeling_flop.py"} <= files
        assert config["auto_map"]["AutoConfig"].startswith("configuration_flop.Flop")
        assert config["auto_map"][case["auto"]].startswith("modeling_flop.Flop")
        for code in ("configuration_flop.py", "modeling_flop.py", "block_sparse.py"):  # self-contained remote code
            imports = [
                line.split()[1]
                for line in (root / case["name"] / code).read_text().splitlines()
                if line.startswith(("import ", "from "))
            ]
            assert all(
                m.split(".")[0] in {"torch", "transformers", "__future__", "os", "shutil", "math", ""} for m in imports
            ), imports


def test_saved_folder_is_smaller_by_the_pruned_fraction(saved):
    root, models, cases = saved
    for case in cases:
        report = sparsity_report(models[case["name"]])
        removed = report.prunable_params - report.deterministic_kept_params
        dense = os.path.getsize(root / f"{case['name']}_dense" / "model.safetensors")
        small = os.path.getsize(root / case["name"] / "model.safetensors")
        # float32: 4 bytes per removed weight; slack for removed biases and the safetensors header
        assert abs((dense - small) - 4 * removed) < 0.05 * 4 * removed + 2048, (case["name"], dense, small, removed)


def test_padding_matches_unpadded_examples(saved):
    root, _, cases = saved
    for case in cases:
        model = getattr(__import__("transformers"), case["auto"]).from_pretrained(case["dir"]).eval()
        g = torch.Generator().manual_seed(5)
        long, short = torch.randint(1, VOCAB, (7,), generator=g), torch.randint(1, VOCAB, (4,), generator=g)
        batch = torch.stack([long, torch.cat([short, torch.zeros(3, dtype=torch.long)])])
        mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
        both = logits(model, input_ids=batch, attention_mask=mask)
        alone = logits(model, input_ids=short[None], attention_mask=torch.ones(1, 4, dtype=torch.long))
        first = logits(model, input_ids=long[None])
        if isinstance(model, BertForSequenceClassification):
            torch.testing.assert_close(both[1], alone[0], atol=1e-4, rtol=0)
        else:  # right padding: the real positions of the short example
            torch.testing.assert_close(both[1, :4], alone[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(both[0], first[0], atol=1e-4, rtol=0)


def test_auto_classes_are_registered_on_import():
    from transformers import AutoConfig

    config = AutoConfig.for_model("flop_llama", hidden_size=32, num_attention_heads=4, flop_plan={})
    assert type(config).__name__ == "FlopLlamaConfig" and hf_flop.compact is compact
