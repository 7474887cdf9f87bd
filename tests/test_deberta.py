"""DeBERTa-v2/v3: heads and rows of disentangled attention, with and without its own position projections.

``tiny_models.tiny_deberta_v2`` (c2p and p2c relative positions, log buckets) with ``share_att_key``
False has ``pos_key_proj`` / ``pos_query_proj`` (``ArchSpec.head_extra_producers``: cut with the heads,
following k's and q's slicing); with it True the positions go through ``key_proj`` / ``query_proj``.
Checked for both: the head groups name exactly the modules the heads own, compaction is exact (1e-4)
with different heads and FFN widths per layer, a saved compacted folder loads and computes the same
logits in a fresh process without hf_flop, and ONNX Runtime computes them too.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_compact import _load_in_fresh_process
from tiny_models import VOCAB, tiny_deberta_v2

from hf_flop import FlopConfig, compact, get_flop_model, prune_oneshot

SHARE = [False, True]
IDS = ["own_position_projections", "shared_att_key"]


def inputs(batch: int = 2, length: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -3:] = 0  # some padding
    return {"input_ids": torch.randint(1, VOCAB, (batch, length), generator=g), "attention_mask": mask}


def per_layer_pruned(share_att_key: bool, levels=("head", "row")):
    """Layer 0 keeps 3 of 4 heads and half the FFN rows, layer 1 one head and every row (closed at random)."""
    model = get_flop_model(tiny_deberta_v2(share_att_key).eval(), FlopConfig(levels=list(levels))).eval()
    gates = model.base_model.flop_structure_gates
    g = torch.Generator().manual_seed(0)
    for layer, (heads, rows) in enumerate([(3, 32), (1, 64)]):
        for kind, kept in (("head", heads), ("row", rows)):
            gate = gates[f"{kind}_{layer}"]
            mask = torch.zeros(gate.n, dtype=torch.bool)
            mask[torch.randperm(gate.n, generator=g)[:kept]] = True
            gate.set_mask(mask)
    return model


def logits(model, batch=None) -> torch.Tensor:
    with torch.no_grad():
        return model(**(batch or inputs())).logits


@pytest.mark.parametrize("share_att_key", SHARE, ids=IDS)
def test_the_head_groups_cut_the_position_projections_only_where_the_layer_has_them(share_att_key):
    model = get_flop_model(tiny_deberta_v2(share_att_key), FlopConfig(levels=["head", "row"]))
    head = next(g for g in model.base_model.structure_groups if g.key == "head_0")
    owned = {s.module.rsplit(".", 1)[1]: s.unit for s in head.producers}
    expected = {"query_proj", "key_proj", "value_proj"} | (
        set() if share_att_key else {"pos_query_proj", "pos_key_proj"}
    )
    assert set(owned) == expected and set(owned.values()) == {8}  # 4 heads of 8 features each
    assert head.consumer.endswith("attention.output.dense") and head.n_units == 4


@pytest.mark.parametrize("share_att_key", SHARE, ids=IDS)
def test_compaction_is_exact_with_per_layer_heads(share_att_key):
    gated = per_layer_pruned(share_att_key, ("rank", "head", "row"))
    reference = logits(gated)
    small = compact(gated)
    assert (logits(small) - reference).abs().max().item() < 1e-4
    for layer, heads, rows in ((0, 3, 32), (1, 1, 64)):
        attention = small.deberta.encoder.layer[layer].attention.self
        assert (attention.num_attention_heads, attention.all_head_size, attention.attention_head_size) == (
            heads,
            heads * 8,
            8,
        )
        projections = ("query_proj", "key_proj", "value_proj") + (
            () if share_att_key else ("pos_query_proj", "pos_key_proj")
        )
        for name in projections:  # rank-pruned ones are low-rank pairs: their output width is what counts
            assert _out_features(getattr(attention, name)) == heads * 8, name
        assert _out_features(small.deberta.encoder.layer[layer].intermediate.dense) == rows


def _out_features(module) -> int:
    return module.out_features if hasattr(module, "out_features") else module.out_proj.out_features


@pytest.mark.parametrize("share_att_key", SHARE, ids=IDS)
def test_one_shot_pruning_keeps_the_gated_outputs(share_att_key):
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(1, VOCAB, (4, 12), generator=g), "labels": torch.tensor([0, 1, 1, 0])}
        for _ in range(3)
    ]
    config = FlopConfig(levels=["head", "row"], target_sparsity=0.4)
    gated = prune_oneshot(tiny_deberta_v2(share_att_key).eval(), config, data, "activation")
    small = compact(gated)
    assert (logits(small) - logits(gated)).abs().max().item() < 1e-4
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in tiny_deberta_v2().parameters())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("deberta")
    cases = []
    for share_att_key, name in zip(SHARE, IDS):
        gated = per_layer_pruned(share_att_key)
        folder = root / name
        compact(gated).save_pretrained(folder)
        batch = inputs()
        torch.save((batch, logits(gated, batch)), root / f"{name}.pt")
        auto = "AutoModelForSequenceClassification"
        cases.append({"name": name, "dir": str(folder), "ref": str(root / f"{name}.pt"), "auto": auto, "stock": False})
    (root / "cases.json").write_text(json.dumps(cases))
    return root, cases


def test_saved_folders_load_without_hf_flop(saved):
    root, cases = saved
    out = _load_in_fresh_process(root, "without")
    assert out.pop("hf_flop_loaded") is False
    for case in cases:
        got = out[case["name"]]
        assert got["diff"] < 1e-4 and got["module"].startswith("transformers_modules."), got


@pytest.mark.slow  # 15-30 s each on a shared 2-core machine, as the other families' ONNX checks
@pytest.mark.parametrize("share_att_key", SHARE, ids=IDS)
def test_onnx_runtime_computes_the_compacted_logits(share_att_key, tmp_path):
    pytest.importorskip("onnxruntime")
    from test_onnx_export import assert_onnx_runtime_matches

    from hf_flop import export_onnx, onnx_export

    small = compact(per_layer_pruned(share_att_key))
    path = export_onnx(small, tmp_path / "model.onnx")
    assert_onnx_runtime_matches(path, small, onnx_export.input_names(small))


def test_content_to_position_only_has_just_pos_key_proj_to_cut():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    config = DebertaV2Config.from_dict({**tiny_deberta_v2().config.to_dict(), "pos_att_type": ["c2p"]})
    torch.manual_seed(0)
    model = get_flop_model(DebertaV2ForSequenceClassification(config).eval(), FlopConfig(levels=["head", "row"])).eval()
    head = next(g for g in model.base_model.structure_groups if g.key == "head_1")
    assert {s.module.rsplit(".", 1)[1] for s in head.producers} == {
        "query_proj",
        "key_proj",
        "value_proj",
        "pos_key_proj",
    }
    head_gate = model.base_model.flop_structure_gates["head_1"]
    head_gate.set_mask(torch.tensor([True, False, False, True]))
    small = compact(model)
    assert (logits(small) - logits(model)).abs().max().item() < 1e-4
    assert small.deberta.encoder.layer[1].attention.self.pos_key_proj.out_features == 16
