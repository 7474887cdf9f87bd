"""Issue 5: the two-step pipeline (head/row, compact, then block on the compacted model)."""

import importlib.util
import json
import os

import pytest
import torch
from tiny_models import VOCAB, tiny_bert, tiny_llama
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_flop
from hf_flop import FlopConfig, compact, get_flop_model, sparsity_report
from hf_flop.modeling.block_sparse import BlockSparseLinear

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "two_step_pipeline.py")


@pytest.mark.parametrize(
    "build, auto", [(tiny_bert, AutoModelForSequenceClassification), (tiny_llama, AutoModelForCausalLM)]
)
def test_block_step_on_a_head_row_compacted_model(tmp_path, build, auto):
    """The plumbing without training: gates set by hand, each step compacted exactly, the result reloads."""
    bs = 8
    step1 = get_flop_model(build(), FlopConfig(levels=["head", "row"], round_to=bs)).eval()
    gates = step1.base_model.flop_structure_gates
    gates["head_0"].close(torch.tensor([0]))
    gates["row_1"].close(torch.arange(0, 64, 3))  # 21 closed: 43 kept, rounded up to 48
    small = compact(step1)
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(small(input_ids=ids).logits, step1(input_ids=ids).logits, atol=1e-5)

    step2 = get_flop_model(small, FlopConfig(levels=["block"], block_size=bs)).eval()
    g = torch.Generator().manual_seed(1)
    for layer in step2.base_model.flop_layers().values():
        assert layer.out_features % bs == 0 and layer.in_features % bs == 0  # round_to kept the widths tileable
        layer.block_gate.close(torch.randperm(layer.block_gate.n, generator=g)[: layer.block_gate.n // 2])
    with torch.no_grad():
        expected = step2(input_ids=ids).logits
    report = sparsity_report(step2)
    out = hf_flop.save_compacted(step2, tmp_path / "final")
    reloaded = auto.from_pretrained(out).eval()
    blocks = [m for m in reloaded.modules() if isinstance(m, BlockSparseLinear)]
    assert len(blocks) == len(report.modules)
    assert sum(m.values.numel() for m in blocks) == report.deterministic_kept_params
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-4)


def _load_example():
    spec = importlib.util.spec_from_file_location("two_step_pipeline", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # three short Trainer runs: ~1-2 minutes on 2 cores
@pytest.mark.parametrize("gate", ["hard_concrete", "topk"])
def test_two_step_pipeline_example_runs(tmp_path, gate):
    example = _load_example()
    out = tmp_path / "final"
    args = ["--dense_steps", "40", "--prune_steps", "100", "--train_size", "512", "--batch_size", "16"]
    results = example.main([*args, "--gate", gate, "--output_dir", str(out)])
    # each step shrank the linear weights, and the saved block-sparse model reloads exactly
    assert results["block"]["kept"] < results["head_row"]["kept"] < results["dense"]["kept"]
    assert results["remaining_fraction"] == results["block"]["kept"] / results["dense"]["kept"]
    assert results["reloaded_accuracy"] == results["block"]["accuracy"]
    plan = json.loads((out / "config.json").read_text())["flop_plan"]
    assert "block_sparse" in {spec["kind"] for spec in plan["modules"].values()}
    assert (out / "block_sparse.py").is_file()
