"""Level "embedding": gated cluster factorization of the input embedding and a tied LM head."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_compact import _load_in_fresh_process
from tiny_models import VOCAB, tiny_gpt2, tiny_inputs, tiny_llama
from torch import nn

from hf_flop import FlopConfig, compact, get_flop_model, sparsity_report
from hf_flop.embedding import FlopEmbedding, frequency_cutoffs
from hf_flop.modeling.factorized_embedding import FactorizedEmbedding, TiedFactorizedHead

BUILDERS = {"gpt2": tiny_gpt2, "llama_tied": lambda: tiny_llama(tie_word_embeddings=True), "llama": tiny_llama}
TIED = {"gpt2": True, "llama_tied": True, "llama": False}


def training_tokens() -> torch.Tensor:
    """Skewed token counts (a few frequent ids), so the frequency order is not the id order."""
    g = torch.Generator().manual_seed(3)
    weights = 1.0 / (1 + torch.randperm(VOCAB, generator=g).float())
    return torch.multinomial(weights, 2000, replacement=True, generator=g)


def gated(arch: str, levels=("embedding",), n_clusters: int = 3, **config):
    cutoffs, order = frequency_cutoffs(training_tokens(), VOCAB, n_clusters)
    flop_config = FlopConfig(levels=list(levels), embedding_cutoffs=cutoffs, embedding_order=order, **config)
    return get_flop_model(BUILDERS[arch](), flop_config).eval()


def close_some_ranks(model, seed: int = 0) -> None:
    """Close a random subset (at least one, never all) of every embedding cluster's rank components."""
    g = torch.Generator().manual_seed(seed)
    for key, gate in model.base_model.gates().items():
        if ".embedding_" in key:
            count = int(torch.randint(1, gate.n, (1,), generator=g))
            gate.close(torch.randperm(gate.n, generator=g)[:count])


def logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**(inputs or tiny_inputs())).logits


def test_frequency_cutoffs_sort_by_count_and_split_the_mass():
    tokens = torch.tensor([5] * 50 + [2] * 30 + [7] * 15 + [1] * 5)
    cutoffs, order = frequency_cutoffs(tokens, 10, 2)
    assert order[:4] == [5, 2, 7, 1] and sorted(order) == list(range(10))
    assert cutoffs == [1]  # id 5 alone covers half of the occurrences
    cutoffs, _ = frequency_cutoffs(training_tokens(), VOCAB, 4)
    assert len(cutoffs) == 3 and cutoffs == sorted(set(cutoffs)) and cutoffs[-1] < VOCAB
    with pytest.raises(ValueError, match="outside"):
        frequency_cutoffs(torch.tensor([0, VOCAB]), VOCAB, 2)
    with pytest.raises(ValueError, match="n_clusters"):
        frequency_cutoffs(tokens, 10, 0)


@pytest.mark.parametrize("cutoffs", [[40, 10], [10, 10], [0, 5]])
def test_cutoffs_not_increasing_are_refused(cutoffs):
    with pytest.raises(ValueError, match="strictly increasing"):
        FlopConfig(levels=["embedding"], embedding_cutoffs=cutoffs)


@pytest.mark.parametrize("cutoffs", [[10, VOCAB], [VOCAB + 5]])
def test_cutoffs_beyond_the_vocabulary_are_refused(cutoffs):
    with pytest.raises(ValueError, match=f"vocabulary size {VOCAB}"):
        get_flop_model(tiny_gpt2(), FlopConfig(levels=["embedding"], embedding_cutoffs=cutoffs))


def test_order_must_be_a_permutation():
    with pytest.raises(ValueError, match="permutation"):
        get_flop_model(tiny_gpt2(), FlopConfig(levels=["embedding"], embedding_order=[0] * VOCAB))


def test_tied_head_cannot_also_be_a_rank_target():
    config = FlopConfig(levels=["rank", "embedding"], target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="tied"):
        get_flop_model(tiny_llama(tie_word_embeddings=True), config)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_starts_exact_and_ties_the_head(arch):
    reference = logits(BUILDERS[arch]().eval())
    model = gated(arch)
    assert (logits(model) - reference).abs().max() < 1e-4
    task = model.base_model.model
    embedding = task.get_input_embeddings()
    assert isinstance(embedding, FlopEmbedding) and embedding.sizes != [VOCAB]
    assert embedding.order != list(range(VOCAB))  # frequency order, not id order
    head = task.get_output_embeddings()
    assert isinstance(head, TiedFactorizedHead) is TIED[arch]
    if not TIED[arch]:
        assert isinstance(head, nn.Linear) and head.weight.shape == (VOCAB, 32)
    keys = [k for k in model.base_model.gates() if ".embedding_" in k]
    assert len(keys) == len(embedding.sizes)
    report = sparsity_report(model)
    assert report.deterministic_kept_params == report.prunable_params  # every cluster at full rank keeps n*d


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gates_and_factors_train(arch):
    model = gated(arch, levels=("rank", "embedding")).train()
    out = model(**tiny_inputs(), labels=tiny_inputs()["input_ids"])
    (out.loss + sparsity_report(model, differentiable=True).expected_sparsity).backward()
    embedding = model.base_model.model.get_input_embeddings()
    assert all(g.log_alpha.grad is not None and g.log_alpha.grad.abs().sum() > 0 for g in embedding.flop_gates)
    assert all(p.grad is not None for p in embedding.flop_P)
    assert not embedding.base_layer.weight.requires_grad


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_compaction_is_exact_with_the_reported_size(arch, tmp_path):
    model = gated(arch, levels=("rank", "embedding"))
    close_some_ranks(model)
    reference = logits(model)
    report = sparsity_report(model)
    assert report.deterministic_kept_params < report.prunable_params
    small = compact(model)
    assert (logits(small) - reference).abs().max() < 1e-4

    embedding = small.get_input_embeddings()
    assert isinstance(embedding, FactorizedEmbedding)
    stored = sum(p.numel() for p in embedding.parameters())
    clusters = {k: m for k, m in report.modules.items() if ".cluster_" in k}
    assert stored == sum(m.kept_params for m in clusters.values())
    ranks = [c["rank"] for c in small.config.flop_plan["modules"][_plan_key(small)]["clusters"]]
    assert any(r is not None for r in ranks)  # some cluster stays factorized
    head = small.get_output_embeddings()
    if TIED[arch]:
        assert isinstance(head, TiedFactorizedHead) and not list(head.parameters())
        assert small.config.tie_word_embeddings is False  # the head ties itself; transformers must not
    else:
        assert isinstance(head, nn.Linear)

    small.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lm_head") for k in keys) is not TIED[arch]  # tied: the matrix is saved once
    plan = json.loads((tmp_path / "config.json").read_text())["flop_plan"]
    assert plan["modules"][_plan_key(small)]["order"] == model.base_model.model.get_input_embeddings().order


def _plan_key(small) -> str:
    return next(k for k, v in small.config.flop_plan["modules"].items() if v["kind"] == "factorized_embedding")


@pytest.mark.parametrize("arch", ["gpt2", "llama_tied"])
def test_generate_with_and_without_cache(arch):
    model = gated(arch)
    close_some_ranks(model, seed=1)
    small = compact(model)
    prompt = tiny_inputs(batch=2, length=5)["input_ids"]
    with torch.no_grad():
        runs = {
            (name, cache): m.generate(prompt, use_cache=cache, max_new_tokens=8, do_sample=False, pad_token_id=0)
            for name, m in (("compacted", small), ("gated", model.base_model.model))
            for cache in (True, False)
        }
    first = runs["compacted", True]
    assert first.shape == (2, 13)
    assert all(torch.equal(tokens, first) for tokens in runs.values()), runs


def test_merge_and_unload_folds_the_clusters():
    model = gated("gpt2")
    close_some_ranks(model, seed=2)
    reference = logits(model)
    plain = model.merge_and_unload()
    assert type(plain.get_input_embeddings()) is nn.Embedding
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
    assert (logits(plain) - reference).abs().max() < 1e-4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedding")
    cases = []
    for i, arch in enumerate(sorted(BUILDERS)):
        model = gated(arch, levels=("rank", "embedding"))
        close_some_ranks(model, seed=i)
        compact(model).save_pretrained(root / arch)
        inputs = tiny_inputs()
        torch.save((inputs, logits(model, **inputs)), root / f"{arch}.pt")
        case = {"name": arch, "dir": str(root / arch), "ref": str(root / f"{arch}.pt"), "auto": "AutoModelForCausalLM"}
        cases.append({**case, "stock": False})
    (root / "cases.json").write_text(json.dumps(cases))
    return root, cases


@pytest.mark.parametrize("mode", ["with", "without"])
def test_load_in_a_fresh_process(saved, mode):
    root, cases = saved
    out = _load_in_fresh_process(root, mode)
    assert out.pop("hf_flop_loaded") is (mode == "with")
    for case in cases:
        assert out[case["name"]]["diff"] < 1e-4, (case["name"], out[case["name"]])
        expected = "FlopGPT2LMHeadModel" if case["name"] == "gpt2" else "FlopLlamaForCausalLM"
        assert out[case["name"]]["class"] == expected


def test_adapter_round_trip_rebuilds_the_clusters(tmp_path):
    from peft import PeftModel

    model = gated("gpt2", levels=("rank", "embedding"))
    close_some_ranks(model, seed=3)
    with torch.no_grad():
        model.base_model.model.get_input_embeddings().flop_P[0].mul_(1.5)  # a trained factor, not the SVD
    reference = logits(model)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert not any("wte.base_layer" in k for k in f.keys())  # superseded by the factors
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
    assert (logits(loaded) - reference).abs().max() < 1e-4


def test_a_compacted_embedding_survives_a_second_pruning_step():
    model = gated("llama_tied")
    close_some_ranks(model, seed=4)
    small = compact(model)
    second = get_flop_model(small, FlopConfig(levels=["head", "row"])).eval()
    for gate in second.base_model.gates().values():
        gate.close(torch.arange(gate.n // 2))
    reference = logits(second)
    smaller = compact(second)
    assert isinstance(smaller.get_input_embeddings(), FactorizedEmbedding)
    assert isinstance(smaller.get_output_embeddings(), TiedFactorizedHead)
    assert (logits(smaller) - reference).abs().max() < 1e-4
    with pytest.raises(TypeError, match="already factorized"):
        get_flop_model(compact(model), FlopConfig(levels=["embedding"]))


def test_a_deep_copy_ties_its_head_to_its_own_embedding():
    import copy

    model = gated("gpt2")
    twin = copy.deepcopy(model)  # e.g. the trainer's teacher
    with torch.no_grad():
        twin.base_model.model.get_input_embeddings().flop_Q[0].mul_(2.0)
    head = twin.base_model.model.get_output_embeddings()
    assert head._tied[0] is twin.base_model.model.get_input_embeddings()
    assert not torch.allclose(logits(twin), logits(model))
