"""Streaming pruning of a checkpoint folder, layer by layer (hf_flop.streaming.prune_checkpoint).

The contract: the written folder loads to the model that in-memory ``prune_oneshot`` + ``compact``
gives from the same inputs (logits to 1e-4), with the same config.json, and no more than about two
layers' parameters are ever held at once.
"""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama, tiny_qwen3
from transformers import AutoModelForCausalLM

from hf_flop import FlopConfig, compact, get_flop_model, prune_checkpoint, prune_oneshot, reconstruct, stream_layer
from hf_flop.checkpoint_io import CheckpointReader
from hf_flop.scores import find_gated_units

LEVELS = ["head", "row"]


def _data(n: int = 6, length: int = 12, vocab: int = 97) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (2, length), generator=g)
        mask = torch.ones(2, length, dtype=torch.long)
        mask[1, -3:] = 0  # padding: the token masks must reach the per-layer scores and refits
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids})
    return batches


def _config(levels=LEVELS, target: float = 0.4) -> FlopConfig:
    return FlopConfig(levels=list(levels), target_sparsity=target)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _saved_config(folder) -> dict:
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    return config


@pytest.mark.parametrize(
    "build, levels, shard",
    [
        (lambda: tiny_llama(num_hidden_layers=3), ["head", "row"], None),
        (tiny_qwen3, ["query_head", "row"], "20KB"),  # a sharded source: index + shards
        (tiny_gpt2, ["head", "row"], None),  # position embeddings added before the first layer
    ],
    ids=["llama", "qwen3-sharded", "gpt2"],
)
def test_global_stream_equals_prune_oneshot_and_compact(tmp_path, build, levels, shard):
    source, out, reference_dir = tmp_path / "src", tmp_path / "out", tmp_path / "ref"
    build().save_pretrained(source, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (source / "model.safetensors.index.json").is_file()
    (source / "tokenizer.json").write_text("{}")
    data = _data(length=24)
    result = prune_checkpoint(source, out, _config(levels), data, reconstruct_options={"progress": False})
    reference = prune_oneshot(build(), _config(levels), data, reconstruct_options={"progress": False})
    compacted = compact(reference)
    streamed = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    for batch in data[:2]:
        torch.testing.assert_close(_logits(streamed, batch), _logits(compacted, batch), atol=1e-4, rtol=0)
    expected = {s.key: s.gate.deterministic_mask().detach() != 0 for s in find_gated_units(reference)}
    assert expected.keys() == result.keep.keys()
    assert all(torch.equal(expected[k], result.keep[k]) for k in expected)
    compacted.save_pretrained(reference_dir)
    assert _saved_config(out) == _saved_config(reference_dir)
    # the same files besides the weights: config, generation config, the remote code (per-layer shapes)
    files = {p.name for p in reference_dir.iterdir() if "safetensors" not in p.name}
    assert files <= {p.name for p in out.iterdir()} and "modeling_flop.py" in files
    assert sum(p.numel() for p in streamed.parameters()) == sum(p.numel() for p in compacted.parameters())
    assert (out / "tokenizer.json").read_text() == "{}"
    assert "hf_flop" in (out / "README.md").read_text() or (out / "README.md").stat().st_size > 200
    assert not list(tmp_path.glob(".*out*"))  # the temporary folder is gone


def test_per_layer_stream_equals_in_memory_with_its_masks(tmp_path):
    """Each layer at the target on its own: with the same masks set in memory, reconstruct + compact agrees."""
    source, out = tmp_path / "src", tmp_path / "out"
    tiny_llama(num_hidden_layers=3).save_pretrained(source)
    data = _data()
    result = prune_checkpoint(
        source, out, _config(), data, allocation="per_layer", device="cpu", reconstruct_options={"progress": False}
    )
    model = get_flop_model(tiny_llama(num_hidden_layers=3), _config())
    units = find_gated_units(model)
    for s in units:
        s.gate.set_mask(result.keep[s.key])
    reconstruct(model, data, progress=False)
    compacted = compact(model)
    streamed = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    for batch in data[:2]:
        torch.testing.assert_close(_logits(streamed, batch), _logits(compacted, batch), atol=1e-4, rtol=0)
    # every layer on its own at the target: the kept fraction of each layer's rows is near 0.6
    for layer in range(3):
        assert 0.45 <= float(result.keep[f"row_{layer}"].float().mean()) <= 0.8


def test_no_more_than_two_layers_are_held(tmp_path, monkeypatch):
    """Count the parameters of every live one-layer model each time a tensor is read: never more than two."""
    source = tmp_path / "src"
    tiny_llama(num_hidden_layers=4).save_pretrained(source)
    models: list[weakref.ref] = []
    original_init, original_get = stream_layer.LayerModel.__init__, CheckpointReader.get
    peak, reads = [0], []

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        models.append(weakref.ref(self.model))

    def get(self, key):
        if not reads or key.split(".layers.")[-1].split(".")[0] != reads[-1].split(".layers.")[-1].split(".")[0]:
            # at each layer's first read; prune_checkpoint collects the garbage itself after each layer
            peak[0] = max(peak[0], sum(m() is not None for m in models))
        reads.append(key)
        return original_get(self, key)

    monkeypatch.setattr(stream_layer.LayerModel, "__init__", init)
    monkeypatch.setattr(CheckpointReader, "get", get)
    result = prune_checkpoint(source, tmp_path / "out", _config(), _data(), reconstruct_options={"progress": False})
    assert len(models) == 8  # two passes over four layers
    assert peak[0] <= 2
    # each layer's 9 tensors are read once per pass, in layer order: pass one 0..3, pass two 0..3
    order = [int(k.split(".layers.")[1].split(".")[0]) for k in reads if ".layers." in k]
    assert order == [i for _ in range(2) for i in range(4) for _ in range(9)]
    assert result.tensors_read == len(reads)


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "is not a folder"),
        ("not_causal", "not a causal LM"),
        ("no_safetensors", "neither model.safetensors"),
        ("output_exists", "exists"),
        ("rank_level", "levels"),
        ("loss_score", "needs the loss"),
        ("bad_target", "target_sparsity"),
    ],
)
def test_bad_inputs_are_refused_before_any_work(tmp_path, case, match):
    source, out = tmp_path / "src", tmp_path / "out"
    config, score = _config(), None
    if case == "not_causal":
        tiny_bert().save_pretrained(source)
    elif case != "missing":
        tiny_llama().save_pretrained(source)
    if case == "no_safetensors":
        (source / "model.safetensors").unlink()
    if case == "output_exists":
        out.mkdir()
    if case == "rank_level":
        config = FlopConfig(levels=["rank"], target_sparsity=0.3)
    if case == "loss_score":
        score = "sensitivity"
    target = 1.5 if case == "bad_target" else None
    with pytest.raises(ValueError, match=match):
        prune_checkpoint(source, out, config, _data(), score=score, target_sparsity=target)
    assert not out.exists() or case == "output_exists"


def test_uniform_shapes_stream_writes_the_stock_config(tmp_path):
    """uniform_shapes: the same shapes in every layer, so a stock LlamaConfig, no remote code, as compact gives."""
    source, out, reference_dir = tmp_path / "src", tmp_path / "out", tmp_path / "ref"
    tiny_llama(num_hidden_layers=3).save_pretrained(source)
    data = _data()
    config = FlopConfig(levels=["head", "row"], target_sparsity=0.4, uniform_shapes=True)
    prune_checkpoint(source, out, config, data, reconstruct_options={"progress": False})
    reference = compact(
        prune_oneshot(tiny_llama(num_hidden_layers=3), config, data, reconstruct_options={"progress": False})
    )
    reference.save_pretrained(reference_dir)
    saved = _saved_config(out)
    assert saved == _saved_config(reference_dir)
    assert saved["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in saved
    assert not (out / "modeling_flop.py").exists()
    streamed = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(streamed, data[0]), _logits(reference, data[0]), atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda_gives_the_cpu_result(tmp_path):
    source = tmp_path / "src"
    tiny_llama().save_pretrained(source)
    data = _data()
    options = {"progress": False}
    prune_checkpoint(source, tmp_path / "cpu", _config(), data, reconstruct_options=options)
    prune_checkpoint(source, tmp_path / "gpu", _config(), data, device="cuda", reconstruct_options=options)
    on_cpu = AutoModelForCausalLM.from_pretrained(tmp_path / "cpu", trust_remote_code=True)
    on_gpu = AutoModelForCausalLM.from_pretrained(tmp_path / "gpu", trust_remote_code=True)
    torch.testing.assert_close(_logits(on_gpu, data[0]), _logits(on_cpu, data[0]), atol=1e-3, rtol=0)
