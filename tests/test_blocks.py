"""Issue 5, level "block": block gates in dense layers, their accounting, and the block-sparse compacted layer."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from tiny_models import tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama

import hf_flop
from hf_flop import FlopConfig, FlopLinear, get_flop_model, sparsity_report
from hf_flop.blocks import compact_block_layer
from hf_flop.modeling import block_sparse
from hf_flop.modeling.block_sparse import BlockSparseLinear, gather_matmul, kernel_for, rowwise_matmul

BS = 8  # tiny models are 32 wide


def _block_sparse_weight(out_f, in_f, bs, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, cols = -(-out_f // bs), -(-in_f // bs)
    keep = torch.rand(rows, cols, generator=g) >= sparsity
    mask = keep.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:out_f, :in_f]
    return torch.randn(out_f, in_f, generator=g) * mask, keep


@pytest.mark.parametrize("shape", [(64, 48), (40, 70)])  # a multiple of the block size, and one that is not
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_block_sparse_linear_equals_dense_with_every_kernel(shape, sparsity):
    weight, keep = _block_sparse_weight(*shape, 16, sparsity)
    bias = torch.randn(shape[0])
    layer = BlockSparseLinear.from_dense(weight, bias, 16)
    assert layer.values.shape[0] == int(keep.sum()) and layer.values.numel() == int(keep.sum()) * 16 * 16
    assert torch.equal(layer.to_dense(), weight)
    x = torch.randn(5, 3, shape[1])
    reference = F.linear(x, weight, bias)
    with torch.no_grad():
        for tokens in (1, 15, 100, 5000):  # the forward picks its kernel by token count and sparsity
            xs = torch.randn(tokens, shape[1])
            assert torch.allclose(layer(xs), F.linear(xs, weight, bias), atol=1e-4)
        assert torch.allclose(layer(x), reference, atol=1e-4)
        flat = F.pad(x.reshape(15, shape[1]), (0, layer.col_blocks * 16 - shape[1]))
        gathered = gather_matmul(flat, layer.values, layer.block_rows, layer.block_cols, layer.row_blocks)
        by_rows = rowwise_matmul(flat, layer.values, layer._row_plan())
    for out in (gathered, by_rows):
        assert torch.allclose(out[:, : shape[0]] + bias, reference.reshape(15, -1), atol=1e-4)


def test_kernel_choice_follows_the_measured_break_even_points():
    previous = 0
    for limit, rules in block_sparse.REGIMES:
        tokens = int(min(limit, previous + 10**6))  # the regime's largest token count (or a big one)
        for least, kernel in rules:
            assert kernel_for(tokens, least) == kernel
        assert kernel_for(tokens, min(least for least, _ in rules) - 0.01) == "dense"
        previous = limit


def test_block_sparse_linear_state_dict_round_trip_and_cache_invalidation():
    weight, _ = _block_sparse_weight(32, 48, 16, 0.5, seed=3)
    source = BlockSparseLinear.from_dense(weight, torch.randn(32), 16)
    target = BlockSparseLinear(48, 32, 16, source.values.shape[0])
    x = torch.randn(4, 48)
    with torch.no_grad():
        stale = target(x)  # builds a cache from the zero-initialised blocks
        target.load_state_dict(source.state_dict())
        assert not torch.allclose(stale, source(x))
        assert torch.allclose(target(x), source(x), atol=1e-6)


def test_block_sparse_linear_trains():
    weight, _ = _block_sparse_weight(32, 32, 16, 0.5, seed=4)
    layer = BlockSparseLinear.from_dense(weight, None, 16)
    for tokens in (1, 100):
        layer.zero_grad()
        layer(torch.randn(tokens, 32)).square().sum().backward()
        assert layer.values.grad is not None and layer.values.grad.abs().sum() > 0


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2, tiny_llama], ids=["bert", "gpt2", "llama"])
def test_block_level_keeps_outputs_and_masks_closed_blocks(build):
    model = build().eval()
    inputs = tiny_inputs()
    with torch.no_grad():
        reference = model(**inputs).logits
    peft_model = get_flop_model(copy.deepcopy(model), FlopConfig(levels=["block"], block_size=BS)).eval()
    with torch.no_grad():
        assert (peft_model(**inputs).logits - reference).abs().max().item() < 1e-4
    flop = peft_model.base_model
    layers = flop.flop_layers()
    assert all(layer.block_size == BS and not layer.factorized for layer in layers.values())
    assert {f"{n}.block" for n in layers} == set(flop.gates())
    report = sparsity_report(peft_model)
    assert report.deterministic_kept_params == report.prunable_params

    # close half the blocks of one layer: its output is x (W * M)^T + b, and it keeps half the params
    name, layer = next(iter(layers.items()))
    n = layer.block_gate.n
    closed = torch.arange(0, n, 2)
    layer.block_gate.close(closed)
    weight = hf_flop.layers.dense_weight(layer.base_layer).detach().clone()
    rows, cols = layer.out_features // BS, layer.in_features // BS
    for unit in closed.tolist():
        r, c = divmod(unit, cols)
        weight[r * BS : (r + 1) * BS, c * BS : (c + 1) * BS] = 0
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        assert torch.allclose(layer(x), F.linear(x, weight, layer.bias), atol=1e-6)
    report = sparsity_report(peft_model)
    module = report.modules[name]
    assert (module.blocks, module.kept_blocks) == (rows * cols, n - len(closed))
    assert module.kept_params == (n - len(closed)) * BS * BS
    assert report.prunable_params - report.deterministic_kept_params == len(closed) * BS * BS
    # open gates keep with probability 1 - 1e-4 (their init), closed ones ~0
    assert abs(report.expected_kept_params - report.deterministic_kept_params) < 1e-3 * report.prunable_params


def test_expected_block_count_is_differentiable():
    peft_model = get_flop_model(tiny_llama(), FlopConfig(levels=["block"], block_size=BS))
    sparsity = hf_flop.expected_sparsity(peft_model)
    sparsity.backward()
    gate = next(iter(peft_model.base_model.flop_layers().values())).block_gate
    assert gate.log_alpha.grad is not None and (gate.log_alpha.grad < 0).all()  # opening a block lowers sparsity


def test_block_size_must_tile_the_targets():
    with pytest.raises(ValueError, match="block_size=24"):
        get_flop_model(tiny_llama(), FlopConfig(levels=["block"], block_size=24))
    with pytest.raises(ValueError, match="rank"):
        FlopConfig(levels=["rank", "block"])


def test_block_gates_train_save_and_merge(tmp_path):
    model = get_flop_model(tiny_gpt2(), FlopConfig(levels=["block"], block_size=BS))
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    inputs = tiny_inputs()
    for _ in range(3):
        loss = model(**inputs, labels=inputs["input_ids"]).loss + 5 * (1 - hf_flop.expected_sparsity(model))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for layer in model.base_model.flop_layers().values():
        layer.block_gate.close(torch.tensor([0, 3]))
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    restored = PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(restored(**inputs).logits, expected, atol=1e-5)
    merged = restored.merge_and_unload()
    assert not any(isinstance(m, FlopLinear) for m in merged.modules())
    with torch.no_grad():
        assert torch.allclose(merged(**inputs).logits, expected, atol=1e-5)


@pytest.mark.parametrize("levels", [["block"], ["head", "row", "block"]])
def test_compact_block_layer_matches_the_gated_layer(levels):
    peft_model = get_flop_model(tiny_llama(), FlopConfig(levels=levels, block_size=BS)).eval()
    flop = peft_model.base_model
    g = torch.Generator().manual_seed(0)
    for layer in flop.flop_layers().values():
        layer.block_gate.close(torch.randperm(layer.block_gate.n, generator=g)[: layer.block_gate.n // 2])
    report = sparsity_report(peft_model)
    for name, layer in flop.flop_layers().items():
        rows, cols = torch.arange(layer.out_features), torch.arange(layer.in_features)
        spec, tensors = compact_block_layer(layer, rows, cols, torch.ones(layer.in_features))
        compact = BlockSparseLinear(spec["in"], spec["out"], spec["block_size"], spec["blocks"], bias=spec["bias"])
        compact.load_state_dict(tensors)
        assert spec["kind"] == "block_sparse" and compact.values.numel() == report.modules[name].kept_params
        x = torch.randn(2, 5, layer.in_features)
        with torch.no_grad():
            assert torch.allclose(compact(x), layer(x), atol=1e-5)
