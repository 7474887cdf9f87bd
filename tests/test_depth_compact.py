"""Level "layer" compacted: fewer layers (stock class, renumbered, per-layer lists cut), removed sublayers
(remote code), reload without hf_flop, generation with a KV cache, ONNX and GGUF export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_depth import calibration, close, gemma3_4, gpt2_4, llama4
from tiny_models import ALL_BUILDERS, _gqa_kwargs, tiny_bpe_tokenizer, tiny_inputs
from transformers import SmolLM3Config, SmolLM3ForCausalLM

from hf_flop import FlopConfig, compact, export_gguf, export_onnx, get_flop_model, prune_oneshot, sparsity_report
from hf_flop.recognition import spec_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def smollm3_4():
    """SmolLM3 with a per-layer no_rope_layers list (a layer without RoPE)."""
    torch.manual_seed(0)
    config = SmolLM3Config(**{**_gqa_kwargs(), "num_hidden_layers": 4}, no_rope_layers=[1, 0, 1, 1])
    return SmolLM3ForCausalLM(config).eval()


def depth_pruned(build, keep, granularity="layer", levels=("layer",)):
    gated = get_flop_model(build(), FlopConfig(levels=list(levels), layer_granularity=granularity)).eval()
    close(gated, keep, granularity)
    return gated


def greedy(model, ids, steps: int = 6, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0, **kwargs)


def attention_indices(model) -> list[int]:
    return [layer.self_attn.layer_idx for layer in model.model.layers]


# --- whole layers: the stock class ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, lists",
    [
        (llama4, {}),
        (gemma3_4, {"layer_types": ["sliding_attention", "full_attention"]}),
        (smollm3_4, {"no_rope_layers": [1, 1], "layer_types": ["full_attention", "full_attention"]}),
    ],
    ids=["llama", "gemma3", "smollm3"],
)
def test_removed_layers_leave_a_stock_model_with_renumbered_layers(build, lists):
    gated = depth_pruned(build, [False, True, True, False] if build is not gemma3_4 else [True, False, False, True])
    if build is smollm3_4:
        close(gated, [True, False, False, True])  # keeps no_rope_layers [1, 1]
    x = tiny_inputs(length=9)
    small = compact(gated)
    assert type(small).__name__ == type(gated.base_model.model).__name__  # the stock class, a stock config
    assert small.config.num_hidden_layers == 2 and not hasattr(small.config, "flop_plan")
    for key, value in lists.items():
        assert getattr(small.config, key) == value
    assert attention_indices(small) == [0, 1]  # the KV cache's indices
    torch.testing.assert_close(small(**x).logits, gated(**x).logits, atol=1e-4, rtol=0)
    ids = x["input_ids"][:1]
    assert torch.equal(greedy(small, ids), greedy(gated, ids))  # generation with the cache
    assert torch.equal(greedy(small, ids), greedy(small, ids, use_cache=False))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in gated.base_model.model.parameters())


def test_layers_removed_with_heads_and_rows_and_uniform_shapes():
    config = FlopConfig(levels=["layer", "head", "row"], target_sparsity=0.6, uniform_shapes=True)
    gated = prune_oneshot(llama4(), config, calibration(), "activation")
    report = sparsity_report(gated)
    assert abs(report.deterministic_sparsity - 0.6) <= 0.07
    gated.eval()
    small = compact(gated)
    assert type(small).__name__ == "LlamaForCausalLM"
    assert small.config.num_hidden_layers == 4 - len(report.layers_removed)
    kept = sum(p.numel() for n, p in small.named_parameters() if "proj" in n)
    assert kept == report.deterministic_kept_params  # what the report counts is what compaction writes
    x = tiny_inputs()
    torch.testing.assert_close(small(**x).logits, gated(**x).logits, atol=1e-4, rtol=0)


def test_what_cannot_compact_is_refused():
    gated = depth_pruned(llama4, [True, True, True, True])
    with torch.no_grad():
        gated.base_model.flop_structure_gates["layer"].log_alpha[1] = 0.0  # an eval value of about 0.5
    with pytest.raises(ValueError, match="fix_masks_at_target"):
        compact(gated)
    close(gated, [True, False, True, True])
    with pytest.raises(ValueError, match="hf_flop.compact"):
        gated.merge_and_unload()


# --- sublayers: the remote-code model ---------------------------------------------------------------------


@pytest.mark.parametrize("build", [llama4, gemma3_4, gpt2_4], ids=["llama", "gemma3", "gpt2"])
def test_removed_sublayers_become_no_ops(build):
    # layer 0 loses its attention (the cache length is read at layer 0), layer 1 its FFN, layer 3 both
    keep = [False, True, True, False, True, True, False, False]
    gated = depth_pruned(build, keep, "sublayer")
    x = tiny_inputs(length=9)
    small = compact(gated)
    assert type(small).__name__.startswith("Flop") and small.config.num_hidden_layers == 3
    modules = small.config.flop_plan["modules"]
    layers = "h" if build is gpt2_4 else "layers"
    attention = "attn" if build is gpt2_4 else "self_attn"
    assert modules[f"{layers}.0.{attention}"] == {"kind": "skipped_attention", "layer_idx": 0}
    assert modules[f"{layers}.1.mlp"] == {"kind": "skipped_ffn"}
    assert small.config.flop_plan["removed_layers"] == [f"{layers}.3"]
    torch.testing.assert_close(small(**x).logits, gated(**x).logits, atol=1e-4, rtol=0)
    ids = x["input_ids"][:1]
    assert torch.equal(greedy(small, ids), greedy(gated, ids))
    assert torch.equal(greedy(small, ids), greedy(small, ids, use_cache=False))


# --- reload where hf_flop cannot be imported --------------------------------------------------------------

_LOADER = r"""
import json, sys
class _HideHfFlop:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hf_flop":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, _HideHfFlop())
import torch
from transformers import AutoModelForCausalLM
out = {}
for folder, remote in json.loads(sys.argv[1]):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()
    saved = torch.load(folder + "/expected.pt")
    with torch.no_grad():
        logits = model(input_ids=saved["ids"]).logits
        tokens = model.generate(saved["ids"][:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    out[folder] = {"diff": (logits - saved["logits"]).abs().max().item(), "tokens": tokens.tolist(),
                   "class": type(model).__name__, "module": type(model).__module__}
out["hf_flop_imported"] = any(m.split(".")[0] == "hf_flop" for m in sys.modules)
print("RESULT" + json.dumps(out))
"""


def test_compacted_models_reload_without_hf_flop(tmp_path):
    cases = {
        "llama": (depth_pruned(llama4, [True, False, True, False]), False),
        "gemma3": (depth_pruned(gemma3_4, [False, True, True, False]), False),
        "llama_sublayer": (depth_pruned(llama4, [True, False, False, True, True, True, True, True], "sublayer"), True),
    }
    x = tiny_inputs(length=9)
    expected = {}
    for name, (gated, remote) in cases.items():
        small = compact(gated)
        folder = tmp_path / name
        small.save_pretrained(folder)
        with torch.no_grad():
            torch.save({"ids": x["input_ids"], "logits": small(**x).logits}, folder / "expected.pt")
        expected[str(folder)] = (greedy(small, x["input_ids"][:1]).tolist(), type(small).__name__)
        assert ("auto_map" in json.loads((folder / "config.json").read_text())) is remote
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    job = [[str(tmp_path / name), remote] for name, (_, remote) in cases.items()]
    result = subprocess.run(
        [sys.executable, "-c", _LOADER, json.dumps(job)], capture_output=True, text=True, env=env, timeout=600
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, result.stderr[-3000:]
    got = json.loads(lines[0][len("RESULT") :])
    assert got.pop("hf_flop_imported") is False
    for folder, found in got.items():
        tokens, class_name = expected[folder]
        assert found["diff"] <= 1e-4 and found["tokens"] == tokens and found["class"] == class_name, found
        assert found["module"].startswith("transformers_modules.") is folder.endswith("sublayer")


# --- exports ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # 20-30 s each on a shared 2-core machine (the ONNX exporter)
@pytest.mark.parametrize("granularity", ["layer", "sublayer"])
def test_onnx_export_of_a_depth_pruned_model(granularity, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    keep = [True, False, True, True] if granularity == "layer" else [True, False, False, True, True, True, True, True]
    small = compact(depth_pruned(llama4, keep, granularity))
    path = export_onnx(small, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, length in ((1, 11), (3, 5)):
        ids = torch.randint(1, 90, (batch, length), generator=torch.Generator().manual_seed(length))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            expected = small(input_ids=ids, attention_mask=mask).logits.numpy()
        (logits,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        assert abs(logits - expected).max() <= 1e-4


def test_gguf_of_a_depth_pruned_uniform_llama_is_plain_llama(tmp_path):
    gguf = pytest.importorskip("gguf")
    gated = depth_pruned(llama4, [True, False, True, False], levels=("layer", "row"))
    for i in range(4):
        gated.base_model.flop_structure_gates[f"row_{i}"].set_mask(torch.arange(64) < 48)  # uniform FFN width
    small = compact(gated)
    assert type(small).__name__ == "LlamaForCausalLM" and small.config.intermediate_size == 48
    path = export_gguf(small, tmp_path / "m.gguf", tokenizer=tiny_bpe_tokenizer())
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.feed_forward_length"] == 48
    blocks = {t.name.split(".")[1] for t in reader.tensors if t.name.startswith("blk.")}
    assert blocks == {"0", "1"}
    weights = {t.name: t for t in reader.tensors}
    # blk.1 is the old layer 2
    down = torch.from_numpy(weights["blk.1.ffn_down.weight"].data.astype("float32").reshape(32, 48))
    torch.testing.assert_close(down, small.model.layers[1].mlp.down_proj.weight.detach(), atol=1e-6, rtol=0)


# --- every architecture -----------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["layer", "sublayer"])
@pytest.mark.parametrize("arch", sorted(ALL_BUILDERS))
def test_every_architecture_compacts_removed_layers_exactly(arch, granularity):
    """The first removable layer (or its attention, and the next layer's FFN) goes; post-norm layouts refuse sublayers."""
    model = ALL_BUILDERS[arch]().eval()
    config = FlopConfig(levels=["layer", "row"], layer_granularity=granularity)
    if granularity == "sublayer" and not spec_for(model, None).pre_norm_residual:
        with pytest.raises(ValueError, match="post-norm"):
            get_flop_model(model, config)
        return
    gated = get_flop_model(model, config).eval()
    gate = gated.base_model.flop_structure_gates[granularity]
    keep = torch.ones(gate.n, dtype=torch.bool)
    keep[0] = False
    if gate.n > 2:
        keep[3] = False
    gate.set_mask(keep)
    x = tiny_inputs(length=9)
    small = compact(gated)
    torch.testing.assert_close(small(**x).logits, gated(**x).logits, atol=1e-4, rtol=0)
    assert small.config.num_hidden_layers == (1 if granularity == "layer" else 2)
    if small.can_generate():
        ids = x["input_ids"][:1]
        assert torch.equal(greedy(small, ids, steps=4), greedy(gated, ids, steps=4))


def test_gguf_refuses_removed_sublayers_clearly(tmp_path):
    pytest.importorskip("gguf")
    small = compact(depth_pruned(llama4, [True, False, True, True, True, True, True, True], "sublayer"))
    with pytest.raises(ValueError, match="layer_granularity='layer'"):
        export_gguf(small, tmp_path / "m.gguf", tokenizer=tiny_bpe_tokenizer())
    assert not (tmp_path / "m.gguf").exists()
